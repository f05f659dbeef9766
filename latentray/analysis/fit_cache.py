"""The fit cache, ``results/fits.parquet``: every fit's numbers under the key of its inputs.

A fit's key is the SHA-256 of everything its numbers depend on: the result row that
describes it (dataset, models, layers, level, features, orders, seed, path), the digests of
both models' unit inputs (:meth:`UnitInputs.digest`, per shard), the metrics, ``n_test``,
whether the split is stratified, and the code that computes it: the fit module and the
latentray modules it imports, and for structure-level fits the cumulant stage's too
(:func:`fit_code`). A re-run reuses a fit whose key is in the cache; each row also keeps
the code digests it was computed with, so that ``latentray status`` can say which module
made a fit stale.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from ..codehash import code_digests
from ..store import Store

FITS_MODULE = "latentray.analysis.fits"
CUMULANTS_MODULE = "latentray.analysis.cumulant_stage"
DERIVED = ("n_structures",)  # row fields that do not change a fit


def digest(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=None)
def _code(*modules: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(code_digests(*modules).items()))


def fit_code(level: str) -> dict[str, str]:
    """The code a fit of ``level`` depends on (module as a path -> SHA-256)."""
    modules = (FITS_MODULE,) if level == "atom" else (FITS_MODULE, CUMULANTS_MODULE)
    return dict(_code(*modules))


def cumulant_code() -> dict[str, str]:
    """The code the cumulant files depend on."""
    return dict(_code(CUMULANTS_MODULE))


def fit_key(row: dict, source_inputs: str, target_inputs: str, metrics, n_test: int,
            stratified: bool) -> str:
    return digest({"row": {k: v for k, v in row.items() if k not in DERIVED},
                   "source": source_inputs, "target": target_inputs,
                   "metrics": sorted(metrics), "n_test": n_test,
                   "code": fit_code(row["level"]), "stratified": stratified})


def read_fits(store: Store) -> dict[str, dict]:
    """Key -> ``{"values", "groups", "n_train", "n_test", ...}`` of earlier runs' fits."""
    table = _table(store)
    if table is None:
        return {}
    return {k: json.loads(v) for k, v in zip(table["key"].to_pylist(),
                                              table["values"].to_pylist())}


def recorded_fit_code(store: Store) -> list[dict[str, str]]:
    """The code digests each cached fit was computed with (for ``latentray status``)."""
    table = _table(store)
    if table is None or "code" not in table.column_names:
        return []
    return [json.loads(c) for c in table["code"].to_pylist()]


def write_fits(store: Store, keys: list[str], fits: dict[str, dict],
               codes: list[dict[str, str]]) -> None:
    store.write_table(store.path("results", "fits.parquet"), pa.table({
        "key": keys, "values": [json.dumps(fits[k], sort_keys=True) for k in keys],
        "code": [json.dumps(c, sort_keys=True) for c in codes]}))


def _table(store: Store):
    path = store.path("results", "fits.parquet")
    return pq.read_table(path, filesystem=store.fs) if store.exists(path) else None
