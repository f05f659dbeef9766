"""UMA and other fairchem models (``fairchem-core``): an inference checkpoint file
(``uma-s-1p1.pt``, ``uma-s-1p2.pt``, ...), with the task as the modality.

Layers (eSCN-MD backbone, the invariant ``l = 0`` coefficient of each node's spherical
features, width ``sphere_channels``):

* ``bbK`` for K < L: the node features after message-passing layer K (after the backbone's
  charge balancing, as the next layer reads them);
* ``bbL``: the final node embedding after the last layer and the backbone's norm, what the
  energy head reads;
* ``ll``: the input of the last linear map of the energy head's MLP (width
  ``hidden_channels``), where the head is an MLP head (``MLP_EFS_Head``, UMA's).

The task (``modality: omat | omol | oc20 | odac | omc``, as the checkpoint lists them) selects
the dataset embedding, which is added to every atom's features and routes the mixture of
linear experts: UMA's features depend on it. Charge and spin come from ``atoms.info`` where
the structure has them, else fairchem's defaults for the task (charge 0; spin 0, or 1 for
omol).

The checkpoint is read with ``torch.load(weights_only=True)``, allowing only fairchem's
checkpoint dataclass and omegaconf's containers (no code runs from the file); the model is then
built by fairchem's ``load_inference_model`` with the settings of its batch predict unit, the
EMA weights, and no forces or stress. Graphs are built by fairchem (``AtomicData.from_ase``,
``atomicdata_list_to_batch``, the backbone's own radius graph). eSCN rotates each edge by a
random roll angle, so features repeat only to ~1e-6 unless the random state is fixed: each
batch is run under a fixed seed (``torch.random.fork_rng``), which makes a run repeatable.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, check_geometry
from .cells import with_open_axis_vectors

# what an inference checkpoint may contain besides tensors and plain containers
_SAFE_GLOBALS = [("fairchem.core.units.mlip_unit.api.inference", "MLIPInferenceCheckpoint"),
                 ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
                 ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"),
                 ("omegaconf.nodes", "AnyNode"), ("typing", "Any"),
                 ("collections", "defaultdict"), ("builtins", "dict"), ("builtins", "list"),
                 ("builtins", "int")]


class UMAAdapter(ModelAdapter):
    family = "uma"
    distribution = "fairchem-core"
    modalities = None  # the tasks the checkpoint lists

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch
        from fairchem.core.units.mlip_unit.api.inference import inference_settings_batch
        from fairchem.core.units.mlip_unit.utils import (get_backbone_class_from_checkpoint,
                                                         load_inference_model)

        self._torch = torch
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"fairchem checkpoint {checkpoint!r} is not a local file "
                                    "(latentray downloads nothing: fetch it first)")
        safe = [getattr(importlib.import_module(module), name) for module, name in _SAFE_GLOBALS]
        with torch.serialization.safe_globals(safe):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        overrides = get_backbone_class_from_checkpoint(state).build_inference_settings(
            inference_settings_batch())
        overrides.update(activation_checkpointing=False, regress_forces=False,
                         regress_stress=False)
        averaged, _ = load_inference_model(checkpoint, overrides={"backbone": overrides},
                                           use_ema=True, preloaded_checkpoint=state)
        self._dtype = torch.float64 if self.dtype == "float64" else torch.float32
        self.model = averaged.module.to(self.device, self._dtype).eval()
        self.backbone = self.model.backbone
        tasks = sorted(self.backbone.dataset_mapping or [])
        if self.modality is None and len(tasks) > 1:
            raise ValueError(f"{checkpoint}: choose the task as the model's modality, one of "
                             f"{tasks}")
        if self.modality is not None and self.modality not in tasks:
            raise ValueError(f"{checkpoint}: task {self.modality!r} is not one of {tasks}")
        self.task = self.modality or (tasks[0] if tasks else "omat")
        self._file = checkpoint
        self._cutoff = float(self.backbone.cutoff)
        self._supported = frozenset(range(1, int(self.backbone.max_num_elements)))
        self._head = self._mlp_head()
        n_layers = int(self.backbone.num_layers)
        self._widths = {f"bb{k + 1}": int(self.backbone.sphere_channels)
                        for k in range(n_layers)}
        if self._head is not None:
            self._widths["ll"] = int(self.backbone.hidden_channels)

    def _mlp_head(self):
        """(the head module to run, the last Linear of its energy MLP), or None."""
        for head in self.model.output_heads.values():
            for module in head.modules():
                block = getattr(module, "energy_block", None)
                if block is not None and len(block) > 0:
                    return head, block[-1]
        return None

    def prepare(self, atoms: Any):
        from fairchem.core.datasets.atomic_data import AtomicData

        check_geometry(atoms)
        self.check(atoms.numbers)
        # fairchem's radius graph is periodic along ``pbc`` only, but it refuses a partly
        # periodic cell under 0.1 A^3 (a slab or wire without open-axis vectors)
        atoms = with_open_axis_vectors(atoms, self._cutoff, min_volume=0.1).copy()
        self.model.validate_atoms_data(atoms, self.task)  # charge and spin defaults
        return AtomicData.from_ase(atoms, task_name=self.task, r_edges=False,
                                   radius=self._cutoff, max_neigh=None,
                                   r_data_keys=["spin", "charge"], target_dtype=self._dtype)

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        from fairchem.core.datasets.atomic_data import atomicdata_list_to_batch

        torch = self._torch
        n_layers = int(self.backbone.num_layers)
        wanted = sorted({f"bb{n_layers}" if name == "bb" else name for name in layers})
        captured: dict[str, Any] = {}
        hooks = [self.backbone.blocks[int(name[2:])].register_forward_pre_hook(
            lambda module, args, name=name: captured.__setitem__(name, args[0][:, 0, :]))
            for name in wanted if name.startswith("bb") and int(name[2:]) < n_layers]
        if "ll" in wanted:
            hooks.append(self._head[1].register_forward_pre_hook(
                lambda module, args: captured.__setitem__("ll", args[0])))
        batch = atomicdata_list_to_batch(list(prepared)).to(self.device)
        try:
            devices = [] if self.device == "cpu" else None  # None: every visible GPU's
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(0)  # eSCN's random roll angles: a repeatable run
                embedding = self.backbone(batch)
                captured[f"bb{n_layers}"] = embedding["node_embedding"][:, 0, :]
                if "ll" in wanted:
                    self._head[0](batch, embedding)
        finally:
            for hook in hooks:
                hook.remove()
        result = {name: captured[name].detach().cpu().numpy().astype(np.float32)
                  for name in wanted}
        return result
