"""Report stage: ``report.html``, a static page with no script that reads offline, and the
figures it shows as PNG files beside it (``figures/``); the numbers are in ``results/``.

Sections: provenance, a summary written from this run's numbers (:mod:`latentray.summary`),
how to read the measures, the heatmaps between models, the asymmetry of each pair, variants
of one architecture and fine-tuning, the last layer against the backbone, the cumulant
orders, 2-D maps of the structure features, the per-element and per-subset errors, the
structures left out, and every number.
"""

from __future__ import annotations

import html

import pandas as pd

from ..results import LAYER_ANALYSIS, pair_values
from ..config import Config
from .figures import (METRIC_NAMES, asymmetry_png, heatmap_png, layers_png, maps_png,
                      order_png)
from ..store import INPUT, Store
from .summary import findings

def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", na_rep="", float_format="%.4f")


def _groups_html(table: pd.DataFrame | None, seed: int, n_elements: int = 10) -> str:
    """Per-subset and worst-element tables from ``results/by_group``."""
    if table is None:
        return '<p class="note">No per-group numbers.</p>'
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


def _read_results(store: Store, name: str) -> pd.DataFrame | None:
    from ..reader import Run

    return Run(store).results(name)


class _Figures:
    """The figures of one section: written to ``figures/`` as they are drawn."""

    def __init__(self, store: Store, written: list):
        self.store, self.written, self.items = store, written, []

    def add(self, name: str, png: bytes, caption: str) -> None:
        self.store.write_bytes(self.store.path("figures", f"{name}.png"), png)
        self.written.append(f"figures/{name}.png")
        self.items.append((f"figures/{name}.png", caption.replace("\n", " · ")))

    def html(self, empty: str) -> str:
        if not self.items:
            return f'<p class="note">{html.escape(empty)}</p>'
        return "\n".join(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(c)}">'
                         f"</a><figcaption>{html.escape(c)}</figcaption></figure>"
                         for src, c in self.items)


def _fit_text(sub: pd.DataFrame) -> str:
    return f"n_test = {int(sub.n_test.iloc[0])}, {sub.path.iloc[0]} fit"


def _pairs_table(between: pd.DataFrame, pairs: list[tuple[str, str, str]], seed: int) -> str:
    """One row per pair (A, B, relation) and compared layer: each measure in both directions,
    atom level and structure level (cumulants)."""
    rows = []
    main = between[(between.seed == seed) & between.features.isin(["atoms", "cumulants"])]
    for layers, part in main.groupby("layers", sort=False):
        for a, b, relation in pairs:
            row = {"A": a, "B": b, "relation": relation, "layer": layers}
            for (metric, level), sub in part.groupby(["metric", "level"], sort=False):
                value = pair_values(sub)
                name = f"{METRIC_NAMES.get(metric, metric)} {level}"
                if metric == "cka":
                    row[name] = value.get((a, b))
                else:
                    row[f"{name} A→B"] = value.get((a, b))
                    row[f"{name} B→A"] = value.get((b, a))
            rows.append(row)
    return _table_html(pd.DataFrame(rows)) if rows else \
        '<p class="note">No pair of this kind among the models of this run.</p>'


