"""The Qwen-Image path end to end on the CPU, with random weights in the real shapes.

A Qwen-Image VAE (full Wan 2.1 architecture, random values) in ComfyUI's layout (built with ComfyUI's
WanVAE) and in diffusers' (built with diffusers' AutoencoderKLQwenImage), a small Qwen-Image-shaped
DiT (two blocks, Qwen-Image's key names, its 16 latent channels and 3584-dim text features), and a
text-features file written by the TEASR Save Text Features node: `train.distill` distils a few steps
and its checkpoint upscales through the CLI (`--vae`) and the TEASR Loader (VAE input) alike.
Images are 16 px crops: the VAE is full size, and its causal 3-D convolutions took 20 s to encode one
32 px image on this (shared, 2-core) CPU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import shared_path
from teasr_core.__main__ import main as cli
from teasr_core.codecs.codec import is_local
from teasr_core.codecs.qwen_vae import LATENT_MEAN, LATENT_STD, VAEMismatch, fingerprint, load_vae_codec, read_state_dict
from teasr_core.formats.layout import is_delta_key
from teasr_core.formats.load import read_metadata
from teasr_core.network.model import DualBranchDiT, preset
from test_checkpoint import randomize
from train.distill import main as distill

# Qwen-Image's DiT at two blocks and 64 wide: its key names, latent channels and text-feature width
DIT = preset("tiny", in_channels=16, context_dim=3584, rope_axes=(4, 14, 14))
# Qwen-Image's VAE: Wan 2.1's architecture (diffusers' AutoencoderKLQwenImage defaults)
WAN21 = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)


def random_values(state: dict, seed: int) -> dict:
    """Values a trained VAE could have: norm gains near 1, fan-in-scaled weights, small biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("gamma"):
            out[name] = 1 + 0.1 * noise
        elif t.ndim > 1:
            out[name] = noise / math.sqrt(t[0].numel())
        else:
            out[name] = 0.01 * noise
    return {k: v.to(torch.bfloat16) for k, v in out.items()}   # the released files are bf16


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from comfy.ldm.wan.vae import WanVAE
    from diffusers import AutoencoderKLQwenImage
    root = tmp_path_factory.mktemp("qwen")
    comfy_vae = root / "qwen_image_vae.safetensors"
    with torch.device("meta"):
        shapes = WanVAE(**WAN21).state_dict()
    safetensors.torch.save_file(random_values(shapes, 0), str(comfy_vae))
    diffusers_vae = root / "Qwen-Image" / "vae"
    diffusers_vae.mkdir(parents=True)
    with torch.device("meta"):
        shapes = AutoencoderKLQwenImage().state_dict()
    safetensors.torch.save_file(random_values(shapes, 1), str(diffusers_vae / "diffusion_pytorch_model.safetensors"))

    torch.manual_seed(0)
    base = DualBranchDiT(DIT)
    randomize(base, seed=2)
    base_file = root / "qwen_image_tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items() if not is_delta_key(k)},
                                str(base_file))
    return {"comfy_vae": comfy_vae, "diffusers_vae": diffusers_vae.parent, "base": base_file, "root": root}


def test_both_vae_layouts_run_on_comfyui_and_match_their_own_implementations(files):
    from comfy.sd import VAE
    from diffusers import AutoencoderKLQwenImage
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1)

    codec = load_vae_codec(files["comfy_vae"])
    assert not is_local(codec)       # the pipeline tiles it with overlap, never maps row bands on their own
    comfy_vae = VAE(sd=read_state_dict(files["comfy_vae"]))
    raw = comfy_vae.encode(image.movedim(1, -1))[:, :, 0].float()         # ComfyUI's own encode: unnormalised
    latent = codec.encode(image)
    assert latent.shape == (1, 16, 2, 4) and torch.allclose(latent, (raw - mean) / std, atol=1e-4)
    decoded = comfy_vae.decode(raw[:, :, None])[:, 0].movedim(-1, 1).float()
    assert torch.allclose(codec.decode(latent).clamp(0, 1), decoded, atol=1e-4)

    codec = load_vae_codec(files["diffusers_vae"])                      # the pipeline folder; keys renamed
    reference = AutoencoderKLQwenImage()
    reference.load_state_dict(safetensors.torch.load_file(str(files["diffusers_vae"] / "vae" /
                                                              "diffusion_pytorch_model.safetensors")))
    with torch.no_grad():
        mu = reference.encode(image[:, :, None] * 2 - 1).latent_dist.mode()[:, :, 0]
        latent = codec.encode(image)
        assert torch.allclose(latent, (mu - mean) / std, atol=1e-4)
        pixels = reference.decode(mu[:, :, None]).sample[:, :, 0]          # clamped to [-1, 1]
        torch.testing.assert_close(codec.decode(latent).clamp(0, 1) * 2 - 1, pixels, atol=1e-3, rtol=0)
    other = load_vae_codec(files["comfy_vae"]).config["fingerprint"]
    assert codec.config["fingerprint"] == fingerprint(read_state_dict(files["diffusers_vae"])) != other


