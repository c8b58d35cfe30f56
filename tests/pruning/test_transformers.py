"""Transformers: whole heads and MLP channels as units, masked equals shrunk, Conv1D, GQA, the trace limit.

Every model is random-init from a `transformers` config (no download), two layers, hidden 32-64.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pruning import TraceTimeout
from pruning.config import PruningProblem, resolve_config_list, validate_config_list
from pruning.masks import achieved_sparsity
from pruning.metrics import count_params_flops
from pruning.pruner import compute_masks, prune
from pruning.shrink import ShrinkRecipe, apply_recipe, predict_params_flops, shrink
from tests.pruning.models import ResNetTiny, seeded

transformers = pytest.importorskip("transformers")

LINEAR = [{"sparsity": 0.5, "op_types": ["Linear"]}]


def _bert() -> tuple[nn.Module, Tensor]:
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config, add_pooling_layer=False), torch.randint(0, 60, (2, 8))


def _vit() -> tuple[nn.Module, Tensor]:
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10,
    )
    return transformers.ViTForImageClassification(config), torch.randn(2, 1, 8, 8)


def _gpt2() -> tuple[nn.Module, Tensor]:
    config = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2Model(config), torch.randint(0, 60, (2, 8))


def _llama() -> tuple[nn.Module, Tensor]:
    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=16, attention_bias=True,  # biases: masked with their rows
    )
    return transformers.LlamaModel(config), torch.randint(0, 60, (2, 8))


FAMILIES: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "bert": _bert, "vit": _vit, "gpt2": _gpt2, "llama_gqa": _llama,
}
# (attention module, its head-count attributes as (name, value before)), one per family
ATTENTION = {
    "bert": ("encoder.layer.0.attention.self", {"num_attention_heads": 4, "all_head_size": 32}),
    "vit": ("vit.layers.0.attention", {"num_attention_heads": 4}),
    "gpt2": ("h.0.attn", {"num_heads": 4, "split_size": 32, "embed_dim": 32}),
    "llama_gqa": ("layers.0.self_attn", {"num_key_value_groups": 2}),
}


def _build(family: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model, x = FAMILIES[family]()
    return model.eval(), x


def _out(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return _out(model(x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masked_equals_shrunk_at_half_the_heads_and_channels(family: str) -> None:
    model, x = _build(family)
    dense = _run(model, x)
    problem = resolve_config_list(model, LINEAR, "l1", x)
    kinds = [len(u.members) for u in problem.units]
    assert len(problem.units) == 4, [u.name for u in problem.units]  # one attention and one MLP unit per layer
    assert kinds.count(2 if family == "llama_gqa" else 1) >= 2  # the MLP units (gate + up share one mask)
    dist = {n: 0.5 for n in problem.unit_names()}
    fresh = copy.deepcopy(model)
    predicted = predict_params_flops(model, problem, dist, x)
    masks = prune(model, problem, dist)
    masked = _run(model, x)
    assert (masked - dense).abs().max() > 1e-3  # the masks removed something that mattered
    recipe = shrink(model, masks, x)
    shrunk = _run(model, x)
    assert shrunk.shape == masked.shape
    assert torch.allclose(shrunk, masked, atol=1e-4, rtol=0), float((shrunk - masked).abs().max())
    assert count_params_flops(model, x) == predicted
    params, flops = count_params_flops(model, x)
    assert params < problem.dense_params and flops < problem.dense_flops

    attention, counts = ATTENTION[family]
    module = dict(model.named_modules())[attention]
    for attr, before in counts.items():
        # head counts halve with the heads; GQA keeps its query heads per KV head (whole groups go)
        expected = before if attr == "num_key_value_groups" else before // 2
        assert getattr(module, attr) == expected, attr

    # the recipe replays on a fresh model, and the weights load into it
    again = ShrinkRecipe.model_validate_json(recipe.model_dump_json())
    apply_recipe(fresh, again, x)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_run(fresh, x), shrunk)


def test_gqa_removes_whole_kv_groups_with_their_query_heads_and_resolves_in_seconds() -> None:
    model, x = _build("llama_gqa")
    start = time.perf_counter()
    problem = resolve_config_list(model, LINEAR, "l1", x)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed  # Torch-Pruning's graph did not finish in minutes here
    attention = problem.unit("layers.0.self_attn.q_proj")
    assert attention.members == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert attention.channels == 2  # KV heads, each with its 2 query heads
    mlp = problem.unit("layers.0.mlp.gate_proj")
    assert mlp.members == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"] and mlp.channels == 96

    # make KV group 0 (query heads 0 and 1, key/value head 0) the weakest: it must be the group that goes
    attn = dict(model.named_modules())["layers.0.self_attn"]
    with torch.no_grad():
        attn.q_proj.weight[:32] *= 1e-3
        attn.k_proj.weight[:16] *= 1e-3
        attn.v_proj.weight[:16] *= 1e-3
    dist = {n: (0.5 if n == attention.name else 0.0) for n in problem.unit_names()}
    masks = compute_masks(model, problem, dist)
    q_rows = masks["layers.0.self_attn.q_proj"][:, 0]
    assert q_rows[:32].sum() == 0 and bool((q_rows[32:] == 1).all())
    assert bool((masks["layers.0.self_attn.k_proj"][:16] == 0).all())
    recipe = shrink(model, masks, x)
    assert recipe.removed["layers.0.self_attn.q_proj"] == list(range(32))
    assert recipe.removed["layers.0.self_attn.v_proj"] == list(range(16))
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 and attn.o_proj.in_features == 32
    assert attn.num_key_value_groups == 2
    _run(model, x)  # the shrunk model still runs with one KV group


def test_head_score_aggregates_q_k_v_rows_and_sparsity_rounds_to_whole_heads() -> None:
    model, x = _build("bert")
    problem = resolve_config_list(model, LINEAR, "l1", x)
    unit = problem.unit("encoder.layer.0.attention.self.query")
    assert unit.channels == 4
    attn = dict(model.named_modules())["encoder.layer.0.attention.self"]
    with torch.no_grad():  # head 2 is weak in all three projections; no single row is the weakest overall
        for proj in (attn.query, attn.key, attn.value):
            proj.weight[16:24] *= 0.2
        attn.query.weight[0] *= 0.01  # one tiny row in head 0 must not condemn head 0
    dist = {n: 0.0 for n in problem.unit_names()} | {unit.name: 0.3}  # 0.3 of 4 heads rounds to one head
    masks = prune(model, problem, dist)
    rows = masks["encoder.layer.0.attention.self.value"][:, 0]
    assert rows.reshape(4, 8).sum(dim=1).tolist() == [8, 8, 0, 8]
    achieved = achieved_sparsity(model, problem)
    assert achieved["encoder.layer.0.attention.self.query"] == pytest.approx(0.25)  # requested 0.3, achieved 0.25


def test_conv1d_is_selectable_by_its_own_type_and_by_linear() -> None:
    model, x = _build("gpt2")
    by_conv1d = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv1D"]}], "l1", x)
    by_linear = resolve_config_list(model, LINEAR, "l1", x)
    names = ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    assert by_conv1d.unit_names() == names and by_linear.unit_names() == names
    assert {la.op_type for la in by_conv1d.layers} == {"Conv1D"}
    assert by_conv1d.unit("h.0.attn.c_attn").channels == 4  # heads of the fused [q | k | v]
    # fine-grained pruning selects Conv1D weights element by element
    level = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv1D"]}], "level", x)
    assert len(level.units) == 8
    masks = compute_masks(model, level, {n: 0.5 for n in level.unit_names()})
    assert float(masks["h.0.attn.c_proj"].mean()) == pytest.approx(0.5)


def test_conv1d_flops_are_counted() -> None:
    model, x = _build("gpt2")
    per_token = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)  # two layers of c_attn, c_proj, c_fc, c_proj
    _, macs = count_params_flops(model, x)  # MACs per sample: 8 tokens here
    assert macs >= per_token * x.shape[1]  # Torch-Pruning alone counts Conv1D as a zero-op


def test_the_hidden_dimension_is_never_cut() -> None:
    model, x = _build("llama_gqa")
    with pytest.raises(ValueError, match="hidden \\(residual\\) dimension"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_names": ["layers.0.self_attn.o_proj"]}], "l1", x)
    with pytest.raises(ValueError, match="prune_hidden"):
        validate_config_list([{"sparsity": 0.5, "op_types": ["Linear"], "prune_hidden": True}])
    problem = resolve_config_list(model, LINEAR, "l1", x)
    members = {m for u in problem.units for m in u.members}
    assert not members & {"layers.0.self_attn.o_proj", "layers.0.mlp.down_proj", "embed_tokens"}
    with pytest.raises(ValueError, match="outside the model's attention heads"):
        shrink(model, {"layers.0.mlp.down_proj": torch.zeros_like(model.layers[0].mlp.down_proj.weight)}, x)


def test_a_trace_past_its_limit_says_what_it_was_tracing() -> None:
    model, x = seeded(ResNetTiny()), torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceTimeout, match="ResNetTiny.*did not finish within 0.0001 s"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", x, trace_timeout_s=1e-4)
    # no deadline leaks out of the limit: the same thread keeps working afterwards
    time.sleep(0.05)
    assert resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", x).units


def test_the_trace_limit_holds_off_the_main_thread_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = seeded(ResNetTiny()), torch.randn(2, 3, 8, 8)
    monkeypatch.setenv("PRUNEHUB_TRACE_TIMEOUT_S", "0.0001")
    caught: list[BaseException] = []

    def work() -> None:
        try:
            resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", x)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            caught.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert len(caught) == 1 and isinstance(caught[0], TraceTimeout), caught


def _problem_units(problem: PruningProblem) -> list[tuple[str, int | None]]:
    return [(u.name, u.channels) for u in problem.units]


def test_models_without_attention_keep_the_traced_units() -> None:
    # fc1/fc2 alone (a CNN's classifier head) is not a transformer MLP: the dependency graph still decides
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(torch.relu(self.fc1(self.conv(x).mean(dim=(2, 3)))))

    problem = resolve_config_list(seeded(Head()), [{"sparsity": 0.5, "op_types": ["default"]}], "l1",
                                  torch.randn(2, 3, 8, 8))
    assert _problem_units(problem) == [("conv", 8), ("fc1", 16)]


@pytest.mark.parametrize("algo", ["l1", "l2", "fpgm"])
def test_conv1d_is_scored_per_output_column(algo: str) -> None:
    from pruning.importance import get_importance

    model, _ = _build("gpt2")
    c_fc = dict(model.named_modules())["h.0.mlp.c_fc"]  # weight (in 32, out 128)
    scores = get_importance(algo)("h.0.mlp.c_fc", c_fc)
    assert scores is not None and scores.shape == (128,)
    as_linear = nn.Linear(32, 128)
    with torch.no_grad():
        as_linear.weight.copy_(c_fc.weight.t())
    expected = get_importance(algo)("fc", as_linear)
    assert expected is not None and torch.allclose(scores, expected)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_resolve_count_and_shrink_never_copy_a_weight(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 16 item 6: resolving and shrinking must hold at most two copies of the weights (bench/transformer_memory
    # measures the peak); here, structurally, none of it deep-copies a tensor of an unmasked transformer
    model, x = _build(family)
    reference = _run(model, x)

    def refuse(self: Tensor, memo: dict[int, Any]) -> Tensor:
        raise AssertionError(f"a tensor of shape {tuple(self.shape)} was deep-copied")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(nn.Parameter, "__deepcopy__", refuse)
    problem = resolve_config_list(model, LINEAR, "l1", x)
    masks = compute_masks(model, problem, {n: 0.5 for n in problem.unit_names()})
    shrink(model, masks, x)
    params, _ = count_params_flops(model, x)
    monkeypatch.undo()
    assert params < problem.dense_params
    assert _run(model, x).shape == reference.shape
