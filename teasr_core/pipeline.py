"""The one upscale code path shared by the CLI, the ComfyUI nodes and the trainer's sample grids.

image -> bicubic to the target size -> codec.encode -> condition latent; noise (a function of
position) -> any-step flow-map sampling, tiled or not -> codec.decode -> colour fix -> image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .codecs import Codec, PixelCodec, build_codec
from .color import COLOR_FIX_METHODS, color_fix
from .model import DualBranchDiT
from .qwen_vae import CODEC_NAME as QWEN_VAE, load_vae_codec
from .sampling import MODES, batch_noise, sample, shifted_sigmas, sigmas_from_timesteps
from .tiling import Tile, plan_tiles, tiled_denoiser

Progress = Callable[[int, int], None]  # (done, total) after every model call


@dataclass(frozen=True)
class UpscaleSettings:
    """Every knob of an upscale; the CLI flags and the node inputs map onto these names."""

    steps: int = 1
    scale: int = 4
    seed: int = 0
    mode: str = "jump"                    # one of sampling.MODES
    shift: float = 1.0                    # sigma-grid time shift (> 1 spends more steps at high noise)
    timesteps: tuple[float, ...] | None = None  # explicit 0..1000 timesteps; overrides steps/shift
    start_strength: float = 1.0           # 1 = start from pure noise; < 1 = from the noised LR latent
    stochasticity: float = 1.0            # renoise mode: share of fresh noise per step
    tile: int | None = None               # tile side in output pixels; None = whole image at once
    tile_overlap: int = 64                # output pixels
    color_fix: str = "wavelet"            # one of color.COLOR_FIX_METHODS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sampler mode {self.mode!r}; choose one of {MODES}")
        if self.color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"unknown color fix {self.color_fix!r}; choose one of {COLOR_FIX_METHODS}")
        if not 1 <= self.scale <= 8:
            raise ValueError(f"scale must be in 1..8, got {self.scale}")
        self.sigmas()  # validates steps / shift / start_strength / timesteps

    def sigmas(self) -> torch.Tensor:
        if self.timesteps:
            return sigmas_from_timesteps(self.timesteps)
        return shifted_sigmas(self.steps, self.shift, self.start_strength)

    @property
    def model_calls(self) -> int:
        return len(self.sigmas()) - 1


@dataclass
class Upscaler:
    """A DiT, the codec its latents live in, and (models with a text stream) default text features [1, T, D]."""

    dit: DualBranchDiT
    codec: Codec
    context: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, path=None, *, device="cpu", dtype=None, fp8=False, codec: Codec | None = None,
                        base=None, vae=None) -> "Upscaler":
        """Load a TEASR checkpoint (the bundled default when path is None).

        Latent models whose VAE lives outside this library (e.g. Qwen-Image's) need that VAE: its
        file as `vae`, or a ready `codec`.
        """
        from .checkpoint import bundled_checkpoint_path, load_checkpoint
        ckpt = load_checkpoint(path or bundled_checkpoint_path(), device=device, dtype=dtype, fp8=fp8, base=base)
        return cls(ckpt.dit, codec or codec_from_config(ckpt.codec, device=device, vae=vae, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.dit.time_text_embed.timestep_embedder.linear_1.weight.device

    @property
    def alignment(self) -> int:
        """Output sizes are padded to a multiple of this (codec scale x patch size)."""
        return self.codec.scale * self.dit.cfg.patch


def codec_from_config(codec: dict, device="cpu", vae=None, dtype=None) -> Codec:
    """Build the codec a checkpoint names; an external VAE's latent space needs that VAE's file (`vae`)."""
    kind = codec.get("name")
    if kind == "pixel":
        return PixelCodec(scale=int(codec.get("scale", 8)))
    if kind == "taef2":
        return build_codec("taef2", device=device, latent_mean=codec.get("latent_mean"),
                           latent_std=codec.get("latent_std"))
    if kind == QWEN_VAE and vae is not None:
        return load_vae_codec(vae, device=device, dtype=dtype or torch.float32, expected=codec)
    raise ValueError(f"this checkpoint's latents come from an external VAE ({codec.get('vae', kind)!r}); "
                     "pass that VAE's file (--vae on the command line) or a codec (in ComfyUI: connect the VAE "
                     "input of TEASR Loader)")


def validate_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image batch [B, 3, H, W], got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("the input image contains NaN or infinite values")


def resize_bicubic(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize in fp32, clamped to [0, 1]; antialiased when shrinking."""
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0, 1)


