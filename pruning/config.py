"""Config lists, pruning problems and sparsity distributions.

A *config list* (NNI's form) says which layers to prune and how much; `resolve_config_list` turns it
into a `PruningProblem` for one model: the prunable layers with their sizes and the *units* a search
assigns sparsities to. A *distribution* maps unit name → sparsity; every search reads and writes
distributions through `overall_sparsity`, `rescale`, `initial_distribution` and `layer_distribution`.

Units:
- fine-grained (`level`): every selected layer is its own unit, named after the layer.
- structured (every other base algorithm): a unit is a set of layers whose output channels are tied
  (Torch-Pruning dependency groups: BatchNorm after a conv, convolutions feeding one residual add, a
  depthwise conv and its producer, concatenated branches whose result is added to another tensor).
  The unit is named after its first member in module order, and all members share one channel mask,
  so the sparsity asked for is the fraction of channels the shrunk model physically loses. A unit is
  selected when any member is selected; an ``exclude`` entry on any member excludes the whole unit,
  because none of its members can lose a channel without the others. Layers whose output channels are
  the model's output (the classifier) are never structured units.

This module imports pydantic only at the top: the API process validates config lists without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "BASE_ALGOS",
    "DEFAULT_MAX_SPARSITY",
    "LINEAR_ONLY_ALGOS",
    "OP_TYPES",
    "STRUCTURED_ALGOS",
    "BaseAlgo",
    "ConfigEntry",
    "Distribution",
    "PrunableLayer",
    "PruningProblem",
    "PruningUnit",
    "SparsityDistribution",
    "initial_distribution",
    "is_structured",
    "layer_distribution",
    "overall_sparsity",
    "pruned_count",
    "rescale",
    "resolve_config_list",
    "check_entry_sparsities",
    "validate_config_list",
]

BASE_ALGOS = ("level", "wanda", "l1", "l2", "fpgm", "slim", "taylorfo", "apoz", "mean_activation")
STRUCTURED_ALGOS = frozenset({"l1", "l2", "fpgm", "slim", "taylorfo", "apoz", "mean_activation"})
BaseAlgo = Literal["level", "wanda", "l1", "l2", "fpgm", "slim", "taylorfo", "apoz", "mean_activation"]
# Criteria that score every input channel's activations, so they apply to layers with one (Linear, GPT-2's Conv1D).
LINEAR_ONLY_ALGOS = frozenset({"wanda"})
OP_TYPES = ("Conv1d", "Conv2d", "Linear", "Conv1D", "BatchNorm1d", "BatchNorm2d", "default")
DEFAULT_MAX_SPARSITY = 0.95

Distribution = dict[str, float]


def is_structured(base_algo: str) -> bool:
    """True when `base_algo` removes whole output channels (everything except ``level`` and ``wanda``)."""
    if base_algo not in BASE_ALGOS:
        raise ValueError(f"unknown base algorithm {base_algo!r}; expected one of {', '.join(BASE_ALGOS)}")
    return base_algo in STRUCTURED_ALGOS


def pruned_count(sparsity: float, n: int) -> int:
    """How many of `n` elements/channels a sparsity prunes: ``round(sparsity * n)`` (Python rounding)."""
    return min(n, max(0, round(sparsity * n)))


# --------------------------------------------------------------------------------------------------
# Config lists
# --------------------------------------------------------------------------------------------------
class ConfigEntry(BaseModel):
    """One entry of an NNI-style config list.

    Example: ``{"sparsity": 0.5, "op_types": ["Conv2d"]}``, ``{"exclude": True, "op_names": ["fc"]}``.
    Later entries override earlier ones for the layers they match (NNI's rule).
    """

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, serialize_by_alias=False, strict=True, allow_inf_nan=False
    )

    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    sparsity_per_layer: float | None = Field(default=None, ge=0.0, lt=1.0)
    total_sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    op_types: list[str] = Field(default_factory=list)
    op_names: list[str] = Field(default_factory=list)
    exclude: bool = False
    max_sparsity_per_layer: float | None = Field(default=None, gt=0.0, le=1.0, alias="max_sparsity")
    block_height: int | None = Field(default=None, ge=1)
    block_width: int | None = Field(default=None, ge=1)
    block_pooling: Literal["avg", "max"] = "avg"
    prune_hidden: bool = False
    pattern: str | None = Field(
        default=None,
        description="N:M semi-structured sparsity of Linear layers ('2:4', '4:8'): N of every M consecutive input "
        "weights kept per output row; the layer's sparsity is then 1 - N/M",
    )

    @model_validator(mode="after")
    def _check(self) -> ConfigEntry:
        given = [f for f in ("sparsity", "sparsity_per_layer", "total_sparsity") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of sparsity/sparsity_per_layer/total_sparsity, got {given}")
        if not self.op_types and not self.op_names:
            raise ValueError("an entry needs op_types or op_names")
        unknown = [t for t in self.op_types if t not in OP_TYPES]
        if unknown:
            raise ValueError(f"unknown op_types {unknown}; expected some of {list(OP_TYPES)}")
        if (self.block_height is None) != (self.block_width is None):
            raise ValueError("block_height and block_width go together")
        if self.pattern is not None:
            from pruning.nm import parse_pattern

            try:
                parse_pattern(self.pattern)
            except ValueError as exc:
                raise ValueError(f"pattern: {exc}") from None
            if self.sets_sparsity:
                raise ValueError("pattern: an N:M entry's sparsity is 1 - N/M; do not give sparsity as well")
            if self.block is not None:
                raise ValueError("pattern: N:M sparsity and block sparsity do not combine")
        if self.prune_hidden:
            raise ValueError(
                "prune_hidden: pruning a transformer's hidden (embedding/residual) dimension is not supported; "
                "attention heads and MLP channels are pruned without it"
            )
        return self

    @property
    def sets_sparsity(self) -> bool:
        """Whether the entry names a sparsity (any of the three spellings)."""
        return any(v is not None for v in (self.sparsity, self.sparsity_per_layer, self.total_sparsity))

    @property
    def value(self) -> float:
        """The entry's sparsity, whichever of the three spellings was used (``1 - N/M`` for an N:M pattern, 0 for
        exclude entries)."""
        for v in (self.sparsity, self.sparsity_per_layer, self.total_sparsity):
            if v is not None:
                return v
        if self.nm is not None:
            return 1.0 - self.nm[0] / self.nm[1]
        return 0.0

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of the entry's pattern, when it has one."""
        if self.pattern is None:
            return None
        from pruning.nm import parse_pattern

        return parse_pattern(self.pattern)

    @property
    def block(self) -> tuple[int, int] | None:
        """``(block_height, block_width)`` when block sparsity was asked for."""
        if self.block_height is None or self.block_width is None:
            return None
        return (self.block_height, self.block_width)

    def type_names(self) -> set[str]:
        """op_types with ``default`` expanded to Conv2d + Linear; ``Linear`` also selects Hugging Face's
        ``Conv1D`` (GPT-2's projections: a Linear with its weight stored transposed)."""
        names = set(self.op_types)
        if "default" in names:
            names = (names - {"default"}) | {"Conv2d", "Linear"}
        if "Linear" in names:
            names.add("Conv1D")
        return names


