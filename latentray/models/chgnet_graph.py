"""CHGNet's crystal graph from a neighbour list, with numpy arrays instead of Python objects.

CHGNet's own ``CrystalGraphConverter`` turns a pymatgen neighbour list into its graph through
one Python (or C-built) object per atom, per directed and per undirected edge, then walks them
to build the bond graph: about three quarters of CHGNet's graph building time. This module
computes the same arrays from the neighbour list at once, element for element equal to
the converter's (``tests/test_models.py`` checks them on every embedded MAD structure and on
rattled supercells):

* ``atom_graph`` (E, 2): the directed edges ``[i, j]`` in neighbour-list order;
* ``directed2undirected`` (E,): the undirected edge of each directed edge. Directed edge
  e = (i, j, image) and its reverse r(e) = (j, i, -image) form one undirected edge, created by
  (and numbered in the order of) whichever of the two comes first;
* ``undirected2directed`` (U,): the first directed edge of each undirected edge;
* ``bond_graph`` (B, 5): for each undirected edge u of length <= ``bond_cutoff``, and for each
  of its ends c with the directed edge d0 leaving c along u, every other directed edge d
  leaving c with length < ``bond_cutoff``, in the converter's order (c's neighbours in the
  order they first appear, then edge order): rows ``[c, u, d0, undirected(d), d]``.
"""

from __future__ import annotations

import numpy as np


def crystal_graph_arrays(center: np.ndarray, neighbor: np.ndarray, image: np.ndarray,
                         distance: np.ndarray, n_atoms: int, bond_cutoff: float,
                         tolerance: float = 1e-6) -> dict[str, np.ndarray]:
    """CHGNet's graph arrays (see the module docstring) from a neighbour list that holds
    every edge with its reverse; raises ValueError when an edge has none."""
    center = np.asarray(center, np.int64)
    neighbor = np.asarray(neighbor, np.int64)
    image = np.asarray(image, np.int64).reshape(-1, 3)
    distance = np.asarray(distance, np.float64)
    n_edges = len(center)

    # the reverse of every directed edge, by one integer key per (i, j, image)
    span = int(np.abs(image).max(initial=0)) * 2 + 1
    shifted = image + span // 2

    def key(a, b, img):
        k = a * n_atoms + b
        for axis in range(3):
            k = k * span + img[:, axis]
        return k

    forward = key(center, neighbor, shifted)
    backward = key(neighbor, center, span - 1 - shifted)  # -image, shifted
    order = np.argsort(forward, kind="stable")
    where = np.searchsorted(forward[order], backward)
    where = np.minimum(where, n_edges - 1) if n_edges else where
    reverse = order[where] if n_edges else np.zeros(0, np.int64)
    if n_edges and (np.any(forward[reverse] != backward)
                    or np.any(np.abs(distance[reverse] - distance) >= tolerance)):
        bad = int(np.flatnonzero((forward[reverse] != backward)
                                 | (np.abs(distance[reverse] - distance) >= tolerance))[0])
        raise ValueError(f"the neighbour list holds edge {center[bad]}->{neighbor[bad]} "
                         f"(image {image[bad].tolist()}) but not its reverse")

    first = np.arange(n_edges) < reverse  # this edge creates its undirected edge
    undirected_of_first = np.cumsum(first) - 1
    directed2undirected = undirected_of_first[np.minimum(np.arange(n_edges), reverse)]
    undirected2directed = np.flatnonzero(first)

    # the edges leaving each atom in the converter's order: by atom, then by the first
    # appearance of the neighbour among that atom's edges, then by edge
    pair = center * n_atoms + neighbor
    _, first_index, inverse = np.unique(pair, return_index=True, return_inverse=True)
    short = np.flatnonzero(distance < bond_cutoff)
    leaving = short[np.lexsort((short, first_index[inverse[short]], center[short]))]
    counts = np.bincount(center[leaving], minlength=n_atoms)
    starts = np.concatenate([[0], np.cumsum(counts)])

    # the angles: per short undirected edge, both of its ends, every other short edge there
    u = np.flatnonzero(distance[undirected2directed] <= bond_cutoff)
    d_first = undirected2directed[u]
    q_edge = np.column_stack([d_first, reverse[d_first]]).ravel()
    q_centre = center[q_edge]
    q_undirected = np.repeat(u, 2)
    lengths = counts[q_centre]
    rows = np.repeat(np.arange(len(q_edge)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    other = leaving[starts[q_centre][rows] + within]
    keep = other != q_edge[rows]
    rows, other = rows[keep], other[keep]
    bond_graph = np.column_stack([q_centre[rows], q_undirected[rows], q_edge[rows],
                                  directed2undirected[other], other])
    if not len(bond_graph):
        bond_graph = np.zeros(0, np.int64)  # as the converter has it: no angle, shape (0,)
    return {"atom_graph": np.column_stack([center, neighbor]).reshape(-1, 2),
            "directed2undirected": directed2undirected,
            "undirected2directed": undirected2directed,
            "bond_graph": bond_graph}
