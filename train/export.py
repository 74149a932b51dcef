"""Re-save a trained checkpoint for shipping: the same model in fp16 (half the bytes), metadata kept.

  python -m train.export runs/small-stage1/checkpoints/step-00001200.safetensors \
      teasr_core/bundled/teasr-small.safetensors [--dtype fp16] [--end-ratio 0.85] [--attention-tile 384]

The trainer writes fp32 checkpoints (EMA weights when on); the bundled default is the same file in
fp16, which the loaders cast back to the compute dtype. The file loads in the CLI and the Loader
like any checkpoint the trainer writes. `--end-ratio` and `--attention-tile` / `--attention-overlap`
record the sampling grid and the transformer window the model was measured best with (its `sampling`
metadata, teasr_core.sampling.ModelSampling); the samplers use them unless told otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from teasr_core.formats.checkpoint import save_checkpoint
from teasr_core.formats.load import load_checkpoint
from teasr_core.sampling import ModelSampling

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="a full checkpoint written by train.distill")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--end-ratio", type=float, help="recommended multi-step end ratio to record (default: keep "
                                                   "the input's)")
    ap.add_argument("--attention-tile", type=int, help="recommended transformer window in output px, 0 = none "
                                                       "(default: keep the input's)")
    ap.add_argument("--attention-overlap", type=int, help="output px between those windows (default: keep the input's)")
    args = ap.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    if loaded.meta["kind"] != "full":
        raise SystemExit(f"{args.checkpoint} is a LoRA delta; export needs a full checkpoint")
    training = {"exported_from": args.checkpoint.name, **loaded.meta.get("training", {})}
    sampling = dict(loaded.meta.get("sampling") or {})
    for key in ("end_ratio", "attention_tile", "attention_overlap"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    try:
        ModelSampling.from_metadata(sampling)
    except ValueError as e:
        raise SystemExit(f"unusable sampling settings {sampling}: {e}") from None
    save_checkpoint(args.out, loaded.dit, loaded.codec, preset=loaded.meta.get("preset"), training=training,
                    sampling=sampling, dtype=DTYPES[args.dtype], codec_tensors=loaded.codec_tensors)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {args.dtype})")


if __name__ == "__main__":
    main()
