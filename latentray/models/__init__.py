"""Model families behind one interface (:class:`~latentray.models.base.ModelAdapter`).

Families are found by name: the built-in ones below, and any third-party package that
registers an adapter class under the ``latentray.models`` entry-point group. Nothing here
imports a model package; the family's module is imported on first use, inside the
extraction actor.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, entry_points, version

from .base import ModelAdapter, ModelInfo, StructureError, resolve_layers

BUILTIN_FAMILIES = {
    "chgnet": "latentray.models.chgnet:CHGNetAdapter",
    "sevenn": "latentray.models.sevenn:SevenNetAdapter",
    "mace": "latentray.models.mace:MACEAdapter",
    "metatomic": "latentray.models.metatomic:MetatomicAdapter",
    "orb": "latentray.models.orb:OrbAdapter",
    "mattersim": "latentray.models.mattersim:MatterSimAdapter",
    "uma": "latentray.models.uma:UMAAdapter",
    "diep": "latentray.models.diep:DIEPAdapter",
    "hienet": "latentray.models.hienet:HIENetAdapter",
}


def available_families() -> dict[str, str]:
    """Family name -> ``module:Class`` for built-in and entry-point families."""
    families = dict(BUILTIN_FAMILIES)
    for ep in entry_points(group="latentray.models"):
        families.setdefault(ep.name, ep.value)
    return families


def _entry(family: str) -> tuple[str, str]:
    families = available_families()
    if family not in families:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(families)}")
    module_name, _, class_name = families[family].partition(":")
    return module_name, class_name


def adapter_module(family: str) -> str:
    """The name of the module that holds ``family``'s adapter (nothing is imported)."""
    return _entry(family)[0]


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family``: imports its module, which imports neither torch nor
    the family's package (they are imported when a checkpoint is loaded)."""
    module_name, class_name = _entry(family)
    return getattr(importlib.import_module(module_name), class_name)


def distribution_version(distribution: str) -> str:
    """The installed version of ``distribution``; an error, never None, when it is missing."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        import sys

        raise RuntimeError(f"distribution {distribution!r} (a model family's code) is not "
                           f"installed in this environment ({sys.executable})") from None


def load_adapter(family: str, checkpoint: str, **options) -> ModelAdapter:
    """Instantiate the adapter of ``family`` for ``checkpoint`` (imports the family)."""
    return adapter_class(family)(checkpoint, **options)


__all__ = [
    "ModelAdapter",
    "ModelInfo",
    "StructureError",
    "adapter_class",
    "adapter_module",
    "distribution_version",
    "available_families",
    "load_adapter",
    "resolve_layers",
]
