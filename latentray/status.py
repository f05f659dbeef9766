"""``latentray status OUTPUT``: the state of every extraction unit of a job, without running it.

A unit is one (dataset shard, model). Against the config (the one the last run recorded in
``OUTPUT/run.json``, or one given with ``--config``, e.g. with a model added) each unit is

* ``done``: its manifest entry matches the current inputs and its files exist;
* ``pending``: never run, or its files are missing;
* ``failed``: its last run raised (the manifest keeps the reason); a re-run tries it again;
* ``stale``: an input changed since it ran (the shard's structures, the checkpoint file's
  SHA-256, the model's family, checkpoint name, modality, options, dtype or layers).

What the actors report (the family package's version, the adapter's code) is checked by
``latentray run`` only: it needs the model's environment. Structures that a model could not
process are counted from ``failures/`` with their most common reasons.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass


from .config import Config, ConfigError, parse_config
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
    run = store.read_json(store.path("run.json"))
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
    checkpoint_hashes = {m.id: file_sha256(m.checkpoint) if os.path.isfile(m.checkpoint)
                         else None for m in config.models}
    units = []
    for d in config.datasets:
        for shard, shard_hash in sorted(_shards(store, d.name).items()):
            for m in config.models:
                entry = store.read_json(store.manifest_path(d.name, m.id, shard))
                units.append(Unit(d.name, shard, m.id, *_state(
                    entry, m, shard_hash, checkpoint_hashes[m.id], store)))
    return units


def _state(entry: dict | None, model, shard_hash: str, checkpoint_hash: str | None,
           store: Store) -> tuple[str, str]:
    if entry is None:
        return "pending", "never run"
    inputs = entry.get("inputs", {})
    current = {"shard_sha256": shard_hash, "family": model.family,
               "checkpoint": model.checkpoint, "modality": model.modality,
               "options": model.options or None, "dtype": model.dtype}
    if checkpoint_hash is not None:
        current["checkpoint_sha256"] = checkpoint_hash
    changed = [key for key, value in current.items() if inputs.get(key) != value]
    requested = entry.get("requested_layers")
    if requested is not None and list(requested) != list(model.layers):
        changed.append("layers")
    if changed:
        return "stale", "changed since it ran: " + ", ".join(changed)
    if "error" in entry:
        return "failed", entry["error"]
    missing = [p for p in entry["outputs"]["files"].values() if not store.exists(p)]
    if missing:
        return "pending", f"{len(missing)} output file(s) missing, e.g. {missing[0]}"
    return "done", ""


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
        return json.dumps([u.__dict__ for u in units], indent=1), complete
    return format_status(config, store, units), complete
