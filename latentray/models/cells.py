"""A full-rank cell for a structure that is periodic along some axes only, for the families
whose graph code needs one (kept apart from :mod:`latentray.geometry`, which every stage's
cached work depends on)."""

from __future__ import annotations

import numpy as np


def cell_for_open_axes(cell: np.ndarray, positions: np.ndarray, pbc: np.ndarray,
                       cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """A full-rank cell (and positions) for a structure periodic along ``pbc`` only, for a
    model that needs one: the periodic vectors kept, each non-periodic one replaced by a
    unit vector ``e`` orthogonal to the periodic vectors (and to the other replaced ones)
    times ``L = extent + 2 cutoff + 1`` A, where ``extent`` is the spread of the positions
    along ``e``; the atoms are moved along ``e`` to start ``cutoff + 0.5`` A inside it.

    The distances between atoms do not change. The images of an atom across a non-periodic
    axis, if a model makes them, are at least ``L - extent > 2 cutoff`` away from every atom
    (their offset along ``e`` is a non-zero multiple of ``L``), so none is ever a neighbour.
    A molecule without a cell gets the box ``diag(extent + 2 cutoff + 1)``.
    """
    cell = np.array(cell, dtype=float)
    pbc = np.asarray(pbc, dtype=bool)
    periodic = cell[pbc]
    if len(periodic):  # the orthonormal complement of the periodic vectors' span
        basis = np.linalg.svd(periodic, full_matrices=True)[2][len(periodic):]
    else:
        basis = np.eye(3)
    cell[~pbc] = basis
    if np.linalg.det(cell) < 0:  # keep it right-handed
        basis[0] *= -1
    along = np.asarray(positions, dtype=float) @ basis.T  # (n_atoms, n_open)
    lo = along.min(axis=0)
    cell[~pbc] = basis * (along.max(axis=0) - lo + 2 * cutoff + 1.0)[:, None]
    return cell, positions + (cutoff + 0.5 - lo) @ basis


def closed_open_axes(atoms, cutoff: float):
    """``atoms`` as a structure periodic along all three axes with the same graph, for a
    model that knows only "periodic along every axis" or "along none": where ``pbc`` is
    partial, a copy with the cell of :func:`cell_for_open_axes` and ``pbc`` all true (no
    image across an open axis is within ``cutoff`` of any atom); otherwise ``atoms``."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.all() or not pbc.any():
        return atoms
    from ase import Atoms

    cell, positions = cell_for_open_axes(atoms.cell[:], atoms.positions, pbc, cutoff)
    return Atoms(numbers=atoms.numbers, positions=positions, cell=cell, pbc=True)


def with_open_axis_vectors(atoms, cutoff: float, min_volume: float):
    """``atoms`` with full-rank cell vectors along its open axes, periodicity unchanged, for
    a model whose own code takes partial periodicity but needs a cell of at least
    ``min_volume`` A^3: where ``pbc`` is partial and the cell smaller (ASE builds slabs and
    wires without cell vectors along their open axes), a copy with the cell of
    :func:`cell_for_open_axes`; otherwise ``atoms``."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.all() or not pbc.any() or abs(np.linalg.det(atoms.cell[:])) >= min_volume:
        return atoms
    cell, positions = cell_for_open_axes(atoms.cell[:], atoms.positions, pbc, cutoff)
    out = atoms.copy()
    out.set_cell(cell, scale_atoms=False)
    out.positions = positions
    return out
