"""Which code a cached result depends on, found from the code itself.

A cached thing (an extraction unit, a cumulant shard, a fit) is keyed by the SHA-256 of the
source of the modules that compute it and of every latentray module that those import,
followed through their ``import`` statements (read with :mod:`ast`, not executed) at any
depth, inside functions too. Rules:

* imports under ``if TYPE_CHECKING:`` run nothing and are not followed;
* ``from . import name`` counts the package's ``__init__`` only when ``name`` is not a
  module of that package (importing a module is not importing its package's contents);
* only latentray's own modules are followed; a module outside it (a third-party adapter)
  counts with its own file, and what it imports is described by its distribution's version.

So a change to the report, the CLI or ``status`` re-runs nothing, and a change to a module a
number depends on re-runs exactly the work that depends on it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "latentray"
_ROOT = Path(__file__).resolve().parent


def module_file(name: str) -> Path:
    """The source file of module ``name``, found without importing it (outside latentray,
    :func:`importlib.util.find_spec`, which imports only its parent packages)."""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        parts = name.split(".")[1:]
        base = _ROOT.joinpath(*parts)
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        raise ModuleNotFoundError(f"no latentray module {name!r} under {_ROOT}")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ModuleNotFoundError(f"no source file for module {name!r}")
    return Path(spec.origin)


def display_name(name: str) -> str:
    """``latentray.method.splits`` -> ``latentray/method/splits.py`` (as a user sees it)."""
    path = module_file(name)
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return str(path.relative_to(_ROOT.parent))
    return f"{name} ({path.name})"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module(name: str) -> bool:
    try:
        module_file(name)
        return True
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=None)
def _imports(name: str, path: Path, mtime_ns: int) -> frozenset[str]:
    """The latentray modules that module ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            modules = [s for s in submodules if s.startswith(PACKAGE) and _is_module(s)]
            found.update(modules)
            if len(modules) < len(submodules):  # a name defined in the module itself
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return frozenset(m for m in found if m == PACKAGE or m.startswith(PACKAGE + "."))


def dependencies(*names: str) -> list[str]:
    """``names`` and every latentray module they import, directly or not, sorted."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            todo.extend(_imports(name, path, path.stat().st_mtime_ns))
    return sorted(seen)


def code_digests(*names: str) -> dict[str, str]:
    """``{module as a path: SHA-256 of its source}`` for :func:`dependencies` of ``names``."""
    return {display_name(m): hashlib.sha256(module_file(m).read_bytes()).hexdigest()
            for m in dependencies(*names)}


def changed_code(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """What differs between two :func:`code_digests`, as phrases (``latentray/x.py changed``)."""
    recorded = recorded or {}
    out = [f"{m} changed" for m in sorted(set(recorded) & set(current))
           if recorded[m] != current[m]]
    out += [f"{m} is new" for m in sorted(set(current) - set(recorded))]
    out += [f"{m} is no longer used" for m in sorted(set(recorded) - set(current))]
    return out
