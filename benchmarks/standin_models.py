"""Small random-weight stand-ins for CHGNet and SevenNet, for rehearsing extraction at MPtrj
scale (1e5-1e6 structures) on CPU: each built with its family's own constructor, saved in
that family's own checkpoint format, and loaded by path like any trained checkpoint
(``load_adapter("chgnet", ".../chgnet-small.pth.tar")``, ``load_adapter("sevenn",
".../sevennet-small.pth")``, and each family's own loader: ``CHGNet.from_file``,
``SevenNetCalculator(model=path)``).

    .venv/bin/python benchmarks/standin_models.py --out DIR [--seed 0] [--time 200]

writes ``DIR/chgnet-small.pth.tar`` and ``DIR/sevennet-small.pth`` and prints their paths
and parameter counts; ``--time N`` then times graph building (``adapter.prepare``) and the
batched forward pass (every layer, batches of 64 atoms, one torch thread) of the stand-ins
and of the packaged CHGNet 0.3.0 and SevenNet-0 on the first N embedded MAD structures.

The weights are each module's default initialisation under ``torch.manual_seed(seed)``:
random, not trained, the same for the same seed (and the same file bytes). The graphs are
those of the real models (same cutoffs, same element set), only the networks are smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import time
import warnings
from pathlib import Path

CHGNET_FILE = "chgnet-small.pth.tar"
SEVENNET_FILE = "sevennet-small.pth"

# CHGNet 0.3.0 has 64-wide features, 31 radial / angular bases and 4 convolutions. The
# stand-in: 32-wide atom features (bb1, bb2, ll), 16-wide bond and angle features, 9 bases
# (chgnet's documented default), 2 convolutions (bb1 is then its own atom_fea). Cutoffs:
# those of 0.3.0 (atom graph 6 A, bond graph 3 A), so the graphs are 0.3.0's.
CHGNET_ARGS = {
    "atom_fea_dim": 32,
    "bond_fea_dim": 16,
    "angle_fea_dim": 16,
    "num_radial": 9,
    "num_angular": 9,
    "n_conv": 2,
    "atom_conv_hidden_dim": 32,
    "bond_conv_hidden_dim": 16,
    "angle_layer_hidden_dim": 0,
    "mlp_hidden_dims": [32, 32],
    "atom_graph_cutoff": 6,
    "bond_graph_cutoff": 3,
    "composition_model": "MPtrj",  # chgnet's fixed elemental reference energies
    "mlp_first": True,  # per-atom readout, as every packaged CHGNet: "ll" is offered
}

# SevenNet-0 has 5 blocks of 128x0e+64x1e+32x2e. The stand-in: 2 blocks of 32x0e+32x1e
# (lmax 1; the last block is scalars only, as sevenn builds it), so bb1, bb2: 32, ll: 16;
# radial MLP 8 -> 16 -> 16. Like 7net-0: cutoff 5 A, XPLOR envelope from 4.5 A, 8 Bessel
# bases, SO(3) (no parity), linear self-connection, 7net-0's 89 elements and type map.
SEVENNET_ARGS = {
    "cutoff": 5.0,
    "channel": 32,
    "lmax": 1,
    "is_parity": False,
    "num_convolution_layer": 2,
    "radial_basis": {"radial_basis_name": "bessel", "bessel_basis_num": 8},
    "cutoff_function": {"cutoff_function_name": "XPLOR", "cutoff_on": 4.5},
    "weight_nn_hidden_neurons": [16, 16],
    "self_connection_type": "linear",
    "interaction_type": "nequip",
    # a fixed message denominator per block: 7net-0's (sqrt of its mean neighbour count)
    "conv_denominator": [35.9896, 35.9896],
    "train_denominator": False,
    "train_shift_scale": False,
    "use_bias_in_linear": False,
    "shift": 0.0,  # after "ll": no influence on any latent
    "scale": 1.0,
}


def _quiet():
    """chgnet and sevenn print and warn while they build models."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_chgnet(path: str | Path, seed: int = 0) -> Path:
    """A 2-convolution, 32-wide CHGNet (``CHGNET_ARGS``) with random weights, written as
    chgnet's trainer writes a checkpoint: ``torch.save({"model": model.as_dict()})``, which
    ``CHGNet.from_file`` reads (the trainer also saves its optimizer; there is none)."""
    import torch
    from chgnet.model import CHGNet

    path = Path(path)
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        model = CHGNet(**copy.deepcopy(CHGNET_ARGS))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.as_dict()}, path)
    return path


def sevennet_config(seed: int = 0) -> dict:
    """The full config a sevenn training run records (sevenn's own defaults for data,
    training and model, then ``SEVENNET_ARGS`` and 7net-0's elements)."""
    import sevenn
    import sevenn._const as const
    import sevenn._keys as KEY
    import sevenn.util as util

    with _quiet():
        species = util.load_checkpoint("7net-0").config[KEY.CHEMICAL_SPECIES]
    config = {}
    for defaults in (const.DEFAULT_DATA_CONFIG, const.DEFAULT_TRAINING_CONFIG,
                     const.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG):
        config.update(copy.deepcopy(defaults))
    config.update(util.chemical_species_preprocess(list(species)))
    config.update(copy.deepcopy(SEVENNET_ARGS))
    config.update({"version": sevenn.__version__, KEY.MODEL_TYPE: "E3_equivariant_model",
                   KEY.RANDOM_SEED: seed, KEY.DTYPE: "single"})
    return config


