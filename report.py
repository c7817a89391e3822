"""The run's report: collects every stage's rows into `report.json` and renders `report.md`.

    python train.py --stage report            # rebuilt automatically after every stage anyway
    python train.py --compare runs/A runs/B   # two runs' main tables side by side

Rows share one schema: {"method", "family", "context_chars", "n", "accuracy", "cloud_in_tokens",
"cloud_out_tokens", "edge_in_tokens", "edge_out_tokens", "cost_usd", "subcalls", "relay_tokens",
"seconds"} (per-query means). The main table averages over task families at each context length
and reads like the Minions headline: accuracy, % of `rlm-cloud` accuracy recovered, cloud cost per
query and the factor saved against `rlm-cloud`.

What it deliberately does not do: no statistics beyond means (n is in every row so readers can
judge the noise), no HTML.
"""
import json
import os

import util

STAGE_ORDER = ["pretrain", "eval", "fewshot", "sft", "opd", "rl", "gatekeeper", "cascade"]


TIMED_STAGES = ["pretrain", "eval", "collect", "fewshot", "sft", "rl", "opd", "gatekeeper", "cascade"]


def stage_times(out):
    """One line: each finished stage's wall time in minutes (as recorded when it ran) and the sum."""
    secs = []
    for st in TIMED_STAGES:
        p = os.path.join(out, st, "result.json")
        if os.path.exists(p):
            with open(p) as f:
                s = json.load(f).get("seconds")
            if s is not None:
                secs.append((st, s))
    if not secs:
        return ""
    parts = ", ".join(f"{st} {s / 60:.1f}" for st, s in secs)
    return f"Stage wall time, minutes: {parts}; total {sum(s for _, s in secs) / 60:.1f}."


def collect(out):
    """All rows and per-stage extras of a run directory."""
    rows, extras = [], {}
    for st in STAGE_ORDER:
        p = os.path.join(out, st, "result.json")
        if not os.path.exists(p):
            continue
        with open(p) as f:
            res = json.load(f)
        rows += res.get("rows", [])
        extras[st] = {k: v for k, v in res.items() if k != "rows"}
    return rows, extras


