"""Command line: `python -m teasr_core upscale IN OUT [options]` (files or directories)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .formats.text_features import load_text_features
from .sampling import MODES
from .upscale.color import COLOR_FIX_METHODS
from .upscale.imageio import (DEFAULT_MAX_MEGAPIXELS, IMAGE_EXTENSIONS, LIMIT_FLAG, ImageCanvas, ImageReadError, Photo,
                              output_format, read_image)
from .upscale.pipeline import (CONDITIONS, Upscaler, bicubic_rows, count_model_calls, upscale, upscale_into,
                              upscale_settings)
from .upscale.process import replace_pillow_size_check, reuse_freed_memory

AUTO_TILE_ABOVE = 1536  # output side (px) above which --tile-size auto tiles
AUTO_TILE = 1024


def add_upscale_options(p: argparse.ArgumentParser) -> None:
    """The sampling options shared by `upscale` and `eval` (same names as the ComfyUI node inputs)."""
    p.add_argument("--checkpoint", type=Path, help="TEASR .safetensors checkpoint (default: the bundled model)")
    p.add_argument("--base", type=Path, help="base transformer of a LoRA checkpoint (e.g. Qwen-Image: a file or "
                                              "a diffusers folder)")
    p.add_argument("--vae", type=Path, help="the VAE of a latent checkpoint (e.g. qwen_image_vae.safetensors, or "
                                             "diffusers' vae/ folder of Qwen-Image)")
    p.add_argument("--text-features", type=Path, help="text features of a model with a text stream (the trainer's "
                                                       "context_file, e.g. from TEASR Save Text Features)")
    p.add_argument("--scale", type=int, default=4, help="upscale factor (the model is trained for 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=MODES, default="jump", help="sampler (default: jump)")
    p.add_argument("--shift", type=float, default=1.0, help="sigma-grid time shift")
    p.add_argument("--stochasticity", type=float, default=1.0,
                   help="renoise sampler: share of fresh noise per step (0 = re-use the predicted noise, 1 = all fresh)")
    p.add_argument("--timesteps", help='explicit timesteps on the 0..1000 scale, e.g. "999,500"')
    p.add_argument("--start-strength", type=float, default=0.5,
                   help="1 = from pure noise; <1 = from the noised bicubic upscale (default 0.5)")
    p.add_argument("--end-ratio", type=float, help="multi-step: the last step's strength as a share of the start "
                                                   "strength; 0 = uniform steps (default: the model's own)")
    p.add_argument("--color-fix", choices=COLOR_FIX_METHODS, default="wavelet")
    p.add_argument("--tile-size", default="auto", help="output pixels per tile side, 'auto' or 0 (untiled)")
    p.add_argument("--tile-overlap", type=int, default=128, help="output pixels")
    p.add_argument("--attention-tile", type=int, help="output pixels per side of the windows the transformer "
                                                      "attends over inside a tile; 0 = the tile (default: the model's own)")
    p.add_argument("--attention-overlap", type=int, help="output pixels between attention windows (default: the model's own)")
    p.add_argument("--condition", choices=CONDITIONS, default="auto",
                   help="condition latent: 'upscaled' encodes the bicubic upscale (what the model trained on), 'lr' "
                        "reads the LR through the codec's LR head (1/10 of the work), auto (default): 'lr' where the "
                        "codec has a head for the scale")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="compute dtype of every stage; auto (default): per stage, the transformer in fp32 on CPU "
                        "and bf16 on CUDA, the codec in bf16 where the processor runs it natively (CUDA, "
                        "AVX-512 BF16 / AMX CPUs), else fp32")
    p.add_argument("--fp8", action="store_true", help="store the frozen base weights as fp8 e4m3")
    p.add_argument(LIMIT_FLAG, type=float, default=DEFAULT_MAX_MEGAPIXELS, metavar="MP",
                   help="refuse input images larger than this, checked on the header before decoding (a guard "
                        f"against decompression bombs; default {DEFAULT_MAX_MEGAPIXELS:g}, Pillow's own; 0 = no limit)")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_upscaler(args) -> Upscaler:
    upscaler = Upscaler.from_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES.get(args.dtype), fp8=args.fp8,
                                        base=args.base, vae=args.vae)
    features = upscaler.dit.cfg.context_dim
    if features:
        if not args.text_features:
            raise ValueError(f"this model has a text stream ({features}-dim): pass --text-features FILE, the "
                             "features it was trained with (its context_file)")
        upscaler.context = load_text_features(args.text_features, features)[None].to(args.device)
    return upscaler


def tile_for(args, out_hw: tuple[int, int]) -> int | None:
    if args.tile_size == "auto":
        return AUTO_TILE if max(out_hw) > AUTO_TILE_ABOVE else None
    try:
        tile = int(args.tile_size)
    except ValueError:
        raise SystemExit(f"--tile-size must be 'auto' or a number of pixels, got {args.tile_size!r}") from None
    return tile or None


def settings_for(args, steps: int, image_hw: tuple[int, int]):
    out_hw = (image_hw[0] * args.scale, image_hw[1] * args.scale)
    return upscale_settings(steps=steps, scale=args.scale, seed=args.seed, mode=args.mode, shift=args.shift,
                            stochasticity=args.stochasticity,
                            timesteps=args.timesteps, start_strength=args.start_strength, end_ratio=args.end_ratio,
                            color_fix=args.color_fix, tile=tile_for(args, out_hw), tile_overlap=args.tile_overlap,
                            attention_tile=args.attention_tile, attention_overlap=args.attention_overlap,
                            condition=args.condition)


def upscale_photo(upscaler: Upscaler, photo: Photo, name: str, dst: Path, args) -> None:
    """Upscale one photo straight into its 8/16-bit output array (no full-size float copy), then write it."""
    settings = settings_for(args, args.steps, tuple(photo.rgb.shape[-2:]))
    reuse_freed_memory(settings.tile is None)   # faster whole-image runs; tiled ones keep their memory bound
    total = count_model_calls(upscaler, tuple(photo.rgb.shape[-2:]), settings)
    h, w = photo.rgb.shape[-2] * settings.scale, photo.rgb.shape[-1] * settings.scale
    canvas = ImageCanvas(dst, h, w, photo.grayscale, photo.alpha is not None, photo.bits, photo.icc, photo.exif)
    with tqdm(total=total, desc=name, unit="call", leave=False) as bar:
        upscale_into(upscaler, photo.rgb, canvas, settings, progress=lambda done, _: bar.update(done - bar.n))
    if photo.alpha is not None:
        for y0, alpha in bicubic_rows(photo.alpha, settings.scale):
            canvas.write_alpha(y0, alpha)
    canvas.save()


def jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file -> a file; a directory -> every image in it, as PNG under the same name."""
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ImageReadError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
        return [(p, dst / (p.stem + ".png")) for p in files]
    if dst.is_dir():
        return [(src, dst / (src.stem + ".png"))]
    return [(src, dst)]


