"""The layers of the code, read from the source (AST only: nothing of the project is imported).

Rules, each checked over every module of the seven packages, function-local imports included:
  layers      packages from bottom to top: schemas, lavi, workers, shapes, pipeline, bench, jobs; a module imports
              no package above its own;
  lavi        lavi/ imports the standard library, torch, numpy, safetensors, tokenizers, jinja2, llguidance,
              schemas and itself, nothing else (LAVI_ALLOWED: the exceptions, each with its reason);
  ray.data    only pipeline/ imports ray.data (`import ray.data`, `from ray.data ...`, `from ray import data`, or
              `ray.data` reached through `import ray`; RAY_DATA_ALLOWED: the exceptions);
  cycles      no import cycle between modules. Imports under `if TYPE_CHECKING:` are left out of this rule only
              (they never run); the other rules count them, a type is a dependency too.
An import is the module it names (`import a.b` -> a.b; `from a.b import c` -> a.b, and a.b.c when that is a module).
Imports by string (importlib.import_module) are not seen.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "lavi", "workers", "shapes", "pipeline", "bench", "jobs")  # bottom to top
LAVI_LIBRARIES = frozenset({"torch", "numpy", "safetensors", "tokenizers", "jinja2", "llguidance", "schemas", "lavi"})
# module -> {top-level package it may import beyond LAVI_LIBRARIES: why}. Each entry is a debt: it goes when the
# reason does (test_lavi_allow_list_is_still_needed fails once the import is gone).
LAVI_ALLOWED: dict[str, dict[str, str]] = {}
# module outside pipeline/ -> why it may import ray.data. None today: keep it that way.
RAY_DATA_ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "workers.units"
    name: str  # the module it imports, e.g. "workers.split", "ray.data"
    line: int
    text: str  # the statement as written, for messages
    typing_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.module} (line {self.line}: `{self.text}`)"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or
                                         (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(node: ast.AST, typing_only: bool = False) -> Iterable[tuple[ast.AST, bool]]:
    """Every node under `node`, each with whether it sits in the body of an `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if _type_checking(child):
            for n in child.body:
                yield n, True
                yield from _walk(n, True)
            for n in child.orelse:
                yield n, typing_only
                yield from _walk(n, typing_only)
        else:
            yield child, typing_only
            yield from _walk(child, typing_only)


def _base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of a `from` import (relative ones resolved against `module`'s package)."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    parts = package[:len(package) - level + 1]
    return ".".join(parts + ([name] if name else []))


def parse_imports(module: str, source: str, is_package: bool = False) -> list[Import]:
    """The imports of one module's source (see the module doc), anywhere in it."""
    out = []
    for node, typing_only in _walk(ast.parse(source)):
        text = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom)) else ""
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, node.lineno, text, typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node.level, node.module)
            out.append(Import(module, base, node.lineno, text, typing_only))
            out += [Import(module, f"{base}.{a.name}", node.lineno, text, typing_only) for a in node.names
                    if a.name != "*"]
        elif (isinstance(node, ast.Attribute) and node.attr == "data" and isinstance(node.value, ast.Name)
              and node.value.id == "ray"):  # `import ray` then `ray.data...`: ray loads ray.data on first use
            out.append(Import(module, "ray.data", node.lineno, ast.unparse(node), typing_only))
    return out


def project_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """module name -> (its file, whether it is a package's __init__) for every .py file of the seven packages."""
    mods = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            init = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if init else parts)] = (path, init)
    return mods


@functools.cache
def project_imports(root: Path = ROOT) -> tuple[set[str], list[Import]]:
    """The seven packages' modules and their imports (read once per session)."""
    mods = project_modules(root)
    return set(mods), [i for m, (path, init) in mods.items() for i in parse_imports(m, path.read_text(), init)]


def _top(name: str) -> str:
    return name.split(".")[0]


def layer_violations(imports: Iterable[Import]) -> list[str]:
    rank = {p: i for i, p in enumerate(LAYERS)}
    return _unique(f"{i.where()} imports {_top(i.name)}: rule `layers` ({' < '.join(LAYERS)}): {_top(i.module)} "
                   f"may not import {_top(i.name)}, a layer above it"
                   for i in imports if _top(i.name) in rank and rank[_top(i.name)] > rank[_top(i.module)])


def lavi_violations(imports: Iterable[Import], allowed: dict[str, dict[str, str]] = LAVI_ALLOWED) -> list[str]:
    return _unique(f"{i.where()} imports {_top(i.name)}: rule `lavi` (lavi/ imports only the standard library and "
                   f"{', '.join(sorted(LAVI_LIBRARIES))}; exceptions go in LAVI_ALLOWED with their reason)"
                   for i in imports if _top(i.module) == "lavi" and _top(i.name) not in LAVI_LIBRARIES
                   and _top(i.name) not in sys.stdlib_module_names and _top(i.name) not in allowed.get(i.module, {}))


def ray_data_violations(imports: Iterable[Import], allowed: dict[str, str] = RAY_DATA_ALLOWED) -> list[str]:
    return _unique(f"{i.where()} imports ray.data: rule `ray.data` (only pipeline/ touches ray.data: its API "
                   "changes between releases; exceptions go in RAY_DATA_ALLOWED with their reason)"
                   for i in imports if (i.name == "ray.data" or i.name.startswith("ray.data."))
                   and _top(i.module) != "pipeline" and i.module not in allowed)


def _unique(messages: Iterable[str]) -> list[str]:
    """One message per statement and rule (`from a.b import c` is read as two imports: a.b and a.b.c)."""
    return list(dict.fromkeys(messages))


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_in(edges, c) for c in components]


def _cycle_in(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first node back to itself, within the component (breadth first)."""
    start = min(component)
    came: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, set()) & component - {v}):
                if w == start:
                    path = [v]
                    while came[path[-1]] is not None:
                        path.append(came[path[-1]])
                    return [*reversed(path), start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def cycle_violations(modules: set[str], imports: Iterable[Import]) -> list[str]:
    edges: dict[str, set[str]] = {m: set() for m in modules}
    first: dict[tuple[str, str], Import] = {}
    for i in imports:
        if not i.typing_only and i.name in modules and i.name != i.module:
            edges[i.module].add(i.name)
            first.setdefault((i.module, i.name), i)
    return ["rule `cycles` (no import cycle between modules; TYPE_CHECKING imports left out): "
            + " -> ".join(f"{first[a, b].where()}" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
            for cycle in find_cycles(edges)]


def _fail(violations: list[str]) -> None:
    assert not violations, f"{len(violations)} violation(s):\n" + "\n".join(violations)


def test_packages_import_only_layers_below_their_own():
    """Guards against an upward import (say workers/ importing pipeline/): the layers then no longer build, test or
    ship one on top of the other, and the next edit turns it into a cycle."""
    _fail(layer_violations(project_imports()[1]))


def test_lavi_imports_only_its_libraries():
    """Guards against lavi/ (the model: loaded by the labeler actor, trained, converted) growing a dependency the
    model does not need (PIL, pyarrow, ray, transformers) that every user of the model then installs and loads."""
    _fail(lavi_violations(project_imports()[1]))


def test_lavi_allow_list_is_still_needed():
    """Guards against a stale LAVI_ALLOWED entry: once the import it excuses is gone, the entry would quietly let
    a new one back in."""
    _, imports = project_imports()
    stale = [f"LAVI_ALLOWED[{m!r}][{lib!r}] ({why}): {m} no longer imports {lib}: remove the entry"
             for m, libs in LAVI_ALLOWED.items() for lib, why in libs.items()
             if not any(i.module == m and _top(i.name) == lib for i in imports)]
    _fail(stale)


def test_only_pipeline_imports_ray_data():
    """Guards against ray.data spreading past pipeline/: its API changes between Ray releases, and one file should
    take that churn (workers/, jobs/ may use ray itself: actors, Ray Train, the Jobs API)."""
    _fail(ray_data_violations(project_imports()[1]))


def test_no_import_cycles():
    """Guards against modules that import each other (function-local imports included): one works only when the
    other happened to be imported first, and neither can be read, tested or moved alone."""
    _fail(cycle_violations(*project_imports()))


def test_the_tree_is_read():
    """Guards against the rules passing on nothing: every package is found, and a known edge is seen."""
    modules, imports = project_imports()
    assert {_top(m) for m in modules} == set(LAYERS)
    assert any(i.module == "workers.units" and i.name == "workers.split" for i in imports)


PLANTED = '''
from typing import TYPE_CHECKING
import ray
import PIL.Image
from . import sibling
from ..workers import units
if TYPE_CHECKING:
    from lavi.b import B
else:
    from lavi import c
def late():
    from ray import data
    return ray.data.range(3)
'''


def test_the_rules_catch_planted_violations():
    """Guards against a checker that cannot fail: planted imports of every kind are read and each rule reports them,
    naming the module, the import and the rule."""
    imports = parse_imports("lavi.a", PLANTED)
    seen = {(i.name, i.typing_only) for i in imports}
    assert {("lavi.sibling", False), ("workers.units", False), ("lavi.b", True), ("lavi.c", False),
            ("ray.data", False), ("PIL.Image", False)} <= seen, seen
    layer = layer_violations(imports)
    assert layer == [f"lavi.a (line 6: `from ..workers import units`) imports workers: rule `layers` "
                     f"({' < '.join(LAYERS)}): lavi may not import workers, a layer above it"], layer
    lavi = lavi_violations(imports)
    assert any(v.startswith("lavi.a (line 4: `import PIL.Image`) imports PIL: rule `lavi`") for v in lavi), lavi
    assert not any("typing" in v for v in lavi)  # the standard library is allowed
    assert not lavi_violations(imports, {"lavi.a": {"PIL": "test", "ray": "test", "workers": "test"}})
    ray_data = ray_data_violations(imports)
    assert [v.split(" imports ")[0] for v in ray_data] == ["lavi.a (line 12: `from ray import data`)",
                                                            "lavi.a (line 13: `ray.data`)"], ray_data
    assert not ray_data_violations([Import("pipeline.graph", "ray.data", 1, "import ray.data", False)])


def test_the_cycle_finder_finds_planted_cycles():
    """Guards against a cycle check that cannot fail: planted cycles are found, TYPE_CHECKING edges are not."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    found = find_cycles({"x": {"y", "z"}, "y": {"x"}, "z": {"w"}, "w": {"z"}})
    assert sorted(map(tuple, found)) == [("w", "z", "w"), ("x", "y", "x")]
    imports = [Import("p.a", "p.b", 3, "from p.b import f", False), Import("p.b", "p.a", 7, "import p.a", False)]
    (message,) = cycle_violations({"p.a", "p.b"}, imports)
    assert message.endswith("p.a (line 3: `from p.b import f`) -> p.b (line 7: `import p.a`) -> p.a"), message
    assert "rule `cycles`" in message
    assert not cycle_violations({"p.a", "p.b"}, [imports[0], Import("p.b", "p.a", 7, "import p.a", True)])
