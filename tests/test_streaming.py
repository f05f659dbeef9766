"""latentray.method.streaming: the measures from mergeable statistics over blocks, against
scikit-matter (given the same index sets) on random and on real latents, and the split rule."""

import os

import numpy as np
import pytest
import skmatter.metrics as skm
from ase.io import read

import latentray.method.reconstruction as lr
import latentray.method.streaming as streaming
from latentray.method.cumulants import cumulant_features
from latentray.datasets import resolve_paths
from latentray.method.splits import paper_split
from latentray.method.streaming import (
    FOLD1,
    FOLD2,
    TEST,
    ArraySides,
    ArraySource,
    CentredQR,
    HashSplit,
    IndexSplit,
    SerialExecutor,
    all_pairs_at_scale,
    linear_cka,
    reconstruction_at_scale,
    split_keys,
)

METRICS = ("gfre", "gfrd", "lfre")


def _skmatter(X, Y, train, test, k):
    return {"gfre": skm.global_reconstruction_error(X, Y, test_idx=test, train_idx=train),
            "gfrd": skm.global_reconstruction_distortion(X, Y, test_idx=test, train_idx=train),
            "lfre": skm.local_reconstruction_error(X, Y, k, test_idx=test, train_idx=train)}


def _random_pairs():
    rng = np.random.default_rng(3)
    n = 900
    G = rng.standard_normal((n, 9))
    X = G @ rng.standard_normal((9, 16))
    X[:, 0] = 2.5  # a constant column
    X[:, 1] += 1e6  # a large offset (naive sums of squares would lose it)
    Y = np.tanh(G @ rng.standard_normal((9, 20)) / 2) + 0.05 * rng.standard_normal((n, 20))
    rank_deficient = np.hstack([G[:, :4], G[:, :4] @ rng.standard_normal((4, 8))])
    return {"random": (X, Y), "rank_deficient_x": (rank_deficient, Y[:, :12])}


@pytest.mark.parametrize("case", ["random", "rank_deficient_x"])
@pytest.mark.parametrize("block_rows", [900, 128, 7])  # whole, a few blocks, blocks < width
def test_equals_skmatter_given_the_same_index_sets(case, block_rows):
    X, Y = _random_pairs()[case]
    train, test = paper_split(len(X), 150, seed=0)
    expected = _skmatter(X, Y, train, test, 10)
    got = reconstruction_at_scale(ArraySource(X, Y, block_rows=block_rows),
                                  IndexSplit(len(X), train, test), METRICS, n_local_points=10)
    for metric in METRICS:
        assert got.values[metric] == pytest.approx(expected[metric], rel=1e-8), metric
    # the pointwise errors are the in-memory ones, in row order of the test set
    np.testing.assert_array_equal(got.test_row, np.sort(test))
    pointwise = lr.pointwise_global_reconstruction_error(X, Y, train_idx=train,
                                                         test_idx=np.sort(test))
    np.testing.assert_allclose(got.pointwise["gfre"], pointwise, rtol=1e-8)
    assert got.n_train == len(train) and got.n_test == len(test)


def test_distortion_for_a_narrower_target_equals_the_in_memory_one():
    X, Y = _random_pairs()["random"]
    train, test = paper_split(len(X), 150, seed=1)
    got = reconstruction_at_scale(ArraySource(X, Y[:, :5], block_rows=200),
                                  IndexSplit(len(X), train, test), ("gfrd",))
    assert got.values["gfrd"] == pytest.approx(
        lr.global_reconstruction_distortion(X, Y[:, :5], test_idx=test, train_idx=train),
        rel=1e-8)