def _file_id(path: Path) -> tuple[int, int]:
    """What makes two names one file (links, symlinks, other spellings of the path)."""
    st = path.stat()
    return st.st_dev, st.st_ino


def refuse_clobbering(pairs: list[tuple[Path, Path]]) -> None:
    """ValueError when an output would replace an input photo (through any link) or another output of the run."""
    inputs = {_file_id(src): src for src, _ in pairs}
    targets: dict[Path, Path] = {}
    for src, dst in pairs:
        output_format(dst)
        victim = inputs.get(_file_id(dst)) if dst.exists() else None
        if victim is not None:
            raise ValueError(f"{dst} is the input photo {victim}: TEASR never overwrites an input; choose another "
                             "output file or folder")
        key = dst.resolve()
        if key in targets:
            raise ValueError(f"{targets[key].name} and {src.name} would both be written to {dst}; rename one of them")
        targets[key] = src


def cmd_upscale(args) -> int:
    try:
        pairs = jobs(args.input, args.output)
        folder = args.input.is_dir()
        first = None if folder else read_image(args.input, args.max_megapixels)   # refuse before loading the model
        refuse_clobbering(pairs)
        done = [] if args.overwrite else [(src, dst) for src, dst in pairs if dst.exists()]
        if done and not folder:
            raise ValueError(f"{pairs[0][1]} exists; pass --overwrite to replace it")
    except ImageReadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if done:   # outputs are written atomically, so one under its final name is complete
        print(f"{len(done)} of {len(pairs)} already upscaled in {args.output}: skipped (--overwrite redoes them)")
    todo = [pair for pair in pairs if pair not in done]
    if not todo:
        return 0
    upscaler = load_upscaler(args)
    failed = []
    for src, dst in tqdm(todo, desc="images", unit="img", disable=len(todo) <= 1):
        t0 = time.perf_counter()
        try:
            photo = first if first is not None else read_image(src, args.max_megapixels)
        except ImageReadError as e:
            failed.append(src)
            print(f"error: {e}", file=sys.stderr)
            continue
        upscale_photo(upscaler, photo, src.name, dst, args)
        print(f"{src} -> {dst} ({time.perf_counter() - t0:.1f} s)")
    if failed:
        print(f"{len(failed)} of {len(pairs)} inputs could not be read and were skipped", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args) -> int:
    import json

    from .eval.evaluate import baseline_methods, evaluate, format_table, pair_files
    pairs = pair_files(args.lr, args.hr)
    pairs = ([p for i, p in enumerate(pairs) if i % args.held_out] if args.held_out else pairs[::args.every])[:args.limit]
    steps = [int(s) for s in args.steps.split(",") if s]
    methods = baseline_methods([b for b in args.baselines.split(",") if b], args.device)
    upscaler = load_upscaler(args) if steps else None

    def teasr(img: torch.Tensor, steps: int) -> torch.Tensor:
        settings = settings_for(args, steps, tuple(img.shape[-2:]))
        reuse_freed_memory(settings.tile is None)   # as in upscale_photo
        return upscale(upscaler, img, settings)

    for n in steps:
        methods[f"TEASR {n} step{'s' if n > 1 else ''}"] = lambda img, n=n: teasr(img, n)
    order = tuple(m for m in methods if m in ("bicubic", "Real-ESRGAN x4plus", "TEASR 1 step", "TEASR 4 steps"))
    with tqdm(total=len(pairs), desc="eval", unit="img") as bar:
        results = evaluate(pairs, methods, args.device, args.figures, order, progress=lambda _: bar.update(),
                           max_megapixels=args.max_megapixels)
    results.update(lr=str(args.lr), hr=str(args.hr) if args.hr else None, every=args.every, held_out=args.held_out,
                   limit=args.limit,
                   checkpoint=str(args.checkpoint or "bundled") if steps else None, seed=args.seed, color_fix=args.color_fix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"wrote {args.out}")
    return 0


