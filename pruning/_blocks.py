"""Transformer blocks as pruning units (internal): whole attention heads and MLP channels.

Found by structure, never by importing ``transformers`` (``pruning`` must import without it): module
attribute names and layer shapes as the Hugging Face families lay them out.

- Attention with separate projections: a module with ``query/key/value`` (BERT, RoBERTa) or
  ``q_proj/k_proj/v_proj`` (ViT, Llama, Qwen, Mistral, ...) and an output projection (its own ``o_proj`` /
  ``out_proj`` / ``dense``, or BERT's sibling ``output.dense``). Keys and values may have fewer heads than
  queries (grouped-query attention): then a unit channel is one KV head *with its query heads*.
- GPT-2's fused attention: ``c_attn`` (one ``Conv1D`` producing ``[q | k | v]``, ``split_size`` each) and
  ``c_proj``.
- MLPs: ``intermediate.dense`` / ``output.dense`` (BERT), ``c_fc`` / ``c_proj`` (GPT-2), ``fc1`` / ``fc2``
  (ViT, CLIP, OPT), ``gate_proj`` + ``up_proj`` / ``down_proj`` (Llama; gate and up share one mask).

A block's *producers* lose output channels (the rows of q/k/v, the intermediate channels) and its
*consumer* loses the matching input columns (the output projection). Masking a unit channel zeroes its
value rows (and bias), so the head's output is exactly zero and its columns of the output projection
contribute nothing; removing the head physically therefore computes exactly what the masked model did.
The same holds for an MLP channel whose activation maps 0 to 0 (GELU, ReLU, SiLU; checked when the
block's activation is found). The hidden (residual) dimension is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from pruning.importance.base import is_conv1d_transposed, out_axis

__all__ = ["Block", "BlockScan", "find_blocks", "shrink_block"]

_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_OUT_NAMES = ("o_proj", "out_proj", "dense")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim")
_HEADS_ATTRS = ("num_attention_heads", "num_heads", "n_head")
_ACT_ATTRS = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation")


@dataclass
class Block:
    """One attention module or MLP whose unit channels are pruned together.

    ``channels`` counts unit channels: KV heads for attention (each with ``query_per_kv`` query heads;
    1 without grouped-query attention), intermediate channels for an MLP. ``channel_index`` maps each
    producer's output channel, and ``consumer_index`` each input column of the consumer, to its unit channel.
    """

    kind: Literal["attention", "mlp"]
    module: str
    producers: list[str]
    consumer: str
    channels: int
    channel_index: dict[str, list[int]]
    consumer_index: list[int]
    head_dim: int = 1
    query_per_kv: int = 1


@dataclass
class BlockScan:
    """The blocks of a model, and attention-like modules it found but cannot prune by heads (name → why)."""

    blocks: list[Block] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)

    def producer_block(self) -> dict[str, Block]:
        """Producer layer name → its block."""
        return {p: b for b in self.blocks for p in b.producers}


def _is_projection(module: nn.Module | None) -> bool:
    return module is not None and (isinstance(module, nn.Linear) or is_conv1d_transposed(module))


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[out_axis(module)])


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[1 - out_axis(module)])


def _child(module: nn.Module, *path: str) -> nn.Module | None:
    for name in path:
        children = dict(module.named_children())
        if name not in children:
            return None
        module = children[name]
    return module


def _join(prefix: str, *names: str) -> str:
    return ".".join(n for n in (prefix, *names) if n)


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attention_separate(name: str, module: nn.Module, parent: tuple[str, nn.Module] | None) -> Block | str | None:
    """A block for q/k/v + output projection, a reason it cannot be one, or None when `module` is not one."""
    names = next((n for n in _QKV_NAMES if all(_is_projection(_child(module, c)) for c in n)), None)
    if names is None:
        return None
    q, k, v = (_child(module, c) for c in names)
    assert q is not None and k is not None and v is not None
    out_path: list[str] | None = None
    for candidate in _OUT_NAMES:
        if _is_projection(_child(module, candidate)):
            out_path = [candidate]
            break
    out_module_prefix = name
    if out_path is None and parent is not None:
        parent_name, parent_module = parent
        if _is_projection(_child(parent_module, "output", "dense")):  # BERT: attention.self + attention.output.dense
            out_path, out_module_prefix = ["output", "dense"], parent_name
    if out_path is None:
        return "no output projection (o_proj, out_proj, dense or the parent's output.dense) was found"
    out = _child(module, *out_path) if out_module_prefix == name else _child(parent[1], *out_path)  # type: ignore[index]
    assert out is not None
    head_dim = _int_attr(module, _HEAD_DIM_ATTRS)
    if head_dim is None:
        heads = _int_attr(module, _HEADS_ATTRS)
        if heads is None or _out_features(q) % heads:
            return "its head size is unknown (no attention_head_size/head_dim, nor a head count dividing q)"
        head_dim = _out_features(q) // heads
    q_width, kv_width = _out_features(q), _out_features(k)
    if q_width % head_dim or kv_width % head_dim or _out_features(v) != kv_width:
        return f"q/k/v widths {q_width}/{kv_width}/{_out_features(v)} are not whole heads of size {head_dim}"
    q_heads, kv_heads = q_width // head_dim, kv_width // head_dim
    if q_heads % kv_heads:
        return f"{q_heads} query heads do not divide into {kv_heads} key/value heads"
    if _in_features(out) != q_width:
        return f"the output projection takes {_in_features(out)} inputs, not the {q_width} the heads give"
    per_kv = q_heads // kv_heads
    q_rows = [(r // head_dim) // per_kv for r in range(q_width)]
    kv_rows = [r // head_dim for r in range(kv_width)]
    q_name, k_name, v_name = (_join(name, c) for c in names)
    return Block(
        kind="attention",
        module=name,
        producers=[q_name, k_name, v_name],
        consumer=_join(out_module_prefix, *out_path),
        channels=kv_heads,
        channel_index={q_name: q_rows, k_name: kv_rows, v_name: kv_rows},
        consumer_index=q_rows,
        head_dim=head_dim,
        query_per_kv=per_kv,
    )


def _attention_fused(name: str, module: nn.Module) -> Block | str | None:
    """GPT-2's ``c_attn`` ([q | k | v], ``split_size`` each) + ``c_proj``."""
    c_attn, c_proj = _child(module, "c_attn"), _child(module, "c_proj")
    if not (_is_projection(c_attn) and _is_projection(c_proj)):
        return None
    assert c_attn is not None and c_proj is not None
    if _child(module, "q_attn") is not None:
        return "cross-attention (a separate q_attn) is not supported"
    split = _int_attr(module, ("split_size",))
    head_dim = _int_attr(module, ("head_dim",))
    if split is None or head_dim is None or split % head_dim or _out_features(c_attn) != 3 * split:
        return "its fused c_attn is not [q | k | v] of split_size whole heads of head_dim"
    if _in_features(c_proj) != split:
        return f"c_proj takes {_in_features(c_proj)} inputs, not the {split} the heads give"
    rows = [(c % split) // head_dim for c in range(3 * split)]
    attn = _join(name, "c_attn")
    return Block(
        kind="attention",
        module=name,
        producers=[attn],
        consumer=_join(name, "c_proj"),
        channels=split // head_dim,
        channel_index={attn: rows},
        consumer_index=[c // head_dim for c in range(split)],
        head_dim=head_dim,
    )


def _activation_keeps_zero(*modules: nn.Module) -> bool | None:
    """Whether the block's activation maps 0 to 0 (None when no activation attribute is found)."""
    for owner in modules:
        for attr in _ACT_ATTRS:
            act = getattr(owner, attr, None)
            if callable(act):
                with torch.no_grad():
                    value = act(torch.zeros(1))
                return isinstance(value, Tensor) and bool(value.abs().max() == 0)
    return None


def _mlp(name: str, module: nn.Module) -> Block | str | None:
    """An MLP block: its intermediate channels are the unit channels."""
    found: tuple[list[list[str]], list[str], list[nn.Module]] | None = None
    intermediate = _child(module, "intermediate")
    candidates: list[tuple[list[list[str]], list[str], list[nn.Module]]] = [
        ([["gate_proj"], ["up_proj"]], ["down_proj"], [module]),
        ([["intermediate", "dense"]], ["output", "dense"], [intermediate] if intermediate is not None else []),
        ([["fc1"]], ["fc2"], [module]),
    ]
    if _child(module, "c_attn") is None:  # GPT-2's attention also has a c_proj
        candidates.append(([["c_fc"]], ["c_proj"], [module]))
    for producers, consumer, owners in candidates:
        if all(_is_projection(_child(module, *p)) for p in producers) and _is_projection(_child(module, *consumer)):
            found = (producers, consumer, owners)
            break
    if found is None:
        return None
    producers, consumer, owners = found
    prods = [_child(module, *p) for p in producers]
    cons = _child(module, *consumer)
    assert cons is not None and all(p is not None for p in prods)
    width = _out_features(prods[0])  # type: ignore[arg-type]
    if any(_out_features(p) != width for p in prods) or _in_features(cons) != width:  # type: ignore[arg-type]
        return f"its projections disagree on the intermediate width ({width} vs {_in_features(cons)})"
    if _activation_keeps_zero(*owners) is False:
        return "its activation does not map 0 to 0, so a masked channel would not be a removed one"
    producer_names = [_join(name, *p) for p in producers]
    return Block(
        kind="mlp",
        module=name,
        producers=producer_names,
        consumer=_join(name, *consumer),
        channels=width,
        channel_index={p: list(range(width)) for p in producer_names},
        consumer_index=list(range(width)),
    )


def find_blocks(model: nn.Module) -> BlockScan:
    """Every attention and MLP block of `model`, in module order (no forward pass, no tracing)."""
    scan = BlockScan()
    claimed: set[str] = set()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            scan.unsupported[name] = (
                "torch.nn.MultiheadAttention ties its head count to the embedding size (its forward checks "
                "embed_dim == num_heads * head_dim), so whole heads cannot be removed in place"
            )
            continue
        parent_name = name.rpartition(".")[0] if name else None
        parent = (parent_name, modules[parent_name]) if parent_name is not None and parent_name in modules else None
        for found in (_attention_separate(name, module, parent), _attention_fused(name, module), _mlp(name, module)):
            if found is None:
                continue
            if isinstance(found, str):
                scan.unsupported[name] = found
                break
            layers = [*found.producers, found.consumer]
            if claimed.intersection(layers):
                break
            claimed.update(layers)
            scan.blocks.append(found)
            break
    if not any(b.kind == "attention" for b in scan.blocks):
        # fc1/fc2 alone is also a plain MLP head of a CNN: only a model with attention is a transformer here
        return BlockScan(unsupported=scan.unsupported)
    return scan


def _keep_index(keep: Tensor, index: list[int]) -> Tensor:
    return torch.nonzero(keep[torch.tensor(index, dtype=torch.long)]).flatten()


def _slice_param(module: nn.Module, name: str, axis: int, idx: Tensor) -> None:
    param = getattr(module, name, None)
    if not isinstance(param, Tensor):
        return
    data = param.data.index_select(axis, idx.to(param.device))  # a new tensor already: no clone
    setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))


