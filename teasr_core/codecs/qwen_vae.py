"""The Qwen-Image VAE as a TEASR codec, run by ComfyUI's own implementation of it.

Qwen-Image's VAE is Wan 2.1's architecture (fine-tuned): 16 latent channels, 8x spatial
compression, causal 3-D convolutions over frames (an image is one frame). ComfyUI recognises it
from its state dict (`comfy.sd.VAE`) and runs `comfy.ldm.wan.vae.WanVAE`; this module hands it the
user's file in ComfyUI's layout (`qwen_image_vae.safetensors`) or diffusers' (`vae/` of a Qwen-Image
pipeline, renamed key by key to ComfyUI's names), and normalises latents per channel as Qwen-Image
does: z = (mu - latents_mean) / latents_std.

ComfyUI is imported only when a VAE is loaded: in ComfyUI's Python with this pack in
`ComfyUI/custom_nodes/`, or anywhere with TEASR_COMFYUI_DIR naming a ComfyUI folder.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

from ..safetensors_io import check_names, read_tensors
from .codec import check_image

CODEC_NAME = "qwen-image-vae"
LATENT_CHANNELS = 16
SCALE = 8
# Qwen-Image's per-channel latent statistics: `latents_mean` / `latents_std` of its vae/config.json
# (ComfyUI's latent_formats.Wan21 holds the same numbers).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
COMFY_MARKER = "decoder.middle.0.residual.0.gamma"     # ComfyUI's test for a Wan-architecture VAE
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
PACK_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("teasr")


class VAEMismatch(ValueError):
    """A VAE file that is not the one a model's latents need; the message names both."""


# ---- reading the file ----------------------------------------------------------------------------
# diffusers' residual block -> ComfyUI's `residual` Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv)
_RESNET = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
           ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _resnet(rest: str) -> str:
    for diffusers, comfy in _RESNET:
        if rest.startswith(diffusers):
            return comfy + rest[len(diffusers):]
    return rest


