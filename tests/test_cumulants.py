"""Cumulant structure features (latentray.method.cumulants) against the paper's recipe done by hand.

The reference everywhere is independent of the module: per structure, ``numpy.mean`` and
``scipy.stats.moment`` for the central moments, the cumulant formulas written out again below,
and (for the formulas themselves) exact rational arithmetic and the log of the empirical moment
generating function.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from math import comb, factorial
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from latentray.method import cumulants as cm
from latentray.method.cumulants import (
    MomentState,
    cumulant_features,
    mean_pooling,
    merge,
    merge_all,
    sum_pooling,
)

MAD = Path(__file__).resolve().parents[1] / "latentray" / "data" / "mad-val-1000.xyz"
ORDER = 8


# --------------------------------------------------------------------------------------------
# the reference recipe, per structure
# --------------------------------------------------------------------------------------------


def ref_cumulants(x: np.ndarray, order: int = ORDER) -> np.ndarray:
    """(order, d): [k1..k_order] of one structure's (n, d) values, scipy central moments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "precision loss" on constants
        mu = {1: np.mean(x, axis=0)}
        for p in range(2, order + 1):
            mu[p] = np.asarray(stats.moment(x, moment=p, axis=0), dtype=np.float64)
    k = [
        mu[1],
        mu[2],
        mu[3],
        mu[4] - 3 * mu[2] ** 2,
        mu[5] - 10 * mu[3] * mu[2],
        mu[6] - 15 * mu[4] * mu[2] - 10 * mu[3] ** 2 + 30 * mu[2] ** 3,
        mu[7] - 21 * mu[5] * mu[2] - 35 * mu[4] * mu[3] + 210 * mu[3] * mu[2] ** 2,
        mu[8] - 28 * mu[6] * mu[2] - 56 * mu[5] * mu[3] - 35 * mu[4] ** 2
        + 420 * mu[4] * mu[2] ** 2 + 560 * mu[3] ** 2 * mu[2] - 630 * mu[2] ** 4,
    ]
    return np.array(k[:order])


def ref_root(k: np.ndarray) -> np.ndarray:
    out = k.copy()
    for n in range(2, k.shape[0] + 1):
        out[n - 1] = np.sign(k[n - 1]) * np.abs(k[n - 1]) ** (1.0 / n)
    return out


def naive_cumulants(x: np.ndarray, order: int = ORDER) -> np.ndarray:
    """Raw power sums sum x^p -> raw moments -> central moments (binomial) -> cumulants:
    the one-pass method that fails on a large offset (used to prove the offset test can fail)."""
    n = x.shape[0]
    raw = [np.ones(x.shape[1])] + [np.sum(x**p, axis=0) / n for p in range(1, order + 1)]
    m = raw[1]
    mu = {1: m}
    for p in range(2, order + 1):
        mu[p] = sum(comb(p, j) * raw[j] * (-m) ** (p - j) for j in range(p + 1))
    out = cm.cumulants_from_central_moments(np.array([mu[p] for p in range(1, order + 1)]))
    return out


def assert_cumulants_close(k, k_ref, sigma, rel=1e-9, what=""):
    """|k_n - k_n(ref)| <= rel * sigma^n per column (n = 2..order); k1 to rel * (|k1| + sigma)."""
    order = k.shape[0]
    np.testing.assert_array_less(
        np.abs(k[0] - k_ref[0]), rel * (np.abs(k_ref[0]) + sigma) + 1e-300, err_msg=f"{what} k1"
    )
    for n in range(2, order + 1):
        err = np.abs(k[n - 1] - k_ref[n - 1])
        tol = rel * sigma**n
        bad = err > tol
        assert not bad.any(), (
            f"{what} k{n}: error {err[bad]} > tolerance {tol[bad]} (sigma {sigma[bad]})"
        )


