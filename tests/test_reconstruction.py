"""latentray.method.reconstruction against scikit-matter (the reference implementation)."""

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import skmatter.metrics as skm
from skmatter.linear_model import Ridge2FoldCV
from skmatter.preprocessing import StandardFlexibleScaler
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

import latentray.method.reconstruction as lr

TOL = dict(rtol=1e-8, atol=1e-8)
SEED = 0x5F3759DF


def _skm_ridge(**kw):
    params = dict(
        alphas=np.geomspace(1e-9, 0.9, 20),
        alpha_type="relative",
        regularization_method="cutoff",
        random_state=SEED,
        shuffle=True,
        scoring="neg_root_mean_squared_error",
    )
    params.update(kw)
    return Ridge2FoldCV(**params)


def _silu(z):
    return z / (1 + np.exp(-z))


def _latent(rng, base, width, n_dead=2, n_dup=3):
    """Network-like features: SiLU of a random projection, dead (constant), duplicated columns."""
    H = _silu(base @ rng.standard_normal((base.shape[1], width)) * rng.uniform(0.1, 3, width))
    H[:, :n_dead] = 1.5
    return np.hstack([H, H[:, n_dead : n_dead + n_dup]])


def _pad_columns(Y, width):
    return np.hstack([Y, np.zeros((len(Y), width - Y.shape[1]))])


def _cases():
    """(name, X, Y): random and real-shaped pairs, X narrower and wider than Y."""
    rng = np.random.default_rng(0)
    n = 240
    out = []
    X = rng.standard_normal((n, 12))
    Y = np.tanh(X @ rng.standard_normal((12, 20)) / 3) + 0.1 * rng.standard_normal((n, 20))
    out.append(("random_narrow_x", X, Y))
    out.append(("random_wide_x", Y, X))
    base = rng.standard_normal((n, 5))
    A, B = _latent(rng, base, 25), _latent(rng, base, 14)
    B = B + 0.05 * rng.standard_normal(B.shape) * B.std(axis=0)
    out.append(("latent_wide_x", A, B))  # constant and duplicated columns on both sides
    out.append(("latent_narrow_x", B, A))
    C = rng.standard_normal((n, 8))
    out.append(("rank_deficient_x", np.hstack([C, C, C[:, :3] @ rng.standard_normal((3, 4))]),
                np.sin(C[:, :6]) + 0.1 * rng.standard_normal((n, 6))))
    out.append(("x_is_y_twice", np.hstack([B, B]), B))  # perfect reconstruction
    return out


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]


def _index_modes(n, rng):
    perm = rng.permutation(n)
    return {
        "explicit": dict(train_idx=perm[: n - 50], test_idx=perm[n - 50 :]),  # unsorted train
        "none": dict(),
        "train_only": dict(train_idx=perm[:170]),
        "test_only": dict(test_idx=np.sort(perm[:60])),
    }


