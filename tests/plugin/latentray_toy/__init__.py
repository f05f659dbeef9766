"""A third-party latentray adapter: radial Gaussian descriptors (see README.md)."""

from __future__ import annotations

import json

import numpy as np
from ase.neighborlist import neighbor_list

from latentray.models import ModelAdapter, StructureError


class RadialAdapter(ModelAdapter):
    """Gaussians of the neighbour distances (bb1) and the same weighted by the neighbour's
    atomic number (bb2). Modality ``squared``: the weights are Z^2; option ``scale``: every
    feature times it."""

    family = "toy-radial"
    distribution = "latentray-toy"
    modalities = ("linear", "squared")
    option_names = frozenset({"scale"})

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        self.power = 2 if self.modality == "squared" else 1
        self.scale = float(self.options.get("scale", 1.0))
        with open(checkpoint) as f:
            params = json.load(f)
        self._file = checkpoint
        self._cutoff = float(params["cutoff"])
        self.centres = np.asarray(params["centres"], dtype=np.float64)
        self.width = float(params["width"])
        # fault injection for the tests: sleep per batch; kill this process (SIGKILL) in the
        # middle of a unit, once (when the marker file does not exist yet) or every time
        self.seconds_per_batch = float(params.get("seconds_per_batch", 0.0))
        self.kill_once_marker = params.get("kill_once_marker")
        self.kill_always = bool(params.get("kill_always", False))
        # a gate, across every process: the first ``free_batches`` forward calls run, later
        # ones wait until ``gate_dir``/release exists (each call takes a ticket: a file made
        # with O_EXCL), so that a test can stop a run at a known point without timing
        self.gate_dir = params.get("gate_dir")
        self.free_batches = int(params.get("free_batches", 0))
        k = len(self.centres)
        self._widths = {"bb1": k, "bb2": k}
        self._supported = None

    def prepare(self, atoms):
        if len(atoms) == 0:
            raise StructureError("no atoms")
        i, j, d = neighbor_list("ijd", atoms, self._cutoff)
        return len(atoms), i, d, atoms.numbers[j]

    def _forward(self, prepared, layers):
        import os
        import signal
        import time

        time.sleep(self.seconds_per_batch)
        if self.gate_dir:
            ticket = 0
            while True:
                try:
                    os.close(os.open(os.path.join(self.gate_dir, f"ticket-{ticket:06d}"),
                                     os.O_CREAT | os.O_EXCL))
                    break
                except FileExistsError:
                    ticket += 1
            while (ticket >= self.free_batches
                   and not os.path.exists(os.path.join(self.gate_dir, "release"))):
                time.sleep(0.05)
        if self.kill_always or (self.kill_once_marker
                                and not os.path.exists(self.kill_once_marker)):
            if self.kill_once_marker:
                open(self.kill_once_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        out = {name: [] for name in layers}
        for n, i, d, zj in prepared:
            g = np.exp(-((d[:, None] - self.centres[None, :]) ** 2) / (2 * self.width**2))
            feats = {"bb1": np.zeros((n, len(self.centres))),
                     "bb2": np.zeros((n, len(self.centres)))}
            np.add.at(feats["bb1"], i, g)
            np.add.at(feats["bb2"], i, g * zj[:, None] ** self.power)
            for name in layers:
                out[name].append((self.scale * feats[name]).astype(np.float32))
        return {name: np.concatenate(v) for name, v in out.items()}


class CosineAdapter(RadialAdapter):
    """A second family of the same package: the Gaussians times a cosine cutoff."""

    family = "toy-cosine"

    def prepare(self, atoms):
        n, i, d, zj = super().prepare(atoms)
        return n, i, d, zj * 0.5 * (np.cos(np.pi * d / self._cutoff) + 1)
