"""latentray.method.splits against sklearn's train_test_split (the paper's protocol)."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from latentray.method.splits import paper_split, structure_n_test


def _sklearn_float(n_rows, n_test, seed, labels=None):
    train, test = train_test_split(
        np.arange(n_rows), test_size=n_test / n_rows, random_state=seed, stratify=labels
    )
    return train, test


def _check_partition(train, test, n_rows, n_test):
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert len(np.unique(train)) == len(train) and len(np.unique(test)) == len(test)
    assert len(test) == n_test
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(n_rows))


@pytest.mark.parametrize(
    "n_rows,n_test,seed",
    [(5000, 1000, 0), (2001, 1000, 0), (12345, 1000, 7), (100, 37, 3), (3, 1, 0)],
)
def test_paper_split_equals_sklearn_float_call(n_rows, n_test, seed):
    # these sizes are ones where sklearn's ceil(n_test / n_rows * n_rows) == n_test
    assert np.ceil(n_test / n_rows * n_rows) == n_test
    train, test = paper_split(n_rows, n_test, seed=seed)
    ref_train, ref_test = _sklearn_float(n_rows, n_test, seed)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(test, ref_test)
    _check_partition(train, test, n_rows, n_test)


def test_seed_changes_the_draw():
    a = paper_split(5000, 1000, seed=0)[1]
    b = paper_split(5000, 1000, seed=1)[1]
    assert not np.array_equal(a, b)


def test_stratified_equals_sklearn():
    rng = np.random.default_rng(0)
    names = np.array(["mptrj", "salex", "omat", "mad"])
    labels = rng.choice(names, size=4000, p=[0.5, 0.3, 0.15, 0.05])
    train, test = paper_split(4000, 1000, seed=0, labels=labels)
    ref_train, ref_test = _sklearn_float(4000, 1000, 0, labels)
    np.testing.assert_array_equal(test, ref_test)
    np.testing.assert_array_equal(train, ref_train)
    _check_partition(train, test, 4000, 1000)
    # stratified: each subset's share of the test set follows its share of the rows
    for name in np.unique(labels):
        share_all = np.mean(labels == name)
        share_test = np.mean(labels[test] == name)
        assert abs(share_all - share_test) <= 1.0 / 1000 + 1e-12
    # and it differs from the unstratified draw
    assert not np.array_equal(test, paper_split(4000, 1000, seed=0)[1])


def test_float_rounding_case_keeps_n_test_rows():
    # sklearn rounds (500 / 594) * 594 = 500.00000000000006 up: the float call draws 501 rows
    n_rows, n_test = 594, 500
    _, float_test = _sklearn_float(n_rows, n_test, 0)
    assert len(float_test) == n_test + 1
    train, test = paper_split(n_rows, n_test, seed=0)
    _check_partition(train, test, n_rows, n_test)
    # the first n_test rows of the same permutation
    assert np.all(np.isin(test, float_test))
    ref = train_test_split(np.arange(n_rows), test_size=n_test, random_state=0)
    np.testing.assert_array_equal(test, ref[1])


def test_singleton_classes_are_pooled():
    labels = np.array(["a"] * 60 + ["b"] * 30 + ["c", "d", "e"])  # c, d, e have one row each
    with pytest.raises(ValueError):
        train_test_split(np.arange(93), test_size=20 / 93, random_state=0, stratify=labels)
    train, test = paper_split(93, 20, seed=0, labels=labels)
    _check_partition(train, test, 93, 20)
    pooled = np.where(np.isin(labels, ["c", "d", "e"]), "zz_other", labels)
    ref_train, ref_test = train_test_split(
        np.arange(93), test_size=20, random_state=0, stratify=pooled
    )
    np.testing.assert_array_equal(test, ref_test)
    np.testing.assert_array_equal(train, ref_train)


def test_lone_singleton_joins_the_largest_class():
    labels = np.array([0] * 10 + [1] * 40 + [2])  # class 2 alone, and alone it cannot be pooled
    train, test = paper_split(51, 10, seed=3, labels=labels)
    _check_partition(train, test, 51, 10)
    merged = np.where(labels == 2, 1, labels)
    _, ref_test = train_test_split(np.arange(51), test_size=10, random_state=3, stratify=merged)
    np.testing.assert_array_equal(test, ref_test)


@pytest.mark.parametrize("n_rows,n_test", [(10, 10), (10, 11), (1, 1), (10, 0), (10, -1)])
def test_bad_sizes_raise(n_rows, n_test):
    with pytest.raises(ValueError, match="n_test"):
        paper_split(n_rows, n_test)


def test_labels_of_wrong_length_raise():
    with pytest.raises(ValueError, match="labels"):
        paper_split(10, 3, labels=[0, 1] * 4)


@pytest.mark.parametrize(
    "n,n_test,expected",
    [
        (5000, 1000, 1000),
        (2000, 1000, 1000),
        (1999, 1000, 999),
        (7, 1000, 3),
        (0, 1000, 0),
        (300, 100, 100),
        (150, 100, 75),
    ],
)
def test_structure_n_test(n, n_test, expected):
    assert structure_n_test(n, n_test) == expected


def test_structure_n_test_default():
    assert structure_n_test(10_000) == 1000
    assert structure_n_test(1500) == 750
