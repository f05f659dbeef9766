"""GPU handling that is logic, tested without a GPU: the device an actor chooses, how many
actors the cluster's resources hold, and the config's check of ``device``."""

from __future__ import annotations

import pytest

from latentray.config import ExtractionConfig
from latentray.extraction.stage import n_actors
from latentray.extraction.worker import resolve_device


@pytest.mark.parametrize("extraction, resources, pending, expected", [
    ({}, {"CPU": 2}, 28, 2),  # a laptop: one actor per core
    ({}, {"CPU": 2}, 1, 1),  # never more actors than units
    ({"cpus_per_actor": 2}, {"CPU": 7}, 28, 3),
    # a GPU node: 16 CPUs, 2 GPUs; one GPU and 6 graph builders per actor -> 2 actors
    ({"gpus_per_actor": 1, "graph_builders": 6}, {"CPU": 16, "GPU": 2}, 28, 2),
    # the CPUs bind first: 7 per actor (1 + 6 builders) on 16 CPUs -> 2, though 4 half-GPUs
    ({"gpus_per_actor": 0.5, "graph_builders": 6}, {"CPU": 16, "GPU": 2}, 28, 2),
    ({"gpus_per_actor": 0.5}, {"CPU": 32, "GPU": 2}, 28, 4),  # two actors per GPU
    ({"gpus_per_actor": 1}, {"CPU": 32}, 28, 1),  # GPUs asked for, none there: still one
    ({"actors": 5}, {"CPU": 2}, 28, 5),  # given: as given ...
    ({"actors": 5}, {"CPU": 2}, 3, 3),  # ... but not more than the units
])
def test_actor_count_follows_cpus_gpus_and_builders(extraction, resources, pending, expected):
    assert n_actors(ExtractionConfig(**extraction), resources, pending) == expected


def test_auto_device_is_cuda_only_where_torch_sees_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True),
                                        ("cuda:3", True), ("gpu", False), ("cuda:x", False),
                                        ("CUDA", False)])
def test_device_is_checked_by_the_config(device, ok):
    from latentray.config import ConfigError, parse_config

    raw = {"output": "out", "datasets": [{"name": "mad", "path": "builtin:mad-val-1000"}],
           "models": [{"id": "m", "family": "chgnet", "checkpoint": "0.3.0",
                       "device": device}]}
    if ok:
        assert parse_config(raw).models[0].device == device
    else:
        with pytest.raises(ConfigError, match=r"models\[0\] \(m\)\.device: auto, cpu, cuda"):
            parse_config(raw)