def check_entry_sparsities(entries: list[ConfigEntry], *, budget: bool) -> None:
    """Without a budget every selecting entry names its sparsity (NNI's mode); with a physical budget entries only
    select layers (and may cap them with ``max_sparsity``), so none may name one. Errors name the entry."""
    for i, entry in enumerate(entries):
        if entry.exclude:
            continue
        if budget and entry.sets_sparsity:
            spellings = ("sparsity", "sparsity_per_layer", "total_sparsity")
            field = next(f for f in spellings if getattr(entry, f) is not None)
            raise ValueError(
                f"config_list[{i}].{field}: with a budget, config-list entries only select layers (and may set "
                "max_sparsity); the budget decides how much is pruned"
            )
        if budget and entry.pattern is not None:
            raise ValueError(
                f"config_list[{i}].pattern: an N:M layer is either patterned or dense, so a budget cannot scale it; "
                "use annealing or optuna with score_target_drop (and no budget) to search which layers get the pattern"
            )
        if not budget and not entry.sets_sparsity and entry.pattern is None:
            raise ValueError(
                f"config list entry {i} (config_list[{i}]): an entry needs sparsity, sparsity_per_layer or "
                "total_sparsity (or exclude: true), unless the experiment has a budget"
            )


def validate_config_list(raw: list[dict[str, Any]], *, budget: bool = False) -> list[ConfigEntry]:
    """Validate a config list; errors name the entry index and the field. ``budget``: the experiment has a
    physical budget, so entries select layers only (see :func:`check_entry_sparsities`).

    >>> validate_config_list([{"sparsity": 0.5, "op_types": ["default"]}])[0].value
    0.5
    """
    if not isinstance(raw, list) or not raw:
        raise ValueError("config list must be a non-empty list of entries")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"config list entry {i}: expected an object, got {type(item).__name__}")
        try:
            entries.append(ConfigEntry.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}" for err in exc.errors()
            )
            raise ValueError(f"config list entry {i}: {problems}") from exc
    if all(e.exclude for e in entries):
        raise ValueError("config list selects nothing: every entry is exclude: true")
    check_entry_sparsities(entries, budget=budget)
    return entries


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------
class PrunableLayer(BaseModel):
    """A layer that loses weights (fine-grained) or output channels (structured)."""

    name: str
    op_type: str
    weight_shape: list[int]
    weight_count: int
    params: int
    flops: int
    unit: str


