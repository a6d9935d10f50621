"""Training and evaluation loops shared by the experiments (AdamW, warmup + cosine, tqdm)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    losses: tuple[float, ...]
    seconds: float


def train(model: torch.nn.Module, next_batch: Callable[[int], Batch], cfg: TrainConfig, desc: str) -> TrainResult:
    """`next_batch(step)` gives (tokens, labels); returns the loss of every step."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, cfg)
        tokens, labels = next_batch(step)
        loss = token_loss(model(tokens), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimiser.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
    return TrainResult(tuple(losses), time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch]) -> dict:
    """Mean loss (nats per labelled token), token accuracy and last-position accuracy."""
    model.eval()
    nats = correct = count = last_correct = rows = 0
    for tokens, labels in batches:
        logits = model(tokens)
        mask = labels != IGNORE
        nats += F.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
        predictions = logits.argmax(-1)
        correct += (predictions[mask] == labels[mask]).sum().item()
        count += mask.sum().item()
        last_correct += (predictions[:, -1] == labels[:, -1]).sum().item()
        rows += len(tokens)
    model.train()
    return {"loss": nats / count, "accuracy": correct / count, "last_accuracy": last_correct / rows}


def smoothed(values, window: int = 50) -> list[float]:
    """Running mean, for loss curves."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
