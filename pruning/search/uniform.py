"""``uniform``: the baseline every search is compared with — each unit at its config-list sparsity.

With a budget, the one uniform sparsity whose shrunk model meets it (the executor's projection of an all-equal
shape), with the slack that rounding to whole channels leaves spent one channel per unit at most
(:func:`pruning.budget.project` with ``fill``): uniform-at-the-same-physical-budget, the number every search must
beat.

With ``ranking: "global"`` the job asks for the config list's overall sparsity and the executor ranks all selected
layers together (:func:`pruning.pruner.global_distribution`); the distribution that emerged comes back in
``Result.extra["distribution"]`` and becomes ``best_distribution``.
"""

from __future__ import annotations

from pruning.config import initial_distribution
from pruning.search._common import budget_ratio
from pruning.search.base import Job, Result, SearchProblem, SearchState, better
from pruning.search.configs import UniformConfig

__all__ = ["UniformSearch", "UniformState"]


class UniformState(SearchState):
    version: int = 1
    distribution: dict[str, float]
    optimize_mode: str = "maximize"
    asked: bool = False
    ranking: str = "layer"
    best_distribution: dict[str, float] | None = None
    budget_ratio: float | None = None


class UniformSearch:
    """One job: the uniform distribution at the target, fine-tuned ``finetune_epochs`` then evaluated."""

    def __init__(self, config: UniformConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> UniformState:
        distribution = initial_distribution(problem.pruning)
        if problem.budget is not None and problem.pruning.units:
            # An all-equal shape: the executor projects it onto the budget (and spends the slack one channel per
            # unit at most). The resolved start is already that projection; projecting it again would read its
            # one-channel differences as a shape and give back a second channel.
            level = max(distribution.values())
            distribution = {name: level for name in distribution}
        return UniformState(
            distribution=distribution,
            optimize_mode=problem.optimize_mode,
            ranking=self.config.ranking,
            budget_ratio=budget_ratio(problem),
        )

    def ask(self, state: UniformState) -> tuple[UniformState, list[Job]]:
        if state.asked or state.done:
            return state.model_copy(update={"done": True}), []
        epochs = self.config.finetune_epochs
        job = Job(
            key="uniform-0",
            kind="finetune_and_evaluate" if epochs else "evaluate",
            distribution=state.distribution,
            finetune_epochs=epochs,
            save_artifact=True,
            params={"ranking": "global"} if state.ranking == "global" else {},
            context={"iteration": 0, "ranking": state.ranking} if state.ranking == "global" else {"iteration": 0},
            budget_ratio=state.budget_ratio,
        )
        return state.model_copy(update={"asked": True, "trials_asked": 1}), [job]

    def tell(self, state: UniformState, results: list[Result]) -> UniformState:
        update: dict[str, object] = {"done": True}
        for result in results:
            if result.status == "succeeded" and result.score is not None:
                if better(result.score, state.best_score, state.optimize_mode):
                    distribution = result.extra.get("distribution") or state.distribution
                    update |= {"best_key": result.key, "best_score": result.score, "best_distribution": distribution}
        if state.best_key is None and "best_key" not in update:
            update["stop_reason"] = "the uniform distribution failed to evaluate"
        return state.model_copy(update=update)
