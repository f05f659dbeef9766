"""Orb (``orb-models``): a local state-dict checkpoint (``.ckpt``) of an Orb architecture.

Layers: ``bbK`` = the node features after message-passing step K of Orb's ``MoleculeGNS``
backbone (width ``latent_dim``); the last one, ``bb``, is what the energy head reads. There is
no ``ll``: Orb's energy head pools the node features over the structure before its MLP, so it
has no per-atom hidden layer. Orb is not an equivariant network (its edge features include
spherical harmonics of the edge vectors and rotation invariance is learned), so its features
are invariant only as far as the model learned to be.

An Orb checkpoint holds weights only (loaded with ``torch.load(weights_only=True)`` by Orb's
own ``load_model``, which runs no code from the file); the architecture comes from Orb's code:

* by default from the file name, for the files Orb publishes: the longest name in
  ``orb_models.forcefield.pretrained.ORB_PRETRAINED_MODELS`` that starts the file's base name
  (``orb-v3-conservative-inf-omat-20250404.ckpt`` -> ``orb-v3-conservative-inf-omat``), loaded
  by Orb's function of that name with the local file as ``weights_path``;
* or from ``options``: ``{architecture: orb_v3_direct_architecture, system_config: {radius: 6.0,
  max_num_neighbors: 20}, ...}``, any architecture function of ``pretrained`` and its keyword
  arguments (for models trained with another size).

Graphs are built by Orb's ``ase_atoms_to_atom_graphs`` and batched by its ``batch_graphs``;
only the backbone runs (no heads, no forces), in ``torch.inference_mode``. Orb knows
periodicity along all three axes or none: a slab or wire is given to it closed, with open-axis
vectors long enough that no image across them is within the radius
(:func:`.cells.closed_open_axes`), so that its graph is the partly periodic structure's.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, check_geometry
from .cells import closed_open_axes


def pretrained_name(file_name: str, names: Sequence[str]) -> str | None:
    """The longest of ``names`` that begins ``file_name``'s base name (None: none does)."""
    base = os.path.basename(file_name)
    matches = [name for name in names if base.startswith(name)]
    return max(matches, key=len) if matches else None


class OrbAdapter(ModelAdapter):
    family = "orb"
    distribution = "orb-models"
    option_names = frozenset({"architecture", "system_config", "arguments"})

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch
        from orb_models.forcefield import pretrained
        from orb_models.forcefield.atomic_system import SystemConfig

        self._torch = torch
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"Orb checkpoint {checkpoint!r} is not a local file "
                                    "(latentray downloads nothing: fetch it first)")
        precision = "float64" if self.dtype == "float64" else "float32-highest"
        default_dtype = torch.get_default_dtype()  # Orb's loader sets it for the process
        try:
            with warnings.catch_warnings():  # its notes on the default dtype it sets
                warnings.simplefilter("ignore", UserWarning)
                model = self._load(pretrained, SystemConfig, precision)
        finally:
            torch.set_default_dtype(default_dtype)
        self._dtype = torch.float64 if self.dtype == "float64" else torch.float32
        self.model = model.eval()
        self.backbone = model.model
        self.system_config = model.system_config
        self._file = checkpoint
        self._cutoff = float(self.system_config.radius)
        self._supported = None  # an embedding for every element 1..118
        # widths: from one evaluation of a two-atom probe (the backbone does not state them)
        from ase import Atoms

        self._widths = {f"bb{k + 1}": 0 for k in range(len(self.backbone.gnn_stacks))}
        probe = self.forward([self.prepare(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))],
                             list(self._widths))
        self._widths = {name: int(values.shape[1]) for name, values in probe.items()}

    def _load(self, pretrained, SystemConfig, precision: str):
        """The model, by its published name or by ``options``, through Orb's ``load_model``."""
        checkpoint = self.checkpoint
        architecture = self.options.get("architecture")
        if architecture is None:
            name = pretrained_name(checkpoint, list(pretrained.ORB_PRETRAINED_MODELS))
            if name is None:
                raise ValueError(
                    f"{checkpoint}: the file name starts with no published Orb model name "
                    f"({sorted(pretrained.ORB_PRETRAINED_MODELS)}); give the architecture "
                    "in the model's options: {architecture: orb_v3_direct_architecture, "
                    "system_config: {radius: ..., max_num_neighbors: ...}, arguments: {...}}")
            return pretrained.ORB_PRETRAINED_MODELS[name](
                weights_path=checkpoint, device=self.device, precision=precision,
                compile=False)
        if not architecture.endswith("_architecture") or not hasattr(pretrained, architecture):
            raise ValueError(f"{checkpoint}: unknown Orb architecture {architecture!r}")
        system_config = SystemConfig(**self.options.get("system_config", {}))
        model = getattr(pretrained, architecture)(device=self.device,
                                                  system_config=system_config,
                                                  **self.options.get("arguments", {}))
        return pretrained.load_model(model, checkpoint, self.device, precision=precision,
                                     compile=False)

    def prepare(self, atoms: Any):
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs

        check_geometry(atoms)
        # Orb knows periodicity along all three axes or none: a slab or wire is closed with
        # open-axis vectors too long for any image across them to be within the radius
        atoms = closed_open_axes(atoms, float(self.system_config.radius))
        return ase_atoms_to_atom_graphs(atoms, self.system_config, output_dtype=self._dtype,
                                        graph_construction_dtype=self._dtype)

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        from orb_models.forcefield.base import batch_graphs

        torch = self._torch
        wanted = sorted({f"bb{len(self._widths)}" if name == "bb" else name for name in layers})
        steps = [int(name[2:]) - 1 for name in wanted]
        captured: dict[int, Any] = {}
        hooks = [self.backbone.gnn_stacks[k].register_forward_hook(
            lambda module, args, output, k=k: captured.__setitem__(k, output[0]))
            for k in steps]
        batch = batch_graphs(list(prepared)).to(self.device)
        try:
            with torch.inference_mode():
                self.backbone(batch)
        finally:
            for hook in hooks:
                hook.remove()
        result = {name: captured[k].detach().cpu().numpy().astype(np.float32)
                  for name, k in zip(wanted, steps)}
        return result