# --------------------------------------------------------------------------------------------
# real data: MAD structures with simple per-atom descriptors, randomly projected
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mad():
    """(features (n_atoms, 16), structure index per atom) for the first 200 MAD structures.

    Per atom: Z, neighbours within 3 A, their mean distance, the DFT force (3 + norm) and the
    position; then Z, the neighbour count and 14 fixed random projections (with a tanh, so
    the columns are skewed and heavy-tailed)."""
    ase_io = pytest.importorskip("ase.io")
    from ase.neighborlist import neighbor_list

    frames = ase_io.read(MAD, index=":200")
    rows = []
    for atoms in frames:
        n = len(atoms)
        i, dist = neighbor_list("id", atoms, 3.0)
        nn = np.bincount(i, minlength=n).astype(float)
        dsum = np.bincount(i, weights=dist, minlength=n)
        mean_d = np.divide(dsum, nn, out=np.zeros(n), where=nn > 0)
        # ase.io.read moves the file's per-atom `forces` into a SinglePointCalculator
        f = atoms.arrays["forces"] if "forces" in atoms.arrays else atoms.get_forces()
        rows.append(
            np.column_stack(
                [atoms.numbers, nn, mean_d, f, np.linalg.norm(f, axis=1), atoms.positions]
            )
        )
    seg = np.repeat(np.arange(len(frames)), [len(r) for r in rows])
    desc = np.vstack(rows)
    z = (desc - desc.mean(0)) / desc.std(0)
    w = np.random.default_rng(0).normal(size=(desc.shape[1], 14))
    # raw Z and neighbour counts keep integer columns (constant within elemental structures)
    feats = np.column_stack([desc[:, 0], desc[:, 1], np.tanh(z @ w) + 0.1 * z @ w])
    return feats, seg


def test_mad_fixture_is_real_and_varied(mad):
    feats, seg = mad
    sizes = np.bincount(seg)
    assert len(sizes) == 200 and sizes.sum() == feats.shape[0]
    assert sizes.min() == 1 and sizes.max() > 100  # single-atom and large structures included
    assert np.isfinite(feats).all()


def test_parity_with_per_structure_scipy_recipe(mad):
    feats, seg = mad
    state = MomentState.from_atoms(feats, seg, order=ORDER)
    np.testing.assert_array_equal(state.ids, np.arange(200))
    np.testing.assert_array_equal(state.count, np.bincount(seg))
    k = state.cumulants(ORDER)
    X = state.structure_features(ORDER, root=True)
    assert X.shape == (200, ORDER * feats.shape[1]) and X.dtype == np.float64
    d = feats.shape[1]
    n_root_checked = 0
    for s in range(200):
        x = feats[seg == s]
        sigma = np.std(x, axis=0)
        kr = ref_cumulants(x)
        assert_cumulants_close(k[s], kr, sigma, what=f"structure {s}")
        # root-transformed, [k1 | k2 | ...] layout, where |k_n| is not near 0
        rr = ref_root(kr)
        got = X[s].reshape(ORDER, d)
        np.testing.assert_array_equal(got[0], k[s, 0])
        for n in range(2, ORDER + 1):
            far = np.abs(kr[n - 1]) >= 1e-3 * sigma**n
            far &= sigma > 0
            n_root_checked += far.sum()
            # d(k^(1/n)) = k^(1/n - 1) dk / n: with |dk| <= 1e-9 sigma^n and |k| >= 1e-3 sigma^n,
            # the root moves by at most ~5e-8 sigma
            err = np.abs(got[n - 1] - rr[n - 1])[far]
            assert (err <= 1e-7 * sigma[far]).all(), (s, n, err.max())
            np.testing.assert_array_equal(got[n - 1][sigma == 0], 0.0)
    assert n_root_checked > 0.25 * 200 * (ORDER - 1) * d  # most entries are checked


