"""Architecture rules that keep the codebase in shape (STYLE.md §2 items 1-2, 17).

- imports point one way: engine/store (and sdmaker.files) never import HTTP or CLI libraries;
- ``import sdmaker.client`` (and the schema, the store, sdmaker.files) never imports torch, so clients and the CLI
  start fast;
- each package's ``__all__`` lists exactly the public names it defines or re-exports;
- only ``sdmaker/config.py`` reads the environment;
- ``serving/`` is cut along the process boundary: ``serving.container`` (the worker process) and
  ``serving.daemon`` never import each other; both may import the light shared modules next to them;
- no import cycles between the modules (and sub-packages) of one package, counting module-level imports.
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


SERVING = ROOT / "serving"
#: Shared by the daemon and the worker process: light modules that import neither side.
SERVING_SHARED = {"_protocol.py", "_http.py", "_requirements.py", "_hosts.py", "_worker_secret.py"}
#: (module, imported prefix) pairs allowed to cross the boundary: none.
SERVING_CROSSING_ALLOWED: set[tuple[str, str]] = set()


def _all_imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in ``path`` (function-local ones included), absolute dotted."""
    package = path.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".")
    package = package.rsplit(".", 1)[0] if path.name != "__init__.py" else package.removesuffix(".__init__")
    return _imports(ast.parse(path.read_text()).body, package, deep=True)


def _imports(body: list[ast.stmt], package: str, *, deep: bool) -> set[str]:
    """Modules imported by ``body`` of a module in ``package``: ``from X import n`` gives X and X.n.

    ``deep=False`` keeps to module level (blocks under ``if``/``try``, such as ``TYPE_CHECKING``, count;
    function and class bodies do not).
    """
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if deep:
                names |= _imports(node.body, package, deep=True)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            inner = [*node.body, *getattr(node, "orelse", [])]
            for handler in getattr(node, "handlers", []):
                inner += handler.body
            inner += getattr(node, "finalbody", [])
            names |= _imports(inner, package, deep=deep)
    return names


@pytest.mark.parametrize("side, other", [("container", "daemon"), ("daemon", "container")])
def test_serving_sides_do_not_import_each_other(side: str, other: str) -> None:
    offenders = []
    for path in sorted((SERVING / side).rglob("*.py")):
        rel = path.relative_to(SERVING).as_posix()
        crossing = {n for n in _all_imports(path) if n == f"sdmaker.serving.{other}"
                    or n.startswith(f"sdmaker.serving.{other}.")}
        crossing = {n for n in crossing if not any(rel == a and n.startswith(b) for a, b in SERVING_CROSSING_ALLOWED)}
        offenders += [f"{rel} imports {n}" for n in sorted(crossing)]
    assert not offenders, offenders


def test_serving_shared_modules_import_neither_side() -> None:
    for name in sorted(SERVING_SHARED):
        bad = {n for n in _all_imports(SERVING / name)
               if n.startswith(("sdmaker.serving.daemon", "sdmaker.serving.container"))}
        assert not bad, f"serving/{name} imports {bad}"
    top = {p.name for p in SERVING.glob("*.py")} - {"__init__.py"}
    assert top == SERVING_SHARED, f"serving/ holds modules of neither side nor listed as shared: {top - SERVING_SHARED}"


def _package_graph(package_dir: Path) -> dict[str, set[str]]:
    """Import edges between the children of one package (modules and sub-packages; ``__init__`` included)."""
    dotted = package_dir.relative_to(ROOT.parent).as_posix().replace("/", ".")
    children = {p.stem for p in package_dir.glob("*.py")} | {p.parent.name for p in package_dir.glob("*/__init__.py")}
    graph: dict[str, set[str]] = {c: set() for c in children}
    for path in package_dir.rglob("*.py"):
        rel = path.relative_to(package_dir).parts
        node = rel[0].removesuffix(".py")
        module = path.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".")
        inner = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
        for name in _imports(ast.parse(path.read_text()).body, inner, deep=False):
            if name == dotted:
                target = "__init__"
            elif name.startswith(dotted + "."):
                target = name[len(dotted) + 1:].split(".")[0]
            else:
                continue
            if target in children and target != node:
                graph[node].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles_inside_a_package(package: str) -> None:
    package_dir = ROOT.parent / package.replace(".", "/")
    cycle = _find_cycle(_package_graph(package_dir))
    assert cycle is None, f"{package}: import cycle {' -> '.join(cycle or [])} (module-level imports)"
