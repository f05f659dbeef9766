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
    """Expand ``bb`` (last backbone layer) and ``all``; refuse unknown names.

    Returns the concrete layer names in the model's own order, without repeats.
    """
    backbone = [name for name in available if name.startswith("bb")]
    wanted: set[str] = set()
    for name in requested:
        if name == "all":
            wanted.update(available)
        elif name == "bb":
            wanted.add(backbone[-1])
        elif name in available:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown layer {name!r}; this model has {list(available)} "
                "(and the aliases 'bb' for the last backbone layer, 'all')"
            )
    return [name for name in available if name in wanted]


def check_geometry(atoms: Any) -> None:
    """Raise StructureError for a geometry no model can use (:mod:`latentray.geometry`)."""
    from ..geometry import geometry_problem

    problem = geometry_problem(np.asarray(atoms.numbers), np.asarray(atoms.positions),
                               np.asarray(atoms.cell[:], dtype=float),
                               np.asarray(atoms.pbc, dtype=bool))
    if problem:
        raise StructureError(problem)


def with_aliases(out: dict[str, np.ndarray], requested: Sequence[str],
                  available: Sequence[str]) -> dict[str, np.ndarray]:
    """Results are keyed by concrete layer names; a requested ``bb`` is also a key."""
    if "bb" in requested:
        out["bb"] = out[[n for n in available if n.startswith("bb")][-1]]
    return out


class ModelAdapter(ABC):
    """Load one checkpoint; turn structures into per-atom invariant features.

    The work is split in two so that graph building (CPU, per structure, may fail for
    one structure) is separate from the batched forward pass:

    - :meth:`prepare` converts one ``ase.Atoms`` into the model's own input, raising
      :class:`StructureError` when the model cannot process it;
    - :meth:`forward` runs a batch of prepared inputs under ``torch.inference_mode``
      (no forces, no stress) and returns, for each requested layer, a float32 array
      of shape (total atoms in the batch, width) in input order.
    """

    family: str = ""
    option_names: frozenset[str] = frozenset()  # the ``options`` this family understands

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
                 modality: str | None = None, options: dict | None = None) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.modality = modality
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - self.option_names)
        if unknown:
            raise ValueError(f"{checkpoint}: unknown option(s) {unknown} for family "
                             f"{self.family!r}; it understands {sorted(self.option_names)}")

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

    @abstractmethod
    def prepare(self, atoms: Any) -> Any: ...

    @abstractmethod
    def forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]: ...
