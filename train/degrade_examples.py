"""Write degraded example pairs for eyeballing the degradation.

    python -m train.degrade_examples --data DIR --out DIR [--n 8] [--seed 0] [--crop 256]

Each `pair_NN.png` shows, left to right: the LR enlarged with nearest neighbour (its real pixels),
the bicubic-upsampled LR the model is conditioned on, and the HR crop. `lr_NN.png` is the LR itself.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import PairStream, upsample_lr


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of HR photos (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--n", type=int, default=8, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args(argv)

    stream = PairStream(args.data, crop=args.crop, batch_size=args.n, seed=args.seed, cache=False)
    start = time.perf_counter()
    lr, hr = next(stream)
    print(f"loaded and degraded {args.n} crops of {args.crop} px in {time.perf_counter() - start:.2f} s")
    scale = stream.degradation.scale
    lr_nearest = F.interpolate(lr, scale_factor=scale, mode="nearest")
    lr_up = upsample_lr(lr, scale)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        panel = torch.cat([lr_nearest[i], lr_up[i], hr[i]], dim=-1)
        Image.fromarray(_to_uint8(panel)).save(out / f"pair_{i:02d}.png")
        Image.fromarray(_to_uint8(lr[i])).save(out / f"lr_{i:02d}.png")
    print(f"wrote {args.n} pairs to {out}")


if __name__ == "__main__":
    main()