@pytest.fixture(scope="module")
def real_latents():
    """CHGNet 0.3.0 latents (bb2, ll) of 60 MAD structures, and their cumulants."""
    pytest.importorskip("chgnet")
    from latentray.models import load_adapter

    frames = [a for a in read(resolve_paths("builtin:mad-val-1000")[0], index=":120")
              if len(a) <= 40][:60]
    model = load_adapter("chgnet", "0.3.0")
    out = model.forward([model.prepare(a) for a in frames], ["bb2", "ll"])
    segment = np.repeat(np.arange(len(frames)), [len(a) for a in frames])
    _, cumulants = cumulant_features(out["bb2"], segment, order=8)
    return {"bb2": out["bb2"].astype(np.float64), "ll": out["ll"].astype(np.float64),
            "cumulants": cumulants, "width": out["bb2"].shape[1], "structure": segment,
            "Z": np.concatenate([a.numbers for a in frames]),
            "subset": np.repeat([a.info["subset"] for a in frames], [len(a) for a in frames])}


def test_equals_skmatter_on_real_latents(real_latents):
    X, Y = real_latents["bb2"], real_latents["ll"]
    train, test = paper_split(len(X), 300, seed=0)
    expected = _skmatter(X, Y, train, test, 64)
    got = reconstruction_at_scale(ArraySource(X, Y, block_rows=250),
                                  IndexSplit(len(X), train, test), METRICS)
    for metric in METRICS:
        assert got.values[metric] == pytest.approx(expected[metric], rel=1e-8), metric


def test_order_one_from_order_eight_cumulants_equals_skmatter(real_latents):
    """Rank-deficient X on real data: k1 reconstructed from [k1 .. k8] (and back)."""
    F, w = real_latents["cumulants"], real_latents["width"]
    train, test = paper_split(len(F), 30, seed=0)
    for X, Y in [(F, F[:, :w]), (F[:, :w], F)]:
        got = reconstruction_at_scale(ArraySource(X, Y, block_rows=16),
                                      IndexSplit(len(F), train, test), ("gfre",))
        assert got.values["gfre"] == pytest.approx(
            skm.global_reconstruction_error(X, Y, test_idx=test, train_idx=train), rel=1e-8)


@pytest.fixture(scope="module")
def three_sides(real_latents):
    """Three sides of different widths on the real atoms of 60 MAD structures (CHGNet 0.3.0
    bb2 and ll, and a narrower nonlinear map of ll), each missing some structures, as a model
    that cannot process them: four patterns of which sides have a row."""
    X, Y = real_latents["bb2"], real_latents["ll"]
    rng = np.random.default_rng(3)
    Z = np.tanh(Y @ rng.standard_normal((Y.shape[1], 24)) / 8)
    structure = real_latents["structure"]
    present = np.ones((len(X), 3), bool)
    present[:, 1] = ~np.isin(structure, [2, 17, 40])
    present[:, 2] = ~np.isin(structure, [5, 17, 33, 51, 58])
    atom = np.concatenate([np.arange(c) for c in np.bincount(structure)])
    return dict(Xs=[X, Y, Z], present=present, structure_id=structure.astype(str),
                atom_index=atom, stratum=real_latents["subset"],
                groups={"Z": real_latents["Z"], "subset": real_latents["subset"]})


@pytest.mark.parametrize("block_rows", [400, 5000])
def test_all_pairs_in_one_pass_equal_each_pair_on_its_own(three_sides, block_rows):
    """Every ordered pair of three sides from one pass equals the one-pair streamed fit on the
    rows the pair shares, with the same hash split (its own test rows): GFRE, GFRD and CKA to
    1e-10. LFRE to 1e-7: its local fits on a few neighbours are ill-conditioned enough that
    rounding (the states merge in another order) flips a few near-tied cutoff choices; the
    one-pair fit itself moves as much between two block layouts (1.8e-8 on these rows)."""
    sides = ArraySides(block_rows=block_rows, **three_sides)
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    metrics = ("gfre", "gfrd", "lfre", "cka")
    got = all_pairs_at_scale(sides, pairs, n_test=200, seed=1, metrics=metrics)
    for a, b in pairs:
        alone = reconstruction_at_scale(sides.pair(a, b), HashSplit(200, seed=1), metrics)
        one = got[a, b]
        assert (one.n_train, one.n_test) == (alone.n_train, alone.n_test)
        rows = np.flatnonzero(sides.present[:, a] & sides.present[:, b])
        np.testing.assert_array_equal(one.test_row, rows[alone.test_row])  # the same test rows
        for metric in metrics:
            rel = 1e-7 if metric == "lfre" else 1e-10
            assert one.values[metric] == pytest.approx(alone.values[metric], rel=rel), \
                (a, b, metric)
        for metric in ("gfre", "gfrd"):
            np.testing.assert_allclose(one.pointwise[metric], alone.pointwise[metric],
                                       rtol=1e-8, atol=1e-12)
        for g in ("Z", "subset"):
            np.testing.assert_array_equal(one.groups[g], alone.groups[g])


