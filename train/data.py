"""Training pairs from a folder of HR photos: random crops + flips, degraded online on the device.

`PairStream` is infinite, seeded and resumable bit-exactly. Its randomness is counter-based: sample
k's image, crop and flip come from a generator seeded with (seed, k), the epoch permutation from
(seed, epoch) and batch j's degradation from (seed, j). The state is therefore just the seed and two
counters, and resuming replays nothing.

`hr_downscale` < 1 shrinks every photo (antialiased) before cropping, Real-ESRGAN's multi-scale
trick: film grain, sensor noise and JPEG blocks of the HR shrink below a pixel, so the model does
not learn to paint them onto clean photos (the shared pool's BSDS500 scans are grainy).

`hr_scale_min` < 1 draws a scale per crop, s log-uniform in [max(hr_scale_min, crop / short side), 1]: the
crop covers crop / s pixels of the photo and is shrunk to `crop`, so a small pool yields detail at
many scales and no photo is ever enlarged to fit.

`light_share` of the batches are degraded with `light_degradation()` instead of the full Real-ESRGAN
settings: real camera LR (RealSR, DRealSR) is mildly blurred and barely noisy, and a model trained
only on heavy degradations smooths such inputs away.

Images whose short side is below the crop are upscaled (bicubic) until it fits, so every photo is
usable. Reflect-padding (what Real-ESRGAN does) was the alternative; it keeps the HR sharp but
teaches mirrored seams as content, while the upscale only softens an already clean target. With
the shared pool and 256 px crops nothing is upscaled (the smallest short side is 321 px).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .degrade import DegradationConfig, degrade

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_PERMUTATION, _CROP, _DEGRADATION, _MIX = 0, 1, 2, 3  # independent random streams


def light_degradation(scale: int = 4) -> DegradationConfig:
    """A first-order-like degradation: mild blur, little noise, light JPEG (see `light_share`)."""
    return DegradationConfig(scale=scale, blur_sigma=(0.2, 1.5), resize_prob=(0.2, 0.5, 0.3), resize_range=(0.5, 1.2),
                             noise_range=(0.5, 8.0), poisson_scale_range=(0.05, 1.0), jpeg_range=(70.0, 95.0),
                             second_blur_prob=0.3, blur_sigma2=(0.2, 1.0), resize_range2=(0.6, 1.2),
                             gaussian_noise_prob2=0.3, noise_range2=(0.5, 5.0), poisson_scale_range2=(0.05, 0.5),
                             jpeg_range2=(75.0, 95.0), final_sinc_prob=0.5)


def load_rgb8(path: str | Path) -> np.ndarray:
    """Decode any photo to [H, W, 3] uint8 RGB, upright per its EXIF orientation.

    16-bit images are scaled to 8 bits (PIL's own convert would clip them to white); CMYK, palette,
    gray and alpha images go through PIL's RGB conversion (alpha is dropped).
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # "I;16*" and "I" hold 16-bit samples
            gray = np.asarray(image).astype(np.float64) / 257
            return np.repeat(gray.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _shrink(array: np.ndarray, factor: float) -> np.ndarray:
    if factor >= 1:
        return array
    h, w = array.shape[:2]
    return np.asarray(Image.fromarray(array).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                                    Image.LANCZOS))


def _grow_to(array: np.ndarray, min_side: int) -> np.ndarray:
    h, w = array.shape[:2]
    if min(h, w) >= min_side:
        return array
    factor = min_side / min(h, w)
    size = (max(min_side, round(w * factor)), max(min_side, round(h * factor)))
    return np.asarray(Image.fromarray(array).resize(size, Image.BICUBIC))


class ImageFolder:
    """The photos under root (recursive), in a sorted order so indices are stable across machines.

    With cache=True decoded images stay in RAM as uint8 (the 480-photo shared pool takes ~0.37 GB).
    Each is shrunk by `downscale` (<= 1), then grown to `min_side` if still smaller.
    """

    def __init__(self, root: str | Path, min_side: int = 0, cache: bool = True, downscale: float = 1.0):
        root = Path(root)
        self.paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.relative_to(root).as_posix())
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        if not 0 < downscale <= 1:
            raise ValueError(f"HR downscale must be in (0, 1], got {downscale}")
        self.min_side, self.downscale = min_side, downscale
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        array = _grow_to(_shrink(load_rgb8(self.paths[index]), self.downscale), self.min_side)
        if self._cache is not None:
            self._cache[index] = array
        return array


