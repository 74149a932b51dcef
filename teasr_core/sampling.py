"""Flow-map sampling: schedules are data, samplers are small pure functions of (denoise, x, sigmas).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1]. The network F(x, sigma, target)
is the average velocity from sigma to target, so one call jumps: x_target = x - (sigma - target) F.
`denoise` below is the network with the LR condition (and context) already bound.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]
MODES = ("jump", "flowmap", "renoise")
MAX_STEPS = 50


# ---- schedules --------------------------------------------------------------------------------
def check_end_ratio(end_ratio) -> float:
    """An end ratio (see shifted_sigmas) as a float, or ValueError: a number in [0, 1)."""
    if isinstance(end_ratio, bool) or not isinstance(end_ratio, (int, float)) or not 0 <= end_ratio < 1:
        raise ValueError(f"end ratio must be a number in [0, 1), got {end_ratio!r}")
    return float(end_ratio)


@dataclass(frozen=True)
class ModelSampling:
    """How a model is best sampled: its checkpoint's "sampling" metadata. Settings left unset defer to it.

    `attention_tile`: the largest window (output px per side) the transformer attends over, with
    `attention_overlap` px between windows; 0 = as large as the image tile. Why: a model trained on
    small crops restores better, and faster, in windows near that size than over a whole photo
    (BENCHMARKS.md, "A smaller attention tile"); the codec keeps its own, larger tiles.
    """

    end_ratio: float = 0.0
    attention_tile: int = 0
    attention_overlap: int = 64

    def __post_init__(self):
        check_end_ratio(self.end_ratio)
        for name in ("attention_tile", "attention_overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number of pixels >= 0, got {value!r}")
        if self.attention_tile and self.attention_overlap >= self.attention_tile:
            raise ValueError(f"attention_overlap {self.attention_overlap} must be smaller than attention_tile "
                             f"{self.attention_tile}")

    @classmethod
    def from_metadata(cls, sampling: dict | None) -> "ModelSampling":
        """From a checkpoint's "sampling" dict (unknown keys are refused by name); ValueError if unusable."""
        sampling = dict(sampling or {})
        unknown = sorted(set(sampling) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown sampling keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**sampling)