def test_all_pairs_gather_in_blocks_of_test_rows_changes_no_number(three_sides):
    """LFRE's gather in blocks of at most ``gather_rows`` neighbour rows (here 60: many
    blocks, a group's test rows split between them) gives every pair the same pointwise
    errors as one gather of all rows, to the last digit, and every other value unchanged."""
    sides = ArraySides(block_rows=97, **three_sides)
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    metrics = ("gfre", "lfre", "cka")
    whole = all_pairs_at_scale(sides, pairs, n_test=200, seed=1, metrics=metrics)
    blocks = list(streaming._gather_blocks(
        [(None, np.arange(200 * 7).reshape(200, 7) % 500, 7)], 500, 60, piece=8))
    assert len(blocks) > 10 and all(len(rows) <= 60 for _, rows in blocks)
    assert [piece for block, _ in blocks for piece in block][:2] == [(0, 0, 8), (0, 8, 16)]
    assert np.concatenate([np.arange(start, stop) for block, _ in blocks
                           for _, start, stop in block]).tolist() == list(range(200))
    blocked = all_pairs_at_scale(sides, pairs, n_test=200, seed=1, metrics=metrics,
                                 gather_rows=60)
    for pair in pairs:
        np.testing.assert_array_equal(blocked[pair].pointwise["lfre"],
                                      whole[pair].pointwise["lfre"])
        assert blocked[pair].values == whole[pair].values


def test_the_gather_as_ray_tasks_equals_the_serial_one(three_sides):
    """The gather's shuffle as Ray tasks (``RayExecutor.map_parts``: one object per gather
    block, yielded by a generator; one gather block: a plain return) gives every pair the
    values of the serial executor, to the last bit."""
    import ray

    from latentray.analysis.executors import RayExecutor

    sides = ArraySides(block_rows=97, **three_sides)
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    metrics = ("gfre", "lfre", "cka")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for gather_rows in (60, streaming.GATHER_ROWS):  # many gather blocks, then one
            serial = all_pairs_at_scale(sides, pairs, n_test=200, seed=1, metrics=metrics,
                                        gather_rows=gather_rows)
            remote = all_pairs_at_scale(sides, pairs, n_test=200, seed=1, metrics=metrics,
                                        gather_rows=gather_rows, executor=RayExecutor())
            for pair in pairs:
                np.testing.assert_array_equal(remote[pair].pointwise["lfre"],
                                              serial[pair].pointwise["lfre"])
                assert remote[pair].values == serial[pair].values
    finally:
        if started:
            ray.shutdown()


def test_serial_executor_runs_each_task_once_when_fetched():
    calls = []

    def task(i):
        calls.append(i)
        return [i]

    ex = SerialExecutor()
    handles = ex.map(task, [(i,) for i in range(20)])
    assert calls == []  # deferred until fetched
    assert ex.reduce(lambda *parts: sum(parts, []), handles, fan_in=3) == list(range(20))
    assert sorted(calls) == list(range(20))
    assert ex.get(ex.map(task, [(5,), (6,)])) == [[5], [6]]


