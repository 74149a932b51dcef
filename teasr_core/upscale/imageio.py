"""Reading and writing photos as people have them, without losing what the user gave us.

Any PIL-readable photo (PNG/JPEG/WebP/TIFF/BMP, HEIC/HEIF through `pillow-heif`) becomes float RGB in
[0, 1], upright per its EXIF orientation, plus, separately, its alpha channel (upscaled on its own,
never fed to the model). Grayscale comes back as grayscale, 16-bit PNGs as 16-bit PNGs (PIL reads
16-bit RGB PNGs as 8-bit, so those go through pypng). The ICC profile and the EXIF data travel with
the pixels and are written into the output where its format holds them, so viewers show the upscale
in the photo's colours and camera data and capture date survive.

Output goes through an `ImageCanvas`: the final 8- or 16-bit array, filled row band by row band by
the upscale pipeline and written without another full-size copy (PNG row by row through pypng;
other formats through PIL), into a temporary file beside the target that is renamed over it only
once complete: an interrupted run never leaves a partial image under the final name.
"""
from __future__ import annotations

import functools
import os
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, UnidentifiedImageError

HEIF_EXTENSIONS = (".heic", ".heif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") + HEIF_EXTENSIONS
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")   # ISO-BMFF ftyp brands
# Pillow's own decompression-bomb limit (2 x its MAX_IMAGE_PIXELS of 89.5 MP), which the command line
# hit before as a traceback: what read then still reads, and a header claiming more is refused (now
# also on the 16-bit PNG path, which had no limit) before anything is decoded.
DEFAULT_MAX_MEGAPIXELS = 179.0
LIMIT_FLAG = "--max-megapixels"   # the command-line option that lifts the limit (upscale and eval)
# Largest side each PIL-written format can store; a larger output is refused before the model runs.
FORMAT_MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}
JPEG_MAX_EXIF = 65533   # bytes: one APP1 segment
# Output formats whose PIL writer stores an ICC profile and EXIF (PNG has its own writer below).
METADATA_FORMATS = ("JPEG", "WEBP", "TIFF")
ORIENTATION, EXIF_IFD, PIXEL_X, PIXEL_Y = 0x0112, 0x8769, 0xA002, 0xA003
# Tags that describe how the input's pixels were stored (size, layout, strips, orientation, thumbnail,
# a TIFF's own ICC tag): true of the input only, so never carried into the upscale.
STORAGE_TAGS = (0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0111, 0x0112, 0x0115, 0x0116, 0x0117, 0x011C,
                0x013D, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145, 0x0152, 0x0153, 0x015B, 0x0201, 0x0202, 0x8773)
# EXIF orientation -> the view of the stored [H, W, C] pixels that stands upright (orientation 6:
# how phones store portrait shots, turned 90 degrees clockwise to view).
UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
           8: lambda a: np.rot90(a)}


class ImageReadError(ValueError):
    """The file is not an image we can read (or one we refuse to: too large, HEIC without pillow-heif)."""


@dataclass
class Photo:
    rgb: torch.Tensor                 # [1, 3, H, W] float32 in [0, 1], upright
    alpha: torch.Tensor | None        # [1, 1, H, W] float32 in [0, 1], or None
    grayscale: bool
    bits: int                         # 8 or 16
    icc: bytes | None = None          # ICC profile of the pixels' colour space
    exif: bytes | None = None         # EXIF to carry into the output: without orientation, size and thumbnail


@functools.cache
def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF reader with PIL (once); False when the package is absent."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _is_heif(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in HEIF_EXTENSIONS or (head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS)


def _check_size(path: Path, width: int, height: int, max_megapixels: float) -> None:
    megapixels = width * height / 1e6
    if max_megapixels and megapixels > max_megapixels:
        raise ImageReadError(f"{path}: {width}x{height} pixels ({megapixels:.0f} MP) is over the limit of "
                             f"{max_megapixels:g} MP per image; if it is a real photo, lift the limit with "
                             f"{LIMIT_FLAG} {int(megapixels) + 1} (0 = no limit)")


def _exif_to_carry(exif: Image.Exif, width: int | None = None, height: int | None = None) -> bytes | None:
    """EXIF bytes without the tags that only describe the input's storage; the pixel size set if given."""
    if not len(exif):
        return None
    for tag in STORAGE_TAGS:
        exif.pop(tag, None)
    if width is not None and EXIF_IFD in exif:
        sub = exif.get_ifd(EXIF_IFD)
        for tag, value in ((PIXEL_X, width), (PIXEL_Y, height)):
            if tag in sub:
                sub[tag] = value
    return exif.tobytes()


