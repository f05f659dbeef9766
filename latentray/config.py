"""The job configuration: YAML in, validated dataclasses out.

Unknown keys and bad values are refused with a message that names them and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .method import METRICS
from .models.base import layer_name_problem
from .store import INPUT

from .datasets import FORMATS as DATASET_FORMATS
from .datasets import Filters
LEVELS = ("atom", "structure")
BASELINES = ("mean", "sum")
MAPS = ("pca", "pcovr")


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key."""


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: str
    format: str = "extxyz"
    subset_key: str | None = "subset"
    limit: int | None = None  # read only the first N structures
    filters: Filters = Filters()  # min_atoms, exclude_elements, max_neighbour_distance
    on_error: str = "raise"  # or "skip": an unreadable frame goes to failures/ (model=input)


@dataclass(frozen=True)
class ModelConfig:
    id: str
    family: str
    checkpoint: str
    layers: tuple[str, ...] = ("all",)
    dtype: str = "float32"
    device: str = "auto"
    modality: str | None = None
    options: dict = field(default_factory=dict)  # family-specific loader options
    parent: str | None = None  # the id of the model this one was fine-tuned from (the report)
    trained_on: str | None = None  # its training data in your words, e.g. "MPtrj (PBE)": the
    # report compares each set of models trained on the same data with the others


@dataclass(frozen=True)
class ExtractionConfig:
    shard_size: int = 250  # structures per unit of work
    batch_atoms: int = 64  # atom budget of one forward batch (CPU: small is faster; GPU: raise it)
    actors: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    # CPU actors per extraction actor that build its graphs ahead of it (on a GPU node: its
    # spare CPUs); 0: each extraction actor builds its own
    graph_builders: int = 0


@dataclass(frozen=True)
class AnalysisConfig:
    metrics: tuple[str, ...] = ("gfre", "lfre")
    levels: tuple[str, ...] = LEVELS
    layers: tuple[str, ...] = ("bb",)  # compared between models, same name on both sides
    n_test: int = 1000
    seed: int = 0
    order: int = 2  # cumulant order of the structure-level features
    baselines: tuple[str, ...] = BASELINES  # pooled structure features compared beside cumulants
    order_metrics: tuple[str, ...] = ("gfre", "lfre")  # within each model, order n -> n+1, 1 -> 8
    spread_seeds: tuple[int, ...] = ()  # more split seeds: each number is refitted, +- spread
    # within each model, atom level: ll -> bbK and bbK -> ll for every extracted bb layer
    layer_metrics: tuple[str, ...] = ()
    # 2-D maps of the structure features (cumulants of ``order``): pca, pcovr (energy per atom)
    maps: tuple[str, ...] = ("pca", "pcovr")
    maps_max_structures: int = 20000  # a seeded sample of at most this many per map
    # above this size (every model's latents of one dataset and layer, as float32) the fits
    # stream from Parquet (mergeable statistics, hash split) instead of holding the rows
    in_memory_limit_mb: int = 2048


@dataclass(frozen=True)
class Config:
    output: str
    datasets: tuple[DatasetConfig, ...]
    models: tuple[ModelConfig, ...]
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    analyses: AnalysisConfig = field(default_factory=AnalysisConfig)
    # family -> {python: PATH} or {pip: [...]}: the environment its extraction actors run in
    environments: dict = field(default_factory=dict)
    source: str = "<dict>"  # where the config came from, for messages and provenance


def _build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown and missing keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and name not in raw
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    values = {}
    for name, value in raw.items():
        default = fields[name].default
        if isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(default, tuple) and isinstance(value, str):
            value = (value,)
        values[name] = value
    return cls(**values)


def _dataset(raw: Any, where: str) -> DatasetConfig:
    if isinstance(raw, dict) and "filters" in raw:
        raw = {**raw, "filters": _build(Filters, raw["filters"] or {}, f"{where}.filters")}
    return _build(DatasetConfig, raw, where)


