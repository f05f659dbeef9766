"""Feature reconstruction measures: GFRE, GFRD and LFRE (Goscinski et al., 2021).

In-memory versions that give the numbers of ``skmatter.metrics`` (scikit-matter 0.4.1) with the
same names, signatures and defaults, to about 1e-8 for float64 input, but compute the default fit
from R factors instead of one regression per regularisation strength. Notation: ``X`` (source,
``n x dx``) reconstructs ``Y`` (target, ``n x dy``); ``train``/``test`` are row indices.

Default recipe (what skmatter does when ``scaler`` and ``estimator`` are ``None``):

* **split**: if both ``train_idx`` and ``test_idx`` are ``None``, a 50/50 random split,
  ``sklearn.model_selection.train_test_split(arange(n), test_size=0.5, train_size=0.5,
  random_state=0x5F3759DF, shuffle=True)`` (train rows in that shuffled order); if only one is
  given, the other is its sorted complement. The *order* of ``train_idx`` matters: it sets the
  cross-validation folds below.
* **scale** (skmatter's ``StandardFlexibleScaler``, ``column_wise=False``), fitted on the train
  rows of ``X`` and of ``Y`` separately: ``x -> (x - mean_train) / sqrt(sum_j var_train_j)``
  (population variances); a matrix whose summed variance is below 1e-12 is refused.
* **fit** (skmatter's ``Ridge2FoldCV(alphas=geomspace(1e-9, 0.9, 20), alpha_type="relative",
  regularization_method="cutoff", random_state=0x5F3759DF, shuffle=True,
  scoring="neg_root_mean_squared_error")``), no intercept: the train rows are cut into two folds
  by ``KFold(2, shuffle=True, random_state=0x5F3759DF)``; for each fold ``f`` with SVD
  ``X_f = U S V^T``, ``W_f(a) = V_k S_k^-1 U_k^T Y_f`` keeps the ``k`` singular values with
  ``s > a * s_max`` (``s_max``: the larger top singular value of the two folds) and
  ``s > max(n_train, dx) * eps``; the score of ``a`` is the mean over the two directions of
  ``-mean_j sqrt(mean_i (Y_g - X_g W_f(a))_ij^2)`` (per-column RMSE averaged over columns); the
  first best ``a`` wins and the final ``W`` is the same cutoff pseudo-inverse of all train rows
  with ``s > a * s_max`` (skmatter's final fit has no ``eps`` guard: ``len(s > rcond)``).

How it is computed here: each fold is reduced to the R factor of the augmented matrix
``[X_f | Y_f] = Q [R_x | R_y]`` (a Householder QR, block by block: each block of rows folded
into the running R by LAPACK's triangular-pentagonal QR; partial factors merge by stacking and
re-factorising). Everything the fit needs follows from the R
factors: ``X_f = (Q U) S V^T`` with ``R_x = U S V^T``; ``U_X^T Y_f = U^T R_y``; and the residual
of a weight ``W`` on fold ``g`` has column norms ``||R_y,g - R_x,g W||``. So the whole alpha grid
costs one small SVD per fold, the two folds' R factors merge into the factor of all train rows,
and a distributed version only has to ship ``(dx + dy)^2`` numbers per shard.

Measures (``x_i``, ``y_i``: scaled test rows; ``W``: the fit above):

* GFRE: ``sqrt(mean_i ||y_i - x_i W||^2)``; pointwise: ``||y_i - x_i W||``.
* GFRD: ``Q`` solves the orthogonal Procrustes problem between the train rows of ``X`` and of
  ``X W``, both zero-padded to ``m = max(dx, dy)`` columns (``Q = U V^T`` from the SVD of
  ``X_pad^T (X W)_pad``); pointwise: ``||pad(x_i W) - pad(x_i) Q||``; GFRD: their RMS.
* LFRE: for each test row, its ``k`` nearest train rows in scaled ``X`` (Euclidean), centred on
  their means ``xbar, ybar``; the same 2-fold cutoff fit ``W_i`` on those ``k`` rows; pointwise
  ``||y_i - ybar - (x_i - xbar) W_i||``; LFRE: their RMS.

Departures from skmatter, on purpose:

* the default path always computes in float64 (skmatter keeps float32 input in float32, with a
  float32 ``eps`` in its cutoff guard);
* GFRD pads *both* sides to the larger width, so it works for any ``dx, dy``; skmatter pads only
  ``X W`` against ``X`` and raises when ``dy < dx`` (or, for ``dy == 1``, silently broadcasts).
  Where skmatter works (``dy >= dx``) the two agree; for ``dy < dx`` latentray's value equals
  skmatter's on ``Y`` padded with ``dx - dy`` zero columns;
* LFRE's neighbours: distances are skmatter's own expression ``|a|^2 + |b|^2 - 2 a.b``, but the
  ``k`` nearest are found with a partial sort and *exactly* tied distances are ordered by train
  position (skmatter: numpy's unstable ``argsort``), which can matter only for duplicated
  train rows of ``X`` with different ``Y``;
* LFRE's ``n_jobs``: threads over batches of test rows on the default path (BLAS held to one
  thread meanwhile), joblib over test rows with a user ``estimator``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy.linalg import get_lapack_funcs
from sklearn.model_selection import KFold, train_test_split

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_RANDOM_STATE",
    "cutoff_ridge_2fold_cv",
    "global_reconstruction_distortion",
    "global_reconstruction_error",
    "local_reconstruction_error",
    "merge_r_factors",
    "pointwise_global_reconstruction_distortion",
    "pointwise_global_reconstruction_error",
    "pointwise_global_reconstruction_errors",
    "pointwise_local_reconstruction_error",
    "pointwise_local_reconstruction_errors",
]

#: skmatter's default grid of relative cutoffs.
DEFAULT_ALPHAS = np.geomspace(1e-9, 0.9, 20)
DEFAULT_ALPHAS.setflags(write=False)
#: skmatter's default seed, for the 50/50 split and for the 2-fold CV.
DEFAULT_RANDOM_STATE = 0x5F3759DF
#: skmatter's StandardFlexibleScaler refuses a matrix whose summed variance is below this.
_ZERO_VARIANCE_ATOL = 1e-12
#: Rows per block of the tall-skinny QR (bounds the working memory of the default fit).
_QR_BLOCK_ROWS = 16384
#: Rows per update block, and LAPACK's block size, of :class:`RunningQR` (fastest of
#: 512-8192 rows and 8-128 here, at 321 columns).
_TPQRT_ROWS, _TPQRT_NB = 2048, 32
#: Bound on the number of float64 elements in one block of a batched or chunked computation.
_BLOCK_ELEMENTS = 1 << 23

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------
# inputs, split, scaling


def _as_matrix(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples x features), got shape {arr.shape}")
    return arr


def _finite_float64(a: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _resolve_indices(n: int, train_idx, test_idx) -> tuple[np.ndarray, np.ndarray]:
    """skmatter's rules: both None -> its 50/50 split; one None -> the complement of the other."""
    if train_idx is None and test_idx is None:
        train_idx, test_idx = train_test_split(
            np.arange(n),
            test_size=0.5,
            train_size=0.5,
            random_state=DEFAULT_RANDOM_STATE,
            shuffle=True,
        )
    elif train_idx is None:
        train_idx = np.setdiff1d(np.arange(n), test_idx)
    elif test_idx is None:
        test_idx = np.setdiff1d(np.arange(n), train_idx)
    return np.asarray(train_idx), np.asarray(test_idx)


