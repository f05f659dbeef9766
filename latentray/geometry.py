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
