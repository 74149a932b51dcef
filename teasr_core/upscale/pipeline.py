"""The one upscale code path shared by the CLI, the ComfyUI nodes and the trainer's sample grids.

image -> bicubic to the target size -> codec.encode -> condition latent; noise (a function of
position) -> any-step flow-map sampling, tiled or not -> codec.decode -> colour fix -> image.

Every stage streams row bands (tiling.blend_rows / RowStream), so memory follows the tile and the
image width, not the image: the reference is computed window by window from the small input, the
sampler steps run as a wavefront of row bands (step i + 1 starts on a band once step i has
finished the rows it reads), decoded rows are colour-fixed with the margin the wavelet reads and
written into a `Canvas` (the caller's output: a float tensor, ComfyUI's IMAGE, the CLI's 8/16-bit
array). Codecs with global statistics (TAEF2) or an external VAE hold their latent whole (1/6 of a
float32 image or less); the pixel codec's latent, as large as the image, is never held whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from ..codecs.build import codec_from_config
from ..codecs.codec import Codec, is_local, tiled_decode, tiled_encode
from ..network.model import DualBranchDiT
from ..sampling import (NOISE_CELL, ModelSampling, batch_sigma, check_mode, noise_field, sampler_step,
                        shifted_sigmas, sigmas_from_timesteps, step_target)
from ..tiling import Rows, RowStream, RunningMoments, Tile, blend_rows, gather, plan_tiles
from .color import COLOR_FIX_METHODS, WAVELET_RADIUS, adain_apply, wavelet_fix

Progress = Callable[[int, int], None]  # (done, total) after every model call
CONDITIONS = ("auto", "lr", "upscaled")  # UpscaleSettings.condition
CODEC_TILE = 1024      # output px per side of a codec (encode / decode) tile
ROW_BAND_PIXELS = 2 ** 20  # colour-fix band size: rows x output width (plus the wavelet margin)


class Canvas(Protocol):
    """Where the upscaled rows go: the caller's preallocated output (float tensor, IMAGE, 8/16-bit array).

    `convert` maps RGB rows [B, 3, h, W] to the planes it stores ([B, P, h, W], e.g. one for grayscale);
    `read` returns stored planes as floats in [0, 1] (adain's second pass rescales them in place).
    """

    def convert(self, rgb: torch.Tensor) -> torch.Tensor: ...
    def write(self, y0: int, planes: torch.Tensor) -> None: ...
    def read(self, y0: int, y1: int) -> torch.Tensor: ...


class TensorCanvas:
    """A float32 [B, 3, H, W] tensor: what `upscale` returns."""

    def __init__(self, shape: tuple[int, ...], device):
        self.image = torch.empty(shape, dtype=torch.float32, device=device)

    def convert(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb

    def write(self, y0: int, planes: torch.Tensor) -> None:
        self.image[..., y0:y0 + planes.shape[-2], :] = planes

    def read(self, y0: int, y1: int) -> torch.Tensor:
        return self.image[..., y0:y1, :]


@dataclass(frozen=True)
class UpscaleSettings:
    """Every knob of an upscale; the CLI flags and the node inputs map onto these names."""

    steps: int = 1
    scale: int = 4
    seed: int = 0
    mode: str = "jump"                    # one of sampling.MODES
    shift: float = 1.0                    # sigma-grid time shift (> 1 spends more steps at high noise)
    timesteps: tuple[float, ...] | None = None  # explicit 0..1000 timesteps; overrides steps/shift
    start_strength: float = 0.5           # 1 = from pure noise; < 1 = from the noised LR latent (the
                                          # bundled model is sharpest-yet-faithful at 0.5: README)
    end_ratio: float | None = None        # last step's strength / start_strength (0 = uniform grid);
                                          # None = the model's own (its checkpoint's "sampling" metadata)
    stochasticity: float = 1.0            # renoise mode: share of fresh noise per step
    tile: int | None = None               # tile side in output pixels; None = whole image at once
    tile_overlap: int = 64                # output pixels
    attention_tile: int | None = None     # transformer window side (output px) within a tile; 0 = the tile;
                                          # None = the model's own (ModelSampling)
    attention_overlap: int | None = None  # output px between transformer windows; None = the model's own
    color_fix: str = "wavelet"            # one of color.COLOR_FIX_METHODS
    condition: str = "auto"               # how the condition latent is made, one of CONDITIONS: "upscaled" =
                                          # encode the bicubic upscale (what the model trained on); "lr" = the
                                          # codec's LR head, 1/10 of the work (TAEF2Codec.encode_lr); "auto" =
                                          # "lr" where the codec has a head for this scale

    def __post_init__(self):
        check_mode(self.mode, self.stochasticity)
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown condition {self.condition!r}; choose one of {CONDITIONS}")
        if self.color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"unknown color fix {self.color_fix!r}; choose one of {COLOR_FIX_METHODS}")
        if not 1 <= self.scale <= 8:
            raise ValueError(f"scale must be in 1..8, got {self.scale}")
        ModelSampling(attention_tile=self.attention_tile or 0, attention_overlap=self.attention_overlap or 0)
        self.sigmas()  # validates steps / shift / start_strength / end_ratio / timesteps

    def sigmas(self, model: ModelSampling = ModelSampling()) -> torch.Tensor:
        """The noise levels; `model`'s end ratio is used when end_ratio is None."""
        if self.timesteps:
            return sigmas_from_timesteps(self.timesteps)
        end_ratio = model.end_ratio if self.end_ratio is None else self.end_ratio
        return shifted_sigmas(self.steps, self.shift, self.start_strength, end_ratio)

    @property
    def model_calls(self) -> int:
        return len(self.sigmas()) - 1

    def transformer_tile(self, model: ModelSampling) -> tuple[int | None, int]:
        """(window side, overlap) in output px the transformer runs in: the attention window (the settings',
        else the model's) where it is smaller than the tile; None = the whole image."""
        window = model.attention_tile if self.attention_tile is None else self.attention_tile
        if window and (self.tile is None or window < self.tile):
            return window, model.attention_overlap if self.attention_overlap is None else self.attention_overlap
        return self.tile, self.tile_overlap


def native_bf16(device) -> bool:
    """Whether bf16 matmuls and convolutions run natively: CUDA, or a CPU with AVX-512 BF16 or AMX.

    Why: on such CPUs bf16 is 2-4x faster than fp32; on AVX2-only ones it is emulated, ~45x slower.
    torch's `get_cpu_capability()` says "AVX512" for both kinds, so the flags are read from the kernel.
    """
    if torch.device(device).type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device) -> torch.dtype:
    """The transformer's: bf16 where it runs natively (`native_bf16`: CUDA, AVX-512 BF16 / AMX CPUs), else fp32.

    Why: on CPUs without native half-precision matmuls fp16/bf16 run 2-45x slower (the bundled file
    stores fp16: computing in it made its transformer 2.6x slower on an AVX2 CPU). Where bf16 is native,
    the transformer in 384-px attention windows is 1.25x faster in it at 4 steps, LPIPS within 0.001 of
    fp32 (BENCHMARKS.md, "The default upscale in under half of Real-ESRGAN's time").
    """
    return torch.bfloat16 if native_bf16(device) else torch.float32


