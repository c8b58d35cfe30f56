"""Orchestration cost before and after a change, side by side in one run.

The no-op annealing run of ``bench/service.py`` (``bench.tasks.noop``: the evaluator returns a constant at once)
runs alternately on the code of a baseline tree and on this tree, ``--rounds`` times each, on the embedded
defaults (SQLite + filesystem broker, in-process runner), on PostgreSQL + Redis (in-process runner) and, with
``--backends ...,distributed``, on PostgreSQL + Redis with the distributed runner. Reported per backend: the
median wall time per trial in steady state (the search's own trials, without the one-off start-up of the task
process) for both trees, and their ratio. Make the baseline tree with ``git archive``:

    mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    python -m bench.orchestration_ab --baseline /tmp/before [--rounds 3] [--trials 40] [--settle 8]

The baseline's own ``bench/service.py`` is not used: only its service code runs (``PYTHONPATH``), so the same
measurement applies to both. Absolute times depend on the machine's load (2 shared cores here); the ratio, taken
in alternating rounds, is the claim.

With ``distributed`` among the backends, a reference line follows: a bare Celery round trip per job on the same
Redis (``bench.bare_celery``: two workers handing a counter back and forth, the two hops of a job without prunehub
or a database), the floor under the distributed runner's figure, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import ROOT, loadavg
from bench.service import orchestration

METRICS = ("steady_wall_per_trial_ms", "steady_overhead_per_trial_ms", "wall_per_trial_ms", "start_up_s")


def run(baseline: Path, rounds: int, trials: int, backends: list[str], settle_s: float = 0.0) -> dict[str, Any]:
    trees = {"baseline": baseline.resolve(), "this tree": ROOT}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: {t: [] for t in trees} for b in backends}
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate who goes first
        for backend in backends:
            for tree in order:
                result = orchestration(backend, trials, code_root=trees[tree], settle_s=settle_s)
                result["tree"], result["round"], result["load"] = tree, r, loadavg()
                print(json.dumps(result, default=str), flush=True)
                runs[backend][tree].append(result)
    summary: dict[str, Any] = {}
    for backend in backends:
        row: dict[str, Any] = {}
        for tree in trees:
            ok = [x for x in runs[backend][tree] if x.get("status") == "succeeded"]
            row[tree] = {m: round(statistics.median(x[m] for x in ok), 2) if ok else None for m in METRICS}
            row[tree]["runs"] = len(ok)
        before, after = row["baseline"]["steady_wall_per_trial_ms"], row["this tree"]["steady_wall_per_trial_ms"]
        row["after / before (steady wall per trial)"] = round(after / before, 2) if before and after else None
        summary[backend] = row
    if "distributed" in backends:
        from bench import bare_celery

        floor = bare_celery.run(jobs=max(trials, 100), rounds=max(rounds, 3))
        print(json.dumps({"bare celery": floor}), flush=True)
        summary["reference: bare Celery round trip per job (two hops, no prunehub)"] = {
            "median_per_job_ms": floor["median_per_job_ms"], "per_job_ms": floor["per_job_ms"], "load": floor["load"]}
    return {"summary": summary, "runs": runs, "trees": {k: str(v) for k, v in trees.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a source tree of the baseline commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--backends", default="embedded,postgres", help="of embedded, postgres, distributed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds between starting the worker and submitting (a worker that has been up a while)")
    args = parser.parse_args()
    out = run(args.baseline, args.rounds, args.trials, args.backends.split(","), args.settle)
    print(json.dumps(out["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
