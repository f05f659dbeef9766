"""The results tables' contract, shared by the analysis (which writes them) and the report
and the reader (which read them): the columns of ``results/reconstruction`` and
``results/by_group``, and small helpers over their rows."""

from __future__ import annotations

import pandas as pd


RESULT_COLUMNS = ["metric", "level", "features", "dataset", "source", "target", "layers",
                  "source_layer", "target_layer", "source_order", "target_order", "value",
                  "n_train", "n_test", "seed", "n_structures", "n_left_out", "path"]


GROUP_COLUMNS = ["metric", "level", "features", "dataset", "source", "target", "layers",
                 "source_order", "target_order", "seed", "path", "group_kind", "group",
                 "n_test", "value"]


ORDER_COLUMNS = ("source_order", "target_order")


def pair_values(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``{(source, target): value}`` of result rows (one metric, level, layer and seed)."""
    return {(s, t): v for s, t, v in zip(rows.source, rows.target, rows.value)}


def measured_both_ways(values: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    """The unordered pairs ``(A, B)``, A < B, of ``values`` that hold A -> B and B -> A."""
    return sorted({tuple(sorted(k)) for k in values if k[::-1] in values})


LAYER_ANALYSIS = "ll-vs-bb"  # the ``layers`` value of the within-model layer rows
