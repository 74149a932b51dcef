"""Train the bundled default model further on a lent GPU, in one call of the device tool (issue 19).

A lease carries at most 64 MiB (the tracked tree, ~38 MB, counts), reaches no registry, and returns
files of at most 16 MiB; the model file is 29 MB. So the work is cut in three:

    python scripts/gpu_train_default.py --prepare             # here: fills .cache/gpu-train/ (git-ignored)
    # device tool, carry [".cache/gpu-train"], timeout_s 600:
    python scripts/gpu_train_default.py --out $OUT            # there: installs, trains, writes the model in parts
    python scripts/gpu_train_default.py --join DIR --to runs/gpu-default.safetensors   # here: one model file again

The carried folder holds the wheels the GPU image lacks (kornia, kornia-rs for its Python 3.12), the
LPIPS-VGG weights stored per-channel int8 (15 MB instead of 59; dequantised there, a training loss
needs no more), and as many training-pool photos as the rest of the 64 MiB allows. There the trainer
runs `train/configs/small-perceptual-gpu.toml` for `--budget` seconds and is stopped by SIGINT (it
writes a checkpoint on the signal); the newest checkpoint leaves in parts of at most 15 MiB.
`--smoke` runs the same path on the CPU at tiny shapes (tests/test_gpu_train_default.py).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".cache" / "gpu-train"
CONFIG = REPO / "train" / "configs" / "small-perceptual-gpu.toml"
POOL = REPO.parent / "shared" / "data" / "train_pool"
LEASE_BYTES = 64 * 2**20
MARGIN_BYTES = 2**20                                            # untracked notes, the tree's growth
PART_BYTES = 15 * 2**20
WHEELS = ("kornia==0.9.0", "kornia-rs==0.2.0")
PYTHON = "3.12"                                                 # the GPU image's (device KINDS.md)
LPIPS_VGG = "vgg16_lpips.safetensors"
PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg"}


def quantise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv weights as int8 with one float32 scale per output channel (`<key>.scale`); the rest as is."""
    out = {}
    for key, value in tensors.items():
        if value.ndim == 4 and value.shape[0] > 1:
            scale = value.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127
            out[key], out[f"{key}.scale"] = (value / scale).round().to(torch.int8), scale.float()
        else:
            out[key] = value
    return out


def dequantise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.float() * tensors[f"{key}.scale"] if f"{key}.scale" in tensors else value
            for key, value in tensors.items() if not key.endswith(".scale")}


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def prepare(dest: Path, weights_dir: Path, pool: Path, wheels: bool, photo_bytes: int | None = None) -> None:
    """Fill `dest` with what the lease carries; photos, drawn from the whole pool, take what the 64 MiB leave
    (or `photo_bytes`)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "wheels").mkdir(parents=True)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", PYTHON, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "--dest", str(dest / "wheels"), *WHEELS], check=True)
    save_file(quantise(load_file(str(weights_dir / LPIPS_VGG))), str(dest / f"{LPIPS_VGG}.int8"))
    used, tracked = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()), tracked_bytes()
    budget = photo_bytes if photo_bytes is not None else LEASE_BYTES - MARGIN_BYTES - tracked - used
    photos = sorted(p for p in pool.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    random.Random(0).shuffle(photos)                     # every part of the pool, not the first folder's photos
    (dest / "photos").mkdir()
    taken = 0
    for photo in photos:
        if taken + photo.stat().st_size > budget:
            continue
        shutil.copy2(photo, dest / "photos" / f"{photo.parent.name}-{photo.name}")
        taken += photo.stat().st_size
    total = used + taken
    print(f"{dest}: {len(list((dest / 'photos').iterdir()))} of {len(photos)} photos, "
          f"{total / 2**20:.1f} MiB carried + {tracked / 2**20:.1f} MiB tracked (lease: 64 MiB)")


def bring(carry: Path, scratch: Path) -> dict:
    """There: the environment the trainer runs in (wheels installed if missing, LPIPS-VGG dequantised)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        import kornia  # noqa: F401
    except ImportError:
        site = scratch / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, sorted((carry / "wheels").glob("*.whl")))], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    (scratch / "weights").mkdir(parents=True, exist_ok=True)
    save_file(dequantise(load_file(str(carry / f"{LPIPS_VGG}.int8"))), str(scratch / "weights" / LPIPS_VGG))
    env["TEASR_CACHE"] = str(scratch)
    return env


