"""End to end on real data: latentray run with CHGNet and SevenNet through a local Ray
cluster, checked against independent references (skmatter, sklearn's split, scipy)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from ase.io import read, write
from scipy import stats
from sklearn.model_selection import train_test_split

from helpers import assert_one_gfre_equals_skmatter
from latentray.cli import main
from latentray.config import parse_config
from latentray.datasets import resolve_paths

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"

# MAD structures 280..399: four of them hold Po or Rn, which SevenNet-0 does not know
FIRST, LAST = 280, 400
UNKNOWN_TO_SEVENNET = {291: "Po", 318: "Po", 370: "Po", 394: "Rn"}
COMMON = [i for i in range(LAST - FIRST) if i + FIRST not in UNKNOWN_TO_SEVENNET]
METRICS = ("gfre", "gfrd", "lfre", "cka")
LAYER = {"chgnet-0.3.0": "bb4", "sevennet-0": "bb5"}  # the concrete layers of "bb"
WIDTH = {"chgnet-0.3.0": 64, "sevennet-0": 128}
PAIRS = [("chgnet-0.3.0", "sevennet-0"), ("sevennet-0", "chgnet-0.3.0")]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from latentray.job import run

    root = tmp_path_factory.mktemp("job")
    frames = read(resolve_paths("builtin:mad-val-1000")[0], index=f"{FIRST}:{LAST}")
    for i, atoms in enumerate(frames):
        atoms.info["id"] = f"mad-{FIRST + i}"
    write(root / "mad-slice.xyz", frames, format="extxyz")
    config = parse_config({
        "output": str(root / "out"),
        "datasets": [{"name": "slice", "path": str(root / "mad-slice.xyz"), "format": "extxyz",
                      "subset_key": "subset"}],
        "models": [
            {"id": "chgnet-0.3.0", "family": "chgnet", "checkpoint": "0.3.0",
             "layers": ["bb3", "bb", "ll"]},
            {"id": "sevennet-0", "family": "sevenn", "checkpoint": "7net-0", "layers": ["bb", "ll"]},
        ],
        "extraction": {"shard_size": 50, "batch_atoms": 400},
        "analyses": {"n_test": 300, "layers": ["bb"], "order": 2, "metrics": list(METRICS),
                     "order_metrics": ["gfre"], "layer_metrics": ["gfre"]},
    }, source="test")
    first = run(config, quiet=True)
    csv_first = (root / "out" / "results" / "reconstruction.csv").read_bytes()
    second = run(config, quiet=True)
    (root / "out" / "results" / "fits.parquet").unlink()  # the fits again, from the latents
    third = run(config, quiet=True)
    csv_third = (root / "out" / "results" / "reconstruction.csv").read_bytes()
    report_third = (root / "out" / "report.html").read_text()
    groups_third = (root / "out" / "results" / "by_group.csv").read_bytes()
    order_figures = sorted(p.name for p in (root / "out" / "figures").glob("*_orders_*.png"))
    # the same job forced onto the streaming path, with every metric and a second split seed
    streaming = run(dataclasses.replace(config, analyses=dataclasses.replace(
        config.analyses, in_memory_limit_mb=0, metrics=METRICS,
        spread_seeds=(1,), baselines=("sum",), order_metrics=())), quiet=True)
    yield {"config": config, "out": root / "out", "first": first, "second": second,
           "third": third, "frames": frames, "csv_first": csv_first, "csv_third": csv_third,
           "in_memory": pd.read_csv(io.BytesIO(csv_third)), "streaming": streaming,
           "report_third": report_third, "order_figures": order_figures,
           "groups_third": pd.read_csv(io.BytesIO(groups_third), keep_default_na=False)}
    ray.shutdown()


def test_the_public_reader_equals_pyarrow_and_duckdb(job):
    """latentray.open(OUTPUT): latents in dataset order, cumulants side by side, the
    results tables and the provenance, each against an independent reading."""
    import latentray

    out, run = job["out"], latentray.open(str(job["out"]))
    table = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table(
        filter=(ds.field("model") == "sevennet-0") & (ds.field("layer") == "ll")).to_pandas()
    table = table.sort_values(["structure_index", "atom_index"])
    rows = run.latents("slice", "sevennet-0", "ll")
    np.testing.assert_array_equal(rows.X, np.stack(table.features.to_numpy()))
    np.testing.assert_array_equal(rows.structure_index, table.structure_index)
    np.testing.assert_array_equal(rows.atom_index, table.atom_index)
    np.testing.assert_array_equal(rows.Z, table.Z)
    assert list(rows.structure_id) == list(table.structure_id)
    assert not set(rows.structure_index) & {i - FIRST for i in UNKNOWN_TO_SEVENNET}
    k = run.cumulants("slice", "chgnet-0.3.0", "bb4", order=2)
    k1, k2 = (duckdb.sql(
        f"select structure_index, features from read_parquet('{out}/cumulants/dataset=slice/"
        f"model=chgnet-0.3.0/layer=bb4/order={n}/*.parquet') order by structure_index").df()
        for n in (1, 2))
    np.testing.assert_array_equal(k.structure_index, k1.structure_index)
    np.testing.assert_array_equal(k.X, np.hstack([np.stack(k1.features), np.stack(k2.features)]))
    assert k.X.shape[1] == 2 * k.width == 2 * 64
    pd.testing.assert_frame_equal(
        run.results().drop(columns=["source_order", "target_order"]),
        pd.read_csv(out / "results" / "reconstruction.csv").drop(
            columns=["source_order", "target_order"]), check_dtype=False, rtol=1e-9)
    assert run.provenance == json.loads((out / "run.json").read_text())["provenance"]


def test_latents_tree_opens_in_one_call_with_pyarrow_and_duckdb(job):
    out = job["out"]
    table = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table()
    counts = table.group_by(["model", "layer"]).aggregate([("structure_id", "count")])
    counts = {(m, l): n for m, l, n in zip(*(counts[c].to_pylist() for c in
                                           ["model", "layer", "structure_id_count"]))}
    n_all = sum(len(a) for a in job["frames"])
    n_unknown = sum(len(job["frames"][i - FIRST]) for i in UNKNOWN_TO_SEVENNET)
    assert counts == {("chgnet-0.3.0", "bb3"): n_all, ("chgnet-0.3.0", "bb4"): n_all,
                      ("chgnet-0.3.0", "ll"): n_all, ("sevennet-0", "bb5"): n_all - n_unknown,
                      ("sevennet-0", "ll"): n_all - n_unknown}
    widths = duckdb.sql(
        f"select model, layer, min(len(features)), max(len(features)) from read_parquet("
        f"'{out}/latents/**/*.parquet', hive_partitioning=true) group by all order by all"
    ).fetchall()
    assert widths == [("chgnet-0.3.0", "bb3", 64, 64), ("chgnet-0.3.0", "bb4", 64, 64),
                      ("chgnet-0.3.0", "ll", 64, 64), ("sevennet-0", "bb5", 128, 128),
                      ("sevennet-0", "ll", 64, 64)]


def test_every_structure_is_processed_or_a_failure_with_its_reason(job):
    out = job["out"]
    failures = ds.dataset(out / "failures", format="parquet", partitioning="hive").to_table()
    failures = failures.to_pandas().sort_values("structure_index")
    assert failures["model"].tolist() == ["sevennet-0"] * 4
    assert failures["structure_index"].tolist() == [i - FIRST for i in UNKNOWN_TO_SEVENNET]
    assert failures["structure_id"].tolist() == [f"slice:mad-{i}" for i in UNKNOWN_TO_SEVENNET]
    for reason, element in zip(failures["reason"], UNKNOWN_TO_SEVENNET.values()):
        assert element in reason
    latents = ds.dataset(out / "latents", format="parquet", partitioning="hive")
    n = LAST - FIRST
    for model in ["chgnet-0.3.0", "sevennet-0"]:
        done = latents.to_table(filter=(ds.field("model") == model) & (ds.field("layer") == "ll"),
                                columns=["structure_id"])
        n_failed = int((failures["model"] == model).sum())
        assert len(set(done["structure_id"].to_pylist())) + n_failed == n


def _skmatter_rows(out, model, layer, common):
    t = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table(
        filter=(ds.field("model") == model) & (ds.field("layer") == layer)).to_pandas()
    t = t[t.structure_index.isin(common)].sort_values(["structure_index", "atom_index"])
    return np.stack(t["features"].to_numpy()).astype(np.float64), t


def _cumulants(out, model):
    """One row per structure (index, id, subset, n_atoms) and [k1 .. k8] side by side, read
    from the order=N partitions with pyarrow."""
    t = ds.dataset(out / "cumulants", format="parquet", partitioning="hive").to_table(
        filter=ds.field("model") == model).to_pandas()
    assert sorted(t["order"].unique()) == list(range(1, 9))
    t = t.sort_values(["structure_index", "order"])
    F = np.stack([np.concatenate(g.to_numpy()) for _, g in t.groupby("structure_index")
                  ["features"]])
    return t[t.order == 1].set_index("structure_index"), F


def test_structure_level_uses_the_papers_cumulants(job):
    from skmatter.metrics import global_reconstruction_error

    out = job["out"]
    cum, full = _cumulants(out, "chgnet-0.3.0")
    assert len(cum) == LAST - FIRST and set(cum.layer) == {"bb4"}
    by_order = duckdb.sql(
        f"select \"order\", count(*), min(len(features)), max(len(features)) from read_parquet("
        f"'{out}/cumulants/**/*.parquet', hive_partitioning=true) where model = 'sevennet-0' "
        f"group by all order by all").fetchall()
    assert by_order == [(n, LAST - FIRST - 4, 128, 128) for n in range(1, 9)]
    _, atoms = _skmatter_rows(out, "chgnet-0.3.0", "bb4", range(LAST - FIRST))
    for s in [0, 11, 57]:  # the paper's recipe, per structure, with scipy's moments
        x = np.stack(atoms[atoms.structure_index == s]["features"].to_numpy()).astype(np.float64)
        mu = {1: x.mean(0), **{k: stats.moment(x, moment=k, axis=0) for k in range(2, 5)}}
        k = [mu[1], mu[2], mu[3], mu[4] - 3 * mu[2] ** 2]
        ref = np.concatenate([k[0]] + [np.sign(k[n]) * np.abs(k[n]) ** (1 / (n + 1))
                                       for n in range(1, 4)])
        got = full[s, :4 * 64]
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # structure-level GFRE at order 2 equals skmatter on those features and the paper's split
    results = job["in_memory"]
    assert set(results.path) == {"in-memory"}
    structure = results[(results.level == "structure") & (results.metric == "gfre")
                        & (results.source == "chgnet-0.3.0")]
    row = structure[(structure.features == "cumulants") & (structure.target == "sevennet-0")]
    assert len(row) == 1
    row = row.iloc[0]
    common = [i for i in range(LAST - FIRST) if i + FIRST not in UNKNOWN_TO_SEVENNET]
    fx = full[common, :128]
    other, other_full = _cumulants(out, "sevennet-0")
    fy = other_full[np.searchsorted(other.index.to_numpy(), common), :256]
    labels = np.array([job["frames"][i].info["subset"] for i in common])
    n_test = len(common) // 2  # fewer than 2000 structures: half of them
    train, test = train_test_split(np.arange(len(common)), test_size=n_test,
                                   random_state=0, stratify=labels)
    assert row.source_order == row.target_order == 2 and row.n_test == n_test
    assert row.value == pytest.approx(
        global_reconstruction_error(fx, fy, test_idx=test, train_idx=train), rel=1e-8)
    # the pooling baselines: mean and sum of the atom features, by pandas
    sums = atoms[atoms.structure_index.isin(common)].groupby("structure_index")["features"].apply(
        lambda f: np.stack(f.to_numpy()).astype(np.float64).sum(0))
    sx = np.stack(sums.loc[common].to_numpy())
    n_atoms = np.array([len(job["frames"][i]) for i in common])
    fy1 = fy[:, :128] * n_atoms[:, None]  # sevennet-0's k1 (its mean), times the atom count
    for features, X, Y in [("mean", sx / n_atoms[:, None], fy[:, :128]), ("sum", sx, fy1)]:
        baseline = structure[(structure.features == features) & (structure.target == "sevennet-0")]
        assert baseline.value.iloc[0] == pytest.approx(
            global_reconstruction_error(X, Y, test_idx=test, train_idx=train), rel=1e-6)
    # the order analysis: [k1 .. kn] -> [k1 .. kn+1] within one model, and k1 -> [k1 .. k8]
    labels = np.array([a.info["subset"] for a in job["frames"]])
    train, test = train_test_split(np.arange(len(full)), test_size=len(full) // 2,
                                   random_state=0, stratify=labels)
    orders = structure[structure.target == "chgnet-0.3.0"]
    assert sorted(zip(orders.source_order, orders.target_order)) == \
        [(1, 2), (1, 8), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    for n, m in [(1, 2), (3, 4), (1, 8)]:
        got = orders[(orders.source_order == n) & (orders.target_order == m)].value.iloc[0]
        assert got == pytest.approx(global_reconstruction_error(
            full[:, :64 * n], full[:, :64 * m], test_idx=test, train_idx=train), rel=1e-8)


# --------------------------------------------------------------------------------------------
# every number of the job against scikit-matter (and numpy for CKA) on the job's own rows


def _pair_rows(job, level, source, target):
    """``X``, ``Y`` (float64) of the rows the pair compares at ``level``, read back with
    pyarrow, and per row its ids and its labels as ASE reads the structure (element, subset)."""
    out, frames = job["out"], job["frames"]
    if level == "atom":
        (X, tx), (Y, ty) = (_skmatter_rows(out, m, LAYER[m], COMMON) for m in (source, target))
        assert (tx.Z.to_numpy() == ty.Z.to_numpy()).all()
        s, k = tx.structure_index.to_numpy(), tx.atom_index.to_numpy()
        rows = pd.DataFrame({"structure_id": tx.structure_id.to_numpy(), "atom_index": k,
                             "element": [frames[i].get_chemical_symbols()[j]
                                         for i, j in zip(s, k)]})
    else:  # the structure features of order 2: [k1 k2] of each side
        def order_two(model):
            t, F = _cumulants(out, model)
            return t.loc[COMMON], F[np.searchsorted(t.index, COMMON), :2 * WIDTH[model]]

        (tx, X), (_, Y) = order_two(source), order_two(target)
        s = np.asarray(COMMON)
        rows = pd.DataFrame({"structure_id": tx.structure_id.to_numpy(),
                             "atom_index": np.full(len(s), -1)})
    rows["subset"] = [frames[i].info["subset"] for i in s]
    return X.astype(np.float64), Y.astype(np.float64), rows


def _paper_split(rows, level, seed=0):
    """The in-memory path's split, drawn here with sklearn: (train, test, folds=None)."""
    n_test = 300 if level == "atom" else len(rows) // 2  # < 2000 structures: half
    train, test = train_test_split(np.arange(len(rows)), test_size=n_test, random_state=seed,
                                   stratify=rows.subset.to_numpy())
    return train, test, None