def test_serial_executor_parts_run_each_task_once_and_leave_no_file(tmp_path):
    """A shuffle's tasks (``map_parts``, generators) run once, when a part is first
    fetched; the other parts wait on disk and are deleted when fetched, so the process holds
    one at a time."""
    calls = []

    def task(i):
        calls.append(i)
        for p in range(4):
            yield np.full(3, 10 * i + p)

    ex = SerialExecutor(spill_dir=str(tmp_path))
    handles = ex.map_parts(task, [(i,) for i in range(5)], 4)
    assert calls == [] and len(handles) == 5 and all(len(h) == 4 for h in handles)
    spill = handles[0][0].args[0]._spill.name
    assert os.path.dirname(spill) == str(tmp_path)
    for p in (2, 0, 3, 1):
        assert [ex.get([h[p]])[0].tolist() for h in handles] == [[10 * i + p] * 3
                                                                 for i in range(5)]
        if p == 2:
            assert calls == list(range(5)) and len(os.listdir(spill)) == 5 * 3
    assert calls == list(range(5)) and os.listdir(spill) == []
    del handles
    assert not os.path.exists(spill)  # removed with the last handle


def test_all_pairs_of_sides_without_common_rows_are_refused(three_sides):
    present = three_sides["present"].copy()
    present[:, 2] = ~present[:, 1]
    sides = ArraySides(**{**three_sides, "present": present})
    with pytest.raises(ValueError, match="sides 1 and 2 share no rows"):
        all_pairs_at_scale(sides, [(1, 2)], n_test=50)


def test_all_pairs_bad_rows_name_their_block_and_absent_sides_are_not_read(three_sides):
    """NaN in a row of a side that has the row is refused, naming the block and the row; the
    same NaN where that side has no row (a model that did not process the structure) is
    never read, and the values equal those without it to the last bit."""
    Xs = [X.copy() for X in three_sides["Xs"]]
    present = three_sides["present"]
    absent, kept = np.flatnonzero(~present[:, 2])[0], np.flatnonzero(present[:, 2])[300]
    clean = all_pairs_at_scale(ArraySides(**three_sides, block_rows=400), [(0, 2), (2, 1)],
                               n_test=50, metrics=("gfre",))
    Xs[2][absent, 3] = np.nan
    masked = all_pairs_at_scale(ArraySides(**{**three_sides, "Xs": Xs}, block_rows=400),
                                [(0, 2), (2, 1)], n_test=50, metrics=("gfre",))
    assert {p: r.values for p, r in masked.items()} == {p: r.values for p, r in clean.items()}
    Xs[2][kept, 3] = np.inf
    with pytest.raises(ValueError, match=rf"block {kept // 400}: rows with NaN .* "
                                         rf"\(first: row {kept}\)"):
        all_pairs_at_scale(ArraySides(**{**three_sides, "Xs": Xs}, block_rows=400),
                           [(0, 2)], n_test=50)


def test_centred_states_merge_to_the_whole():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((500, 6)) * [1, 10, 1e-3, 1, 1, 1] + [0, 1e6, 0, -3, 0, 7]
    whole = CentredQR.of(A)
    parts = CentredQR.merge(*[CentredQR.of(A[i: i + 37]) for i in range(0, 500, 37)])
    mean = A.mean(axis=0)
    for state in (whole, parts):
        assert state.n == 500
        np.testing.assert_allclose(state.mean(), mean, rtol=1e-14, atol=1e-12)
        R = state.centred(mean)
        np.testing.assert_allclose(R.T @ R, (A - mean).T @ (A - mean), rtol=1e-9, atol=1e-9)
    # the singular values survive (no Gram matrix squared them)
    np.testing.assert_allclose(np.linalg.svd(parts.centred(mean), compute_uv=False),
                               np.linalg.svd(A - mean, compute_uv=False), rtol=1e-10)


