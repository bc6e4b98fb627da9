"""fsspec storage options from the command line's KEY=VALUE strings: dotted keys nest
(`client_kwargs.region_name=x`), `true`/`false` become bools, numbers become numbers (credentials never do)."""
from __future__ import annotations

from typing import Any

VERBATIM_OPTIONS = frozenset({"key", "secret", "token", "password", "username", "profile", "project"})  # never numbers


def _option_value(leaf: str, value: str) -> Any:
    """A storage option's value: true/false -> bool, a whole or decimal number -> int or float (s3fs retries=10,
    config_kwargs.retries.max_attempts=1), anything else, and credentials always, as given."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if leaf.lower() not in VERBATIM_OPTIONS and any(c.isdigit() for c in value):  # not "nan" or "inf"
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE strings -> fsspec storage options (dotted keys nest; `_option_value` types the values)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {pair!r} is not KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:8333)")
        *parents, leaf = key.split(".")
        parsed = _option_value(leaf, value)
        node = options
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"storage option {key!r} nests under a key that already has a value")
        node[leaf] = parsed
    return options
