"""The typed records that pass between the stages (frozen dataclasses, plain data inside).

``ModelDescription``: what an extraction actor reports about a loaded model (the driver never
loads one). ``DatasetCounts`` and ``ExtractionSummary``: what the extraction stage hands to
the analysis, the report and the run's provenance. The manifest's records (what a unit's
output depends on) live with their rule in :mod:`latentray.extraction.manifest`; a fit's with
the fit cache in :mod:`latentray.analysis.fit_cache`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelDescription:
    """One configured model as its actor loaded it.

    ``layer_widths``: every layer the checkpoint offers -> its width, in model order;
    ``distribution``/``version``: the family's Python distribution (``mace-torch``, ...) and
    its installed version; ``code``: :func:`latentray.codehash.code_digests` of the worker
    and the adapter module (what the latents are computed by)."""

    model: str
    family: str
    checkpoint: str
    checkpoint_file: str
    checkpoint_sha256: str
    cutoff: float
    layer_widths: dict[str, int]
    supported_numbers: tuple[int, ...] | None
    distribution: str
    version: str
    code: dict[str, str]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DatasetCounts:
    """What the read stage found in one dataset."""

    structures: int = 0
    atoms: int = 0
    shards: int = 0
    failed: int = 0  # frames that could not be read (failures/, model=input)
    dropped: int = 0  # structures a filter dropped (dropped/)


@dataclass(frozen=True)
class UnitTotals:
    """Extraction units of one run: how many there were, skipped (manifest matched), ran."""

    units: int = 0
    skipped: int = 0
    ran: int = 0
    structures: int = 0  # in the units that ran
    atoms: int = 0
    failed: int = 0  # structures a model could not process, in the units that ran


@dataclass(frozen=True)
class ExtractionSummary:
    """The extraction stage's result: the models, the concrete layers extracted of each
    (aliases resolved), the unit totals and the datasets' counts."""

    descriptions: dict[str, ModelDescription]
    layers: dict[str, tuple[str, ...]]
    totals: UnitTotals = field(default_factory=UnitTotals)
    datasets: dict[str, DatasetCounts] = field(default_factory=dict)

    def width(self, model: str, layer: str) -> int:
        return self.descriptions[model].layer_widths[layer]
