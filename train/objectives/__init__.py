"""Distillation objectives and what they share: the flow, random draws, and a forward-pass counter.

An objective is called once per micro-batch as `objective(net, x0, cond, hr, generator, backward)`; it
back-propagates its losses itself through `backward(loss)` (which scales for the micro-batches: the
TEASR objective may do so per loss group, so only one pass's graph is alive at a time) and returns
(the weighted total, detached; {term name: detached scalar}). `net(x, cond, sigma, sigma_target)` is the
trained DiT (behind DDP/FSDP when distributed) wrapped in a `PassCounter`. All randomness comes from
`generator`, which the trainer re-seeds per (seed, micro-batch stream, step), so a resumed run draws
exactly the noise an uninterrupted one would.

Flow convention (teasr_core): x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, and the
network returns the average velocity from sigma to sigma_target.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch


class PassCounter:
    """Wraps a model call and counts it as `<kind>_grad` or `<kind>_nograd` (autograd on or off).

    The counts are the cost of a training step in network evaluations; `counts` may be shared by
    several counters (student, teacher, teacher encoder) so one dict holds the step's total.
    """

    def __init__(self, model, counts: Counter, kind: str = "fwd", context: torch.Tensor | None = None):
        self.model, self.counts, self.kind, self.context = model, counts, kind, context

    def __call__(self, x, cond, sigma, sigma_target, passes: int = 1):
        """`passes` > 1: independent passes stacked on the batch dimension (see `stacked`), counted as such."""
        self.counts[f"{self.kind}_{'grad' if torch.is_grad_enabled() else 'nograd'}"] += passes
        self.counts[f"calls_{self.kind}"] += 1   # network calls, stacked passes once
        context = None if self.context is None else self.context.expand(x.shape[0], -1, -1)
        return self.model(x, cond, sigma, sigma_target, context)


class Pass(NamedTuple):
    """The inputs of one network evaluation: net(x, cond, sigma, target)."""

    x: torch.Tensor
    cond: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor


def stacked(net, passes: list[Pass]) -> list[torch.Tensor]:
    """Independent passes as ONE call on the batch dimension (fewer, fuller kernel launches), split back.

    The model treats samples independently (per-sample timesteps, no batch statistics), so each
    output equals its own call's to round-off.
    """
    if len(passes) == 1:
        return [net(*passes[0])]
    joined = Pass(*(torch.cat(parts) for parts in zip(*passes)))
    out = net(*joined, passes=len(passes)) if isinstance(net, PassCounter) else net(*joined)
    return list(out.split([p.x.shape[0] for p in passes]))


def one_by_one(net, passes: list[Pass]) -> list[torch.Tensor]:
    """The same passes as separate calls (the reference `stacked` is checked against)."""
    return [net(*p) for p in passes]


def per_sample(sigma: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1], to scale latents per sample."""
    return sigma.view(-1, 1, 1, 1)


def noised(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point at noise level sigma [B] on the straight path from x0 to eps."""
    s = per_sample(sigma).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """n values ~ U(lo, hi) on the generator's device."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)


def gaussian_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32 (autocast may hand us bf16 predictions); `weight` [B] weights each sample."""
    error = (a.float() - b.float()) ** 2
    if weight is None:
        return error.mean()
    return (error.flatten(1).mean(1) * weight).mean()


def sigma_weight(sigma: torch.Tensor, c: float) -> torch.Tensor | None:
    """Per-sample weight (1 + c^2) sigma^2 / (sigma^2 + c^2) of a velocity-space MSE at noise level sigma [B].

    Why: with a clean-sample output D, the velocity error is (D - x0) / sigma, so a plain velocity MSE
    weights the D error by 1 / sigma^2 and training drifts to the easy starts near the data. This
    weight turns it into (1 + c^2) / (sigma^2 + c^2) times the D error: 1 at sigma = 1, at most
    (1 + c^2) / c^2. c = 0 returns None (unweighted, the precursor's loss).
    """
    if c == 0:
        return None
    s2 = sigma.float() ** 2
    return (1 + c * c) * s2 / (s2 + c * c)
