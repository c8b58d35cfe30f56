"""Run every benchmark section and write the report: ``make bench`` calls ``python -m bench.run_all --full``.

    python -m bench.run_all --full     # ~15 min on 2 cores; writes docs/benchmarks.md, docs/benchmarks.json, docs/img
    python -m bench.run_all --quick    # ~3 min subset; writes .prunehub/bench-quick/ unless --out is given
    python -m bench.run_all --full --only budgets   # one section, merged into the stored report

With ``--only``, the sections run replace theirs in the folder's existing ``benchmarks.json`` and every other
section keeps its stored numbers; each section records the run that measured it (command, commit, time, load),
and the report says which run that was.

Each section is a module with ``run(quick: bool) -> dict``; a section that raises is recorded as failed in the
report (benchmarks are not tests and assert nothing). The load average is sampled every 10 s during the run: other
engineers share this machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, loadavg, machine

# (section, module): the report renders each section that it knows; a new benchmark is one line here.
SECTIONS: list[tuple[str, str]] = [
    ("speedup", "bench.speedup"),
    ("filesize", "bench.filesize"),
    ("budgets", "bench.budgets"),
    ("quality", "bench.quality"),
    ("service", "bench.service"),
    ("scaling", "bench.scaling"),
    ("transformer_memory", "bench.transformer_memory"),
    ("transformer_real", "bench.transformer_real"),
]


def _sample_load(samples: list[tuple[float, list[float]]], stop: threading.Event, t0: float) -> None:
    while not stop.wait(10):
        samples.append((round(time.perf_counter() - t0, 1), loadavg()))


def merged(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report``'s sections over the stored report at ``path`` (its other sections kept as they were measured).

    A stored section without its own ``run`` record gets the stored report's (the run that measured it)."""
    if not path.exists():
        return report
    stored = json.loads(path.read_text())
    previous = {
        "command": stored.get("command"),
        "started": stored.get("started"),
        "finished": stored.get("finished"),
        "commit": stored.get("machine", {}).get("commit"),
        "mode": stored.get("mode"),
    }
    loads = [load[0] for _, load in stored.get("loadavg_samples") or []]
    if loads:
        previous["loadavg_1min"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    sections: dict[str, Any] = {}
    for name, _ in SECTIONS:  # the report's order, whichever run measured a section
        if name in report["sections"]:
            sections[name] = report["sections"][name]
        elif name in stored.get("sections", {}):
            sections[name] = {"run": previous, **stored["sections"][name]}
    return {**report, "sections": sections, "merged": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the ~3-minute subset")
    mode.add_argument("--full", action="store_true", help="everything (the default)")
    parser.add_argument("--out", default=None, help="folder for benchmarks.md/.json and img/")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these sections (merged into the stored report)"
    )
    args = parser.parse_args()
    quick = args.quick
    out = Path(args.out) if args.out else (ROOT / ".prunehub" / "bench-quick" if quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    home = ROOT / ".prunehub"  # the example tasks cache their trained weights here
    os.environ.setdefault("PRUNEHUB_HOME", str(home))
    command = (
        "python -m bench.run_all "
        + ("--quick" if quick else "--full")
        + (f" --out {args.out}" if args.out else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
    )
    t0 = time.perf_counter()
    samples: list[tuple[float, list[float]]] = [(0.0, loadavg())]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(samples, stop, t0), daemon=True)
    sampler.start()
    make = "make bench" + (" BENCH_ARGS=--quick" if quick else "")
    if args.only:
        make = f"make bench BENCH_ARGS='{'--quick' if quick else '--full'} --only {' '.join(args.only)}'"
    report: dict[str, Any] = {
        "command": command,
        "make": make,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "sections": {},
    }
    for name, module_name in SECTIONS:
        if args.only and name not in args.only:
            continue
        print(f"\n===== {name} ({module_name}) =====", flush=True)
        started = time.perf_counter()
        try:
            result = importlib.import_module(module_name).run(quick=quick)
            result["status"] = result.get("status", "succeeded")
        except Exception as exc:  # recorded, never hidden
            traceback.print_exc()
            result = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=10),
            }
        result["section_wall_s"] = time.perf_counter() - started
        during = [load[0] for at, load in samples if at >= started - t0] + [loadavg()[0]]
        result["run"] = {
            "command": command,
            "started": datetime.fromtimestamp(time.time() - result["section_wall_s"], UTC).isoformat(
                timespec="seconds"
            ),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": report["machine"]["commit"],
            "mode": report["mode"],
            "loadavg_1min": {"min": min(during), "median": statistics.median(during), "max": max(during)},
            "cpu": report["machine"]["cpu"],  # sessions may land on different machines of one kind
        }
        report["sections"][name] = result
        print(f"----- {name}: {result['section_wall_s']:.0f} s", flush=True)
    stop.set()
    samples.append((round(time.perf_counter() - t0, 1), loadavg()))
    report["loadavg_samples"] = samples
    report["wall_s"] = time.perf_counter() - t0
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    if args.only:
        report = merged(out / "benchmarks.json", report)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=1, default=str))
    from bench.report import write_report

    write_report(report, out)
    print(
        f"\nwrote {out / 'benchmarks.md'}, {out / 'benchmarks.json'}, {out / 'img'} in {report['wall_s']:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