def _pad_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(image, (0, pw, 0, ph), mode=mode)


def plan_for(upscaler: Upscaler, latent_hw: tuple[int, int], settings: UpscaleSettings) -> tuple[list[Tile], int]:
    """Latent tiles (and overlap in latent pixels) for the settings' tile size in output pixels."""
    h, w = latent_hw
    if settings.tile is None:
        return [Tile(0, 0, h, w)], 0
    s, p = upscaler.codec.scale, upscaler.dit.cfg.patch
    tile = max(p, settings.tile // s)
    overlap = min(max(0, settings.tile_overlap // s), tile - p)
    return plan_tiles(h, w, tile, overlap, multiple=p), overlap


def count_model_calls(upscaler: Upscaler, image_hw: tuple[int, int], settings: UpscaleSettings) -> int:
    """steps x tiles: the progress total of one image."""
    m = upscaler.alignment
    oh, ow = image_hw[0] * settings.scale, image_hw[1] * settings.scale
    lh, lw = (-(-oh // m) * m) // upscaler.codec.scale, (-(-ow // m) * m) // upscaler.codec.scale
    return settings.model_calls * len(plan_for(upscaler, (lh, lw), settings)[0])


@torch.no_grad()
def upscale(upscaler: Upscaler, image: torch.Tensor, settings: UpscaleSettings = UpscaleSettings(),
            context: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    """image [B, 3, h, w] in [0, 1] -> [B, 3, h * scale, w * scale] in [0, 1] (float32, on the model's device).

    `context`: text features [1, T, D] for models with a text stream; default: the upscaler's.
    """
    validate_image(image)
    context = upscaler.context if context is None else context
    device, dtype = upscaler.device, upscaler.dit.compute_dtype
    out_hw = (image.shape[-2] * settings.scale, image.shape[-1] * settings.scale)
    reference = resize_bicubic(image.to(device), out_hw)
    cond = upscaler.codec.encode(_pad_to(reference, upscaler.alignment)).to(dtype)
    sigmas = settings.sigmas()

    noise = batch_noise(settings.seed, 0, cond)
    start = sigmas[0].item()
    x = noise if start >= 1 else (1 - start) * cond + start * noise

    tiles, overlap = plan_for(upscaler, cond.shape[-2:], settings)
    total, done = settings.model_calls * len(tiles), 0

    def tick(*_):
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def window_velocity(x_tile, sigma, target, tile: Tile):
        window = (slice(None), slice(None), slice(tile.y0, tile.y0 + tile.h), slice(tile.x0, tile.x0 + tile.w))
        ctx = None if context is None else context.to(device, dtype)
        return upscaler.dit(x_tile, cond[window], sigma, target, ctx)

    denoise = tiled_denoiser(window_velocity, tiles, *cond.shape[-2:], overlap, on_tile=tick)
    latent = sample(denoise, x, sigmas, settings.mode,
                    noise=lambda i: batch_noise(settings.seed, 1 + i, cond), stochasticity=settings.stochasticity)
    if not torch.isfinite(latent).all():
        raise FloatingPointError(f"the model produced NaN/inf values (compute dtype {dtype}); "
                                 "retry in float32 or with another dtype")
    result = upscaler.codec.decode(latent.float())[..., :out_hw[0], :out_hw[1]].clamp(0, 1)
    return color_fix(result, reference, settings.color_fix)


def upscale_settings(**kwargs) -> UpscaleSettings:
    """UpscaleSettings from keyword options, ignoring None values (CLI / node inputs)."""
    return replace(UpscaleSettings(), **{k: v for k, v in kwargs.items() if v is not None})
