"""Parquet layout: latents of different widths open as one dataset (pyarrow, DuckDB)."""

import duckdb
import numpy as np
import pyarrow.dataset as ds

from latentray.store import Store, features_matrix, latent_table


def write_two_models(tmp_path):
    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)
    ids = np.array(["d:0", "d:1"], dtype=object)
    n_atoms = np.array([2, 3])
    written = {}
    for model, width in [("a", 64), ("b", 128)]:
        X = rng.normal(size=(5, width)).astype(np.float32)
        table = latent_table(ids, np.array([0, 1]), n_atoms, np.array([1, 8, 8, 26, 1]), X,
                             {"model": model})
        store.write_table(store.latents_dir("d", model, "bb1") + "/part-00000.parquet", table)
        written[model] = X
    return store, written


def test_latents_of_different_widths_open_in_one_call(tmp_path):
    store, written = write_two_models(tmp_path)
    dataset = ds.dataset(store.path("latents"), format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 10
    assert set(table["model"].to_pylist()) == {"a", "b"}
    b = dataset.to_table(filter=ds.field("model") == "b")
    np.testing.assert_array_equal(features_matrix(b["features"]), written["b"])
    assert b["atom_index"].to_pylist() == [0, 1, 0, 1, 2]
    assert b["Z"].to_pylist() == [1, 8, 8, 26, 1]
    rows = duckdb.sql(
        f"select model, count(*) n, min(len(features)) w from read_parquet("
        f"'{store.path('latents')}/**/*.parquet', hive_partitioning=true) group by model "
        f"order by model").fetchall()
    assert rows == [("a", 5, 64), ("b", 5, 128)]


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
    store, _ = write_two_models(tmp_path)
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(names) == ["part-00000.parquet", "part-00000.parquet"]
    assert store.parquet_metadata(store.latents_dir("d", "a", "bb1") + "/part-00000.parquet")[
        "latentray.width"] == "64"
    assert store.parquet_metadata(str(tmp_path / "nothing.parquet")) == {}
