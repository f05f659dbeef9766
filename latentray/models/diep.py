"""DIEP (``diep`` 2.0, on PyTorch Geometric): an exported DIEP potential, a folder holding
``model.json``, ``model.pt`` and ``state.pt`` (what DIEP's ``Potential.save`` writes), in
float32 (DIEP computes in ``diep.config.float_th``, float32).

Checkpoints: ``diep-matpes-r2scan`` is the model that the ``diep`` package ships,
``diep/pretrained_models/diep_fold1`` inside the installed package (trained on MatPES r2SCAN,
89 elements: H to Bi and Ac to Pu), found there whatever ``$DIEP_MODEL_DIR`` says; any other
checkpoint is the path of such a folder. The folder is loaded by DIEP's own
``diep.pretrained.load_potential``, which checks the three files are there before
``Potential.load`` could fall back to a download (latentray downloads nothing); a parameter
the model lacks in ``state.pt`` is an error there. Both ``.pt`` files are read by
``torch.load`` with this torch's default ``weights_only=True`` (tensors and plain containers,
no code). The recorded checkpoint file is the folder, and its sha256 that of its three files
together (:func:`folder_sha256`): the weights are in ``state.pt``, the constructor arguments
in ``model.pt``, so a change to either is a new checkpoint (a re-run extracts again).

Layers (an M3GNet-like model: an embedding, then ``nblocks`` blocks, each
``three_body_interactions[k]`` updating the bond features then ``graph_layers[k]`` updating
bonds and atoms):

* ``bbK``: the atom (node) features after block K, the output of ``graph_layers[K-1]``
  (width ``dim_node_embedding``); ``bbL`` (the last) is what the readout reads;
* ``ll``: the last hidden layer of the gated energy readout ``final_layer``
  (``WeightedReadOut``, a ``GatedMLP`` ``final_layer.gated``). With ``x_i`` atom i's ``bbL``
  features, its energy is

      e_i = (w_l . a_l(x_i) + b_l) * sigmoid(w_g . a_g(x_i) + b_g),

  where ``a_l`` is the ``layers`` branch before its last Linear (Linear, SiLU, ... ending in
  SiLU) and ``a_g`` the ``gates`` branch before its last Linear (its output goes through the
  sigmoid); the structure's energy is ``data_std * sum_i e_i + data_mean`` plus the element
  references. ``ll`` is ``[a_l(x_i) | a_g(x_i)]`` side by side (width twice the readout's
  hidden width, 128 for ``diep-matpes-r2scan``): everything the two final maps see, as for
  MatterSim's gated readout.

Graphs are built by DIEP's own ``Atoms2Graph`` (``diep.ext.ase``, the converter of its
``PESCalculator``) from the positions wrapped into the cell, exactly as its ``DIEPCalculator``
(what ``diep.pretrained.make_calculator`` returns) does; they are batched with
``torch_geometric``'s ``Batch.from_data_list`` and run through the unmodified ``Potential``
(which places the atoms from fractional coordinates and lattice, then calls the model; the
model builds the three-body line graph itself), with forces, stress and Hessian off, under
``torch.inference_mode``. The features are recorded by forward hooks; the pass stops right
after the last requested layer.

Periodicity is DIEP's own: ``Atoms2Graph`` searches images along the periodic axes only, so
a slab or wire keeps its periodicity; it needs a full-rank cell for one, so a slab or wire
given without cell vectors along its open axes gets them (:func:`.cells.with_open_axis_vectors`,
the atoms' distances unchanged; no image is made along an open axis whatever its vector).
A structure periodic along no axis (a molecule, with or without a cell) is taken as DIEP's
calculator takes it: Cartesian positions, an identity lattice, no images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..geometry import MIN_CELL_VOLUME
from .base import ModelAdapter, StopForward, check_geometry, file_sha256
from .cells import with_open_axis_vectors

# the models the diep package ships: name -> folder under diep/pretrained_models
PACKAGED = {"diep-matpes-r2scan": "diep_fold1"}
_FILES = ("model.json", "model.pt", "state.pt")


def folder_sha256(folder: Path) -> str:
    """sha256 of ``"NAME\\0SHA256\\n"`` for each of ``model.json``, ``model.pt``,
    ``state.pt`` in that order (``SHA256``: the file's own hex digest)."""
    import hashlib

    digest = hashlib.sha256()
    for name in _FILES:
        digest.update(f"{name}\0{file_sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def _last_linear(sequence: Any) -> Any:
    from torch import nn

    return [m for m in sequence if isinstance(m, nn.Linear)][-1]


class DIEPAdapter(ModelAdapter):
    family = "diep"
    distribution = "diep"
    # DIEP's layers compute in diep.config.float_th (float32); float64 would mean changing
    # that global (and torch's default dtype) for the whole process
    dtypes = ("float32",)

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch

        import diep
        from diep.ext.ase import Atoms2Graph
        from diep.pretrained import load_potential

        self._torch = torch
        if checkpoint in PACKAGED:
            folder = Path(diep.__file__).resolve().parent / "pretrained_models" / \
                PACKAGED[checkpoint]
        elif Path(checkpoint).is_dir():
            folder = Path(checkpoint).resolve()
        else:
            raise ValueError(
                f"unknown DIEP checkpoint {checkpoint!r}: neither a packaged model "
                f"({', '.join(PACKAGED)}) nor an existing folder with {', '.join(_FILES)} "
                "(latentray downloads nothing)")
        missing = [name for name in _FILES if not (folder / name).is_file()]
        if missing:  # load_potential checks this too; said here with the checkpoint's name
            raise FileNotFoundError(f"DIEP checkpoint {checkpoint!r}: {folder} lacks "
                                    f"{', '.join(missing)}")
        potential = load_potential(folder, device=self.device, stress=False)
        model = potential.model
        if model.is_intensive or not hasattr(model.final_layer, "gated"):
            raise ValueError(f"{checkpoint}: an intensive DIEP model (no per-atom energy "
                             "readout); only potentials are supported")
        if model.include_state:
            raise ValueError(f"{checkpoint}: a DIEP model with state features is not "
                             "supported")
        if potential.apply_chunking:
            raise ValueError(f"{checkpoint}: chunked evaluation (apply_chunking) is not "
                             "supported")
        # the energy only: no forces, stress nor Hessian (no gradient is taken)
        potential.calc_forces = potential.calc_stresses = potential.calc_hessian = False
        self.potential = potential.eval()
        self.model = model
        self.converter = Atoms2Graph(model.element_types, model.cutoff)
        self._file = str(folder)
        self._sha256 = folder_sha256(folder)
        self._cutoff = float(model.cutoff)
        self._threebody_cutoff = float(model.threebody_cutoff)

        from ase.data import atomic_numbers

        self._supported = frozenset(atomic_numbers[symbol] for symbol in model.element_types)
        gated = model.final_layer.gated
        self._ll_taps = (_last_linear(gated.layers), _last_linear(gated.gates))
        width = int(model.embedding.dim_node_embedding)
        self._widths = {f"bb{k + 1}": width for k in range(len(model.graph_layers))}
        self._widths["ll"] = sum(int(linear.in_features) for linear in self._ll_taps)

    def prepare(self, atoms: Any):
        """ase.Atoms -> DIEP's graph (a ``DIEPData``, on CPU), or StructureError."""
        from ase import Atoms

        check_geometry(atoms)
        self.check(atoms.numbers)
        # DIEP's converter takes partial periodicity but needs a full-rank cell for it
        atoms = with_open_axis_vectors(atoms, self._cutoff, min_volume=MIN_CELL_VOLUME)
        # a bare copy (no calculator, constraints or info travel along), wrapped into the
        # cell along its periodic axes as DIEPCalculator does before building its graph
        bare = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                     pbc=atoms.pbc)
        bare.wrap()
        graph, _lattice, _state = self.converter.get_graph(bare)
        return graph

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        """One batched pass; not re-entrant (its hooks live for the call): one at a time."""
        from torch_geometric.data import Batch

        torch = self._torch
        captured: dict[str, Any] = {}
        last = layers[-1]

        def record(name: str, value: Any) -> None:
            captured[name] = value
            done = last in captured or (last == "ll" and {"ll_l", "ll_g"} <= set(captured))
            if done:
                raise StopForward

        hooks = []
        try:
            for name in layers:
                if name == "ll":
                    for key, linear in zip(("ll_l", "ll_g"), self._ll_taps):
                        hooks.append(linear.register_forward_pre_hook(
                            lambda module, args, key=key: record(key, args[0])))
                else:
                    block = self.model.graph_layers[int(name[2:]) - 1]
                    hooks.append(block.register_forward_hook(
                        lambda module, args, output, name=name: record(name, output[1])))
            batch = Batch.from_data_list(list(prepared))
            if self.device != "cpu":
                batch = batch.to(self.device)
            with torch.inference_mode():
                try:
                    self.potential(batch, batch.lattice, None)
                except StopForward:
                    pass
        finally:
            for hook in hooks:
                hook.remove()
        if "ll" in layers:
            captured["ll"] = torch.cat([captured.pop("ll_l"), captured.pop("ll_g")], dim=1)
        missing = [name for name in layers if name not in captured]
        if missing:  # pragma: no cover - would mean DIEP's code path changed
            raise RuntimeError(f"DIEP forward did not reach layer(s) {missing}")
        return {name: captured[name].detach().cpu().numpy().astype(np.float32)
                for name in layers}
