"""A crop across tile borders: tiled | untiled | |difference| x 16, to look for seams.

  python benchmarks/seam_crop.py PHOTO OUT.png [--checkpoint F] [--tile 1024] [--overlap 128] [--crop 256]

Upscales PHOTO x4 twice with the same seed: the transformer in tiles (the CLI's auto tiling above
1536 px) and in one piece, then cuts `crop` px around the first interior tile corner of the tiled
plan from both and from their difference. Encode, decode and colour fix stream in both runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.upscale.imageio import read_image, write_image  # noqa: E402
from teasr_core.upscale.pipeline import UpscaleSettings, Upscaler, plan_for, upscale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("photo", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--crop", type=int, default=256)
    args = ap.parse_args()
    upscaler = Upscaler.from_checkpoint(args.checkpoint)
    image = read_image(args.photo).rgb
    tiled_settings = UpscaleSettings(tile=args.tile, tile_overlap=args.overlap)
    tiled, whole = upscale(upscaler, image, tiled_settings), upscale(upscaler, image, UpscaleSettings())
    h, w = tiled.shape[-2:]
    tiles, _ = plan_for(upscaler, (h // upscaler.codec.scale, w // upscaler.codec.scale), tiled_settings)
    corner = min((t for t in tiles if t.y0 and t.x0), key=lambda t: (t.y0, t.x0))   # tile borders cross here
    cy, cx = corner.y0 * upscaler.codec.scale, corner.x0 * upscaler.codec.scale
    y0, x0 = max(0, cy - args.crop // 2), max(0, cx - args.crop // 2)
    window = (..., slice(y0, y0 + args.crop), slice(x0, x0 + args.crop))
    diff = (tiled - whole).abs()
    strip = torch.cat([tiled[window], whole[window], (diff[window] * 16).clamp(0, 1)], -1)
    write_image(args.out, strip)
    print(f"{args.photo.name}: {h}x{w} output, crop at ({y0}, {x0}) around the tile corner ({cy}, {cx}); "
          f"|tiled - untiled| mean {diff.mean() * 255:.2f}/255, in the crop {diff[window].mean() * 255:.2f}/255")


if __name__ == "__main__":
    main()