def parse_dataset(raw: Any, where: str) -> DatasetConfig:
    """One ``datasets`` entry, built and validated."""
    d = _dataset(raw, where)
    _check(isinstance(d.name, str) and d.name.replace("-", "").replace("_", "").replace(".", "").isalnum(),
           f"{where}.name: use letters, digits, '-', '_', '.', got {d.name!r}")
    if d.limit is not None:
        _positive_int(d.limit, f"{where}.limit")
    _check(d.format in DATASET_FORMATS,
           f"{where}.format: {d.format!r} is not supported; choose from {list(DATASET_FORMATS)}")
    _check(d.on_error in ("raise", "skip"),
           f"{where}.on_error: 'raise' or 'skip', got {d.on_error!r}")
    f = d.filters
    _check(isinstance(f.min_atoms, int) and f.min_atoms >= 1,
           f"{where}.filters.min_atoms: an integer >= 1, got {f.min_atoms!r}")
    from ase.data import chemical_symbols

    bad = [e for e in f.exclude_elements if e not in chemical_symbols[1:]]
    _check(not bad, f"{where}.filters.exclude_elements: not element symbols: {bad}")
    _check(f.max_neighbour_distance is None or (
        isinstance(f.max_neighbour_distance, (int, float)) and f.max_neighbour_distance > 0),
           f"{where}.filters.max_neighbour_distance: a positive distance in A, or null")
    return d


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(value: Any, where: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{where}: must be a positive integer, got {value!r}")


def parse_config(raw: dict, source: str = "<dict>") -> Config:
    """Validate a config mapping (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping")
    allowed = {"output", "datasets", "models", "extraction", "analyses", "environments"}
    unknown = sorted(set(raw) - allowed)
    _check(not unknown, f"{source}: unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("output", "datasets", "models"):
        _check(key in raw, f"{source}: missing top-level key {key!r}")
    _check(isinstance(raw["output"], str) and raw["output"],
           f"{source}: 'output' must be a path or URI")
    for key in ("datasets", "models"):
        _check(isinstance(raw[key], list) and raw[key], f"{source}: {key!r} must be a non-empty list")

    datasets = tuple(parse_dataset(d, f"{source}: datasets[{i}]")
                     for i, d in enumerate(raw["datasets"]))
    models = tuple(_build(ModelConfig, {k: (str(v) if k == "checkpoint" else v)
                                        for k, v in m.items()} if isinstance(m, dict) else m,
                          f"{source}: models[{i}]")
                   for i, m in enumerate(raw["models"]))
    extraction = _build(ExtractionConfig, raw.get("extraction") or {}, f"{source}: extraction")
    analyses = _build(AnalysisConfig, raw.get("analyses") or {}, f"{source}: analyses")

    names = [d.name for d in datasets]
    _check(len(set(names)) == len(names), f"{source}: dataset names repeat: {names}")

    environments = raw.get("environments") or {}
    _check(isinstance(environments, dict), f"{source}: environments: a mapping family -> "
                                           f"{{python: PATH}} or {{pip: [...]}}")
    for i, m in enumerate(models):
        where = f"{source}: models[{i}] ({m.id})"
        _check(isinstance(m.id, str) and m.id.replace("-", "").replace("_", "").replace(".", "").isalnum(),
               f"{where}.id: use letters, digits, '-', '_', '.', got {m.id!r}")
        _check(isinstance(m.family, str) and m.family, f"{where}.family: required")
        _check(all(isinstance(name, str) for name in m.layers) and m.layers,
               f"{where}.layers: a list of layer names such as [bb, ll] or [all]")
        for name in m.layers:
            problem = layer_name_problem(name)
            _check(problem is None, f"{where}.layers: {problem}")
        _check(isinstance(m.options, dict), f"{where}.options: a mapping of the family's "
                                            f"loader options")
        _check(isinstance(m.device, str) and (m.device in ("auto", "cpu", "cuda") or re.fullmatch(
            r"cuda:\d+", m.device) is not None),
               f"{where}.device: auto, cpu, cuda or cuda:N, got {m.device!r}")
        _check_family(m, where, m.family in environments)
    ids = [m.id for m in models]
    _check(len(set(ids)) == len(ids), f"{source}: model ids repeat: {ids}")
    for i, m in enumerate(models):
        _check(m.parent is None or (m.parent in ids and m.parent != m.id),
               f"{source}: models[{i}] ({m.id}).parent: the id of another model of this "
               f"config, got {m.parent!r}")
        _check(m.trained_on is None or (isinstance(m.trained_on, str) and m.trained_on.strip()),
               f"{source}: models[{i}] ({m.id}).trained_on: a name of its training data, "
               f"got {m.trained_on!r}")
    _check(INPUT not in ids, f"{source}: model id {INPUT!r} is reserved (failures/ of the "
                             f"frames that could not be read)")

    e = extraction
    _positive_int(e.shard_size, f"{source}: extraction.shard_size")
    _positive_int(e.batch_atoms, f"{source}: extraction.batch_atoms")
    _positive_int(e.cpus_per_actor, f"{source}: extraction.cpus_per_actor")
    if e.actors is not None:
        _positive_int(e.actors, f"{source}: extraction.actors")
    _check(isinstance(e.gpus_per_actor, (int, float)) and e.gpus_per_actor >= 0,
           f"{source}: extraction.gpus_per_actor: a number >= 0")
    _check(isinstance(e.graph_builders, int) and not isinstance(e.graph_builders, bool)
           and e.graph_builders >= 0,
           f"{source}: extraction.graph_builders: an integer >= 0, got {e.graph_builders!r}")

    a = analyses
    bad = sorted(set(a.metrics) - set(METRICS))
    _check(not bad, f"{source}: analyses.metrics: unknown {bad}; choose from {list(METRICS)}")
    bad = sorted(set(a.order_metrics) - set(METRICS))
    _check(not bad, f"{source}: analyses.order_metrics: unknown {bad}; choose from {list(METRICS)}")
    bad = sorted(set(a.layer_metrics) - set(METRICS))
    _check(not bad, f"{source}: analyses.layer_metrics: unknown {bad}; choose from {list(METRICS)}")
    bad = sorted(set(a.maps) - set(MAPS))
    _check(not bad, f"{source}: analyses.maps: unknown {bad}; choose from {list(MAPS)}")
    _positive_int(a.maps_max_structures, f"{source}: analyses.maps_max_structures")
    bad = sorted(set(a.baselines) - set(BASELINES))
    _check(not bad, f"{source}: analyses.baselines: unknown {bad}; choose from {list(BASELINES)}")
    bad = sorted(set(a.levels) - set(LEVELS))
    _check(not bad, f"{source}: analyses.levels: unknown {bad}; choose from {list(LEVELS)}")
    _positive_int(a.n_test, f"{source}: analyses.n_test")
    _check(isinstance(a.seed, int), f"{source}: analyses.seed: an integer")
    _check(all(isinstance(s, int) and not isinstance(s, bool) for s in a.spread_seeds)
           and a.seed not in a.spread_seeds and len(set(a.spread_seeds)) == len(a.spread_seeds),
           f"{source}: analyses.spread_seeds: distinct integers other than seed, "
           f"got {list(a.spread_seeds)}")
    _check(isinstance(a.in_memory_limit_mb, int) and a.in_memory_limit_mb >= 0,
           f"{source}: analyses.in_memory_limit_mb: an integer >= 0 (0: always stream)")
    _check(isinstance(a.order, int) and 1 <= a.order <= 8,
           f"{source}: analyses.order: an integer from 1 to 8, got {a.order!r}")
    for name in a.layers:
        problem = layer_name_problem(name)
        _check(problem is None and name != "all",
               f"{source}: analyses.layers: {problem or 'all is not one layer'}; the layers "
               f"compared between models are bb, bbK or ll")
    for family, spec in environments.items():
        _check(isinstance(spec, dict) and len(spec) == 1 and set(spec) <= {"python", "pip"}
               and (isinstance(spec.get("python", ""), str)
                    and isinstance(spec.get("pip", []), list)),
               f"{source}: environments.{family}: one of {{python: PATH}} (a prepared "
               f"environment's interpreter) or {{pip: [REQUIREMENT, ...]}}, got {spec!r}")
        _check("python" not in spec or os.path.isfile(spec["python"]),
               f"{source}: environments.{family}.python: no interpreter at {spec.get('python')!r}"
               f" (build it first, e.g. `make family-envs`)")
    return Config(output=raw["output"], datasets=datasets, models=models,
                  extraction=extraction, analyses=analyses, environments=environments,
                  source=source)


def _check_family(m: ModelConfig, where: str, has_environment: bool) -> None:
    """The family exists and accepts the model's dtype, modality and options, from the
    contract its adapter class declares (no model package is imported). A family that only
    its own environment knows (an ``environments`` entry, e.g. a ``pip`` one) is checked by
    its actor when the job starts, before anything is read or written."""
    from .models import adapter_class, available_families

    families = available_families()
    if m.family not in families:
        _check(has_environment, f"{where}.family: unknown family {m.family!r}; choose from "
                                f"{sorted(families)} (a family installed only in its own "
                                f"environment needs an `environments` entry)")
        return
    try:
        cls = adapter_class(m.family)
    except ImportError as exc:
        _check(has_environment, f"{where}.family: the adapter of {m.family!r} cannot be "
                                f"imported here: {exc}")
        return
    problems = cls.contract_problems(m.dtype, m.modality, m.options)
    _check(not problems, "; ".join(f"{where}.{problem}" for problem in problems))


def load_config(path: str | Path, output: str | None = None) -> Config:
    """Read and validate a YAML config; ``output`` overrides its ``output`` key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(raw, dict) and output is not None:
        raw = {**raw, "output": output}
    return parse_config(raw, source=str(path))


def config_to_dict(config: Config) -> dict:
    """The config as plain data (for provenance and hashing)."""
    data = dataclasses.asdict(config)
    data.pop("source", None)
    return data
