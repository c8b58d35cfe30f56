"""The ``budgets`` section of ``docs/benchmarks.md`` (figures from ``bench/budgets.py``): per-setting tables, the
verdict (which search beats uniform where, by how much — computed from the stored figures), the rank-correlation
study and the annealing trace, with plots in ``img/``. :mod:`bench.report` calls :func:`budgets_md` and
:func:`headline`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.budgets import CONTROLS, FINALIST_STRATEGIES, TITLES  # noqa: E402

__all__ = ["budgets_md", "headline", "verdict"]


def _title(task: str, budget: float) -> str:
    return f"{TITLES.get(task, task)}, FLOPs ×{budget:g}"


def _is_loss(mode: str) -> bool:
    return mode == "minimize"


def _score(value: float | None, mode: str) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if _is_loss(mode) else f"{value:.4f}"


def _ms(stats: dict[str, Any], fmt: str) -> str:
    if not stats:
        return "—"
    text = fmt.format(stats["mean"])
    if stats.get("n", 1) > 1:
        text += " ± " + fmt.format(stats["std"])
    return text


def _gain(value: float, mode: str) -> str:
    """A gain over uniform (positive = better): accuracy in percentage points, a loss in its own units."""
    return f"{value:+.1f}" if _is_loss(mode) else f"{value * 100:+.2f} pt"


def _clear(row: dict[str, Any]) -> str:
    if row["clear"] is None:
        return "one run each"
    return "beyond the seed spread" if row["clear"] else "within the seed spread"


def _save(fig: Any, img: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(img / name, dpi=110)
    plt.close(fig)
    return name


# ------------------------------------------------------------------------------------------------ verdict
def verdict(b: dict[str, Any]) -> dict[str, Any]:
    """Who wins where: per setting the best search and its gain, per strategy its gains; all from the figures."""
    comparison = b.get("comparison") or []
    settings = []
    for c in comparison:
        searches = [r for r in c["rows"] if r["method"] not in CONTROLS]
        beat = [r for r in searches if r["gain"] > 0 and r["feasible"]]
        settings.append(
            {
                "task": c["task"],
                "budget": c["budget"],
                "mode": c["optimize_mode"],
                "uniform": c["uniform_score"],
                "winner": c["winner"],
                "beat": [r["method"] for r in sorted(beat, key=lambda r: -r["gain"])],
                "searches": len(searches),
            }
        )
    methods = list(dict.fromkeys(r["method"] for c in comparison for r in c["rows"] if r["method"] not in CONTROLS))
    per_method = []
    for method in methods:
        rows = [(c, next((r for r in c["rows"] if r["method"] == method), None)) for c in comparison]
        present = [(c, r) for c, r in rows if r is not None]
        accuracy = [r["gain"] for c, r in present if not _is_loss(c["optimize_mode"])]
        per_method.append(
            {
                "method": method,
                "settings": len(present),
                "beats": sum(1 for _, r in present if r["gain"] > 0 and r["feasible"]),
                "beats_clearly": sum(1 for _, r in present if r["gain"] > 0 and r["feasible"] and r["clear"]),
                "wins": sum(1 for c in comparison if c["winner"] and c["winner"]["method"] == method),
                "mean_accuracy_gain": statistics.fmean(accuracy) if accuracy else None,
            }
        )
    epochs: dict[str, float] = {}
    for entry in b.get("summary", []):
        if entry["train_epochs"]:
            epochs[entry["method"]] = max(epochs.get(entry["method"], 0.0), entry["train_epochs"]["mean"])
    for m in per_method:
        m["train_epochs"] = epochs.get(m["method"], 0.0)
    groups = {}
    for label, trained in (("trained", True), ("search_only", False)):
        gains = [
            r["gain"]
            for c in comparison
            if not _is_loss(c["optimize_mode"])
            for r in c["rows"]
            if r["method"] not in CONTROLS and (epochs.get(r["method"], 0.0) > 0) == trained
        ]
        names = sorted(m["method"] for m in per_method if (m["train_epochs"] > 0) == trained)
        groups[label] = {"methods": names, "mean_gain": statistics.fmean(gains) if gains else None, "n": len(gains)}
    spreads = [
        entry["score"]["std"]
        for entry in b.get("summary", [])
        if entry["score"] and entry["score"]["n"] > 1 and not _is_loss(entry["optimize_mode"])
    ]
    noise = {"median": statistics.median(spreads), "max": max(spreads), "n": len(spreads)} if spreads else None
    won = [s for s in settings if s["winner"] and s["winner"]["gain"] > 0]
    largest = max((s for s in won if not _is_loss(s["mode"])), key=lambda s: s["winner"]["gain"], default=None)
    return {
        "settings": settings,
        "methods": per_method,
        "won": won,
        "largest": largest,
        "groups": groups,
        "noise": noise,
        "epochs": epochs,
    }


# The bar a search is held to against uniform-at-budget after the same final fine-tune: at least as good (accuracy
# no more than 0.3 pt below, a loss no more than 5% above), and for the distribution searches clearly better (0.5 pt
# more accuracy, or at most 0.85x the loss).
AS_GOOD = {"maximize": -0.003, "minimize": -0.05}
CLEARLY = {"maximize": 0.005, "minimize": 0.15}
BAR_BUDGETS = {"maximize": 0.25, "minimize": 0.35}


def _bar_value(row: dict[str, Any], mode: str) -> float:
    # Accuracy as its difference to uniform, a loss as its relative difference (positive = better).
    return row["gain"] if not _is_loss(mode) else row["relative_gain"] or 0.0


def _bar_cell(row: dict[str, Any] | None, mode: str) -> str:
    if row is None:
        return "—"
    met = _bar_value(row, mode) >= CLEARLY[mode]
    if _is_loss(mode):
        text = f"{1 - row['relative_gain']:.2f}× uniform's loss"
    else:
        text = _gain(row["gain"], mode)
    if row.get("gain_vs_trained") is not None:
        text += f" ({_gain(row['gain_vs_trained'], mode)} vs `uniform_trained`)"
    return ("**yes**: " if met else "no: ") + text


def _bar_lines(b: dict[str, Any]) -> list[str]:
    """Per setting at FLOPs x0.25 (accuracy) or x0.35 (a loss): whether every strategy is at least as good as
    uniform, and whether the distribution searches are clearly better."""
    comparison = [c for c in b.get("comparison") or [] if c["budget"] == BAR_BUDGETS[c["optimize_mode"]]]
    if not comparison:
        return []
    searches = sorted(FINALIST_STRATEGIES)
    lines = [
        "**Against the bar a search must clear**, at FLOPs ×0.25 (accuracy) and ×0.35 (a loss): every strategy at "
        "least as good as uniform (no more than 0.3 pt below it, or 5% above its loss), and "
        + ", ".join(f"`{m}`" for m in searches)
        + " clearly better (0.5 pt more, or at most 0.85× its loss); in brackets the same gain against "
        "`uniform_trained`, the equal-training control.",
        "",
        "| setting | models in budget | below uniform | " + " | ".join(f"{m} clearly better" for m in searches) + " |",
        "|---|---|---|" + "---|" * len(searches),
    ]
    for c in comparison:
        mode = c["optimize_mode"]
        rows = {r["method"]: r for r in c["rows"]}
        strategies = [r for r in c["rows"] if r["method"] not in CONTROLS]
        below = [r for r in strategies if _bar_value(r, mode) < AS_GOOD[mode]]
        runs = [r for r in b.get("runs") or [] if (r["task"], r["budget"]) == (c["task"], c["budget"])]
        in_budget = sum(1 for r in runs if r.get("status") == "succeeded" and r.get("feasible"))
        total = len(runs)
        below_text = ", ".join(
            f"`{r['method']}` ({_gain(r['gain'], mode)})" if not _is_loss(mode)
            else f"`{r['method']}` ({1 - r['relative_gain']:.2f}×)"
            for r in below
        ) or "none"
        lines.append(
            f"| {_title(c['task'], c['budget'])} | {in_budget} of {total} | {below_text} | "
            + " | ".join(_bar_cell(rows.get(m), mode) for m in searches)
            + " |"
        )
    return lines + [""]


def _finalist_lines(b: dict[str, Any]) -> list[str]:
    """What the finalist round is worth: each finalist strategy against uniform, against the equal-training control
    (uniform fine-tuned as long as a finalist) and with only its distribution (masks on the pretrained weights)."""
    comparison = b.get("comparison") or []
    runs = [r for r in b.get("runs", []) if r.get("finalist") is not None]
    if not runs or not any(r["method"] == "uniform_trained" for c in comparison for r in c["rows"]):
        return []
    # Runs before the round's settings were stored used 3 finalists of 1 epoch each.
    finalists = b.get("finalist_config") or {"finalists": 3, "finalist_epochs": 1}
    count, epochs = finalists["finalists"], finalists["finalist_epochs"]
    lines = [
        "**The finalist round, and what it is worth.** `annealing`, `optuna` and `sensitivity` end with "
        f"`candidate_eval: {json.dumps(finalists)}`: their {count} best distinct candidates and "
        f"uniform-at-budget are fine-tuned {epochs} epoch{'s' if epochs != 1 else ''} each and the best of those is "
        f"handed out (with its weights). So their handed-out model has {epochs} epoch{'s' if epochs != 1 else ''} "
        "more training than `uniform`'s; `uniform_trained` (uniform fine-tuned as long) is the equal-training "
        "control. *vs uniform*: the table's gain; *vs "
        "uniform_trained*: the gain at equal training; *masks only*: the chosen distribution's masks on the "
        "pretrained weights, the same final fine-tuning, against uniform (what the distribution alone gives); "
        "*uniform chosen*: runs whose finalist round handed out uniform."
        + (
            " The strategies that train while they search ran with the uniform guard (uniform fine-tuned "
            f"{epochs} epoch{'s' if epochs != 1 else ''} replaces their best only when it scores better); they are "
            "in the table too, *uniform chosen* "
            "counting the runs whose guard handed out uniform (*masks only* does not apply to them)."
            if any(r["method"] not in FINALIST_STRATEGIES for r in runs)
            else ""
        ),
        "",
        "| method | setting | vs uniform | vs uniform_trained | masks only | uniform chosen |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparison:
        for r in c["rows"]:
            picked = [x for x in runs if (x["task"], x["budget"], x["method"]) == (c["task"], c["budget"], r["method"])]
            if not picked:
                continue
            mode = c["optimize_mode"]
            chose_uniform = sum(1 for x in picked if x["finalist"] == "finalist-uniform")
            vs_trained = "—" if r.get("gain_vs_trained") is None else _gain(r["gain_vs_trained"], mode)
            alone = "—" if r.get("gain_from_pretrained") is None else _gain(r["gain_from_pretrained"], mode)
            lines.append(
                f"| {r['method']} | {_title(c['task'], c['budget'])} | {_gain(r['gain'], mode)} | {vs_trained} | "
                f"{alone} | {chose_uniform} of {len(picked)} |"
            )
    return lines + [""]


def _verdict_lines(b: dict[str, Any]) -> list[str]:
    v = verdict(b)
    settings = v["settings"]
    if not settings:
        return []
    lines = [
        "**Who wins where** (computed from the table below; gain = final score minus uniform's, positive = better):",
        "",
    ]
    for s in settings:
        name = _title(s["task"], s["budget"])
        w = s["winner"]
        if w is None:
            lines.append(f"- {name}: no feasible search finished.")
        elif w["gain"] > 0:
            trained = v["epochs"].get(w["method"], 0.0)
            lines.append(
                f"- {name}: `{w['method']}` beats uniform ({_score(s['uniform'], s['mode'])}) by "
                f"{_gain(w['gain'], s['mode'])} ({_clear(w)}"
                + (f"; it trained {trained:.0f} epochs during its search" if trained else "")
                + f"); {len(s['beat'])} of {s['searches']} searches beat "
                f"uniform ({', '.join(f'`{m}`' for m in s['beat'])})."
            )
        else:
            lines.append(
                f"- {name}: uniform ({_score(s['uniform'], s['mode'])}) is not beaten; the closest search, "
                f"`{w['method']}`, is {_gain(w['gain'], s['mode'])}."
            )
    won, largest = v["won"], v["largest"]
    often = max(v["methods"], key=lambda m: (m["beats"], m["mean_accuracy_gain"] or 0.0), default=None)
    text = f"In {len(won)} of the {len(settings)} settings some search beat uniform at the same budget"
    if largest:
        text += (
            f"; the largest gain on accuracy is `{largest['winner']['method']}` on "
            f"{_title(largest['task'], largest['budget'])} ({_gain(largest['winner']['gain'], largest['mode'])})"
        )
    lost = [_title(s["task"], s["budget"]) for s in settings if s not in won]
    if lost:
        text += f". Uniform was not beaten on {'; '.join(lost)}"
    if often:
        text += (
            f". The strategy that beats uniform most often is `{often['method']}` ({often['beats']} of "
            f"{often['settings']} settings, {often['beats_clearly']} beyond the seed spread)"
        )
    lines += ["", text + ".", ""]
    trained, search_only = v["groups"]["trained"], v["groups"]["search_only"]
    if trained["mean_gain"] is not None and search_only["mean_gain"] is not None:
        lines += [
            "Averaged over the accuracy settings, the strategies that train during their search "
            f"({', '.join(f'`{m}`' for m in trained['methods'])}) gain {trained['mean_gain'] * 100:+.2f} pt over "
            f"uniform, the ones that only choose a distribution and start the final fine-tune from the pretrained "
            f"weights ({', '.join(f'`{m}`' for m in search_only['methods'])}) {search_only['mean_gain'] * 100:+.2f} "
            "pt"
            + (
                ": at these budgets the extra training, more than the distribution, is what the gains reflect."
                if trained["mean_gain"] > max(search_only["mean_gain"], 0.0)
                else "."
            ),
            "",
        ]
    if v["noise"]:
        noise = v["noise"]
        lines += [
            f"How noisy the final score is: over the {noise['n']} seeded (strategy, setting) pairs on accuracy, the "
            f"standard deviation over seeds is {noise['median'] * 100:.1f} pt at the median and up to "
            f"{noise['max'] * 100:.1f} pt (two epochs of the tasks' own fine-tuner: "
            "`examples.digits`' SGD, momentum 0.9, its learning rate 0.05 decayed to zero along a cosine over the "
            "call). Uniform and the deterministic strategies ran "
            "once, so a single-run gain smaller than that spread is not evidence either way.",
            "",
        ]
    held_out = b.get("held_out_samples")
    if held_out:
        lines += [
            f"One held-out image is {100 / held_out:.2f} pt of accuracy on the digits split ({held_out} images): "
            "gains of a few tenths are one or two images. `bench.tasks.shifted_digits` scores each of those digits at "
            f"9 offsets ({9 * held_out} images), so one image is {100 / (9 * held_out):.2f} pt there.",
            "",
        ]
    return lines


def headline(b: dict[str, Any]) -> str | None:
    """The quality headline sentence from the budget comparison."""
    v = verdict(b)
    if not v["settings"]:
        return None
    runs = [r for r in b.get("runs", []) if r.get("status") == "succeeded"]
    ratios = [r["flops_ratio"] for r in runs if r.get("flops_ratio") is not None]
    feasible = sum(1 for r in runs if r.get("feasible"))
    budgets = sorted({s["budget"] for s in v["settings"]})
    nets = sorted({s["task"].split(":")[0] for s in v["settings"]})
    losses = sum(1 for s in v["settings"] if _is_loss(s["mode"]))
    what = f"{len(nets)} digits net{'s' if len(nets) > 1 else ''}" + (
        f", {losses} setting{'s' if losses > 1 else ''} with a ×1000 loss minimised" if losses else ""
    )
    text = (
        f"At the same measured FLOPs budget (×{', ×'.join(f'{x:g}' for x in budgets)} of dense; {what}) and after "
        f"the same {b.get('plan', {}).get('final_epochs')}-epoch fine-tune, some search beat uniform-at-budget in "
        f"{len(v['won'])} of {len(v['settings'])} settings"
    )
    if v["largest"]:
        largest = v["largest"]
        trained = v["epochs"].get(largest["winner"]["method"], 0.0)
        text += (
            f" (largest: `{largest['winner']['method']}`, {_gain(largest['winner']['gain'], largest['mode'])} on "
            f"{_title(largest['task'], largest['budget'])}, {_clear(largest['winner'])}"
            + (f", after {trained:.0f} epochs of training in its search" if trained else "")
            + ")"
        )
    groups = v["groups"]
    if groups["trained"]["mean_gain"] is not None and groups["search_only"]["mean_gain"] is not None:
        text += (
            f"; on average the strategies that train during the search gain "
            f"{groups['trained']['mean_gain'] * 100:+.2f} pt, those that only choose the distribution "
            f"{groups['search_only']['mean_gain'] * 100:+.2f} pt"
        )
    if v["noise"]:
        text += f", against a seed spread of the final score of up to {v['noise']['max'] * 100:.1f} pt"
    if ratios:
        text += (
            f"; handed-out models measured ×{min(ratios):.2f}–×{max(ratios):.2f} FLOPs of dense, {feasible} of "
            f"{len(runs)} runs within the budget"
        )
    return text + " (section 1)."


# ------------------------------------------------------------------------------------------------ tables
def _setting_table(b: dict[str, Any], task: str, budget: float) -> list[str]:
    summary = [s for s in b.get("summary", []) if s["task"] == task and s["budget"] == budget]
    comparison = next((c for c in b.get("comparison", []) if c["task"] == task and c["budget"] == budget), None)
    gains = {r["method"]: r for r in (comparison or {}).get("rows", [])}
    mode = summary[0]["optimize_mode"] if summary else "maximize"
    what = "1000 × loss (lower is better)" if _is_loss(mode) else "accuracy"
    fmt = "{:.1f}" if _is_loss(mode) else "{:.4f}"
    dense = (b.get("dense_score") or {}).get(task)
    lines = [
        f"#### {_title(task, budget)} (`{task}`; dense {what} {_score(dense, mode)})",
        "",
        f"| method | runs | final {what} | gain vs uniform | candidate score | FLOPs | params | in budget | evals | "
        "epochs in search | search s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if not s["score"]:
            errors = "; ".join(e[:200] for e in s["errors"])
            lines.append(f"| {s['method']} | {s['runs']} | failed: {errors} | | | | | | | | |")
            continue
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        gain = gains.get(s["method"])
        gain_text = "—" if s["method"] == "uniform" or gain is None else _gain(gain["gain"], mode)
        if gain is not None and gain["clear"] and s["method"] != "uniform":
            gain_text += " *"
        lines.append(
            f"| {s['method']} | {s['runs']}{failed} | {_ms(s['score'], fmt)} | {gain_text} | "
            f"{_ms(s['search_score'], fmt)} | {_ms(s['flops_ratio'], '{:.3f}')} | {_ms(s['params_ratio'], '{:.3f}')} | "
            f"{'yes' if s['feasible'] else 'no'} | {_ms(s['evals'], '{:.0f}')} | {_ms(s['train_epochs'], '{:.0f}')} | "
            f"{_ms(s['wall_s'], '{:.1f}')} |"
        )
    return lines + [""]


def _method_matrix(b: dict[str, Any]) -> list[str]:
    comparison = b.get("comparison") or []
    if not comparison:
        return []
    v = verdict(b)
    head = " | ".join(
        f"{TITLES.get(c['task'], c['task']).replace('depthwise net, 1000 × loss', 'depthwise, loss')} ×{c['budget']:g}"
        for c in comparison
    )
    lines = [
        f"| method | {head} | beats uniform | mean gain (accuracy settings) |",
        "|---|" + "---|" * (len(comparison) + 2),
    ]
    for m in v["methods"]:
        cells = []
        for c in comparison:
            r = next((r for r in c["rows"] if r["method"] == m["method"]), None)
            if r is None:
                cells.append("—")
                continue
            cell = _gain(r["gain"], c["optimize_mode"]) + (" *" if r["clear"] else "")
            if c["winner"] and c["winner"]["method"] == m["method"] and r["gain"] > 0:
                cell = f"**{cell}**"
            cells.append(cell)
        mean = m["mean_accuracy_gain"]
        lines.append(
            f"| {m['method']} | {' | '.join(cells)} | {m['beats']} of {m['settings']} | "
            f"{'—' if mean is None else f'{mean * 100:+.2f} pt'} |"
        )
    return lines + [
        "",
        "Gain over uniform per setting (accuracy in percentage points, the loss in its own units; positive = better; "
        "**bold**: the setting's best search; \\*: beyond the spread over seeds).",
        "",
    ]


# ------------------------------------------------------------------------------------------------ plots
COLORS = {
    "uniform": "#444444",
    "annealing": "#1f77b4",
    "netadapt": "#2ca02c",
    "netadapt_uniform": "#98df8a",
    "admm": "#9467bd",
    "autocompress": "#8c564b",
    "optuna": "#17becf",
    "agp": "#bcbd22",
    "iterative": "#e377c2",
    "lottery_ticket": "#7f7f00",
    "sensitivity": "#ff7f0e",
}


def plot_gains(b: dict[str, Any], img: Path) -> str | None:
    comparison = b.get("comparison") or []
    summary = {(s["task"], s["budget"], s["method"]): s for s in b.get("summary", [])}
    if not comparison:
        return None
    cols = min(4, len(comparison))
    rows = (len(comparison) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax, c in zip(axes.flat, comparison, strict=False):
        loss = _is_loss(c["optimize_mode"])
        scale = 1.0 if loss else 100.0
        methods = [r for r in c["rows"] if r["method"] != "uniform"]
        base = summary[(c["task"], c["budget"], "uniform")]["score"]
        for i, r in enumerate(methods):
            stats = summary[(c["task"], c["budget"], r["method"])]["score"]
            err = max(stats["std"], base["std"]) * scale
            ax.barh(i, r["gain"] * scale, xerr=err or None, color=COLORS.get(r["method"], "black"), alpha=0.85)
        ax.set_yticks(range(len(methods)), [r["method"] for r in methods], fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(_title(c["task"], c["budget"]), fontsize=9)
        ax.set_xlabel("gain vs uniform (loss units)" if loss else "gain vs uniform (accuracy pt)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(comparison) :]:
        ax.axis("off")
    return _save(fig, img, "budgets-gain.png")


def plot_correlation(corr: dict[str, Any], img: Path) -> str | None:
    points = [p for p in corr.get("points", []) if p.get("status") == "succeeded"]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, key, label, rho in (
        (axes[0], "recalibrated", "candidate score, BatchNorm recalibrated", corr.get("spearman_recalibrated")),
        (axes[1], "raw", "candidate score, no recalibration", corr.get("spearman_raw")),
    ):
        ax.scatter([p[key] for p in points], [p["finetuned"] for p in points], s=28, color="#1f77b4")
        ax.set_xlabel(label, fontsize=9)
        ax.set_title(f"Spearman ρ = {'—' if rho is None else f'{rho:.2f}'}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score after 1 epoch of fine-tuning", fontsize=9)
    return _save(fig, img, "budgets-rank.png")


def _trace_runs(b: dict[str, Any]) -> list[dict[str, Any]]:
    """The seed-0 annealing run of every setting that has one, in plan order."""
    return [r for r in b.get("runs", []) if r.get("method") == "annealing" and r.get("seed") == 0 and r.get("trace")]


def plot_trace(b: dict[str, Any], img: Path, picks: list[dict[str, Any]]) -> str | None:
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(5.2 * len(picks), 3.8), squeeze=False)
    for ax, run in zip(axes.flat, picks, strict=True):
        trace = [t for t in run["trace"] if t["score"] is not None]
        for decision, marker, color in (("accepted", "o", "#2ca02c"), ("rejected", "x", "#d62728")):
            pts = [t for t in trace if t["decision"] == decision]
            ax.scatter([t["trial"] for t in pts], [t["score"] for t in pts], marker=marker, color=color, label=decision)
        ax.plot([t["trial"] for t in trace], [t["score"] for t in trace], color="grey", lw=0.6)
        ax.set_xlabel("trial", fontsize=9)
        ax.set_ylabel("candidate score", fontsize=9)
        ax.set_title(_title(run["task"], run["budget"]) + ", seed 0", fontsize=9)
        twin = ax.twinx()
        probs = [t for t in trace if t["acceptance_probability"] is not None]
        twin.bar(
            [t["trial"] for t in probs],
            [t["acceptance_probability"] for t in probs],
            alpha=0.25,
            color="#1f77b4",
            label="P(accept) of a worse-or-equal proposal",
        )
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("acceptance probability", fontsize=9)
        ax.set_zorder(twin.get_zorder() + 1)  # the scores in front of the probability bars
        ax.patch.set_visible(False)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        ax.grid(alpha=0.3)
    return _save(fig, img, "budgets-annealing.png")


# ------------------------------------------------------------------------------------------------ section
def _trace_md(b: dict[str, Any], img: Path) -> list[str]:
    runs = [r for r in b.get("runs", []) if r.get("method") == "annealing" and r.get("trace")]
    if not runs:
        return []
    seed0 = _trace_runs(b)
    loss = next((r for r in seed0 if _is_loss(r.get("optimize_mode", "maximize"))), None)
    residual = next((r for r in seed0 if "residual" in r["task"]), None)
    picks = [r for r in (residual or (seed0[0] if seed0 else None), loss) if r is not None]
    lines = [
        "### Annealing trace",
        "",
        "Per trial of each annealing run (the state's history records): accepted or rejected, and for a "
        "worse-or-equal proposal the Metropolis probability it had, `exp(d / (T / T0))` with `d` the score "
        "difference divided by the running standard deviation of the scores seen so far, so the decisions do not "
        "depend on the score's scale: compare the 1000 × loss row with the accuracy rows (NNI compared raw "
        "differences with the temperature, accepting nearly everything on an accuracy and nothing on such a loss).",
        "",
    ]
    name = plot_trace(b, img, picks)
    if name:
        lines += [f"![annealing trace](img/{name})", ""]
    lines += [
        "| setting | runs | trials | accepted | worse-or-equal proposals | mean P(accept) of those | of those "
        "accepted |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["task"], r["budget"]) for r in runs):
        group = [r for r in runs if (r["task"], r["budget"]) == key]
        trials = [t for r in group for t in r["trace"]]
        worse = [t for t in trials if t["acceptance_probability"] is not None]
        lines.append(
            f"| {_title(*key)} | {len(group)} | {len(trials)} | "
            f"{sum(1 for t in trials if t['decision'] == 'accepted')} | {len(worse)} | "
            f"{statistics.fmean(t['acceptance_probability'] for t in worse) if worse else 0:.2f} | "
            f"{sum(1 for t in worse if t['decision'] == 'accepted')} |"
        )
    lines.append("")
    for run in picks:
        mode = run.get("optimize_mode", "maximize")
        lines += [
            f"{_title(run['task'], run['budget'])}, seed 0:",
            "",
            "| trial | temperature | candidate score | FLOPs ratio | decision | P(accept) if worse-or-equal |",
            "|---|---|---|---|---|---|",
        ]
        for t in run["trace"]:
            p, ratio = t["acceptance_probability"], t["budget_ratio"]
            if p is not None:
                chance = f"{p:.2f}"
            elif t["decision"] == "failed":
                chance = "— (failed)"
            else:
                chance = "— (better)" if t["trial"] else "— (start)"
            lines.append(
                f"| {t['trial']} | {t['temperature']:.1f} | {_score(t['score'], mode)} | "
                f"{'—' if ratio is None else f'{ratio:.3f}'} | {t['decision']} | {chance} |"
            )
        lines.append("")
    return lines


def _correlation_md(b: dict[str, Any], img: Path) -> list[str]:
    corr = b.get("correlation") or {}
    if corr.get("status") in (None, "skipped"):
        return []
    if corr.get("status") == "failed":
        return ["### Candidate score vs final score", "", f"**The study failed:** `{corr.get('error')}`", ""]
    points = [p for p in corr.get("points", []) if p.get("status") == "succeeded"]
    rho_bn, rho_raw = corr.get("spearman_recalibrated"), corr.get("spearman_raw")
    lines = [
        "### Candidate score vs final score",
        "",
        f"{len(points)} random distributions"
        + (f" (of {corr.get('samples')} drawn; the others failed)" if corr.get("samples") != len(points) else "")
        + f" on {_title(corr['task'], corr['budget'])} (per unit a shape drawn from "
        "U(0.1, 1), projected onto the budget), each scored right after pruning with BatchNorm recalibration "
        "(16 batches) and without, and after one epoch of fine-tuning. Spearman's ρ of the candidate score "
        "against the fine-tuned one: **"
        f"{'—' if rho_bn is None else f'{rho_bn:.2f}'} with recalibration, "
        f"{'—' if rho_raw is None else f'{rho_raw:.2f}'} without**.",
    ]
    if points:
        mean = {k: statistics.fmean(p[k] for p in points) for k in ("recalibrated", "raw", "finetuned")}
        tuned = [p["finetuned"] for p in points]
        held_out = b.get("held_out_samples")
        depth = round((max(tuned) - min(tuned)) * held_out) if held_out else None
        lines[-1] += (
            f" Mean scores: {mean['recalibrated']:.3f} recalibrated, {mean['raw']:.3f} without, "
            f"{mean['finetuned']:.3f} after the epoch; the fine-tuned scores span {min(tuned):.3f}–{max(tuned):.3f}"
            + (f" ({depth} held-out images)" if depth is not None else "")
            + (
                ", so the ranking they are compared with is itself only a few images deep."
                if depth is not None and depth <= 5
                else "."
            )
        )
    name = plot_correlation(corr, img)
    lines.append("")
    if name:
        lines += [f"![rank correlation](img/{name})", ""]
    return lines


def budgets_md(b: dict[str, Any], img: Path) -> list[str]:
    if b.get("status") == "failed":
        return [f"**The budget benchmark failed:** `{b.get('error')}`", ""]
    plan = b.get("plan", {})
    configs = b.get("strategy_configs") or {}
    seeded = b.get("stochastic") or []
    once = [m for m in configs if m not in seeded]
    keep = b.get("keep_weights") or []
    lines = [
        "Every strategy against `uniform` at the same budget: a config list that only selects layers "
        '(`[{"op_types": ["Conv2d", "Linear"]}, {"exclude": true, "op_names": [<classifier>]}]`) and '
        '`"budget": {"flops": B}`; every candidate is projected onto the budget before it is evaluated and scored '
        "after BatchNorm recalibration (16 batches). Each run's best is then fine-tuned "
        f"{plan.get('final_epochs')} epochs with the task's own fine-tuner and evaluated as trained; *FLOPs* and "
        "*params* are measured on that handed-out, physically shrunk model (ratio to dense; *in budget*: FLOPs "
        "within the budget plus its one-point tolerance). The final fine-tuning starts from the best checkpoint for "
        f"{', '.join(f'`{m}`' for m in keep)} (they hand out trained weights: their training is the method, or "
        "their finalist round fine-tuned the winner) and from the pretrained weights with "
        "the best distribution's masks for the others. "
        f"Seeds: {plan.get('seeds')} for {', '.join(f'`{m}`' for m in seeded) or 'none'} (their "
        f"proposals are random); 1 for {', '.join(f'`{m}`' for m in once)} (deterministic given the tasks' seeded "
        "trainers). Mean ± standard deviation over seeds. *candidate score*: the best candidate's score during the "
        "search (recalibrated; for trained strategies after their training); *evals*: evaluator calls during the "
        "search; *epochs in search*: training epochs the search spent (the strategies that train reach the final "
        "fine-tuning with that much more training behind them); *search s*: wall time of the search, one torch "
        f"thread, {b.get('parallel_jobs')} runs at a time on the shared cores.",
        "",
        "Strategy parameters (small, to fit the section in minutes): "
        + "; ".join(f"`{m}` " + (f"`{json.dumps(configs[m])}`" if configs[m] else "defaults") for m in configs)
        + ".",
        "",
    ]
    for note in b.get("notes") or []:
        lines += [f"- {note}", ""]
    lines += _verdict_lines(b)
    lines += _bar_lines(b)
    name = plot_gains(b, img)
    if name:
        lines += [f"![gain vs uniform](img/{name})", ""]
    lines += _method_matrix(b)
    lines += _finalist_lines(b)
    for task, budget in dict.fromkeys((s["task"], s["budget"]) for s in b.get("summary", [])):
        lines += _setting_table(b, task, budget)
    failed = [r for r in b.get("runs", []) if r.get("status") != "succeeded"]
    if failed:
        lines += ["Runs that failed (verbatim):", ""]
        for r in failed:
            lines.append(
                f"- {r.get('method')} on {_title(r.get('task', '?'), r.get('budget', 0))} seed {r.get('seed')}: "
                f"`{str(r.get('error'))[:400]}`"
            )
        lines.append("")
    lines += _correlation_md(b, img)
    lines += _trace_md(b, img)
    return lines
