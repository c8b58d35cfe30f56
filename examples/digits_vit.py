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

from examples.digits import BATCH_SIZE, SEED, _data, calibration_data, evaluator

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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    net = DigitsViT()
    torch.random.set_rng_state(generator_state)
    return net


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Adam: SGD trains a transformer this small far more slowly
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)


def criterion() -> nn.Module:
    return nn.CrossEntropyLoss()


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    """One epoch over the training split, shuffled with a seed derived from ``epoch`` (reproducible)."""
    x_train, y_train, _, _ = _data()
    model.train()
    generator = torch.Generator().manual_seed(SEED * 1000 + epoch)
    order = torch.randperm(len(y_train), generator=generator)
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        if callback is not None:
            callback()
        optimizer.step()


def fine_tuner(model: nn.Module, epochs: int = 1) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # gentler than pretraining: the weights are already good
    loss = criterion()
    for epoch in range(epochs):
        trainer(model, opt, loss, epoch)


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


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
    from safetensors.torch import load_file, save_file

    path = _cache_path()
    net = DigitsViT()
    if path.exists():
        net.load_state_dict(load_file(str(path)))
    else:
        trained = _train_dense()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(trained.state_dict(), str(tmp))
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        net.load_state_dict(trained.state_dict())
    net.eval()
    return net
