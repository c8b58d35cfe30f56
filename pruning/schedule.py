"""Gradual pruning: Zhu & Gupta's automated gradual pruning (AGP) schedule and a mask updater.

``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** exponent`` for ``t_0 <= t <= t_end``,
evaluated only at steps ``t_0 + k * frequency`` (masks change every `frequency` steps), ``s_i`` before
``t_0`` and ``s_f`` after ``t_end``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pruning.config import PruningProblem, _check_keys
from pruning.masks import apply_masks
from pruning.pruner import compute_masks

__all__ = ["GradualPruner", "agp_sparsity"]


def agp_sparsity(
    step: int,
    initial_sparsity: float,
    target_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    exponent: int = 3,
) -> float:
    """Sparsity at training `step` under the AGP schedule (a pure function).

    >>> agp_sparsity(0, 0.0, 0.8, 0, 100), agp_sparsity(100, 0.0, 0.8, 0, 100)
    (0.0, 0.8)
    """
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must come after begin_step ({begin_step})")
    if frequency < 1:
        raise ValueError("frequency must be at least 1")
    if step < begin_step:
        return initial_sparsity
    if step >= end_step:
        return target_sparsity
    # Hold the value between updates: only steps on the frequency grid change the sparsity.
    held = begin_step + ((step - begin_step) // frequency) * frequency
    progress = (held - begin_step) / (end_step - begin_step)
    return target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - progress) ** exponent


class GradualPruner:
    """Raises a model's sparsity along the AGP schedule while a trainer runs.

    Call `step()` once per training step (for instance from the trainer's ``callback``, between
    ``loss.backward()`` and ``optimizer.step()``); every `frequency` steps inside
    ``[begin_step, end_step]`` it recomputes the masks with every unit at
    ``agp_sparsity(t, initial, unit's final sparsity, ...)``. Masks are updated in place, so the
    optimizer keeps its parameters. Weight criteria only (statistics criteria need `task`).

    >>> # pruner = GradualPruner(model, problem, final, begin_step=0, end_step=1000, frequency=100)
    >>> # task.trainer(model, opt, crit, epoch, callback=pruner.step)
    """

    def __init__(
        self,
        model: nn.Module,
        problem: PruningProblem,
        final_distribution: dict[str, float],
        *,
        begin_step: int,
        end_step: int,
        frequency: int = 1,
        initial_sparsity: float = 0.0,
        exponent: int = 3,
        task: Any = None,
    ) -> None:
        _check_keys(final_distribution, problem)
        agp_sparsity(begin_step, initial_sparsity, 0.0, begin_step, end_step, frequency, exponent)  # validates
        self.model = model
        self.problem = problem
        self.final = dict(final_distribution)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.initial_sparsity, self.exponent, self.task = initial_sparsity, exponent, task
        self.current_step = 0
        self.masks: dict[str, Tensor] = {}

    def distribution_at(self, step: int) -> dict[str, float]:
        """Every unit's scheduled sparsity at `step`."""
        return {
            name: agp_sparsity(
                step,
                min(self.initial_sparsity, final),
                final,
                self.begin_step,
                self.end_step,
                self.frequency,
                self.exponent,
            )
            for name, final in self.final.items()
        }

    def step(self) -> bool:
        """Advance one training step; returns True when the masks were updated at this step."""
        t = self.current_step
        self.current_step += 1
        on_grid = (t - self.begin_step) % self.frequency == 0
        if t < self.begin_step or t > self.end_step or not (on_grid or t == self.end_step):
            return False
        # Monotonic: each update removes a superset of the last one's (exact counts, for any criterion).
        self.masks = compute_masks(
            self.model, self.problem, self.distribution_at(t), task=self.task, previous=self.masks
        )
        apply_masks(self.model, self.masks, structured=self.problem.structured)
        return True