def train(carry: Path, scratch: Path, budget_s: float, extra: list[str]) -> Path:
    """Run the trainer until it finishes or `budget_s` passes (then SIGINT: it saves and stops); the newest checkpoint."""
    env, run = bring(carry, scratch), scratch / "run"
    cmd = [sys.executable, "-m", "train.distill", "--config", str(CONFIG), "--data", str(carry / "photos"),
           "--out", str(run), "--no-resume", *extra]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait()
    checkpoints = sorted((run / "checkpoints").glob("step-*.safetensors"))
    if proc.returncode not in (0, -signal.SIGINT) or not checkpoints:
        raise SystemExit(f"the trainer failed (exit code {proc.returncode}); see {run / 'train.log'}")
    return checkpoints[-1]


def split(checkpoint: Path, out: Path) -> list[Path]:
    """The checkpoint's tensors in files of at most PART_BYTES; part 0 carries the metadata."""
    with safe_open(str(checkpoint), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    parts, current, size = [], {}, 0
    for key in keys:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > PART_BYTES:
            parts.append(current)
            current, size = {}, 0
        current[key], size = tensors[key], size + nbytes
    parts.append(current)
    paths = []
    for i, part in enumerate(parts):
        paths.append(out / f"{checkpoint.stem}.part{i:02d}.safetensors")
        save_file(part, str(paths[-1]), metadata=metadata if i == 0 else None)
    return paths


def join(folder: Path, to: Path) -> None:
    """The parts `split` wrote, as one checkpoint file again (same tensors, same metadata)."""
    parts = sorted(folder.glob("*.part[0-9][0-9].safetensors"))
    if not parts:
        raise SystemExit(f"no *.partNN.safetensors in {folder}")
    with safe_open(str(parts[0]), "pt") as f:
        metadata = f.metadata()
    tensors = {}
    for part in parts:
        tensors.update(load_file(str(part)))
    to.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(to), metadata=metadata)
    print(f"wrote {to} ({to.stat().st_size / 1e6:.1f} MB, {len(tensors)} tensors from {len(parts)} parts)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_train_default.py", description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="here: fill --carry from the registries and the pool")
    ap.add_argument("--carry", type=Path, default=CARRY, help="the carried folder")
    ap.add_argument("--weights", type=Path, default=Path(os.environ.get("TEASR_CACHE", REPO / ".cache")) / "weights",
                    help="the converted perceptual weights (set-up's)")
    ap.add_argument("--pool", type=Path, default=POOL, help="the training pool (../shared/data/train_pool)")
    ap.add_argument("--out", type=Path, help="there: where the model's parts and the training log go ($OUT)")
    ap.add_argument("--budget", type=float, default=420, help="seconds of training before the trainer is stopped")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/teasr-gpu-train"))
    ap.add_argument("--join", type=Path, help="here: the folder the parts came back to")
    ap.add_argument("--to", type=Path, help="the model file --join writes")
    ap.add_argument("--smoke", action="store_true", help="the same path on the CPU at tiny shapes, no wheels")
    args, extra = ap.parse_known_args(argv)
    if args.join:
        if not args.to:
            ap.error("--join needs --to")
        join(args.join, args.to)
    elif args.prepare:
        prepare(args.carry, args.weights, args.pool, wheels=not args.smoke,
                photo_bytes=2 * 2**20 if args.smoke else None)
    elif args.out:
        if args.smoke:
            extra = ["--device", "cpu", "--batch", "4", "--crop", "128", "--max-steps", "2", "--cpu-threads", "1", *extra]
        started = time.monotonic()
        checkpoint = train(args.carry, args.scratch, args.budget, extra)
        args.out.mkdir(parents=True, exist_ok=True)
        parts = split(checkpoint, args.out)
        for log in ("metrics.jsonl", "train.log"):
            shutil.copy2(checkpoint.parents[1] / log, args.out / log)
        print(f"{checkpoint.name}: {len(parts)} parts in {args.out} after {time.monotonic() - started:.0f} s", flush=True)
    else:
        ap.error("one of --prepare, --out, --join")


if __name__ == "__main__":
    main()
