"""The one small interface every model family implements.

An adapter turns structures into per-atom, rotation-invariant latent features of one
checkpoint. It is only ever imported inside an extraction actor (the driver and the
reducer never import a model package), so module-level imports of torch or of the
family's package belong in the family's own module, not here.

Layer names
-----------
``bb1 .. bbK``
    the invariant (l = 0) channels of the node features after message-passing layer k;
``ll``
    the hidden activations that feed the final linear map of the energy readout.

In a config, ``bb`` means the last backbone layer and ``all`` means every layer.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class StructureError(ValueError):
    """A structure that this model cannot process (the reason is the message)."""


class StopForward(Exception):
    """Raised by the forward hook of the last requested layer to end a model's forward pass
    there (the adapter catches it; nothing after that layer runs)."""


@dataclass(frozen=True)
class ModelInfo:
    """What an adapter reports about its checkpoint."""

    family: str
    checkpoint: str  # the name or path it was loaded from
    checkpoint_file: str  # the file actually read
    checkpoint_sha256: str
    cutoff: float  # Angstrom
    layer_widths: dict[str, int]  # every available layer -> feature width, in order
    supported_numbers: frozenset[int] | None  # atomic numbers, None: all


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_layers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The concrete layers that ``requested`` names, in the model's own order, without repeats:
    ``bb`` is the last backbone layer, ``all`` every layer; an unknown name is refused.

    The one place the aliases are resolved (the adapters, the config's check of a run's
    layers, the analysis and ``status`` all call this)."""
    backbone = [name for name in available if name.startswith("bb")]
    wanted: set[str] = set()
    for name in requested:
        if name == "all":
            wanted.update(available)
        elif name == "bb" and backbone:
            wanted.add(backbone[-1])
        elif name in available:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown layer {name!r}; this model has {list(available)} "
                "(and the aliases 'bb' for the last backbone layer, 'all')"
            )
    return [name for name in available if name in wanted]


