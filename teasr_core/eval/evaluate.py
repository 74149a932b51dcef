"""Evaluation harness: TEASR at several step counts next to bicubic and Real-ESRGAN x4plus.

Pairs LR/HR files by name, upscales every LR with every method, and scores the result with the
metrics of the Real-ISR literature (PSNR/SSIM on BT.601 Y, LPIPS-Alex, DISTS; NIQE without reference),
computed exactly as pyiqa does (teasr_core/eval/metrics.py). Per-image values, means and seconds per image
go to JSON; `format_table` prints the table.
"""
from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from safetensors.torch import load_file

from ..upscale.imageio import DEFAULT_MAX_MEGAPIXELS, IMAGE_EXTENSIONS, read_image
from . import metrics, weights
from .baselines import bicubic_upscale, load_realesrgan, realesrgan_upscale
from .niqe import niqe

Method = Callable[[torch.Tensor], torch.Tensor]  # [1, 3, h, w] -> [1, 3, 4h, 4w], both in [0, 1]
COLUMNS = ("psnr", "ssim", "lpips", "dists", "niqe", "sec")


def pair_files(lr_dir: Path, hr_dir: Path | None) -> list[tuple[str, Path, Path | None]]:
    """(name, lr, hr) for every image in lr_dir; hr matched by file name (None when no hr_dir)."""
    lrs = sorted(p for p in Path(lr_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not lrs:
        raise FileNotFoundError(f"no images in {lr_dir}")
    if hr_dir is None:
        return [(p.name, p, None) for p in lrs]
    missing = [p.name for p in lrs if not (Path(hr_dir) / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} LR images have no HR image of the same name in {hr_dir}: "
                                f"{missing[:5]}")
    return [(p.name, p, Path(hr_dir) / p.name) for p in lrs]


def baseline_methods(names: list[str], device) -> dict[str, Method]:
    out: dict[str, Method] = {}
    for name in names:
        if name == "bicubic":
            out["bicubic"] = lambda img: bicubic_upscale(img, 4)
        elif name == "realesrgan":
            model = load_realesrgan(device)
            out["Real-ESRGAN x4plus"] = lambda img, m=model: realesrgan_upscale(m, img)
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from bicubic, realesrgan")
    return out


def quantise_8bit(image: torch.Tensor) -> torch.Tensor:
    """Scores are taken on 8-bit images, as they would be saved and as the references were."""
    return torch.round(image.clamp(0, 1) * 255) / 255


def evaluate(pairs, methods: dict[str, Method], device="cpu", figure_dir: Path | None = None,
             figure_methods: tuple[str, ...] = (), progress: Callable[[str], None] | None = None,
             max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> dict:
    """Score every method on every pair; returns {"methods": {name: {"mean": {...}, "images": {...}}}}."""
    scorers = metrics.load_metrics(device)
    pristine = load_file(str(weights.weights_path(metrics.NIQE_WEIGHTS)))
    results = {name: {"images": {}} for name in methods}
    for index, (name, lr_path, hr_path) in enumerate(pairs):
        lr = read_image(lr_path, max_megapixels).rgb.to(device)
        hr = read_image(hr_path, max_megapixels).rgb.to(device) if hr_path else None
        outputs = {}
        for method, run in methods.items():
            t0 = time.perf_counter()
            sr = quantise_8bit(run(lr).to(device))
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            row = {"sec": seconds}
            if hr is not None:
                if sr.shape != hr.shape:
                    raise ValueError(f"{name}: {method} gave {tuple(sr.shape[-2:])}, HR is {tuple(hr.shape[-2:])}")
                row.update({k: float(v) for k, v in metrics.evaluate_pair(sr, hr, *scorers).items()})
            row["niqe"] = float(niqe(sr, pristine)) if min(sr.shape[-2:]) >= 96 else float("nan")
            results[method]["images"][name] = row
            outputs[method] = sr
        if figure_dir is not None and index < 8:
            save_figure(Path(figure_dir) / f"{Path(name).stem}.png", lr, outputs, hr, figure_methods)
        if progress:
            progress(name)
    for method, entry in results.items():
        columns = {k for row in entry["images"].values() for k in row}
        entry["mean"] = {k: float(np.nanmean([row[k] for row in entry["images"].values()]))
                         for k in COLUMNS if k in columns}
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": describe_device(device),
            "torch": torch.__version__, "images": len(pairs), "methods": results}


def describe_device(device) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def save_figure(path: Path, lr: torch.Tensor, outputs: dict[str, torch.Tensor], hr: torch.Tensor | None,
                order: tuple[str, ...], crop: int = 192) -> None:
    """A strip of centre crops: LR (nearest) | each method in `order` | HR."""
    size = outputs[next(iter(outputs))].shape[-2:]
    panels = [F.interpolate(lr, size=size, mode="nearest")] + [outputs[m] for m in order if m in outputs]
    panels += [hr] if hr is not None else []
    top, left = max(0, (size[0] - crop) // 2), max(0, (size[1] - crop) // 2)
    strip = torch.cat([p[..., top:top + crop, left:left + crop] for p in panels], dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((strip[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def format_table(results: dict, reference: str | None = "bicubic") -> str:
    """Markdown table of the means (and the difference to `reference` for LPIPS/PSNR)."""
    methods = results["methods"]
    present = [c for c in COLUMNS if any(c in m["mean"] for m in methods.values())]
    head = "| method | " + " | ".join(present) + " |"
    lines = [head, "|" + "---|" * (len(present) + 1)]
    for name, entry in methods.items():
        cells = []
        for c in present:
            v = entry["mean"].get(c, float("nan"))
            cells.append(f"{v:.2f}" if c in ("psnr", "niqe", "sec") else f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