class PruningUnit(BaseModel):
    """What a distribution assigns one sparsity to: a layer (fine-grained) or a channel group.

    ``channel_index`` maps a member to the unit channel of each of its output channels, only for members
    whose numbering differs from the unit's (branches of a concatenation); absent members use identity.
    """

    name: str
    members: list[str]
    channels: int | None = None
    weight_count: int
    initial_sparsity: float
    max_sparsity: float = DEFAULT_MAX_SPARSITY
    block: tuple[int, int] | None = None
    block_pooling: Literal["avg", "max"] = "avg"
    channel_index: dict[str, list[int]] = Field(default_factory=dict)
    pattern: tuple[int, int] | None = None  # N:M: the unit is either patterned (sparsity 1 - N/M) or dense (0)

    @property
    def pattern_sparsity(self) -> float | None:
        """``1 - N/M`` for an N:M unit (the only non-zero sparsity it takes), else ``None``."""
        return None if self.pattern is None else 1.0 - self.pattern[0] / self.pattern[1]

    def count(self, sparsity: float) -> int:
        """Channels (structured) removed at `sparsity`; at least one channel always survives."""
        if self.channels is None:
            raise ValueError(f"unit {self.name!r} is fine-grained: counts are per element")
        return min(pruned_count(sparsity, self.channels), self.channels - 1)


class PruningProblem(BaseModel):
    """A config list resolved against one model: what a search may prune, and how big it is."""

    base_algo: str
    structured: bool
    layers: list[PrunableLayer]
    units: list[PruningUnit]
    target_sparsity: float
    dense_params: int
    dense_flops: int

    def unit(self, name: str) -> PruningUnit:
        """The unit called `name` (KeyError naming it otherwise)."""
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no pruning unit named {name!r}; units are {self.unit_names()}")

    def unit_names(self) -> list[str]:
        """Unit names in module order: the keys of every distribution for this problem."""
        return [u.name for u in self.units]

    def layer(self, name: str) -> PrunableLayer:
        """The prunable layer called `name`."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no prunable layer named {name!r}")


class SparsityDistribution(RootModel[dict[str, float]]):
    """A typed unit name → sparsity mapping with JSON round-trip.

    >>> SparsityDistribution.model_validate_json('{"conv1": 0.5}').root
    {'conv1': 0.5}
    """

    @model_validator(mode="after")
    def _in_range(self) -> SparsityDistribution:
        bad = {k: v for k, v in self.root.items() if not (0.0 <= v <= 1.0) or math.isnan(v)}
        if bad:
            raise ValueError(f"sparsities must lie in [0, 1]: {bad}")
        return self

    def to_json(self) -> str:
        """JSON text of the mapping."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> SparsityDistribution:
        """Parse JSON text written by `to_json`."""
        return cls.model_validate_json(text)