def shifted_sigmas(steps: int, shift: float = 1.0, start: float = 1.0, end_ratio: float = 0.0) -> torch.Tensor:
    """steps + 1 sigmas from `start` down to 0 on a time-shifted grid (shift > 1: more high-noise).

    end_ratio = 0: a uniform grid (the last step starts at start / steps). end_ratio in (0, 1): the
    steps start uniformly from `start` down to start * end_ratio, and the last one jumps from there
    to 0 -- for models whose low-noise steps add grain instead of detail (the bundled one: README).
    """
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not 0 < start <= 1:
        raise ValueError(f"start strength must be in (0, 1], got {start}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if check_end_ratio(end_ratio) and steps > 1:
        t = torch.cat([torch.linspace(start, start * end_ratio, steps, dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64)])
    else:
        t = torch.linspace(start, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def sigmas_from_timesteps(timesteps: Sequence[float] | str) -> torch.Tensor:
    """Explicit timesteps on the 0..1000 scale ("999,750,500,250" or a list) -> sigmas ending at 0."""
    if isinstance(timesteps, str):
        try:
            timesteps = [float(t) for t in timesteps.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"timesteps must be comma-separated numbers in (0, 1000], got {timesteps!r}") from None
    ts = [float(t) for t in timesteps]
    if not 1 <= len(ts) <= MAX_STEPS:
        raise ValueError(f"give 1..{MAX_STEPS} timesteps, got {len(ts)}")
    if any(not 0 < t <= 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing values in (0, 1000], got {ts}")
    return torch.tensor([t / 1000 for t in ts] + [0.0])


# ---- noise as a function of position ------------------------------------------------------------
NOISE_CELL = 32  # latent pixels per side of one independently seeded noise cell


def _cell_seed(*key: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def noise_field(seed: int, stream: int, channels: int, y0: int, x0: int, h: int, w: int,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise [channels, h, w] for the latent window at (y0, x0), a pure function of position.

    Each NOISE_CELL x NOISE_CELL cell of the infinite latent plane has its own generator seeded by
    (seed, stream, cell), so any tiling, tile order, batch size or device sees the same noise at the
    same place. `stream` separates the initial noise (0) from per-step re-noising (1 + i).
    """
    out = torch.empty(channels, h, w)
    for cy in range(y0 // NOISE_CELL, (y0 + h - 1) // NOISE_CELL + 1):
        for cx in range(x0 // NOISE_CELL, (x0 + w - 1) // NOISE_CELL + 1):
            g = torch.Generator().manual_seed(_cell_seed(seed, stream, cy, cx))
            cell = torch.randn(channels, NOISE_CELL, NOISE_CELL, generator=g)
            ys, xs = max(y0, cy * NOISE_CELL), max(x0, cx * NOISE_CELL)
            ye, xe = min(y0 + h, (cy + 1) * NOISE_CELL), min(x0 + w, (cx + 1) * NOISE_CELL)
            out[:, ys - y0:ye - y0, xs - x0:xe - x0] = cell[:, ys - cy * NOISE_CELL:ye - cy * NOISE_CELL,
                                                            xs - cx * NOISE_CELL:xe - cx * NOISE_CELL]
    return out.to(device=device, dtype=dtype)


def batch_noise(seed: int, stream: int, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `like` [B, C, h, w], the same for every image of the batch.

    So an image's result does not depend on its position in a batch (the CLI's files, the nodes'
    batches and video frames all agree), and frames of a clip share their noise.
    """
    b, c, h, w = like.shape
    return noise_field(seed, stream, c, 0, 0, h, w).to(like.device, like.dtype).expand(b, -1, -1, -1)


# ---- samplers -----------------------------------------------------------------------------------
# A sampler is two small pure functions of the step: which jump to ask the network for
# (`step_target`) and how to move x with the answer (`sampler_step`, elementwise). `sample` runs them
# on a whole tensor; the pipeline runs the same two on row bands of a streamed latent.
def batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


def flow_map_step(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One call of the flow map: x_target = x - (sigma - target) F(x, sigma, target)."""
    return x - (sigma - target).to(x.dtype) * denoise(x, batch_sigma(sigma, x), batch_sigma(target, x))


def check_mode(mode: str, stochasticity: float = 1.0) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; choose one of {MODES}")
    if not 0 <= stochasticity <= 1:
        raise ValueError(f"stochasticity must be in [0, 1], got {stochasticity}")


def step_target(mode: str, sigmas: torch.Tensor, i: int) -> torch.Tensor:
    """The time step i asks the network to jump to: the next sigma (flowmap) or 0 (jump, renoise)."""
    return sigmas[i + 1] if mode == "flowmap" else torch.zeros(())


def sampler_step(mode: str, x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, nxt: torch.Tensor,
                 fresh_noise: torch.Tensor | None = None, stochasticity: float = 1.0) -> torch.Tensor:
    """x at `nxt` from x at `sigma` and the network's average velocity towards `step_target`.

    jump: predict the jump to 0, then an Euler step to the next sigma (deterministic).
    flowmap: the velocity already targets the next sigma, so the same formula lands on it exactly.
    renoise (TwinFlow-style): predict (x0, eps) with a jump to 0, then re-noise to the next sigma
    with sqrt(1 - s) eps_hat + sqrt(s) fresh_noise.
    """
    if mode != "renoise":
        return x + (nxt - sigma).to(x.dtype) * velocity
    sigma, nxt = sigma.to(x.dtype), nxt.to(x.dtype)
    x0 = x - sigma * velocity
    eps = x + (1 - sigma) * velocity
    if nxt > 0:
        eps = (1 - stochasticity) ** 0.5 * eps + stochasticity ** 0.5 * fresh_noise
    return (1 - nxt) * x0 + nxt * eps


def sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, mode: str = "jump", *,
           noise: Callable[[int], torch.Tensor] | None = None, stochasticity: float = 1.0,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampler `mode` (one of MODES) from x at sigmas[0] to sigmas[-1]; renoise needs noise(step)."""
    check_mode(mode, stochasticity)
    if mode == "renoise" and noise is None:
        raise ValueError("mode 'renoise' needs a noise(step) function")
    for i in range(len(sigmas) - 1):
        velocity = denoise(x, batch_sigma(sigmas[i], x), batch_sigma(step_target(mode, sigmas, i), x))
        fresh = noise(i) if mode == "renoise" and sigmas[i + 1] > 0 else None
        x = sampler_step(mode, x, velocity, sigmas[i], sigmas[i + 1], fresh, stochasticity)
        if callback:
            callback(i, x)
    return x
