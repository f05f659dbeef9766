"""The report's summary: short findings written from the numbers of this run only.

Each finding is a sentence built from ``results/reconstruction`` (and ``by_group``) rows of
the main split seed; a finding whose rows the run did not produce is left out. Words that
judge ("closest", "more than") follow from comparisons of the numbers, never from the paper.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..results import LAYER_ANALYSIS, measured_both_ways, pair_values


def _f(x: float) -> str:
    return f"{x:.3f}"


def _range(values) -> str:
    values = list(values)
    return _f(min(values)) if min(values) == max(values) else \
        f"{_f(min(values))}-{_f(max(values))}"


def _training_data(value: dict, trained_on: dict[str, str], name: str, where: str) -> list[str]:
    """Per model trained on other data than most (every model when no set is the largest
    alone), its distance to each set of models trained on the same data as one another: the
    mean over those models of its two directions' mean."""
    sets: dict[str, list[str]] = {}
    for model, data in trained_on.items():
        sets.setdefault(data.strip(), []).append(model)
    if len(sets) < 2:
        return []
    sizes = sorted((len(models) for models in sets.values()), reverse=True)
    common = max(sets, key=lambda data: len(sets[data])) if sizes[0] > sizes[1] else None
    out = []
    for data, members in sets.items():
        if data == common:
            continue
        for m in members:
            far = []
            for other, models in sets.items():
                both = [o for o in models if o != m and (m, o) in value and (o, m) in value]
                if both:
                    far.append((float(np.mean([(value[m, o] + value[o, m]) / 2 for o in both])),
                                other, both))
            if len(far) < 2:
                continue
            nearest = min(far)[1]
            out.append(f"Training data ({where}): {m} (trained on {data}) is at mean {name} "
                       + ", ".join(f"{_f(v)} from the models trained on {other} "
                                   f"({', '.join(both)})" for v, other, both in far)
                       + f" (both directions): nearest to those trained on {nearest}.")
    return out


