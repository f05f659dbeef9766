"""An MPtrj-shaped dataset of any size, in MPtrj's native JSON schema, from real structures.

    .venv/bin/python benchmarks/mptrj_like.py --structures 20000 --out mptrj-like.json

MPtrj (Deng et al., 2023) holds 1.58 M frames of 146k Materials Project relaxation
trajectories: ``{mp_id: {"<task>-<calc>-<ionic step>": {"structure": pymatgen Structure dict,
"corrected_total_energy", "force", "stress", ...}}}``, about 11 frames per material, a median
of about 30 atoms per frame and a tail to 444. This file writes the same schema and layout:

* **materials**: each one a real periodic structure (the 1,000 embedded MAD structures and the
  11 frames of ``mptrj-sample.json``), made into a supercell whose atom count approaches a
  target drawn from a log-normal (median ``--median-atoms``, 30; sigma 0.5; at most 444);
* **frames** per material: geometric, mean 11 (at least 1); frame ``s`` of ``S`` is the
  supercell with every atom displaced by a Gaussian of ``0.1 (1 - s/S)`` A and the cell
  strained by up to ``0.02 (1 - s/S)``: a relaxation-like trajectory;
* **energy**: the source structure's energy per atom times the atom count, plus the harmonic
  ``0.5 * 10 eV/A^2 * sum |displacement|^2`` (a stand-in, not a DFT value); forces
  ``-10 eV/A^2 * displacement``; stress zero; magmom None.

Material ``m`` depends only on ``(seed, m)``: the first ``N`` frames of a larger ``N'`` are
exactly the ``N`` frames of a smaller run (what a re-run with new structures needs). The JSON
is written as it is made (flat memory at any N); the last material is cut at ``N`` frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAD = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
SAMPLE = ROOT / "tests" / "data" / "mptrj-sample.json"

MAX_ATOMS = 444  # MPtrj's largest frame
MEAN_FRAMES = 11  # 1.58 M frames / 146k materials
SPRING = 10.0  # eV/A^2, the stand-in energy's harmonic constant


def base_structures() -> list[dict]:
    """The real periodic structures that materials are made from: symbols, cell, positions and
    energy per atom (MAD: PBEsol; the MPtrj sample: its corrected total energy)."""
    import ase.io

    bases = []
    for atoms in ase.io.read(MAD, ":"):
        if atoms.pbc.all():
            bases.append({"symbols": atoms.get_chemical_symbols(),
                          "cell": np.asarray(atoms.cell[:], float),
                          "positions": atoms.get_positions(),
                          "energy_per_atom": atoms.get_potential_energy() / len(atoms)})
    for frames in json.loads(SAMPLE.read_text()).values():
        for doc in frames.values():
            lattice = np.asarray(doc["structure"]["lattice"]["matrix"], float)
            sites = doc["structure"]["sites"]
            abc = np.asarray([site["abc"] for site in sites], float)
            bases.append({"symbols": [site["species"][0]["element"] for site in sites],
                          "cell": lattice, "positions": abc @ lattice,
                          "energy_per_atom": doc["corrected_total_energy"] / len(sites)})
    return bases


def _repeats(cell: np.ndarray, n_base: int, target: int) -> tuple[int, int, int]:
    """Supercell repeats approaching ``target`` atoms: grow the shortest repeated axis while
    the atom count stays at most ``target`` (never above ``MAX_ATOMS``)."""
    reps = [1, 1, 1]
    lengths = np.linalg.norm(cell, axis=1)
    while True:
        axis = int(np.argmin(lengths * reps))
        grown = n_base * np.prod(reps) // reps[axis] * (reps[axis] + 1)
        if grown > min(target, MAX_ATOMS):
            return tuple(reps)
        reps[axis] += 1


def material(bases: list[dict], seed: int, m: int, median_atoms: float) -> dict:
    """Material ``m``'s frames, as MPtrj's ``{frame_id: frame document}``."""
    rng = np.random.default_rng([seed, m])
    base = bases[int(rng.integers(len(bases)))]
    target = int(min(MAX_ATOMS, round(median_atoms * np.exp(0.5 * rng.standard_normal()))))
    reps = _repeats(base["cell"], len(base["symbols"]), target)
    shifts = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1)
    shifts = shifts.reshape(-1, 3) @ base["cell"]
    positions = (base["positions"][None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    symbols = base["symbols"] * len(shifts)
    cell = base["cell"] * np.asarray(reps)[:, None]
    n_frames = int(rng.geometric(1 / MEAN_FRAMES))
    mp_id, task = f"mp-{m}", 10_000_000 + m
    frac = np.linalg.solve(cell.T, positions.T).T
    frames = {}
    for s in range(n_frames):
        relax = 1 - s / n_frames
        strain = np.eye(3) + 0.02 * relax * rng.uniform(-1, 1, (3, 3))
        displacement = 0.1 * relax * rng.standard_normal(positions.shape)
        frame_cell = cell @ strain
        xyz = frac @ frame_cell + displacement
        frames[f"mp-{task}-0-{s}"] = _document(mp_id, symbols, frame_cell, xyz, displacement,
                                              base["energy_per_atom"])
    return frames


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))))


def _document(mp_id, symbols, cell, xyz, displacement, energy_per_atom) -> dict:
    """One frame in MPtrj's schema (the keys and layout of pymatgen's ``Structure.as_dict``)."""
    a, b, c = np.linalg.norm(cell, axis=1)
    abc = np.linalg.solve(cell.T, xyz.T).T
    n = len(symbols)
    energy = energy_per_atom * n + 0.5 * SPRING * float(np.sum(displacement ** 2))
    sites = [{"species": [{"element": el, "occu": 1}], "abc": f.tolist(),
              "properties": {}, "label": el, "xyz": x.tolist()}
             for el, f, x in zip(symbols, abc, xyz)]
    structure = {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0.0,
                 "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True],
                             "a": float(a), "b": float(b), "c": float(c),
                             "alpha": _angle(cell[1], cell[2]), "beta": _angle(cell[0], cell[2]),
                             "gamma": _angle(cell[0], cell[1]),
                             "volume": float(abs(np.linalg.det(cell)))},
                 "properties": {}, "sites": sites}
    return {"structure": structure, "uncorrected_total_energy": energy,
            "corrected_total_energy": energy, "energy_per_atom": energy / n,
            "ef_per_atom": None, "e_per_atom_relaxed": None, "ef_per_atom_relaxed": None,
            "force": (-SPRING * displacement).tolist(), "stress": [[0.0] * 3] * 3,
            "magmom": None, "bandgap": None, "mp_id": mp_id}


def write(path: Path, n_structures: int, seed: int = 0, median_atoms: float = 30.0) -> dict:
    """Write ``n_structures`` frames to ``path``; return counts (frames, materials, atoms and
    the atom-count percentiles)."""
    bases = base_structures()
    sizes, m = [], 0
    with open(path, "w") as out:
        out.write("{")
        while len(sizes) < n_structures:
            frames = material(bases, seed, m, median_atoms)
            keep = list(frames)[: n_structures - len(sizes)]
            out.write(("," if m else "") + json.dumps(f"mp-{m}") + ": "
                      + json.dumps({k: frames[k] for k in keep}))
            sizes += [len(frames[k]["structure"]["sites"]) for k in keep]
            m += 1
        out.write("}")
    sizes = np.asarray(sizes)
    return {"structures": int(len(sizes)), "materials": m, "atoms": int(sizes.sum()),
            "atoms_per_structure": {q: float(np.percentile(sizes, q)) for q in (5, 50, 95, 100)},
            "bytes": path.stat().st_size}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median-atoms", type=float, default=30.0)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    counts = write(args.out, args.structures, args.seed, args.median_atoms)
    counts["seconds"] = round(time.perf_counter() - t, 1)
    json.dump(counts, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
