"""The layering contract in pyproject.toml covers the whole package.

``lint-imports`` (run by ``make test``) checks the contract; this test checks
that the contract leaves nothing out: a new package or top-level module that
is in no layer would be free to import anything, and a layer that names a
module that no longer exists checks nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import imagefs

PACKAGE = Path(imagefs.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def _contracts() -> list[dict[str, Any]]:
    config = tomllib.loads(PYPROJECT.read_text())
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _top_level_modules() -> set[str]:
    names = set()
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            names.add(f"imagefs.{path.name}")
        elif path.suffix == ".py" and path.stem not in {"__init__", "__main__"}:
            names.add(f"imagefs.{path.stem}")
    return names


def _layered_modules() -> list[str]:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    modules = []
    for layer in layers["layers"]:
        modules += [m.strip() for m in layer.replace(":", "|").split("|")]
    return modules


def test_every_top_level_module_is_in_a_layer() -> None:
    layered = _layered_modules()
    assert len(layered) == len(set(layered)), "a module is in two layers"
    assert set(layered) == _top_level_modules()


def test_every_module_but_the_daemon_is_kept_from_pyfuse3() -> None:
    (forbidden,) = [c for c in _contracts() if c["type"] == "forbidden"]
    assert "pyfuse3" in forbidden["forbidden_modules"]
    assert set(forbidden["source_modules"]) == _top_level_modules() - {"imagefs.daemon"}


def test_the_shared_base_stays_small() -> None:
    # The top level holds only what every folder shares (issue #11: at most 8).
    modules = [p for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__"}]
    assert len(modules) <= 8, sorted(p.name for p in modules)