def test_cumulant_features_orders_and_pooling(mad):
    feats, seg = mad
    d = feats.shape[1]
    full = MomentState.from_atoms(feats, seg).structure_features(ORDER)
    for order in (1, 2, 3, 5, 8):
        ids, X = cumulant_features(feats, seg, order=order)
        np.testing.assert_array_equal(ids, np.arange(200))
        assert X.shape == (200, order * d)
        # the order-n descriptor is the first n blocks of the order-8 one
        np.testing.assert_allclose(X, full[:, : order * d], rtol=1e-12, atol=1e-300)
    ids, mp = mean_pooling(feats, seg)
    ids2, sp = sum_pooling(feats, seg)
    for s in (0, 17, 199):
        x = feats[seg == s]
        np.testing.assert_allclose(mp[s], x.mean(0), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(sp[s], x.sum(0), rtol=1e-13, atol=1e-12)
    np.testing.assert_array_equal(ids, ids2)


def test_unsorted_rows_arbitrary_ids_and_small_blocks(mad, monkeypatch):
    feats, seg = mad
    base = MomentState.from_atoms(feats, seg)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(seg))
    ids_map = -50 + 7 * rng.permutation(200)  # negative, gaps, not in structure order
    st = MomentState.from_atoms(feats[perm], ids_map[seg[perm]])
    order = np.argsort(ids_map)
    expected = MomentState(
        ids=ids_map[order],
        count=base.count[order],
        mean=base.mean[order],
        mean_err=base.mean_err[order],
        M=base.M[order],
        order=base.order,
    )
    assert_states_close(st, expected)
    # blocks much smaller than a structure (forcing the one-segment-per-block path)
    monkeypatch.setattr(cm, "_BLOCK_VALUES", 40)
    small = MomentState.from_atoms(feats, seg)
    np.testing.assert_allclose(small.M, base.M, rtol=1e-12, atol=0)
    np.testing.assert_allclose(small.mean, base.mean, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(small.count, base.count)


# --------------------------------------------------------------------------------------------
# merge (Pebay)
# --------------------------------------------------------------------------------------------


def assert_states_close(a: MomentState, b: MomentState, rel=1e-10):
    """Moments to ``rel`` relative to the scale: |dmean| <= rel (|mean| + sigma),
    |d mu_p| <= rel sigma^p."""
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.count, b.count)
    n = b.count[:, None].astype(float)
    sigma = np.sqrt(b.M[:, 0] / n)
    np.testing.assert_array_less(
        np.abs(a.mean - b.mean), rel * (np.abs(b.mean) + sigma) + 1e-300
    )
    for p in range(2, b.order + 1):
        err = np.abs(a.M[:, p - 2] - b.M[:, p - 2]) / n
        assert (err <= rel * sigma**p).all(), (p, err.max())


def test_merge_random_chunks_equals_whole(mad):
    feats, seg = mad
    whole = MomentState.from_atoms(feats, seg)
    rng = np.random.default_rng(2)
    for trial in range(3):
        n_chunks = rng.integers(2, 4, size=200)  # 2 or 3 chunks per structure
        label = (rng.random(len(seg)) * n_chunks[seg]).astype(int)
        parts = []
        for c in range(3):
            rows = rng.permutation(np.flatnonzero(label == c))
            parts.append(MomentState.from_atoms(feats[rows], seg[rows]))
        # id sets differ partly: small structures miss some chunks
        assert min(len(p) for p in parts) < 200
        assert_states_close(merge(merge(parts[0], parts[1]), parts[2]), whole)
        assert_states_close(merge(parts[2], merge(parts[1], parts[0])), whole)
        assert_states_close(merge_all(parts[::-1]), whole)


def test_merge_row_batches_across_structures(mad):
    """Parquet-like contiguous batches that cut structures anywhere, tree-reduced."""
    feats, seg = mad
    whole = MomentState.from_atoms(feats, seg)
    cuts = np.sort(np.random.default_rng(3).choice(np.arange(1, len(seg)), 12, replace=False))
    batches = [
        MomentState.from_atoms(f, s)
        for f, s in zip(np.split(feats, cuts), np.split(seg, cuts))
    ]
    assert_states_close(merge_all(batches), whole)
    # one atom at a time for a few structures: the extreme of chunking
    for s in (3, 50):
        rows = np.flatnonzero(seg == s)
        one = merge_all([MomentState.from_atoms(feats[[r]], seg[[r]]) for r in rows])
        sub = MomentState.from_atoms(feats[rows], seg[rows])
        assert_states_close(one, sub)


