"""MACE (``mace-torch``): any ``.model`` file.

Layers:

* ``bbK``: the invariant (``0e``) channels of the node features after interaction K (and its
  product basis), as MACE's own ``MACECalculator.get_descriptors(invariants_only=True)``
  returns them, one layer at a time;
* ``ll``: the hidden activations of the last readout, the input of its final ``Linear``.

Batches are built with MACE's own data pipeline (``config_from_atoms``,
``AtomicData.from_config``, its ``torch_geometric`` ``Batch``), and the forward pass computes
no force, virial or stress. ``mace-torch`` pins ``e3nn`` 0.4.4, which loads its constants with
``torch.load`` and needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` under torch >= 2.6 (set here,
before the import). A ``.model`` file is a pickled module: loading it runs code from it, so it
must come from a trusted source (``weights_only=True`` cannot load it).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, check_geometry

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _scalar_columns(irreps) -> np.ndarray:
    """Column indices of the even scalar (``0e``) channels of an e3nn ``Irreps``."""
    columns = []
    for (mul, ir), block in zip(irreps, irreps.slices()):
        if ir.l == 0 and ir.p == 1:
            columns.extend(range(block.start, block.stop))
    return np.asarray(columns, dtype=np.int64)


class MACEAdapter(ModelAdapter):
    family = "mace"
    distribution = "mace-torch"
    modalities = None  # the model's heads

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch
        from mace.tools import utils

        self._torch = torch
        self._dtype = torch.float64 if self.dtype == "float64" else torch.float32
        model = torch.load(checkpoint, map_location=self.device, weights_only=False)
        self.model = model.to(self._dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._file = checkpoint
        self._cutoff = float(self.model.r_max)
        self.z_table = utils.AtomicNumberTable([int(z) for z in self.model.atomic_numbers])
        self._supported = frozenset(self.z_table.zs)
        heads = list(getattr(self.model, "heads", None) or ["Default"])
        if self.modality is not None and self.modality not in heads:
            raise ValueError(f"{checkpoint}: head {self.modality!r} not in the model's heads "
                             f"{heads}")
        self.heads = heads
        self.head = self.modality or heads[-1]
        # node_feats = [block of interaction 1 | block 2 | ...]: each block's 0e columns
        self._columns, start = [], 0
        for product in self.model.products:
            irreps = product.linear.irreps_out
            self._columns.append(start + _scalar_columns(irreps))
            start += irreps.dim
        self._widths = {f"bb{k + 1}": len(c) for k, c in enumerate(self._columns)}
        self._readout_hidden = self.model.readouts[-1].linear_2
        self._widths["ll"] = int(self._readout_hidden.irreps_in.dim)

    def prepare(self, atoms: Any):
        from mace import data
        from mace.tools import torch_tools

        check_geometry(atoms)
        self.check(atoms.numbers)
        with torch_tools.default_dtype(self._dtype):
            config = data.config_from_atoms(atoms, key_specification=data.KeySpecification(),
                                            head_name=self.head)
            graph = data.AtomicData.from_config(config, z_table=self.z_table,
                                                cutoff=self._cutoff, heads=self.heads)
        return graph

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        from mace.tools import torch_geometric

        torch = self._torch
        batch = torch_geometric.Batch.from_data_list(list(prepared)).to(self.device)
        captured = {}
        hook = self._readout_hidden.register_forward_pre_hook(
            lambda module, args: captured.__setitem__("ll", args[0]))
        try:
            with torch.inference_mode():
                out = self.model(batch.to_dict(), training=False, compute_force=False,
                                 compute_virials=False, compute_stress=False)
        finally:
            hook.remove()
        node_feats = out["node_feats"]
        result = {}
        last = f"bb{len(self._columns)}"
        for name in sorted({last if name == "bb" else name for name in layers}):
            if name == "ll":
                values = captured["ll"]
            else:
                values = node_feats[:, torch.as_tensor(self._columns[int(name[2:]) - 1])]
            result[name] = values.detach().cpu().numpy().astype(np.float32)
        return result