def _hash_split(rows, level, seed):
    """The streaming path's split of these rows (test rows, and the two training folds) as
    latentray's HashSplit assigns them from the ids: (train, test, (fold 1, fold 2) as
    positions in ``train``)."""
    from latentray.method.streaming import FOLD1, FOLD2, TEST, Block, HashSplit

    split = HashSplit(300, seed=seed, stratified=True, at_most_half=level == "structure")
    ids = {"structure_id": rows.structure_id.to_numpy(), "atom_index": rows.atom_index.to_numpy(),
           "stratum": rows.subset.to_numpy(dtype=object)}
    split.resolve(split.summarise(ids))
    labels = split.labels(Block(X=None, Y=None, row=np.arange(len(rows)), ids=ids))
    fold1, fold2, test = (np.flatnonzero(labels == v) for v in (FOLD1, FOLD2, TEST))
    folds = (np.arange(len(fold1)), len(fold1) + np.arange(len(fold2)))
    return np.concatenate([fold1, fold2]), test, folds


def _gram_cka(X, Y):
    """Linear CKA from the centred Gram matrices (Kornblith et al. 2019, eq. 1 with HSIC):
    ``tr(K L) / sqrt(tr(K K) tr(L L))``, K and L of the centred rows."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    K, L = X @ X.T, Y @ Y.T
    return float(np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L)))


def _skmatter(X, Y, train, test, folds):
    """Every measure by scikit-matter's pointwise functions on these rows (its default
    estimator; with ``folds``, the same Ridge2FoldCV on those two training folds) and CKA by
    :func:`_gram_cka` on the training rows: ({metric: value}, {metric: per test row})."""
    from skmatter.linear_model import Ridge2FoldCV
    from skmatter.metrics import (
        pointwise_global_reconstruction_distortion,
        pointwise_global_reconstruction_error,
        pointwise_local_reconstruction_error,
    )

    def estimator():
        return None if folds is None else Ridge2FoldCV(
            alphas=np.geomspace(1e-9, 0.9, 20), alpha_type="relative",
            regularization_method="cutoff", cv=[folds],
            scoring="neg_root_mean_squared_error", n_jobs=1)

    pointwise = {
        "gfre": pointwise_global_reconstruction_error(X, Y, train_idx=train, test_idx=test,
                                                      estimator=estimator()),
        # skmatter's GFRD needs dy >= dx: Y padded with zero columns (the same distortion)
        "gfrd": pointwise_global_reconstruction_distortion(
            X, np.pad(Y, ((0, 0), (0, max(0, X.shape[1] - Y.shape[1])))), train_idx=train,
            test_idx=test, estimator=estimator()),
        "lfre": pointwise_local_reconstruction_error(
            X, Y, min(X.shape[1], Y.shape[1], len(train)), train_idx=train, test_idx=test),
    }
    values = {m: float(np.linalg.norm(e) / np.sqrt(len(e))) for m, e in pointwise.items()}
    values["cka"] = _gram_cka(X[train], Y[train])
    return values, pointwise


def _results_of(results, level, source, seed):
    features = "atoms" if level == "atom" else "cumulants"
    rows = results[(results.layers == "bb") & (results.level == level)
                   & (results.features == features) & (results.source == source)
                   & (results.target != source) & (results.seed == seed)]
    assert sorted(rows.metric) == sorted(METRICS)
    return rows.set_index("metric")


CASES = [(level, source, target) for level in ("atom", "structure") for source, target in PAIRS]


@pytest.fixture(scope="module")
def references(job):
    """scikit-matter's numbers for every ordered pair and level, on the in-memory path's split
    (seed 0) and on the streaming path's hash split (seeds 0 and 1)."""
    out = {}
    for level, source, target in CASES:
        X, Y, rows = _pair_rows(job, level, source, target)
        for path, seed, split in [("in-memory", 0, _paper_split), ("streaming", 0, _hash_split),
                                  ("streaming", 1, _hash_split)]:
            train, test, folds = split(rows, level, seed)
            values, pointwise = _skmatter(X, Y, train, test, folds)
            out[path, seed, level, source] = {"values": values, "pointwise": pointwise,
                                              "rows": rows.iloc[test], "n_train": len(train),
                                              "split": (train, test, folds)}
    return out


