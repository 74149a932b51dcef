"""Distil TAEF2's encoding of the x4 bicubic upscale into a head that reads the LR image itself.

  python -m train.condition_encoder --pairs data_local/pairs-cond --out runs/lr-head --steps 4000
  python -m train.condition_encoder ... --resume            # continue exactly where the last state left off
  python -m train.condition_encoder ... --export teasr_core/bundled/taef2/taef2_lr_head_x4.safetensors

The model's condition is `encode(bicubic_x4(lr))` (train.pair_cache stores it as `cond`). The head
(teasr_core.codecs.taef2.make_lr_head) replaces the encoder's layers 0-6, which run at output
resolution; layers 7-14 stay TAEF2's, frozen, so the head learns only what the upscale's first
layers compute, from 16x fewer pixels. Loss: mean squared error of the normalised latent (unit
variance per channel), so the printed number reads as a share of the latent's variance. The last
`--val` pairs of the cache are never trained on; their loss is printed at every log step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from teasr_core.codecs.taef2 import LR_SCALE, TAEF2Codec, make_lr_head
from teasr_core.upscale.pipeline import native_bf16

from .codec_run import CodecRun, hold_out
from .pair_cache import CachedPairs


def trainable_codec() -> TAEF2Codec:
    """TAEF2 (frozen, fp32) with a fresh LR head to train: its `encode_lr` is the model being trained."""
    codec = TAEF2Codec()
    codec.lr_head, codec.lr_scale = make_lr_head().to(memory_format=torch.channels_last), LR_SCALE
    return codec


def split(pairs: CachedPairs, val: int) -> dict[str, torch.Tensor]:
    """The last `val` pairs, taken out of the training pool, as LR images and condition latents."""
    held = hold_out(pairs, val)
    return {"lr": held["lr"].float() / 255, "cond": held["cond"].float()}


@torch.no_grad()
def validate(codec: TAEF2Codec, held: dict[str, torch.Tensor], autocast: bool, batch: int = 64) -> float:
    total = 0.0
    for i in range(0, len(held["lr"]), batch):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = codec.encode_lr(held["lr"][i:i + batch])
        total += (out - held["cond"][i:i + batch]).square().sum().item()
    return total / held["cond"].numel()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.condition_encoder", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", required=True, help="pair cache folder(s) made with --codec taef2")
    ap.add_argument("--out", type=Path, required=True, help="run folder: states, log.jsonl")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to 1 %%)")
    ap.add_argument("--val", type=int, default=256, help="pairs held out for validation")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 autocast where the CPU runs it natively (teasr_core.upscale.pipeline.native_bf16)")
    ap.add_argument("--stop-at", type=int, help="save and stop at this step (the schedule still runs to --steps); "
                                                "--resume continues")
    ap.add_argument("--resume", action="store_true", help="continue from the newest state in --out")
    ap.add_argument("--export", type=Path, help="write the head's weights (fp16 safetensors) and stop")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    autocast = args.precision == "bf16" or (args.precision == "auto" and native_bf16("cpu"))

    codec = trainable_codec()
    pairs = CachedPairs(args.pairs, batch_size=args.batch, seed=args.seed)
    held = split(pairs, args.val)
    run = CodecRun(args.out, "head", codec.lr_head, pairs, lr=args.lr, steps=args.steps)
    if args.resume or args.export:
        run.restore("export" if args.export else "resume")
    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in codec.lr_head.state_dict().items()}, str(args.export),
                  metadata={"what": "TEASR LR head for TAEF2 (teasr_core.codecs.taef2.make_lr_head), x4",
                            "trained_steps": str(run.step), "val_mse": f"{validate(codec, held, False):.5f}"})
        print(f"wrote {args.export} (step {run.step})")
        return

    last = min(args.steps, args.stop_at or args.steps)
    while run.step < last:
        batch = next(pairs)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = codec.encode_lr(batch["lr"])
        loss = (out - batch["cond"]).square().mean()
        run.update(loss)
        if run.step % args.log_every == 0 or run.step == last:
            run.record({"loss": round(loss.item(), 5), "val_mse": round(validate(codec, held, autocast), 5)},
                       args.log_every)
        if run.step % args.save_every == 0 or run.step == last:
            run.save()


if __name__ == "__main__":
    main()
