"""Reading and writing photos without losing what the user gave us.

Any PIL-readable photo (PNG/JPEG/WebP/...) becomes float RGB in [0, 1] plus, separately, its alpha
channel (upscaled on its own, never fed to the model). Grayscale comes back as grayscale, 16-bit PNGs
as 16-bit PNGs (PIL reads 16-bit RGB PNGs as 8-bit, so those go through pypng).

Output goes through an `ImageCanvas`: the final 8- or 16-bit array, filled row band by row band by
the upscale pipeline and written without another full-size copy (PNG row by row through pypng;
other formats through PIL).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """The file is not an image we can read."""


@dataclass
class Photo:
    rgb: torch.Tensor                 # [1, 3, H, W] float32 in [0, 1]
    alpha: torch.Tensor | None        # [1, 1, H, W] float32 in [0, 1], or None
    grayscale: bool
    bits: int                         # 8 or 16


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25 else 8


def _read_png16(path: Path) -> Photo:
    import png
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    data = data.astype(np.float32) / 65535.0
    gray = planes in (1, 2)
    color = np.repeat(data[..., :1], 3, axis=2) if gray else data[..., :3]
    alpha = data[..., -1:] if planes in (2, 4) else None
    return _photo(color, alpha, gray, 16)


def _photo(color: np.ndarray, alpha: np.ndarray | None, gray: bool, bits: int) -> Photo:
    rgb = torch.from_numpy(np.ascontiguousarray(color)).permute(2, 0, 1)[None].float()
    a = None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha)).permute(2, 0, 1)[None].float()
    return Photo(rgb, a, gray, bits)


def read_image(path) -> Photo:
    """Read a photo; a non-image raises ImageReadError naming the file and the accepted formats."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        if _png_bit_depth(path) == 16:
            return _read_png16(path)
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
            gray = mode in ("L", "LA", "I", "I;16", "I;16B", "1", "F")
            if mode in ("I", "I;16", "I;16B", "F"):          # high bit depth grayscale (TIFF etc.)
                arr = np.asarray(im, dtype=np.float32)
                top = 65535.0 if mode != "F" else max(1.0, float(arr.max()))
                arr = np.clip(arr / top, 0, 1)[..., None]
                return _photo(np.repeat(arr, 3, axis=2), None, True, 16)
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e.__class__.__name__}: {e}); "
                             f"accepted: {', '.join(IMAGE_EXTENSIONS)}") from None
    return _photo(rgba[..., :3], rgba[..., 3:] if has_alpha else None, gray, 8)


LUMA = (0.299, 0.587, 0.114)   # BT.601, like PIL's RGB -> L


class ImageCanvas:
    """The output file's pixels: [H, W, planes] uint8 (uint16 for a 16-bit PNG), filled band by band.

    A pipeline.Canvas for one image: `convert` makes the stored colour planes (luma for grayscale),
    `write` / `read` move float rows in [0, 1] in and out, `write_alpha` fills the alpha plane.
    """

    def __init__(self, path, height: int, width: int, grayscale: bool = False, alpha: bool = False, bits: int = 8):
        self.path = Path(path)
        self.bits = 16 if bits == 16 and self.path.suffix.lower() == ".png" else 8
        self.grayscale, self.colors = grayscale, 1 if grayscale else 3
        self.top = 65535 if self.bits == 16 else 255
        self.pixels = np.empty((height, width, self.colors + alpha), dtype=np.uint16 if self.bits == 16 else np.uint8)

    def convert(self, rgb: torch.Tensor) -> torch.Tensor:
        if not self.grayscale:
            return rgb
        return (rgb * torch.tensor(LUMA, device=rgb.device).view(1, 3, 1, 1)).sum(1, keepdim=True)

    def _store(self, y0: int, planes: torch.Tensor, first: int) -> None:
        values = planes[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        self.pixels[y0:y0 + values.shape[0], :, first:first + values.shape[2]] = np.round(values * self.top)

    def write(self, y0: int, planes: torch.Tensor) -> None:
        self._store(y0, planes, 0)

    def write_alpha(self, y0: int, alpha: torch.Tensor) -> None:
        self._store(y0, alpha, self.colors)

    def read(self, y0: int, y1: int) -> torch.Tensor:
        values = self.pixels[y0:y1, :, :self.colors].astype(np.float32) / self.top
        return torch.from_numpy(values).permute(2, 0, 1)[None]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        height, width, planes = self.pixels.shape
        if self.path.suffix.lower() == ".png":
            import png
            rows = (row.astype(">u2").tobytes() if self.bits == 16 else row.tobytes() for row in self.pixels)
            with open(self.path, "wb") as f:
                png.Writer(width, height, greyscale=planes in (1, 2), alpha=planes in (2, 4),
                           bitdepth=self.bits).write_packed(f, rows)
            return
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes]
        Image.fromarray(self.pixels[..., 0] if mode == "L" else self.pixels, mode).save(self.path)


def write_image(path, rgb: torch.Tensor, alpha: torch.Tensor | None = None, grayscale: bool = False,
                bits: int = 8) -> None:
    """Write [1, 3, H, W] (+ [1, 1, H, W] alpha) in [0, 1]; 16-bit only as PNG."""
    canvas = ImageCanvas(path, *rgb.shape[-2:], grayscale, alpha is not None, bits)
    canvas.write(0, canvas.convert(rgb.float()))
    if alpha is not None:
        canvas.write_alpha(0, alpha.float())
    canvas.save()