def default_codec_dtype(device) -> torch.dtype:
    """The codec's: bf16 where it runs natively (`native_bf16`), else fp32.

    Why separate: the codec's convolutions at output resolution are most of a CPU upscale, and they
    run ~2x faster in bf16 on AVX-512 BF16 CPUs, where the transformer gained nothing (BENCHMARKS.md).
    """
    return torch.bfloat16 if native_bf16(device) else torch.float32


@dataclass
class Upscaler:
    """A DiT, the codec its latents live in, and (models with a text stream) default text features [1, T, D]."""

    dit: DualBranchDiT
    codec: Codec
    context: torch.Tensor | None = None
    sampling: ModelSampling = ModelSampling()   # how this model is best sampled (its checkpoint's metadata)

    @classmethod
    def from_checkpoint(cls, path=None, *, device="cpu", dtype=None, codec_dtype=None, fp8=False, codec: Codec | None = None,
                        base=None, vae=None) -> "Upscaler":
        """Load a TEASR checkpoint (the bundled default when path is None) to compute in `dtype`
        (default: `default_dtype(device)`, whatever the file stores), its codec in `codec_dtype`
        (default: `dtype` when given, else `default_codec_dtype(device)` for TAEF2 and the
        transformer's dtype for an external VAE): precision per stage.

        Latent models whose VAE lives outside this library (e.g. Qwen-Image's) need that VAE: its
        file as `vae`, or a ready `codec`.
        """
        from ..formats.load import bundled_checkpoint_path, load_checkpoint
        compute = dtype or default_dtype(device)
        ckpt = load_checkpoint(path or bundled_checkpoint_path(), device=device, dtype=compute, fp8=fp8, base=base)
        if codec_dtype is None:   # auto: bf16 where native for this library's TAEF2 (its fp32 ends keep outputs
            # precise); an external VAE (Qwen-Image's, ComfyUI's code) in the transformer's, as ComfyUI runs it
            own_codec = ckpt.codec.get("name") == "taef2"
            codec_dtype = dtype or (default_codec_dtype(device) if own_codec else compute)
        codec = codec or codec_from_config(ckpt.codec, device=device, vae=vae, dtype=codec_dtype,
                                           tensors=ckpt.codec_tensors)
        return cls(ckpt.dit, codec, sampling=ckpt.sampling)

    @property
    def device(self) -> torch.device:
        return self.dit.time_text_embed.timestep_embedder.linear_1.weight.device

    @property
    def alignment(self) -> int:
        """Output sizes are padded to a multiple of this (codec scale x patch size)."""
        return self.codec.scale * self.dit.cfg.patch


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