def _comfy_name(key: str, upsample_stride: int) -> str:
    """One diffusers AutoencoderKLQwenImage key under ComfyUI's (the original Wan) name."""
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for diffusers, comfy in top.items():
        if key.startswith(diffusers):
            return comfy + key[len(diffusers):]
    part, _, rest = key.partition(".")                      # encoder / decoder
    rules = (
        (r"conv_in\.(.*)", lambda m: f"conv1.{m[1]}"),
        (r"norm_out\.(.*)", lambda m: f"head.0.{m[1]}"),
        (r"conv_out\.(.*)", lambda m: f"head.2.{m[1]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"middle.{2 * int(m[1])}.{_resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle.1.{m[1]}"),
        (r"down_blocks\.(\d+)\.(.*)", lambda m: f"downsamples.{m[1]}.{_resnet(m[2])}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"upsamples.{upsample_stride * int(m[1]) + int(m[2])}.{_resnet(m[3])}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
         lambda m: f"upsamples.{upsample_stride * int(m[1]) + upsample_stride - 1}.{m[2]}"),
    )
    for pattern, rename in rules:
        match = re.fullmatch(pattern, rest)
        if match:
            return f"{part}.{rename(match)}"
    return key


def comfy_layout(tensors: dict) -> dict:
    """diffusers' key names -> ComfyUI's. A decoder stage is `resnets` then one upsampler in
    diffusers and one flat `upsamples` list in ComfyUI, so stage b's resnet r is item b * stride + r."""
    resnets = {int(m[1]) for k in tensors if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    stride = len(resnets) + 1
    return {_comfy_name(k, stride): v for k, v in tensors.items()}


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The VAE's tensors under ComfyUI's names, from a file in either layout or a diffusers `vae/` folder."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / DIFFUSERS_FILE).is_file() else path
        path = folder / DIFFUSERS_FILE
    tensors = read_tensors(path, "cpu")
    return comfy_layout(tensors) if DIFFUSERS_MARKER in tensors else tensors


def fingerprint(state_dict: dict) -> str:
    """A short hash that tells VAE weights apart, read from names, shapes and 64 values per tensor
    rounded to bf16, so fp32 and bf16 copies of the same file agree."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().flatten()
        sample = t[::max(1, t.numel() // 64)][:64].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(state_dict[name].shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def codec_config(file_name: str | None = None, weights_fingerprint: str | None = None) -> dict:
    """What a checkpoint records of its latent space: the VAE kind, Qwen-Image's normalisation, the file."""
    config = {"name": CODEC_NAME, "vae": "Qwen-Image VAE (Wan 2.1 architecture)", "scale": SCALE,
              "latent_mean": list(LATENT_MEAN), "latent_std": list(LATENT_STD)}
    if file_name:
        config.update(file=file_name, fingerprint=weights_fingerprint)
    return config


def check_same_vae(expected: dict, found_fingerprint: str, where: str) -> None:
    """Warn when a VAE's weights differ from those a checkpoint was trained with (a fine-tuned decoder
    of the same latent space is legitimate, a different VAE is not: the latents decode wrongly)."""
    recorded = expected.get("fingerprint")
    if recorded and recorded != found_fingerprint:
        log.warning("TEASR: the VAE %s (fingerprint %s) is not the file this model was trained with (%s, "
                    "fingerprint %s); if images look wrong, use that VAE", where, found_fingerprint,
                    expected.get("file"), recorded)


# ---- ComfyUI's implementation ----------------------------------------------------------------------
def import_comfy_sd():
    """ComfyUI's `comfy.sd`, from sys.path, TEASR_COMFYUI_DIR, the ComfyUI this pack is installed in,
    or the copy `scripts/setup.sh test` makes; forced to the CPU where torch has no CUDA."""
    try:
        import comfy  # noqa: F401  (inside ComfyUI it is already importable)
    except ImportError:
        candidates = [os.environ.get("TEASR_COMFYUI_DIR"), PACK_ROOT.parents[1], PACK_ROOT / ".cache" / "comfyui" / "ComfyUI"]
        found = next((Path(c) for c in candidates if c and (Path(c) / "comfy" / "sd.py").is_file()), None)
        if found is None:
            raise ImportError(
                "the Qwen-Image VAE runs on ComfyUI's implementation, and no ComfyUI was found: run this in "
                "ComfyUI's Python with the pack in ComfyUI/custom_nodes/, or set TEASR_COMFYUI_DIR to the "
                "ComfyUI folder (the one holding comfy/ and main.py)") from None
        sys.path.insert(0, str(found))
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True     # before comfy.model_management is imported, or it asserts CUDA
    import comfy.sd
    return comfy.sd


class QwenImageVAECodec:
    """TEASR's Codec on ComfyUI's Qwen-Image (Wan 2.1) VAE module, one frame per image; differentiable,
    since the trainer's pixel losses back-propagate through `decode`.

    Not local (its middle block attends over the whole image): the pipeline encodes and decodes it in
    feathered, overlapping tiles, with the overlap of nodes.model.ComfyVAECodec, so the CLI's `--vae`
    and the TEASR Loader's VAE input tile large images alike.
    """

    name = CODEC_NAME
    channels = LATENT_CHANNELS
    scale = SCALE
    tile_margin, tile_overlap = 0, 16   # latent px (teasr_core.codecs)

    def __init__(self, module: torch.nn.Module, config: dict, dtype: torch.dtype):
        self.module, self.config, self.dtype = module, config, dtype
        self.mean = torch.tensor(config["latent_mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(config["latent_std"]).view(1, -1, 1, 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, self.scale)
        mu = self.module.encode((image * 2 - 1).to(self.dtype)[:, :, None])[:, :, 0].float()
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.float() * self.std.to(latent.device) + self.mean.to(latent.device)
        return (self.module.decode(z.to(self.dtype)[:, :, None])[:, :, 0].float() + 1) / 2


def load_vae_codec(path, *, device="cpu", dtype: torch.dtype = torch.float32,
                   expected: dict | None = None) -> QwenImageVAECodec:
    """The Qwen-Image VAE in `path` (ComfyUI or diffusers layout) as a codec.

    `expected`: the codec config a checkpoint recorded. Its normalisation is used; a VAE of another
    latent space is refused, and other weights of the same kind are named in a warning.
    """
    path = Path(path)
    state = read_state_dict(path)
    comfy_sd = import_comfy_sd()
    from comfy.ldm.wan.vae import WanVAE
    try:
        vae = comfy_sd.VAE(sd=state)
    except RuntimeError as e:      # tensors of the wrong size for the architecture ComfyUI detected
        raise VAEMismatch(f"{path}: ComfyUI cannot load it as a VAE ({str(e)[:300]})") from None
    model = vae.first_stage_model
    if type(model) is not WanVAE or vae.latent_channels != LATENT_CHANNELS:
        kind = f"a {vae.latent_channels}-channel {type(model).__name__}" if model is not None else "no VAE it knows"
        raise VAEMismatch(f"{path} is not a Qwen-Image VAE: ComfyUI reads it as {kind}, while Qwen-Image latents "
                          f"have {LATENT_CHANNELS} channels (Wan 2.1 architecture, e.g. ComfyUI's "
                          "qwen_image_vae.safetensors)")
    check_names(path, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, "ComfyUI's Qwen-Image (Wan 2.1) VAE")
    weights = fingerprint(state)
    if expected is not None:
        if expected.get("name") != CODEC_NAME:
            raise VAEMismatch(f"this model's latents come from {expected.get('vae') or expected.get('name')!r}, "
                              f"not from a Qwen-Image VAE like {path}")
        check_same_vae(expected, weights, str(path))
    config = expected or codec_config(path.name, weights)
    return QwenImageVAECodec(model.to(device=device, dtype=dtype).eval().requires_grad_(False), config, dtype)
