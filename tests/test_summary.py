"""The report's summary is written from the numbers it is given, and only from them."""

import re

import pandas as pd
import pytest

from latentray.report.summary import findings

FAMILIES = {"a1": "fa", "a2": "fa", "a3": "fa", "b1": "fb"}


def table(values: dict, **extra) -> pd.DataFrame:
    rows = [{"dataset": "d", "metric": "gfre", "level": "atom", "features": "atoms", "layers": "bb",
             "source": s, "target": t, "value": v, "seed": 0, "n_test": 1000,
             "source_order": None, "target_order": None, "source_layer": "bb2",
             "target_layer": "bb2", **extra} for (s, t), v in values.items()]
    return pd.DataFrame(rows)


VALUES = {("a1", "a2"): 0.10, ("a2", "a1"): 0.12,   # the closest pair
          ("a1", "a3"): 0.30, ("a3", "a1"): 0.32,   # a3 fine-tuned from a1 ... farther than a2
          ("a2", "a3"): 0.35, ("a3", "a2"): 0.36,
          ("a1", "b1"): 0.50, ("b1", "a1"): 0.90,   # the farthest, and the most asymmetric
          ("a2", "b1"): 0.55, ("b1", "a2"): 0.60,
          ("a3", "b1"): 0.58, ("b1", "a3"): 0.62}


def test_pairs_families_asymmetry_and_fine_tuning():
    lines = findings(table(VALUES), None, FAMILIES, {"a3": "a1"}, seed=0)
    assert lines[0] == ("Atom level, layer bb, 1000 test atoms: the closest pair is a1 and a2 "
                        "(GFRE 0.100 and 0.120 in the two directions), the farthest a1 and b1 "
                        "(0.500 and 0.900).")
    assert lines[1] == ("GFRE within a family spans 0.100-0.360, across families 0.500-0.900: "
                        "every pair within a family is closer than every pair across families.")
    assert lines[2].startswith("The most asymmetric pair: GFRE(a1 -> b1) = 0.500 against 0.900")
    assert lines[3] == ("Fine-tuning: a3 (fine-tuned from a1) and a1 are at GFRE 0.320 and "
                        "0.300, not closer than the independently trained a2 (0.120 and 0.100).")


def test_a_finding_needs_its_numbers():
    values = {k: v for k, v in VALUES.items() if "b1" not in k}
    lines = findings(table(values), None, FAMILIES, {}, seed=0)
    assert not any("across families" in line or "Fine-tuning" in line for line in lines)
    assert findings(table(values).iloc[0:0], None, FAMILIES, {}, seed=0) == []
    # other seeds and other metrics are not what the summary reads
    assert findings(table(values, seed=3), None, FAMILIES, {}, seed=0) == []


def test_layers_orders_and_spread():
    layers = pd.DataFrame([
        {"dataset": "d", "metric": "gfre", "level": "atom", "features": "atoms",
         "layers": "ll-vs-bb",
         "source": m, "target": m, "source_layer": s, "target_layer": t, "value": v, "seed": 0,
         "n_test": 1000, "source_order": None, "target_order": None}
        for m, s, t, v in [("a1", "bb1", "ll", 0.6), ("a1", "bb2", "ll", 0.05),
                           ("a1", "ll", "bb2", 0.4), ("a1", "ll", "bb1", 0.7),
                           ("b1", "bb3", "ll", 0.08), ("b1", "ll", "bb3", 0.5)]])
    orders = pd.DataFrame([
        {"dataset": "d", "metric": "gfre", "level": "structure", "features": "cumulants",
         "layers": "bb",
         "source": "a1", "target": "a1", "source_order": n, "target_order": m, "value": v,
         "seed": 0, "n_test": 250, "source_layer": "bb2", "target_layer": "bb2"}
        for n, m, v in [(1, 2, 0.7), (2, 3, 0.5), (1, 8, 0.97)]])
    lines = findings(pd.concat([layers, orders]), None, FAMILIES, {}, seed=0)
    assert ("Last layer against backbone, within each model: GFRE(last bb -> ll) 0.050-0.080, "
            "GFRE(ll -> last bb) 0.400-0.500, GFRE(bb1 -> ll) 0.600.") in lines
    assert ("Cumulant orders, within each model: GFRE([k1] -> [k1, k2]) 0.700; every step "
            "n -> n+1 0.500-0.700; [k1] -> [k1..k8] 0.970.") in lines
    seeds = pd.concat([table(VALUES), table({k: v + 0.01 for k, v in VALUES.items()}, seed=1)])
    assert findings(seeds, None, FAMILIES, {}, seed=0)[-1] == (
        "Over 2 split seeds the typical standard deviation of a number is 0.007: smaller "
        "differences are not findings.")