def cmd_import_lora(args) -> int:
    from .formats.dual_lora import import_dual_lora
    out = import_dual_lora(args.lora, args.base, args.out, alpha_noise=args.alpha_noise, alpha_cond=args.alpha_cond,
                           embedder_prefix=args.embedder_prefix)
    print(f"wrote {out} (a TEASR LoRA checkpoint: load it with --base {args.base})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teasr_core", description="TEASR any-step x4 super-resolution")
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upscale", help="upscale an image file or a directory of images")
    up.add_argument("input", type=Path)
    up.add_argument("output", type=Path)
    up.add_argument("--steps", type=int, default=1, help="sampling steps, 1..50 (speed vs quality)")
    up.add_argument("--overwrite", action="store_true",
                    help="replace existing outputs (default: a file run refuses an existing OUT, a folder run skips "
                         "the photos already upscaled, so an interrupted run resumes); the input is never replaced")
    add_upscale_options(up)
    up.set_defaults(run=cmd_upscale)
    ev = sub.add_parser("eval", help="score TEASR (per step count) and baselines on LR/HR pairs")
    ev.add_argument("--lr", type=Path, required=True, help="folder of LR images")
    ev.add_argument("--hr", type=Path, help="folder of HR images with the same names (omit: no-reference only)")
    ev.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts ('' = baselines only)")
    ev.add_argument("--baselines", default="bicubic,realesrgan", help="comma-separated: bicubic, realesrgan")
    ev.add_argument("--out", type=Path, required=True, help="results JSON")
    ev.add_argument("--figures", type=Path, help="folder for comparison strips (LR | bicubic | ... | HR)")
    ev.add_argument("--limit", type=int, help="only the first N pairs (after --every)")
    ev.add_argument("--every", type=int, default=1, help="only every K-th pair (a quick check spread over the set)")
    ev.add_argument("--held-out", type=int, metavar="K", help="only the pairs --every K leaves out (to check a "
                                                              "setting chosen on every K-th)")
    add_upscale_options(ev)
    ev.set_defaults(run=cmd_eval)
    im = sub.add_parser("import-lora", help="a LoRA file in the TEASR authors' dual-LoRA naming -> a TEASR LoRA checkpoint")
    im.add_argument("lora", type=Path, help="safetensors with <module>.lora_A1/B1 (noise) and lora_A2/B2 (condition)")
    im.add_argument("--base", type=Path, required=True, help="the Qwen-Image base transformer (file or diffusers folder)")
    im.add_argument("--out", type=Path, required=True, help="the TEASR LoRA checkpoint to write")
    im.add_argument("--alpha-noise", type=float, help="noise-branch LoRA alpha (default: rank, as the precursor; "
                                                      "ODTSR-style files: 0)")
    im.add_argument("--alpha-cond", type=float, help="condition-branch LoRA alpha (default: rank)")
    im.add_argument("--embedder-prefix", help="where the file keeps the second timestep embedder (default: "
                                              "time_text_embed_2 or t_embedder_2; none: a copy of the base's)")
    im.set_defaults(run=cmd_import_lora)
    args = ap.parse_args(argv)
    replace_pillow_size_check()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:   # bad settings, checkpoint or set-up: a message
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
