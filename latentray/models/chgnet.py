"""CHGNet (``chgnet`` package): latent features of a loaded checkpoint.

Layers (CHGNet 0.2.0 / 0.3.0 / r2scan all have 4 atom convolutions and a per-atom
readout MLP, ``mlp_first=True``):

``bb1 .. bb{K-1}``
    atom features after ``atom_conv_layers[k-1]``; ``bb{K-1}`` is exactly CHGNet's own
    ``predict_structure(..., return_atom_feas=True)["atom_fea"]`` (the features before
    the last convolution);
``bbK``
    atom features after the last convolution, after ``readout_norm`` when the model has
    one (0.3.0 and r2scan: a LayerNorm; 0.2.0: none) -- the input of the readout MLP;
``ll``
    the input of the last ``nn.Linear`` of ``model.mlp`` (per atom); offered only when
    the model sums per-atom energies (``mlp_first``), absent from ``info`` otherwise.

The features are recorded by forward hooks on the unmodified loaded model during its own
batched ``forward(graphs, task="e")`` under ``torch.inference_mode``; the pass stops right
after the last requested layer (no readout when not needed, never forces or stress).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..geometry import MIN_CELL_VOLUME
from .base import ModelAdapter, StopForward, StructureError, check_geometry
from .cells import cell_for_open_axes

PACKAGED = ("0.3.0", "0.2.0", "r2scan")


def _from_file(cls: Any, path: str) -> Any:
    """``CHGNet.from_file``, with tensors-only unpickling and CHGNet.load's 0.2.0 fix.

    The 0.2.0 weights have biases in their ``mlp_out`` layers, which ``CHGNet.load`` asks
    for with ``mlp_out_bias=True`` but ``from_file`` does not: ``from_file`` fails on that
    very file. The flag is read here from the state dict itself.
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    dct = state["model"] if "model" in state else state
    kwargs = {}
    if "mlp_out_bias" not in dct["model_args"]:
        kwargs["mlp_out_bias"] = any(".mlp_out.layers." in key and key.endswith(".bias")
                                     for key in dct["state_dict"])
    return cls.from_dict(dct, **kwargs)