def main_table(rows):
    """One line per (method, length): family-averaged metrics plus per-family accuracy."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["context_chars"]), []).append(r)
    cloud = {L: sum(x["accuracy"] for x in rs) / len(rs) for (m, L), rs in by.items() if m == "rlm-cloud"}
    cloud_cost = {L: sum(x["cost_usd"] for x in rs) / len(rs) for (m, L), rs in by.items() if m == "rlm-cloud"}
    out = []
    for (m, L), rs in by.items():
        acc = sum(x["accuracy"] for x in rs) / len(rs)
        cost = sum(x["cost_usd"] for x in rs) / len(rs)
        line = {"method": m, "context_chars": L, "accuracy": acc,
                "recovered": acc / cloud[L] if cloud.get(L) else None,
                "cost_usd": cost, "saving": cloud_cost[L] / cost if cloud_cost.get(L) and cost > 0 else None,
                "relay_tokens": sum(x["relay_tokens"] for x in rs) / len(rs),
                "subcalls": sum(x["subcalls"] for x in rs) / len(rs),
                "per_family": {x["family"]: x["accuracy"] for x in rs}}
        out.append(line)
    out.sort(key=lambda x: (x["context_chars"], _method_rank(x["method"])))
    return out


def _method_rank(m):
    order = ["direct", "worker-direct", "rlm-cloud", "rlm-edge"]
    return (order.index(m), m) if m in order else (len(order), m)


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def render_main(table):
    fams = sorted({f for t in table for f in t["per_family"]})
    head = "| method | context chars | accuracy | % of rlm-cloud | cloud $/query | saving vs rlm-cloud | relay tokens | sub-calls | " \
           + " | ".join(fams) + " |"
    lines = [head, "|" + "---|" * (8 + len(fams))]
    for t in table:
        lines.append(f"| {t['method']} | {t['context_chars']} | {t['accuracy']:.3f} | {_f(t['recovered'] and 100 * t['recovered'], '.0f')} | "
                     f"{t['cost_usd']:.6f} | {_f(t['saving'], '.1f')}x | {t['relay_tokens']:.0f} | {t['subcalls']:.1f} | "
                     + " | ".join(_f(t["per_family"].get(f), ".2f") for f in fams) + " |")
    return "\n".join(lines)


def render_rows(rows):
    keys = ["method", "family", "context_chars", "n", "accuracy", "cloud_in_tokens", "cloud_out_tokens",
            "edge_in_tokens", "edge_out_tokens", "cost_usd", "subcalls", "relay_tokens", "seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(v):
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 0.01 and v != 0 else f"{v:.3f}"
    return str(v)


def write(out, config):
    rows, extras = collect(out)
    table = main_table(rows)
    util.atomic_write_json(os.path.join(out, "report.json"), {"rows": rows, "main": table, "stages": extras, "config": config})
    md = [f"# Report: {out}", "", "## Main table (family means)", "", render_main(table) if table else "(no rows yet)", ""]
    pre = extras.get("pretrain", {}).get("models")
    if pre:
        md += ["## Pretrained models", "", "| model | params | steps | held-out relay accuracy | false facts on `none` chunks |",
               "|---|---|---|---|---|"]
        for k, v in pre.items():
            if "main_phase" in v:   # the supervisor before its `none`-heavy tail
                m = v["main_phase"]
                md.append(f"| {k} (main phase) | {v['params'] / 1e6:.2f}M | {m['steps']} | {m['relay_accuracy']:.3f} | "
                          f"{m['false_fact_rate']:.3f} |")
            md.append(f"| {k} | {v['params'] / 1e6:.2f}M | {v['steps']} | {v['relay_accuracy']:.3f} | "
                      f"{_f(v.get('false_fact_rate'), '.3f')} |")
        gap = extras["pretrain"].get("gap")
        if gap:
            md += ["", f"Supervisor minus worker on the same {gap['n']} chunks: {gap['mean']:+.3f} "
                       f"(paired 95% interval {gap['ci95'][0]:+.3f} to {gap['ci95'][1]:+.3f})."]
        md.append("")
    times = stage_times(out)
    if times:
        md += [times + " (A stage skipped as done keeps the time of the run that made it.)", ""]
    md += teaching_table(out, extras)
    gk = extras.get("gatekeeper")
    if gk and "before" in gk:
        md += [f"## Gatekeeper (held-out chunks, confidence = {gk['signal']}, supervisor {gk['supervisor_acc']:.3f})", "",
               "| worker | relay accuracy | AUROC | s_d | ECE |", "|---|---|---|---|---|"]
        for name, r in [("pretrained", gk["before"])] + [(f"alpha {a}", r) for a, r in gk["after"].items()]:
            md.append(f"| {name} | {r['worker_acc']:.3f} | {r['auroc']:.3f} | {r['s_d']:+.3f} | {r['ece']:.3f} |")
        md.append("")
    rd = extras.get("cascade", {}).get("relay_deferral")
    if rd:
        md += [f"## When to escalate: relay-level deferral (held-out chunks; worker {rd['worker_acc']:.3f}, "
               f"supervisor {rd['supervisor_acc']:.3f})", "",
               f"| signal | s_d | AUROC | relay accuracy at {rd['rate']:.0%} escalated | gap recovered |", "|---|---|---|---|---|"]
        md += [f"| {k} | {v['s_d']:+.3f} | {v['auroc']:.3f} | {v['accuracy']:.3f} | {v['gap_recovered']:+.2f} |"
               for k, v in sorted(rd["signals"].items(), key=lambda kv: -kv[1]["accuracy"])]
        md.append("")
    code_ok = [r for r in rows if "code_ok" in r]
    if code_ok:
        md += [f"Root code ran without error in {100 * sum(r['code_ok'] for r in code_ok) / len(code_ok):.0f}% of cells "
               f"(mean over {len(code_ok)} method x family x length cells).", ""]
    figs = [f for ex in extras.values() for f in ex.get("figures", [])] + summary_figures(out, rows, table)
    md += [f"![{os.path.splitext(os.path.basename(f))[0]}]({f})" for f in figs]
    md += ["", "## All rows", "", render_rows(rows) if rows else "(none)", ""]
    util.atomic_write_text(os.path.join(out, "report.md"), "\n".join(md))
    return table


def teaching_table(out, extras):
    """Held-out relay accuracy and sampled reverse KL to the supervisor at the first and last
    evaluation of every trained worker (SFT, OPD, RL variants), with the teacher tokens OPD used:
    the worker-level view of the study, read off each variant's metrics.jsonl."""
    lines = []
    for st in ("sft", "opd", "rl"):
        d = os.path.join(out, st)
        if st not in extras or not os.path.isdir(d):
            continue
        for v in sorted(os.listdir(d)):
            path = os.path.join(d, v, "metrics.jsonl")
            ev = [r for r in util.read_jsonl(path) if "relay_acc" in r] if os.path.exists(path) else []
            if not ev:
                continue
            a, b = ev[0], ev[-1]
            rkl = f"{a['heldout_rkl']:.2f} -> {b['heldout_rkl']:.2f}" if a.get("heldout_rkl") is not None and \
                b.get("heldout_rkl") is not None else "-"
            tt = extras[st].get("variants", {}).get(v, {}).get("teacher_tokens")
            lines.append(f"| {st} | {v} | {b['step']} | {a['relay_acc']:.3f} -> {b['relay_acc']:.3f} | {rkl} | "
                         f"{'-' if tt is None else f'{tt:,}'} |")
    if not lines:
        return []
    eff = extras.get("opd", {}).get("efficiency")
    tail = [f"OPD steps to reach SFT's final relay accuracy: {eff.get('opd_steps_to_reach')} vs SFT's "
            f"{eff['sft_steps']} (ratio {_f(eff.get('ratio'), '.1f')}{'; ' + eff['note'] if eff.get('note') else ''}).", ""] if eff else []
    return (["## Teaching the worker (held-out relay accuracy, first -> last evaluation)", "",
             "| stage | variant | steps | relay accuracy | sampled reverse KL to supervisor | teacher tokens |",
             "|---|---|---|---|---|---|"] + lines + [""] + tail)