def test_means_do_not_mix_layers_or_datasets():
    """A second compared layer (or dataset) changes no sentence about the first."""
    structure = table({k: v + 0.2 for k, v in VALUES.items()}, level="structure",
                      features="cumulants", source_order=2, target_order=2, n_test=250)
    one = findings(pd.concat([table(VALUES), structure]), None, FAMILIES, {}, seed=0)
    other = pd.concat([table({k: 0.9 for k in VALUES}, layers="ll"),
                       table({k: 0.9 for k in VALUES}, dataset="e")])
    two = findings(pd.concat([table(VALUES), structure, other]), None, FAMILIES, {}, seed=0)
    assert one == two
    assert any(line.startswith("Structure level (cumulants to order 2, layer bb), mean GFRE "
                               "over the pairs 0.642, against 0.442 at atom level")
               for line in one)


def test_models_on_other_training_data_are_placed_against_each_set():
    """A model trained on other data than most is placed against each set of models trained
    on the same data: the mean over the set of its two directions' mean, computed here from
    the table with pandas; the nearest set by that mean."""
    trained_on = {"a1": "MPtrj", "a2": "MPtrj ", "a3": "r2SCAN", "b1": "MatPES"}
    lines = findings(table(VALUES), None, FAMILIES, {}, seed=0, trained_on=trained_on)
    df = table(VALUES)

    def mean_to(m, others):
        both = df[((df.source == m) & df.target.isin(others))
                  | (df.source.isin(others) & (df.target == m))]
        return both.value.mean()  # each other model twice, once per direction

    placed = [line for line in lines if line.startswith("Training data")]
    head = "Training data (atom level, layer bb): "
    expected = [
        (f"{head}a3 (trained on r2SCAN) is at mean GFRE {{}} from the models trained on MPtrj "
         "(a1, a2), {} from the models trained on MatPES (b1) (both directions): nearest to "
         "those trained on MPtrj.", [mean_to("a3", ["a1", "a2"]), mean_to("a3", ["b1"])]),
        (f"{head}b1 (trained on MatPES) is at mean GFRE {{}} from the models trained on MPtrj "
         "(a1, a2), {} from the models trained on r2SCAN (a3) (both directions): nearest to "
         "those trained on r2SCAN.", [mean_to("b1", ["a1", "a2"]), mean_to("b1", ["a3"])])]
    assert len(placed) == len(expected)
    for line, (template, means) in zip(placed, expected):
        printed = [float(x) for x in re.findall(r"GFRE (\d\.\d{3})|, (\d\.\d{3}) from", line)
                   for x in x if x]
        assert printed == pytest.approx(means, abs=5e-4 + 1e-12)
        assert line == template.format(*(f"{x:.3f}" for x in printed))
    # one training set, or none named: no such sentence; two sets of the same size: every
    # model is placed
    for same in ({m: "MPtrj" for m in FAMILIES}, {}):
        assert not [line for line in findings(table(VALUES), None, FAMILIES, {}, seed=0,
                                              trained_on=same) if "Training data" in line]
    tie = {"a1": "MPtrj", "a2": "MPtrj", "a3": "MatPES", "b1": "MatPES"}
    assert [line.split(": ")[1].split(" ")[0] for line in findings(
        table(VALUES), None, FAMILIES, {}, seed=0, trained_on=tie)
        if line.startswith("Training data")] == ["a1", "a2", "a3", "b1"]


def test_a_heatmaps_colour_scale_stops_below_a_far_outlier():
    """The demo's atom-level LFRE: 71 pairs between 0.117 and 0.436 and DIEP -> SevenNet-MF-0
    r2SCAN at 5.479 (one P test atom's local fit, pointwise 173). The colour scale ends at
    0.436; without the outlier it ends at the largest value, and a NaN diagonal is ignored."""
    import numpy as np

    from latentray.report.figures import color_limit, heatmap_png

    rng = np.random.default_rng(0)
    values = np.concatenate([[0.117, 0.436], rng.uniform(0.117, 0.436, 69), [5.479]])
    matrix = np.full((9, 9), np.nan)
    matrix[~np.eye(9, dtype=bool)] = values
    assert color_limit(matrix) == 0.436
    matrix[matrix == 5.479] = 0.3
    assert color_limit(matrix) == 0.436
    matrix[matrix == 0.436] = 0.2
    assert color_limit(matrix) == np.nanmax(matrix)
    names = [f"m{i}" for i in range(9)]
    assert heatmap_png(pd.DataFrame(matrix, index=names, columns=names), "t")[:4] == b"\x89PNG"