@pytest.mark.parametrize("mode", ["explicit", "none", "train_only", "test_only"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_global_error_and_distortion_match_skmatter(case, mode):
    _, X, Y = case
    kw = _index_modes(len(X), np.random.default_rng(1))[mode]
    ref = skm.pointwise_global_reconstruction_error(X, Y, **kw)
    got = lr.pointwise_global_reconstruction_error(X, Y, **kw)
    np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_allclose(
        lr.global_reconstruction_error(X, Y, **kw),
        skm.global_reconstruction_error(X, Y, **kw),
        **TOL,
    )
    # skmatter's GFRD only works for dy >= dx; otherwise compare with Y padded by zero columns
    Y_skm = Y if Y.shape[1] >= X.shape[1] else _pad_columns(Y, X.shape[1])
    np.testing.assert_allclose(
        lr.pointwise_global_reconstruction_distortion(X, Y, **kw),
        skm.pointwise_global_reconstruction_distortion(X, Y_skm, **kw),
        **TOL,
    )
    np.testing.assert_allclose(
        lr.global_reconstruction_distortion(X, Y, **kw),
        skm.global_reconstruction_distortion(X, Y_skm, **kw),
        **TOL,
    )


@pytest.mark.parametrize("kind", ["latent", "rank_deficient", "x_is_y_twice"])
def test_global_error_on_folds_of_thousands_of_rows_matches_skmatter(kind):
    """Folds of ~5,000 rows go through the blocked QR (RunningQR, ?tpqrt); the same numbers as
    skmatter's SVDs of the folds (real-shaped latents: dead and duplicated columns)."""
    rng = np.random.default_rng(5)
    n = 10_500
    base = rng.standard_normal((n, 6))
    A, B = _latent(rng, base, 40), _latent(rng, base, 24)
    B = B + 0.05 * rng.standard_normal(B.shape) * B.std(axis=0)
    X, Y = {"latent": (A, B), "rank_deficient": (np.hstack([B, B[:, :5] * 2]), A),
            "x_is_y_twice": (np.hstack([B, B]), B)}[kind]
    perm = rng.permutation(n)
    kw = dict(train_idx=perm[:-400], test_idx=perm[-400:])
    np.testing.assert_allclose(lr.pointwise_global_reconstruction_error(X, Y, **kw),
                               skm.pointwise_global_reconstruction_error(X, Y, **kw), **TOL)
    np.testing.assert_allclose(lr.pointwise_global_reconstruction_distortion(X, Y, **kw),
                               skm.pointwise_global_reconstruction_distortion(
                                   X, _pad_columns(Y, max(X.shape[1], Y.shape[1])), **kw),
                               **TOL)


@pytest.mark.parametrize("mode", ["explicit", "none", "test_only"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_local_error_matches_skmatter(case, mode):
    _, X, Y = case
    rng = np.random.default_rng(2)
    kw = _index_modes(len(X), rng)[mode]
    if mode == "none":  # keep skmatter's per-row loop short: only the test rows matter
        kw = dict(test_idx=rng.permutation(len(X))[:40])
    k = min(X.shape[1], Y.shape[1])
    ref = skm.pointwise_local_reconstruction_error(X, Y, k, **kw)
    got = lr.pointwise_local_reconstruction_error(X, Y, k, **kw)
    np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_allclose(
        lr.local_reconstruction_error(X, Y, k, **kw),
        np.linalg.norm(ref) / np.sqrt(len(ref)),
        **TOL,
    )


def test_local_error_none_indices_matches_skmatter():
    _, X, Y = CASES[0]
    X, Y = X[:90], Y[:90]  # skmatter's 50/50 split: 45 test rows
    np.testing.assert_allclose(
        lr.local_reconstruction_error(X, Y, 9), skm.local_reconstruction_error(X, Y, 9), **TOL
    )


@pytest.mark.parametrize("k", [3, 7, 60])  # 60 > the 40 train rows: skmatter uses all of them
def test_local_error_odd_and_oversized_neighbourhoods(k):
    _, X, Y = CASES[2]
    X, Y = X[:70], Y[:70]
    kw = dict(train_idx=np.arange(40)[::-1], test_idx=np.arange(40, 70))
    np.testing.assert_allclose(
        lr.pointwise_local_reconstruction_error(X, Y, k, **kw),
        skm.pointwise_local_reconstruction_error(X, Y, k, **kw),
        **TOL,
    )


def test_local_error_with_duplicated_rows_matches_skmatter():
    _, X, Y = CASES[3]
    X = np.vstack([X, X[:40]])  # identical atoms: exactly tied neighbours with identical targets
    Y = np.vstack([Y, Y[:40]])
    kw = dict(test_idx=np.arange(0, len(X), 9))
    k = min(X.shape[1], Y.shape[1])
    np.testing.assert_allclose(
        lr.pointwise_local_reconstruction_error(X, Y, k, **kw),
        skm.pointwise_local_reconstruction_error(X, Y, k, **kw),
        **TOL,
    )


def test_local_n_jobs_gives_the_same_values():
    _, X, Y = CASES[0]
    kw = dict(test_idx=np.arange(0, len(X), 4))
    a = lr.pointwise_local_reconstruction_error(X, Y, 12, **kw)
    b = lr.pointwise_local_reconstruction_error(X, Y, 12, n_jobs=2, **kw)
    np.testing.assert_array_equal(a, b)


def test_one_source_serves_many_targets_as_one_at_a_time():
    """One neighbour search and one set of local factorizations of the source for several
    targets of other widths (so other k): each target's errors equal skmatter's (1e-8) and a
    fit per test row, ``cutoff_ridge_2fold_cv`` on its centred neighbourhood (1e-10); a
    target with k > dx (no sharing possible) too."""
    _, X, B = CASES[2]  # dx = 28
    targets = [B, CASES[4][2], X, np.hstack([X, B]), B]  # dy = 17, 6, 28, 45, 17
    ks = [min(X.shape[1], Y.shape[1]) for Y in targets[:-1]] + [40]  # the last: k > dx
    test = np.arange(0, len(X), 6)
    train = np.setdiff1d(np.arange(len(X)), test)[::-1]  # an unsorted train order
    got = lr.pointwise_local_reconstruction_errors(X, targets, ks, test_idx=test,
                                                   train_idx=train)
    scaler = StandardFlexibleScaler(column_wise=False)
    Xs = scaler.fit(X[train]).transform(X)
    for Y, k, errors in zip(targets, ks, got):
        np.testing.assert_allclose(
            errors, skm.pointwise_local_reconstruction_error(X, Y, k, test_idx=test,
                                                             train_idx=train), **TOL)
        Ys = scaler.fit(Y[train]).transform(Y)
        neighbours = np.argsort(
            scipy.spatial.distance.cdist(Xs[test], Xs[train], "sqeuclidean"), kind="stable",
            axis=1)[:, :k]
        by_row = []
        for i, idx in zip(test, neighbours):
            LX, LY = Xs[train][idx], Ys[train][idx]
            W, _ = lr.cutoff_ridge_2fold_cv(LX - LX.mean(0), LY - LY.mean(0))
            by_row.append(np.linalg.norm(Ys[i] - LY.mean(0) - (Xs[i] - LX.mean(0)) @ W))
        np.testing.assert_allclose(errors, by_row, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="2 targets but 1 values"):
        lr.pointwise_local_reconstruction_errors(X, targets[:2], [3], test_idx=test)


def test_cv_selects_a_nontrivial_cutoff_like_skmatter():
    # few rows, many weakly informative columns, noisy target: truncation wins the CV
    rng = np.random.default_rng(5)
    n, d = 90, 60
    X = rng.standard_normal((n, d)) * np.geomspace(1, 1e-3, d)
    Y = X[:, :4] @ rng.standard_normal((4, 7)) + 0.3 * rng.standard_normal((n, 7))
    ref = _skm_ridge().fit(X, Y)
    assert ref.alpha_ > 1e-9  # the test exercises the selection, not the first alpha
    W, alpha = lr.cutoff_ridge_2fold_cv(X, Y)
    assert alpha == ref.alpha_
    np.testing.assert_allclose(W, ref.coef_.T, **TOL)
    kw = dict(test_idx=np.arange(0, n, 3))
    np.testing.assert_allclose(
        lr.global_reconstruction_error(X, Y, **kw),
        skm.global_reconstruction_error(X, Y, **kw),
        **TOL,
    )


def test_train_row_order_sets_the_folds_like_skmatter():
    # the 2-fold CV cuts the train rows *in the order given*: a permuted train_idx can change
    # the chosen cutoff, in skmatter and here alike
    rng = np.random.default_rng(5)
    n, d = 90, 60
    X = rng.standard_normal((n, d)) * np.geomspace(1, 1e-3, d)
    Y = X[:, :4] @ rng.standard_normal((4, 7)) + 0.3 * rng.standard_normal((n, 7))
    perm = rng.permutation(n)
    assert _skm_ridge().fit(X[perm], Y[perm]).alpha_ != _skm_ridge().fit(X, Y).alpha_
    test = np.array([3, 40, 77])
    train = np.setdiff1d(np.arange(n), test)
    shuffled = rng.permutation(train)
    values = []
    for tr in (train, shuffled):
        ref = skm.global_reconstruction_error(X, Y, test_idx=test, train_idx=tr)
        got = lr.global_reconstruction_error(X, Y, test_idx=test, train_idx=tr)
        np.testing.assert_allclose(got, ref, **TOL)
        values.append(got)
    assert abs(values[0] - values[1]) > 1e-6


def test_tiny_singular_values_below_eps_guard_like_skmatter():
    # unscaled input where a singular value lies between alpha * s_max and max(n, d) * eps:
    # skmatter's CV ignores it (so every alpha ties and the first wins), its final fit keeps it
    rng = np.random.default_rng(0)
    n = 200
    u = rng.standard_normal((n, 2))
    X = np.column_stack([3e-7 * u[:, 0], 1e-15 * u[:, 1]])
    Y = np.column_stack([u[:, 0] + 0.1 * rng.standard_normal(n), rng.standard_normal(n)])
    s = np.linalg.svd(X, compute_uv=False)
    assert 1e-9 * s[0] < s[1] < n * np.finfo(float).eps
    ref = _skm_ridge().fit(X, Y)
    W, alpha = lr.cutoff_ridge_2fold_cv(X, Y)
    assert alpha == ref.alpha_ == 1e-9
    np.testing.assert_allclose(X @ W, ref.predict(X), **TOL)
    np.testing.assert_allclose(W, ref.coef_.T, rtol=1e-8)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(random_state=11),
        dict(shuffle=False, random_state=None),
        dict(alphas=np.array([1e-6, 1e-3, 0.05, 0.2, 0.5])),
    ],
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cutoff_ridge_matches_ridge2foldcv(case, kw):
    _, X, Y = case
    ref = _skm_ridge(**kw).fit(X, Y)
    W, alpha = lr.cutoff_ridge_2fold_cv(X, Y, **kw)
    assert alpha == ref.alpha_
    np.testing.assert_allclose(X @ W, ref.predict(X), **TOL)
    if case[0] not in ("rank_deficient_x", "x_is_y_twice"):  # W itself is unique only at full rank
        np.testing.assert_allclose(W, ref.coef_.T, **TOL)


def test_default_fit_is_one_pseudo_inverse_with_the_chosen_cutoff():
    # independent of skmatter: W is pinv(X) Y with singular values below alpha * s_max dropped
    _, X, Y = CASES[2]
    W, alpha = lr.cutoff_ridge_2fold_cv(X, Y)
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    fold1, fold2 = lr._two_folds(len(X), SEED, True)
    s_max = max(np.linalg.norm(X[fold1], 2), np.linalg.norm(X[fold2], 2))
    keep = s > alpha * s_max
    W_ref = Vt[keep].T @ ((U[:, keep].T @ Y) / s[keep, None])
    np.testing.assert_allclose(X @ W, X @ W_ref, **TOL)


@pytest.mark.parametrize("dy", [1, 5])
def test_distortion_with_narrow_y(dy):
    _, X, Y = CASES[2]
    Y = Y[:, -dy:]  # the first columns are dead (constant)
    assert Y.shape[1] < X.shape[1]
    kw = dict(test_idx=np.arange(0, len(X), 5))
    if dy > 1:  # skmatter pads only one way and fails to broadcast
        with pytest.raises(ValueError):
            skm.global_reconstruction_distortion(X, Y, **kw)
    got = lr.pointwise_global_reconstruction_distortion(X, Y, **kw)

    # independent computation: skmatter's scaler and fit, scipy's Procrustes on zero-padded data
    test = kw["test_idx"]
    train = np.setdiff1d(np.arange(len(X)), test)
    sx = StandardFlexibleScaler().fit(X[train])
    sy = StandardFlexibleScaler().fit(Y[train])
    Xtr, Xte = sx.transform(X[train]), sx.transform(X[test])
    fit = _skm_ridge().fit(Xtr, sy.transform(Y[train]))
    m = X.shape[1]
    Q, _ = scipy.linalg.orthogonal_procrustes(Xtr, _pad_columns(fit.predict(Xtr), m))
    ref = np.linalg.norm(_pad_columns(fit.predict(Xte), m) - Xte @ Q, axis=1)
    np.testing.assert_allclose(got, ref, **TOL)
    assert np.all(got > 1e-3)
    # and skmatter's own value on Y padded with zero columns
    np.testing.assert_allclose(
        got, skm.pointwise_global_reconstruction_distortion(X, _pad_columns(Y, m), **kw), **TOL
    )


def test_distortion_is_zero_for_an_orthogonal_map():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((200, 6))
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    Y = X @ Q
    assert lr.global_reconstruction_distortion(X, Y) < 1e-10
    assert lr.global_reconstruction_error(X, Y) < 1e-10
    # a strongly anisotropic linear map is reconstructed exactly but is distorted
    Y2 = X * np.array([10, 1, 1, 1, 1, 0.1])
    assert lr.global_reconstruction_error(X, Y2) < 1e-10
    assert lr.global_reconstruction_distortion(X, Y2) > 0.1


def test_user_estimator_and_scaler_match_skmatter():
    _, X, Y = CASES[0]
    kw = dict(test_idx=np.arange(0, len(X), 6))
    for name in (
        "global_reconstruction_error",
        "pointwise_global_reconstruction_error",
        "global_reconstruction_distortion",
        "pointwise_global_reconstruction_distortion",
    ):
        got, ref = (
            getattr(mod, name)(
                X, Y, scaler=StandardScaler(), estimator=Ridge(1e-2, fit_intercept=False), **kw
            )
            for mod in (lr, skm)
        )
        np.testing.assert_allclose(got, ref, **TOL)
    for n_jobs in (None, 2):
        got = lr.pointwise_local_reconstruction_error(
            X, Y, 10, estimator=Ridge(alpha=1e-3), n_jobs=n_jobs, **kw
        )
        ref = skm.pointwise_local_reconstruction_error(X, Y, 10, estimator=Ridge(alpha=1e-3), **kw)
        np.testing.assert_allclose(got, ref, **TOL)
    # the user estimator is really used: a strong ridge changes the answer
    strong = lr.global_reconstruction_error(
        X, Y, estimator=Ridge(alpha=1e3, fit_intercept=False), **kw
    )
    assert strong > lr.global_reconstruction_error(X, Y, **kw) + 0.05


def test_float32_input_is_computed_in_float64():
    _, X, Y = CASES[2]
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    kw = dict(test_idx=np.arange(0, len(X), 4))
    ref = lr.global_reconstruction_error(X32.astype(np.float64), Y32.astype(np.float64), **kw)
    got = lr.global_reconstruction_error(X32, Y32, **kw)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-14)
    X64, Y64 = X32.astype(np.float64), Y32.astype(np.float64)
    np.testing.assert_allclose(ref, skm.global_reconstruction_error(X64, Y64, **kw), **TOL)


def test_errors():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    with pytest.raises(ValueError, match="First dimension"):
        lr.global_reconstruction_error(X, Y[:10])
    with pytest.raises(ValueError, match="zero variance"):
        lr.global_reconstruction_error(np.ones((20, 3)), Y)
    with pytest.raises(ValueError, match="zero variance"):
        lr.global_reconstruction_distortion(X, np.zeros((20, 2)))
    with pytest.raises(ValueError, match="n_local_points"):
        lr.local_reconstruction_error(X, Y, 21)
    with pytest.raises(ValueError, match="NaN"):
        lr.global_reconstruction_error(np.where(X > 1.5, np.nan, X), Y)
    with pytest.raises(ValueError, match="2-D"):
        lr.global_reconstruction_error(X, Y[:, 0])


def test_pointwise_error_takes_train_before_test_like_skmatter():
    _, X, Y = CASES[0]
    a, b = np.arange(0, 200), np.arange(200, 240)
    got = lr.pointwise_global_reconstruction_error(X, Y, a, b)
    assert got.shape == (40,)
    np.testing.assert_allclose(got, skm.pointwise_global_reconstruction_error(X, Y, a, b), **TOL)
    got = lr.pointwise_global_reconstruction_distortion(X, Y, b, a)  # test first here
    assert got.shape == (40,)


def test_nearest_train_rows():
    rng = np.random.default_rng(6)
    Xtr = rng.standard_normal((300, 5))
    Xq = rng.standard_normal((17, 5))
    got = lr._nearest_train_rows(Xtr, Xq, 8)
    exact = ((Xq[:, None, :] - Xtr[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(got, np.argsort(exact, axis=1, kind="stable")[:, :8])
    # exact ties are ordered by train position
    dup = np.vstack([Xtr, Xtr[[5, 5, 9]]])
    got = lr._nearest_train_rows(dup, Xtr[[5, 9]], 3)
    np.testing.assert_array_equal(got[0], [5, 300, 301])
    np.testing.assert_array_equal(got[1][:2], [9, 302])


def test_merged_r_factors_keep_the_gram_matrix_and_singular_values():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((1000, 9)) @ rng.standard_normal((9, 9))
    R = lr.merge_r_factors(np.linalg.qr(A[i : i + 130], mode="r") for i in range(0, 1000, 130))
    assert R.shape == (9, 9)
    np.testing.assert_allclose(R.T @ R, A.T @ A, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(
        np.linalg.svd(R, compute_uv=False), np.linalg.svd(A, compute_uv=False), rtol=1e-12
    )


@pytest.mark.parametrize("chunks", [[6000], [40, 30, 3000, 1, 2000, 2500], [10, 20]])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_running_qr_is_the_r_factor_of_every_row_added(chunks, rank_deficient):
    """RunningQR (LAPACK's ?tpqrt, block by block, from the chunks as they come) against
    LAPACK's one Householder QR of all rows: R^T R = A^T A, A's singular values (six decades),
    the same R up to its rows' signs; a dead and a duplicated column; fewer than 2 p rows are
    kept as they are."""
    rng = np.random.default_rng(3)
    p = 40
    Q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    A = rng.standard_normal((sum(chunks), p)) @ ((10.0 ** -np.linspace(0, 6, p))[:, None] * Q) + 5
    if rank_deficient:
        A[:, 7], A[:, 9] = 0.0, A[:, 3]
    running = lr.RunningQR(p)
    for part in np.split(A, np.cumsum(chunks)[:-1]):
        running.add(part)
    R = running.r()
    assert running.n == len(A)
    if len(A) < 2 * p:
        np.testing.assert_array_equal(R, A)
        return
    assert R.shape == (p, p)
    np.testing.assert_array_equal(np.tril(R, -1), 0)
    gram = A.T @ A
    np.testing.assert_allclose(R.T @ R, gram, rtol=1e-12, atol=1e-12 * np.abs(gram).max())
    s, s0 = (np.linalg.svd(M, compute_uv=False) for M in (R, A))
    np.testing.assert_allclose(s, s0, rtol=1e-9, atol=1e-13 * s0[0])
    if not rank_deficient:  # R is unique up to the signs of its rows
        R0 = np.linalg.qr(A, mode="r")
        np.testing.assert_allclose(np.abs(R), np.abs(R0), rtol=1e-9, atol=1e-13 * s0[0])


@pytest.mark.parametrize("chunks", [[6000], [40, 30, 3000, 1, 2000, 2500], [10, 20], [2048, 4097]])
def test_running_qr_filled_in_place_equals_adding_the_rows_to_the_last_bit(chunks):
    """``add_filled`` (each block written in place, Fortran order, never the whole chunk) gives
    the R of ``add`` of the same chunks exactly: the same blocks, the same values."""
    rng = np.random.default_rng(5)
    p = 40
    A = rng.standard_normal((sum(chunks), p)) * 10.0 ** -np.linspace(0, 6, p) + 3
    added, filled = lr.RunningQR(p), lr.RunningQR(p)
    for part in np.split(A, np.cumsum(chunks)[:-1]):
        added.add(part)

        def fill(out, start, stop, part=part):
            assert out.shape == (stop - start, p) and out.dtype == np.float64
            out[:] = part[start:stop]

        filled.add_filled(len(part), fill)
    assert filled.n == added.n == len(A)
    np.testing.assert_array_equal(filled.r(), added.r())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_screened_cv_picks_the_alpha_of_scoring_every_alpha_to_the_last_bit(case):
    """LFRE's local fits score only the alphas whose bounds (from the Gram expansion of the
    residual) can hold the best one: the chosen alpha and its score must be those of
    scoring every alpha, bit for bit, also where the expansion cancels (a target that is an
    exact linear map of the source, plus one with noise at 1e-9), with ties between alphas
    that keep the same components, and with constant and duplicated columns."""
    _, X, Y = case
    rng = np.random.default_rng(3)
    Xs = (X - X.mean(0)) / np.sqrt(X.var(0).sum())
    targets = [Y, Xs @ rng.standard_normal((X.shape[1], 7)),
               Xs[:, ::-1] + 1e-9 * rng.standard_normal(Xs.shape)]
    k = min(X.shape[1], 16)
    fold1, fold2 = lr._two_folds(k, SEED, True)
    idx = np.stack([rng.choice(len(X), k, replace=False) for _ in range(40)])  # (B, k)
    LX = Xs[idx] - Xs[idx].mean(axis=1)[:, None]
    R1x, R2x = LX[:, fold1], LX[:, fold2]
    cv = lr._CutoffCV.of(R1x, R2x, np.concatenate([R1x, R2x], axis=1), len(fold1),
                         len(fold2), max(k, X.shape[1]) * np.finfo(float).eps, lr.DEFAULT_ALPHAS)
    screened_any = False
    for T in targets:
        LY = T[idx] - T[idx].mean(axis=1)[:, None]
        R1y, R2y = LY[:, fold1], LY[:, fold2]
        every, best = cv._select(R1y, R2y)
        some, best_screened = cv._select(R1y, R2y, screened=True)
        np.testing.assert_array_equal(best_screened, best)
        rows = np.arange(len(best))
        np.testing.assert_array_equal(some[rows, best], every[rows, best])
        scored = np.isfinite(some)
        np.testing.assert_array_equal(some[scored], every[scored])
        screened_any |= bool((~scored).any())
    assert screened_any  # the screening ruled some alphas out: the test can see a wrong bound


def test_one_source_global_errors_equal_one_target_at_a_time_to_the_last_bit():
    """GFRE and GFRD of one source against several targets (one scaling of the source, one
    fit per target for both measures) equal the one-target functions bit for bit."""
    _, X, B = CASES[2]
    targets = [B, CASES[4][2], X, np.hstack([X, B])]
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(X))
    kw = dict(train_idx=perm[:170], test_idx=perm[170:])
    got = lr.pointwise_global_reconstruction_errors(X, targets, **kw)
    for Y, errors in zip(targets, got):
        np.testing.assert_array_equal(errors["gfre"],
                                      lr.pointwise_global_reconstruction_error(X, Y, **kw))
        np.testing.assert_array_equal(errors["gfrd"],
                                      lr.pointwise_global_reconstruction_distortion(X, Y, **kw))
    only = lr.pointwise_global_reconstruction_errors(X, targets[:1], metrics=("gfrd",), **kw)
    assert list(only[0]) == ["gfrd"]