def summary_figures(out, rows, table):
    """Cross-stage figures: accuracy vs cloud cost (every method a point, cascades as a curve per
    signal) and the length-accuracy frontier (relay tokens vs accuracy) at the long length."""
    if not table:
        return []
    long_len = max(t["context_chars"] for t in table)
    at = [t for t in table if t["context_chars"] == long_len]
    # abstention rows cost what rlm-edge costs: they stay in the tables, off these two plots
    plain = [t for t in at if not t["method"].startswith(("rlm-cascade(", "rlm-edge+abstain("))]
    curves = {}
    for t in at:
        if t["method"].startswith("rlm-cascade("):
            sig = t["method"][len("rlm-cascade("):].split(",")[0]
            curves.setdefault(sig, []).append((t["cost_usd"], t["accuracy"]))
    f1 = plot_points([(t["method"], t["cost_usd"], t["accuracy"]) for t in plain], os.path.join(out, "accuracy_vs_cost.png"),
                     curves=[(k, sorted(v)) for k, v in curves.items()])
    edge = [t for t in plain if t["method"].startswith("rlm-edge")]
    f2 = plot_points([(t["method"], t["relay_tokens"], t["accuracy"]) for t in edge], os.path.join(out, "frontier.png"),
                     xlabel="relay tokens per query (edge -> cloud)", ylabel="accuracy")
    return [os.path.relpath(f, out) for f in (f1, f2)]


def compare(a, b):
    ta, tb = main_table(collect(a)[0]), main_table(collect(b)[0])
    keyed = {(t["method"], t["context_chars"]): t for t in tb}
    lines = [f"{'method':<28}{'chars':>8}  {'acc A':>7} {'acc B':>7}   {'$ A':>10} {'$ B':>10}"]
    for t in ta:
        u = keyed.get((t["method"], t["context_chars"]))
        lines.append(f"{t['method']:<28}{t['context_chars']:>8}  {t['accuracy']:>7.3f} {_f(u and u['accuracy'], '>7.3f')}   "
                     f"{t['cost_usd']:>10.6f} {_f(u and u['cost_usd'], '>10.6f')}")
    return "\n".join(lines)


def plot_curves(series, x, ys, path, xlabel=None, logx=False):
    """One panel per metric in `ys`; one line per (label, metrics rows) series. Rows lacking a
    metric are skipped, so training-loss lines and evaluation lines can share a JSONL file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.4), squeeze=False)
    for ax, y in zip(axes[0], ys):
        for label, rows in series:
            pts = [(r[x], r[y]) for r in rows if x in r and y in r and r[y] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def merge_coincident(points):
    """(label, x, y) points at the same place (to display precision) become one point labelled
    "a = b": methods that learnt the same thing (e.g. all relaying `none`) would otherwise print
    their labels on top of each other. Later labels drop the "rlm-edge" every edge method shares;
    four at most, so a long label does not squeeze the axes."""
    merged = {}
    for label, x, y in points:
        merged.setdefault((round(x, 6), round(y, 3)), (x, y, []))[2].append(label)
    out = []
    for x, y, labels in merged.values():
        text = " = ".join([labels[0]] + [lb.removeprefix("rlm-edge") for lb in labels[1:4]])
        out.append((text + (f" (+{len(labels) - 4} more)" if len(labels) > 4 else ""), x, y))
    return out


def plot_points(points, path, xlabel="cloud $ per query", ylabel="accuracy", curves=None):
    """Scatter of (label, x, y) points plus optional (label, [(x, y), ...]) curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, xs_ys in (curves or []):
        if xs_ys:
            ax.plot(*zip(*xs_ys), marker=".", label=label)
    for label, x, y in merge_coincident(points):
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path):
    """Atomic PNG write: a half-written figure never replaces a good one. Rank 0 only."""
    import matplotlib.pyplot as plt
    if not util.is_main():
        plt.close(fig)
        return path
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