def build_sevennet(path: str | Path, seed: int = 0) -> Path:
    """A 2-block, 32-channel, lmax-1 SevenNet (``SEVENNET_ARGS``) with random weights, built
    by ``sevenn.model_build.build_E3_equivariant_model`` and written as sevenn's trainer
    writes a checkpoint (``config``, ``model_state_dict``, ``epoch``, ``time``, ``hash``;
    no optimizer or scheduler state). ``time`` and ``hash`` are fixed by the seed and the
    config (the trainer writes the clock and a random uuid), so the same seed gives the
    same file."""
    import torch
    from sevenn.model_build import build_E3_equivariant_model

    path = Path(path)
    config = sevennet_config(seed)
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        model = build_E3_equivariant_model(copy.deepcopy(config))
    digest = hashlib.sha256(json.dumps([seed, config], sort_keys=True, default=str)
                            .encode()).hexdigest()[:32]
    checkpoint = {
        "config": config,
        "model_state_dict": model.state_dict(),
        "epoch": 0,
        "time": f"random weights, seed {seed}",
        "hash": digest,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def build_all(out: str | Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out)
    return {"chgnet": build_chgnet(out / CHGNET_FILE, seed),
            "sevenn": build_sevennet(out / SEVENNET_FILE, seed)}


def time_extraction(models: dict[str, tuple[str, str]], n_structures: int,
                    batch_atoms: int = 64) -> list[dict]:
    """Seconds per structure of ``prepare`` and of ``forward(..., ["all"])`` (batches of
    ``batch_atoms`` atoms) for each ``label -> (family, checkpoint)``, one torch thread, on
    the first ``n_structures`` MAD structures that every model takes (SevenNet-0 lacks
    Po, At, Rn, Fr, Ra)."""
    import torch
    from ase.io import read

    from latentray.datasets import resolve_paths
    from latentray.extraction.worker import by_atoms
    from latentray.models import load_adapter

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    frames = [a for a in read(str(resolve_paths("builtin:mad-val-1000")[0]), index=":")
              if not {84, 85, 86, 87, 88}.intersection(a.numbers.tolist())][:n_structures]
    rows = []
    for label, (family, checkpoint) in models.items():
        with _quiet():
            adapter = load_adapter(family, checkpoint)
            adapter.forward([adapter.prepare(frames[0])], ["all"])  # warm-up
        start = time.perf_counter()
        prepared = [adapter.prepare(a) for a in frames]
        t_prepare = time.perf_counter() - start
        batches = list(by_atoms(prepared, lambda g: len(g.atomic_number) if family == "chgnet"
                                else int(g.num_nodes), batch_atoms))
        start = time.perf_counter()
        for batch in batches:
            adapter.forward(batch, ["all"])
        t_forward = time.perf_counter() - start
        n = len(frames)
        rows.append({"model": label, "structures": n,
                     "atoms": sum(len(a) for a in frames),
                     "parameters": n_parameters(adapter.model),
                     "prepare_s_per_structure": t_prepare / n,
                     "forward_s_per_structure": t_forward / n,
                     "total_s_per_structure": (t_prepare + t_forward) / n,
                     "prepare_share": t_prepare / (t_prepare + t_forward)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the two checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="also time extraction on the first N MAD structures")
    args = parser.parse_args()

    import torch

    from latentray.models import load_adapter

    paths = build_all(args.out, args.seed)
    for family, path in paths.items():
        with _quiet():
            adapter = load_adapter(family, str(path))
        info = adapter.info
        print(f"{path}  {family}  {n_parameters(adapter.model):,} parameters  "
              f"cutoff {info.cutoff:g} A  layers {info.layer_widths}  "
              f"sha256 {info.checkpoint_sha256[:12]}")
    if args.time:
        rows = time_extraction({"chgnet 0.3.0": ("chgnet", "0.3.0"),
                                "chgnet-small": ("chgnet", str(paths["chgnet"])),
                                "sevenn 7net-0": ("sevenn", "7net-0"),
                                "sevennet-small": ("sevenn", str(paths["sevenn"]))},
                               args.time)
        print(f"\n{rows[0]['structures']} MAD structures, {rows[0]['atoms']} atoms; "
              f"torch {torch.__version__}, 1 thread, batches of 64 atoms\n")
        print("| model | parameters | prepare s/struct | forward s/struct | total s/struct "
              "| prepare share |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters']:,} | {r['prepare_s_per_structure']:.5f} "
                  f"| {r['forward_s_per_structure']:.5f} | {r['total_s_per_structure']:.5f} "
                  f"| {r['prepare_share']:.0%} |")


if __name__ == "__main__":
    main()
