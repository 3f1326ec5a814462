"""Architecture rules that keep the codebase in shape (STYLE.md §2 items 1-2, 17).

- imports point one way: engine/store (and sdmaker.files) never import HTTP or CLI libraries;
- ``import sdmaker.client`` (and the schema, the store, sdmaker.files) never imports torch, so clients and the CLI
  start fast;
- each package's ``__all__`` lists exactly the public names it defines or re-exports;
- only ``sdmaker/config.py`` reads the environment.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdmaker"
PACKAGES = [p.parent.relative_to(ROOT.parent).as_posix().replace("/", ".") for p in ROOT.rglob("__init__.py")]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["engine", "store", "models", "files.py"])
def test_core_packages_do_not_import_http_or_cli(package: str) -> None:
    pkg = ROOT / package
    if not pkg.exists():
        pytest.skip(f"sdmaker.{package} not present")
    for path in [pkg] if pkg.is_file() else pkg.rglob("*.py"):
        bad = _imported_modules(path) & {"fastapi", "uvicorn", "starlette", "typer", "rich", "click"}
        assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}"


@pytest.mark.parametrize("module", ["sdmaker.schema", "sdmaker.errors", "sdmaker.config", "sdmaker.client",
                                    "sdmaker.store", "sdmaker.models", "sdmaker.files"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not present")
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import {module} pulled in torch\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_the_public_names(package: str) -> None:
    _check_all(package)


@pytest.mark.parametrize("module", ["sdmaker.files"])
def test_top_level_modules_list_their_public_names(module: str) -> None:
    _check_all(module)


def _check_all(package: str) -> None:
    mod = importlib.import_module(package)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{package} has no __all__"
    # Public = classes and functions defined inside this package (imports of other libraries don't count).
    public = {n for n, v in vars(mod).items()
              if not n.startswith("_") and getattr(v, "__module__", "").startswith(package)
              and callable(v)}
    missing = sorted(n for n in exported if not hasattr(mod, n))
    assert not missing, f"{package}.__all__ names missing attributes: {missing}"
    unlisted = sorted(public - set(exported))
    assert not unlisted, f"{package} defines public names not in __all__: {unlisted}"


def test_only_config_reads_the_environment() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "config.py" and path.parent == ROOT:
            continue
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            offenders.append(path.relative_to(ROOT.parent).as_posix())
    assert not offenders, f"environment read outside sdmaker/config.py: {offenders}"