def test_merge_identity_disjoint_and_errors():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 3))
    a = MomentState.from_atoms(x[:10], np.zeros(10, int))
    b = MomentState.from_atoms(x[10:], np.ones(20, int))
    e = MomentState.empty(3)
    assert merge(a, e) is a and merge(e, a) is a
    ab = merge(b, a)
    np.testing.assert_array_equal(ab.ids, [0, 1])
    np.testing.assert_array_equal(ab.M[0], a.M[0])
    np.testing.assert_array_equal(ab.M[1], b.M[0])
    with pytest.raises(ValueError, match="order"):
        merge(a, MomentState.from_atoms(x, np.zeros(30, int), order=4))
    with pytest.raises(ValueError, match="width"):
        merge(a, MomentState.from_atoms(x[:, :2], np.zeros(30, int)))
    r = MomentState.from_arrays(ab.to_arrays())
    np.testing.assert_array_equal(r.M, ab.M)
    assert r.order == ab.order


# --------------------------------------------------------------------------------------------
# numerical stability: a large offset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-2])
def test_large_offset_column(scale):
    rng = np.random.default_rng(5)
    sizes = rng.integers(20, 41, size=40)
    seg = np.repeat(np.arange(40), sizes)
    noise = np.column_stack(
        [rng.gamma(2.0, size=len(seg)), rng.normal(size=len(seg)), rng.exponential(size=len(seg))]
    ) * scale
    x = 1e6 + noise
    centred = x - 1e6  # exact (Sterbenz): the same data, without the offset
    state = MomentState.from_atoms(x, seg)
    k = state.cumulants()
    # merged from chunks, the offset must not hurt either
    half = np.random.default_rng(6).random(len(seg)) < 0.5
    merged = merge(MomentState.from_atoms(x[half], seg[half]),
                   MomentState.from_atoms(x[~half], seg[~half])).cumulants()
    naive_worst = 0.0
    for s in range(40):
        xs = centred[seg == s]
        sigma = np.std(xs, axis=0)
        kr = ref_cumulants(xs)
        kr[0] += 1e6
        assert_cumulants_close(k[s], kr, sigma, what=f"offset, structure {s}")
        assert_cumulants_close(merged[s], kr, sigma, what=f"offset merged, structure {s}")
        kn = naive_cumulants(x[seg == s])
        naive_worst = max(naive_worst, np.max(np.abs(kn[1] - kr[1]) / sigma**2))
    # the same tolerance rejects naive power sums by many orders of magnitude
    assert naive_worst > 1e3 * 1e-9


# --------------------------------------------------------------------------------------------
# the cumulant formulas themselves (k7, k8 included), checked independently
# --------------------------------------------------------------------------------------------


def exact_cumulants(values, order=ORDER):
    """Exact cumulants of the empirical distribution (Fractions): raw moments m'_p and the
    recursion kappa_n = m'_n - sum_{m=1}^{n-1} C(n-1, m-1) kappa_m m'_{n-m}."""
    xs = [Fraction(v) for v in values]
    n = len(xs)
    raw = [Fraction(1)] + [sum(v**p for v in xs) / n for p in range(1, order + 1)]
    kappa = [None]
    for q in range(1, order + 1):
        kappa.append(raw[q] - sum(comb(q - 1, m - 1) * kappa[m] * raw[q - m] for m in range(1, q)))
    return kappa[1:]


