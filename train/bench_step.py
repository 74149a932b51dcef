"""Cost of ONE distillation step, TEASR vs TAD-SR, in the same process: seconds/step and peak memory.

    python -m train.bench_step --preset qwen-image --resolution 512 --rank 128 --fp8 --grad-ckpt
    python -m train.bench_step --preset tiny --resolution 64 --rank 4 --fp8      # CPU smoke test

Both objectives run the trainer's own step (`Trainer.train_step`) on a fresh init of the preset with
LoRA rank r on both branches, on random HR images (LR = 4x area downscale). On CUDA the frozen base
is bf16 (fp8 with --fp8) under bf16 autocast; peak memory is torch.cuda.max_memory_allocated over
the step, weights and optimizer state included. On CPU the memory column is the process's peak RSS
(cumulative over the run, so only the first objective's figure is its own).

Latents: the pixel codec at scale 8 (`--pixel-scale`), which gives the token count of a VAE-f8
latent (512 px -> 32 x 32 tokens per branch with patch 2); the model's input layer is sized to it.
TEASR's pixel terms then decode by pixel-shuffle, so a real VAE decoder's backward is not counted.
Presets with a text stream get `--context-tokens` random context tokens.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from teasr_core.formats.text_features import save_text_features
from teasr_core.network.lora import dual_lora_layers
from teasr_core.network.model import preset

from .config import TrainConfig
from .distill import Dist, Trainer, make_optimizer


def bench(cfg: TrainConfig, device: torch.device, warmup: int, repeat: int) -> dict:
    """Median seconds and max peak memory over `repeat` steps after `warmup` steps."""
    trainer = Trainer(cfg, Dist(device=device))
    generator = torch.Generator(device).manual_seed(0)
    hr = torch.rand(cfg.batch, 3, cfg.crop, cfg.crop, generator=generator, device=device)
    lr = F.avg_pool2d(hr, cfg.scale)
    rows = [trainer.train_step([(lr, hr)]) for _ in range(warmup + repeat)][warmup:]
    result = {
        "objective": cfg.objective,
        "trained_M": sum(p.numel() for p in trainer.params) / 1e6,
        "passes": " ".join(f"{k}={v}" for k, v in rows[-1].items() if k.startswith(("fwd_", "enc_"))),
        "sec_per_step": statistics.median(r["sec_per_step"] for r in rows),
        "peak_GB": max(r.get("peak_mem_mb", r.get("peak_rss_mb", 0)) for r in rows) / 1024,
        "lpips": cfg.objective == "teasr" and trainer.lpips is not None,
    }
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def random_context(preset_name: str, folder: Path, tokens: int) -> str:
    """A context file of `tokens` random text features for presets with a text stream ("" for the others)."""
    context_dim = preset(preset_name).context_dim
    if not context_dim:
        return ""
    return str(save_text_features(folder / "context.safetensors", torch.randn(tokens, context_dim)))


def compare(preset_name: str, resolution: int, *, device: torch.device, batch: int = 1, rank: int = 128,
            fp8: bool = False, grad_ckpt: bool = False, pixel_scale: int = 8, context_tokens: int = 32,
            teacher_steps: int = 4, rcgm_substeps: int = 2, objectives=("teasr", "tadsr"), warmup: int = 1,
            repeat: int = 3, on_result=None) -> list[dict]:
    """`bench` of each objective on the same preset and settings; `on_result` sees each result as it comes."""
    lora = dict(full_finetune=False, lora_ranks=(rank, rank)) if rank else dict(full_finetune=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        context_file = random_context(preset_name, Path(tmp), context_tokens)
        for objective in objectives:
            cfg = TrainConfig(preset=preset_name, objective=objective, crop=resolution, batch=batch,
                              pixel_scale=pixel_scale, fp8_base=fp8, gradient_checkpointing=grad_ckpt,
                              base_dtype="bf16" if device.type == "cuda" else "fp32", context_file=context_file,
                              teacher_steps=teacher_steps, rcgm_substeps=rcgm_substeps,
                              sample_every=0, out=tmp, **lora)
            results.append(bench(cfg, device, warmup, repeat))
            if on_result:
                on_result(results[-1])
    return results


# the step as measured on the H200 on 2026-11-30, and what each option of the faster step adds to it
BEFORE = dict(stack_passes=False, backward_per_group=False, checkpoint_decoder=False, fuse_lora_down=False,
              fp8_matmul=True)
VARIANTS = {"before": BEFORE, "after": {}, "after+rmsprop": dict(optimizer="rmsprop"),
            "after+rmsprop+compile": dict(optimizer="rmsprop", compile_blocks=True)}


def apply_options(trainer: Trainer, cfg: TrainConfig) -> None:
    """Switch a built trainer to `cfg`'s step options (schedule, LoRA products, compiled blocks)."""
    if cfg.optimizer != trainer.cfg.optimizer:
        trainer.optimizer = make_optimizer(cfg, trainer.params, trainer.env.device)
    trainer.cfg = trainer.objective.cfg = cfg
    for _, layer in dual_lora_layers(trainer.dit):
        layer.fuse_down, layer.fp8_matmul = cfg.fuse_lora_down, cfg.fp8_matmul
    if cfg.compile_blocks:
        for block in trainer.dit.transformer_blocks:
            block.compile(dynamic=False)


