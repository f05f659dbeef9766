"""Structure features from per-atom features: progressive cumulants, and pooling baselines.

The paper's recipe (Chorna et al., arXiv:2512.05717): for one structure with atoms
``i = 1..N`` and one feature column ``x``,

* population central moments ``mu_1 = mean(x)``, ``mu_p = mean((x - mu_1)^p)`` (p = 2..8);
* cumulants, from the moment-cumulant relations written in central moments::

      k1 = mu1
      k2 = mu2
      k3 = mu3
      k4 = mu4 - 3 mu2^2
      k5 = mu5 - 10 mu3 mu2
      k6 = mu6 - 15 mu4 mu2 - 10 mu3^2 + 30 mu2^3
      k7 = mu7 - 21 mu5 mu2 - 35 mu4 mu3 + 210 mu3 mu2^2
      k8 = mu8 - 28 mu6 mu2 - 56 mu5 mu3 - 35 mu4^2 + 420 mu4 mu2^2 + 560 mu3^2 mu2 - 630 mu2^4

  (these are ``kappa_n = mu_n - sum_{m=2}^{n-2} C(n-1, m-1) kappa_m mu_{n-m}``, the usual
  recursion with ``mu_1 = 0`` and ``kappa_1 = 0`` for the centred variable, then ``k1 = mean``);
* every ``k_n`` with ``n >= 2`` replaced by ``sign(k_n) |k_n|^(1/n)`` (same units as ``x``);
* the order-n descriptor ``[k1, ..., kn]``: ``n * d`` columns, all ``d`` columns of ``k1``, then
  all ``d`` of ``k2``, and so on.

The statistics are kept as mergeable :class:`MomentState` objects (count, mean and the sums of
powers of deviations from the mean, ``M_p = sum_i (x_i - mean)^p``), built in one vectorised
pass over a flat atom array and combined with Pebay's pairwise formulas, so a structure whose
atoms arrive in several chunks (Parquet batches, shards) gives the same features as one that
arrives whole, and a distributed reducer can tree-reduce them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Iterable

import numpy as np

__all__ = [
    "MAX_ORDER",
    "MomentState",
    "merge",
    "merge_all",
    "cumulants_from_central_moments",
    "root_transform",
    "cumulant_features",
    "mean_pooling",
    "sum_pooling",
]

#: Highest cumulant order with an explicit formula here.
MAX_ORDER = 8

# Values (rows * d) per vectorised block: the float64 temporaries (about _BLOCK_VALUES * 8
# bytes each) stay in cache, whatever the number of atoms; measured best at 2^14 .. 2^16.
_BLOCK_VALUES = 1 << 16


# --------------------------------------------------------------------------------------------
# input handling: group rows by segment id, in blocks of whole segments
# --------------------------------------------------------------------------------------------


def _check_inputs(features, segment_ids) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features)
    seg = np.asarray(segment_ids)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n_atoms, d) array, got shape {x.shape}")
    if seg.ndim != 1 or seg.shape[0] != x.shape[0]:
        raise ValueError(
            f"segment_ids must be 1-D with one id per row of features: got shape {seg.shape} "
            f"for features of shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError("no atoms: features has 0 rows, cumulants of an empty set are undefined")
    if x.shape[1] == 0:
        raise ValueError("features has 0 columns")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segment_ids must be integers, got dtype {seg.dtype}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be real numbers, got dtype {x.dtype}")
    return x, seg


@dataclass(frozen=True)
class _Groups:
    ids: np.ndarray  # (s,) sorted unique segment ids
    starts: np.ndarray  # (s,) first row of each segment in the sorted order
    counts: np.ndarray  # (s,) int64
    perm: np.ndarray | None  # row order that sorts by segment id; None if already sorted

    def blocks(self, d: int):
        """Yield (segment slice, row slice) covering whole segments, about _BLOCK_VALUES values."""
        rows = max(1, _BLOCK_VALUES // max(d, 1))
        s = self.ids.shape[0]
        ends = self.starts + self.counts
        i = 0
        while i < s:
            j = int(np.searchsorted(self.starts, self.starts[i] + rows, side="left"))
            j = max(j, i + 1)
            yield slice(i, j), slice(int(self.starts[i]), int(ends[j - 1]))
            i = j


def _group(seg: np.ndarray) -> _Groups:
    seg = seg.astype(np.int64, copy=False)
    perm = None
    if seg.shape[0] > 1 and np.any(seg[1:] < seg[:-1]):
        perm = np.argsort(seg, kind="stable")
        seg = seg[perm]
    change = np.flatnonzero(seg[1:] != seg[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [seg.shape[0]]))).astype(np.int64)
    return _Groups(ids=seg[starts].copy(), starts=starts, counts=counts, perm=perm)


def _block_rows(x: np.ndarray, groups: _Groups, rows: slice) -> np.ndarray:
    """The block's rows, transposed to a private C-contiguous float64 ``(d, r)`` array.

    Segment reductions run along the last (contiguous) axis: ``np.add.reduceat`` along axis 0
    of an ``(r, d)`` array is about ten times slower than along axis 1 of its transpose.
    """
    xb = x[groups.perm[rows]] if groups.perm is not None else x[rows]
    out = np.empty((xb.shape[1], xb.shape[0]))  # always a copy: the caller overwrites it
    out[...] = xb.T
    return out


def _check_finite(values: np.ndarray, ids: np.ndarray, what: str) -> None:
    """``values`` (s, ...) per segment: raise naming the first segment with a non-finite one."""
    bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} in segment id {int(ids[np.flatnonzero(bad)[0]])}")


# --------------------------------------------------------------------------------------------
# moment states
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MomentState:
    """Mergeable per-segment statistics up to ``order``, in float64.

    For each segment (structure) ``s`` and column ``j`` with values ``x_1..x_n``:

    * ``count[s] = n``,
    * ``mean[s, j] + mean_err[s, j] = (1/n) sum_i x_i``: the mean as an unevaluated sum of
      two float64 (``mean`` is the rounded value, ``|mean_err| <= ulp(mean) / 2``), so that the
      difference of two means in :func:`merge` is accurate relative to the spread even when
      the values sit on a large offset (1e6 + noise);
    * ``M[s, p - 2, j] = sum_i (x_i - mean)^p`` for ``p = 2..order``,

    so that ``mu_p = M_p / n`` are the population central moments.  ``ids`` are sorted and unique.
    """

    ids: np.ndarray  # (s,) int64
    count: np.ndarray  # (s,) int64
    mean: np.ndarray  # (s, d) float64
    mean_err: np.ndarray  # (s, d) float64, low part of the mean
    M: np.ndarray  # (s, order - 1, d) float64
    order: int

    def __post_init__(self):
        s = self.ids.shape[0]
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if (
            self.count.shape != (s,)
            or self.mean.ndim != 2
            or self.mean.shape[0] != s
            or self.mean_err.shape != self.mean.shape
        ):
            raise ValueError("inconsistent MomentState shapes")
        if self.M.shape != (s, self.order - 1, self.mean.shape[1]):
            raise ValueError(
                f"M has shape {self.M.shape}, expected {(s, self.order - 1, self.mean.shape[1])}"
            )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def empty(cls, d: int, order: int = MAX_ORDER) -> "MomentState":
        """A state with no segment: the identity of :func:`merge`."""
        return cls(
            ids=np.zeros(0, np.int64),
            count=np.zeros(0, np.int64),
            mean=np.zeros((0, d)),
            mean_err=np.zeros((0, d)),
            M=np.zeros((0, order - 1, d)),
            order=order,
        )

    @classmethod
    def from_atoms(cls, features, segment_ids, order: int = MAX_ORDER) -> "MomentState":
        """States of every segment id present, from a flat ``(n_atoms, d)`` array.

        Rows need not be sorted by ``segment_ids``.  Vectorised over segments (``reduceat`` over
        the rows grouped by id), two-pass within each call:

        1. ``m = (1/n) sum x`` per segment;
        2. ``S_k = sum (x - m)^k`` for ``k = 1..order``;
        3. correction for the rounding of ``m`` (``c = S_1 / n``, the corrected two-pass
           algorithm): ``M_p = sum_{k=0}^{p} C(p, k) S_k (-c)^(p-k)`` with ``S_0 = n``, and
           ``mean + mean_err = m + c`` exactly (two-sum).

        Columns that are constant within a segment (single atoms included) get ``mean`` equal
        to that value and ``M_p = 0`` exactly.
        """
        if not 1 <= order:
            raise ValueError(f"order must be >= 1, got {order}")
        x, seg = _check_inputs(features, segment_ids)
        groups = _group(seg)
        s, d = groups.ids.shape[0], x.shape[1]
        mean = np.empty((s, d))
        mean_err = np.empty((s, d))
        M = np.empty((s, order - 1, d))
        with np.errstate(over="ignore", invalid="ignore"):
            # non-finite input or overflow is reported below, naming the segment
            for segs, rows in groups.blocks(d):
                xt = _block_rows(x, groups, rows)
                loc = groups.starts[segs] - groups.starts[segs.start]
                bm, be, bM = _block_moments(xt, loc, groups.counts[segs], order)
                mean[segs] = bm.T
                mean_err[segs] = be.T
                M[segs] = bM.transpose(2, 0, 1)
        _check_finite(mean, groups.ids, "non-finite feature value (NaN or inf)")
        _check_finite(M, groups.ids, f"overflow in the moments up to order {order}")
        return cls(
            ids=groups.ids, count=groups.counts, mean=mean, mean_err=mean_err, M=M, order=order
        )

    @classmethod
    def from_arrays(cls, arrays: dict) -> "MomentState":
        """Inverse of :meth:`to_arrays`."""
        M = np.asarray(arrays["M"], dtype=np.float64)
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        err = arrays.get("mean_err")
        return cls(
            ids=np.asarray(arrays["ids"], dtype=np.int64),
            count=np.asarray(arrays["count"], dtype=np.int64),
            mean=mean,
            mean_err=np.zeros_like(mean) if err is None else np.asarray(err, dtype=np.float64),
            M=M,
            order=M.shape[1] + 1,
        )

    def to_arrays(self) -> dict:
        """Plain arrays (``ids``, ``count``, ``mean``, ``mean_err``, ``M``), e.g. to store it."""
        return {
            "ids": self.ids,
            "count": self.count,
            "mean": self.mean,
            "mean_err": self.mean_err,
            "M": self.M,
        }

    # -- access ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def d(self) -> int:
        return int(self.mean.shape[1])

    def merge(self, other: "MomentState") -> "MomentState":
        """``merge(self, other)``."""
        return merge(self, other)

    def central_moments(self, order: int | None = None) -> np.ndarray:
        """``(n_segments, order, d)``: ``[mu_1 = mean, mu_2, ..., mu_order]``, ``mu_p = M_p/n``."""
        order = self._check_order(order)
        out = np.empty((len(self), order, self.d))
        out[:, 0] = self.mean + self.mean_err
        out[:, 1:] = self.M[:, : order - 1] / self.count[:, None, None]
        return out

    def cumulants(self, order: int | None = None) -> np.ndarray:
        """``(n_segments, order, d)`` raw cumulants ``[k1, ..., k_order]`` (no root transform)."""
        return cumulants_from_central_moments(self.central_moments(order))

    def structure_features(self, order: int | None = None, root: bool = True) -> np.ndarray:
        """``(n_segments, order * d)`` float64: ``[k1 | k2 | ... | k_order]``, each block ``d``
        wide, with ``k_n -> sign(k_n) |k_n|^(1/n)`` for ``n >= 2`` when ``root``."""
        k = self.cumulants(order)
        if root:
            k = root_transform(k)
        return k.reshape(k.shape[0], -1)

    def _check_order(self, order: int | None) -> int:
        if order is None:
            order = self.order
        if not 1 <= order <= self.order:
            raise ValueError(f"order must be in 1..{self.order} for this state, got {order}")
        if order > MAX_ORDER:
            raise ValueError(f"cumulants are implemented up to order {MAX_ORDER}, got {order}")
        return order


def _block_moments(xt: np.ndarray, loc: np.ndarray, cnt: np.ndarray, order: int):
    """One block of whole, sorted segments.  ``xt`` is the block transposed, ``(d, rows)``, and
    is overwritten.  Returns ``mean``, ``mean_err`` (d, s) and ``M_2..M_order`` (order - 1, d, s).

    Two passes over the rows: the provisional mean ``m``, then ``S_k = sum (x - m)^k``; then the
    corrected two-pass step, with ``c = S_1 / n`` (the rounding error of ``m``):
    ``mean + mean_err = m + c`` and ``M_p = sum_{j=0}^{p} C(p, j) S_{p-j} (-c)^j``, ``S_0 = n``.
    Columns that are constant within a segment get ``mean`` = that value exactly,
    ``mean_err = 0`` and ``M_p = 0``.
    """
    nf = cnt.astype(np.float64)
    lo = np.minimum.reduceat(xt, loc, axis=1)
    const = lo == np.maximum.reduceat(xt, loc, axis=1)
    m = np.add.reduceat(xt, loc, axis=1) / nf
    dev = xt
    dev -= np.repeat(m, cnt, axis=1)
    S = np.empty((order + 1,) + m.shape)
    S[0] = nf
    S[1] = np.add.reduceat(dev, loc, axis=1)
    if order >= 2:
        pw = dev * dev
        S[2] = np.add.reduceat(pw, loc, axis=1)
        for k in range(3, order + 1):
            pw *= dev
            S[k] = np.add.reduceat(pw, loc, axis=1)
    c = S[1] / nf
    negc_pow = [None, -c]  # (-c)^j
    for j in range(2, order + 1):
        negc_pow.append(negc_pow[-1] * negc_pow[1])
    M = np.empty((order - 1,) + c.shape)
    tmp = np.empty_like(c)
    for p in range(2, order + 1):
        acc = M[p - 2]
        acc[...] = S[p]
        for j in range(1, p + 1):
            np.multiply(S[p - j], negc_pow[j], out=tmp)
            tmp *= comb(p, j)
            acc += tmp
    mean, mean_err = _two_sum(m, c)
    mean[const] = lo[const]
    mean_err[const] = 0.0
    M[:, const] = 0.0
    return mean, mean_err, M


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knuth's TwoSum: ``s = fl(a + b)`` and ``e`` with ``s + e = a + b`` exactly."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


# --------------------------------------------------------------------------------------------
# merging (Pebay 2008)
# --------------------------------------------------------------------------------------------


def _merge_common(nA, mA, eA, MA, nB, mB, eB, MB, order):
    """Pebay's pairwise update for the union A u B of two disjoint sets (same segments).

    With ``n = nA + nB``, ``delta = mean_B - mean_A`` (from the two-float means:
    ``(mB - mA) + (eB - eA)``, accurate relative to ``|delta|`` plus rounding of the spread,
    whatever the offset), ``a = -nB delta / n`` and
    ``b = nA delta / n`` (each part's mean minus the union's mean)::

        mean = mean_A + nB delta / n
        M_p  = sum_{k=0}^{p} C(p, k) (a^k M_{p-k,A} + b^k M_{p-k,B}),   M_0 = count, M_1 = 0
             = M_{p,A} + M_{p,B} + sum_{k=1}^{p-2} C(p, k) delta^k ((-nB/n)^k M_{p-k,A}
               + (nA/n)^k M_{p-k,B}) + (nA nB delta / n)^p (1/nB^(p-1) - (-1/nA)^(p-1))

    (Pebay, "Formulas for robust, one-pass parallel computation of covariances and
    arbitrary-order statistical moments", SAND2008-6212), in terms of ``delta`` only.
    """
    nAf = nA.astype(np.float64)[:, None]
    nBf = nB.astype(np.float64)[:, None]
    n = nAf + nBf
    delta = (mB - mA) + (eB - eA)
    a = -(nBf / n) * delta
    b = (nAf / n) * delta
    mean, mean_err = _two_sum(mA, eA + (nBf / n) * delta)
    # the parts' own M_p with M_0 = count and M_1 = 0
    def full(nf, Mx):
        out = np.zeros((order + 1,) + delta.shape)
        out[0] = nf
        out[2:] = np.moveaxis(Mx, 1, 0)
        return out

    FA, FB = full(nAf, MA), full(nBf, MB)
    apow = np.empty((order + 1,) + delta.shape)
    bpow = np.empty_like(apow)
    apow[0] = 1.0
    bpow[0] = 1.0
    for k in range(1, order + 1):
        apow[k] = apow[k - 1] * a
        bpow[k] = bpow[k - 1] * b
    M = np.empty((delta.shape[0], order - 1, delta.shape[1]))
    for p in range(2, order + 1):
        acc = FA[p] + FB[p]
        for k in range(1, p + 1):
            if p - k == 1:
                continue  # M_1 = 0
            acc = acc + comb(p, k) * (apow[k] * FA[p - k] + bpow[k] * FB[p - k])
        M[:, p - 2] = acc
    return mean, mean_err, M


def merge(a: MomentState, b: MomentState) -> MomentState:
    """The state of the union of the atoms seen by ``a`` and by ``b`` (disjoint atom sets).

    Segment ids present on one side only are copied; ids on both sides are combined with
    Pebay's formulas (see :func:`_merge_common`).  Both states must have the same ``order``
    and ``d``.  Symmetric and associative up to rounding, so any tree of merges over any
    partition of the atoms gives the state of the whole.
    """
    if a.order != b.order:
        raise ValueError(f"cannot merge states of order {a.order} and {b.order}")
    if a.d != b.d:
        raise ValueError(f"cannot merge states of width {a.d} and {b.d}")
    if len(a) == 0:
        return b
    if len(b) == 0:
        return a
    ids = np.union1d(a.ids, b.ids)
    ia = np.searchsorted(ids, a.ids)
    ib = np.searchsorted(ids, b.ids)
    s, d, order = ids.shape[0], a.d, a.order
    count = np.zeros(s, np.int64)
    mean = np.empty((s, d))
    mean_err = np.empty((s, d))
    M = np.empty((s, order - 1, d))
    count[ia] = a.count
    mean[ia] = a.mean
    mean_err[ia] = a.mean_err
    M[ia] = a.M
    count[ib] += b.count
    mean[ib] = b.mean
    mean_err[ib] = b.mean_err
    M[ib] = b.M
    # ids in both
    both_a = np.isin(a.ids, b.ids, assume_unique=True)
    if both_a.any():
        both_b = np.isin(b.ids, a.ids, assume_unique=True)
        where = ia[both_a]
        mean[where], mean_err[where], M[where] = _merge_common(
            a.count[both_a], a.mean[both_a], a.mean_err[both_a], a.M[both_a],
            b.count[both_b], b.mean[both_b], b.mean_err[both_b], b.M[both_b],
            order,
        )  # fmt: skip
    return MomentState(ids=ids, count=count, mean=mean, mean_err=mean_err, M=M, order=order)


def merge_all(states: Iterable[MomentState]) -> MomentState:
    """Pairwise tree reduction of many states with :func:`merge`."""
    level = list(states)
    if not level:
        raise ValueError("merge_all needs at least one state")
    while len(level) > 1:
        nxt = [merge(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# --------------------------------------------------------------------------------------------
# cumulants
# --------------------------------------------------------------------------------------------


def cumulants_from_central_moments(mu: np.ndarray) -> np.ndarray:
    """``(..., order, d)`` central moments ``[mu1 = mean, mu2, ..., mu_order]`` -> cumulants
    ``[k1, ..., k_order]`` (formulas in the module docstring), ``order <= 8``."""
    mu = np.asarray(mu, dtype=np.float64)
    order = mu.shape[-2]
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 1..{MAX_ORDER}, got {order}")
    m = {p: mu[..., p - 1, :] for p in range(1, order + 1)}
    k = np.empty_like(mu)
    k[..., 0, :] = m[1]
    if order >= 2:
        k[..., 1, :] = m[2]
    if order >= 3:
        k[..., 2, :] = m[3]
    if order >= 4:
        k[..., 3, :] = m[4] - 3 * m[2] ** 2
    if order >= 5:
        k[..., 4, :] = m[5] - 10 * m[3] * m[2]
    if order >= 6:
        k[..., 5, :] = m[6] - 15 * m[4] * m[2] - 10 * m[3] ** 2 + 30 * m[2] ** 3
    if order >= 7:
        k[..., 6, :] = m[7] - 21 * m[5] * m[2] - 35 * m[4] * m[3] + 210 * m[3] * m[2] ** 2
    if order >= 8:
        k[..., 7, :] = (
            m[8]
            - 28 * m[6] * m[2]
            - 56 * m[5] * m[3]
            - 35 * m[4] ** 2
            + 420 * m[4] * m[2] ** 2
            + 560 * m[3] ** 2 * m[2]
            - 630 * m[2] ** 4
        )
    return k


def root_transform(k: np.ndarray) -> np.ndarray:
    """``(..., order, d)``: ``k_n -> sign(k_n) |k_n|^(1/n)`` for ``n >= 2`` (``k1`` unchanged)."""
    k = np.array(k, dtype=np.float64, copy=True)
    order = k.shape[-2]
    for n in range(2, order + 1):
        v = k[..., n - 1, :]
        if n == 3:
            k[..., n - 1, :] = np.cbrt(v)  # odd root: keeps the sign
            continue
        a = np.abs(v)
        if n == 2:
            r = np.sqrt(a)
        elif n == 4:
            r = np.sqrt(np.sqrt(a))
        elif n == 6:
            r = np.cbrt(np.sqrt(a))
        elif n == 8:
            r = np.sqrt(np.sqrt(np.sqrt(a)))
        else:
            r = a ** (1.0 / n)
        k[..., n - 1, :] = np.copysign(r, v)
    return k


def cumulant_features(
    features, segment_ids, order: int = 2, root: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Order-``order`` cumulant structure features of a flat atom array.

    Returns ``(ids, X)``: the sorted unique segment ids and ``X`` of shape
    ``(n_segments, order * d)``, float64, ``X[s] = [k1 | k2 | ... | k_order]``.
    """
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 1..{MAX_ORDER}, got {order}")
    state = MomentState.from_atoms(features, segment_ids, order=order)
    return state.ids, state.structure_features(order, root=root)


def _pool(features, segment_ids, mean: bool):
    x, seg = _check_inputs(features, segment_ids)
    groups = _group(seg)
    out = np.empty((groups.ids.shape[0], x.shape[1]))
    for segs, rows in groups.blocks(x.shape[1]):
        xt = _block_rows(x, groups, rows)
        loc = groups.starts[segs] - groups.starts[segs.start]
        total = np.add.reduceat(xt, loc, axis=1)
        out[segs] = (total / groups.counts[segs] if mean else total).T
    _check_finite(out, groups.ids, "non-finite feature value (NaN or inf)")
    return groups.ids, out


def mean_pooling(features, segment_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, X)`` with ``X[s] = (1/n_s) sum_{i in s} x_i``, shape ``(n_segments, d)``."""
    return _pool(features, segment_ids, mean=True)


def sum_pooling(features, segment_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, X)`` with ``X[s] = sum_{i in s} x_i``, shape ``(n_segments, d)``."""
    return _pool(features, segment_ids, mean=False)