def _flexible_scale(train: np.ndarray, test: np.ndarray, name: str):
    """Centre on the train means, divide by sqrt(sum of train column variances)."""
    if train.shape[0] < 2:
        raise ValueError(f"{name}: at least 2 training rows are needed to scale")
    mean = train.mean(axis=0)
    var_sum = float(np.mean((train - mean) ** 2, axis=0).sum())
    if var_sum < _ZERO_VARIANCE_ATOL:
        raise ValueError(f"{name}: cannot normalize a matrix with zero variance")
    scale = np.sqrt(var_sum)
    return (train - mean) / scale, (test - mean) / scale


def _check_pair(X, Y):
    X = _as_matrix(X, "X")
    Y = _as_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"First dimension of X ({X.shape[0]}) and Y ({Y.shape[0]}) must match")
    return X, Y


def _prepare(X, Y, train_idx, test_idx, scaler):
    """Split and scale: returns float64 (X_train, X_test, Y_train, Y_test)."""
    X, Y = _check_pair(X, Y)
    train_idx, test_idx = _resolve_indices(X.shape[0], train_idx, test_idx)
    X_train, X_test = X[train_idx], X[test_idx]
    Y_train, Y_test = Y[train_idx], Y[test_idx]
    if scaler is None:
        X_train, X_test = _flexible_scale(
            _finite_float64(X_train, "X"), _finite_float64(X_test, "X"), "X"
        )
        Y_train, Y_test = _flexible_scale(
            _finite_float64(Y_train, "Y"), _finite_float64(Y_test, "Y"), "Y"
        )
    else:  # as skmatter: one scaler object, refitted for Y
        scaler.fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        scaler.fit(Y_train)
        Y_train, Y_test = scaler.transform(Y_train), scaler.transform(Y_test)
        X_train, X_test, Y_train, Y_test = (
            np.asarray(a, dtype=np.float64) for a in (X_train, X_test, Y_train, Y_test)
        )
    return X_train, X_test, Y_train, Y_test


# --------------------------------------------------------------------------------------------
# R factors (tall-skinny QR)


def _r_factor(a: np.ndarray) -> np.ndarray:
    """A factor ``R`` with ``a = Q R``, ``Q`` with orthonormal columns, at most ``p`` rows.

    ``(..., rows, p)`` -> ``(..., min(rows, p), p)``: the R of a Householder QR when ``a`` is
    taller than wide, else ``a`` itself (``Q = I``; nothing to compress). A single matrix much
    taller than wide goes through :func:`_tall_r_factor`.
    """
    if a.shape[-2] <= a.shape[-1]:
        return a
    if a.ndim == 2 and a.shape[0] >= 2 * max(a.shape[1], _TPQRT_ROWS):
        return _tall_r_factor(a)
    return np.linalg.qr(a, mode="r")


def _tall_r_factor(a: np.ndarray) -> np.ndarray:
    """R factor of a tall matrix, block by block (:class:`RunningQR`)."""
    running = RunningQR(a.shape[1])
    running.add(a)
    return running.r()


