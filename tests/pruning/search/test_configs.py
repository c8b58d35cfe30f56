"""Search configs: one per algorithm, bounded fields, pydantic only."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from pruning.search import ALGORITHMS, make_strategy, state_type
from pruning.search.configs import parse_algorithm_config
from tests.pruning.search.fakes import fake_problem

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_defaults_validate_and_build_a_strategy(algorithm: str) -> None:
    config = parse_algorithm_config({"algorithm": algorithm, "config_list": CONFIG_LIST})
    assert config.algorithm == algorithm  # type: ignore[attr-defined]
    # The strategy starts the state class a persisted state is reloaded as.
    assert type(make_strategy(config).start(fake_problem())) is state_type(algorithm)


@pytest.mark.parametrize(
    "algorithm,field,value",
    [
        ("annealing", "start_temperature", 0),
        ("annealing", "cool_down_rate", 1.0),
        ("annealing", "perturbation_magnitude", 2.0),
        ("annealing", "batch_size", 0),
        ("annealing", "prior", "big"),
        ("admm", "rho", -1.0),
        ("admm", "num_iterations", 0),
        ("admm", "rho_multiplier", 0.5),
        ("admm", "retrain_epochs", -1),
        ("autocompress", "num_rounds", 0),
        ("autocompress", "admm_iterations", 0),
        ("optuna", "parallelism", 0),
        ("optuna", "objectives", ["score", "accuracy"]),
        ("optuna", "num_trials", 0),
        ("netadapt", "short_term_finetune_epochs", -1),
        ("annealing", "max_trials", 0),
        ("annealing", "unknown_field", 1),
    ],
)
def test_out_of_range_values_name_the_field(algorithm: str, field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        parse_algorithm_config({"algorithm": algorithm, "config_list": CONFIG_LIST, field: value})


def test_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match="stop_temperature"):
        parse_algorithm_config({"algorithm": "annealing", "config_list": CONFIG_LIST, "stop_temperature": 200})
    with pytest.raises(ValidationError, match="objectives"):
        parse_algorithm_config({"algorithm": "optuna", "config_list": CONFIG_LIST, "objectives": ["flops"]})
    with pytest.raises(ValidationError, match="layer_rho"):
        parse_algorithm_config({"algorithm": "admm", "config_list": CONFIG_LIST, "layer_rho": {"conv1": 0}})


def test_configs_import_no_torch() -> None:
    code = (
        "import sys, pruning.search.configs, pruning.search; "
        "assert 'torch' not in sys.modules and 'optuna' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('torch', 'optuna')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_autocompress_fans_out_its_annealing_phase() -> None:
    """AutoCompress's annealing proposals are independent jobs: ``batch_size`` of them per step."""
    from pruning.search import make_strategy
    from pruning.search.configs import parse_algorithm_config
    from tests.pruning.search.fakes import FakeExecutor, fake_problem

    config = parse_algorithm_config(
        {"algorithm": "autocompress", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "batch_size": 3}
    )
    strategy = make_strategy(config)
    problem = fake_problem()
    executor = FakeExecutor()
    state = strategy.start(problem)
    state, jobs = strategy.ask(state)
    assert len(jobs) == 1  # the starting point first
    state = strategy.tell(state, [executor(problem, job) for job in jobs])
    state, jobs = strategy.ask(state)
    assert len(jobs) == 3 and len({job.key for job in jobs}) == 3


BUDGET_LIST = [{"op_types": ["Conv2d"], "max_sparsity": 0.8}]


def test_budget_takes_exactly_one_resource_and_entries_only_select() -> None:
    config = parse_algorithm_config({"algorithm": "annealing", "config_list": BUDGET_LIST, "budget": {"flops": 0.25}})
    assert config.budget is not None and config.budget.resource == "flops" and config.budget.ratio == 0.25
    assert config.config_list[0].max_sparsity_per_layer == 0.8  # max_sparsity is the short spelling
    with pytest.raises(ValidationError, match="exactly one"):
        parse_algorithm_config({"algorithm": "uniform", "config_list": BUDGET_LIST, "budget": {}})
    with pytest.raises(ValidationError, match=r"config_list\[0\]\.sparsity"):
        parse_algorithm_config({"algorithm": "uniform", "config_list": CONFIG_LIST, "budget": {"params": 0.5}})
    with pytest.raises(ValidationError, match=r"config_list\[0\]"):
        parse_algorithm_config({"algorithm": "uniform", "config_list": BUDGET_LIST})
    # Fine-grained pruning keeps dense kernels: FLOPs and latency budgets are refused, params budgets are fine.
    with pytest.raises(ValidationError, match="budget.flops"):
        parse_algorithm_config(
            {"algorithm": "uniform", "config_list": BUDGET_LIST, "base_algo": "level", "budget": {"flops": 0.5}}
        )
    parse_algorithm_config(
        {"algorithm": "uniform", "config_list": BUDGET_LIST, "base_algo": "level", "budget": {"params": 0.5}}
    )