@pytest.mark.parametrize("level,source,target", CASES)
def test_every_measure_of_every_pair_equals_skmatter_on_the_jobs_rows(job, references, level,
                                                                      source, target):
    """GFRE, GFRD, LFRE and CKA of both ordered pairs of a CHGNet and a SevenNet (which
    cannot process 4 of the structures), atom and structure level: the in-memory run and the
    streamed run (two split seeds) each equal scikit-matter (numpy for CKA) on the rows read
    back from Parquet and on the job's own split, to 1e-8."""
    streamed = pd.read_csv(job["out"] / "results" / "reconstruction.csv")
    for path, seed, results in [("in-memory", 0, job["in_memory"]), ("streaming", 0, streamed),
                                ("streaming", 1, streamed)]:
        ref = references[path, seed, level, source]
        got = _results_of(results, level, source, seed)
        assert set(got.target) == {target} and set(got.path) == {path}
        assert (got.n_test == len(ref["rows"])).all() and (got.n_train == ref["n_train"]).all()
        assert (got.n_left_out == 4).all() and (got.n_structures == len(COMMON)).all()
        for metric in METRICS:
            assert got.value[metric] == pytest.approx(ref["values"][metric], rel=1e-8,
                                                      abs=1e-12), (path, seed, metric)


@pytest.mark.parametrize("level,source,target", CASES)
def test_both_paths_agree_on_the_same_split(job, references, level, source, target):
    """The streaming engine over the job's Parquet shards (PairSource), given the in-memory
    path's split with skmatter's folds, gives the in-memory run's numbers."""
    from latentray.analysis.blocks import PairSource
    from latentray.method.streaming import IndexSplit, reconstruction_at_scale

    train, test, _ = references["in-memory", 0, level, source]["split"]
    atoms = level == "atom"
    source_ = PairSource(str(job["out"]), "slice", (source, LAYER[source]),
                         (target, LAYER[target]), shards=[0, 1, 2],
                         kind="latents" if atoms else "cumulants",
                         orders=(1, 1) if atoms else (2, 2))
    n_rows = len(train) + len(test)
    streamed = reconstruction_at_scale(source_, IndexSplit(n_rows, train, test), METRICS)
    memory = _results_of(job["in_memory"], level, source, 0)
    for metric in METRICS:
        assert streamed.values[metric] == pytest.approx(memory.value[metric], rel=1e-9)