def findings(results: pd.DataFrame, groups: pd.DataFrame | None, families: dict[str, str],
             parents: dict[str, str], seed: int, metric: str = "gfre",
             trained_on: dict[str, str] | None = None) -> list[str]:
    """The summary's sentences (see the module docstring). ``trained_on``: model -> its
    training data, as the config names it."""
    r = results[(results.seed == seed) & (results.metric == metric)]
    name = metric.upper()
    out: list[str] = []
    # between models: the first dataset and compared layer only (means never mix them)
    levels = r[r.source != r.target]
    if len(levels):
        levels = levels[(levels.dataset == levels.dataset.iloc[0])
                        & (levels.layers == levels.layers.iloc[0])]
    between = levels[levels.level == "atom"]
    if len(between):
        layer = between.layers.iloc[0]
        value = pair_values(between)
        pairs = measured_both_ways(value)
        if pairs:
            mean = {p: (value[p] + value[p[::-1]]) / 2 for p in pairs}
            close, far = min(mean, key=mean.get), max(mean, key=mean.get)
            n_test = int(between.n_test.iloc[0])
            out.append(
                f"Atom level, layer {layer}, {n_test} test atoms: the closest pair is "
                f"{close[0]} and {close[1]} ({name} {_f(value[close])} and "
                f"{_f(value[close[::-1]])} in the two directions), the farthest "
                f"{far[0]} and {far[1]} ({_f(value[far])} and {_f(value[far[::-1]])}).")
            same = [v for (a, b), v in value.items() if families.get(a) == families.get(b)]
            across = [v for (a, b), v in value.items() if families.get(a) != families.get(b)]
            if same and across:
                verdict = ("every pair within a family is closer than every pair across "
                           "families" if max(same) < min(across) else
                           "the two ranges overlap")
                out.append(f"{name} within a family spans {_range(same)}, across families "
                           f"{_range(across)}: {verdict}.")
            gap = {p: value[p] - value[p[::-1]] for p in value if p[::-1] in value}
            a, b = max(gap, key=lambda p: abs(gap[p]))
            small, large = ((a, b), (b, a)) if gap[a, b] < 0 else ((b, a), (a, b))
            out.append(
                f"The most asymmetric pair: {name}({small[0]} -> {small[1]}) = "
                f"{_f(value[small])} against {_f(value[large])} the other way, so "
                f"{small[0]}'s features hold (linearly) more of {small[1]}'s than the reverse.")
            for child, parent in parents.items():
                if (child, parent) not in value or (parent, child) not in value:
                    continue
                tuned = (value[child, parent] + value[parent, child]) / 2
                siblings = [m for m in families if families[m] == families.get(parent)
                            and m not in (child, parent) and (m, parent) in value
                            and (parent, m) in value]
                text = (f"Fine-tuning: {child} (fine-tuned from {parent}) and {parent} are at "
                        f"{name} {_f(value[child, parent])} and {_f(value[parent, child])}")
                if siblings:
                    other = {m: (value[m, parent] + value[parent, m]) / 2 for m in siblings}
                    closer = all(tuned < v for v in other.values())
                    text += (", " + ("closer than" if closer else "not closer than")
                             + " the independently trained "
                             + ", ".join(f"{m} ({_f(value[m, parent])} and "
                                         f"{_f(value[parent, m])})" for m in siblings))
                out.append(text + ".")
            out += _training_data(value, trained_on or {}, name,
                                  f"atom level, layer {layer}")
    cum = levels[(levels.level == "structure") & (levels.features == "cumulants")]
    atoms = levels[levels.level == "atom"]
    if len(cum) and len(atoms):
        order = int(cum.source_order.iloc[0])
        line = (f"Structure level (cumulants to order {order}, layer "
                f"{cum.layers.iloc[0]}), mean {name} over the pairs "
                f"{_f(cum.value.mean())}, against {_f(atoms.value.mean())} at atom level")
        summed = levels[levels.features == "sum"]
        if len(summed):
            line += f"; sum pooling {_f(summed.value.mean())}"
        out.append(line + ".")
    layers = r[r.layers == LAYER_ANALYSIS]
    if len(layers):
        last = {m: max(sub.source_layer[sub.target_layer == "ll"], key=lambda k: int(k[2:]))
                for m, sub in layers.groupby("source")}
        to_ll = [float(layers[(layers.source == m) & (layers.source_layer == k)
                              & (layers.target_layer == "ll")].value.iloc[0])
                 for m, k in last.items()]
        from_ll = [float(layers[(layers.source == m) & (layers.source_layer == "ll")
                                & (layers.target_layer == k)].value.iloc[0])
                   for m, k in last.items()]
        first = layers[(layers.source_layer == "bb1") & (layers.target_layer == "ll")].value
        out.append(f"Last layer against backbone, within each model: {name}(last bb -> ll) "
                   f"{_range(to_ll)}, {name}(ll -> last bb) {_range(from_ll)}"
                   + (f", {name}(bb1 -> ll) {_range(first)}" if len(first) else "") + ".")
    orders = r[(r.source == r.target) & (r.features == "cumulants")]
    if len(orders):
        step = orders[(orders.source_order == 1) & (orders.target_order == 2)].value
        full = orders[(orders.source_order == 1) & (orders.target_order == 8)].value
        steps = orders[orders.target_order == orders.source_order + 1].value
        if len(step):
            out.append(f"Cumulant orders, within each model: {name}([k1] -> [k1, k2]) "
                       f"{_range(step)}; every step n -> n+1 {_range(steps)}"
                       + (f"; [k1] -> [k1..k8] {_range(full)}" if len(full) else "") + ".")
    if groups is not None and len(groups):
        g = groups[(groups.seed == seed) & (groups.metric == metric)
                   & (groups.source != groups.target) & (groups.level == "atom")
                   & (groups.group_kind == "element")]
        if len(g):
            worst = g.groupby("group").agg(value=("value", "mean"), n=("n_test", "max"))
            worst = worst[worst.n >= 5].sort_values("value", ascending=False)
            if len(worst):
                top = worst.head(3)
                out.append("Hardest elements to reconstruct (mean pointwise " + name
                           + " over the pairs, elements with >= 5 test atoms): "
                           + ", ".join(f"{e} {_f(v)}" for e, v in zip(top.index, top.value))
                           + f"; easiest {worst.index[-1]} {_f(worst.value.iloc[-1])}.")
    spread = results[(results.metric == metric) & (results.source != results.target)]
    if spread.seed.nunique() > 1:
        sd = spread.groupby(["level", "features", "layers", "source", "target"]).value.std()
        out.append(f"Over {spread.seed.nunique()} split seeds the typical standard deviation "
                   f"of a number is {_f(float(np.median(sd)))}: smaller differences are not "
                   f"findings.")
    return out
