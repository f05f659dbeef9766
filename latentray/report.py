"""Report stage: heatmaps (PNG, values in the cells) and a static ``report.html``."""

from __future__ import annotations

import html
import io

import numpy as np
import pandas as pd

from .config import Config
from .store import INPUT, Store

METRIC_NAMES = {"gfre": "GFRE", "lfre": "LFRE", "gfrd": "GFRD", "cka": "linear CKA"}


def heatmap_png(matrix: pd.DataFrame, title: str, spread: pd.DataFrame | None = None) -> bytes:
    """A source x target heatmap with the value (and +- its spread over seeds) in every cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 + 0.85 * n), max(4.5, 1.4 + 0.75 * n)), dpi=110)
    values = matrix.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size else 1.0
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
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def order_png(rows: pd.DataFrame, models: list[str], title: str) -> bytes:
    """How much each cumulant order adds: the error of [k1..kn] -> [k1..kn+1] against n, one
    line per model, and [k1] -> [k1..k8] in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", na_rep="", float_format="%.4f")


def _groups_html(store: Store, seed: int, n_elements: int = 10) -> str:
    """Per-subset and worst-element tables from ``results/by_group.parquet``."""
    path = store.path("results", "by_group.parquet")
    if not store.exists(path):
        return '<p class="note">No per-group numbers.</p>'
    import pyarrow.parquet as pq

    table = pq.read_table(path, filesystem=store.fs).to_pandas()
    table = table[(table.seed == seed) & (table.source != table.target)
                  & table.features.isin(["atoms", "cumulants"])]
    parts = []
    for (dataset, level, layers, metric, kind), sub in table.groupby(
            ["dataset", "level", "layers", "metric", "group_kind"], sort=False):
        sub = sub.assign(pair=sub.source + " → " + sub.target)
        wide = sub.pivot_table(index="group", columns="pair", values="value")
        n = sub.groupby("group")["n_test"].first()
        if kind == "element":
            wide = wide.loc[wide.mean(axis=1).sort_values(ascending=False).index[:n_elements]]
        wide.insert(0, "n", n.loc[wide.index])
        heading = f"{METRIC_NAMES.get(metric, metric)} by {kind}, {level} level, layer {layers}, " \
                  f"{dataset}"
        parts.append(f"<h3>{html.escape(heading)}</h3>"
                     + wide.reset_index().to_html(index=False, border=0, classes="t",
                                                  float_format="%.3f"))
    return "\n".join(parts) or '<p class="note">No per-group numbers.</p>'


def _remove_stale_figures(store: Store, current: set[str]) -> None:
    """Figures of an earlier run that this report does not show (the results they drew are
    gone from ``results/``) would mislead: remove them."""
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.path("figures")))
    except FileNotFoundError:
        return
    for info in infos:
        if info.path.endswith(".png") and f"figures/{info.base_name}" not in current:
            store.fs.delete_file(info.path)


