"""NNI 2.10.1 reference runs for ``bench/quality.py``.

Runs under NNI's own virtual environment (``.venv/nni``, made by ``make bench``).

Imports torch, nni, scikit-learn, safetensors and the task module only (never prunehub). One run per call:

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv/nni/bin/python bench/nni_reference.py \\
        --task examples.digits --algo sa --base l1 --sparsity 0.5 --seed 0 --out DIR

``sa``: v2 ``SimulatedAnnealingPruner`` (NNI's defaults 100 → 20, cool down 0.9, perturbation 0.35 — the same as
prunehub's ``annealing``); ``netadapt``: v1 ``NetAdaptPruner`` (sparsity_per_iteration 0.05, one epoch of
short-term fine-tuning — prunehub's ``netadapt`` defaults); ``admm``: v2 ``ADMMPruner``. Prints one JSON line: the
evaluator calls, wall time, NNI's own best score, whether any weight is NaN, and writes the best model's weights
(``weights.safetensors``) and per-layer masks (``masks.safetensors``) into ``--out`` for prunehub to fine-tune,
shrink and count physically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _clean(name: str) -> str:
    return name.replace(".module.", ".").removeprefix("module.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True)
    parser.add_argument("--algo", choices=["sa", "netadapt", "admm"], required=True)
    parser.add_argument("--base", default="l1")
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=float, default=0.05, help="NetAdapt: sparsity_per_iteration")
    parser.add_argument("--candidate-epochs", type=int, default=0, help="SA: fine-tune each candidate this long")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    task = importlib.import_module(args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = [0]

    def evaluator(model: torch.nn.Module) -> float:
        calls[0] += 1
        return float(task.evaluator(model))

    def fine_tuner(model: torch.nn.Module) -> None:
        task.fine_tuner(model, 1)

    config_list = [{"sparsity": args.sparsity, "op_types": ["Conv2d"]}]
    model = task.model()
    record: dict = {
        "algo": args.algo,
        "task": args.task,
        "base": args.base,
        "sparsity": args.sparsity,
        "seed": args.seed,
    }
    started = time.perf_counter()
    try:
        import nni

        record["nni_version"] = nni.__version__
        if args.algo == "sa":
            from nni.compression.pytorch.pruning import SimulatedAnnealingPruner

            log_dir = tempfile.mkdtemp(prefix="nni-sa-")
            pruner = SimulatedAnnealingPruner(
                model,
                config_list,
                evaluator=evaluator,
                start_temperature=100,
                stop_temperature=20,
                cool_down_rate=0.9,
                perturbation_magnitude=0.35,
                pruning_algorithm=args.base,
                log_dir=log_dir,
                keep_intermediate_result=False,
                finetuner=(lambda m: task.fine_tuner(m, args.candidate_epochs)) if args.candidate_epochs else None,
            )
            pruner.compress()
            _, best_model, nni_masks, score, _ = pruner.get_best_result()
            record["nni_score"] = score
            state = best_model.state_dict()
        elif args.algo == "netadapt":
            from nni.algorithms.compression.pytorch.pruning import NetAdaptPruner

            data_dir = tempfile.mkdtemp(prefix="nni-netadapt-")
            pruner = NetAdaptPruner(
                model,
                config_list,
                short_term_fine_tuner=fine_tuner,
                evaluator=evaluator,
                base_algo=args.base,
                sparsity_per_iteration=args.step,
                experiment_data_dir=data_dir,
            )
            pruner.compress()
            model_path, mask_path = os.path.join(data_dir, "m.pth"), os.path.join(data_dir, "mask.pth")
            pruner.export_model(model_path, mask_path)
            state = torch.load(model_path, weights_only=False)
            nni_masks = torch.load(mask_path, weights_only=False)
            fresh = task.model()
            fresh.load_state_dict(state)
            record["nni_score"] = float(task.evaluator(fresh))
        else:
            from nni.compression.pytorch.pruning import ADMMPruner

            def trainer(model, optimizer, criterion):  # type: ignore[no-untyped-def]
                task.trainer(model, optimizer, criterion, 0)

            traced_optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.05, momentum=0.9)
            pruner = ADMMPruner(
                model,
                [{**config_list[0]}],
                trainer=trainer,
                traced_optimizer=traced_optimizer,
                criterion=torch.nn.CrossEntropyLoss(),
                iterations=3,
                training_epochs=1,
                granularity="coarse-grained",
            )
            _, nni_masks = pruner.compress()
            pruner._unwrap_model()
            state = model.state_dict()
            record["nni_score"] = float(task.evaluator(model))
        masks = {_clean(name): mask["weight"].detach().float() for name, mask in nni_masks.items()}
        state = {_clean(k): v.detach().float().contiguous() for k, v in state.items() if "mask" not in k}
        record["nan_weights"] = sorted(k for k, v in state.items() if bool(torch.isnan(v).any()))
        conv = {k: v for k, v in masks.items() if v.dim() == 4}
        record["masked_conv_fraction"] = 1 - sum(float(v.sum()) for v in conv.values()) / max(
            1, sum(v.numel() for v in conv.values())
        )
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
        save_file({k: v.contiguous() for k, v in masks.items()}, str(out / "masks.safetensors"))
        record["status"] = "succeeded"
    except Exception as exc:  # recorded, never hidden: the report shows what NNI did
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["evals"] = calls[0]
    record["wall_s"] = time.perf_counter() - started
    print(json.dumps(record))


if __name__ == "__main__":
    main()