def test_in_memory_cka_equals_the_gram_matrix_definition(job):
    """``fits.in_memory_cka`` (from the R factor of ``[X | Y]``) equals CKA from Gram
    matrices on the job's atom features, and is invariant as CKA must be: to an orthogonal
    map, an isotropic scale and a shift of either side; CKA(X, X) = 1; symmetric."""
    from scipy.stats import ortho_group

    from latentray.analysis.fits import in_memory_cka

    X, Y, _ = _pair_rows(job, "atom", *PAIRS[0])
    assert in_memory_cka(X, Y) == pytest.approx(_gram_cka(X, Y), rel=1e-10)
    Q = ortho_group.rvs(X.shape[1], random_state=0)
    assert in_memory_cka(3.5 * X @ Q + 7.0, Y) == pytest.approx(in_memory_cka(X, Y), rel=1e-10)
    assert in_memory_cka(Y, X) == pytest.approx(in_memory_cka(X, Y), rel=1e-12)
    assert in_memory_cka(X, X) == pytest.approx(1.0, rel=1e-12)
    assert 0.0 < in_memory_cka(X, Y) < 1.0


def _group_reference(ref, kind):
    """RMS of scikit-matter's pointwise errors over the test rows of each group (ASE's
    element symbols, the structures' subsets): {metric: Series by group}, and the counts."""
    labels = ref["rows"][kind].to_numpy()
    return ({m: (pd.Series(e ** 2).groupby(labels).mean() ** 0.5)
             for m, e in ref["pointwise"].items()}, pd.Series(labels).value_counts())