@pytest.fixture(scope="module")
def trained(files, pack):
    """The text-features node's file, then `train.distill` on the base with the diffusers-layout VAE."""
    import folder_paths
    folder_paths.output_directory = str(files["root"])
    conditioning = [[torch.randn(1, 6, 3584, generator=torch.Generator().manual_seed(3)), {}]]
    pack.nodes.text_features.TEASRSaveTextFeatures.execute(conditioning, "features/empty_prompt")
    context = files["root"] / "features" / "empty_prompt_00001_.safetensors"
    out = files["root"] / "run"
    threads = torch.get_num_threads()
    try:
        distill(["--base", str(files["base"]), "--vae", str(files["diffusers_vae"]), "--context-file", str(context),
                 "--no-full-finetune", "--lora-ranks", "4", "4", "--data", str(shared_path("data", "train_pool")),
                 "--crop", "16", "--batch", "1", "--max-steps", "2", "--sample-every", "2", "--sample-images", "1",
                 "--w-lpips", "0", "--out", str(out), "--cpu-threads", "2"])     # LPIPS' AlexNet needs > 16 px
    finally:
        torch.set_num_threads(threads)
    return {**files, "context": context, "conditioning": conditioning, "run": out,
            "checkpoint": out / "checkpoints" / "step-00000002.safetensors"}


def test_distilled_checkpoint_records_its_latent_space(trained):
    meta = read_metadata(trained["checkpoint"])
    assert meta["kind"] == "lora" and meta["dit"]["in_channels"] == 16 and meta["dit"]["context_dim"] == 3584
    codec = meta["codec"]
    assert codec["name"] == "qwen-image-vae" and codec["latent_mean"] == list(LATENT_MEAN)
    assert codec["file"] == "Qwen-Image" and codec["fingerprint"] == fingerprint(read_state_dict(trained["diffusers_vae"]))
    assert (trained["run"] / "samples" / "step-00000002.png").is_file()


@pytest.fixture(scope="module")
def cli_output(trained):
    lr = Image.open(sorted(shared_path("data", "train_pool").rglob("*.jpg"))[0]).convert("RGB").crop((0, 0, 8, 4))
    lr.save(trained["root"] / "lr.png")
    out = trained["root"] / "x4.png"
    assert cli(["upscale", str(trained["root"] / "lr.png"), str(out), "--checkpoint", str(trained["checkpoint"]),
                "--base", str(trained["base"]), "--vae", str(trained["diffusers_vae"]),
                "--text-features", str(trained["context"]), "--steps", "2", "--start-strength", "1",
                "--dtype", "fp32"]) == 0   # as the Loader below (auto is bf16 on CPUs with native bf16)
    return lr, np.asarray(Image.open(out), dtype=np.float32)


def test_cli_upscales_with_the_vae_file(cli_output):
    lr, out = cli_output
    assert out.shape == (16, 32, 3)


def test_loader_node_with_comfyuis_vae_gives_the_cli_image(trained, cli_output, pack, teasr_dir):
    import shutil
    import folder_paths
    from comfy.sd import VAE
    from pathlib import Path
    shutil.copy(trained["checkpoint"], Path(teasr_dir) / "qwen_teasr.safetensors")
    base_dir = Path(folder_paths.models_dir) / "diffusion_models"
    folder_paths.add_model_folder_path("diffusion_models", str(base_dir), is_default=True)
    base_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained["base"], base_dir / "qwen_image_tiny.safetensors")
    vae = VAE(sd=read_state_dict(trained["diffusers_vae"]))
    model = pack.nodes.loader.TEASRLoader.execute("qwen_teasr.safetensors", "fp32", False,
                                                  base_model="qwen_image_tiny.safetensors", vae=vae).result[0]
    lr, cli_image = cli_output
    image = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255)[None]
    out = pack.nodes.sampler.TEASRAnyStepSampler.execute(
        model, image, steps=2, seed=0, mode="jump", shift=1.0, start_strength=1.0, color_fix="wavelet",
        conditioning=trained["conditioning"]).result[0]
    assert np.abs(out[0].numpy() * 255 - cli_image).max() <= 1.01     # 8-bit rounding apart


def test_a_vae_of_another_latent_space_is_refused(trained, comfy, capsys):
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"):
        shapes = TAESD(latent_channels=4).state_dict()
    taesd = trained["root"] / "taesd.safetensors"
    safetensors.torch.save_file(random_values(shapes, 4), str(taesd))
    with pytest.raises(VAEMismatch, match="4-channel TAESD.*16 channels"):
        distill(["--base", str(trained["base"]), "--vae", str(taesd), "--context-file", str(trained["context"]),
                 "--no-full-finetune", "--lora-ranks", "4", "4", "--data", str(shared_path("data", "train_pool")),
                 "--crop", "16", "--out", str(trained["root"] / "wrong")])
    assert cli(["upscale", str(trained["root"] / "lr.png"), str(trained["root"] / "wrong.png"),
                "--checkpoint", str(trained["checkpoint"]), "--base", str(trained["base"]), "--vae", str(taesd),
                "--text-features", str(trained["context"])]) == 2
    assert "4-channel TAESD" in capsys.readouterr().err