def _check_keys(dist: dict[str, float], problem: PruningProblem) -> None:
    names = set(problem.unit_names())
    extra = set(dist) - names
    missing = names - set(dist)
    if extra or missing:
        raise ValueError(
            f"distribution does not match the problem's units: unknown {sorted(extra)}, missing {sorted(missing)}"
        )


def overall_sparsity(dist: dict[str, float], problem: PruningProblem) -> float:
    """Sparsity of all units together, each weighted by its weight count."""
    _check_keys(dist, problem)
    total = sum(u.weight_count for u in problem.units)
    if total == 0:
        return 0.0
    return sum(dist[u.name] * u.weight_count for u in problem.units) / total


def rescale(dist: dict[str, float], target: float, problem: PruningProblem) -> dict[str, float]:
    """Scale `dist` proportionally so its weighted overall sparsity equals `target`.

    Units are clipped to ``[0, unit.max_sparsity]``; what clipped units cannot take is spread over the
    others, proportionally to their values. If every unit with a non-zero value is clipped (or all
    values are zero), the rest is spread over all unclipped units proportionally to their headroom.
    Raises ValueError when `target` exceeds what the bounds allow.
    """
    _check_keys(dist, problem)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    units = problem.units
    weights = {u.name: float(u.weight_count) for u in units}
    bounds = {u.name: u.max_sparsity for u in units}
    total = sum(weights.values())
    if total == 0:
        return {u.name: 0.0 for u in units}
    capacity = sum(weights[n] * bounds[n] for n in weights) / total
    if target > capacity + 1e-12:
        raise ValueError(
            f"target sparsity {target:.4f} is unreachable: the units' max_sparsity allow at most {capacity:.4f}"
        )
    want = target * total  # weighted count of pruned weights we must reach
    base = {n: min(max(dist[n], 0.0), bounds[n]) for n in weights}
    clipped: set[str] = set()
    out = dict(base)
    # Phase 1: proportional scaling; each round clips at least one more unit, so it ends within len(units).
    for _ in range(len(units) + 1):
        free = [n for n in weights if n not in clipped and base[n] > 0]
        fixed = sum(weights[n] * bounds[n] for n in clipped)
        mass = sum(weights[n] * base[n] for n in free)
        if not free or mass == 0:
            break
        factor = (want - fixed) / mass
        newly = [n for n in free if factor * base[n] > bounds[n]]
        if not newly:
            out = {n: (bounds[n] if n in clipped else factor * base[n] if n in free else 0.0) for n in weights}
            return out
        clipped.update(newly)
    # Phase 2: proportional scaling cannot reach the target; fill the remaining headroom evenly.
    out = {n: (bounds[n] if n in clipped else (base[n] if base[n] > 0 else 0.0)) for n in weights}
    if not clipped and all(base[n] == 0 for n in weights):
        out = {n: 0.0 for n in weights}
    reached = sum(weights[n] * out[n] for n in weights)
    open_units = [n for n in weights if out[n] < bounds[n]]
    headroom = sum(weights[n] * (bounds[n] - out[n]) for n in open_units)
    if want - reached > 0:
        if headroom <= 0:
            raise ValueError(f"target sparsity {target:.4f} is unreachable under the units' bounds")
        alpha = (want - reached) / headroom
        for n in open_units:
            out[n] = out[n] + alpha * (bounds[n] - out[n])
    return out


