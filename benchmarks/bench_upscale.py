"""Wall time of a whole upscale (encode, sampling, decode, colour fix) per step count, in ONE run.

  python benchmarks/bench_upscale.py [--checkpoint F] [--size 256] [--steps 1,4] [--device cpu]
                                     [--allocator reuse|default] [--compare-allocator]

The process is set up as the command line sets up its own (`--allocator reuse`, see
teasr_core/upscale/process.py). `--compare-allocator` times both allocator settings in alternating
child processes of this one run and prints their ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.upscale.pipeline import UpscaleSettings, Upscaler, default_dtype, upscale  # noqa: E402
from teasr_core.upscale.process import reuse_freed_memory  # noqa: E402


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


def compare_allocators(args, rounds: int = 2) -> None:
    """Best seconds per step count under each allocator setting, children alternating default/reuse."""
    best: dict[str, dict[int, float]] = {"default": {}, "reuse": {}}
    for _ in range(rounds):
        for allocator in best:
            cmd = [sys.executable, __file__, "--allocator", allocator, "--json", "--size", str(args.size),
                   "--steps", args.steps, "--device", args.device, "--repeats", str(args.repeats)]
            if args.checkpoint:
                cmd += ["--checkpoint", str(args.checkpoint)]
            child = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            for steps, t in child.items():
                best[allocator][int(steps)] = min(t["best"], best[allocator].get(int(steps), float("inf")))
    print(f"# allocator comparison, {rounds} alternating child processes each, best of all their runs")
    for steps in best["default"]:
        d, r = best["default"][steps], best["reuse"][steps]
        print(f"steps={steps:2d}  glibc default {d:7.2f} s   reuse freed memory {r:7.2f} s   ratio {d / r:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=256, help="input side in pixels (output = 4x)")
    ap.add_argument("--steps", default="1,4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                    help="reuse: keep freed memory as the command line does; default: glibc's own behaviour")
    ap.add_argument("--compare-allocator", action="store_true", help="time both allocator settings")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = ap.parse_args()
    if args.compare_allocator:
        return compare_allocators(args)
    if args.allocator == "reuse" and not reuse_freed_memory():
        print("# note: this C library does not take the allocator setting; timing its default", file=sys.stderr)
    dtype = default_dtype(args.device)
    upscaler = Upscaler.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    results = time_upscale(upscaler, args.size, [int(s) for s in args.steps.split(",")], args.repeats)
    if args.json:
        return print(json.dumps(results))
    print(f"# {datetime.date.today()} {where}, torch {torch.__version__}, {dtype}, "
          f"{args.size}^2 -> {4 * args.size}^2, untiled, allocator {args.allocator}, best of {args.repeats}")
    for steps, t in results.items():
        print(f"steps={steps:2d}  {t['best']:7.2f} s  (median {t['median']:.2f} s)")


if __name__ == "__main__":
    main()
