"""What makes a structure's geometry unusable, said once for the dataset readers and the
model adapters."""

from __future__ import annotations

import numpy as np

MIN_CELL_VOLUME = 1e-6  # A^3; a periodic cell below it is degenerate


def geometry_problem(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                     pbc: np.ndarray) -> str | None:
    """Why this geometry cannot be used, or None: no atoms, atom and position counts that
    differ, an atomic number outside 1..118, a non-finite position or cell, a periodic cell of
    zero volume, a zero-length or (two periodic axes) parallel periodic cell vectors."""
    if len(numbers) == 0:
        return "no atoms"
    if len(positions) != len(numbers):
        return f"{len(numbers)} atoms but {len(positions)} positions"
    bad = (numbers < 1) | (numbers > 118)
    if bad.any():
        return f"atomic number out of range: {numbers[bad][:3]}"
    if not np.isfinite(positions).all():
        return "NaN or infinite position"
    if not np.isfinite(cell).all():
        return "NaN or infinite cell"
    if pbc.all() and abs(np.linalg.det(cell)) < MIN_CELL_VOLUME:
        return f"periodic cell with zero volume (|det| = {abs(np.linalg.det(cell)):.3g})"
    vectors = cell[pbc]
    if (np.linalg.norm(vectors, axis=1) < MIN_CELL_VOLUME ** (1 / 3)).any():
        return "periodic direction with a zero-length cell vector"
    if len(vectors) == 2 and np.linalg.norm(np.cross(*vectors)) < MIN_CELL_VOLUME ** (2 / 3):
        return "two periodic directions with parallel cell vectors"
    return None


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