def test_linear_cka_equals_the_kernel_definition():
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T, H centring."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 5)) + 3
    Y = np.hstack([X[:, :2] ** 2, rng.standard_normal((80, 4))])
    H = np.eye(80) - 1 / 80
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda a, b: np.trace(a @ H @ b @ H)  # noqa: E731
    expected = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    A = np.hstack([X, Y])
    R = np.linalg.qr(A - A.mean(axis=0), mode="r")
    assert linear_cka(R, 5) == pytest.approx(expected, rel=1e-12)
    # invariant to rotation and isotropic scaling: CKA(X, 3 X Q) = 1
    Q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    Xc = X - X.mean(axis=0)
    assert linear_cka(np.linalg.qr(np.hstack([Xc, 3 * Xc @ Q]), mode="r"), 5) == \
        pytest.approx(1.0, rel=1e-12)
    # from the blocks: CKA of the training rows
    got = reconstruction_at_scale(ArraySource(X, Y, block_rows=30),
                                  IndexSplit(80, np.arange(60), np.arange(60, 80)), ("cka",))
    centred = A[:60] - A[:60].mean(axis=0)
    assert got.values["cka"] == pytest.approx(
        linear_cka(np.linalg.qr(centred, mode="r"), 5), rel=1e-10)


# -- the split rule at scale ------------------------------------------------------------------