@pytest.mark.parametrize("level,source,target", CASES)
def test_per_element_and_per_subset_errors_equal_skmatters_pointwise_errors(
        job, references, level, source, target):
    """``results/by_group.csv`` of both paths: per element (atom level) and per subset, GFRE
    and LFRE (and GFRD) as the RMS of scikit-matter's pointwise errors of the group's test
    rows, the groups taken from ASE's reading of the structures; the groups' sizes add up to
    the test set and their mean squares, weighted, give the total back."""
    streamed = pd.read_csv(job["out"] / "results" / "by_group.csv", keep_default_na=False)
    totals = pd.read_csv(job["out"] / "results" / "reconstruction.csv")
    kinds = ["element", "subset"] if level == "atom" else ["subset"]
    features = "atoms" if level == "atom" else "cumulants"
    for path, seed, groups, results in [("in-memory", 0, job["groups_third"], job["in_memory"]),
                                        ("streaming", 1, streamed, totals)]:
        ref = references[path, seed, level, source]
        mine = groups[(groups.level == level) & (groups.features == features)
                      & (groups.source == source) & (groups.target != source)
                      & (groups.seed == seed) & (groups.layers == "bb")]
        assert set(mine.path) == {path} and set(mine.metric) == {"gfre", "gfrd", "lfre"}
        total = _results_of(results, level, source, seed).value
        for kind in kinds:
            expected, counts = _group_reference(ref, kind)
            for metric in ("gfre", "gfrd", "lfre"):
                sub = mine[(mine.group_kind == kind) & (mine.metric == metric)].set_index("group")
                assert sorted(sub.index) == sorted(expected[metric].index)
                np.testing.assert_allclose(sub.loc[expected[metric].index, "value"],
                                           expected[metric].values, rtol=1e-8)
                assert (sub.n_test == counts.loc[sub.index]).all()
                n = sub.n_test.sum()
                assert n == len(ref["rows"])
                assert np.sqrt((sub.n_test * sub.value ** 2).sum() / n) == pytest.approx(
                    total[metric], rel=1e-9)


def _printed(value, decimals):
    """A number as the report prints it (``%.{decimals}f``), read back as a float."""
    return float(f"{value:.{decimals}f}")


def _cells(column) -> list:
    """A parsed table column as floats (None where the cell is empty)."""
    return [None if pd.isna(v) else float(v) for v in column]


def test_the_reports_tables_equal_the_results_at_their_printed_precision(job):
    """The in-memory run's report, parsed with pandas.read_html, against the CSVs it came
    from: "All numbers" row for row at the 4 decimals it prints; every per-group table (each
    subset, the worst elements, per pair) at its 3, found by its heading."""
    import re

    page = job["report_third"]
    results = job["in_memory"]
    (everything,) = [t for t in pd.read_html(io.StringIO(page))
                     if list(t.columns) == list(results.columns)]
    assert len(everything) == len(results)
    for column in results.columns:
        if results[column].dtype.kind == "f":
            assert _cells(everything[column]) == [
                None if pd.isna(v) else _printed(v, 4) for v in results[column]], column
        else:
            assert everything[column].astype(str).tolist() == \
                results[column].astype(str).tolist(), column
    names = {"GFRE": "gfre", "GFRD": "gfrd", "LFRE": "lfre", "linear CKA": "cka"}
    groups = job["groups_third"]
    groups = groups[(groups.seed == 0) & (groups.source != groups.target)
                    & groups.features.isin(["atoms", "cumulants"])]
    sections = re.findall(r"<h3>(\S+) by (\w+), (\w+) level, layer (\S+), (\S+)</h3>"
                          r"(<table.*?</table>)", page, flags=re.S)
    assert len(sections) == 3 * (2 + 1)  # gfre, gfrd, lfre x (atom: element, subset; structure)
    checked = 0
    for metric, kind, level, layers, dataset, table_html in sections:
        (table,) = pd.read_html(io.StringIO(table_html))
        sub = groups[(groups.metric == names[metric]) & (groups.group_kind == kind)
                     & (groups.level == level) & (groups.layers == layers)
                     & (groups.dataset == dataset)]
        assert len(table) == min(sub.group.nunique(), 10 if kind == "element" else 10**6)
        for _, row in table.iterrows():
            mine = sub[sub.group == str(row["group"])]
            assert int(row["n"]) == int(mine.n_test.iloc[0])
            for r in mine.itertuples():
                assert float(row[f"{r.source} → {r.target}"]) == _printed(r.value, 3)
                checked += 1
    assert checked > 100


def test_rerun_does_no_extraction_and_gives_identical_results(job):
    first, second = job["first"]["extraction"], job["second"]["extraction"]
    assert first["ran"] == 2 * 3 and first["skipped"] == 0  # 120 structures, shards of 50
    assert second["ran"] == 0 and second["skipped"] == 6
    # 2 ordered pairs x (atoms, cumulants, mean, sum) + 2 models x 8 order steps
    # + the layer analysis (bb3, bb4 <-> ll in CHGNet, bb5 <-> ll in SevenNet)
    assert job["first"]["analysis"]["fits_run"] == 2 * 4 + 2 * 8 + 6
    assert job["second"]["analysis"]["fits_run"] == 0  # nothing changed: no fit again
    # ... and no model's features read: the cached fits' rows need the ids alone
    assert job["second"]["analysis"]["in_memory_sides_read"] == 0
    # first run, once per analysis that fits them: the pair analysis reads chgnet bb4 and
    # sevennet bb5 at both levels (4), the layer analysis each model's backbone layers and
    # ll at atom level (chgnet bb3, bb4, ll; sevennet bb5, ll: 5)
    assert job["first"]["analysis"]["in_memory_sides_read"] == 4 + 5
    assert job["third"]["analysis"]["fits_run"] == 2 * 4 + 2 * 8 + 6
    csv = job["csv_third"]
    # header, 4 metrics between (atoms, cumulants, mean, sum), gfre within (orders, layers)
    assert csv.count(b"\n") == 1 + 4 * 2 * 4 + 2 * 8 + 6
    assert csv == job["csv_first"]  # the third run fitted again from the latents: same bytes


