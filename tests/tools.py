"""Load a command-line tool from tools/ as a module, so tests call its `main([...])` in process.

tools/ is not a package (each tool runs as `python tools/NAME.py`), hence importlib by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a fresh module named `<name>_tool`."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"no tool {name!r} in {TOOLS}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