def layer_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a layer of any model (None: it can): ``bb``, ``bbK``, ``ll``,
    ``all``."""
    if name in ("all", "bb", "ll") or (name.startswith("bb") and name[2:].isdigit()
                                       and int(name[2:]) >= 1):
        return None
    return f"{name!r} is not a layer name: choose from bb1, bb2, ..., bb (the last), ll, all"


def check_geometry(atoms: Any) -> None:
    """Raise StructureError for a geometry no model can use (:mod:`latentray.geometry`)."""
    from ..geometry import geometry_problem

    problem = geometry_problem(np.asarray(atoms.numbers), np.asarray(atoms.positions),
                               np.asarray(atoms.cell[:], dtype=float),
                               np.asarray(atoms.pbc, dtype=bool))
    if problem:
        raise StructureError(problem)


class ModelAdapter(ABC):
    """Load one checkpoint; turn structures into per-atom invariant features.

    The work is split in two so that graph building (CPU, per structure, may fail for
    one structure) is separate from the batched forward pass:

    - :meth:`prepare` converts one ``ase.Atoms`` into the model's own input, raising
      :class:`StructureError` when the model cannot process it;
    - :meth:`forward` runs a batch of prepared inputs under ``torch.inference_mode``
      (no forces, no stress) and returns, for each requested layer, an array of shape
      (total atoms in the batch, width) in input order.

    The contract each family declares, as class attributes, is checked here once and read
    by the config's validation without loading a model (nor importing the family's
    package: an adapter module imports it only when a checkpoint is loaded):

    ``family``
        the family's name in a config;
    ``distribution``
        the Python distribution whose installed version describes the model code
        (``chgnet``, ``mace-torch``, ...): recorded with every unit; not found is an error;
    ``dtypes``
        the dtypes a model of the family can run in;
    ``modalities``
        ``()``: the family has none; a tuple: the ones it has; ``None``: the checkpoint
        lists them (checked when it is loaded);
    ``option_names``
        the loader ``options`` the family understands.

    A family implements :meth:`prepare` and :meth:`_forward` (concrete layer names only);
    the aliases ``bb`` and ``all`` are resolved here.
    """

    family: str = ""
    distribution: str = ""
    dtypes: tuple[str, ...] = ("float32", "float64")
    modalities: tuple[str, ...] | None = ()
    option_names: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            missing = [name for name in ("family", "distribution") if not getattr(cls, name)]
            if missing:
                raise TypeError(f"model adapter {cls.__module__}.{cls.__qualname__} must "
                                f"declare {missing} (see latentray.models.base.ModelAdapter)")

    @classmethod
    def contract_problems(cls, dtype: str, modality: str | None, options: dict) -> list[str]:
        """What in (dtype, modality, options) this family refuses, before any checkpoint is
        read: each problem names the value and the choices."""
        problems = []
        if dtype not in cls.dtypes:
            problems.append(f"dtype: {dtype!r} is not one of {list(cls.dtypes)} (family "
                            f"{cls.family!r})")
        if cls.modalities == () and modality is not None:
            problems.append(f"modality: {modality!r}, but family {cls.family!r} has no "
                            f"modalities (leave it out)")
        elif cls.modalities and modality is not None and modality not in cls.modalities:
            problems.append(f"modality: {modality!r} is not one of {list(cls.modalities)} "
                            f"(family {cls.family!r})")
        unknown = sorted(set(options or {}) - cls.option_names)
        if unknown:
            problems.append(f"options: unknown option(s) {unknown}; family {cls.family!r} "
                            f"understands {sorted(cls.option_names)}")
        return problems

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
                 modality: str | None = None, options: dict | None = None) -> None:
        problems = self.contract_problems(dtype, modality, options or {})
        if problems:
            raise ValueError(f"{checkpoint}: " + "; ".join(problems))
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.modality = modality
        self.options = dict(options or {})

    # set by each family's __init__: the checkpoint file read, the cutoff (Angstrom), the
    # layers with their widths in model order, the supported atomic numbers (None: all)
    _file: str
    _cutoff: float
    _widths: dict[str, int]
    _supported: frozenset[int] | None
    _sha256: str | None = None

    @property
    def info(self) -> ModelInfo:
        if self._sha256 is None:
            self._sha256 = file_sha256(self._file)
        return ModelInfo(family=self.family, checkpoint=self.checkpoint,
                         checkpoint_file=self._file, checkpoint_sha256=self._sha256,
                         cutoff=self._cutoff, layer_widths=dict(self._widths),
                         supported_numbers=self._supported)

    def resolve(self, layers: Sequence[str]) -> list[str]:
        """The concrete layers of this model that ``layers`` name (:func:`resolve_layers`)."""
        return resolve_layers(layers, list(self._widths))

    def check(self, numbers: np.ndarray) -> None:
        """Raise :class:`StructureError` if an element is not supported."""
        supported = self.info.supported_numbers
        if supported is None:
            return
        unknown = sorted(set(int(z) for z in np.unique(numbers)) - supported)
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise StructureError(f"element(s) not supported by this model: {names}")

    def forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Features of a batch for ``layers`` (aliases allowed: a requested ``bb`` is also a
        key of the result, beside its concrete name)."""
        concrete = self.resolve(layers)
        if len(prepared) == 0:
            dtype = np.float64 if self.dtype == "float64" else np.float32
            out = {n: np.zeros((0, self._widths[n]), dtype=dtype) for n in concrete}
        else:
            out = self._forward(prepared, concrete)
        if "bb" in layers:
            out["bb"] = out[[n for n in self._widths if n.startswith("bb")][-1]]
        return out

    @abstractmethod
    def prepare(self, atoms: Any) -> Any: ...

    @abstractmethod
    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        """One batched pass for concrete ``layers``, in the model's order."""