def test_report_shows_every_figure_with_provenance(job):
    out = job["out"]
    page = (out / "report.html").read_text()
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    # the last (streaming) run: heatmaps of 4 metrics x (atoms, cumulants, sum); the
    # asymmetry of gfre, gfrd, lfre; the layer analysis; a map per model
    expected = [f"slice_{m}_{kind}" for m in ("cka", "gfrd", "gfre", "lfre")
                for kind in ("atom_bb", "structure_bb_order2", "structure_bb_sum")]
    expected += [f"slice_{m}_asymmetry_bb" for m in ("gfrd", "gfre", "lfre")]
    expected += ["slice_gfre_layers", "slice_maps_bb_chgnet-0.3.0", "slice_maps_bb_sevennet-0"]
    assert figures == sorted(f"{name}.png" for name in expected)
    for name in figures:
        assert f'src="figures/{name}"' in page
    assert "sevennet-0" in page and "7net-0" in page
    description = job["first"]["provenance"]["models"][1]
    assert len(description["checkpoint_sha256"]) == 64
    assert description["checkpoint_sha256"][:16] in page
    assert "Po" in page  # the reason structures were left out
    # the in-memory run's report: the order analysis as a plot, and the pooling baselines
    assert job["order_figures"] == ["slice_gfre_orders_bb.png"]
    assert 'src="figures/slice_gfre_orders_bb.png"' in job["report_third"]
    assert "mean pooling" in job["report_third"] and "sum pooling" in job["report_third"]


def test_report_opens_in_a_browser_with_every_figure(job):
    """Headless Chromium (Debian's package; `make test` installs it where it can) opens the
    report from disk: every figure loads, no script error, nothing fetched from elsewhere. A
    screenshot is kept in test-artifacts/."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):  # `make test` installs it there: its absence is a failure
            pytest.fail("no chromium on the CI machine: `make browser` should have installed it")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    out = job["out"]
    figures = sorted(f"figures/{p.name}" for p in (out / "figures").glob("*.png"))
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
            artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert sorted(src for src, _, _ in images) == figures
    assert all(complete and width > 100 for _, complete, width in images)
    assert all(url.startswith("file://") for url in requests)  # offline: nothing else fetched


def test_cli_refuses_a_bad_config_with_a_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("output: x\ndatasets: [{name: a, path: b, format: cif}]\n"
                    "models: [{id: m, family: chgnet, checkpoint: '0.3.0'}]\n")
    assert main(["run", str(path)]) == 2
    assert "datasets[0].format: 'cif' is not supported" in capsys.readouterr().err


def test_the_last_layer_against_each_backbone_layer(job):
    """The layer analysis (within each model, ll <-> bbK, atom level): in memory equal to
    skmatter on rows read back with the paper's split; streamed equal to skmatter on them with
    the job's hash split."""
    from skmatter.metrics import global_reconstruction_error

    everything = list(range(LAST - FIRST))
    bb3, t3 = _skmatter_rows(job["out"], "chgnet-0.3.0", "bb3", everything)
    ll, tl = _skmatter_rows(job["out"], "chgnet-0.3.0", "ll", everything)
    assert (t3.atom_index.to_numpy() == tl.atom_index.to_numpy()).all()
    labels = t3.structure_index.map(lambda i: job["frames"][i].info["subset"]).to_numpy()
    train, test = train_test_split(np.arange(len(bb3)), test_size=300, random_state=0,
                                   stratify=labels)
    memory = job["in_memory"]
    memory = memory[(memory.layers == "ll-vs-bb") & (memory.source == "chgnet-0.3.0")]
    assert sorted(zip(memory.source_layer, memory.target_layer)) == [
        ("bb3", "ll"), ("bb4", "ll"), ("ll", "bb3"), ("ll", "bb4")]
    value = dict(zip(zip(memory.source_layer, memory.target_layer), memory.value))
    assert value["bb3", "ll"] == pytest.approx(
        global_reconstruction_error(bb3, ll, test_idx=test, train_idx=train), rel=1e-8)
    assert value["ll", "bb3"] == pytest.approx(
        global_reconstruction_error(ll, bb3, test_idx=test, train_idx=train), rel=1e-8)
    assert (memory.n_left_out == 0).all()  # CHGNet processed every structure
    streamed = pd.read_csv(job["out"] / "results" / "reconstruction.csv")
    row = streamed[(streamed.layers == "ll-vs-bb") & (streamed.source_layer == "ll")
                   & (streamed.target_layer == "bb3") & (streamed.seed == 1)]
    rows = pd.DataFrame({"structure_id": tl.structure_id.to_numpy(),
                         "atom_index": tl.atom_index.to_numpy(), "subset": labels})
    train, test, folds = _hash_split(rows, "atom", 1)
    ref, _ = _skmatter(ll, bb3, train, test, folds)
    assert row.value.iloc[0] == pytest.approx(ref["gfre"], rel=1e-8)
    assert row.n_test.iloc[0] == len(test) == 300