def _resize(module: nn.Module, *, out_channels: Tensor | None = None, in_columns: Tensor | None = None) -> None:
    axis = out_axis(module)
    if out_channels is not None:
        _slice_param(module, "weight", axis, out_channels)
        _slice_param(module, "bias", 0, out_channels)
    if in_columns is not None:
        _slice_param(module, "weight", 1 - axis, in_columns)
    # the size attributes the modules' forwards read (Conv1D's forward reshapes to nf)
    if is_conv1d_transposed(module):
        setattr(module, "nf", _out_features(module))  # noqa: B010 (plain ints; nn.Module's typing says otherwise)
        setattr(module, "nx", _in_features(module))  # noqa: B010
    elif isinstance(module, nn.Linear):
        module.out_features = _out_features(module)
        module.in_features = _in_features(module)


def _set_if(module: nn.Module, attr: str, value: int, only_if: int | None = None) -> None:
    current = getattr(module, attr, None)
    if isinstance(current, int) and not isinstance(current, bool) and (only_if is None or current == only_if):
        setattr(module, attr, value)


def shrink_block(model: nn.Module, block: Block, keep: Tensor) -> dict[str, list[int]]:
    """Remove the unit channels of `block` that `keep` (bool, one per unit channel) drops, in place.

    Slices the producers' output channels (weights and biases), the consumer's input columns, and sets the
    module's head counts (``num_attention_heads``, ``num_heads``, ``num_key_value_heads``, ``all_head_size``,
    ``split_size``, the attention width held in ``embed_dim``/``hidden_size``; an MLP's ``intermediate_size``),
    so its forward computes with the heads that are left. ``num_key_value_groups`` stays: whole KV groups go
    with their query heads. Returns producer name → removed output channels (numbered as before the call).
    """
    if keep.numel() != block.channels:
        raise ValueError(f"{block.module!r} has {block.channels} unit channels, got a mask of {keep.numel()}")
    if not bool(keep.any()):
        raise ValueError(f"cannot remove every unit channel of {block.module!r}")
    modules = dict(model.named_modules())
    removed: dict[str, list[int]] = {}
    for producer in block.producers:
        index = block.channel_index[producer]
        kept = _keep_index(keep, index)
        gone = sorted(set(range(len(index))) - set(kept.tolist()))
        if gone:
            removed[producer] = gone
        _resize(modules[producer], out_channels=kept)
    _resize(modules[block.consumer], in_columns=_keep_index(keep, block.consumer_index))
    owner = modules[block.module]
    left = int(keep.sum())
    if block.kind == "attention":
        q_heads = left * block.query_per_kv
        width = block.channels * block.query_per_kv * block.head_dim  # the attention width before the call
        for attr in _HEADS_ATTRS:
            _set_if(owner, attr, q_heads)
        _set_if(owner, "num_key_value_heads", left)
        _set_if(owner, "all_head_size", q_heads * block.head_dim)
        _set_if(owner, "split_size", left * block.head_dim)
        for attr in ("embed_dim", "hidden_size"):  # only where they held the attention width (GPT-2, older Llama)
            _set_if(owner, attr, q_heads * block.head_dim, only_if=width)
    else:
        _set_if(owner, "intermediate_size", left, only_if=block.channels)
    return removed