def term_size(mu, q):
    """Sum of the absolute values of the terms of the formula for k_q (mu[p - 1] = mu_p)."""
    m = {p: abs(mu[p - 1]) for p in range(2, q + 1)}
    terms = {
        2: [m[2]],
        3: [m.get(3)],
        4: [m.get(4), 3 * m[2] ** 2],
        5: [m.get(5), 10 * m.get(3, 0) * m[2]],
        6: [m.get(6), 15 * m.get(4, 0) * m[2], 10 * m.get(3, 0) ** 2, 30 * m[2] ** 3],
        7: [m.get(7), 21 * m.get(5, 0) * m[2], 35 * m.get(4, 0) * m.get(3, 0),
            210 * m.get(3, 0) * m[2] ** 2],
        8: [m.get(8), 28 * m.get(6, 0) * m[2], 56 * m.get(5, 0) * m.get(3, 0),
            35 * m.get(4, 0) ** 2, 420 * m.get(4, 0) * m[2] ** 2, 560 * m.get(3, 0) ** 2 * m[2],
            630 * m[2] ** 4],
    }  # fmt: skip
    return float(sum(terms[q]))


def test_formulas_against_exact_rational_recursion():
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(2, 30))
        # dyadic values: exact in float64; skewed and shifted
        x = (rng.integers(-8, 40, size=(n, 3)) + rng.integers(0, 4, size=(n, 3)) / 4.0)
        x[:, 1] = x[:, 1] ** 2 / 8.0
        x[:, 2] += 1000.0
        k = MomentState.from_atoms(x, np.zeros(n, int)).cumulants()[0]
        for j in range(3):
            kex = exact_cumulants(x[:, j])
            sigma = float(np.std(x[:, j]))
            for q in range(1, ORDER + 1):
                scale = max(abs(float(kex[0])), sigma) if q == 1 else sigma**q
                assert abs(k[q - 1, j] - float(kex[q - 1])) <= 1e-12 * scale, (trial, j, q)
                if q >= 4:  # tighter where the formula does not cancel
                    mu = MomentState.from_atoms(x[:, [j]], np.zeros(n, int)).central_moments()
                    tol = 1e-13 * (term_size(mu[0, :, 0], q) + sigma**q)
                    assert abs(k[q - 1, j] - float(kex[q - 1])) <= tol, (trial, j, q)
            # and the formula alone, fed exact central moments (rounded to float64): the error
            # is rounding relative to the size of the formula's terms
            m = Fraction(sum(Fraction(v) for v in x[:, j])) / n
            mu = [float(m)] + [
                float(sum((Fraction(v) - m) ** p for v in x[:, j]) / n) for p in range(2, ORDER + 1)
            ]
            kf = cm.cumulants_from_central_moments(np.array(mu)[:, None])[:, 0]
            for q in range(2, ORDER + 1):
                tol = 1e-14 * term_size(mu, q)
                assert abs(kf[q - 1] - float(kex[q - 1])) <= tol, (trial, j, q)


def test_formulas_against_log_mgf():
    """kappa_n = n! [t^n] log E exp(t x), the Taylor coefficient taken by a Cauchy integral
    (FFT over a circle |t| = r inside the disc where the empirical MGF has no zero)."""
    rng = np.random.default_rng(8)
    N = 256
    theta = 2 * np.pi * np.arange(N) / N
    for trial in range(10):
        n = int(rng.integers(5, 40))
        x = rng.gamma(0.5 + trial / 4, size=n)
        k = MomentState.from_atoms(x[:, None], np.zeros(n, int)).cumulants()[0, :, 0]
        sigma = x.std()
        z = (x - x.mean()) / sigma
        r = 1.0 / np.abs(z).max()  # |E exp(tz) - 1| < 1 on the circle: the log is analytic
        t = r * np.exp(1j * theta)
        K = np.log(np.mean(np.exp(np.outer(t, z)), axis=1))
        coef = np.fft.fft(K) / N  # coef[q] = c_q r^q
        for q in range(2, ORDER + 1):
            kappa_z = factorial(q) * coef[q].real / r**q
            assert abs(kappa_z * sigma**q - k[q - 1]) <= 1e-6 * sigma**q, (trial, q)
        assert abs(k[0] - x.mean()) <= 1e-14 * abs(x.mean())


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------