class RunningQR:
    """R factor of a matrix whose rows come in chunks (:meth:`add`), in bounded memory.

    The rows are kept as they are while there are fewer than ``2 p``; then they and every later
    row go into a running ``R`` (``p x p``, from zero), a block ``B`` of ``_TPQRT_ROWS`` rows at
    a time: ``[R; B] = Q' R'`` by LAPACK's triangular-pentagonal QR (``?tpqrt``, which works on
    ``R``'s triangle only: ``2 b p^2`` flops per block of ``b`` rows). The result is the R of a
    Householder QR of all rows up to the signs of its rows and rounding (~1e-15 relative), and
    ~2.7x faster here than one LAPACK QR of the whole at ``p = 321``: that one streams the tall
    panel through memory for every block of Householder vectors; here a block stays in cache.
    """

    def __init__(self, p: int):
        self.p, self.n = p, 0
        self._rows: list[np.ndarray] = []
        self._R: np.ndarray | None = None

    def add(self, a: np.ndarray) -> None:
        self.n += len(a)
        if self._R is None:
            if self.n < 2 * self.p:
                self._rows.append(np.array(a, copy=True))  # (a copy: fewer than 2 p rows)
                return
            a, self._rows = np.concatenate(self._rows + [a]), []
            self._R = np.zeros((self.p, self.p), dtype=np.result_type(a, np.float32), order="F")
            self._tpqrt, = get_lapack_funcs(("tpqrt",), (self._R,))
        nb = min(_TPQRT_NB, self.p)
        for start in range(0, len(a), _TPQRT_ROWS):  # (a copy: ?tpqrt overwrites it)
            block = np.array(a[start: start + _TPQRT_ROWS], dtype=self._R.dtype, order="F")
            self._R, _, _, info = self._tpqrt(0, nb, self._R, block, overwrite_a=1,
                                              overwrite_b=1)
            if info:
                raise np.linalg.LinAlgError(f"?tpqrt failed (info={info})")

    def add_filled(self, n_rows: int, fill: Callable[[np.ndarray, int, int], None]) -> None:
        """:meth:`add` of an ``(n_rows, p)`` float64 matrix that is never formed whole:
        ``fill(out, start, stop)`` writes its rows ``start:stop`` into ``out`` (Fortran
        order, as ``?tpqrt`` takes it). The same blocks and values as :meth:`add`, so the
        same ``R`` to the last bit, with one block of rows in memory instead of the matrix."""
        if self._R is None and (self._rows or self.n + n_rows < 2 * self.p):
            a = np.empty((n_rows, self.p))
            fill(a, 0, n_rows)
            self.add(a)
            return
        if self._R is None:
            self._R = np.zeros((self.p, self.p), order="F")
            self._tpqrt, = get_lapack_funcs(("tpqrt",), (self._R,))
        if self._R.dtype != np.float64:
            raise TypeError(f"add_filled needs a float64 R, this one is {self._R.dtype}")
        self.n += n_rows
        nb, full = min(_TPQRT_NB, self.p), None
        for start in range(0, n_rows, _TPQRT_ROWS):
            stop = min(start + _TPQRT_ROWS, n_rows)
            if stop - start == _TPQRT_ROWS:  # (one buffer for every full block)
                block = full = (full if full is not None
                                else np.empty((_TPQRT_ROWS, self.p), order="F"))
            else:
                block = np.empty((stop - start, self.p), order="F")
            fill(block, start, stop)
            self._R, _, _, info = self._tpqrt(0, nb, self._R, block, overwrite_a=1,
                                              overwrite_b=1)
            if info:
                raise np.linalg.LinAlgError(f"?tpqrt failed (info={info})")

    def r(self) -> np.ndarray:
        """``R`` (at most ``p`` rows) with ``R^T R`` the Gram matrix of every row added."""
        if self._R is not None:
            return np.triu(self._R)
        return _r_factor(np.concatenate(self._rows)) if self._rows else np.zeros((0, self.p))


def merge_r_factors(factors: Iterable[np.ndarray]) -> np.ndarray:
    """R factor of the row-stack of matrices, from their R factors: ``R = qr([R_1; R_2; ...])``.

    ``R^T R`` equals the stacked matrix's Gram matrix and ``R`` keeps its singular values and
    vectors, without squaring the condition number as the Gram matrix would.
    """
    factors = [f for f in factors if f.shape[-2] > 0]
    if len(factors) == 1:
        return factors[0]
    return _r_factor(np.concatenate(factors, axis=-2))


