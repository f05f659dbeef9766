"""The manifest rule: what a unit's output depends on, and whether a recorded unit is still valid.

A unit is one (dataset shard, model). Its :class:`UnitInputs` are everything its latents
depend on: the shard's content, the checkpoint file's SHA-256, the model's family,
checkpoint name, modality, options, dtype and concrete layers, the family distribution's
version, and the code that computes them (:func:`latentray.codehash.code_digests` of the
worker and the adapter module). A re-run skips a unit whose recorded inputs equal the current
ones and whose files exist. ``latentray run`` and ``latentray status`` both decide with
:func:`explain`; status passes only what it can know without loading the model (the
checkpoint hash of a packaged name, or the version in a pip environment Ray builds, are
known to the actors only, and are then not compared).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..codehash import changed_code
from ..models.base import resolve_layers

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..records import ModelDescription
    from ..store import Store

@dataclass(frozen=True)
class UnitInputs:
    dataset: str
    shard: int
    shard_sha256: str
    model: str
    family: str
    checkpoint: str
    checkpoint_sha256: str
    modality: str | None
    options: dict
    dtype: str
    layers: tuple[str, ...]
    distribution: str
    version: str
    code: dict[str, str]

    @classmethod
    def of(cls, dataset: str, shard: int, shard_sha256: str, model: "ModelConfig",
           layers, description: "ModelDescription") -> "UnitInputs":
        return cls(dataset=dataset, shard=shard, shard_sha256=shard_sha256, model=model.id,
                   family=model.family, checkpoint=model.checkpoint,
                   checkpoint_sha256=description.checkpoint_sha256, modality=model.modality,
                   options=dict(model.options), dtype=model.dtype, layers=tuple(layers),
                   distribution=description.distribution, version=description.version,
                   code=dict(description.code))

    def digest(self) -> str:
        """SHA-256 of the inputs (keys the unit's cumulants and fits)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """``manifest/dataset=D/model=M/part-SHARD.json``: one unit's last run.

    ``outputs``: the files written (layer -> path, and ``failures``) and the structure
    counts; ``error`` instead when the unit failed after Ray's retries. ``requested_layers``
    and ``layer_widths`` let ``status`` resolve the config's layer aliases without the model."""

    inputs: UnitInputs
    requested_layers: tuple[str, ...]
    layer_widths: dict[str, int]
    outputs: dict | None = None
    error: str | None = None
    seconds: dict = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    finished: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ManifestEntry | None":
        """The entry, or None for one written by an older latentray (a different schema):
        such a unit is run again."""
        try:
            names = {f.name for f in fields(UnitInputs)}
            inputs = raw["inputs"]
            if set(inputs) != names:
                return None
            inputs = UnitInputs(**{**inputs, "layers": tuple(inputs["layers"])})
            return cls(**{**raw, "inputs": inputs,
                          "requested_layers": tuple(raw["requested_layers"])})
        except (KeyError, TypeError):
            return None


def read_entry(store: "Store", dataset: str, model: str, shard: int) -> ManifestEntry | None:
    raw = store.read_json(store.manifest_path(dataset, model, shard))
    return None if raw is None else (ManifestEntry.from_dict(raw) or _OUTDATED)


# an entry of an older schema: never matches, explained as such
_OUTDATED = ManifestEntry(inputs=None, requested_layers=(), layer_widths={})  # type: ignore


def explain(entry: ManifestEntry | None, current: dict[str, Any],
            store: "Store | None" = None) -> tuple[str, str]:
    """``(state, why)`` of a unit: ``done``, ``pending``, ``failed`` or ``stale``.

    ``current``: the unit's inputs as known now (the fields of :class:`UnitInputs`, any of
    them left out when not known here; ``requested_layers`` in place of ``layers`` is
    resolved against the layers the unit recorded). With ``store``, a done unit's files must
    exist."""
    if entry is None:
        return "pending", "never run"
    if entry is _OUTDATED:
        return "stale", "recorded by an older latentray (another manifest schema)"
    recorded = asdict(entry.inputs)
    current = dict(current)
    if "requested_layers" in current:
        try:
            current["layers"] = tuple(resolve_layers(current.pop("requested_layers"),
                                                     list(entry.layer_widths)))
        except ValueError as exc:
            return "stale", f"layers: {exc}"
    changed = []
    for key, value in current.items():
        if key == "code":
            changed += changed_code(recorded["code"], value)
        elif key == "version":
            if recorded["version"] != value:
                changed.append(f"{recorded['distribution']} {recorded['version']} -> {value}")
        elif _norm(recorded.get(key)) != _norm(value):
            changed.append(key)
    if changed:
        return "stale", "changed since it ran: " + ", ".join(changed)
    if entry.error is not None:
        return "failed", entry.error
    if store is not None:
        missing = [p for p in entry.outputs["files"].values() if not store.exists(p)]
        if missing:
            return "pending", f"{len(missing)} output file(s) missing, e.g. {missing[0]}"
    return "done", ""


def _norm(value):
    """Lists and tuples compare equal; an empty mapping equals none."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value or None if isinstance(value, dict) else value