def test_single_atom_structures():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(5, 4)) * 1e3 + 0.1
    seg = np.array([0, 1, 1, 2, 3])  # 0, 2, 3 are single atoms
    st = MomentState.from_atoms(x, seg)
    k = st.cumulants()
    X = st.structure_features()
    assert np.isfinite(k).all() and np.isfinite(X).all()
    for s, row in ((0, 0), (2, 3), (3, 4)):
        np.testing.assert_array_equal(k[s, 0], x[row])
        np.testing.assert_array_equal(k[s, 1:], 0.0)
        np.testing.assert_array_equal(X[s, 4:], 0.0)
    assert (k[1, 1] > 0).all()


def test_constant_columns_are_exactly_zero():
    n = 3
    x = np.column_stack([np.full(n, 0.1), np.full(n, 1e6 + 0.1), [1.0, 2.0, 4.0]])
    assert np.sum(x[:, 0]) / n != 0.1  # the naive mean is not exact: the test can fail
    st = MomentState.from_atoms(x, np.zeros(n, int))
    np.testing.assert_array_equal(st.mean[0, :2], [0.1, 1e6 + 0.1])
    np.testing.assert_array_equal(st.M[0, :, :2], 0.0)
    X = st.structure_features(ORDER).reshape(ORDER, 3)
    np.testing.assert_array_equal(X[1:, :2], 0.0)
    assert (X[1, 2] > 0)
    # many values and sizes, on a large offset too
    rng = np.random.default_rng(11)
    vals = rng.normal(size=300) * 10.0 ** rng.integers(-5, 7, size=300)
    sizes = rng.integers(1, 300, size=300)
    seg = np.repeat(np.arange(300), sizes)
    st = MomentState.from_atoms(np.repeat(vals, sizes)[:, None], seg)
    np.testing.assert_array_equal(st.mean[:, 0], vals)
    np.testing.assert_array_equal(st.M, 0.0)
    np.testing.assert_array_equal(st.structure_features(ORDER)[:, 1:], 0.0)
    # merging constant chunks of the same value stays exactly constant
    m = merge(MomentState.from_atoms(x[:1], [5]), MomentState.from_atoms(x[1:], [5, 5]))
    np.testing.assert_array_equal(m.M[0, :, :2], 0.0)
    np.testing.assert_array_equal(m.mean[0, :2], [0.1, 1e6 + 0.1])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no atoms"):
        MomentState.from_atoms(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(ValueError, match="no atoms"):
        cumulant_features(np.zeros((0, 4)), np.zeros(0, int), order=3)
    with pytest.raises(ValueError, match="no atoms"):
        mean_pooling(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(ValueError, match="one id per row"):
        cumulant_features(np.zeros((3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="2-D"):
        cumulant_features(np.zeros(3), np.zeros(3, int))
    x = np.ones((4, 2))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="segment id 7"):
        cumulant_features(x, [3, 3, 7, 7])
    with pytest.raises(ValueError, match="order"):
        cumulant_features(np.ones((3, 2)), [0, 0, 0], order=9)
    with pytest.raises(ValueError, match="order"):
        MomentState.from_atoms(np.ones((3, 2)), [0, 0, 0], order=4).cumulants(5)


def test_input_is_never_modified():
    """Blocks are transposed copies; a (n, 1) or single-row block must not alias the input."""
    rng = np.random.default_rng(10)
    for x in (rng.normal(size=(30, 1)), rng.normal(size=(1, 5)), rng.normal(size=(30, 4))):
        seg = np.sort(rng.integers(0, 4, size=x.shape[0]))
        keep = x.copy()
        MomentState.from_atoms(x, seg)
        cumulant_features(x, seg, order=8)
        mean_pooling(x, seg)
        np.testing.assert_array_equal(x, keep)
