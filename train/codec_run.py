"""The loop the codec-part trainers share (train.condition_encoder, train.decoder_finetune).

One small net trained on a pair cache: AdamW, linear warm-up then cosine decay to 1 % over `steps`,
states (net, optimiser, schedule, pair stream, RNGs) as safetensors + JSON so `--resume` continues
bit-exactly and `--stop-at` can split a run, and a JSON-lines log printed as it is written.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from .pair_cache import CachedPairs
from .state import latest_state, load_state, rng_state, save_state, set_rng_state


def hold_out(pairs: CachedPairs, val: int) -> dict[str, torch.Tensor]:
    """Take the last `val` pairs out of the training pool: they are the validation set, never trained on."""
    held = {k: t[-val:] for k, t in pairs.tensors.items()}
    pairs.tensors = {k: t[:-val] for k, t in pairs.tensors.items()}
    return held


class CodecRun:
    def __init__(self, out: Path, name: str, net: nn.Module, pairs: CachedPairs, *, lr: float, steps: int,
                 warmup: int = 1):
        self.out, self.name, self.net, self.pairs, self.steps = out, name, net, pairs, steps
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) *
            (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))
        self.step = 0
        self._log, self._clock = None, time.perf_counter()

    def restore(self, why: str) -> None:
        """Load the newest state in `out` (to resume or export), or exit saying there is none."""
        found = latest_state(self.out)
        if found is None:
            raise SystemExit(f"no training state in {self.out} to {why}")
        state = load_state(found)
        self.net.load_state_dict(state[self.name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.pairs.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.step += 1

    def save(self) -> None:
        save_state(self.out, self.step, {"step": self.step, self.name: self.net.state_dict(),
                                         "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                                         "data": self.pairs.state_dict(), "rng": rng_state()})

    def record(self, values: dict, steps_since: int = 1) -> None:
        """Print and append one log line: the step, `values`, the learning rate and the seconds per step."""
        now = time.perf_counter()
        line = {"step": self.step, **values, "lr": self.schedule.get_last_lr()[0],
                "s_per_step": round((now - self._clock) / max(steps_since, 1), 3)}
        self._clock = now
        if self._log is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log = (self.out / "log.jsonl").open("a")
        print(json.dumps(line), flush=True)
        self._log.write(json.dumps(line) + "\n")
        self._log.flush()