def initial_distribution(problem: PruningProblem) -> dict[str, float]:
    """Each unit at the sparsity its config entry asked for."""
    return {u.name: u.initial_sparsity for u in problem.units}


def layer_distribution(dist: dict[str, float], problem: PruningProblem) -> dict[str, float]:
    """Expand a unit distribution to every member layer (members of a group share its value)."""
    _check_keys(dist, problem)
    return {m: dist[u.name] for u in problem.units for m in u.members}


# --------------------------------------------------------------------------------------------------
# Resolving a config list against a model
# --------------------------------------------------------------------------------------------------
def _type_name(module: nn.Module) -> str:
    from torch.nn.utils import parametrize

    cls = type(module)
    if parametrize.is_parametrized(module):  # ParametrizedConv2d → Conv2d
        cls = cls.__bases__[0]
    return cls.__name__


def _check_pattern_layer(i: int, nm: tuple[int, int], name: str, kind: str, module: nn.Module, base_algo: str) -> None:
    """An N:M entry applies to a Linear (or Conv1D) layer whose input features divide into groups of M, with a
    fine-grained criterion (its element scores choose the N kept in each group)."""
    if base_algo in STRUCTURED_ALGOS:
        raise ValueError(
            f"config_list[{i}].pattern: N:M keeps N of every M weights chosen by element scores; base algorithm "
            f"{base_algo!r} removes whole channels (use 'level' or 'wanda')"
        )
    if kind not in ("Linear", "Conv1D"):
        raise ValueError(f"config_list[{i}].pattern: N:M applies to Linear layers, not {name!r} ({kind})")
    from pruning.importance.base import weight_of

    shape = tuple(weight_of(module).shape)
    in_features = int(shape[0] if kind == "Conv1D" else shape[1])
    if in_features % nm[1]:
        raise ValueError(
            f"config_list[{i}].pattern: layer {name!r} has {in_features} input features, not a multiple of M={nm[1]}"
        )