def _exif(data: bytes | None) -> Image.Exif:
    exif = Image.Exif()
    if data:
        exif.load(data)
    return exif


def _upright(array: np.ndarray, orientation: int) -> np.ndarray:
    return UPRIGHT[orientation](array) if orientation in UPRIGHT else array


def _read_png16(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    data = data.astype(np.float32) / 65535.0
    gray = planes in (1, 2)
    color = np.repeat(data[..., :1], 3, axis=2) if gray else data[..., :3]
    return color, data[..., -1:] if planes in (2, 4) else None, gray


def _decode(im: Image.Image):
    """(colour [H, W, 3], alpha [H, W, 1] or None, grayscale, bits) of an opened PIL image."""
    im.load()
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "F"):          # high bit depth grayscale (TIFF etc.)
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if mode != "F" else max(1.0, float(arr.max()))
        arr = np.clip(arr / top, 0, 1)[..., None]
        return np.repeat(arr, 3, axis=2), None, True, 16
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    gray = mode in ("L", "LA", "1")
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    return rgba[..., :3], rgba[..., 3:] if has_alpha else None, gray, 8


def _profile_for(icc: bytes | None, gray: bool, path: Path) -> bytes | None:
    """The profile if it describes the output's planes (GRAY or RGB); one that does not is dropped with a warning.

    (A CMYK photo's profile, say: PIL's conversion to RGB does not go through it, and an RGB file
    with a CMYK profile is one viewers reject.)
    """
    if icc and icc[16:20] != (b"GRAY" if gray else b"RGB "):
        warnings.warn(f"{path}: its ICC profile is for {icc[16:20].decode('latin-1').strip()} data, not the "
                      f"{'gray' if gray else 'RGB'} pixels written; the output carries no profile", stacklevel=3)
        return None
    return icc or None


