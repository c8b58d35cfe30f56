"""How steady the benchmark tasks' fine-tuner is: uniform-at-budget fine-tuned 1, 2 and 3 epochs from its pruned
pretrained weights, with ``examples.digits.fine_tuner`` (learning rate decayed along a cosine over the call) and
with the constant-rate fine-tuner it replaced (the training optimizer, SGD lr 0.05 momentum 0.9, for every epoch).

A fixed-length final fine-tune only compares strategies fairly when the score after it does not jump from one
epoch to the next; this prints the held-out accuracy after each length for both, side by side.

    python -m bench.finetune_stability [--budget 0.25] [TASK ...]    # default: the three digits nets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from typing import Any

from bench.budgets import Setting, _task, algorithm_config
from bench.common import search_in_process

TASKS = ("examples.digits", "bench.tasks.residual_digits", "bench.tasks.depthwise_digits")


def constant_rate_fine_tuner(model: Any, epochs: int = 1) -> None:
    """The fine-tuner ``examples.digits`` had before its decay: the training optimizer at its constant rate."""
    from examples import digits

    opt = digits.optimizer(model)
    loss = digits.criterion()
    for epoch in range(epochs):
        digits.trainer(model, opt, loss, epoch)


def run(entry: str, budget: float) -> dict[str, Any]:
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job, resolve_problem
    from pruning.search import parse_algorithm_config
    from pruning.search.base import Job

    task = _task(entry)
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-finetune-"))
    config = parse_algorithm_config(algorithm_config("uniform", Setting(entry, budget), 0))
    problem = resolve_problem(task, config)
    state, results, jobs = search_in_process(config, task, problem, store)
    assert state.best_key is not None, state.stop_reason
    distribution = results[state.best_key].extra.get("distribution") or jobs[state.best_key].distribution
    as_trained = problem.model_copy(update={"bn_recalibration": False})
    row: dict[str, Any] = {"task": entry, "budget": budget}
    for name, fine_tuner in (("decayed", task.fine_tuner), ("constant", constant_rate_fine_tuner)):
        variant = dataclasses.replace(task, fine_tuner=fine_tuner)
        row[name] = []
        for epochs in (1, 2, 3):
            job = Job(key=f"{name}-{epochs}", kind="finetune_and_evaluate", distribution=distribution,
                      finetune_epochs=epochs)
            row[name].append(round(float(execute_job(variant, as_trained, job, store).score), 4))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--budget", type=float, default=0.25, help="FLOPs budget of the uniform baseline")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for entry in args.tasks:
        print(json.dumps(run(entry, args.budget)), flush=True)


if __name__ == "__main__":
    main()