def profile_step(trainer: Trainer, batch) -> dict:
    """Seconds of one step by kind: compute kernels, copies (memcpy/memset), idle (wall minus busy), and
    the codec decode and LPIPS (their kernels, from the objective's named ranges)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = trainer.env.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        trainer.train_step([batch])
        wall = time.perf_counter() - start
    compute = copies = 0.0
    ranges = {}
    for e in prof.key_averages():
        if e.key in ("teasr.decode", "teasr.lpips"):
            ranges[e.key.removeprefix("teasr.")] = (e.device_time_total if cuda else e.cpu_time_total) / 1e6
        elif cuda and e.device_type.name == "CUDA":
            kind = "copy" if any(w in e.key for w in ("Memcpy", "Memset", "copy_kernel")) else "compute"
            seconds = e.self_device_time_total / 1e6
            copies, compute = (copies + seconds, compute) if kind == "copy" else (copies, compute + seconds)
    if not cuda:   # the CPU runs its kernels in the step's own thread: no device timeline to split
        compute = wall
    return {"wall_s": wall, "compute_s": compute, "copies_s": copies, "idle_s": max(0.0, wall - compute - copies),
            "decode_s": ranges.get("decode", 0.0), "lpips_s": ranges.get("lpips", 0.0)}


def compare_variants(preset_name: str, resolution: int, *, device: torch.device, rank: int = 128, fp8: bool = True,
                     grad_ckpt: bool = True, variants: dict = VARIANTS, pixel_scale: int = 8, context_tokens: int = 32,
                     warmup: int = 1, repeat: int = 2, profile: bool = True, on_result=None) -> list[dict]:
    """The TEASR step under each variant's options, one model built once (a 20 B model takes long to
    build): seconds and peak memory, and a profile of one step per variant (compiled variants after
    their warm-up). `on_result` sees each result as it comes."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        context_file = random_context(preset_name, Path(tmp), context_tokens)
        base = TrainConfig(preset=preset_name, crop=resolution, batch=1, pixel_scale=pixel_scale, fp8_base=fp8,
                           gradient_checkpointing=grad_ckpt, base_dtype="bf16" if device.type == "cuda" else "fp32",
                           context_file=context_file, sample_every=0, out=tmp, full_finetune=False,
                           lora_ranks=(rank, rank))
        trainer = Trainer(base, Dist(device=device))
        generator = torch.Generator(device).manual_seed(0)
        hr = torch.rand(1, 3, resolution, resolution, generator=generator, device=device)
        batch = (F.avg_pool2d(hr, 4), hr)
        for name, overrides in variants.items():
            apply_options(trainer, replace(base, **overrides))
            rows = [trainer.train_step([batch]) for _ in range(warmup + repeat)][warmup:]
            result = {"objective": "teasr", "variant": name, "options": overrides,
                      "passes": " ".join(f"{k}={v}" for k, v in rows[-1].items() if k.startswith(("fwd_", "calls_"))),
                      "sec_per_step": statistics.median(r["sec_per_step"] for r in rows),
                      "peak_GB": max(r.get("peak_mem_mb", r.get("peak_rss_mb", 0)) for r in rows) / 1024,
                      "lpips": trainer.lpips is not None}
            if profile:
                result["profile"] = profile_step(trainer, batch)
            results.append(result)
            if on_result:
                on_result(result)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.bench_step", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--resolution", type=int, default=512, help="HR crop side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=128, help="LoRA rank per branch; 0 = full fine-tune")
    ap.add_argument("--fp8", action="store_true", help="fp8 e4m3 storage of the frozen base")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--pixel-scale", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=32, help="random context tokens for text-stream presets")
    ap.add_argument("--teacher-steps", type=int, default=4, help="TAD-SR teacher rollout steps")
    ap.add_argument("--rcgm-substeps", type=int, default=2)
    ap.add_argument("--objectives", default="teasr,tadsr")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-threads", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = compare(args.preset, args.resolution, device=device, batch=args.batch, rank=args.rank, fp8=args.fp8,
                      grad_ckpt=args.grad_ckpt, pixel_scale=args.pixel_scale, context_tokens=args.context_tokens,
                      teacher_steps=args.teacher_steps, rcgm_substeps=args.rcgm_substeps,
                      objectives=args.objectives.split(","), warmup=args.warmup, repeat=args.repeat)
    memory = "peak CUDA GB" if device.type == "cuda" else "peak RSS GB"
    print(f"\n{args.preset} @ {args.resolution}px, batch {args.batch}, LoRA rank {args.rank or 'full'}, "
          f"fp8 {'on' if args.fp8 else 'off'}, grad-ckpt {'on' if args.grad_ckpt else 'off'}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    header = f"{'objective':<10} {'trained M':>10} {'sec/step':>9} {memory:>13}  passes per step"
    print(header + "\n" + "-" * (len(header) + 30))
    for r in results:
        note = "" if r["objective"] != "teasr" or r["lpips"] else "  (LPIPS off: no weights)"
        print(f"{r['objective']:<10} {r['trained_M']:>10.2f} {r['sec_per_step']:>9.3f} {r['peak_GB']:>13.2f}  "
              f"{r['passes']}{note}")
    if len(results) == 2 and device.type == "cuda":
        teasr, tadsr = results
        print(f"TEASR / TAD-SR: memory x{teasr['peak_GB'] / tadsr['peak_GB']:.2f}, "
              f"time x{teasr['sec_per_step'] / tadsr['sec_per_step']:.2f}")


if __name__ == "__main__":
    main()