class CHGNetAdapter(ModelAdapter):
    family = "chgnet"
    distribution = "chgnet"

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
                 modality: str | None = None, options: dict | None = None) -> None:
        super().__init__(checkpoint, device=device, dtype=dtype, modality=modality,
                         options=options)
        import torch
        from torch import nn

        self._torch_dtype = getattr(torch, dtype)

        import chgnet
        from chgnet.model import CHGNet

        sink = io.StringIO()  # CHGNet prints "CHGNet vX initialized with N parameters"
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if checkpoint in PACKAGED:
                files = sorted((Path(chgnet.__file__).parent / "pretrained" / checkpoint)
                               .glob("*.pth.tar"))
                if len(files) != 1:
                    raise FileNotFoundError(
                        f"expected one packaged CHGNet {checkpoint} checkpoint, found {files}"
                    )
                self._file = str(files[0].resolve())
                model = CHGNet.load(model_name=checkpoint, use_device=device, verbose=False)
            elif Path(checkpoint).is_file():
                self._file = str(Path(checkpoint).resolve())
                model = _from_file(CHGNet, self._file)
            else:
                raise ValueError(
                    f"unknown CHGNet checkpoint {checkpoint!r}: neither a packaged model "
                    f"({', '.join(PACKAGED)}) nor an existing file"
                )
        model = model.to(device=device, dtype=self._torch_dtype).eval()
        if model.composition_model is not None:
            # The elemental reference energy is not a latent feature; its input is always
            # float32 (AtomRef casts it), so it stays float32 when the model runs in float64.
            model.composition_model.float()
        self.model = model

        # Layer -> (module, kind): kind "out" records the module's output, "in" its input.
        convs = list(model.atom_conv_layers)
        self._taps: dict[str, tuple["nn.Module", str]] = {}
        for k, conv in enumerate(convs[:-1], start=1):
            self._taps[f"bb{k}"] = (conv, "out")
        last = model.readout_norm if model.readout_norm is not None else convs[-1]
        self._taps[f"bb{len(convs)}"] = (last, "out")
        widths = {name: int(model.atom_fea_dim) for name in self._taps}
        if model.mlp_first:
            linears = [m for m in model.mlp.modules() if isinstance(m, nn.Linear)]
            self._taps["ll"] = (linears[-1], "in")
            widths["ll"] = int(linears[-1].in_features)
        self._widths = widths
        self._layers = list(widths)
        n_elements = int(model.atom_embedding.embedding.num_embeddings)
        self._supported = frozenset(range(1, n_elements + 1))  # row z-1 embeds element z
        self._cutoff = float(model.graph_converter.atom_graph_cutoff)

    # -- description ---------------------------------------------------------------

    @property
    def notes(self) -> str:
        if "ll" in self._widths:
            return ""
        return ("ll is not offered: this checkpoint pools atom features before its readout "
                "MLP (mlp_first=False), so the MLP has no per-atom input")

    # -- graph building --------------------------------------------------------------

    def prepare(self, atoms: Any) -> Any:
        """ase.Atoms -> CHGNet CrystalGraph (on CPU), or StructureError."""
        self.check(atoms.numbers)
        check_geometry(atoms)
        from ase import Atoms
        from pymatgen.io.ase import AseAtomsAdaptor

        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell[:], dtype=float)
        positions = np.asarray(atoms.positions, dtype=float)
        if not pbc.all() and abs(np.linalg.det(cell)) < MIN_CELL_VOLUME:
            # A molecule, wire or slab without a cell vector along an open axis: a box only
            # to define fractional coordinates. pymatgen's neighbour list (CHGNet's own)
            # makes no image along an axis that is not periodic, whatever its cell vector.
            cell, positions = cell_for_open_axes(cell, positions, pbc, self._cutoff)
        # A bare copy: no calculator results, magmoms or constraints travel along.
        bare = Atoms(numbers=atoms.numbers, positions=positions, cell=cell, pbc=pbc)
        structure = AseAtomsAdaptor.get_structure(bare)
        graph = self._graph(structure)
        import torch

        if self._torch_dtype == torch.float64:
            graph.atom_frac_coord = torch.tensor(structure.frac_coords, dtype=torch.float64)
            graph.lattice = torch.tensor(structure.lattice.matrix, dtype=torch.float64)
            graph.neighbor_image = graph.neighbor_image.to(torch.float64)
        return graph

    def _graph(self, structure: Any) -> Any:
        """CHGNet's ``CrystalGraph`` of ``structure``: the converter's neighbour list and
        tensors, its edge bookkeeping vectorised (:mod:`latentray.models.chgnet_graph`,
        equal element for element to the converter's own, 16x faster)."""
        import torch
        from chgnet.graph.crystalgraph import CrystalGraph

        from .chgnet_graph import crystal_graph_arrays

        converter = self.model.graph_converter
        center, neighbor, image, distance = structure.get_neighbor_list(
            r=converter.atom_graph_cutoff, sites=structure.sites, numerical_tol=1e-8)
        lonely = np.flatnonzero(np.bincount(center, minlength=len(structure)) == 0)
        if lonely.size:
            raise StructureError(
                f"{lonely.size} atom(s) with no neighbour within the cutoff of "
                f"{self._cutoff:g} A (first: index {int(lonely[0])})"
            )
        try:
            arrays = crystal_graph_arrays(center, neighbor, image, distance, len(structure),
                                          converter.bond_graph_cutoff)
        except ValueError as exc:
            raise StructureError(f"CHGNet graph: {exc}") from None
        int32 = {name: torch.from_numpy(np.ascontiguousarray(values, np.int32))
                 for name, values in arrays.items()}
        return CrystalGraph(
            atomic_number=torch.tensor(structure.atomic_numbers, dtype=torch.int32),
            atom_frac_coord=torch.tensor(structure.frac_coords, dtype=torch.float32,
                                         requires_grad=True),
            atom_graph=int32["atom_graph"],
            neighbor_image=torch.tensor(image, dtype=torch.float32),
            directed2undirected=int32["directed2undirected"],
            undirected2directed=int32["undirected2directed"],
            bond_graph=int32["bond_graph"],
            lattice=torch.tensor(structure.lattice.matrix, dtype=torch.float32,
                                 requires_grad=True),
            composition=structure.composition.formula,
            atom_graph_cutoff=converter.atom_graph_cutoff,
            bond_graph_cutoff=converter.bond_graph_cutoff,
        )

    # -- batched forward ---------------------------------------------------------------

    def _forward(self, prepared: Sequence[Any], names: Sequence[str]) -> dict[str, np.ndarray]:
        """One batched pass; not re-entrant (its hooks live for the call): one at a time."""
        import torch

        captured: dict[str, torch.Tensor] = {}
        last = names[-1]
        handles = []

        def make_hook(name: str, kind: str):
            if kind == "out":
                def hook(module, args, output):
                    captured[name] = output
                    if name == last:
                        raise StopForward
            else:
                def hook(module, args):
                    captured[name] = args[0]
                    if name == last:
                        raise StopForward
            return hook

        try:
            for name in names:
                module, kind = self._taps[name]
                if kind == "out":
                    handles.append(module.register_forward_hook(make_hook(name, kind)))
                else:
                    handles.append(module.register_forward_pre_hook(make_hook(name, kind)))
            graphs = prepared if self.device == "cpu" else [g.to(self.device) for g in prepared]
            with torch.inference_mode():
                try:
                    self.model(graphs, task="e")
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in names if n not in captured]
        if missing:  # pragma: no cover - would mean the model's code path changed
            raise RuntimeError(f"CHGNet forward did not reach layer(s) {missing}")
        out = {n: captured[n].detach().to("cpu", self._torch_dtype).numpy() for n in names}
        return out
