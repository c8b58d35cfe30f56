"""Render ``benchmarks.json`` (written by ``bench/run_all.py``) as ``benchmarks.md`` with PNG plots in ``img/``.

python -m bench.report docs/benchmarks.json     # re-render without re-running
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASK_TITLES = {
    "examples.digits": "digits CNN",
    "bench.tasks.residual_digits": "residual net (digits)",
    "bench.tasks.depthwise_digits": "depthwise net (digits)",
}
COLORS = {
    "uniform": "#444444",
    "annealing": "#1f77b4",
    "netadapt": "#2ca02c",
    "admm": "#9467bd",
    "autocompress": "#8c564b",
    "optuna": "#17becf",
    "nni-sa": "#d62728",
    "nni-netadapt": "#ff7f0e",
    "uniform-global": "#999999",
    "agp": "#bcbd22",
    "iterative": "#e377c2",
    "lottery_ticket": "#7f7f00",
}


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def _ms(stats: dict[str, Any], fmt: str = "{:.3f}", spread: bool = True) -> str:
    if not stats:
        return "—"
    text = fmt.format(stats["mean"])
    if spread and stats.get("n", 1) > 1:
        text += " ± " + fmt.format(stats["std"])
    return text


def _save(fig: Any, img: Path, name: str, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> str:
    """Lay out, write ``img/name`` and close the figure; returns ``name``."""
    fig.tight_layout(rect=rect)
    fig.savefig(img / name, dpi=110)
    plt.close(fig)
    return name


# --------------------------------------------------------------------------------------------------
def headline(report: dict[str, Any]) -> dict[str, str]:
    """The three headline sentences (quality, speed, size) from the measured figures."""
    out: dict[str, str] = {}
    sections = report["sections"]
    budgets = sections.get("budgets", {})
    if budgets.get("comparison"):
        from bench.report_budgets import headline as budgets_headline

        text = budgets_headline(budgets)
        if text:
            out["budgets"] = text
    q = sections.get("quality", {})
    summary = q.get("summary") or []
    if summary:
        task = (
            "bench.tasks.residual_digits"
            if any(s["task"] == "bench.tasks.residual_digits" for s in summary)
            else "examples.digits"
        )
        rows = [s for s in summary if s["task"] == task and s["base"] == "l1" and s["target"] == 0.5 and s["score"]]
        ours = [s for s in rows if not s["method"].startswith("nni") and s["method"] != "uniform"]
        uni = next((s for s in rows if s["method"] == "uniform"), None)
        nni = next((s for s in rows if s["method"] == "nni-sa"), None)
        if ours and uni:
            best = max(ours, key=lambda s: s["score"]["mean"])
            text = (
                f"{TASK_TITLES[task]}, 50% l1 filter target: prunehub `{best['method']}` "
                f"{best['score']['mean']:.1%} accuracy at ×{best['flops_ratio']['mean']:.2f} FLOPs / "
                f"×{best['params_ratio']['mean']:.2f} params of the shrunk model, vs uniform "
                f"{uni['score']['mean']:.1%} at ×{uni['flops_ratio']['mean']:.2f} / ×{uni['params_ratio']['mean']:.2f}"
            )
            if nni:
                text += (
                    f" and NNI 2.10.1 SA {nni['score']['mean']:.1%} at ×{nni['flops_ratio']['mean']:.2f} / "
                    f"×{nni['params_ratio']['mean']:.2f} (its nominal 50% removed "
                    f"{nni['conv_removed']['mean']:.0%} of conv filters physically)"
                )
            settings = {(s["task"], s["base"], s["target"]) for s in summary}
            wins = 0
            for key in settings:
                group = [s for s in summary if (s["task"], s["base"], s["target"]) == key and s["score"]]
                base_row = next((s for s in group if s["method"] == "uniform"), None)
                if base_row is None:
                    continue
                if any(
                    s["score"]["mean"] > base_row["score"]["mean"]
                    and s["flops_ratio"]["mean"] <= base_row["flops_ratio"]["mean"] * 1.02
                    for s in group
                    if s["method"] not in ("uniform", "uniform-global") and not s["method"].startswith("nni")
                ):
                    wins += 1
            text += (
                f". In {wins} of the {len(settings)} settings measured (task × l1/fpgm × target), some prunehub search "
                "beat uniform's accuracy at no more FLOPs; no single strategy wins everywhere, and the ones that train "
                "during the search (admm here) have seen more epochs (nominal sparsity, not a FLOPs budget: "
                f"section {_SECTION_NUMBERS.get('quality', 1)})"
            )
            out["quality"] = text + "."
    sp = sections.get("speedup", {})
    for r in sp.get("results") or []:
        if r["model"] == "ResNet-18" and r["batch"] == 1:
            get = {(row["kind"], row["sparsity"]): row for row in r["rows"]}
            shr, msk, lvl = (
                get.get(("filter shrunk", 0.5)),
                get.get(("filter masked", 0.5)),
                get.get(("level stripped", 0.5)),
            )
            if shr and msk:
                text = (
                    f"ResNet-18 shape, 50% filter sparsity, batch 1 on CPU: the shrunk model runs "
                    f"{shr['speedup']:.2f}× faster than dense (×{shr['flops_ratio']:.2f} FLOPs); the merely masked "
                    f"model {msk['speedup']:.2f}×"
                )
                if lvl:
                    text += f", and 50% fine-grained sparsity {lvl['speedup']:.2f}× (no speed-up on dense kernels)"
                out["speed"] = text + "."
    fs = sections.get("filesize", {})
    for r in fs.get("results") or []:
        if r["model"] == "ResNet-18":
            get = {row["sparsity"]: row for row in r["rows"]}
            tf = fs["tf_reference"]
            if all(s in get for s in (0.1, 0.5, 0.9)):
                out["size"] = (
                    f"Compact export of ResNet-18 shape: ×{get[0.1]['compact_ratio']:.2f} of the dense file "
                    f"at 10% fine-grained sparsity, ×{get[0.5]['compact_ratio']:.2f} at 50%, "
                    f"×{get[0.9]['compact_ratio']:.2f} at 90% — the TensorFlow iterative-pruning reference: "
                    + ", ".join(f"×{tf['sizes_mb'][k] / tf['dense_mb']:.2f}" for k in ("0.1", "0.5", "0.9"))
                    + "."
                )
    return out


# --------------------------------------------------------------------------------------------------
def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (lower x, higher y) points, sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_quality(q: dict[str, Any], img: Path) -> list[str]:
    files = []
    runs = [r for r in q.get("runs", []) if r.get("status") == "succeeded"]
    for task in dict.fromkeys(r["task"] for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
        task_runs = [r for r in runs if r["task"] == task]
        for ax, key, label in (
            (axes[0], "flops_ratio", "FLOPs of the shrunk model / dense"),
            (axes[1], "params_ratio", "params of the shrunk model / dense"),
        ):
            for method in dict.fromkeys(r["method"] for r in task_runs):
                for base, marker in (("l1", "o"), ("fpgm", "^")):
                    pts = [r for r in task_runs if r["method"] == method and r["base"] == base]
                    if not pts:
                        continue
                    ax.scatter(
                        [r[key] for r in pts],
                        [r["score"] for r in pts],
                        marker=marker,
                        s=36,
                        alpha=0.8,
                        color=COLORS.get(method, "black"),
                        edgecolors="none",
                        label=f"{method} ({base})",
                    )
            ours = [(r[key], r["score"]) for r in task_runs if r["source"] == "prunehub"]
            front = _pareto(ours)
            if front:
                ax.step(
                    [p[0] for p in front],
                    [p[1] for p in front],
                    where="post",
                    color="black",
                    lw=1.2,
                    label="prunehub Pareto front",
                )
            dense = task_runs[0].get("dense_score")
            if dense:
                ax.axhline(dense, color="grey", ls=":", lw=1, label="dense")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("held-out accuracy after the same fine-tuning")
        scores = [r["score"] for r in task_runs]
        low = max(0.0, min(statistics.quantiles(scores, n=10)[0] if len(scores) > 9 else min(scores), 1.0) - 0.02)
        axes[0].set_ylim(low, 1.0)
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.suptitle(
            f"Search quality, {TASK_TITLES.get(task, task)}: every run (targets 50% and 70%, all seeds) "
            "on the physical plane",
            fontsize=11,
        )
        files.append(_save(fig, img, f"quality-{task.rsplit('.', 1)[-1]}.png", rect=(0, 0, 0.82, 0.95)))
    return files


def quality_md(q: dict[str, Any], img: Path) -> list[str]:
    lines: list[str] = []
    if q.get("status") == "failed":
        return [f"**The quality benchmark failed:** `{q.get('error')}`", ""]
    plan = q.get("plan", {})
    lines += [
        f"Final fine-tuning: {plan.get('final_epochs')} epochs for every method; seeds: {plan.get('seeds')} for "
        f"annealing, optuna and autocompress (1 for the others, deterministic given the task's seeded trainer), "
        f"{plan.get('nni_seeds')} for "
        "NNI's SA (1 for NNI's NetAdapt). Mean ± standard deviation over seeds. *FLOPs* and *params* are ratios of "
        "the physically shrunk model to the dense one; *masked* is the fraction of selected conv filters' weights "
        "the pruner masked (its nominal sparsity), *removed* the fraction physically gone after shrinking "
        "(a channel of a coupled group goes only when every member gave it up). *evals*: evaluator calls during the "
        "search; *wall*: search time (NNI's measured inside its own process, without interpreter start). Strategies "
        "that train during the search (netadapt, admm, autocompress, agp, iterative, lottery_ticket; NNI's NetAdapt) "
        "reach the final fine-tuning with more training behind them than uniform, annealing, optuna and NNI's SA: "
        "their budgets are their configs in `bench/search_quality.py`, and the score column is after, not at, equal "
        "total epochs.",
        "",
    ]
    for name in plot_quality(q, img):
        lines += [f"![{name}](img/{name})", ""]
    summary = q.get("summary", [])
    for task in dict.fromkeys(s["task"] for s in summary):
        lines += [
            f"#### {TASK_TITLES.get(task, task)} (`{task}`)",
            "",
            "| base | target | method | runs | accuracy | FLOPs | params | masked | removed | evals | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in [s for s in summary if s["task"] == task]:
            if s.get("not_applicable") and not s["runs"]:
                lines.append(
                    f"| {s['base']} | {s['target']:.0%} | {s['method']} | 0 | n/a: {s['not_applicable'][:160]} "
                    "| | | | | | |"
                )
                continue
            if not s["score"]:
                lines.append(
                    f"| {s['base']} | {s['target']:.0%} | {s['method']} | {s['runs']} | failed: "
                    f"{'; '.join(e[:160] for e in s['errors'])} | | | | | | |"
                )
                continue
            failed = f" ({s['failed']} failed)" if s["failed"] else ""
            lines.append(
                f"| {s['base']} | {s['target']:.0%} | {s['method']} | {s['runs']}{failed} | "
                f"{_ms(s['score'], '{:.4f}')} | {_ms(s['flops_ratio'])} | {_ms(s['params_ratio'])} | "
                f"{_ms(s.get('conv_masked', {}), '{:.2f}', False)} | "
                f"{_ms(s['conv_removed'], '{:.2f}', False)} | {_ms(s['evals'], '{:.0f}', False)} | "
                f"{_ms(s['wall_s'], '{:.1f}', False)} |"
            )
        lines.append("")
    nni_failed = [r for r in q.get("runs", []) if r.get("source") == "nni" and r.get("status") != "succeeded"]
    if nni_failed:
        lines += ["NNI runs that failed (verbatim):", ""]
        for r in nni_failed:
            lines.append(
                f"- {r['method']} {r['task']} {r['base']} {r['target']:.0%} seed {r['seed']}: "
                f"`{str(r.get('error'))[:400]}`"
            )
        lines.append("")
    if any(r.get("method") == "nni-netadapt" and "budget" in str(r.get("error")) for r in nni_failed):
        lines += [
            "Why NNI's NetAdapt runs out of time: each iteration asks every layer to absorb "
            "`sparsity_per_iteration` × *all* Conv/Linear weights; when no single layer is big enough, it halves the "
            "step and evaluates every layer again, while its progress counter adds the nominal step whatever was "
            "pruned. On a network of many small layers this repeats for a long time.",
            "",
        ]
    nni_scores = [r for r in q.get("runs", []) if r.get("method") == "nni-sa" and r.get("status") == "succeeded"]
    if nni_scores:
        blind = [r for r in nni_scores if r.get("search_score") is not None and r["search_score"] < 0.2]
        tasks = ", ".join(sorted({TASK_TITLES.get(r["task"], r["task"]) for r in blind})) or "none"
        lines += [
            f"NNI's SA scored its own best candidate (before our fine-tuning) at chance level (< 20%) in "
            f"{len(blind)} of {len(nni_scores)} runs (tasks: {tasks}; there, candidates are scored without "
            "fine-tuning, as NNI's SA does by default): NNI masks a convolution's weight and bias but not the "
            "BatchNorm after it, so a masked channel still emits BatchNorm's bias and every candidate it "
            "evaluates is damaged alike — its search compares near-equal scores. prunehub masks the whole "
            "channel group (conv, BatchNorm, coupled convs).",
            "",
        ]
    sa_groups: dict[tuple[Any, ...], set[tuple[float, float]]] = {}
    for r in nni_scores:
        sa_groups.setdefault((r["task"], r["base"], r["target"]), set()).add((r["score"], r["flops_ratio"]))
    if sa_groups and all(len(v) == 1 for v in sa_groups.values()):
        lines += [
            "NNI's SA returned the same result for every seed in every setting (its random generators were seeded "
            "per run): its best was the distribution it started from.",
            "",
        ]
    admm = q.get("nni_admm") or {}
    if admm.get("status") not in (None, "skipped"):
        nan = admm.get("nan_weights") or []
        if admm.get("status") == "succeeded":
            lines += [
                f"NNI 2.10.1 `ADMMPruner` (digits, l1, 50%, 3 iterations): {len(nan)} tensors contain NaN "
                f"after compress() ({', '.join(nan[:6])}{'…' if len(nan) > 6 else ''}); accuracy "
                f"{_f(admm.get('nni_score'), '{:.3f}')}. Recorded, not used in the comparison.",
                "",
            ]
        else:
            lines += [f"NNI 2.10.1 `ADMMPruner` failed: `{admm.get('error')}`", ""]
    return lines


# --------------------------------------------------------------------------------------------------
def plot_speedup(sp: dict[str, Any], img: Path) -> str:
    results = sp["results"]
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 4), sharey=False)
    for ax, model in zip(axes, models, strict=True):
        for r in [r for r in results if r["model"] == model]:
            ls = "-" if r["batch"] == 1 else "--"
            for kind, color in (
                ("filter shrunk", "#2ca02c"),
                ("filter masked", "#1f77b4"),
                ("level stripped", "#d62728"),
                ("level masked", "#ff7f0e"),
            ):
                rows = [row for row in r["rows"] if row["kind"] == kind]
                ax.plot(
                    [0] + [row["sparsity"] * 100 for row in rows],
                    [1] + [row["speedup"] for row in rows],
                    ls=ls,
                    marker="o",
                    ms=3,
                    color=color,
                    label=f"{kind}, batch {r['batch']}",
                )
            flops = [row for row in r["rows"] if row["kind"] == "filter shrunk"]
            if r["batch"] == 1:
                ax.plot(
                    [0] + [row["sparsity"] * 100 for row in flops],
                    [1] + [1 / row["flops_ratio"] for row in flops],
                    color="grey",
                    ls=":",
                    label="dense FLOPs / shrunk FLOPs",
                )
        ax.axhline(1, color="black", lw=0.6)
        ax.set_title(model)
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up vs dense (same run)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7.5, frameon=False)
    return _save(fig, img, "speedup.png", rect=(0, 0.12, 1, 1))


def speedup_md(sp: dict[str, Any], img: Path) -> list[str]:
    if sp.get("status") == "failed":
        return [f"**The speed-up benchmark failed:** `{sp.get('error')}`", ""]
    lines = [
        f"torch {sp.get('threads')} threads. Each variant is timed right after the dense model (pairs in rotating "
        "order, several rounds); each latency is the fastest of a few passes; latency ratio = median over rounds of "
        "(variant / the dense latency just before it); speed-up = 1 / ratio. "
        "FLOPs of masked and fine-grained models are those of dense kernels (they compute on zeros).",
        "",
        f"![speed-up](img/{plot_speedup(sp, img)})",
        "",
    ]
    for r in sp["results"]:
        lines += [
            f"**{r['model']}**, batch {r['batch']}, input {'x'.join(map(str, r['input']))}: dense "
            f"{r['dense_params'] / 1e6:.2f} M params, {r['dense_macs'] / 1e6:.1f} M MACs per sample, "
            f"{r['rows'][0]['latency_ms']:.2f} ms ({r['rounds']} rounds × {r['repeat']} passes; "
            f"load {r['loadavg'][0][0]} → {r['loadavg'][1][0]})",
            "",
            "| variant | sparsity | latency ratio (min–max) | speed-up | FLOPs | params (non-zero) |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"][1:]:
            lines.append(
                f"| {row['kind']} | {row['sparsity']:.0%} | ×{row['latency_ratio']:.2f} "
                f"({row['latency_ratio_min']:.2f}–{row['latency_ratio_max']:.2f}) | {row['speedup']:.2f} | "
                f"×{row['flops_ratio']:.2f} | ×{row['params_ratio']:.2f} |"
            )
        lines.append("")
    lines += [
        "**Fine-grained (level) sparsity gives no speed-up on dense kernels**: the stripped model has the "
        "same shapes and does the same multiply-adds on zeros (ratio ≈ 1), and the masked one is slower still "
        "(the mask is multiplied in on every forward). Only removing whole channels (filter pruning + shrink) "
        "makes a CPU model faster; a masked filter-pruned model is no faster either.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------------------------------
def plot_filesize(fs: dict[str, Any], img: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r, color in zip(fs["results"], ("#1f77b4", "#2ca02c", "#9467bd"), strict=False):
        xs = [row["sparsity"] * 100 for row in r["rows"]]
        ax.plot(
            xs,
            [row["compact_ratio"] for row in r["rows"]],
            marker="o",
            color=color,
            label=f"prunehub compact, {r['model']}",
        )
        if r["rows"][0].get("gzip_ratio"):
            ax.plot(
                xs,
                [row["gzip_ratio"] for row in r["rows"]],
                ls=":",
                color=color,
                label=f"gzip of dense with zeros, {r['model']}",
            )
    tf = fs["tf_reference"]
    ax.plot(
        [float(k) * 100 for k in tf["sizes_mb"]],
        [v / tf["dense_mb"] for v in tf["sizes_mb"].values()],
        "s--",
        color="#d62728",
        label="TensorFlow iterative-pruning reference (published)",
    )
    ax.plot([0, 100], [1, 0], color="grey", lw=0.8, ls="-.", label="density (ideal values-only)")
    ax.axhline(1, color="black", lw=0.6)
    ax.set_xlabel("fine-grained sparsity (%)")
    ax.set_ylabel("file size / dense file")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, img, "filesize.png")


def filesize_md(fs: dict[str, Any], img: Path) -> list[str]:
    if fs.get("status") == "failed":
        return [f"**The file-size benchmark failed:** `{fs.get('error')}`", ""]
    tf = fs["tf_reference"]
    lines = [
        f"TensorFlow reference: {tf['dense_mb']} MB dense; "
        + ", ".join(f"{v} MB at {float(k):.0%} (×{v / tf['dense_mb']:.2f})" for k, v in tf["sizes_mb"].items())
        + ". Every compact file loads back bit-exactly (`load_compact`; column *exact*).",
        "",
        f"![file size](img/{plot_filesize(fs, img)})",
        "",
        "| sparsity | "
        + " | ".join(f"{r['model']} compact (gzip)" for r in fs["results"])
        + " | TF reference | exact |",
        "|---|" + "---|" * (len(fs["results"]) + 2),
    ]
    n = len(fs["results"][0]["rows"])
    for i in range(n):
        s = fs["results"][0]["rows"][i]["sparsity"]
        cells = []
        for r in fs["results"]:
            row = r["rows"][i]
            gz = f" ({row['gzip_ratio']:.2f})" if row.get("gzip_ratio") else ""
            cells.append(f"×{row['compact_ratio']:.3f}{gz}")
        tf_ratio = fs["results"][0]["rows"][i]["tf_ratio"]
        exact = all(r["rows"][i]["roundtrip_exact"] for r in fs["results"])
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + f" | {_f(tf_ratio, '×{:.2f}')} | {exact} |")
    lines += [
        "",
        "Dense files: "
        + ", ".join(f"{r['model']} {r['dense_bytes'] / 1e6:.2f} MB" for r in fs["results"])
        + ". The format picks per tensor the smallest of dense, bitmask (1 bit per entry + values) and index "
        "(int32 position + value), so it is never larger than dense — at 10% the TF reference file is 75% "
        "larger than its dense model. A generic compressor gets as far: gzip of the dense file with its zeros is "
        "within a few percent of the compact file (smaller at low sparsity); the compact file needs no "
        "decompression pass and loads tensor by tensor.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------------------------------
def plot_service(sv: dict[str, Any], img: Path) -> str:
    rows = sv["api"]["rows"]
    labels = [f"{r['endpoint'].split(' ')[0]} {r['clients']}c" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in (
        (axes[0], "rps_ratio", "throughput / bare FastAPI"),
        (axes[1], "p50_ms_ratio", "p50 latency / bare"),
        (axes[2], "p99_ms_ratio", "p99 latency / bare"),
    ):
        ax.bar(labels, [r[key] for r in rows], color=["#1f77b4", "#1f77b4", "#ff7f0e", "#ff7f0e"][: len(rows)])
        ax.axhline(1, color="black", lw=0.6)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, img, "service.png")


def service_md(sv: dict[str, Any], img: Path) -> list[str]:
    lines: list[str] = []
    api = sv.get("api", {})
    if api.get("status") == "failed" or "rows" not in api:
        lines += [f"**The API benchmark failed:** `{api.get('error')}`", ""]
    else:
        lines += [
            f"Each cell: median over {api['rounds']} rounds of {api['seconds_per_run']:.0f} s per server, "
            "prunehub and bare alternating; the API key is sent as on every real request. The load generator (one "
            "asyncio process, a minimal keep-alive HTTP/1.1 client) shares the 2 cores with "
            "both servers and with other engineers' jobs, so absolute numbers are floors; the ratios compare "
            "like with like.",
            "",
            f"![service](img/{plot_service(sv, img)})",
            "",
            "| endpoint | clients | prunehub req/s | bare req/s | ratio | p50 ms (bare) | ratio | p99 ms (bare) | "
            "ratio | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in api["rows"]:
            lines.append(
                f"| `{r['endpoint']}` | {r['clients']} | {r['rps']:.0f} | {r['bare_rps']:.0f} | "
                f"×{r['rps_ratio']:.2f} | {r['p50_ms']:.1f} ({r['bare_p50_ms']:.1f}) | ×{r['p50_ms_ratio']:.2f} | "
                f"{r['p99_ms']:.1f} ({r['bare_p99_ms']:.1f}) | ×{r['p99_ms_ratio']:.2f} | {r['errors']} |"
            )
        lines.append("")
        same = api.get("same_server")
        if same:
            lines += [
                f"`GET /experiments/{{id}}` against `/healthz` on the same server ({same['client']}, "
                f"{same['rows'][0]['clients']} connections, median of {same['rounds']} rounds of "
                f"{same['seconds_per_run']:.0f} s, alternating):",
                "",
                "| server | GET req/s | /healthz req/s | ratio | GET p99 ms | /healthz p99 ms | errors |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in same["rows"]:
                lines.append(
                    f"| {r['server']} | {r['get_rps']:.0f} | {r['healthz_rps']:.0f} | ×{r['get_to_healthz']:.2f} | "
                    f"{r['get_p99_ms']:.1f} | {r['healthz_p99_ms']:.1f} | {r['errors']} |"
                )
            lines.append("")
    orch = sv.get("orchestration") or []
    if orch:
        lines += [
            "Per-trial orchestration overhead: a real `prunehub serve` + `prunehub worker`, `annealing` on "
            "`bench.tasks.noop` (its evaluator returns a constant at once). Overhead = (experiment wall − sum "
            "of trial durations) / trials; a trial's duration is the executor's own measurement (prune, shrink, "
            "count), the rest is the runner: child process, database writes, state persistence, events. These "
            "include the start-up (the task process importing torch, the problem's resolve) and the export. "
            "*Steady* is the search once it runs: from the first search trial's creation to the last one's end, "
            "divided by the search trials (what `bench.scaling` reports \"once the search runs\"); the issue's "
            "target for a no-op trial (15 ms embedded, 15 ms per job distributed) is judged on it. Each backend "
            "ran several times in alternating rounds; the row is its median run (by steady wall time) and the "
            "last column lists every run's steady figure.",
            "",
            "| backend | trials | experiment wall s | sum of trial durations s | overhead per trial ms | "
            "wall per trial ms | steady wall per trial ms | steady overhead per trial ms | submit → done s | "
            "steady, every run ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for o in orch:
            if o.get("status") != "succeeded":
                lines.append(f"| {o['backend']} | failed: `{str(o.get('error'))[:200]}` | | | | | | | | |")
                continue
            steady, steady_overhead = o.get("steady_wall_per_trial_ms"), o.get("steady_overhead_per_trial_ms")
            lines.append(
                f"| {o['backend']} | {o['trials']} | {o['experiment_wall_s']:.2f} | {o['sum_trial_s']:.2f} | "
                f"{o['overhead_per_trial_ms']:.0f} | {o['wall_per_trial_ms']:.0f} | "
                f"{'' if steady is None else f'{steady:.1f}'} | "
                f"{'' if steady_overhead is None else f'{steady_overhead:.1f}'} | {o['submit_to_done_s']:.1f} | "
                f"{', '.join(f'{v:.1f}' for v in o.get('steady_runs_ms') or [])} |"
            )
        lines += [
            "",
            "*embedded*: SQLite + Celery filesystem transport, in-process runner; *postgres*: PostgreSQL "
            "(`prunehub_bench`) + Redis (db 5), in-process runner; *distributed*: PostgreSQL + Redis, the "
            "distributed runner (each job a Celery task; the worker that records a step's last job advances the "
            "search and goes on with the next job for up to `PRUNEHUB_CHAIN_JOBS_S`, so a sequential search's job "
            "needs no broker hop) on a coordinator worker and one evaluation worker. On every backend the next job "
            "is sent to the task process as soon as the strategy asked for it, so it runs while its transaction "
            "commits.",
            "",
        ]
    return lines


# --------------------------------------------------------------------------------------------------
# section -> its number in the report, in the order the report renders them (set by write_report)
_SECTION_NUMBERS: dict[str, int] = {}
_ORDER = ("budgets", "quality", "speedup", "filesize", "service")


def _provenance(report: dict[str, Any]) -> list[str]:
    """How the figures were measured: one run, or (a merged report) the run of each section."""
    m = report["machine"]
    sections = report["sections"]
    machine = (
        f"- **Machine**: {m['nproc']} CPU cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), {m['platform']}"
    )
    if not report.get("merged"):
        samples = report.get("loadavg_samples") or []
        loads = [s[1][0] for s in samples]
        return [
            f"- **Command**: `{report['make']}` (= `{report['command']}`), mode *{report['mode']}*, "
            f"{report['started']} → {report['finished']}, {report['wall_s'] / 60:.1f} min in all.",
            machine + f"; commit `{m['commit']}` (plus the working tree).",
            f"- **Load average** (1 min) during the run: min {min(loads, default=0):.2f}, median "
            f"{statistics.median(loads) if loads else 0:.2f}, max {max(loads, default=0):.2f} — other engineers run "
            "tests on this machine at the same time, which is why every figure is a same-run ratio, rounds "
            "interleave, and spreads are shown.",
        ]
    lines = [
        "- **Runs**: the sections were measured in separate runs of `bench/run_all.py` (each section's own "
        "comparisons are side by side within its run; `--only` reruns a section and keeps the others' stored "
        "figures):",
        "",
        "  | section | command | mode | measured | commit | load (1 min) min / median / max |",
        "  |---|---|---|---|---|---|",
    ]
    for name, section in sections.items():
        run = section.get("run") or {}
        load = run.get("loadavg_1min") or {}
        load_text = f"{load['min']:.2f} / {load['median']:.2f} / {load['max']:.2f}" if load else "—"
        lines.append(
            f"  | {name} | `{run.get('command')}` | {run.get('mode')} | {run.get('started')} → "
            f"{run.get('finished')} | `{run.get('commit')}` | {load_text} |"
        )
    cpus = {(section.get("run") or {}).get("cpu") for section in sections.values()}
    if None in cpus:
        where = "the runs before their CPU was recorded may have been on another 2-core machine"
    elif len(cpus) > 1:
        where = "the runs' CPUs: " + ", ".join(sorted(str(c) for c in cpus))
    else:
        where = "every run was on this machine"
    return lines + [
        "",
        machine + f" (the latest run's; {where}; compare figures within a section).",
        "- **Load**: other engineers run tests on this machine at the same time, which is why every figure is a "
        "same-run ratio, rounds interleave, and spreads are shown.",
    ]


def write_report(report: dict[str, Any], out: Path) -> Path:
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    sections = report["sections"]
    _SECTION_NUMBERS.clear()
    for name in _ORDER:
        if name in sections:
            _SECTION_NUMBERS[name] = len(_SECTION_NUMBERS) + 1
    heads = headline(report)
    lines = [
        "# Benchmarks",
        "",
        "The product's claim is *better distributions, found faster, that really make the model smaller and "
        "faster*. "
        + (
            "Every comparison here was measured side by side within one run (each section's run is listed below), "
            "and is written as a ratio to its baseline from that same run. "
            if report.get("merged")
            else "Every number here was measured side by side in one run of the command below, and is written as a "
            "ratio to its baseline from that same run. "
        )
        + "Benchmarks are not tests: they assert nothing.",
        "",
        *_provenance(report),
        "- **Raw figures**: [`benchmarks.json`](benchmarks.json). Section wall times: "
        + ", ".join(f"{k} {v.get('section_wall_s', 0):.0f} s" for k, v in sections.items())
        + ".",
        "",
        "## Headline",
        "",
    ]
    for key in ("budgets", "quality", "speed", "size"):
        if key in heads:
            lines.append(f"- {heads[key]}")
    lines.append("")
    number = _SECTION_NUMBERS.get
    if "budgets" in sections:
        from bench.report_budgets import budgets_md

        lines += [
            f"## {number('budgets')}. Search quality at a physical budget",
            "",
            "Made by `bench/budgets.py` (strategies run in-process through the worker's own code: "
            "`pruning.jobs.resolve_problem`, the strategy's ask/tell, `pruning.jobs.execute_job`).",
            "",
        ] + budgets_md(sections["budgets"], img)
    if "quality" in sections:
        lines += [
            f"## {number('quality')}. Search quality at a nominal sparsity, against NNI 2.10.1",
            "",
            "Made by `bench/quality.py` (strategies run in-process through the same "
            "executor as the worker; NNI 2.10.1 in its own virtual environment via `bench/nni_reference.py`). "
            "NNI's searches take a nominal sparsity, not a physical budget, so this comparison is at equal "
            "config-list sparsity and reports the FLOPs each result ended up with.",
            "",
        ] + quality_md(sections["quality"], img)
    if "speedup" in sections:
        lines += [f"## {number('speedup')}. Real speed-up", "", "Made by `bench/speedup.py`.", ""]
        lines += speedup_md(sections["speedup"], img)
    if "filesize" in sections:
        lines += [f"## {number('filesize')}. File size", "", "Made by `bench/filesize.py`.", ""]
        lines += filesize_md(sections["filesize"], img)
    if "service" in sections:
        lines += [f"## {number('service')}. Service cost", "", "Made by `bench/service.py`.", ""]
        lines += service_md(sections["service"], img)
    if "scaling" in sections:
        sc = sections["scaling"]
        lines += [
            "### Scaling with evaluation workers",
            "",
            sc.get("markdown") or f"```\n{json.dumps(sc, indent=1, default=str)[:4000]}\n```",
            "",
        ]
    titles = (("transformer_memory", "Transformer memory"), ("transformer_real", "A real pretrained transformer"))
    for key, title in titles:
        if key in sections:  # these sections render their own markdown (bench/transformer_*.py)
            lines += [f"## {title}", "", f"Made by `bench/{key}.py`.", "", sections[key].get("markdown") or "", ""]
    (out / "benchmarks.md").write_text("\n".join(lines))
    return out / "benchmarks.md"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks.json")
    write_report(json.loads(path.read_text()), path.parent)
