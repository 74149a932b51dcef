"""The step dial in one picture: the same crops at 1, 2, 4 and 8 steps beside bicubic, Real-ESRGAN x4plus and HR.

    python benchmarks/dial_figure.py --hr astronaut.png coffee.png --out docs/dial.png
    python benchmarks/dial_figure.py --lr ../shared/data/RealSet65/*.jpg --out out/dial-web.png --steps 1,4

`--hr` photos are degraded here into small, heavily compressed web JPEGs (x4 smaller, JPEG quality
`--quality`), the HR kept as the last column; `--lr` photos are used as they are (no HR column). Each
row is one photo's crop (`--crop` output px, at its centre or `--at Y,X`), each column a method,
labelled with its NIQE over the whole output (lower = more natural; `teasr_core.eval.niqe`).
Needs the converted Real-ESRGAN / NIQE weights (`bash scripts/setup.sh test`). The shared evaluation
images are research-only: render them locally, never commit the result.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.eval import weights  # noqa: E402
from teasr_core.eval.evaluate import baseline_methods, quantise_8bit  # noqa: E402
from teasr_core.eval.metrics import NIQE_WEIGHTS  # noqa: E402
from teasr_core.eval.niqe import niqe  # noqa: E402
from teasr_core.upscale.imageio import read_image  # noqa: E402
from teasr_core.upscale.pipeline import Upscaler, UpscaleSettings, upscale  # noqa: E402

LABEL_HEIGHT = 28   # two lines of PIL's default font: method, NIQE


def web_jpeg(hr: torch.Tensor, quality: int) -> torch.Tensor:
    """HR [1, 3, H, W] -> what a web page would serve: x4 smaller (antialiased bicubic), JPEG at `quality`."""
    h, w = hr.shape[-2] // 4 * 4, hr.shape[-1] // 4 * 4
    image = Image.fromarray(to_uint8(hr[..., :h, :w])).resize((w // 4, h // 4), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def labelled(panel: torch.Tensor, text: str) -> Image.Image:
    image = Image.fromarray(to_uint8(panel))
    out = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    out.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(out).multiline_text((3, 2), text, fill="black", spacing=2)
    return out


def crop_box(shape, crop: int, at: tuple[int, int] | None) -> tuple[int, int]:
    h, w = shape[-2:]
    top, left = at if at else ((h - crop) // 2, (w - crop) // 2)
    return max(0, min(top, h - crop)), max(0, min(left, w - crop))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--hr", nargs="+", type=Path, help="HR photos, degraded here into small web JPEGs")
    group.add_argument("--lr", nargs="+", type=Path, help="LR photos used as they are")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", help="TEASR checkpoint (default: the bundled model)")
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--quality", type=int, default=30, help="JPEG quality of the degraded --hr inputs")
    ap.add_argument("--crop", type=int, default=160, help="crop side in output px")
    ap.add_argument("--at", type=lambda s: tuple(int(v) for v in s.split(",")), help="crop's top,left (output px)")
    ap.add_argument("--no-realesrgan", action="store_true")
    ap.add_argument("--dtype", choices=("auto", "fp32"), default="fp32")
    args = ap.parse_args(argv)

    upscaler = Upscaler.from_checkpoint(args.checkpoint, dtype=torch.float32 if args.dtype == "fp32" else None)
    methods = baseline_methods(["bicubic"] + ([] if args.no_realesrgan else ["realesrgan"]), "cpu")
    methods = {("Real-ESRGAN" if name.startswith("Real-ESRGAN") else name): run for name, run in methods.items()}
    for k in (int(s) for s in args.steps.split(",")):
        methods[f"TEASR {k} step{'s' if k > 1 else ''}"] = \
            lambda lr, k=k: upscale(upscaler, lr, UpscaleSettings(steps=k))
    pristine = load_file(str(weights.weights_path(NIQE_WEIGHTS)))
    rows = []
    for path in args.hr or args.lr:
        hr = read_image(path).rgb if args.hr else None
        lr = web_jpeg(hr, args.quality) if hr is not None else read_image(path).rgb
        outputs = {name: quantise_8bit(run(lr)) for name, run in methods.items()}
        if hr is not None:
            outputs["HR"] = hr[..., :lr.shape[-2] * 4, :lr.shape[-1] * 4]
        scores = {name: float(niqe(out, pristine)) for name, out in outputs.items()}
        top, left = crop_box(outputs["bicubic"].shape, args.crop, args.at)
        panels = [labelled(out[..., top:top + args.crop, left:left + args.crop], f"{name}\nNIQE {scores[name]:.2f}")
                  for name, out in outputs.items()]
        row = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
        for i, panel in enumerate(panels):
            row.paste(panel, (i * panels[0].width, 0))
        rows.append(row)
        print(path.name, "NIQE", {name: round(v, 2) for name, v in scores.items()}, flush=True)
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * rows[0].height))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