def bicubic_rows(image: torch.Tensor, scale: int) -> Iterator[Rows]:
    """The bicubic upscale of `image` [B, C, h, w] in row bands (e.g. an alpha channel next to the model's RGB)."""
    reference = Reference(image, scale)
    (h, w), band = reference.out_hw, max(1, ROW_BAND_PIXELS // reference.out_hw[1])
    for y0 in range(0, h, band):
        yield y0, reference.window(y0, min(y0 + band, h), 0, w)


class Reference:
    """The bicubic upscale of `image` [B, C, h, w], padded to `padded_hw`, computed window by window.

    A window reads the input rows / columns it needs plus bicubic's 2-pixel support, so it equals
    the same window of the whole upscale. Padding past the output size mirrors the upscale (reflect;
    replicate when the padding is not smaller than the image), as the codec needs aligned sizes.
    Scale 1: the image itself, mirrored past its edges likewise (what the codec's LR head reads).
    """

    def __init__(self, image: torch.Tensor, scale: int, padded_hw: tuple[int, int] | None = None):
        self.image, self.scale = image.float(), scale
        self.out_hw = (image.shape[-2] * scale, image.shape[-1] * scale)
        self.padded_hw = padded_hw or self.out_hw
        pads = [p - o for p, o in zip(self.padded_hw, self.out_hw)]
        self.reflect = all(pad < size for pad, size in zip(pads, self.out_hw))

    def _sources(self, start: int, stop: int, size: int) -> torch.Tensor:
        index = torch.arange(start, stop)
        mirrored = 2 * (size - 1) - index if self.reflect else torch.full_like(index, size - 1)
        return torch.where(index < size, index, mirrored)

    def window(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        rows, cols = self._sources(y0, y1, self.out_hw[0]), self._sources(x0, x1, self.out_hw[1])
        s, (h, w) = self.scale, self.image.shape[-2:]
        ly0, ly1 = max(0, int(rows.min()) // s - 2), min(h, int(rows.max()) // s + 3)
        lx0, lx1 = max(0, int(cols.min()) // s - 2), min(w, int(cols.max()) // s + 3)
        up = self.image[..., ly0:ly1, lx0:lx1]
        if s != 1:
            up = resize_bicubic(up, ((ly1 - ly0) * s, (lx1 - lx0) * s))
        up = up.index_select(-2, (rows - ly0 * s).to(up.device))
        return up.index_select(-1, (cols - lx0 * s).to(up.device))


def plan_for(upscaler: Upscaler, latent_hw: tuple[int, int], settings: UpscaleSettings) -> tuple[list[Tile], int]:
    """The transformer's latent tiles and their overlap in latent pixels (UpscaleSettings.transformer_tile)."""
    h, w = latent_hw
    tile_px, overlap_px = settings.transformer_tile(upscaler.sampling)
    if tile_px is None:
        return [Tile(0, 0, h, w)], 0
    s, p = upscaler.codec.scale, upscaler.dit.cfg.patch
    tile = max(p, tile_px // s)
    overlap = min(max(0, overlap_px // s), tile - p)
    return plan_tiles(h, w, tile, overlap, multiple=p), overlap


def count_model_calls(upscaler: Upscaler, image_hw: tuple[int, int], settings: UpscaleSettings) -> int:
    """steps x tiles: the progress total of one image."""
    m = upscaler.alignment
    oh, ow = image_hw[0] * settings.scale, image_hw[1] * settings.scale
    lh, lw = (-(-oh // m) * m) // upscaler.codec.scale, (-(-ow // m) * m) // upscaler.codec.scale
    return settings.model_calls * len(plan_for(upscaler, (lh, lw), settings)[0])


def upscale(upscaler: Upscaler, image: torch.Tensor, settings: UpscaleSettings = UpscaleSettings(),
            context: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    """image [B, 3, h, w] in [0, 1] -> [B, 3, h * scale, w * scale] in [0, 1] (float32, on the model's device).

    `context`: text features [1, T, D] for models with a text stream; default: the upscaler's.
    """
    validate_image(image)
    canvas = TensorCanvas((image.shape[0], 3, image.shape[-2] * settings.scale, image.shape[-1] * settings.scale),
                          upscaler.device)
    upscale_into(upscaler, image, canvas, settings, context, progress)
    return canvas.image


@torch.no_grad()
def upscale_into(upscaler: Upscaler, image: torch.Tensor, canvas: Canvas,
                 settings: UpscaleSettings = UpscaleSettings(), context: torch.Tensor | None = None,
                 progress: Progress | None = None) -> None:
    """Upscale image [B, 3, h, w] in [0, 1] into `canvas`, row band by row band (see the module docstring);
    `context` as in `upscale`."""
    validate_image(image)
    context = upscaler.context if context is None else context
    device, dtype, codec = upscaler.device, upscaler.dit.compute_dtype, upscaler.codec
    out_hw = (image.shape[-2] * settings.scale, image.shape[-1] * settings.scale)
    m = upscaler.alignment
    padded_hw = (-(-out_hw[0] // m) * m, -(-out_hw[1] // m) * m)
    latent_hw = (padded_hw[0] // codec.scale, padded_hw[1] // codec.scale)
    reference = Reference(image.to(device), settings.scale, padded_hw)
    codec_tile = max(1, min(settings.tile or CODEC_TILE, CODEC_TILE) // codec.scale)
    condition = _condition(codec, reference, latent_hw, codec_tile, dtype, encodes_lr(codec, settings))

    sigmas = settings.sigmas(upscaler.sampling)
    tiles, overlap = plan_for(upscaler, latent_hw, settings)
    total, done = settings.model_calls * len(tiles), 0
    batch, channels = image.shape[0], upscaler.dit.cfg.in_channels
    ctx = None if context is None else context.to(device, dtype)

    def tick(*_):
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def noise(stream: int, y0: int, y1: int) -> torch.Tensor:
        field = noise_field(settings.seed, stream, channels, y0, 0, y1 - y0, latent_hw[1], device, dtype)
        return field.expand(batch, -1, -1, -1)

    def start_rows() -> Iterator[Rows]:
        start = sigmas[0].item()
        for y0 in range(0, latent_hw[0], NOISE_CELL):
            y1 = min(y0 + NOISE_CELL, latent_hw[0])
            x = noise(0, y0, y1)
            yield y0, x if start >= 1 else (1 - start) * condition(Tile(y0, 0, y1 - y0, latent_hw[1])) + start * x

    def step_rows(rows: Iterator[Rows], i: int) -> Iterator[Rows]:
        """Step i of the sampler over a stream of latent rows: per-tile velocities, blended, then the update."""
        stream, sigma, nxt = RowStream(rows), sigmas[i], sigmas[i + 1]
        target = step_target(settings.mode, sigmas, i)

        def velocity(tile: Tile) -> torch.Tensor:
            x = stream.rows(tile.y0, tile.y0 + tile.h)[..., tile.x0:tile.x0 + tile.w]
            return upscaler.dit(x, condition(tile), batch_sigma(sigma, x), batch_sigma(target, x), ctx)

        for y0, v in blend_rows(tiles, velocity, overlap, on_tile=tick):
            y1 = y0 + v.shape[-2]
            x = stream.rows(y0, y1)
            fresh = noise(1 + i, y0, y1) if settings.mode == "renoise" and nxt > 0 else None
            yield y0, sampler_step(settings.mode, x, v.to(x.dtype), sigma, nxt, fresh, settings.stochasticity)
            stream.release(y1)

    rows = start_rows()
    for i in range(len(sigmas) - 1):
        rows = step_rows(rows, i)
    pixels = _cropped(_decoded(codec, _finite(rows, dtype), codec_tile), out_hw)
    if settings.color_fix == "wavelet":
        pixels = _wavelet_fixed(pixels, reference)
    _paint(canvas, pixels, reference if settings.color_fix == "adain" else None)


def encodes_lr(codec: Codec, settings: UpscaleSettings) -> bool:
    """Whether the condition comes from the LR image itself (the codec's LR head) rather than its upscale."""
    has_head = getattr(codec, "lr_scale", None) == settings.scale
    if settings.condition == "lr" and not has_head:
        raise ValueError(f"condition 'lr' needs a codec with an LR head for x{settings.scale}; {codec.name} has "
                         f"{'one for x' + str(codec.lr_scale) if getattr(codec, 'lr_scale', None) else 'none'} "
                         "(use condition 'upscaled' or 'auto')")
    return has_head and settings.condition != "upscaled"


def _condition(codec: Codec, reference: Reference, latent_hw: tuple[int, int], tile: int,
               dtype: torch.dtype, from_lr: bool) -> Callable[[Tile], torch.Tensor]:
    """The condition latent per window: from the LR through the codec's LR head (`from_lr`), encoded on
    demand for local codecs, else once, tile by tile."""
    s = codec.scale
    if from_lr:   # the LR, mirrored past its edges as the upscale is (its padded size is the latent's x 2)
        lr = Reference(reference.image, 1, (latent_hw[0] * s // reference.scale, latent_hw[1] * s // reference.scale))
        whole = codec.encode_lr_tiled(lr.window, latent_hw, tile).to(dtype)
    elif is_local(codec):
        return lambda t: codec.encode(reference.window(t.y0 * s, (t.y0 + t.h) * s, t.x0 * s,
                                                       (t.x0 + t.w) * s)).to(dtype)
    else:
        encode = getattr(codec, "encode_tiled", None) or (lambda *args: tiled_encode(codec, *args))
        whole = encode(reference.window, latent_hw, tile).to(dtype)
    return lambda t: whole[..., t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]


def _finite(rows: Iterator[Rows], dtype: torch.dtype) -> Iterator[Rows]:
    for y0, latent in rows:
        if not torch.isfinite(latent).all():
            raise FloatingPointError(f"the model produced NaN/inf values (compute dtype {dtype}); "
                                     "retry in float32 or with another dtype")
        yield y0, latent


def _decoded(codec: Codec, rows: Iterator[Rows], tile: int) -> Iterator[Rows]:
    """Image rows of the final latent: row by row for local codecs, else tile by tile from the whole latent."""
    if is_local(codec):
        return ((y0 * codec.scale, codec.decode(latent.float())) for y0, latent in rows)
    decode = getattr(codec, "decode_tiled", None) or (lambda *args: tiled_decode(codec, *args))
    return decode(gather(rows).float(), tile)


def _cropped(rows: Iterator[Rows], out_hw: tuple[int, int]) -> Iterator[Rows]:
    """Drop the alignment padding (rows and columns past the output size); clamp to [0, 1]."""
    for y0, image in rows:
        if y0 < out_hw[0]:
            yield y0, image[..., :out_hw[0] - y0, :out_hw[1]].float().clamp(0, 1)


def _wavelet_fixed(rows: Iterator[Rows], reference: Reference) -> Iterator[Rows]:
    """Wavelet colour fix in row bands, each computed with WAVELET_RADIUS rows of margin: equal to the whole-image fix."""
    (h, w), r = reference.out_hw, WAVELET_RADIUS
    stream, band = RowStream(rows), max(2 * r, ROW_BAND_PIXELS // w)
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        lo, hi = max(0, y0 - r), min(h, y1 + r)
        fixed = wavelet_fix(stream.rows(lo, hi), reference.window(lo, hi, 0, w))
        yield y0, fixed[..., y0 - lo:y1 - lo, :].clamp(0, 1)
        stream.release(y1 - r)


def _paint(canvas: Canvas, rows: Iterator[Rows], adain_reference: Reference | None) -> None:
    """Write the rows into the canvas; adain needs the whole image's moments, so it rescales in a second pass."""
    image_moments, reference_moments = RunningMoments(), RunningMoments()
    for y0, rgb in rows:
        planes = canvas.convert(rgb)
        canvas.write(y0, planes)
        if adain_reference is not None:
            y1, w = y0 + rgb.shape[-2], adain_reference.out_hw[1]
            image_moments.add(planes)
            reference_moments.add(canvas.convert(adain_reference.window(y0, y1, 0, w)))
    if adain_reference is None:
        return
    moments = image_moments.moments(), reference_moments.moments()
    h, w = adain_reference.out_hw
    band = max(1, ROW_BAND_PIXELS // w)
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        canvas.write(y0, adain_apply(canvas.read(y0, y1), *moments).clamp(0, 1))


def upscale_settings(**kwargs) -> UpscaleSettings:
    """UpscaleSettings from keyword options, ignoring None values (CLI / node inputs)."""
    return replace(UpscaleSettings(), **{k: v for k, v in kwargs.items() if v is not None})