def _augmented_r(X: np.ndarray, Y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """R factor of ``[X[rows] | Y[rows]]``, built block by block (bounded memory)."""
    p = X.shape[1] + Y.shape[1]
    block = max(p, min(_QR_BLOCK_ROWS, _BLOCK_ELEMENTS // max(p, 1)))
    R = None
    for start in range(0, len(rows), block):
        sel = rows[start : start + block]
        a = np.concatenate([X[sel], Y[sel]], axis=1)
        R = _r_factor(a if R is None else np.concatenate([R, a], axis=0))
    if R is None:
        R = np.zeros((0, p))
    return R


# --------------------------------------------------------------------------------------------
# the cutoff ridge with 2-fold cross-validation, from R factors (batched over a leading axis)


@dataclass
class _FoldSVD:
    """``R_x = U diag(s) Vt`` of one fold (or of all train rows): depends on the source only."""

    U: np.ndarray  # (B, r, m)
    s: np.ndarray  # (B, m)
    Vt: np.ndarray  # (B, m, dx)

    @classmethod
    def of(cls, Rx: np.ndarray) -> "_FoldSVD":
        U, s, Vt = np.linalg.svd(Rx, full_matrices=False)
        return cls(U=U, s=s, Vt=Vt)

    def coefficients(self, Ry: np.ndarray) -> np.ndarray:
        """``D = U^T R_y / s`` (zero where s == 0): ``W(k) = V_k D_k`` for any ``k``."""
        UtY = np.swapaxes(self.U, -1, -2) @ Ry
        s = self.s[..., None]
        np.divide(UtY, s, out=UtY, where=s > 0)
        np.copyto(UtY, 0.0, where=s <= 0)
        return UtY

    def weights(self, D: np.ndarray, n_kept: np.ndarray) -> np.ndarray:
        """``W = V_k D_k`` with the first ``n_kept[b]`` components, (B, dx, dy)."""
        mask = np.arange(self.s.shape[-1])[None, :] < np.asarray(n_kept)[:, None]
        return np.swapaxes(self.Vt, -1, -2) @ (D * mask[..., None])


def _top(s: np.ndarray) -> np.ndarray:
    return s.max(axis=-1) if s.shape[-1] else np.zeros(s.shape[:-1])


class _CutoffCV:
    """The relative-cutoff ridge with 2-fold CV, split into what depends on the source ``X``
    only and what each target ``Y`` adds (so that one source serves many targets).

    Source side (:meth:`of`, from the X columns of the folds' R factors and of their merged
    R factor): the three SVDs, each fold's rows in the other fold's right singular basis
    (``C_g = R_x,g V_f``) and how many components each alpha keeps (``s > alpha * s_max``, and
    for the CV also ``s > rcond``). Target side (:meth:`fit`, from the Y columns of the same R
    factors): ``D = U^T R_y / s``; the score of alpha is the mean over the two directions of
    ``-mean_j ||(R_y,g - C_g D_k)_j|| / sqrt(n_g)``; the best alpha's ``W = V_k D_k`` on all
    train rows. Batched over a leading axis of independent problems.
    """

    def __init__(self, f1, f2, full, C12, C21, kept1, kept2, kept, n1, n2, alphas):
        self.f1, self.f2, self.full = f1, f2, full
        self.C12, self.C21 = C12, C21
        self.kept1, self.kept2, self.kept = kept1, kept2, kept
        self.n1, self.n2, self.alphas = n1, n2, alphas
        self._grams = None  # the source side of the score brackets, made when first needed

    @classmethod
    def of(cls, R1x: np.ndarray, R2x: np.ndarray, Rx: np.ndarray, n1: int, n2: int,
           rcond: float, alphas: np.ndarray) -> "_CutoffCV":
        alphas = np.asarray(alphas, dtype=np.float64)
        f1, f2, full = _FoldSVD.of(R1x), _FoldSVD.of(R2x), _FoldSVD.of(Rx)
        s_max = np.maximum(_top(f1.s), _top(f2.s))  # (B,)
        scaled = alphas[None, :] * s_max[:, None]  # (B, A)

        def kept(s, guard):
            n = np.sum(s[:, None, :] > scaled[:, :, None], axis=-1)  # (B, A)
            return n if guard is None else np.minimum(np.sum(s > guard, axis=-1)[:, None], n)

        return cls(f1, f2, full,
                   C12=R2x @ np.swapaxes(f1.Vt, -1, -2), C21=R1x @ np.swapaxes(f2.Vt, -1, -2),
                   kept1=kept(f1.s, rcond), kept2=kept(f2.s, rcond),
                   kept=kept(full.s, None),  # the final fit has no eps guard: skmatter
                   n1=n1, n2=n2, alphas=alphas)

    @staticmethod
    def _scores(C: np.ndarray, D: np.ndarray, Ry_other: np.ndarray, n_kept: np.ndarray,
                n_rows_other: int, wanted: np.ndarray | None = None) -> np.ndarray:
        """Negative mean per-column RMSE on the other fold, for every alpha (or only where
        ``wanted``; ``-inf`` elsewhere): (B, n_alphas).

        Once per problem and number of components ``j`` that some alpha keeps (alphas that
        keep the same components score the same, exactly), over those components only:
        ``R_y,g - C_g[:, :j] D[:j]``. A problem's value does not depend on which other
        problems are computed with it.
        """
        scores = np.full(n_kept.shape, -np.inf)
        score = np.empty(len(n_kept))
        for j in np.unique(n_kept if wanted is None else n_kept[wanted]).tolist():
            hit = n_kept == j if wanted is None else (n_kept == j) & wanted  # (B, A)
            rows = np.flatnonzero(hit.any(axis=1))
            resid = Ry_other[rows] - C[rows, :, :j] @ D[rows, :j]
            rmse = np.sqrt(np.einsum("brd,brd->bd", resid, resid) / n_rows_other)  # (b, dy)
            score[rows] = -rmse.mean(axis=-1)
            scores[hit] = score[np.nonzero(hit)[0]]
        return scores

    @staticmethod
    def _score_bounds(C: np.ndarray, gram: tuple, D: np.ndarray, Ry_other: np.ndarray,
                      n_kept: np.ndarray, n_rows_other: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds ``(lo, hi)``, (B, n_alphas), that hold :meth:`_scores`' values, for every
        number of components at the cost of about two of them.

        Column ``c``'s squared residual with ``j`` components, expanded with ``G = C^T C``
        and ``P = C^T R_y,g``: ``e_j = |r_c|^2 + sum_{l<j} D_lc (2 sum_{l'<l} G_ll' D_l'c +
        G_ll D_lc - 2 P_lc)``: one product with the 0/1 matrix of the components each alpha
        keeps. It cancels where the residual is small, so it only brackets ``e_j``: its
        rounding error and that of :meth:`_scores` are below ``delta = 16 (r + m + 2) eps
        (|r_c| + sum_{l<j} |C_l| |D_lc|)^2`` (every term is bounded by that square, every sum
        has at most ``r + m`` terms). ``gram``: :meth:`_gram` of ``C``.
        """
        lower, diag, norms = gram
        B, m, dy = D.shape
        increments = lower @ D
        increments -= np.swapaxes(C, -1, -2) @ Ry_other  # sum_l' G_ll' D_l' - P_l
        increments *= 2
        increments += diag[..., None] * D
        increments *= D
        keeps = (n_kept[..., None] > np.arange(m)).astype(np.float64)  # (B, A, m)
        norm2 = np.einsum("brd,brd->bd", Ry_other, Ry_other)[:, None, :]  # (B, 1, dy)
        e = norm2 + keeps @ increments  # (B, A, dy)
        reach = np.abs(D)
        reach *= norms[..., None]
        bound = np.sqrt(norm2) + keeps @ reach
        delta = 16 * (C.shape[-2] + m + 2) * _EPS * bound ** 2
        lo = -np.sqrt((e + delta) / n_rows_other).mean(axis=-1)
        hi = -np.sqrt(np.maximum(e - delta, 0) / n_rows_other).mean(axis=-1)
        slack = 1e-13 * (np.abs(lo) + np.abs(hi))  # the mean's and the square root's rounding
        return lo - slack, hi + slack

    @staticmethod
    def _gram(C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``G = C^T C`` as its strictly lower triangle, its diagonal and the column norms."""
        G = np.swapaxes(C, -1, -2) @ C
        diag = np.diagonal(G, axis1=-2, axis2=-1).copy()
        return np.tril(G, -1), diag, np.sqrt(diag)

    def _select(self, R1y: np.ndarray, R2y: np.ndarray, screened: bool = False):
        """The CV scores ``(B, n_alphas)`` and the best alpha's index (the first maximum).

        ``screened``: only the alphas that :meth:`_score_bounds` cannot rule out are scored
        (the others get ``-inf``); the best alpha and its score are the same to the last bit.
        """
        D1, D2 = self.f1.coefficients(R1y), self.f2.coefficients(R2y)
        wanted = None
        if screened:
            if self._grams is None:  # source side: once for every target
                self._grams = self._gram(self.C12), self._gram(self.C21)
            lo12, hi12 = self._score_bounds(self.C12, self._grams[0], D1, R2y, self.kept1,
                                            self.n2)
            lo21, hi21 = self._score_bounds(self.C21, self._grams[1], D2, R1y, self.kept2,
                                            self.n1)
            lo, hi = (lo12 + lo21) / 2, (hi12 + hi21) / 2
            wanted = hi >= lo.max(axis=1, keepdims=True)
        score = (self._scores(self.C12, D1, R2y, self.kept1, self.n2, wanted)
                 + self._scores(self.C21, D2, R1y, self.kept2, self.n1, wanted)) / 2
        return score, np.argmax(score, axis=1)  # first maximum, as numpy/skmatter

    def fit(self, R1y: np.ndarray, R2y: np.ndarray, Ry: np.ndarray):
        """``W (B, dx, dy)``, the chosen relative alphas ``(B,)`` and the CV scores."""
        score, best = self._select(R1y, R2y)
        W = self.full.weights(self.full.coefficients(Ry), self.kept[np.arange(len(best)), best])
        return W, self.alphas[best], score

    def predict(self, R1y: np.ndarray, R2y: np.ndarray, Ry: np.ndarray,
                query: np.ndarray) -> np.ndarray:
        """``q_b W_b`` for one query row ``q_b`` (``query``: (B, dx)) per problem, without
        forming ``W``: ``q V_k S_k^-1 U_k^T R_y`` as two vector products (``q V / s`` is the
        source's, computed once per query)."""
        _, best = self._select(R1y, R2y, screened=True)
        full = self.full
        if getattr(self, "_query", None) is not query:
            with np.errstate(divide="ignore", invalid="ignore"):
                qv = (query[:, None, :] @ np.swapaxes(full.Vt, -1, -2))[:, 0, :]
                self._qvs = np.where(full.s > 0, qv / full.s, 0.0)  # (B, m)
            self._query = query
        n_kept = self.kept[np.arange(len(best)), best]
        z = self._qvs * (np.arange(full.s.shape[-1])[None, :] < n_kept[:, None])
        return ((z[:, None, :] @ np.swapaxes(full.U, -1, -2)) @ Ry)[:, 0, :]


def _cutoff_cv_from_r(R1: np.ndarray, R2: np.ndarray, n1: int, n2: int, n_x: int,
                      rcond: float, alphas: np.ndarray):
    """Relative-cutoff ridge, alpha by 2-fold CV, from the folds' R factors of ``[X | Y]``.

    ``R1``, ``R2``: ``(B, r, dx + dy)`` (a batch of independent problems); ``n1``, ``n2``: rows
    in each fold. Returns ``W (B, dx, dy)``, the chosen relative alphas ``(B,)``, the CV
    scores ``(B, n_alphas)`` and the merged R factor of both folds.
    """
    R = merge_r_factors([R1, R2])
    cv = _CutoffCV.of(R1[..., :n_x], R2[..., :n_x], R[..., :n_x], n1, n2, rcond, alphas)
    W, best, score = cv.fit(R1[..., n_x:], R2[..., n_x:], R[..., n_x:])
    return W, best, score, R


def _two_folds(n: int, random_state, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """skmatter's folds: the first split of ``KFold(2)`` (its train part is fold 1)."""
    kf = KFold(n_splits=2, shuffle=shuffle, random_state=random_state if shuffle else None)
    fold1, fold2 = next(kf.split(np.empty((n, 1))))
    return fold1, fold2


@dataclass
class _LinearFit:
    W: np.ndarray  # (dx, dy)
    alpha: float  # chosen relative cutoff
    R: np.ndarray  # R factor of [X_train | Y_train]
    n_x: int


def _default_fit(X_train: np.ndarray, Y_train: np.ndarray, alphas=DEFAULT_ALPHAS,
                 random_state=DEFAULT_RANDOM_STATE, shuffle: bool = True) -> _LinearFit:
    n, n_x = X_train.shape
    if n < 2:
        raise ValueError("at least 2 training rows are needed for the 2-fold cross-validation")
    alphas = np.asarray(alphas, dtype=np.float64)
    if np.any(alphas < 0) or np.any(alphas >= 1):
        raise ValueError("relative alphas must lie in [0, 1)")
    fold1, fold2 = _two_folds(n, random_state, shuffle)
    R1 = _augmented_r(X_train, Y_train, fold1)
    R2 = _augmented_r(X_train, Y_train, fold2)
    rcond = max(n, n_x) * _EPS  # skmatter: max(X.shape) * spacing(1)
    W, best, _, R = _cutoff_cv_from_r(
        R1[None], R2[None], len(fold1), len(fold2), n_x, rcond, alphas
    )
    return _LinearFit(W=W[0], alpha=float(best[0]), R=R[0], n_x=n_x)


def cutoff_ridge_2fold_cv(X_train, Y_train, alphas=DEFAULT_ALPHAS,
                          random_state=DEFAULT_RANDOM_STATE, shuffle: bool = True):
    """Weights and chosen alpha of skmatter's default ``Ridge2FoldCV`` (relative cutoff).

    ``W = V_k S_k^-1 U_k^T Y`` (``X_train = U S V^T``, keeping ``s > alpha * s_max``), with
    ``alpha`` picked from ``alphas`` by 2-fold CV (negative per-column RMSE averaged over
    columns), folds from ``KFold(2, shuffle, random_state)`` on the rows in the given order.
    Returns ``(W, alpha)`` with ``W`` of shape ``(dx, dy)``: predictions are ``X @ W``
    (skmatter's ``coef_`` is ``W.T``).
    """
    X_train = _finite_float64(_as_matrix(X_train, "X_train"), "X_train")
    Y_train = _finite_float64(_as_matrix(Y_train, "Y_train"), "Y_train")
    if X_train.shape[0] != Y_train.shape[0]:
        raise ValueError("X_train and Y_train must have the same number of rows")
    fit = _default_fit(X_train, Y_train, alphas, random_state, shuffle)
    return fit.W, fit.alpha


# --------------------------------------------------------------------------------------------
# global measures


def _rms(values: np.ndarray) -> float:
    return float(np.linalg.norm(values) / np.sqrt(len(values)))


def pointwise_global_reconstruction_error(X, Y, train_idx=None, test_idx=None, scaler=None,
                                          estimator=None):
    r"""Per test row ``||y_i - x_i W||``, ``W`` the linear fit of scaled ``Y`` from scaled ``X``.

    Note the argument order: ``train_idx`` before ``test_idx`` here, as in skmatter (the other
    functions take ``test_idx`` first).
    """
    X_train, X_test, Y_train, Y_test = _prepare(X, Y, train_idx, test_idx, scaler)
    if estimator is None:
        return _global_default(X_train, X_test, Y_train, Y_test, ("gfre",))["gfre"]
    estimator.fit(X_train, Y_train)
    return np.linalg.norm(Y_test - estimator.predict(X_test), axis=1)


def global_reconstruction_error(X, Y, test_idx=None, train_idx=None, scaler=None,
                                estimator=None):
    r"""GFRE: ``sqrt(mean_i ||y_i - x_i W||^2)`` over the test rows (see the module docstring)."""
    return _rms(
        pointwise_global_reconstruction_error(
            X, Y, train_idx=train_idx, test_idx=test_idx, scaler=scaler, estimator=estimator
        )
    )


def _padded_procrustes(M: np.ndarray, n_x: int, n_y: int) -> np.ndarray:
    """Orthogonal ``Q`` (m x m, ``m = max(dx, dy)``) maximising ``tr(Q^T pad(M))``: ``U V^T``."""
    m = max(n_x, n_y)
    Mp = np.zeros((m, m))
    Mp[:n_x, :n_y] = M
    U, _, Vt = np.linalg.svd(Mp)
    return U @ Vt


def _procrustes_distortion(X_test: np.ndarray, pred_test: np.ndarray, M: np.ndarray):
    """``||pad(x_i W) - pad(x_i) Q||`` per test row, ``Q`` the padded Procrustes of ``M``."""
    n_x, n_y = X_test.shape[1], pred_test.shape[1]
    Q = _padded_procrustes(M, n_x, n_y)
    diff = -(X_test @ Q[:n_x])  # pad(x_i) Q, m columns
    diff[:, :n_y] += pred_test
    return np.linalg.norm(diff, axis=1)


def _global_default(X_train, X_test, Y_train, Y_test, metrics) -> dict[str, np.ndarray]:
    """Pointwise GFRE and/or GFRD of scaled float64 matrices, from one default fit."""
    fit = _default_fit(X_train, Y_train)
    pred_test = X_test @ fit.W
    out = {}
    if "gfre" in metrics:
        out["gfre"] = np.linalg.norm(Y_test - pred_test, axis=1)
    if "gfrd" in metrics:
        Rx = fit.R[:, :fit.n_x]
        out["gfrd"] = _procrustes_distortion(X_test, pred_test, Rx.T @ (Rx @ fit.W))
    return out


def pointwise_global_reconstruction_distortion(X, Y, test_idx=None, train_idx=None, scaler=None,
                                               estimator=None):
    r"""Per test row ``||pad(x_i W) - pad(x_i) Q||``, ``Q`` orthogonal (Procrustes).

    ``Q = argmin ||pad(X_train) Q - pad(X_train W)||_F`` over orthogonal ``m x m`` matrices,
    ``m = max(dx, dy)``, i.e. ``Q = U V^T`` from the SVD of ``X_train^T X_train W`` padded with
    zeros to ``m x m``. Works for any widths; skmatter raises for ``dy < dx`` (its value for
    ``dy >= dx`` is reproduced; for ``dy < dx`` this equals skmatter on ``Y`` padded with zero
    columns to width ``dx``; for ``dy == 1 < dx`` skmatter silently broadcasts and differs).
    """
    X_train, X_test, Y_train, Y_test = _prepare(X, Y, train_idx, test_idx, scaler)
    if estimator is None:
        return _global_default(X_train, X_test, Y_train, Y_test, ("gfrd",))["gfrd"]
    estimator.fit(X_train, Y_train)
    pred_test = np.asarray(estimator.predict(X_test), dtype=np.float64).reshape(len(X_test), -1)
    pred_train = np.asarray(estimator.predict(X_train), dtype=np.float64).reshape(
        len(X_train), -1)
    return _procrustes_distortion(X_test, pred_test, X_train.T @ pred_train)


def pointwise_global_reconstruction_errors(X, Ys, test_idx=None, train_idx=None,
                                           metrics=("gfre", "gfrd")) -> list[dict]:
    r"""Pointwise GFRE and GFRD (those in ``metrics``) of one source ``X`` against every
    target in ``Ys`` (same rows, same split; the default scaler and fit): ``X`` is checked
    and scaled once, and each target's one fit serves both measures. Each value equals
    :func:`pointwise_global_reconstruction_error`'s and
    :func:`pointwise_global_reconstruction_distortion`'s on the same split, to the last bit.
    """
    X_train, X_test, scaled = _scaled_source_and_targets(_as_matrix(X, "X"), Ys, train_idx,
                                                         test_idx)
    return [_global_default(X_train, X_test, Y_train, Y_test, metrics)
            for Y_train, Y_test in scaled]


def _scaled_source_and_targets(X: np.ndarray, Ys, train_idx, test_idx):
    """The default split and scaling of one source and every target, in float64 (the rows
    used checked finite): ``X_train, X_test`` and ``(Y_train, Y_test)`` per target (the
    source scaled once)."""
    train_idx, test_idx = _resolve_indices(X.shape[0], train_idx, test_idx)
    X_train, X_test = _flexible_scale(_finite_float64(X[train_idx], "X"),
                                      _finite_float64(X[test_idx], "X"), "X")
    scaled = []
    for Y in Ys:
        _, Y = _check_pair(X, Y)
        scaled.append(_flexible_scale(_finite_float64(Y[train_idx], "Y"),
                                      _finite_float64(Y[test_idx], "Y"), "Y"))
    return X_train, X_test, scaled


def global_reconstruction_distortion(X, Y, test_idx=None, train_idx=None, scaler=None,
                                     estimator=None):
    r"""GFRD: RMS over test rows of ``||pad(x_i W) - pad(x_i) Q||`` (``Q`` orthogonal).

    Pads both ``X`` and ``X W`` to the larger width, so any ``dx, dy`` work; equals skmatter
    where skmatter works (``dy >= dx``); see :func:`pointwise_global_reconstruction_distortion`.
    """
    return _rms(
        pointwise_global_reconstruction_distortion(
            X, Y, test_idx=test_idx, train_idx=train_idx, scaler=scaler, estimator=estimator
        )
    )


# --------------------------------------------------------------------------------------------
# local measure


def _nearest_train_rows(X_train: np.ndarray, X_query: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(n_query, k)`` of the ``k`` nearest train rows, nearest first.

    Squared distances are skmatter's expression ``|a|^2 + |b|^2 - 2 a.b`` (one BLAS product per
    block of queries); ties are ordered by train position.
    """
    n_train = X_train.shape[0]
    k = min(k, n_train)
    sq_train = np.sum(X_train**2, axis=1)
    out = np.empty((len(X_query), k), dtype=np.intp)
    chunk = max(1, _BLOCK_ELEMENTS // max(n_train, 1))
    for start in range(0, len(X_query), chunk):
        q = X_query[start : start + chunk]
        d2 = sq_train + np.sum(q**2, axis=1)[:, None] - 2 * q @ X_train.T
        if k < n_train:
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(d2, part, axis=1).max(axis=1)
        else:
            kth = np.full(len(q), np.inf)
        for r in range(len(q)):
            cand = np.flatnonzero(d2[r] <= kth[r])  # ascending train position
            order = np.argsort(d2[r, cand], kind="stable")[:k]
            out[start + r] = cand[order]
    return out


def _local_errors_default(X_train, X_test, targets, neighbours, n_jobs=None) -> list[np.ndarray]:
    """Default LFRE fits of several targets from one source, batched over test rows.

    ``targets``: ``(Y_train, Y_test, k)`` each; ``neighbours``: ``(n_test, >= max k)`` train
    rows nearest first, of which target ``t`` uses the first ``k_t`` (the ``k`` nearest by
    (distance, train position) are a prefix of the ``k' > k`` nearest). Whatever depends on
    the source only is computed once per (test row, ``k``) and serves every target with that
    ``k``: the neighbourhood ``x_i - xbar_i``, its folds, their SVDs and the alpha masks
    (:class:`_CutoffCV`). This holds while ``k <= dx``: then no fold has more rows than
    columns, so the folds' R factors are the rows themselves (no QR that would mix ``Y`` into
    the source's factors); with ``k > dx`` each target is fitted on its own, the same way.

    ``n_jobs`` threads over batches. The batches are many small SVDs, for which a
    multi-threaded BLAS only adds contention, so BLAS is held to one thread meanwhile
    (``threadpoolctl``; process-wide while it runs).
    """
    from concurrent.futures import ThreadPoolExecutor

    from joblib import effective_n_jobs
    from threadpoolctl import threadpool_limits

    n_test = len(X_test)
    n_x = X_train.shape[1]
    out = [np.empty(n_test) for _ in targets]
    by_k: dict[int, list[int]] = {}
    for t, (_, _, k) in enumerate(targets):
        by_k.setdefault(int(k), []).append(t)
    work = []  # (k, targets with that k, batch start, batch size)
    for k, ts in by_k.items():
        p = n_x + max(targets[t][0].shape[1] for t in ts)
        batch = max(1, min(256, _BLOCK_ELEMENTS // (k * p)))
        work += [(k, ts, start, batch) for start in range(0, n_test, batch)]

    def run(k: int, ts: list[int], start: int, batch: int) -> None:
        stop = min(start + batch, n_test)
        fold1, fold2 = _two_folds(k, DEFAULT_RANDOM_STATE, True)  # same for every test row
        folds, n1 = np.concatenate([fold1, fold2]), len(fold1)
        rcond = max(k, n_x) * _EPS
        idx = neighbours[start:stop, :k]  # (B, k)
        LX = X_train[idx]
        x_mean = LX.mean(axis=1)
        xc = X_test[start:stop] - x_mean  # (B, dx)
        shared = k <= n_x
        if shared:  # the centred neighbourhood, rows in fold order: fold 1, then fold 2
            Rx = LX[:, folds]
            Rx -= x_mean[:, None]
            cv = _CutoffCV.of(Rx[:, :n1], Rx[:, n1:], Rx, n1, k - n1, rcond, DEFAULT_ALPHAS)
        else:
            LXc = LX - x_mean[:, None]
        for t in ts:
            Y_train, Y_test, _ = targets[t]
            LY = Y_train[idx]
            y_mean = LY.mean(axis=1)
            if shared:
                Ry = LY[:, folds]
                Ry -= y_mean[:, None]
                pred = y_mean + cv.predict(Ry[:, :n1], Ry[:, n1:], Ry, xc)
            else:
                A = np.concatenate([LXc, LY - y_mean[:, None]], axis=2)
                W, _, _, _ = _cutoff_cv_from_r(
                    _r_factor(A[:, fold1]), _r_factor(A[:, fold2]), len(fold1), len(fold2),
                    n_x, rcond, DEFAULT_ALPHAS)
                pred = y_mean + (xc[:, None, :] @ W)[:, 0, :]
            out[t][start:stop] = np.linalg.norm(Y_test[start:stop] - pred, axis=1)

    workers = max(1, min(effective_n_jobs(n_jobs), len(work)))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1:
            for item in work:
                run(*item)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda item: run(*item), work))
    return out


def _local_error_one(estimator, X_train, Y_train, x, y, idx) -> float:
    LX, LY = X_train[idx], Y_train[idx]
    x_mean, y_mean = LX.mean(axis=0), LY.mean(axis=0)
    estimator.fit(LX - x_mean, LY - y_mean)
    pred = y_mean + estimator.predict((x - x_mean)[None, :])
    return float(np.linalg.norm(y[None, :] - pred))


def pointwise_local_reconstruction_error(X, Y, n_local_points, test_idx=None, train_idx=None,
                                         scaler=None, estimator=None, n_jobs=None):
    r"""Per test row ``||y_i - ybar_i - (x_i - xbar_i) W_i||``.

    ``W_i``: the fit (default: 2-fold cutoff ridge, as the global one) of ``Y - ybar_i`` from
    ``X - xbar_i`` on the ``n_local_points`` train rows nearest to ``x_i`` in scaled ``X``
    (Euclidean), ``xbar_i, ybar_i`` their means. If ``n_local_points`` exceeds the number of
    train rows, all train rows are used (as skmatter). ``n_jobs``: threads over batches of test
    rows (default estimator) or joblib tasks, one deep copy of the estimator each (user
    ``estimator``).
    """
    X, Y = _check_pair(X, Y)
    if len(X) < n_local_points:
        raise ValueError(
            f"X has {len(X)} samples but n_local_points={n_local_points}. "
            "Must have at least n_local_points samples"
        )
    if estimator is None and scaler is None:
        return pointwise_local_reconstruction_errors(
            X, [Y], n_local_points, test_idx=test_idx, train_idx=train_idx, n_jobs=n_jobs)[0]
    X_train, X_test, Y_train, Y_test = _prepare(X, Y, train_idx, test_idx, scaler)
    neighbours = _nearest_train_rows(X_train, X_test, int(n_local_points))
    if estimator is None:
        return _local_errors_default(X_train, X_test, [(Y_train, Y_test, neighbours.shape[1])],
                                     neighbours, n_jobs)[0]
    rows = range(len(X_test))
    if n_jobs in (None, 1):
        return np.array(
            [_local_error_one(estimator, X_train, Y_train, X_test[i], Y_test[i], neighbours[i])
             for i in rows]
        )
    from joblib import Parallel, delayed

    return np.array(
        Parallel(n_jobs=n_jobs)(
            delayed(_local_error_one)(
                copy.deepcopy(estimator), X_train, Y_train, X_test[i], Y_test[i], neighbours[i]
            )
            for i in rows
        )
    )


def pointwise_local_reconstruction_errors(X, Ys, n_local_points, test_idx=None, train_idx=None,
                                          n_jobs=None) -> list[np.ndarray]:
    r""":func:`pointwise_local_reconstruction_error` of one source ``X`` against every target
    in ``Ys`` (same rows, same split; the default scaler and fit), sharing the source's work.

    ``n_local_points``: one ``k`` for all targets, or one per target (the paper's
    ``min(dx, dy)`` differs between targets). One neighbour search (for the largest ``k``;
    the ``k`` nearest are its first ``k``) and, per test row and ``k``, one set of the
    source's local factorizations serve every target; each value equals the one-target
    function's on the same split.
    """
    X = _finite_float64(_as_matrix(X, "X"), "X")
    ks = ([int(n_local_points)] * len(Ys) if np.ndim(n_local_points) == 0
          else [int(k) for k in n_local_points])
    if len(ks) != len(Ys):
        raise ValueError(f"{len(Ys)} targets but {len(ks)} values of n_local_points")
    if ks and len(X) < max(ks):
        raise ValueError(
            f"X has {len(X)} samples but n_local_points={max(ks)}. "
            "Must have at least n_local_points samples"
        )
    X_train, X_test, scaled = _scaled_source_and_targets(X, Ys, train_idx, test_idx)
    targets = [(Y_train, Y_test, min(k, len(X_train))) for (Y_train, Y_test), k in zip(scaled, ks)]
    neighbours = _nearest_train_rows(X_train, X_test, max(ks, default=1))
    return _local_errors_default(X_train, X_test, targets, neighbours, n_jobs)


def local_reconstruction_error(X, Y, n_local_points, test_idx=None, train_idx=None, scaler=None,
                               estimator=None, n_jobs=None):
    r"""LFRE: ``sqrt(mean_i ||y_i - ybar_i - (x_i - xbar_i) W_i||^2)`` over the test rows.

    The paper uses ``n_local_points = min(dx, dy)``. See
    :func:`pointwise_local_reconstruction_error`.
    """
    return _rms(
        pointwise_local_reconstruction_error(
            X, Y, n_local_points, test_idx=test_idx, train_idx=train_idx, scaler=scaler,
            estimator=estimator, n_jobs=n_jobs,
        )
    )