def read_image(path, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> Photo:
    """Read a photo, upright, with its ICC profile and EXIF.

    A non-image, a HEIC without pillow-heif, or a header claiming more than `max_megapixels` (0 = no
    limit; checked before anything is decoded) raises ImageReadError with a one-line reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(32)
    if _is_heif(path, head) and not _heif_opener():
        raise ImageReadError(f"{path}: HEIC/HEIF photos need the pillow-heif package; add it to the Python that "
                             "runs TEASR with `python -m pip install pillow-heif`")
    try:
        with Image.open(path) as im:
            _check_size(path, *im.size, max_megapixels)
            icc = im.info.get("icc_profile")
            if im.format == "PNG" and head[24:25] == b"\x10":      # IHDR bit depth: PIL would read 8 bits of it
                color, alpha, gray = _read_png16(path)
                bits, exif = 16, _exif(im.info.get("exif"))   # an eXIf chunk before the pixels
            else:
                color, alpha, gray, bits = _decode(im)
                exif = im.getexif()
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e.__class__.__name__}: {e}); "
                             f"accepted: {', '.join(IMAGE_EXTENSIONS)}") from None
    orientation = exif.get(ORIENTATION, 1)
    color = _upright(color, orientation)
    alpha = None if alpha is None else _upright(alpha, orientation)
    rgb = torch.from_numpy(np.ascontiguousarray(color)).permute(2, 0, 1)[None].float()
    a = None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha)).permute(2, 0, 1)[None].float()
    try:
        carried = _exif_to_carry(exif)
    except Exception as e:   # noqa: BLE001 -- PIL re-encodes whatever a camera wrote; a photo is not refused for it
        warnings.warn(f"{path}: its EXIF could not be re-encoded ({e.__class__.__name__}: {e}); the output carries "
                      "none", stacklevel=2)
        carried = None
    return Photo(rgb, a, gray, bits, _profile_for(icc, gray, path), carried)


def output_format(path) -> str:
    """PIL's name of the format the output's extension asks for; an unknown extension is refused."""
    suffix = Path(path).suffix.lower()
    name = Image.registered_extensions().get(suffix)
    if name is None:
        raise ValueError(f"{path}: unknown image extension {suffix!r}; write .png, .jpg, .webp or .tif")
    return name


@contextmanager
def atomic_file(path: Path):
    """A binary file that appears under `path` only once it is completely written.

    It is written as a hidden `.NAME.<random>.part` beside the target (same file system, so the
    final os.replace is atomic) and synced before the rename; an error removes it. A killed process
    can leave the .part file behind, never a truncated file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class _PngWriter(png.Writer):
    """pypng's streaming writer plus the chunks it has no option for (iCCP, eXIf), before the pixels."""

    def __init__(self, *args, chunks: list[tuple[bytes, bytes]], **kwargs):
        super().__init__(*args, **kwargs)
        self.chunks = chunks

    def write_preamble(self, outfile) -> None:
        super().write_preamble(outfile)
        for tag, data in self.chunks:
            png.write_chunk(outfile, tag, data)


LUMA = (0.299, 0.587, 0.114)   # BT.601, like PIL's RGB -> L


class ImageCanvas:
    """The output file's pixels: [H, W, planes] uint8 (uint16 for a 16-bit PNG), filled band by band.

    A pipeline.Canvas for one image: `convert` makes the stored colour planes (luma for grayscale),
    `write` / `read` move float rows in [0, 1] in and out, `write_alpha` fills the alpha plane.
    `icc` and `exif` (a Photo's) are written where the format holds them. A size the output format
    cannot store is refused here, before any pixel is computed.
    """

    def __init__(self, path, height: int, width: int, grayscale: bool = False, alpha: bool = False, bits: int = 8,
                 icc: bytes | None = None, exif: bytes | None = None):
        self.path = Path(path)
        self.format = output_format(self.path)
        limit = FORMAT_MAX_SIDE.get(self.format)
        if limit and max(height, width) > limit:
            raise ValueError(f"{self.path}: the output is {width}x{height} pixels, and {self.format} stores at most "
                             f"{limit} per side; write it as .png (or .tif)")
        self.bits = 16 if bits == 16 and self.format == "PNG" else 8
        self.grayscale, self.colors = grayscale, 1 if grayscale else 3
        self.top = 65535 if self.bits == 16 else 255
        self.icc = icc
        self.exif = _exif_to_carry(_exif(exif), width, height) if exif else None
        if self.format == "JPEG" and self.exif and len(self.exif) > JPEG_MAX_EXIF:
            warnings.warn(f"{self.path}: the EXIF is {len(self.exif)} bytes and JPEG holds at most {JPEG_MAX_EXIF}; "
                          "the output carries none (write .png or .tif to keep it)", stacklevel=2)
            self.exif = None
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

    def _png_chunks(self) -> list[tuple[bytes, bytes]]:
        chunks = []
        if self.icc:   # iCCP: profile name, 0, compression method 0 (zlib), the compressed profile
            chunks.append((b"iCCP", b"ICC Profile\0\0" + zlib.compress(self.icc)))
        if self.exif:  # eXIf: the TIFF-structured EXIF without JPEG's "Exif\0\0" marker
            chunks.append((b"eXIf", self.exif.removeprefix(b"Exif\0\0")))
        return chunks

    def save(self) -> None:
        """Write the file (atomically: see `atomic_file`)."""
        height, width, planes = self.pixels.shape
        with atomic_file(self.path) as f:
            if self.format == "PNG":
                rows = (row.astype(">u2").tobytes() if self.bits == 16 else row.tobytes() for row in self.pixels)
                _PngWriter(width, height, greyscale=planes in (1, 2), alpha=planes in (2, 4), bitdepth=self.bits,
                           chunks=self._png_chunks()).write_packed(f, rows)
            else:
                mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes]
                metadata = {}
                if self.format in METADATA_FORMATS:
                    metadata = {k: v for k, v in (("icc_profile", self.icc), ("exif", self.exif)) if v}
                image = Image.fromarray(self.pixels[..., 0] if mode == "L" else self.pixels, mode)
                image.save(f, self.format, **metadata)


def write_image(path, rgb: torch.Tensor, alpha: torch.Tensor | None = None, grayscale: bool = False,
                bits: int = 8, icc: bytes | None = None, exif: bytes | None = None) -> None:
    """Write [1, 3, H, W] (+ [1, 1, H, W] alpha) in [0, 1]; 16-bit only as PNG."""
    canvas = ImageCanvas(path, *rgb.shape[-2:], grayscale, alpha is not None, bits, icc, exif)
    canvas.write(0, canvas.convert(rgb.float()))
    if alpha is not None:
        canvas.write_alpha(0, alpha.float())
    canvas.save()
