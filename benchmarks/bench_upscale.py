"""Wall time of a whole upscale (encode, sampling, decode, colour fix) per step count, in ONE run.

  python benchmarks/bench_upscale.py [--checkpoint F] [--size 256] [--steps 1,4] [--device cpu]
                                     [--dtype auto|fp32|bf16] [--allocator reuse|default]
                                     [--compare-allocator | --compare realesrgan] [--previous]

The process is set up as the command line sets up its own (`--allocator reuse`, see
teasr_core/upscale/process.py), the model in the command line's precision (`--dtype auto`: per stage).
`--compare-allocator` times both allocator settings in alternating child processes of this one
run and prints their ratio. `--compare realesrgan` times Real-ESRGAN x4plus (the eval's own
implementation, in --dtype; auto: bf16 where the CPU runs it natively, else fp32) on the same image, interleaved
with the model's runs in this process, and prints each step count's time as a share of its.
`--previous` also times each step count with the defaults before 2026-12-03 (the transformer over the
whole image and in fp32 on CPUs, the condition encoded from the bicubic upscale), interleaved, and prints
the speed-up.
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

from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.upscale.pipeline import UpscaleSettings, Upscaler, native_bf16, upscale  # noqa: E402
from teasr_core.upscale.process import reuse_freed_memory  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seconds(run: Callable[[], object], cuda: bool) -> float:
    t0 = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_upscale(upscaler: Upscaler, size: int, steps: list[int], repeats: int,
                 others: dict[str, Callable[[torch.Tensor], object]] | None = None) -> dict:
    """Best and median seconds of a whole upscale (no image tile; the model's own attention window) of a random size x size image, per step count
    (and per method in `others`, timed on the same image, each round after the model's)."""
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    cuda = upscaler.device.type == "cuda"
    runs = {n: (lambda n=n: upscale(upscaler, image, UpscaleSettings(steps=n))) for n in steps}
    runs.update({name: (lambda f=f: f(image)) for name, f in (others or {}).items()})
    for run in runs.values():   # warm-up
        run()
    rounds = {key: [] for key in runs}
    for _ in range(repeats):    # interleaved, so a load change on the machine hits every method alike
        for key, run in runs.items():
            rounds[key].append(seconds(run, cuda))
    return {key: {"best": min(t), "median": sorted(t)[len(t) // 2]} for key, t in rounds.items()}


def compare_allocators(args, rounds: int = 2) -> None:
    """Best seconds per step count under each allocator setting, children alternating default/reuse."""
    best: dict[str, dict[int, float]] = {"default": {}, "reuse": {}}
    for _ in range(rounds):
        for allocator in best:
            cmd = [sys.executable, __file__, "--allocator", allocator, "--json", "--size", str(args.size),
                   "--steps", args.steps, "--device", args.device, "--repeats", str(args.repeats), "--dtype", args.dtype]
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
    ap.add_argument("--compare", choices=("realesrgan",), help="also time Real-ESRGAN x4plus, interleaved")
    ap.add_argument("--previous", action="store_true", help="also time the previous defaults (whole-image attention, "
                                                              "condition from the encoded upscale)")
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                    help="as the command line's --dtype (auto: precision per stage)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = ap.parse_args()
    if args.compare_allocator:
        return compare_allocators(args)
    if args.allocator == "reuse" and not reuse_freed_memory():
        print("# note: this C library does not take the allocator setting; timing its default", file=sys.stderr)
    dtype = DTYPES.get(args.dtype)
    upscaler = Upscaler.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    others = {}
    if args.compare == "realesrgan":
        from teasr_core.eval.baselines import load_realesrgan, realesrgan_upscale
        esrgan_dtype = dtype or (torch.bfloat16 if native_bf16(args.device) else torch.float32)   # as the model
        esrgan = load_realesrgan(args.device, esrgan_dtype)
        others[f"Real-ESRGAN x4plus ({str(esrgan_dtype)[6:]})"] = lambda image: realesrgan_upscale(esrgan, image)
    steps = [int(s) for s in args.steps.split(",")]
    if args.previous:   # the defaults until 2026-12-03: whole-image attention, encoded upscale, transformer fp32 on CPUs
        before = Upscaler.from_checkpoint(args.checkpoint, device=args.device, dtype=dtype or (
            None if args.device.startswith("cuda") else torch.float32), codec_dtype=upscaler.codec.dtype)
        for n in steps:
            previous = UpscaleSettings(steps=n, attention_tile=0, condition="upscaled")
            others[f"steps={n:2d}, previous defaults"] = lambda image, s=previous: upscale(before, image, s)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{cpu_name()} CPU ({'native bf16' if native_bf16('cpu') else 'no native bf16'}), {torch.get_num_threads()} threads"
    results = time_upscale(upscaler, args.size, steps, args.repeats, others)
    if args.json:
        return print(json.dumps(results))
    precision = f"transformer {str(upscaler.dit.compute_dtype)[6:]}, codec {str(getattr(upscaler.codec, 'dtype', 'none'))[6:]}"
    print(f"# {datetime.date.today()} {where}, torch {torch.__version__}, {precision}, "
          f"{args.size}^2 -> {4 * args.size}^2, image untiled, attention window {upscaler.sampling.attention_tile or 'whole image'} px, condition auto, allocator {args.allocator}, best of {args.repeats} (interleaved)")
    reference = results.get(next(iter(others), None)) if args.compare else None
    for key, t in results.items():
        label = f"steps={key:2d}" if isinstance(key, int) else key
        ratio = f"   {t['best'] / reference['best']:.2f}x Real-ESRGAN's time" if reference and isinstance(key, int) else ""
        if args.previous and isinstance(key, int):
            ratio += f"   {results[f'steps={key:2d}, previous defaults']['best'] / t['best']:.2f}x faster than before"
        print(f"{label:34s} {t['best']:7.2f} s  (median {t['median']:.2f} s){ratio}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