def _seeded(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one (seed, stream, index); SeedSequence mixes them so nearby seeds don't overlap."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def upsample_lr(lr: torch.Tensor, scale: int = 4, mode: str = "bicubic") -> torch.Tensor:
    """LR back to HR size, clamped to [0, 1]: the input of the model's condition branch."""
    align = None if mode in ("nearest", "area") else False
    return F.interpolate(lr, scale_factor=scale, mode=mode, align_corners=align).clamp(0, 1)


class PairStream:
    """Infinite iterator of (lr [B, 3, crop/s, crop/s], hr [B, 3, crop, crop]) float batches in [0, 1] on device.

    Every photo is visited once per epoch, in a fresh order each epoch. Loading and cropping run in
    the calling process (cheap once the cache is warm); the degradation runs on `device`.
    """

    def __init__(self, root: str | Path, *, crop: int = 256, batch_size: int = 8, seed: int = 0,
                 device: str | torch.device = "cpu", degradation: DegradationConfig | None = None,
                 cache: bool = True, hr_downscale: float = 1.0, hr_scale_min: float = 1.0, light_share: float = 0.0):
        self.degradation = degradation or DegradationConfig()
        if crop % self.degradation.scale:
            raise ValueError(f"crop {crop} is not a multiple of the scale {self.degradation.scale}")
        if not 0 < hr_scale_min <= 1:
            raise ValueError(f"hr_scale_min must be in (0, 1], got {hr_scale_min}")
        if not 0 <= light_share <= 1:
            raise ValueError(f"light_share must be in [0, 1], got {light_share}")
        self.light = light_degradation(self.degradation.scale)
        self.images = ImageFolder(root, min_side=crop, cache=cache, downscale=hr_downscale)
        self.crop, self.batch_size, self.seed = crop, batch_size, seed
        self.hr_scale_min, self.light_share = hr_scale_min, light_share
        self.device = torch.device(device)
        self.samples_drawn = 0
        self.batches_drawn = 0
        self._permutation: tuple[int, torch.Tensor] | None = None  # (epoch, order)

    def __iter__(self) -> PairStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        hr = self.next_hr()
        light = float(torch.rand(1, generator=_seeded(self.seed, _MIX, self.batches_drawn))) < self.light_share
        lr = degrade(hr, _seeded(self.seed, _DEGRADATION, self.batches_drawn), self.light if light else self.degradation)
        self.batches_drawn += 1
        return lr, hr

    def next_hr(self) -> torch.Tensor:
        """The next batch of HR crops only (advances the sample counter, not the batch counter)."""
        crops = [self._crop(self.samples_drawn + i) for i in range(self.batch_size)]
        self.samples_drawn += self.batch_size
        batch = torch.from_numpy(np.stack(crops)).to(self.device)  # uint8 travels, 4x smaller than float
        return batch.permute(0, 3, 1, 2).float() / 255

    def _crop(self, sample: int) -> np.ndarray:
        image = self.images[self._image_index(sample)]
        generator = _seeded(self.seed, _CROP, sample)
        h, w = image.shape[:2]
        side = self.crop
        if self.hr_scale_min < 1:
            low = max(self.hr_scale_min, self.crop / min(h, w))
            scale = low ** float(torch.rand(1, generator=generator))  # log-uniform in [low, 1]
            side = min(min(h, w), round(self.crop / scale))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        patch = image[top:top + side, left:left + side]
        if side != self.crop:
            patch = np.asarray(Image.fromarray(patch).resize((self.crop, self.crop), Image.LANCZOS))
        if torch.rand(1, generator=generator) < 0.5:
            patch = patch[:, ::-1]
        return np.ascontiguousarray(patch)

    def _image_index(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.images))
        if self._permutation is None or self._permutation[0] != epoch:
            order = torch.randperm(len(self.images), generator=_seeded(self.seed, _PERMUTATION, epoch))
            self._permutation = (epoch, order)
        return int(self._permutation[1][position])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples_drawn": self.samples_drawn, "batches_drawn": self.batches_drawn,
                "num_images": len(self.images)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where state was taken; its seed wins over the one given to __init__."""
        if state["num_images"] != len(self.images):
            warnings.warn(f"the image folder now holds {len(self.images)} images, the saved stream "
                          f"{state['num_images']}: the resumed stream will differ from an uninterrupted one")
        self.seed = state["seed"]
        self.samples_drawn = state["samples_drawn"]
        self.batches_drawn = state["batches_drawn"]
