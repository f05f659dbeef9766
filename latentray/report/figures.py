"""The report's figures, as PNG bytes (matplotlib, no display): heatmaps of a measure between
every ordered pair of models, the asymmetry of each pair, the cumulant-order curves, the
last layer against each backbone layer, and 2-D maps of the structure features."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from ..results import measured_both_ways, pair_values

METRIC_NAMES = {"gfre": "GFRE", "lfre": "LFRE", "gfrd": "GFRD", "cka": "linear CKA"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


def color_limit(values: np.ndarray) -> float:
    """The top of a heatmap's colour scale: the largest value, unless some lie beyond Tukey's
    far-out fence ``Q3 + 3 (Q3 - Q1)`` of the finite values; then the largest value within
    it, so that one outlier (an LFRE that a single test atom dominates, say) does not wash
    the other cells into one colour. Cells above it take the top colour and keep their
    number."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 1.0
    q1, q3 = np.percentile(finite, [25, 75])
    inside = finite[finite <= q3 + 3 * (q3 - q1)]
    return float(inside.max() if inside.size else finite.max())


def heatmap_png(matrix: pd.DataFrame, title: str, spread: pd.DataFrame | None = None) -> bytes:
    """A source x target heatmap with the value (and +- its spread over seeds) in every cell;
    the colour scale stops below far outliers (:func:`color_limit`)."""
    plt = _pyplot()
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 + 0.85 * n), max(4.5, 1.4 + 0.75 * n)), dpi=110)
    values = matrix.to_numpy(dtype=float)
    vmax = color_limit(values)
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(n), matrix.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), matrix.index, fontsize=8)
    ax.set_xlabel("target B (reconstructed)")
    ax.set_ylabel("source A (features used)")
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            if np.isfinite(v):
                text = f"{v:.3f}"
                if spread is not None and np.isfinite(spread.iat[i, j]):
                    text += f"\n±{spread.iat[i, j]:.3f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
    ax.set_title(title, fontsize=9)
    beyond = bool(np.any(values[np.isfinite(values)] > vmax))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, extend="max" if beyond else "neither",
                 label=f"values above {vmax:.3f}: the top colour" if beyond else None)
    fig.tight_layout()
    return _png(fig)


def asymmetry_png(panels: list[tuple[str, pd.DataFrame]], families: dict[str, str],
                  title: str) -> bytes:
    """Each unordered pair {A, B} as a point (error A -> B, error B -> A), one panel per
    comparison (atom level, structure level, ...); on the diagonal the two directions agree.
    Below it, B -> A is smaller: B's features hold (linearly) what A's hold, and more."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), dpi=110,
                             squeeze=False)
    for ax, (label, rows) in zip(axes[0], panels):
        value = pair_values(rows)
        pairs = measured_both_ways(value)
        top = max([*value.values(), 1e-9]) * 1.08
        ax.plot([0, top], [0, top], color="0.6", lw=0.8, zorder=0)
        for same, marker, name in ((True, "o", "same family"), (False, "s", "across families")):
            chosen = [(a, b) for a, b in pairs if (families.get(a) == families.get(b)) == same]
            if chosen:
                ax.scatter([value[a, b] for a, b in chosen], [value[b, a] for a, b in chosen],
                           marker=marker, label=name, alpha=0.8)
        for a, b in sorted(pairs, key=lambda p: -abs(value[p] - value[p[::-1]]))[:3]:
            ax.annotate(f"{a} | {b}", (value[a, b], value[b, a]), fontsize=6,  # the 3 most
                        xytext=(3, 3), textcoords="offset points")              # asymmetric
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.set_xlabel("A -> B  (A: the first model of the label)")
        ax.set_ylabel("B -> A")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def order_png(rows: pd.DataFrame, models: list[str], title: str) -> bytes:
    """How much each cumulant order adds: the error of [k1..kn] -> [k1..kn+1] against n, one
    line per model, and [k1] -> [k1..k8] in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for model in [m for m in models if m in set(rows.source)]:
        sub = rows[rows.source == model]
        steps = sub[sub.target_order == sub.source_order + 1].sort_values("source_order")
        full = sub[(sub.source_order == 1) & (sub.target_order == 8)].value
        label = model + (f"  (k1 -> k1..k8: {full.iloc[0]:.3f})" if len(full) else "")
        ax.plot(steps.source_order, steps.value, marker="o", label=label)
    ax.set_xlabel("n: reconstructing [k1 .. k(n+1)] from [k1 .. kn]")
    ax.set_ylabel("error")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def layers_png(rows: pd.DataFrame, models: list[str], title: str) -> bytes:
    """Within each model: bbK -> ll (solid) and ll -> bbK (dashed) against K."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate([m for m in models if m in set(rows.source)]):
        sub = rows[rows.source == model]
        to_ll = sub[sub.target_layer == "ll"].copy()
        from_ll = sub[sub.source_layer == "ll"].copy()
        to_ll["k"] = to_ll.source_layer.str[2:].astype(int)
        from_ll["k"] = from_ll.target_layer.str[2:].astype(int)
        colour = colours[i % len(colours)]
        ax.plot(*to_ll.sort_values("k")[["k", "value"]].to_numpy().T, marker="o",
                color=colour, label=f"{model}: bbK -> ll")
        ax.plot(*from_ll.sort_values("k")[["k", "value"]].to_numpy().T, marker="s",
                color=colour, ls="--", label=f"{model}: ll -> bbK")
    ax.set_xlabel("K: backbone layer (message-passing step)")
    ax.set_ylabel("error")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def maps_png(rows: pd.DataFrame, title: str) -> bytes:
    """One row per method (PCA, PCovR), coloured by subset (left) and by energy per atom
    (right, where the dataset has energies)."""
    plt = _pyplot()
    methods = [m for m in ("pca", "pcovr") if m in set(rows.method)]
    has_energy = bool(np.isfinite(rows.energy_per_atom.to_numpy(dtype=float)).any())
    ncols = 2 if has_energy else 1
    fig, axes = plt.subplots(len(methods), ncols, figsize=(5.0 * ncols, 4.0 * len(methods)),
                             dpi=100, squeeze=False)
    names = {"pca": "PCA", "pcovr": "PCovR (energy per atom, mixing 0.5)"}
    for r, method in enumerate(methods):
        sub = rows[rows.method == method]
        ax = axes[r][0]
        for subset, part in sub.groupby("subset", sort=True):
            ax.scatter(part.x, part.y, s=6, alpha=0.7, label=str(subset) or "(none)")
        ax.legend(fontsize=6, markerscale=2)
        ax.set_title(f"{names[method]}: by subset", fontsize=9)
        if has_energy:
            ax = axes[r][1]
            known = sub[np.isfinite(sub.energy_per_atom.to_numpy(dtype=float))]
            points = ax.scatter(known.x, known.y, s=6, c=known.energy_per_atom, cmap="plasma")
            fig.colorbar(points, ax=ax, label="energy per atom (dataset's units)")
            ax.set_title(f"{names[method]}: by energy per atom", fontsize=9)
        for ax in axes[r]:
            ax.set_xlabel("component 1")
            ax.set_ylabel("component 2")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)
