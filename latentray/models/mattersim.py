"""MatterSim (``mattersim``): an M3GNet checkpoint file (``mattersim-v1.0.0-1M.pth``, ...),
in float32 (M3GNet's forward pass is float32 only).

Layers:

* ``bbK``: the atom features after M3GNet main block K (width ``units``);
* ``ll``: the last hidden layer of the gated energy readout ``final``, whose output is
  ``g(x) * sigmoid(s(x))`` per atom: the inputs of both branches' last layers side by side,
  ``[g_hidden | s_hidden]`` (width ``2 * units``), everything the final maps see.

A checkpoint is MatterSim's own dictionary (``model_args``, ``model`` state dict, training
state), read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code.
Its weights must cover the model: a missing parameter is an error (MatterSim's own loader
would leave it random). Graphs are built by MatterSim's ``GraphConvertor`` and batched by its
PyG loader's ``Batch`` and ``batch_to_dict``; only the energy path runs, in
``torch.inference_mode`` (no forces, no stress). MatterSim treats any periodic cell as
periodic along all three axes: a slab or wire is given to it closed, with open-axis vectors
long enough that no image across them is within the cutoff (:func:`.cells.closed_open_axes`),
so that its graph is the partly periodic structure's.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, check_geometry
from .cells import closed_open_axes


class MatterSimAdapter(ModelAdapter):
    family = "mattersim"
    distribution = "mattersim"
    # MatterSim's M3GNet computes in float32 (its forward casts the periodic offsets to float32)
    dtypes = ("float32",)

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch
        from mattersim.datasets.utils.convertor import GraphConvertor
        from mattersim.forcefield.m3gnet.m3gnet import M3Gnet

        self._torch = torch
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"MatterSim checkpoint {checkpoint!r} is not a local file "
                                    "(latentray downloads nothing: fetch it first)")
        state = torch.load(checkpoint, map_location=self.device, weights_only=True)
        if state.get("model_name", "m3gnet") != "m3gnet":
            raise ValueError(f"{checkpoint}: model {state['model_name']!r}; only M3GNet "
                             "checkpoints are supported")
        args = dict(state["model_args"])
        model = M3Gnet(device=self.device, **args)
        missing, _ = model.load_state_dict(state["model"], strict=False)
        if missing:
            raise ValueError(f"{checkpoint}: the checkpoint lacks parameters {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        self.model = model.to(self.device).eval()
        self.convertor = GraphConvertor("m3gnet", float(args["cutoff"]), True,
                                        float(args["threebody_cutoff"]))
        self._file = checkpoint
        self._cutoff = float(args["cutoff"])
        self._threebody_cutoff = float(args["threebody_cutoff"])
        self._supported = frozenset(range(1, int(args["max_z"]) + 1))
        units = int(args["units"])
        self._widths = {f"bb{k + 1}": units for k in range(len(self.model.graph_conv))}
        self._widths["ll"] = 2 * units

    def prepare(self, atoms: Any):
        check_geometry(atoms)
        self.check(atoms.numbers)
        # MatterSim treats a periodic cell as periodic along all three axes: a slab or wire
        # is closed with open-axis vectors too long for any image across them to be within
        # the cutoff
        atoms = closed_open_axes(atoms, max(self._cutoff, self._threebody_cutoff))
        with warnings.catch_warnings():  # its note on the box it puts around a molecule
            warnings.simplefilter("ignore", UserWarning)
            return self.convertor.convert(atoms.copy())

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        from mattersim.forcefield.potential import batch_to_dict
        from torch_geometric.data import Batch

        torch = self._torch
        wanted = sorted({f"bb{len(self.model.graph_conv)}" if name == "bb" else name
                         for name in layers})
        captured: dict[str, Any] = {}
        hooks = [self.model.graph_conv[int(name[2:]) - 1].register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output[0]))
            for name in wanted if name != "ll"]
        if "ll" in wanted:
            for branch in ("g", "sigma"):
                hooks.append(getattr(self.model.final, branch)[-1].register_forward_pre_hook(
                    lambda module, args, branch=branch: captured.__setitem__(branch, args[0])))
        inputs = batch_to_dict(Batch.from_data_list(list(prepared)), device=self.device)
        try:
            with torch.inference_mode():
                self.model(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        if "ll" in wanted:
            captured["ll"] = torch.cat([captured.pop("g"), captured.pop("sigma")], dim=1)
        result = {name: captured[name].detach().cpu().numpy().astype(np.float32)
                  for name in wanted}
        return result
