"""`python -m jobs.probe`: can this interpreter run lavi-label? `submit` runs it on the cluster first.

Standard library only until the checks: it prints one JSON line, {"ok": true, "python", "version"} or
{"ok": false, "python", "missing", "error"}, and exits 0, or 3 when a module lavi-label needs cannot be imported.
"""

from __future__ import annotations

import importlib
import json
import sys

# what the driver of a run imports, in the order a missing one is most likely (the heavy ones last)
MODULES = ("click", "numpy", "pyarrow", "fsspec", "PIL", "ray", "ray.data", "safetensors", "tokenizers", "torch",
           "transformers", "jobs.cli")
MARK = "lavi-label probe: "


def probe() -> dict:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the answer
            return {"ok": False, "python": sys.executable, "missing": name, "error": f"{type(err).__name__}: {err}"}
    return {"ok": True, "python": sys.executable, "version": sys.version.split()[0]}


if __name__ == "__main__":
    result = probe()
    print(MARK + json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 3)