def test_netadapt_resource_fields_are_aliases_of_the_budget() -> None:
    old = parse_algorithm_config(
        {"algorithm": "netadapt", "config_list": CONFIG_LIST, "resource": "flops", "target_resource_ratio": 0.4}
    )
    assert old.effective_budget.resource == "flops" and old.effective_budget.ratio == 0.4
    new = parse_algorithm_config({"algorithm": "netadapt", "config_list": BUDGET_LIST, "budget": {"latency": 0.6}})
    assert new.resource == "latency" and new.target_resource_ratio == 0.6  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="target_resource_ratio"):
        parse_algorithm_config(
            {
                "algorithm": "netadapt",
                "config_list": BUDGET_LIST,
                "budget": {"flops": 0.5},
                "target_resource_ratio": 0.3,
            }
        )


def test_candidate_eval_defaults_and_its_finetune_spelling() -> None:
    config = parse_algorithm_config({"algorithm": "annealing", "config_list": CONFIG_LIST})
    assert config.candidate_eval.bn_recalibration is None  # decided per model: on when it has BatchNorm
    assert config.candidate_eval.calibration_batches == 16
    tuned = parse_algorithm_config(
        {"algorithm": "annealing", "config_list": CONFIG_LIST, "candidate_eval": {"finetune_epochs": 2}}
    )
    assert tuned.finetune_epochs == 2
    with pytest.raises(ValidationError, match="disagree"):
        parse_algorithm_config(
            {
                "algorithm": "annealing",
                "config_list": CONFIG_LIST,
                "finetune_epochs": 1,
                "candidate_eval": {"finetune_epochs": 2},
            }
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", "1"),
        ("seed", True),
        ("seed", 1.5),
        ("max_trials", "10"),
        ("finetune_epochs", False),
        ("max_minutes", "5"),
        ("max_minutes", float("nan")),
        ("max_minutes", float("inf")),
    ],
)
def test_numeric_fields_take_numbers_only(field: str, value: object) -> None:
    """Strict types: a string or a bool is not silently turned into a number, and numbers are finite."""
    with pytest.raises(ValidationError, match=field):
        parse_algorithm_config({"algorithm": "uniform", "config_list": CONFIG_LIST, field: value})
    with pytest.raises(ValidationError, match="sparsity"):
        parse_algorithm_config({"algorithm": "uniform", "config_list": [{"sparsity": "0.5", "op_types": ["Conv2d"]}]})
    # A JSON integer still fills a float field.
    config = parse_algorithm_config({"algorithm": "uniform", "config_list": CONFIG_LIST, "max_minutes": 5})
    assert config.max_minutes == 5


def test_layer_rho_keys_outside_the_named_layers_are_refused_when_the_config_list_names_them() -> None:
    named = [{"sparsity": 0.5, "op_names": ["conv1", "conv2"]}]
    config = parse_algorithm_config({"algorithm": "admm", "config_list": named, "layer_rho": {"conv2": 0.1}})
    assert config.layer_rho == {"conv2": 0.1}  # type: ignore[attr-defined]
    for algorithm in ("admm", "autocompress"):
        with pytest.raises(ValidationError, match=r"layer_rho\['conv3'\] names no prunable layer of the config list"):
            parse_algorithm_config({"algorithm": algorithm, "config_list": named, "layer_rho": {"conv3": 0.1}})
    # Selected by type: which layers exist is known only on the worker.
    parse_algorithm_config({"algorithm": "admm", "config_list": CONFIG_LIST, "layer_rho": {"conv3": 0.1}})


@pytest.mark.parametrize("algorithm", ["admm", "autocompress"])
def test_layer_rho_keys_that_name_no_layer_fail_the_start(algorithm: str) -> None:
    problem = fake_problem()
    real = problem.pruning.layers[0].name
    config = parse_algorithm_config({"algorithm": algorithm, "config_list": CONFIG_LIST, "layer_rho": {real: 0.1}})
    make_strategy(config).start(problem)
    config = parse_algorithm_config({"algorithm": algorithm, "config_list": CONFIG_LIST, "layer_rho": {"nope": 0.1}})
    with pytest.raises(ValueError, match=r"layer_rho\['nope'\] names no prunable layer of the model"):
        make_strategy(config).start(problem)
