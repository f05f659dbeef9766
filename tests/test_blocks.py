"""latentray.analysis.blocks: the rows the streamed fits read, from Parquet files as written
and as they may come (out of order, with structures only one side processed)."""

import posixpath

import numpy as np
import pyarrow as pa

from latentray.analysis.blocks import ModelSides, PairSource
from latentray.store import Store, latent_table


def _write_side(store, model, ids, index, n_atoms, numbers, X, order=None):
    table = latent_table(ids, index, n_atoms, numbers, X, metadata={})
    if order is not None:
        table = table.take(pa.array(order))
    store.write_table(posixpath.join(store.latents_dir("d", model, "bb"), store.part(0)), table)


def test_sides_written_out_of_order_or_with_other_structures_align(tmp_path):
    """The readers sort a side's rows into dataset order and keep the structures both sides
    processed, whether or not the files are already aligned (the fast path when they are)."""
    rng = np.random.default_rng(0)
    store = Store(str(tmp_path))
    n_atoms = np.array([3, 1, 4, 2, 5])
    index, ids = np.arange(5), np.array([f"s{i}" for i in range(5)])
    numbers = rng.integers(1, 90, n_atoms.sum())
    X, Y = rng.standard_normal((n_atoms.sum(), 4)), rng.standard_normal((n_atoms.sum(), 3))
    store.write_table(store.structures_path("d", 0), pa.table({
        "structure_id": ids, "structure_index": index, "n_atoms": n_atoms,
        "subset": np.array(["a", "b", "a", "b", "a"])}))
    _write_side(store, "a", ids, index, n_atoms, numbers, X)
    keep = np.repeat(index != 2, n_atoms)  # b did not process structure 2, and is shuffled
    _write_side(store, "b", ids[index != 2], index[index != 2], n_atoms[index != 2],
                numbers[keep], Y[keep], order=rng.permutation(keep.sum()))
    block = PairSource(str(tmp_path), "d", ("a", "bb"), ("b", "bb"), [0]).read(0, 0)
    np.testing.assert_allclose(block.X, X[keep].astype(np.float32))
    np.testing.assert_allclose(block.Y, Y[keep].astype(np.float32))
    np.testing.assert_array_equal(block.ids["structure_id"], np.repeat(ids, n_atoms)[keep])
    np.testing.assert_array_equal(block.groups["Z"], numbers[keep])
    sides = ModelSides(str(tmp_path), "d", [("a", "bb"), ("b", "bb")], [0], [4, 3]).read(0, 0)
    np.testing.assert_allclose(sides.X[0], X.astype(np.float32))
    np.testing.assert_allclose(sides.X[1][keep], Y[keep].astype(np.float32))
    assert not sides.X[1][~keep].any()  # zeros where b has no row
    # the LFRE gather's rows, one side's file in memory at a time: those of read()
    source = ModelSides(str(tmp_path), "d", [("a", "bb"), ("b", "bb")], [0], [4, 3])
    wanted = np.array([7, 9, 10, 14, 15, 16, 30])  # offset 5: rows 5..19; b lacks 9..12
    rows, parts = source.take(0, 5, wanted)
    block = source.read(0, 5)
    chosen = np.isin(block.row, wanted)
    np.testing.assert_array_equal(rows, block.row[chosen])
    assert len(rows) == 6 and not keep[rows - 5].all()
    for part, X in zip(parts, block.X):
        np.testing.assert_array_equal(part, X[chosen])
    np.testing.assert_array_equal(sides.present, np.stack([np.ones(len(X), bool), keep], 1))
