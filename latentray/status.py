"""``latentray status OUTPUT``: the state of every extraction unit and fit of a job, without
running it.

A unit is one (dataset shard, model). Against the config (the one the last run recorded in
``OUTPUT/run.json``, or one given with ``--config``, e.g. with a model added) each unit is

* ``done``: its manifest entry matches the current inputs and its files exist;
* ``pending``: never run, or its files are missing;
* ``failed``: its last run raised (the manifest keeps the reason); a re-run tries it again;
* ``stale``: an input changed since it ran, named: the shard's structures, the checkpoint
  file, the model's family, checkpoint, modality, options, dtype or layers, a module of the
  code that computes it, or the family distribution's version.

The rule is :func:`latentray.extraction.manifest.explain`, the one ``latentray run`` uses,
given what can be known here without loading a model: the checkpoint hash of a packaged name
and the version inside a ``pip`` environment that Ray builds are known to the actors only and
are not compared here. The fits in ``results/fits.parquet`` are checked against the code
they were computed with. Structures that a model could not process are counted from
``failures/`` with their most common reasons.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from .codehash import changed_code
from .config import Config, ConfigError, parse_config
from .extraction.manifest import explain, read_entry
from .models.base import file_sha256
from .store import INPUT, Store

STATES = ("done", "pending", "failed", "stale")


@dataclass(frozen=True)
class Unit:
    dataset: str
    shard: int
    model: str
    state: str
    detail: str = ""


def recorded_config(store: Store) -> Config:
    """The config of the last run into ``store`` (``run.json``)."""
    from .reader import Run

    run = Run(store).summary
    if run is None:
        raise ConfigError(f"{store.uri}: no run.json (no finished run yet): give --config")
    raw = dict(run["provenance"]["config"])
    raw["output"] = store.uri
    return parse_config(raw, source=f"{store.uri}/run.json")


def _shards(store: Store, dataset: str) -> dict[int, str]:
    """Shard number -> content hash of the prepared structures of ``dataset``."""
    return {int(posixpath.basename(path)[5:10]):
            store.parquet_metadata(path).get("latentray.shard_sha256", "")
            for path in store.parquet_files(store.path("structures", f"dataset={dataset}"))
            if posixpath.basename(path).startswith("part-")}


def unit_states(config: Config, store: Store) -> list[Unit]:
    """Every unit of ``config`` whose dataset shards exist in ``store``, with its state."""
    current = {m.id: _known_inputs(m) for m in config.models}
    units = []
    for d in config.datasets:
        for shard, shard_hash in sorted(_shards(store, d.name).items()):
            for m in config.models:
                entry = read_entry(store, d.name, m.id, shard)
                known = {**current[m.id], "shard_sha256": shard_hash}
                if entry is not None and entry.inputs is not None:
                    version = _installed_version(config, m.family, entry.inputs.distribution)
                    if version is not None:
                        known["version"] = version
                units.append(Unit(d.name, shard, m.id, *explain(entry, known, store)))
    return units


def _known_inputs(m) -> dict:
    """A unit's inputs as far as they are known without loading its model."""
    from .extraction.worker import unit_code

    known = {"family": m.family, "checkpoint": m.checkpoint, "modality": m.modality,
             "options": m.options, "dtype": m.dtype, "requested_layers": m.layers}
    if os.path.isfile(m.checkpoint):
        known["checkpoint_sha256"] = file_sha256(m.checkpoint)
    try:
        known["code"] = unit_code(m.family)
    except (ModuleNotFoundError, ValueError):  # a third-party family not importable here
        pass
    return known


@lru_cache(maxsize=None)
def _version_in(python: str | None, distribution: str) -> str | None:
    if python is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(distribution)
        except PackageNotFoundError:
            return None
    done = subprocess.run([python, "-c", "import sys, importlib.metadata as m; "
                           "print(m.version(sys.argv[1]))", distribution],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


def _installed_version(config: Config, family: str, distribution: str) -> str | None:
    """The version of ``distribution`` where ``family``'s actors run: the driver's
    environment, or a prepared one (``{python: PATH}``); None where Ray builds it (``pip``)
    or it is not installed (then ``run`` says so)."""
    spec = config.environments.get(family)
    if spec and "pip" in spec:
        return None
    return _version_in(os.path.abspath(spec["python"]) if spec else None, distribution)


def stale_fits(store: Store) -> tuple[int, Counter]:
    """(number of fits in the cache, why fits are stale: which module changed, counted)."""
    from .analysis.fit_cache import CUMULANTS_MODULE, fit_code, recorded_fit_code
    from .codehash import display_name

    recorded = recorded_fit_code(store)
    reasons: Counter = Counter()
    for code in recorded:
        level = "structure" if display_name(CUMULANTS_MODULE) in code else "atom"
        for reason in changed_code(code, fit_code(level)):
            reasons[reason] += 1
    return len(recorded), reasons


def structure_failures(config: Config, store: Store, top: int = 3) -> dict[tuple[str, str], tuple[int, list]]:
    """(dataset, model or 'input') -> (number of structures, the ``top`` commonest reasons)."""
    out = {}
    for d in config.datasets:
        for model in [INPUT] + [m.id for m in config.models]:
            table = store.read_table(store.failures_dir(d.name, model))
            if table is None or table.num_rows == 0:
                continue
            reasons = Counter(table.column("reason").to_pylist()).most_common(top)
            out[(d.name, model)] = (table.num_rows, reasons)
    return out


def format_status(config: Config, store: Store, units: list[Unit]) -> str:
    counts: dict[tuple[str, str], Counter] = {}
    for u in units:
        counts.setdefault((u.dataset, u.model), Counter())[u.state] += 1
    failures = structure_failures(config, store)
    rows = [("dataset", "model", *STATES, "structures failed")]
    for (dataset, model), c in counts.items():
        rows.append((dataset, model, *(str(c[s]) for s in STATES),
                     str(failures.get((dataset, model), (0, []))[0])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"latentray status {store.uri} ({config.source})", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for state in ("failed", "stale", "pending"):
        listed = [u for u in units if u.state == state]
        if listed:
            lines += ["", f"{state} ({len(listed)}):"]
            lines += [f"  {u.dataset} shard {u.shard} x {u.model}: {u.detail}" for u in listed[:20]]
            if len(listed) > 20:
                lines.append(f"  ... and {len(listed) - 20} more")
    if failures:
        lines += ["", "structures that could not be used (failures/):"]
        for (dataset, model), (n, reasons) in failures.items():
            lines.append(f"  {dataset} x {model}: {n}")
            lines += [f"    {k} x {reason[:160]}" for reason, k in reasons]
    n_fits, reasons = stale_fits(store)
    if n_fits:
        lines += ["", f"fits in results/fits.parquet: {n_fits}" + (
            "; stale, since the code that computes them changed:" if reasons else
            ", computed by the current code (fits of stale units are redone with them)")]
        lines += [f"  {k} fit(s): {reason}" for reason, k in reasons.most_common()]
    if not units:
        lines += ["", "no prepared structures yet: nothing has run"]
    return "\n".join(lines)


def status(output: str, config: Config | None = None, as_json: bool = False) -> tuple[str, bool]:
    """The printed status, and whether every unit is done."""
    store = Store(output)
    config = config or recorded_config(store)
    units = unit_states(config, store)
    complete = bool(units) and all(u.state == "done" for u in units)
    if as_json:
        n_fits, reasons = stale_fits(store)
        return json.dumps({"units": [u.__dict__ for u in units],
                           "fits": {"cached": n_fits, "stale": dict(reasons)}},
                          indent=1), complete
    return format_status(config, store, units), complete
