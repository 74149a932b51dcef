"""Memory account of the `qwen-image` TEASR step, measured on the CPU with 2 and 4 blocks, extrapolated.

    OMP_NUM_THREADS=2 python benchmarks/memory_account.py --resolution 64 --resolution2 128   # ~30 min on 2 busy cores

The same trainer step as the GPU suite's (`Trainer.train_step`: LoRA rank 128 per branch, fp8-stored
base, gradient checkpointing, LPIPS on, bf16 autocast as on CUDA) at the 20B width (3072 wide, 24
heads, context 3584, 32 context tokens), with 2 and 4 blocks, each in its own process, once with the
old schedule (terms one after the other, one total backward) and once with the new one (stacked
no-grad passes, per-group backward, decoder checkpointed). The bytes of every tensor the step makes
are counted from the op that makes it to its release (`LiveBytes`: the CPU allocator keeps no
statistics), so the peak is torch.cuda.max_memory_allocated's counterpart, weights excluded.

Account: E(d, T) = the peak of live tensor bytes made during a step of d blocks at T tokens (the
optimizer states already exist, as at every step after the first), modelled as
c0 + c1 d + a0 T + a1 d T and solved from 2 and 4 blocks at two sides: per-block bytes c1 (LoRA
gradients, ...), per-token bytes a0 (e.g. the one block being recomputed in backward, LPIPS) and
per-token-and-block bytes a1 (what every block keeps per token: checkpoint inputs of the passes whose
graphs are alive). Prediction for 60 blocks at 512² = frozen weights (blocks fp8, the rest bf16) +
trained fp32 weights + optimizer states (AdamW 8, RMSprop 4 bytes per trained value) + E(60, T_512).
The pixel codec stands in for the VAE (as in train.bench_step):
a real VAE decoder's activations are not in the account.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCHEDULES = {"old": dict(stack_passes=False, backward_per_group=False, checkpoint_decoder=False, fuse_lora_down=False),
             "new": dict(stack_passes=True, backward_per_group=True, checkpoint_decoder=True, fuse_lora_down=True)}
GPU_TOKENS = (512 // 16) ** 2 * 2 + 32      # 512² with an f8 VAE and patch 2: 1024 noise + 1024 LR + 32 context
H200_MEASURED_GB = 39.2                     # BENCHMARKS.md, gpu_suite 2026-11-30 (old schedule)


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storages created inside it that are alive, and their peak: exact on the CPU,
    where no allocator keeps statistics (a storage counts from the op that made it to its release).
    Storages that existed before (`known`: weights, optimizer states) are not counted when an in-place
    op returns them."""

    def __init__(self, known=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()
        for t in known:
            self.seen[t.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def measure(depth: int, schedule: str, resolution: int, rank: int) -> dict:
    """One step in this process (its own allocator state); the bytes the account needs."""
    import torch.nn.functional as F
    from teasr_core.network import model as model_module
    from train.bench_step import random_context
    from train.config import TrainConfig
    from train.distill import Dist, Trainer

    name = f"qwen-image-{depth}"
    model_module.PRESETS[name] = replace(model_module.PRESETS["qwen-image"], depth=depth)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(preset=name, crop=resolution, batch=1, pixel_scale=8, full_finetune=False,
                          lora_ranks=(rank, rank), fp8_base=True, gradient_checkpointing=True,
                          context_file=random_context(name, Path(tmp), 32),
                          sample_every=0, out=tmp, device="cpu", **SCHEDULES[schedule])
        trainer = Trainer(cfg, Dist(device=torch.device("cpu")))
        trainer.autocast_enabled = True       # bf16 autocast, as the step runs on CUDA
        if trainer.lpips is None:
            raise SystemExit("LPIPS weights are missing (python -m teasr_core.eval.prepare): the account needs them")
        g = torch.Generator().manual_seed(0)
        hr = torch.rand(1, 3, resolution, resolution, generator=g)
        batch = (F.avg_pool2d(hr, 4), hr)
        dit = trainer.dit
        trained = sum(p.numel() for p in trainer.params)
        block_trained = sum(p.numel() for p in dit.transformer_blocks[0].parameters() if p.requires_grad)
        block_frozen = sum(p.numel() * p.element_size() for p in dit.transformer_blocks[0].parameters()
                           if not p.requires_grad) + sum(b.numel() * b.element_size() for b in dit.transformer_blocks[0].buffers())
        rest_frozen = sum(p.numel() for n, p in dit.named_parameters()
                          if not p.requires_grad and not n.startswith("transformer_blocks."))
        lpips_bytes = sum(p.numel() * p.element_size() for p in trainer.lpips.parameters())
        for param in trainer.params:       # optimizer states made now, as they exist at every later step
            param.grad = torch.zeros_like(param)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        states = [t for state in trainer.optimizer.state.values() for t in state.values() if t.numel() > 1]
        known = [*dit.parameters(), *dit.buffers(), *trainer.lpips.parameters(), *trainer.lpips.buffers(), *states]
        with LiveBytes(known) as tracker:
            row = trainer.train_step([batch])
    tokens = 2 * (resolution // 16) ** 2 + 32
    return {"depth": depth, "schedule": schedule, "resolution": resolution, "tokens": tokens,
            "extra_bytes": tracker.peak, "seconds": row["sec_per_step"], "trained": trained,
            "block_trained": block_trained, "block_frozen_bytes": block_frozen, "rest_frozen": rest_frozen,
            "lpips_bytes": lpips_bytes, "state_bytes": sum(t.numel() * t.element_size() for t in states), "passes": {k: v for k, v in row.items() if k.startswith(("fwd_", "calls_"))}}


def account(runs: dict, depth: int = 60, state_bytes: float | None = None) -> dict:
    """The prediction for `depth` blocks at 512² from one schedule's runs {(blocks, HR side): run} at 2 and 4
    blocks and two sides (GiB, as torch.cuda.max_memory_allocated / 2**30 in the GPU suite).
    E(d, T) = c0 + c1 d + a0 T + a1 d T, solved exactly from the four runs. state_bytes: optimizer state
    bytes per trained value, if not the runs' own (RMSprop's 4: the states are made before the measured
    step, so they are not in its peak)."""
    low, high = sorted({side for _, side in runs})
    e = {key: r["extra_bytes"] for key, r in runs.items()}
    t1, t2 = runs[2, low]["tokens"], runs[2, high]["tokens"]
    a1 = ((e[4, high] - e[2, high]) - (e[4, low] - e[2, low])) / (2 * (t2 - t1))
    c1 = (e[4, low] - e[2, low]) / 2 - a1 * t1
    a0 = (e[2, high] - e[2, low]) / (t2 - t1) - 2 * a1
    c0 = e[2, low] - 2 * c1 - a0 * t1 - 2 * a1 * t1
    step = c0 + depth * c1 + (a0 + depth * a1) * GPU_TOKENS
    two = runs[2, low]
    trained = two["trained"] + (depth - 2) * two["block_trained"]
    state_per_value = state_bytes or two["state_bytes"] / two["trained"]   # AdamW 8, RMSprop 4
    weights = depth * two["block_frozen_bytes"] + 2 * two["rest_frozen"] + 4 * trained + two["lpips_bytes"]
    gib = 2 ** 30
    return {"c0_GiB": c0 / gib, "per_block_GiB": c1 / gib, "per_token_KiB": a0 / 1024, "per_token_block_KiB": a1 / 1024,
            "weights_GiB": weights / gib, "states_GiB": state_per_value * trained / gib, "step_512_GiB": step / gib,
            "predicted_GiB": (weights + state_per_value * trained + step) / gib,
            "seconds": {f"{d}@{side}": r["seconds"] for (d, side), r in runs.items()}, "passes": runs[4, low]["passes"]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/memory_account.py", description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64, help="HR side on the CPU for 2 and 4 blocks (512 on the GPU)")
    ap.add_argument("--resolution2", type=int, default=128, help="a second HR side: the per-token bytes")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--schedules", default="old,new")
    ap.add_argument("--measured", type=Path, help="a JSON line this script printed: measure only what it lacks")
    ap.add_argument("--one", nargs=3, metavar=("DEPTH", "SCHEDULE", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], int(args.one[2]), args.rank)))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results, measured = {}, {}
    if args.measured:
        for schedule, runs in json.loads(args.measured.read_text().splitlines()[-1])["measured"].items():
            measured[schedule] = {(r["depth"], r["resolution"]): r for r in runs}
    for schedule in args.schedules.split(","):
        runs = measured.setdefault(schedule, {})
        for depth, side in ((2, args.resolution), (4, args.resolution), (2, args.resolution2), (4, args.resolution2)):
            if (depth, side) in runs:
                continue
            done = subprocess.run([sys.executable, __file__, "--one", str(depth), schedule, str(side),
                                   "--rank", str(args.rank)], env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            run = runs[depth, side] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{schedule} {depth} blocks at {side}²: step {run['extra_bytes'] / 2**30:.3f} GiB, "
                  f"{run['seconds']:.1f} s, {run['passes']}", flush=True)
        results[schedule] = account(runs)
    if "new" in results:
        results["new+rmsprop"] = account(measured["new"], state_bytes=4)
    print(f"\nqwen-image TEASR step on the CPU (HR {args.resolution}² and {args.resolution2}², 2 and 4 blocks) -> 512² "
          f"({GPU_TOKENS} tokens), 60 blocks, rank {args.rank}, fp8 base, grad checkpointing, LPIPS on:")
    print(f"{'schedule':<12}{'c0':>7}{'block':>7}{'KiB/tok':>8}{'KiB/tok/blk':>12}{'weights':>9}{'opt st':>8}"
          f"{'step@512²':>10}{'predicted':>10}   (GiB; H200 measured, old schedule: {H200_MEASURED_GB} GiB)")
    for schedule, r in results.items():
        print(f"{schedule:<12}{r['c0_GiB']:>7.3f}{r['per_block_GiB']:>7.3f}{r['per_token_KiB']:>8.1f}"
              f"{r['per_token_block_KiB']:>12.1f}{r['weights_GiB']:>9.2f}{r['states_GiB']:>8.2f}"
              f"{r['step_512_GiB']:>10.2f}{r['predicted_GiB']:>10.2f}")
    print(json.dumps({"measured": {s: list(runs.values()) for s, runs in measured.items()}, "account": results}))


if __name__ == "__main__":
    main()