def resolve_config_list(
    model: nn.Module,
    config_list: list[dict[str, Any]] | list[ConfigEntry],
    base_algo: str,
    dummy_input: Tensor | tuple[Any, ...],
    trace_timeout_s: float | None = None,
) -> PruningProblem:
    """Resolve a config list against `model` for `base_algo`.

    Returns the prunable layers (name, weight shape, parameter count, MACs) and the units a
    distribution assigns sparsities to (see the module docstring). Raises ValueError naming an
    ``op_name`` that matches no module, a layer whose type `base_algo` cannot prune, or (structured)
    a layer whose output channels are the model's output. The model is not modified.

    A transformer (a model with attention modules that `pruning._blocks` recognises) is resolved by
    structure, without tracing: its structured units are whole attention heads (KV groups with their query
    heads under grouped-query attention) and MLP intermediate channels, and nothing else (the hidden dimension
    is never cut). Other models are traced with Torch-Pruning's dependency graph; a trace that takes longer
    than `trace_timeout_s` (default ``$PRUNEHUB_TRACE_TIMEOUT_S`` or 60 s) raises
    `pruning._graph.TraceTimeout` naming the step.
    """
    from pruning import _blocks, _graph
    from pruning.metrics import count_params_flops, layer_stats

    is_structured(base_algo)  # validates the name
    structured = base_algo in STRUCTURED_ALGOS
    cfg: list[ConfigEntry]
    if all(isinstance(e, ConfigEntry) for e in config_list) and config_list:
        cfg = [e for e in config_list if isinstance(e, ConfigEntry)]
    else:
        cfg = validate_config_list([e.model_dump() if isinstance(e, ConfigEntry) else e for e in config_list])

    from torch.nn.utils import parametrize

    # Resolving only reads the model: a copy (a second set of weights) is needed only to strip masks before
    # counting or tracing, and for Torch-Pruning's trace, which runs on a model of its own (see below).
    masked = any(parametrize.is_parametrized(m) for m in model.modules())
    work = _graph.plain_copy(model) if masked else model
    modules = dict(work.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    allowed = {"Conv1d", "Conv2d", "Linear", "Conv1D"} | ({"BatchNorm1d", "BatchNorm2d"} if structured else set())

    # Which entry decides each layer (last match wins) and which layers were named explicitly.
    chosen: dict[str, ConfigEntry] = {}
    named: set[str] = set()
    scan = _blocks.find_blocks(work) if structured else _blocks.BlockScan()
    for i, entry in enumerate(cfg):
        types = entry.type_names()
        for op_name in entry.op_names:
            if op_name not in modules or op_name == "":
                raise ValueError(f"config list entry {i}: op_name {op_name!r} matches no layer of the model")
            owner = next((m for m in scan.unsupported if op_name == m or op_name.startswith(m + ".")), None)
            if owner is not None and not entry.exclude:
                raise ValueError(
                    f"config list entry {i}: layer {op_name!r} cannot be pruned with {base_algo!r}: "
                    f"{owner!r} cannot lose whole heads: {scan.unsupported[owner]}"
                )
            kind = _type_name(modules[op_name])
            if types and kind not in types:
                raise ValueError(
                    f"config list entry {i}: layer {op_name!r} is a {kind}, not one of op_types {entry.op_types}"
                )
            if kind not in allowed and not entry.exclude:
                raise ValueError(
                    f"config list entry {i}: base algorithm {base_algo!r} cannot prune layer {op_name!r} ({kind})"
                )
        for name, module in modules.items():
            kind = _type_name(module)
            if entry.op_names:
                hit = name in entry.op_names
            else:
                hit = kind in types
            if not hit:
                continue
            if kind not in allowed:
                if entry.exclude:
                    continue
                raise ValueError(
                    f"config list entry {i}: base algorithm {base_algo!r} cannot prune layer {name!r} ({kind})"
                )
            if base_algo in LINEAR_ONLY_ALGOS and kind not in ("Linear", "Conv1D") and not entry.exclude:
                raise ValueError(
                    f"config list entry {i}: base algorithm {base_algo!r} scores the input channels of Linear (and "
                    f"Conv1D) layers, not {name!r} ({kind}); select Linear layers only"
                )
            if entry.nm is not None and not entry.exclude:
                _check_pattern_layer(i, entry.nm, name, kind, module, base_algo)
            if entry.block is not None and not entry.exclude:
                if structured or kind != "Linear":
                    raise ValueError(
                        f"config list entry {i}: block sparsity applies to Linear layers with base algorithm "
                        f"'level', not to {name!r} ({kind}) with {base_algo!r}"
                    )
            chosen[name] = entry
            if entry.op_names:
                named.add(name)

    selected = {n for n, e in chosen.items() if not e.exclude}
    excluded = {n for n, e in chosen.items() if e.exclude}
    if not selected:
        raise ValueError("config list selects no prunable layer of the model")

    with _graph.time_limit(
        _graph.trace_timeout_s(trace_timeout_s), lambda: f"counting the params and FLOPs of {type(work).__name__}"
    ):
        per_layer = layer_stats(work, dummy_input)
        dense_params, dense_flops = count_params_flops(work, dummy_input)

    def make_layer(name: str, unit: str) -> PrunableLayer:
        module = modules[name]
        weight = module.weight
        params, flops = per_layer.get(name, (sum(p.numel() for p in module.parameters(recurse=False)), 0))
        return PrunableLayer(
            name=name,
            op_type=_type_name(module),
            weight_shape=list(weight.shape),
            weight_count=int(weight.numel()),
            params=int(params),
            flops=int(flops),
            unit=unit,
        )

    layers: list[PrunableLayer] = []
    units: list[PruningUnit] = []
    if not structured:
        for name in sorted(selected, key=order.__getitem__):
            entry = chosen[name]
            cap = entry.max_sparsity_per_layer or DEFAULT_MAX_SPARSITY
            layer = make_layer(name, name)
            layers.append(layer)
            units.append(
                PruningUnit(
                    name=name,
                    members=[name],
                    channels=None,
                    weight_count=layer.weight_count,
                    initial_sparsity=min(entry.value, cap),
                    max_sparsity=cap,
                    block=entry.block,
                    block_pooling=entry.block_pooling,
                    pattern=entry.nm,
                )
            )
    else:
        if scan.blocks:
            groups = [
                _graph.ChannelGroup(
                    members=list(b.producers),
                    channels=b.channels,
                    # MLP members number channels like the unit; attention rows map to their head
                    channel_index={p: idx for p, idx in b.channel_index.items() if idx != list(range(b.channels))},
                )
                for b in sorted(scan.blocks, key=lambda b: order[b.producers[0]])
            ]
        else:
            groups = _graph.channel_groups(work if masked else _graph.plain_copy(model), dummy_input, trace_timeout_s)
        covered: set[str] = set()
        for group in groups:
            members = group.members
            covered.update(members)
            if group.blocked_reason is not None:
                bad = sorted(set(members) & named & selected)
                if bad:
                    raise ValueError(
                        f"layer {bad[0]!r} cannot be pruned on output channels with {base_algo!r}: "
                        f"{group.blocked_reason}"
                    )
                continue
            picked = [m for m in members if m in selected]
            if not picked or any(m in excluded for m in members):
                continue
            if base_algo == "slim" and not any(_type_name(modules[m]).startswith("BatchNorm") for m in members):
                bad = sorted(set(members) & named & selected)
                if bad:
                    raise ValueError(
                        f"base algorithm 'slim' cannot prune layer {bad[0]!r}: its channel group "
                        f"{members} has no BatchNorm layer to rank by"
                    )
                continue
            first = chosen[picked[0]]
            cap = min((chosen[m].max_sparsity_per_layer or DEFAULT_MAX_SPARSITY) for m in picked)
            unit_name = members[0]
            unit_layers = [make_layer(m, unit_name) for m in members]
            layers.extend(unit_layers)
            units.append(
                PruningUnit(
                    name=unit_name,
                    members=members,
                    channels=group.channels,
                    weight_count=sum(layer.weight_count for layer in unit_layers),
                    initial_sparsity=min(first.value, cap),
                    max_sparsity=cap,
                    channel_index=group.channel_index,
                )
            )
        orphans = sorted((selected & named) - covered, key=order.__getitem__)
        if orphans and scan.blocks:
            owner = next((m for m in scan.unsupported if orphans[0].startswith(m + ".")), None)
            why = (
                f"its module {owner!r} cannot be pruned by whole heads: {scan.unsupported[owner]}"
                if owner is not None
                else "it lies outside the model's attention heads and MLP channels, so its output channels are the "
                "hidden (residual) dimension or the model's output, which prunehub does not prune"
            )
            raise ValueError(f"layer {orphans[0]!r} cannot be pruned on output channels with {base_algo!r}: {why}")
        if orphans:
            raise ValueError(
                f"layer {orphans[0]!r} has no output channels that {base_algo!r} can prune "
                "(it is not part of the traced graph)"
            )
        if not units:
            raise ValueError(
                "config list selects no layer whose output channels can be pruned "
                "(the model's output layer is never pruned on its outputs"
                + ("; slim needs a BatchNorm in the channel group)" if base_algo == "slim" else ")")
            )
    problem = PruningProblem(
        base_algo=base_algo,
        structured=structured,
        layers=layers,
        units=units,
        target_sparsity=0.0,
        dense_params=dense_params,
        dense_flops=dense_flops,
    )
    problem.target_sparsity = overall_sparsity(initial_distribution(problem), problem)
    return problem
