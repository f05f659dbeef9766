"""Cluster runs on one machine: Ray's cluster-config validation of cluster.yaml, a head and two
worker nodes (``ray.cluster_utils.Cluster``), actors and drivers killed in the middle of a run,
units that keep failing, ``latentray status``, and outputs on an object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from ase.io import read

from latentray.cli import main
from latentray.datasets import resolve_paths

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugin"
MAD = resolve_paths("builtin:mad-val-1000")[0]


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # what `ray up` does before it starts anything
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    broken = {**raw, "available_node_types": {**types, "gpu_worker": {
        **types["gpu_worker"], "resource": {"GPU": 1}}}}
    with pytest.raises(Exception, match="resource"):
        validate_config(prepare_config(broken))


def latents(output: Path, model: str | None = None) -> pd.DataFrame:
    table = ds.dataset(output / "latents", format="parquet", partitioning="hive").to_table(
        filter=None if model is None else ds.field("model") == model).to_pandas()
    return table.sort_values(["model", "layer", "structure_index", "atom_index"],
                             ignore_index=True)


def assert_same_latents(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b)
    for column in ("model", "layer", "structure_id", "atom_index", "Z"):
        assert (a[column].to_numpy() == b[column].to_numpy()).all(), column
    for (model, layer), rows in a.groupby(["model", "layer"]).groups.items():
        np.testing.assert_allclose(np.stack(a.features[rows].to_numpy()),
                                   np.stack(b.features[rows].to_numpy()), rtol=1e-6,
                                   atol=1e-6, err_msg=f"{model} {layer}")


def test_three_nodes_give_the_results_of_one(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output": "unused", "datasets": [{"name": "mad", "path": "builtin:mad-val-1000",
                                          "limit": 24}],
        "models": [{"id": "chgnet-0.3.0", "family": "chgnet", "checkpoint": "0.3.0",
                    "layers": ["bb"]}],
        "extraction": {"shard_size": 4},
        "analyses": {"n_test": 100, "metrics": ["gfre"], "order_metrics": ["gfre"],
                     "baselines": []}}))
    try:
        assert main(["run", str(config), "--output", str(tmp_path / "one"), "--quiet"]) == 0
    finally:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        assert main(["run", str(config), "--output", str(tmp_path / "three"), "--quiet",
                     "--address", cluster.address]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {json.loads(p.read_text())["worker"]["node"]
             for p in (tmp_path / "three" / "manifest").rglob("*.json")}
    assert len(nodes) >= 2  # the units did spread over the nodes
    assert_same_latents(latents(tmp_path / "one"), latents(tmp_path / "three"))
    one, three = (pd.read_csv(tmp_path / d / "results" / "reconstruction.csv")
                  for d in ("one", "three"))
    np.testing.assert_allclose(one.value, three.value, rtol=1e-9)


# the toy family of tests/plugin, with fault injection, run by `latentray run` in a subprocess


def toy_config(tmp_path: Path, output: Path, models: dict[str, dict], limit: int,
               shard_size: int, **extraction) -> Path:
    entries = []
    for name, extra in models.items():
        checkpoint = tmp_path / f"{name}.json"
        checkpoint.write_text(json.dumps({"cutoff": 5.0, "centres": [1.0, 2.0, 3.0, 4.0],
                                          "width": 0.4, **extra}))
        entries.append({"id": name, "family": "toy-radial", "checkpoint": str(checkpoint),
                        "layers": ["all"]})
    config = tmp_path / f"{output.name}.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(output),
        "datasets": [{"name": "mad", "path": "builtin:mad-val-1000", "limit": limit}],
        "models": entries, "extraction": {"shard_size": shard_size, "actors": 2, **extraction},
        "analyses": {"n_test": 100, "metrics": ["gfre"], "order_metrics": [],
                     "baselines": []}}))
    return config


def cli(*args: str, wait: bool = True, timeout: float = 600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PLUGIN)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    command = [sys.executable, "-m", "latentray.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def visible_parquet_files_are_complete(output: Path) -> None:
    """Every file a reader can see opens; partial writes exist only under hidden names."""
    for path in output.rglob("*.parquet"):
        if not path.name.startswith("."):
            pq.read_metadata(path)
    for path in output.rglob("*.tmp"):
        assert path.name.startswith(".")


def expected_rows(limit: int) -> int:
    return sum(len(a) for a in read(MAD, index=f":{limit}"))


def test_an_actor_killed_in_the_middle_of_a_unit_is_restarted_and_the_unit_rerun(tmp_path):
    marker = tmp_path / "killed-once"
    config = toy_config(tmp_path, tmp_path / "out", {"toy-a": {"kill_once_marker": str(marker)}},
                        limit=40, shard_size=10)
    done = cli("run", str(config), "--quiet")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert marker.exists()  # an actor was killed in the middle of a unit
    rows = latents(tmp_path / "out")
    n_atoms = expected_rows(40)
    for layer, part in rows.groupby("layer"):
        assert len(part) == n_atoms  # nothing missing ...
        assert not part.duplicated(["structure_index", "atom_index"]).any()  # ... or twice
    visible_parquet_files_are_complete(tmp_path / "out")
    (tmp_path / "clean").mkdir()
    clean = toy_config(tmp_path / "clean", tmp_path / "clean-out", {"toy-a": {}}, 40, 10)
    assert cli("run", str(clean), "--quiet").returncode == 0
    assert_same_latents(rows, latents(tmp_path / "clean-out"))


def test_failed_units_are_recorded_kept_apart_and_redone(tmp_path):
    output = tmp_path / "out"
    config = toy_config(tmp_path, output, {"toy-a": {}, "toy-b": {"kill_always": True}},
                        limit=20, shard_size=10)
    done = cli("run", str(config), "--quiet")
    assert done.returncode == 1
    assert "2 extraction unit(s) failed" in done.stderr and "toy-b" in done.stderr
    status = cli("status", str(output), "--config", str(config))
    assert status.returncode == 1
    text = status.stdout
    assert "toy-a" in text and "failed (2):" in text and "actor died" in text
    table = [line.split() for line in text.splitlines() if line.startswith("mad ")]
    assert ["mad", "toy-a", "2", "0", "0", "0", "0"] in table
    assert ["mad", "toy-b", "0", "0", "2", "0", "0"] in table
    assert len(latents(output, "toy-a")) == 2 * expected_rows(20)  # kept: bb1 and bb2
    # mend the model (a new checkpoint file content): its units are stale, toy-a's done
    (tmp_path / "toy-b.json").write_text(json.dumps({"cutoff": 5.0, "centres": [1.0, 2.5],
                                                     "width": 0.4}))
    text = cli("status", str(output), "--config", str(config)).stdout
    assert "changed since it ran: checkpoint_sha256" in text
    done = cli("run", str(config))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 already done" in done.stdout
    status = cli("status", str(output), "--config", str(config))
    assert status.returncode == 0 and "failed (" not in status.stdout


def test_status_names_what_made_each_unit_stale(tmp_path):
    """``latentray status --config``: each input of a unit, changed, is named; ``--json``."""
    output = tmp_path / "out"
    config = toy_config(tmp_path, output, {"toy-a": {}, "toy-b": {}}, limit=20, shard_size=10)
    assert cli("run", str(config), "--quiet").returncode == 0
    raw = yaml.safe_load(config.read_text())
    moved = tmp_path / "moved.json"  # the same weights under another name
    moved.write_text((tmp_path / "toy-a.json").read_text())
    changes = {"dtype": {"dtype": "float64"}, "layers": {"layers": ["bb1"]},
               "checkpoint": {"checkpoint": str(moved)}, "family": {"family": "toy-cosine"},
               "modality": {"modality": "squared"}, "options": {"options": {"scale": 2.0}}}
    for reason, change in changes.items():
        changed = tmp_path / f"{reason}.yaml"
        changed.write_text(yaml.safe_dump({**raw, "models": [{**raw["models"][0], **change},
                                                             raw["models"][1]]}))
        done = cli("status", str(output), "--config", str(changed), "--json")
        assert done.returncode == 1, done.stderr[-2000:]
        units = json.loads(done.stdout)["units"]
        assert [(u["model"], u["shard"], u["state"]) for u in units] == [
            ("toy-a", 0, "stale"), ("toy-b", 0, "done"), ("toy-a", 1, "stale"),
            ("toy-b", 1, "done")]
        assert all(u["detail"] == f"changed since it ran: {reason}"
                   for u in units if u["model"] == "toy-a"), units
    done = cli("status", str(output), "--config", str(config), "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert {u["state"] for u in report["units"]} == {"done"}
    assert report["fits"]["cached"] > 0 and report["fits"]["stale"] == {}
    # a shard whose structures changed: the dataset prepared again into the output without
    # its last structure (what status compares the manifests with: structures/)
    changed = tmp_path / "shard.yaml"
    changed.write_text(yaml.safe_dump({**raw, "datasets": [{**raw["datasets"][0], "limit": 19}]}))
    prepared = cli("prepare", str(changed), "--output", str(output), "--shard-size", "10")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    done = cli("status", str(output), "--config", str(config), "--json")
    assert done.returncode == 1, done.stderr[-2000:]
    units = json.loads(done.stdout)["units"]
    assert [(u["model"], u["shard"], u["state"], u["detail"]) for u in units] == [
        ("toy-a", 0, "done", ""), ("toy-b", 0, "done", ""),
        ("toy-a", 1, "stale", "changed since it ran: shard_sha256"),
        ("toy-b", 1, "stale", "changed since it ran: shard_sha256")]


def test_a_driver_killed_in_the_middle_resumes_to_the_results_of_an_uninterrupted_run(tmp_path):
    """The driver is killed at a known point, not after a sleep: the toy's gate lets the
    first 4 forward calls of the run through (4 units of one batch each) and holds every
    later one; the kill comes once 4 units have finished and both actors wait at the gate."""
    gate = tmp_path / "gate"
    gate.mkdir()
    held = {"gate_dir": str(gate), "free_batches": 4}
    config = toy_config(tmp_path, tmp_path / "out", {"toy-a": held, "toy-b": held},
                        limit=120, shard_size=10, batch_atoms=100_000)  # a unit: one batch
    driver = cli("run", str(config), wait=False)
    manifests = tmp_path / "out" / "manifest"
    deadline = time.time() + 300
    while len(list(manifests.rglob("*.json"))) < 4 or len(list(gate.glob("ticket-*"))) < 6:
        assert driver.poll() is None, driver.stdout.read()
        assert time.time() < deadline, "the run never reached the gate"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray's reaper ends the rest
    driver.wait(timeout=60)
    finished_before = len(list(manifests.rglob("*.json")))
    assert finished_before == 4  # of 2 models x 12 shards
    assert not (tmp_path / "out" / "run.json").exists()
    (gate / "release").touch()
    status = cli("status", str(tmp_path / "out"), "--config", str(config))
    assert status.returncode == 1 and "pending" in status.stdout
    visible_parquet_files_are_complete(tmp_path / "out")

    resumed = cli("run", str(config))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"{finished_before} already done" in resumed.stdout

    reference = toy_config(tmp_path, tmp_path / "ref", {"toy-a": {}, "toy-b": {}},
                           limit=120, shard_size=10, batch_atoms=100_000)
    assert cli("run", str(reference), "--quiet").returncode == 0
    assert_same_latents(latents(tmp_path / "out"), latents(tmp_path / "ref"))
    ours, theirs = (pd.read_csv(tmp_path / d / "results" / "reconstruction.csv")
                    for d in ("out", "ref"))
    np.testing.assert_allclose(ours.value, theirs.value, rtol=1e-12)


def test_graph_builders_give_the_latents_of_the_actor_alone(tmp_path):
    """Graphs built by a CPU builder actor beside the extraction actor (the GPU layout) give
    the latents and failures of an actor that builds its own; MAD 280..319 holds two Po
    structures that SevenNet cannot take."""
    import ray
    from ase.io import write

    frames = read(MAD, index="280:320")
    write(tmp_path / "slice.xyz", frames, format="extxyz")
    outputs = {}
    for builders in (0, 1):
        config = tmp_path / f"b{builders}.yaml"
        config.write_text(yaml.safe_dump({
            "output": str(tmp_path / f"out{builders}"),
            "datasets": [{"name": "mad", "path": str(tmp_path / "slice.xyz")}],
            "models": [{"id": "chgnet-0.3.0", "family": "chgnet", "checkpoint": "0.3.0",
                        "layers": ["bb", "ll"]},
                       {"id": "sevennet-0", "family": "sevenn", "checkpoint": "7net-0",
                        "layers": ["bb"]}],
            "extraction": {"shard_size": 20, "batch_atoms": 200, "actors": 1,
                           "graph_builders": builders},
            "analyses": {"n_test": 100, "metrics": ["gfre"], "order_metrics": [],
                         "baselines": []}}))
        try:
            assert main(["run", str(config), "--quiet"]) == 0
        finally:
            ray.shutdown()
        outputs[builders] = tmp_path / f"out{builders}"
    alone, built = (latents(outputs[b]) for b in (0, 1))
    assert len(alone) == 3 * sum(len(a) for a in frames) - len(frames[11]) - len(frames[38])
    assert_same_latents(alone, built)
    failures = [pq.read_table(outputs[b] / "failures" / "dataset=mad" / "model=sevennet-0")
                .to_pandas().sort_values("structure_index") for b in (0, 1)]
    assert failures[0].structure_index.tolist() == [11, 38]
    assert failures[0][["structure_index", "reason"]].equals(
        failures[1][["structure_index", "reason"]])
    manifest = json.loads((outputs[1] / "manifest" / "dataset=mad" / "model=chgnet-0.3.0" /
                           "part-00000.json").read_text())
    assert manifest["seconds"]["prepare"] > 0 and "wait_for_graphs" in manifest["seconds"]


def test_a_new_model_or_new_shards_redo_only_their_units_and_fits(tmp_path):
    """The scheduled re-run: a model added to the config runs only its own units and the
    fits that involve it; more structures (new shards) run only the new units, and every
    fit again (its data changed). The end equals a run from scratch."""
    two = {"toy-a": {}, "toy-b": {}}
    three = {**two, "toy-c": {"width": 0.6}}
    output = tmp_path / "out"
    first = cli("run", str(toy_config(tmp_path, output, two, limit=20, shard_size=10)))
    assert first.returncode == 0, first.stderr[-3000:]
    added = cli("run", str(toy_config(tmp_path, output, three, limit=20, shard_size=10)))
    assert added.returncode == 0, added.stderr[-3000:]
    assert "6 unit(s): 4 already done (manifest matches), 2 to run" in added.stdout
    assert "12 fits: 4 already done (inputs unchanged), 8 to run" in added.stdout
    assert "2 computed, 4 unchanged" in added.stdout  # toy-c's cumulants of bb (bb2), 2 shards
    grown = cli("run", str(toy_config(tmp_path, output, three, limit=30, shard_size=10)))
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "9 unit(s): 6 already done (manifest matches), 3 to run" in grown.stdout
    assert "12 fits: 0 already done (inputs unchanged), 12 to run" in grown.stdout
    (tmp_path / "scratch").mkdir()
    scratch = toy_config(tmp_path / "scratch", tmp_path / "scratch-out", three, 30, 10)
    assert cli("run", str(scratch), "--quiet").returncode == 0
    assert_same_latents(latents(output), latents(tmp_path / "scratch-out"))
    ours, theirs = (pd.read_csv(d / "results" / "reconstruction.csv")
                    for d in (output, tmp_path / "scratch-out"))
    assert len(ours) == 12
    np.testing.assert_allclose(ours.value, theirs.value, rtol=1e-12)


@pytest.fixture
def object_store():
    """An S3 endpoint on this machine (moto's server), with a bucket: (URI prefix, options)."""
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                      endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("latentray")
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    try:
        yield "s3://latentray", options
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def test_inputs_and_outputs_on_an_object_store(tmp_path, object_store):
    """Prepared structures read from, and every output written to, an S3 bucket through
    pyarrow's filesystems: the same latents and numbers as a local run; a re-run does no
    work; ``latentray status`` reads the bucket."""
    import pyarrow.fs as pafs

    bucket, options = object_store
    prepared = cli("prepare", "builtin:mad-val-1000", "--name", "mad", "--shard-size", "10",
                   "--output", f"{bucket}/prepared?{options}")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    local = toy_config(tmp_path, tmp_path / "local", {"toy-a": {}, "toy-b": {}}, limit=30,
                       shard_size=10)
    assert cli("run", str(local), "--quiet").returncode == 0
    raw = yaml.safe_load(local.read_text())
    raw["output"] = f"{bucket}/out?{options}"
    raw["datasets"] = [{"name": "mad", "format": "parquet", "limit": 30,
                        "path": f"{bucket}/prepared/structures/dataset=mad?{options}"}]
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump(raw))
    done = cli("run", str(remote))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "report at s3://latentray/out/report.html" in done.stdout
    fs, root = pafs.FileSystem.from_uri(f"{bucket}/out?{options}")
    copy = tmp_path / "copy"  # the bucket's outputs, fetched to compare
    pafs.copy_files(root, str(copy), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    local_rows, remote_rows = latents(tmp_path / "local"), latents(copy)
    assert (local_rows.structure_id.str.split(":").str[-1]
            == remote_rows.structure_id.str.split(":").str[-1]).all()
    np.testing.assert_array_equal(np.stack(local_rows.features), np.stack(remote_rows.features))
    ours, theirs = (pd.read_csv(d / "results" / "reconstruction.csv")
                    for d in (tmp_path / "local", copy))
    np.testing.assert_allclose(ours.value, theirs.value, rtol=1e-12)
    assert (copy / "report.html").exists() and list((copy / "figures").glob("*.png"))
    visible_parquet_files_are_complete(copy)
    again = cli("run", str(remote))
    assert "6 unit(s): 6 already done" in again.stdout and ": 0 already done" not in again.stdout
    status = cli("status", f"{bucket}/out?{options}")
    assert status.returncode == 0, status.stdout + status.stderr
    assert ["mad", "toy-a", "3", "0", "0", "0", "0"] in [
        line.split() for line in status.stdout.splitlines()]


def test_too_few_rows_for_the_test_set_is_a_clear_error(tmp_path):
    """n_test larger than the rows two models share: a message naming the dataset, the pair
    and the counts, exit status 2; the extracted latents are kept for the next run."""
    config = toy_config(tmp_path, tmp_path / "out", {"toy-a": {}, "toy-b": {}}, limit=2,
                        shard_size=10)
    done = cli("run", str(config), "--quiet")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"latentray: error: dataset mad: analyses.n_test=100 test atoms, but toy-a and toy-b "
        f"share only {expected_rows(2)} atoms: lower n_test or use more structures")
    assert len(latents(tmp_path / "out")) == 2 * 2 * expected_rows(2)
