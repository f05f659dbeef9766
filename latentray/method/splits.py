"""Train/test splits of the paper's protocol (Chorna et al., arXiv:2512.05717).

The test set is ``n_test`` rows (1000 atoms, or 1000 structures) drawn by
``sklearn.model_selection.train_test_split`` with ``random_state=seed`` (0 by default),
stratified by a subset label when there is one; the training set is every other row.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["paper_split", "structure_n_test"]


def _stratification_labels(labels, n_rows: int):
    """Labels that ``StratifiedShuffleSplit`` accepts: classes with < 2 members pooled.

    Returns ``labels`` itself when every class has at least 2 members. Otherwise the rows of
    every class with a single member are pooled into one new class ("other", coded after the
    existing classes); if that pool is itself a single row (only one singleton class), the row
    joins the most populous class (the first of them in sorted label order, on a tie).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n_rows:
        raise ValueError(
            f"labels must be a 1-D array of length n_rows={n_rows}, got shape {labels.shape}"
        )
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    small = counts < 2
    if not small.any():
        return labels
    codes = codes.reshape(-1).copy()
    pooled = small[codes]
    if pooled.sum() >= 2:
        codes[pooled] = len(classes)  # "other"
    else:
        codes[pooled] = int(np.argmax(np.where(small, -1, counts)))
    return codes


class SplitError(ValueError):
    """A split that cannot be drawn (too few rows for the test set asked for)."""


def paper_split(n_rows: int, n_test: int, seed: int = 0, labels=None):
    """``(train_idx, test_idx)``: ``n_test`` random test rows, every other row for training.

    The draw is ``sklearn.model_selection.train_test_split(np.arange(n_rows), test_size=n_test,
    random_state=seed, stratify=labels)``, returned as int64 arrays in sklearn's own (shuffled)
    order, as a user of sklearn and skmatter would pass them on. This is the same
    draw as the paper's ``test_size=n_test / n_rows`` whenever that float gives ``n_test`` rows;
    sklearn rounds ``(n_test / n_rows) * n_rows`` *up*, and for many sizes (e.g. 500 of 594)
    the float product lands one ulp above ``n_test`` and the float form draws ``n_test + 1``
    test rows; passing the count keeps the test set at exactly ``n_test`` rows (the first
    ``n_test`` of the same permutation without labels).

    ``labels`` (one per row, e.g. the dataset subset) stratifies the draw. sklearn refuses a
    class with a single member; such classes are pooled into one extra "other" class before
    stratifying (a lone singleton joins the most populous class instead), so the draw is
    still stratified by every class that has at least two members.
    The row order of ``train_idx`` sets the folds of the default 2-fold fit in
    :mod:`latentray.reconstruction` (as in skmatter), which is why it is kept as drawn.
    """
    n_rows = int(n_rows)
    n_test = int(n_test)
    if n_test <= 0:
        raise ValueError(f"n_test must be positive, got {n_test}")
    if n_test >= n_rows:
        raise SplitError(
            f"n_test={n_test} leaves no training rows out of n_rows={n_rows}: "
            "n_test must be smaller than the number of rows (see structure_n_test)"
        )
    stratify = None if labels is None else _stratification_labels(labels, n_rows)
    train, test = train_test_split(
        np.arange(n_rows), test_size=n_test, random_state=seed, stratify=stratify
    )
    return train.astype(np.int64), test.astype(np.int64)


def structure_n_test(n_structures: int, n_test: int = 1000) -> int:
    """``n_test``, or half the structures (``n_structures // 2``) when fewer than ``2 * n_test``."""
    n_structures = int(n_structures)
    return int(n_test) if n_structures >= 2 * int(n_test) else n_structures // 2
