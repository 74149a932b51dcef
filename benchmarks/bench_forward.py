"""Forward time of a preset next to ComfyUI 0.3.75's own QwenImageTransformer2DModel, in ONE run.

Ours gets `tokens` noise + `tokens` LR tokens + `context` context tokens (the dual LoRA active);
ComfyUI's model gets the same 2 * tokens image tokens + context tokens. Random weights, bf16 on CUDA.
Also reports FLOPs per token-matmul (modulation counted once per sample) and % of a matmul ceiling.

  python benchmarks/bench_forward.py --preset qwen-image --side 128 --context 32 --lora-rank 128 [--fp8]
  (--side 128 -> a 128x128 latent = 1024^2 output with an 8x VAE -> 64x64 = 4096 noise + 4096 LR tokens)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from teasr_core.network.lora import dual_lora_layers  # noqa: E402
from teasr_core.network.model import DualBranchDiT, count_parameters, preset  # noqa: E402


def comfy_model(cfg, device, dtype):
    comfy_dir = Path(os.environ.get("TEASR_COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args
    args.cpu = device.type == "cpu"
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    with torch.device("meta"):
        m = QwenImageTransformer2DModel(patch_size=cfg.patch, in_channels=cfg.in_channels * 4,
                                        out_channels=cfg.in_channels, num_layers=cfg.depth,
                                        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                                        joint_attention_dim=cfg.context_dim or cfg.width,
                                        axes_dims_rope=cfg.rope_axes, operations=comfy.ops.disable_weight_init)
    return m.to_empty(device=device).to(dtype).eval()


def init_random(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.normal_(0, 0.02)


def timed(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def matmul_flops(cfg, image_tokens: int, context_tokens: int) -> float:
    """2 * params * tokens for the per-token Linears of both streams, plus attention (QK^T and AV)."""
    d, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
    per_stream = 4 * d * d + 2 * d * h                     # q, k, v, out + MLP
    linear = 2 * cfg.depth * per_stream * (image_tokens + context_tokens)
    linear += 2 * (cfg.in_channels * cfg.patch ** 2) * d * image_tokens * 2  # img_in on all, proj_out ~
    total = image_tokens + context_tokens
    attention = 4 * cfg.depth * total * total * d
    return linear + attention


def time_forward(preset_name: str, side: int, context: int, lora_rank: int, *, fp8: bool = False,
                 comfy: bool = True, iters: int = 5, on_row=None) -> dict:
    """Seconds per forward of ours (dual LoRA active; fp8 base if asked) and of ComfyUI's model fed the
    same number of image tokens; `on_row(row)` sees each row as soon as it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(preset_name, lora_ranks=(lora_rank, lora_rank))
    ctx_dim = cfg.context_dim or cfg.width
    tokens = (side // cfg.patch) ** 2
    x = torch.randn(1, cfg.in_channels, side, side, device=device, dtype=dtype)
    cond, ctx = torch.randn_like(x), torch.randn(1, context, ctx_dim, device=device, dtype=dtype)
    sigma, target = torch.tensor([0.7], device=device), torch.tensor([0.0], device=device)
    rows = []

    def add(label, model, seconds):
        rows.append({"model": label, "params": count_parameters(model), "seconds": seconds})
        if on_row:
            on_row(rows[-1])

    with torch.device("meta"):
        ours = DualBranchDiT(cfg)
    ours = ours.to_empty(device=device).to(dtype).eval()
    init_random(ours)
    if fp8:
        ours.quantize_base_fp8()
    with torch.inference_mode():
        seconds = timed(partial(ours, x, cond, sigma, target, ctx), 2, iters, device)
    add("teasr dual-branch" + (" fp8" if fp8 else ""), ours, seconds)
    if fp8:   # the opt-in real fp8 matmul (torch._scaled_mm) where the GPU has fp8 units, same model
        for _, layer in dual_lora_layers(ours):
            layer.fp8_matmul = True
        with torch.inference_mode():
            add("teasr dual-branch fp8 scaled_mm", ours, timed(partial(ours, x, cond, sigma, target, ctx), 2, iters, device))
    del ours                                                # room for the second 20 B model
    if comfy:
        ref = comfy_model(cfg, device, dtype)
        init_random(ref)
        x2 = torch.cat([x, cond], -1)[:, :, None]          # same number of image tokens: 2 * tokens
        with torch.inference_mode():
            add("comfyui QwenImageTransformer2DModel", ref, timed(partial(ref, x2, sigma, ctx), 2, iters, device))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dtype), "torch": torch.__version__, "image_tokens": 2 * tokens,
            "context": context, "lora_rank": lora_rank, "flops": matmul_flops(cfg, 2 * tokens, context), "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen-image")
    ap.add_argument("--side", type=int, default=128, help="latent side before patching (128 -> 1024^2 output)")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--no-comfy", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=776.0, help="bf16 matmul ceiling for the % column")
    args = ap.parse_args()
    result = time_forward(args.preset, args.side, args.context, args.lora_rank, fp8=args.fp8,
                          comfy=not args.no_comfy, iters=args.iters)
    rows, flops = result["rows"], result["flops"]
    print(f"# {datetime.date.today()} {result['device']} torch {torch.__version__} {result['dtype']} "
          f"preset={args.preset} image tokens={result['image_tokens']} context={args.context} lora rank={args.lora_rank}")
    for row in rows:
        sec = row["seconds"]
        print(f"{row['model']:40s} params={row['params'] / 1e9:.2f}B  {sec:.4f} s  "
              f"{flops / sec / 1e12:.1f} TFLOP/s ({100 * flops / sec / 1e12 / args.peak_tflops:.0f}% of {args.peak_tflops:.0f})")
    if len(rows) == 2:
        print(f"speed ratio comfyui/ours = {rows[1]['seconds'] / rows[0]['seconds']:.3f} (>= 1.0: ours is at least as fast)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
