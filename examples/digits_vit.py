"""Task module: a small Vision Transformer on scikit-learn's bundled 8x8 digits (real data, no download).

The network is Hugging Face's ``ViTForImageClassification`` built from a config (random init, seeded; needs
``pip install prunehub[transformers]``): 2x2 patches of the 1x8x8 image give 16 tokens, hidden size 32, three
layers of four heads, MLP width 64. It is trained once on first use (a few seconds on a CPU) and cached under
``$PRUNEHUB_HOME/examples/`` (default ``.prunehub/examples/``), like :mod:`examples.digits`. Its structured
pruning units are whole attention heads and MLP channels (see the README's Transformers section).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from examples.digits import cached_model, calibration_data, criterion, dummy_input, evaluator, seeded, trainer

__all__ = [
    "DigitsViT",
    "calibration_data",
    "criterion",
    "dummy_input",
    "evaluator",
    "fine_tuner",
    "init_model",
    "model",
    "optimizer",
    "trainer",
]

EPOCHS = 12
LEARNING_RATE = 2e-3
_CACHE_VERSION = "v1"


class DigitsViT(nn.Module):
    """A Hugging Face ViT that returns logits (a tensor, so the default criterion and evaluator apply)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=10,
        )
        self.net = ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "examples" / f"digits-vit-{_CACHE_VERSION}.safetensors"


def init_model() -> nn.Module:
    """The untrained network, seeded (the same initial weights every call)."""
    return seeded(DigitsViT)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Adam: SGD trains a transformer this small far more slowly
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)


def fine_tuner(model: nn.Module, epochs: int = 1) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # gentler than pretraining: the weights are already good
    loss = criterion()
    for epoch in range(epochs):
        trainer(model, opt, loss, epoch)


def _train_dense() -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest, and reproducibly, on one thread
    try:
        net = init_model()
        opt = optimizer(net)
        loss = criterion()
        for epoch in range(EPOCHS):
            for group in opt.param_groups:  # cosine decay per epoch: about 92% held-out accuracy after 12 epochs
                group["lr"] = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))
            trainer(net, opt, loss, epoch)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return net


def model() -> nn.Module:
    """The pretrained ViT, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(DigitsViT, _cache_path(), _train_dense)
