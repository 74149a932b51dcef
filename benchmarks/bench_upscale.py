"""Wall time of a whole upscale (encode, sampling, decode, colour fix) per step count, in ONE run.

  python benchmarks/bench_upscale.py [--checkpoint F] [--size 256] [--steps 1,4] [--device cpu]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.pipeline import UpscaleSettings, Upscaler, upscale  # noqa: E402


def time_upscale(upscaler: Upscaler, size: int, steps: list[int], repeats: int) -> dict[int, dict]:
    """Best and median seconds of a whole untiled upscale of a random size x size image, per step count."""
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    cuda = upscaler.device.type == "cuda"
    upscale(upscaler, image, UpscaleSettings(steps=1))  # warm-up
    results = {}
    for n in steps:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            upscale(upscaler, image, UpscaleSettings(steps=n))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[n] = {"best": min(times), "median": sorted(times)[len(times) // 2]}
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=256, help="input side in pixels (output = 4x)")
    ap.add_argument("--steps", default="1,4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    upscaler = Upscaler.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# {datetime.date.today()} {where}, torch {torch.__version__}, {dtype}, "
          f"{args.size}^2 -> {4 * args.size}^2, untiled, best of {args.repeats}")
    results = time_upscale(upscaler, args.size, [int(s) for s in args.steps.split(",")], args.repeats)
    for steps, t in results.items():
        print(f"steps={steps:2d}  {t['best']:7.2f} s  (median {t['median']:.2f} s)")


if __name__ == "__main__":
    main()