def test_maps_of_the_structure_features(job):
    """PCA and PCovR coordinates of the in-memory run's report: the same as sklearn's PCA and
    skmatter's PCovR on cumulants read back with pyarrow, with the energy per atom of the
    extxyz file as ASE reads it (its calculator's energy)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    from skmatter.decomposition import PCovR

    maps = pd.read_parquet(job["out"] / "results" / "maps.parquet")
    assert set(maps.method) == {"pca", "pcovr"} and set(maps.model) == {"chgnet-0.3.0",
                                                                       "sevennet-0"}
    chgnet = maps[(maps.model == "chgnet-0.3.0")].sort_values("structure_index")
    t, F = _cumulants(job["out"], "chgnet-0.3.0")
    X = StandardScaler().fit_transform(F[:, :2 * 64])
    energy = np.array([a.get_potential_energy() / len(a) for a in job["frames"]])
    pca = chgnet[chgnet.method == "pca"]
    np.testing.assert_allclose(pca.energy_per_atom, energy[pca.structure_index], rtol=1e-12)
    np.testing.assert_allclose(pca[["x", "y"]], PCA(n_components=2).fit_transform(X),
                               rtol=1e-6, atol=1e-8)
    y = (energy - energy.mean()) / energy.std()
    expected = PCovR(mixing=0.5, n_components=2).fit(X, y.reshape(-1, 1)).transform(X)
    np.testing.assert_allclose(chgnet[chgnet.method == "pcovr"][["x", "y"]], expected,
                               rtol=1e-6, atol=1e-8)
    assert len(maps[maps.model == "sevennet-0"]) == 2 * (LAST - FIRST - 4)  # its left-out


def test_a_sampled_map_is_sklearns_pca_of_the_sampled_rows(job):
    """A map of a sample (a dataset larger than ``analyses.maps_max_structures``), read shard
    by shard keeping only the sampled structures: sklearn's PCA of those rows of the cumulants
    read back with pyarrow, with their energies per atom as ASE reads them."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from latentray.analysis.maps import model_map, sample

    t, F = _cumulants(job["out"], "chgnet-0.3.0")
    chosen = sample(t.index.to_numpy(), 37, seed=0)
    assert len(chosen) == 37
    got = model_map(str(job["out"]), "slice", "bb", "chgnet-0.3.0", "bb4", 2,
                    -(-(LAST - FIRST) // 50), chosen, ("pca",))
    np.testing.assert_array_equal(got.structure_index, chosen)
    at = np.searchsorted(t.index.to_numpy(), chosen)
    assert list(got.structure_id) == list(t.structure_id.iloc[at])
    energy = np.array([a.get_potential_energy() / len(a) for a in job["frames"]])
    np.testing.assert_allclose(got.energy_per_atom, energy[chosen], rtol=1e-12)
    X = StandardScaler().fit_transform(F[at, :2 * 64])
    np.testing.assert_allclose(got[["x", "y"]], PCA(n_components=2).fit_transform(X),
                               rtol=1e-6, atol=1e-8)


def test_an_mptrj_json_dataset_runs_end_to_end(tmp_path):
    """format: mptrj-json through `latentray run`: frame ids as structure ids, a bad frame
    skipped into failures/ (model=input), a filter's drop counted."""
    docs = json.loads((DATA / "mptrj-sample.json").read_text())
    material = list(docs.values())[1]
    frame_ids = list(material)
    material[frame_ids[0]]["structure"]["sites"][0]["species"][0]["element"] = "Xx"
    (tmp_path / "mptrj.json").write_text(json.dumps(docs))
    config = tmp_path / "mptrj.yaml"
    config.write_text(f"""
output: {tmp_path / "out"}
datasets:
  - {{name: mptrj, path: {tmp_path / "mptrj.json"}, format: mptrj-json, subset_key: mp_id,
     on_error: skip, filters: {{exclude_elements: [Ba]}}}}
models:
  - {{id: chgnet-0.3.0, family: chgnet, checkpoint: "0.3.0", layers: [bb]}}
  - {{id: chgnet-r2scan, family: chgnet, checkpoint: r2scan, layers: [bb]}}
extraction: {{shard_size: 4}}
analyses: {{n_test: 100, metrics: [gfre], order_metrics: [], baselines: []}}
""")
    assert main(["run", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    run = json.loads((out / "run.json").read_text())
    counts = run["provenance"]["datasets"]["mptrj"]
    n_ba = sum(any(s["species"][0]["element"] == "Ba" for s in doc["structure"]["sites"])
               for m in docs.values() for doc in m.values())
    assert counts["failed"] == 1 and counts["dropped"] == n_ba
    assert counts["structures"] + counts["failed"] + counts["dropped"] == 11
    failures = ds.dataset(out / "failures", format="parquet", partitioning="hive").to_table(
        filter=ds.field("model") == "input").to_pandas()
    assert failures.structure_id.tolist() == [f"mptrj:{frame_ids[0]}"]
    assert "unknown element symbol 'Xx'" in failures.reason.iloc[0]
    latents = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table(
        filter=ds.field("model") == "chgnet-0.3.0").to_pandas()
    kept = [f"mptrj:{fid}" for m in docs.values() for fid, doc in m.items()
            if fid != frame_ids[0] and not any(s["species"][0]["element"] == "Ba"
                                               for s in doc["structure"]["sites"])]
    assert sorted(latents.structure_id.unique()) == sorted(kept)
    results = pd.read_csv(out / "results" / "reconstruction.csv")
    assert len(results) == 2 * 2 and results.value.notna().all()  # 2 pairs x 2 levels
    assert_one_gfre_equals_skmatter(out, "chgnet-r2scan", "chgnet-0.3.0")


def _toy_latents(checkpoint, n_structures: int, layer: str) -> np.ndarray:
    """The toy family's features of the first MAD structures, from the plugin's adapter
    imported here from tests/plugin."""
    import sys

    plugin = str(Path(__file__).parent / "plugin")
    sys.path.insert(0, plugin)
    try:
        from latentray_toy import RadialAdapter
    finally:
        sys.path.remove(plugin)
    model = RadialAdapter(str(checkpoint))
    frames = read(resolve_paths("builtin:mad-val-1000")[0], index=f":{n_structures}")
    return model.forward([model.prepare(a) for a in frames], [layer])[layer]


def test_a_third_party_family_runs_through_latentray_run(tmp_path):
    """Three models of the entry-point family in tests/plugin, through Ray actors: the only
    change is PYTHONPATH (as installing the package would be). One of them names another as
    its ``parent``: the report's table of variants and fine-tuning, its models table and the
    summary carry the run's numbers for that pair."""
    import re
    import subprocess
    import sys

    plugin = Path(__file__).parent / "plugin"
    for name, centres in [("a", [1.0, 2.0, 3.0, 4.0]), ("b", [1.5, 2.5, 3.5]),
                          ("c", [1.2, 2.2, 3.2])]:
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"cutoff": 5.0, "centres": centres, "width": 0.4}))
    config = tmp_path / "toy.yaml"
    config.write_text(f"""
output: {tmp_path / "out"}
datasets: [{{name: mad, path: builtin:mad-val-1000, limit: 60}}]
models:
  - {{id: toy-a, family: toy-radial, checkpoint: {tmp_path / "a.json"}, layers: [all],
     parent: toy-b}}
  - {{id: toy-b, family: toy-radial, checkpoint: {tmp_path / "b.json"}, layers: [all]}}
  - {{id: toy-c, family: toy-radial, checkpoint: {tmp_path / "c.json"}, layers: [all]}}
extraction: {{shard_size: 30}}
analyses: {{n_test: 200, metrics: [gfre], order_metrics: [], baselines: []}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    done = subprocess.run([sys.executable, "-m", "latentray.cli", "run", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    latents = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table(
        filter=(ds.field("model") == "toy-b") & (ds.field("layer") == "bb2")).to_pandas()
    latents = latents.sort_values(["structure_index", "atom_index"])
    expected = _toy_latents(tmp_path / "b.json", 60, "bb2")
    np.testing.assert_allclose(np.stack(latents.features.to_numpy()), expected, rtol=1e-6)
    results = pd.read_csv(out / "results" / "reconstruction.csv")
    models = ["toy-a", "toy-b", "toy-c"]
    assert sorted(zip(results.source, results.target, results.level)) == sorted(
        (s, t, level) for s in models for t in models if s != t
        for level in ("atom", "structure"))
    # the parent key, end to end
    page = (out / "report.html").read_text()
    value = {(r.source, r.target, r.level): r.value for r in results.itertuples()}
    section = page[page.index("<h2>Variants of one architecture"):]
    (pairs,) = pd.read_html(io.StringIO(section[:section.index("</table>") + 8]))
    assert sorted(zip(pairs.A, pairs.B, pairs.relation)) == [
        ("toy-a", "toy-b", "fine-tuned from B"), ("toy-a", "toy-c", "same architecture "
                                                  "(toy-radial)"),
        ("toy-b", "toy-c", "same architecture (toy-radial)")]
    for row in pairs.to_dict("records"):
        for level in ("atom", "structure"):
            for k, (s, t) in [("A→B", (row["A"], row["B"])), ("B→A", (row["B"], row["A"]))]:
                assert row[f"GFRE {level} {k}"] == float(f"{value[s, t, level]:.4f}")
    (table,) = [t for t in pd.read_html(io.StringIO(page), keep_default_na=False)
                if "fine-tuned from" in t.columns]
    assert dict(zip(table.model, table["fine-tuned from"])) == {
        "toy-a": "toy-b", "toy-b": "", "toy-c": ""}
    summary = (out / "results" / "summary.md").read_text()
    line = re.search(r"Fine-tuning: toy-a \(fine-tuned from toy-b\).*", summary).group(0)
    v = {k[:2]: f"{x:.3f}" for k, x in value.items() if k[2] == "atom"}  # atom level, as printed
    closer = (value["toy-a", "toy-b", "atom"] + value["toy-b", "toy-a", "atom"]
              < value["toy-c", "toy-b", "atom"] + value["toy-b", "toy-c", "atom"])
    assert line == (
        f"Fine-tuning: toy-a (fine-tuned from toy-b) and toy-b are at GFRE {v['toy-a', 'toy-b']} "
        f"and {v['toy-b', 'toy-a']}, {'closer than' if closer else 'not closer than'} the "
        f"independently trained toy-c ({v['toy-c', 'toy-b']} and {v['toy-b', 'toy-c']}).")


def test_a_family_from_a_pip_runtime_environment(tmp_path):
    """The toy family is not importable by the driver: its actors get it from Ray's pip
    runtime environment (``environments: {toy-radial: {pip: [PACKAGE]}}``), built by Ray."""
    import shutil

    import ray

    plugin = tmp_path / "latentray-toy"  # a copy: building the package writes into it
    shutil.copytree(Path(__file__).parent / "plugin", plugin,
                    ignore=shutil.ignore_patterns("*.dist-info"))
    (tmp_path / "a.json").write_text(json.dumps({"cutoff": 5.0, "centres": [1.0, 2.0, 3.0],
                                                 "width": 0.4}))
    config = tmp_path / "toy.yaml"
    config.write_text(f"""
output: {tmp_path / "out"}
datasets: [{{name: mad, path: builtin:mad-val-1000, limit: 6}}]
models:
  - {{id: toy-a, family: toy-radial, checkpoint: {tmp_path / "a.json"}, layers: [bb1]}}
environments:
  toy-radial: {{pip: ["{plugin}"]}}
analyses: {{metrics: [], order_metrics: [], baselines: []}}
""")
    from latentray.models import available_families

    assert "toy-radial" not in available_families()
    try:
        assert main(["run", str(config), "--quiet"]) == 0
    finally:
        ray.shutdown()
    latents = ds.dataset(tmp_path / "out" / "latents", format="parquet",
                         partitioning="hive").to_table().to_pandas()
    latents = latents.sort_values(["structure_index", "atom_index"])
    # the features the actors computed in Ray's environment: those of the plugin's own adapter
    expected = _toy_latents(tmp_path / "a.json", 6, "bb1")
    assert expected.shape[1] == 3
    np.testing.assert_allclose(np.stack(latents.features.to_numpy()), expected, rtol=1e-6)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["provenance"]["models"][0]["family_package_version"] == "0.1"