def _ids(n, rng):
    n_atoms = rng.integers(1, 30, size=n // 10)
    structure = np.repeat(np.arange(len(n_atoms)), n_atoms)[:n]
    atom = np.concatenate([np.arange(k) for k in n_atoms])[:n]
    stratum = np.array(["a", "b", "c", "d"], dtype=object)[structure % 7 % 4]
    return np.char.add("s", structure.astype(str)), atom, stratum


def _labels(split, sid, atom, stratum, block_rows, order=None):
    order = np.arange(len(sid)) if order is None else order
    source = ArraySource(np.zeros((len(sid), 1)), np.zeros((len(sid), 1)), block_rows=block_rows,
                         structure_id=sid[order], atom_index=atom[order], stratum=stratum[order])
    split.resolve(split.merge(*[split.summarise(source.ids(i))
                                for i in range(source.n_blocks)]))
    labels = np.concatenate([split.labels(source.read(i, 0)) for i in range(source.n_blocks)])
    out = np.empty_like(labels)
    out[order] = labels
    return out


def test_hash_split_is_exact_stratified_and_independent_of_the_layout():
    rng = np.random.default_rng(0)
    sid, atom, stratum = _ids(20000, rng)
    labels = _labels(HashSplit(1000, seed=0), sid, atom, stratum, 20000)
    assert (labels == TEST).sum() == 1000
    for s in "abcd":  # test rows in proportion to the strata (largest remainder)
        share = 1000 * (stratum == s).mean()
        assert abs((labels[stratum == s] == TEST).sum() - share) < 1
    folds = labels[labels != TEST]
    assert abs((folds == FOLD1).mean() - 0.5) < 0.02 and set(folds) == {FOLD1, FOLD2}
    # the same labels whatever the blocks and the row order
    shuffled = rng.permutation(len(sid))
    np.testing.assert_array_equal(
        labels, _labels(HashSplit(1000, seed=0), sid, atom, stratum, 333, order=shuffled))
    # a row keeps its key when other rows change: keys depend on the row alone
    np.testing.assert_array_equal(split_keys(sid[:50], atom[:50], 0),
                                  split_keys(sid, atom, 0)[:50])
    other = _labels(HashSplit(1000, seed=1), sid, atom, stratum, 20000)
    assert (other == TEST).sum() == 1000 and not np.array_equal(other, labels)
    unstratified = _labels(HashSplit(1000, seed=0, stratified=False), sid, atom, stratum, 5000)
    assert (unstratified == TEST).sum() == 1000


def test_hash_split_small_data_and_errors():
    rng = np.random.default_rng(0)
    sid, atom, stratum = _ids(300, rng)
    half = _labels(HashSplit(1000, seed=0, at_most_half=True), sid, atom, stratum, 64)
    assert (half == TEST).sum() == 150
    with pytest.raises(ValueError, match="leaves no training rows"):
        _labels(HashSplit(300, seed=0), sid, atom, stratum, 64)
    with pytest.raises(ValueError, match="n_test must be positive"):
        HashSplit(0)


def test_hash_split_fit_runs_on_blocks():
    X, Y = _random_pairs()["random"]
    got = reconstruction_at_scale(ArraySource(X, Y, block_rows=100), HashSplit(100, seed=0),
                                  ("gfre", "lfre", "cka"))
    assert got.n_test == 100 and got.n_train == len(X) - 100
    assert 0 < got.values["gfre"] < 1 and 0 < got.values["cka"] <= 1
    labels = np.full(len(X), -1)
    labels[got.test_row] = TEST
    # the same rows in memory, given the test rows the hash rule chose
    train = np.flatnonzero(labels != TEST)
    assert got.values["gfre"] == pytest.approx(
        lr.global_reconstruction_error(X, Y, test_idx=got.test_row, train_idx=train), rel=0.05)


def test_bad_rows_name_their_block():
    X, Y = _random_pairs()["random"]
    X = X.copy()
    X[450, 3] = np.nan
    train, test = paper_split(len(X), 100, seed=0)
    with pytest.raises(ValueError, match=r"block 3: rows with NaN .* \(first: row 450\)"):
        reconstruction_at_scale(ArraySource(X, Y, block_rows=128),
                                IndexSplit(len(X), train, test), ("gfre",))
    with pytest.raises(ValueError, match="zero variance"):
        reconstruction_at_scale(ArraySource(np.ones_like(X), Y, block_rows=128),
                                IndexSplit(len(X), train, test), ("gfre",))
    with pytest.raises(ValueError, match="unknown metrics"):
        reconstruction_at_scale(ArraySource(X, Y), IndexSplit(len(X), train, test), ("rmse",))


@pytest.mark.parametrize("max_width", [10_000, 300, 128])
def test_streamed_fits_gather_every_pair_into_passes_of_bounded_width(max_width):
    """The analysis's passes: every fit in exactly one pass that holds both its sides, no
    pass wider than the limit allows (blocks of half of it, two blocks per pass), one pass
    when everything fits."""
    ray = pytest.importorskip("ray")
    from latentray.analysis.fits import StreamedFits

    del ray
    sides = [(f"m{i}", "bb", w) for i, w in enumerate([64, 128, 128, 64, 100])]
    fits = [(s, t, ("gfre",), None) for s in sides for t in sides if s != t]
    fits.append((("m0", "ll", 64), ("m0", "bb", 64), ("gfre",), None))
    passes = StreamedFits(None, None, max_width=max_width)._passes(fits)
    seen = [id(f) for _, members in passes for f in members]
    assert sorted(seen) == sorted(id(f) for f in fits)
    for pass_sides, members in passes:
        assert all(f[0] in pass_sides and f[1] in pass_sides for f in members)
        blocks_limit = max(max_width, 2 * max(s[2] for s in pass_sides))
        assert sum(s[2] for s in pass_sides) <= blocks_limit
    assert (len(passes) == 1) == (max_width >= sum(s[2] for s in sides) + 64)


def test_ray_map_reduce_merges_in_the_serial_executors_tree():
    """``RayExecutor.map_reduce`` (block tasks submitted as their merges end, at most
    ``window`` results waiting) merges the same groups at every level as the serial
    executor's ``reduce(merge, map(...))``: with a merge that keeps its arguments' nesting,
    the trees are equal, for sizes around the powers of ``fan_in`` and a window smaller than
    the number of blocks."""
    import ray

    from latentray.analysis.executors import RayExecutor

    def _leaf(i):  # (local functions travel to Ray's workers by value)
        return i

    def _nest(*parts):
        return tuple(parts)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for fan_in in (3, 8):
            for n in (1, 2, fan_in, fan_in + 1, fan_in ** 2, fan_in ** 2 + 1, 70):
                serial = SerialExecutor()
                expected = serial.reduce(_nest, serial.map(_leaf, [(i,) for i in range(n)]),
                                         fan_in)
                got = RayExecutor(window=2 * fan_in).map_reduce(
                    _leaf, [(i,) for i in range(n)], _nest, fan_in)
                assert got == expected, (fan_in, n)
                assert SerialExecutor().map_reduce(
                    _leaf, [(i,) for i in range(n)], _nest, fan_in) == expected
    finally:
        if started:
            ray.shutdown()
