"""metatomic (``metatomic-torch``): an exported ``AtomisticModel`` file (PET-MAD, uPET, ...).

Layers: ``bb`` (stored as ``bb1``) is the model's standard per-atom ``feature`` output
(``features`` in older exports); ``ll`` is ``mtt::aux::energy_last_layer_features`` where the
model offers it. Widths are read from one evaluation on a two-atom probe when the model is
loaded (capabilities do not state them).

Structures become metatomic ``System`` objects with the neighbour lists the model requests
(computed by vesin, as metatomic's own ASE calculator does); a batch is one call of the model.
An exported model is TorchScript: loading it does not unpickle arbitrary Python objects, but
the file still runs the code it holds, so it must come from a trusted source.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import ModelAdapter, check_geometry

LAST_LAYER = "mtt::aux::energy_last_layer_features"


class MetatomicAdapter(ModelAdapter):
    family = "metatomic"
    distribution = "metatomic-torch"

    def __init__(self, checkpoint: str, **options) -> None:
        super().__init__(checkpoint, **options)
        import torch
        from metatomic.torch import load_atomistic_model
        from metatomic_ase._neighbors import AllNeighborsCalculator

        self._torch = torch
        self.model = load_atomistic_model(checkpoint).to(self.device)
        capabilities = self.model.capabilities()
        self._dtype = getattr(torch, capabilities.dtype)
        outputs = capabilities.outputs
        feature = "feature" if "feature" in outputs else "features"
        if feature not in outputs:
            raise ValueError(f"{checkpoint}: the model has no feature output; it offers "
                             f"{sorted(outputs)}")
        self._outputs = {"bb1": feature}
        if LAST_LAYER in outputs:
            self._outputs["ll"] = LAST_LAYER
        self._neighbours = AllNeighborsCalculator(self.model.requested_neighbor_lists())
        self._file = checkpoint
        self._cutoff = float(capabilities.interaction_range)
        self._supported = frozenset(int(z) for z in capabilities.atomic_types)
        self._widths = {}
        from ase import Atoms

        z = min(self._supported)
        probe = self._run([self.prepare(Atoms([z, z], positions=[[0, 0, 0], [0, 0, 1.5]]))],
                          list(self._outputs))
        self._widths = {name: int(values.shape[1]) for name, values in probe.items()}

    def prepare(self, atoms: Any):
        from metatomic.torch import System

        torch = self._torch
        check_geometry(atoms)
        self.check(atoms.numbers)
        # a System's cell vector along an open axis is zero (as metatomic's ASE calculator
        # gives it): a slab's or wire's vacuum vectors are dropped
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.where(pbc[:, None], atoms.cell.array, 0.0)
        return System(
            types=torch.as_tensor(atoms.numbers, dtype=torch.int32),
            positions=torch.as_tensor(atoms.positions, dtype=self._dtype),
            cell=torch.as_tensor(cell, dtype=self._dtype),
            pbc=torch.as_tensor(pbc, dtype=torch.bool)).to(self.device)

    def _run(self, systems: list, layers: Sequence[str]) -> dict[str, np.ndarray]:
        from metatomic.torch import ModelEvaluationOptions, ModelOutput

        systems = self._neighbours.compute(systems=list(systems))
        names = {layer: self._outputs[layer] for layer in layers}
        options = ModelEvaluationOptions(
            length_unit="angstrom",
            outputs={name: ModelOutput(sample_kind="atom") for name in names.values()})
        with self._torch.inference_mode():
            out = self.model(systems, options, check_consistency=False)
        result = {}
        for layer, name in names.items():
            block = out[name].block()
            samples = block.samples.values.cpu().numpy()  # (system, atom) per row
            order = np.lexsort((samples[:, 1], samples[:, 0]))
            result[layer] = block.values.detach().cpu().numpy()[order].reshape(
                len(order), -1).astype(np.float32)
        return result

    def _forward(self, prepared: Sequence[Any], layers: Sequence[str]) -> dict[str, np.ndarray]:
        return self._run(list(prepared), list(layers))