def write_report(config: Config, store: Store, results: pd.DataFrame, extraction: dict,
                 analysis_info: dict, provenance: dict, log) -> str:
    """Write figures/*.png and report.html; return the report's path."""
    models = [m.id for m in config.models]
    figures = []
    keys = ["dataset", "metric", "level", "features", "layers", "source_order"]
    seed = config.analyses.seed
    between = results[results.source != results.target]
    for (dataset, metric, level, features, layers, order), sub in between.groupby(
            keys, dropna=False, sort=False):
        present = [m for m in models if m in set(sub.source) | set(sub.target)]
        matrix = sub[sub.seed == seed].pivot(index="source", columns="target", values="value") \
            .reindex(index=present, columns=present)
        spread = None
        if sub.seed.nunique() > 1:  # the sample standard deviation over the split seeds
            spread = sub.groupby(["source", "target"])["value"].std().unstack().reindex(
                index=present, columns=present)
        features_text = {"atoms": "", "cumulants": f", cumulants of order {order}",
                         "mean": ", mean pooling", "sum": ", sum pooling"}[features]
        seeds_text = (f", ± sd over {sub.seed.nunique()} split seeds" if spread is not None
                      else "")
        title = (f"{METRIC_NAMES.get(metric, metric)}(A -> B), {level} level, layer {layers}"
                 f"{features_text}\n{dataset}, n_test = {int(sub.n_test.iloc[0])}, "
                 f"{sub.path.iloc[0]} fit{seeds_text}")
        name = f"{dataset}_{metric}_{level}_{layers}" + {
            "atoms": "", "cumulants": f"_order{order}", "mean": "_mean", "sum": "_sum"}[features]
        store.write_bytes(store.path("figures", f"{name}.png"), heatmap_png(matrix, title, spread))
        figures.append((f"figures/{name}.png", title.replace("\n", " · ")))
    within = results[(results.source == results.target) & (results.seed == seed)]
    for (dataset, metric, layers), sub in within.groupby(["dataset", "metric", "layers"],
                                                         sort=False):
        title = (f"{METRIC_NAMES.get(metric, metric)}([k1..kn] -> [k1..kn+1]) within each model, "
                 f"layer {layers}\n{dataset}, n_test = {int(sub.n_test.iloc[0])}, "
                 f"{sub.path.iloc[0]} fit")
        name = f"{dataset}_{metric}_orders_{layers}"
        store.write_bytes(store.path("figures", f"{name}.png"), order_png(sub, models, title))
        figures.append((f"figures/{name}.png", title.replace("\n", " · ")))

    failures = []
    for d in config.datasets:
        for m in [INPUT] + models:  # INPUT: frames that could not be read at all
            table = store.read_table(store.failures_dir(d.name, m))
            if table is not None and table.num_rows:
                df = table.to_pandas()
                for reason, count in df.groupby("reason").size().items():
                    failures.append({"dataset": d.name, "model": m, "structures": count,
                                     "reason": reason})
    failures = pd.DataFrame(failures, columns=["dataset", "model", "structures", "reason"])

    prov_models = pd.DataFrame([{
        "model": p["id"], "family": p["family"], "checkpoint": p["checkpoint"]
        + (f" ({p['modality']})" if p["modality"] else ""),
        "package": p["family_package_version"], "layers": ", ".join(
            f"{k}[{v}]" for k, v in p["layers"].items()),
        "checkpoint sha256": p["checkpoint_sha256"][:16] + "…"} for p in provenance["models"]])
    datasets = pd.DataFrame([{"dataset": k, **v} for k, v in provenance["datasets"].items()])
    versions = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items())
    figures_html = "\n".join(
        f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>'
        f"{html.escape(caption)}</figcaption></figure>" for src, caption in figures)
    shown = results.copy()
    groups_html = _groups_html(store, config.analyses.seed)
    paths = ", ".join(f"{k}: {v}" for k, v in analysis_info.get("paths", {}).items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>latentray report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }}
table.t td, table.t th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
figcaption {{ font-size: 12px; color: #555; max-width: 520px; }}
img {{ max-width: 560px; }}
.note {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>latentray report</h1>
<p class="note">Config <code>{html.escape(provenance['config_source'])}</code>,
finished {provenance['finished']}{f", first {provenance['limit']} structures of each dataset" if provenance['limit'] else ''}.
{html.escape(versions)}</p>
<h2>Models</h2>{_table_html(prov_models)}
<h2>Data</h2>{_table_html(datasets)}
<h2>How to read this</h2>
<p class="note">GFRE(A -> B) is the test-set root-mean-square error of the best linear map
from the features of model A to those of model B, both centred and scaled to unit total
variance on the training rows: 0 means B is a linear function of A, values near 1 mean A
explains almost nothing of B. LFRE is the same with a separate linear map fitted around
each test point on its nearest training neighbours (local, non-linear reconstruction).
Rows read source A, columns target B; asymmetry (A -> B small, B -> A large) means A holds
more information than B. Atom level: {config.analyses.n_test} test atoms stratified by
subset, seed {config.analyses.seed}; structure level: cumulant features of order
{config.analyses.order}. GFRD is the error left after the best orthogonal map (how much
the linear reconstruction distorts). Linear CKA (symmetric, 1 = the same up to rotation
and scale) compares the centred training rows. Fits: {html.escape(paths)} (in-memory:
the paper's split, skmatter's numbers; streaming: mergeable statistics over the Parquet
shards with a hash split, see the README).</p>
<h2>Figures</h2>
{figures_html}
<h2>Which chemistry is hard to reconstruct</h2>
<p class="note">The root-mean-square pointwise error of the test rows of each subset and of
each element (the ten elements with the largest mean error over all pairs; n: test rows),
per ordered pair A -> B, seed {config.analyses.seed}. All groups are in
<code>results/by_group.csv</code>.</p>
{groups_html}
<h2>Structures left out</h2>
<p class="note">Each comparison uses the structures that both models processed; the rest are
listed here per model with the reason (from <code>failures/</code>).</p>
{_table_html(failures) if len(failures) else '<p class="note">None: every model processed every structure.</p>'}
<h2>All numbers</h2>
<p class="note">Also in <code>results/reconstruction.csv</code> and <code>.parquet</code>.</p>
{_table_html(shown)}
</body></html>
"""
    path = store.path("report.html")
    store.write_bytes(path, page.encode())
    _remove_stale_figures(store, {src for src, _ in figures})
    log("report", f"{len(figures)} figure(s), report at {store.display(path)}")
    return store.display(path)
