"""What the analysis compares: the kinds of features, and the layer names between models."""

from __future__ import annotations

from dataclasses import dataclass

from ..method.cumulants import MAX_ORDER
from ..models.base import resolve_layers


@dataclass(frozen=True)
class Comparison:
    """What is compared: atom features, or structure features of some kind and order.

    ``features``: ``atoms`` (atom level); ``cumulants`` ([k1 .. k_order]), ``mean`` or ``sum``
    (mean / sum pooling of the atom features, the baselines; mean pooling is k1).
    Within one model, ``cumulants`` of order n -> n + 1 (or 1 -> 8) is the order analysis.
    """

    level: str
    features: str
    source_order: int | None = None
    target_order: int | None = None

    def columns(self, width: int, side: int) -> int | None:
        """Leading columns of the stored [k1 .. k8] this side uses (None: all)."""
        if self.features == "atoms":
            return None
        order = (self.source_order, self.target_order)[side]
        return width * (order or 1)  # pooling: the k1 block (sum pooling: times n_atoms)


def comparisons(a) -> tuple[list[Comparison], list[Comparison]]:
    """(between models, within one model) for the analysis config ``a``."""
    between, within = [], []
    if "atom" in a.levels:
        between.append(Comparison("atom", "atoms"))
    if "structure" in a.levels:
        between.append(Comparison("structure", "cumulants", a.order, a.order))
        between += [Comparison("structure", b) for b in a.baselines]
        if a.order_metrics:
            within = [Comparison("structure", "cumulants", n, n + 1) for n in range(1, MAX_ORDER)]
            within.append(Comparison("structure", "cumulants", 1, MAX_ORDER))
    return between, within


def concrete_layer(name: str, available: list[str]) -> str | None:
    """The concrete layer that ``name`` (``bb``, ``bbK`` or ``ll``) is in a model with the
    layers ``available`` (:func:`resolve_layers`); None when the model lacks it."""
    try:
        return resolve_layers([name], available)[0]
    except (ValueError, IndexError):
        return None


def fit_path(n_atoms: int, widths, in_memory_limit_mb: int) -> tuple[str, float]:
    """``("in-memory" | "streaming", size in MB)``: the fits of some layers stream from
    Parquet when their latents (``n_atoms`` rows of every width, as float32) exceed
    ``analyses.in_memory_limit_mb``."""
    size_mb = n_atoms * sum(widths) * 4 / 2**20
    return ("in-memory" if size_mb <= in_memory_limit_mb else "streaming"), size_mb