def write_report(config: Config, store: Store, analysis_info: dict, provenance: dict,
                 log) -> str:
    """Write figures/*.png and report.html from the results tables in ``store``; return the
    report's path."""
    results = _read_results(store, "reconstruction")
    models = [m.id for m in config.models]
    families = {m.id: m.family for m in config.models}
    parents = {m.id: m.parent for m in config.models if m.parent}
    trained_on = {m.id: m.trained_on for m in config.models if m.trained_on}
    seed = config.analyses.seed
    written: list[str] = []
    is_layer = results.layers == LAYER_ANALYSIS
    between = results[results.source != results.target]
    orders = results[(results.source == results.target) & ~is_layer]
    layer_rows = results[is_layer & (results.seed == seed)]

    heatmaps = _Figures(store, written)
    keys = ["dataset", "metric", "level", "features", "layers", "source_order"]
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
                 f"{features_text}\n{dataset}, {_fit_text(sub)}{seeds_text}")
        name = f"{dataset}_{metric}_{level}_{layers}" + {
            "atoms": "", "cumulants": f"_order{order}", "mean": "_mean", "sum": "_sum"}[features]
        heatmaps.add(name, heatmap_png(matrix, title, spread), title)

    asymmetry = _Figures(store, written)
    main = between[(between.seed == seed) & (between.metric != "cka")
                   & between.features.isin(["atoms", "cumulants"])]
    for (dataset, metric, layers), sub in main.groupby(["dataset", "metric", "layers"],
                                                       sort=False):
        panels = [(("atom level" if level == "atom" else
                    f"structure level, cumulants of order {int(part.source_order.iloc[0])}")
                   + f", {_fit_text(part)}", part)
                  for level, part in sub.groupby("level", sort=True)]
        title = (f"{METRIC_NAMES.get(metric, metric)} of each pair in both directions, layer "
                 f"{layers}, {dataset}")
        asymmetry.add(f"{dataset}_{metric}_asymmetry_{layers}",
                      asymmetry_png(panels, families, title), title)

    variants = [(a, b, f"same architecture ({families[a]})") for i, a in enumerate(models)
                for b in models[i + 1:] if families[a] == families[b]
                and parents.get(a) != b and parents.get(b) != a]
    tuned = [(child, parent, "fine-tuned from B") for child, parent in parents.items()]

    layer_figures = _Figures(store, written)
    for (dataset, metric), sub in layer_rows.groupby(["dataset", "metric"], sort=False):
        title = (f"{METRIC_NAMES.get(metric, metric)} within each model: backbone layer K and "
                 f"the last layer ll, atom level\n{dataset}, {_fit_text(sub)}")
        layer_figures.add(f"{dataset}_{metric}_layers", layers_png(sub, models, title), title)

    order_figures = _Figures(store, written)
    for (dataset, metric, layers), sub in orders[orders.seed == seed].groupby(
            ["dataset", "metric", "layers"], sort=False):
        title = (f"{METRIC_NAMES.get(metric, metric)}([k1..kn] -> [k1..kn+1]) within each model, "
                 f"layer {layers}\n{dataset}, {_fit_text(sub)}")
        order_figures.add(f"{dataset}_{metric}_orders_{layers}", order_png(sub, models, title),
                          title)

    map_figures = _Figures(store, written)
    maps = _read_results(store, "maps")
    if maps is not None and len(maps):
        for (dataset, layers, model), sub in maps.groupby(["dataset", "layers", "model"],
                                                           sort=False):
            title = (f"{model}, layer {sub.layer.iloc[0]}: structure features (cumulants of "
                     f"order {config.analyses.order}), {len(sub[sub.method == sub.method.iloc[0]])} "
                     f"structures of {dataset}")
            map_figures.add(f"{dataset}_maps_{layers}_{model}", maps_png(sub, title), title)

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
        "trained on": trained_on.get(p["id"], ""),
        "fine-tuned from": parents.get(p["id"], ""),
        "package": p["family_package_version"], "layers": ", ".join(
            f"{k}[{v}]" for k, v in p["layers"].items()),
        "checkpoint sha256": p["checkpoint_sha256"][:16] + "…"} for p in provenance["models"]])
    datasets = pd.DataFrame([{"dataset": k, **v} for k, v in provenance["datasets"].items()])
    versions = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items())
    groups = _read_results(store, "by_group")
    summary = findings(results, groups, families, parents, seed, trained_on=trained_on)
    store.write_bytes(store.path("results", "summary.md"),
                      ("".join(f"- {line}\n" for line in summary)).encode())
    summary_html = ("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary)
                    + "</ul>") if summary else '<p class="note">No numbers to summarise.</p>'
    paths = ", ".join(f"{k}: {v}" for k, v in analysis_info.get("paths", {}).items())
    a = config.analyses
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
li {{ margin-bottom: 0.4em; }}
</style></head><body>
<h1>latentray report</h1>
<p class="note">Config <code>{html.escape(provenance['config_source'])}</code>,
finished {provenance['finished']}{f", first {provenance['limit']} structures of each dataset" if provenance['limit'] else ''}.
{html.escape(versions)}</p>
<h2>Models</h2>{_table_html(prov_models)}
<h2>Data</h2>{_table_html(datasets)}
<h2>Summary</h2>
<p class="note">Written from this run's numbers ({METRIC_NAMES['gfre']}, split seed {seed});
also in <code>results/summary.md</code>.</p>
{summary_html}
<h2>How to read this</h2>
<p class="note">GFRE(A -> B) is the test-set root-mean-square error of the best linear map
from the features of model A to those of model B, both centred and scaled to unit total
variance on the training rows: 0 means B is a linear function of A, values near 1 mean A
explains almost nothing of B. LFRE is the same with a separate linear map fitted around
each test point on its nearest training neighbours (local, non-linear reconstruction).
Rows read source A, columns target B; asymmetry (A -> B small, B -> A large) means A holds
more information than B. Atom level: {a.n_test} test atoms stratified by subset, seed
{seed}; structure level: cumulant features of order {a.order}. GFRD is the error left after
the best orthogonal map (how much the linear reconstruction distorts). Linear CKA
(symmetric, 1 = the same up to rotation and scale) compares the centred training rows.
Fits: {html.escape(paths)} (in-memory: the paper's split, skmatter's numbers; streaming:
mergeable statistics over the Parquet shards with a hash split, see the README).</p>
<h2>Between models</h2>
{heatmaps.html("No comparison between models in this run.")}
<h2>Asymmetry</h2>
<p class="note">Each pair of models once, at (error A -> B, error B -> A). On the diagonal
the two directions agree; far from it, one model's features hold (linearly) more of the
other's than the reverse.</p>
{asymmetry.html("No pair measured in both directions.")}
<h2>Variants of one architecture, and fine-tuning</h2>
<p class="note">Pairs of models of the same family, trained differently or sized
differently; and each fine-tuned model with the model it was fine-tuned from (the
<code>parent</code> key of the config).</p>
{_pairs_table(between, tuned + variants, seed)}
<h2>Last layer against the backbone</h2>
<p class="note">Within each model, atom level: how well each backbone layer bbK
reconstructs the last layer ll (solid), and the reverse (dashed).</p>
{layer_figures.html("Not measured in this run (analyses.layer_metrics).")}
<h2>Cumulant orders</h2>
{order_figures.html("Not measured in this run (analyses.order_metrics).")}
<h2>Maps of the structure features</h2>
<p class="note">Each model's structure features projected to two dimensions: PCA, and PCovR
(principal covariates regression, scikit-matter) against the energy per atom where the
dataset has one; coloured by subset and by energy per atom. The coordinates are in
<code>results/maps.csv</code>.</p>
{map_figures.html("No maps in this run (analyses.maps, and the structure level).")}
<h2>Which chemistry is hard to reconstruct</h2>
<p class="note">The root-mean-square pointwise error of the test rows of each subset and of
each element (the ten elements with the largest mean error over all pairs; n: test rows),
per ordered pair A -> B, seed {seed}. All groups are in <code>results/by_group.csv</code>.</p>
{_groups_html(groups, seed)}
<h2>Structures left out</h2>
<p class="note">Each comparison uses the structures that both models processed; the rest are
listed here per model with the reason (from <code>failures/</code>).</p>
{_table_html(failures) if len(failures) else '<p class="note">None: every model processed every structure.</p>'}
<h2>All numbers</h2>
<p class="note">Also in <code>results/reconstruction.csv</code> and <code>.parquet</code>.</p>
{_table_html(results)}
</body></html>
"""
    path = store.path("report.html")
    store.write_bytes(path, page.encode())
    _remove_stale_figures(store, set(written))
    log("report", f"{len(written)} figure(s), report at {store.display(path)}")
    return store.display(path)
