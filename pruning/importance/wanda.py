"""``wanda``: weight magnitude times input activation norm (Sun et al., 2023, "A Simple and Effective Pruning
Approach for Large Language Models").

The score of weight ``W[i, j]`` of a Linear layer is ``|W[i, j]| * ||X_j||_2``, where ``X_j`` is every value the
layer's input channel ``j`` took over the calibration inputs (all batches, all tokens). A weight that multiplies
a rarely-active input costs little to remove even if it is large; one that multiplies an outlier channel costs a
lot even if it is small, which magnitude alone misses in transformers.

Fine-grained only (and N:M, whose groups it ranks): the score is per weight element. A channel-removing variant
would need a rule for folding element scores into a channel score that the paper does not give, so a structured
``wanda`` is refused when the config is validated rather than invented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pruning.importance.base import Importance, effective_weight, is_conv1d_transposed

__all__ = ["WandaImportance", "input_channel_norms"]

DEFAULT_BATCHES = 16


def input_channel_norms(model: nn.Module, layer_names: Sequence[str], task: Any, batches: int) -> dict[str, Tensor]:
    """Per layer: the L2 norm of each input channel (the last axis of its input) over ``batches`` calibration
    batches (the task's ``calibration_data()``, or its trainer with an optimizer that never steps; see
    :func:`pruning.calibration.feed_calibration`), in eval mode. Float64 on the CPU, one entry per input feature."""
    from pruning.calibration import feed_calibration

    modules = dict(model.named_modules())
    squares: dict[str, Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            flat = x.reshape(-1, x.shape[-1]).double()
            total = (flat * flat).sum(dim=0).cpu()
            squares[name] = squares[name] + total if name in squares else total

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in layer_names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            feed_calibration(model, task, batches, "base algorithm 'wanda' without calibration_data()")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in layer_names if name not in squares]
    if missing:
        raise RuntimeError(f"wanda: layer {missing[0]!r} saw no input during the calibration batches")
    return {name: value.sqrt() for name, value in squares.items()}


class WandaImportance(Importance):
    """``|W| * ||X_j||_2`` per weight element of a Linear (or Conv1D) layer; ``None`` for other layers.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> imp = WandaImportance()
    >>> imp.norms = {"fc": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> imp("fc", layer).tolist()
    [[3.0, 4.0]]
    """

    requires_task = True
    structured = False

    def __init__(self, batches: int = DEFAULT_BATCHES) -> None:
        self.batches = batches
        self.norms: dict[str, Tensor] = {}

    def collect(self, model: nn.Module, layer_names: Sequence[str], task: Any) -> None:
        self.norms = input_channel_norms(model, layer_names, task, self.batches)

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        transposed = is_conv1d_transposed(module)
        if not (isinstance(module, nn.Linear) or transposed):
            return None
        if name not in self.norms:
            raise RuntimeError(f"no input statistics for {name!r}: collect() first")
        weight = effective_weight(module)
        norm = self.norms[name].to(device=weight.device, dtype=weight.dtype)
        # Linear weights are (out, in): the norm scales columns; Conv1D's are (in, out): it scales rows.
        return weight.abs() * (norm.unsqueeze(1) if transposed else norm.unsqueeze(0))
