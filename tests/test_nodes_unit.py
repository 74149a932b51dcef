"""The V3 nodes called in-process (no server): schema, loader, IMAGE layout, progress, interrupt, OOM back-off,
text features. The `pack` fixture (conftest) imports the pack as ComfyUI does."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

NODE_IDS = ("TEASRLoader", "TEASRAnyStepSampler", "TEASRTiledUpscale", "TEASRSaveTextFeatures")
SAMPLING = dict(steps=2, seed=7, mode="jump", shift=1.0, start_strength=1.0, color_fix="wavelet")


def save_tiny(pack, path, seed=0, **overrides):
    """A random tiny pixel model (scale 4: 48 channels) unless overrides change the codec/config."""
    from teasr_pack.teasr_core.formats.checkpoint import save_checkpoint
    from teasr_pack.teasr_core.network.model import DualBranchDiT, preset
    codec = overrides.pop("codec", {"name": "pixel", "scale": 4})
    lora_only = overrides.pop("lora_only", False)
    torch.manual_seed(seed)
    return save_checkpoint(path, DualBranchDiT(preset("tiny", **overrides)), codec, preset="tiny", lora_only=lora_only)


@pytest.fixture(scope="session")
def tiny(pack, teasr_dir):
    from pathlib import Path
    save_tiny(pack, Path(teasr_dir) / "tiny.safetensors")
    return pack.nodes.loader.TEASRLoader.execute("tiny.safetensors", "auto", False).result[0]


class ProgressRecorder:
    """Stands in for comfy.utils.ProgressBar: keeps every (value, total) update."""

    instances: list["ProgressRecorder"] = []

    def __init__(self, total, node_id=None):
        self.total, self.updates = total, []
        ProgressRecorder.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total if total is not None else self.total))


@pytest.fixture
def progress(monkeypatch):
    import comfy.utils
    ProgressRecorder.instances = []
    monkeypatch.setattr(comfy.utils, "ProgressBar", ProgressRecorder)
    return ProgressRecorder.instances


def sample(pack, model, image, **kw):
    return pack.nodes.sampler.TEASRAnyStepSampler.execute(model, image, **{**SAMPLING, **kw}).result[0]


def tiled(pack, model, image, tile_size=0, tile_overlap=16, **kw):
    return pack.nodes.tiled.TEASRTiledUpscale.execute(model, image, **{**SAMPLING, **kw}, tile_size=tile_size,
                                                      tile_overlap=tile_overlap).result[0]


def bicubic_x4(image):
    return F.interpolate(image.movedim(-1, 1), scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)


def test_end_ratio_defaults_to_the_checkpoints_own(pack, tiny):
    from dataclasses import replace
    from teasr_pack.teasr_core.sampling import ModelSampling
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    own = sample(pack, replace(tiny, sampling=ModelSampling(end_ratio=0.85)), image, steps=3)      # end_ratio not given
    assert torch.equal(own, sample(pack, tiny, image, steps=3, end_ratio=0.85))
    assert not torch.equal(own, sample(pack, tiny, image, steps=3, end_ratio=-1.0))  # tiny's own: uniform


# ---- registration and schema ---------------------------------------------------------------------
def test_registration_is_v3_only_and_lazy(pack):
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "V1 mappings would make ComfyUI ignore comfy_entrypoint"
    assert pack.WEB_DIRECTORY == "./web"
    assert [n.GET_SCHEMA().node_id for n in pack.node_list] == list(NODE_IDS)
    for node_id in NODE_IDS:
        assert (REPO / "web" / "docs" / f"{node_id}.md").is_file(), f"help page for {node_id}"
    source = (REPO / "__init__.py").read_text()
    assert "import comfy" not in source.split("async def comfy_entrypoint")[0]


def test_every_input_and_output_has_a_tooltip(pack):
    for node in pack.node_list:
        info = node.GET_NODE_INFO_V1()
        assert info["category"] == "image/upscaling/TEASR" and info["description"]
        assert info["display_name"].startswith("TEASR ")
        for group in ("required", "optional"):
            for name, (_, options) in info["input"].get(group, {}).items():
                assert options.get("tooltip"), f"{info['name']}.{name} has no tooltip"
        assert all(info["output_tooltips"]), info["name"]


def test_schema_inputs(pack):
    sampler = pack.nodes.sampler.TEASRAnyStepSampler.GET_NODE_INFO_V1()["input"]
    req = sampler["required"]
    assert req["model"][0] == "TEASR_MODEL" and req["image"][0] == "IMAGE"
    assert (req["steps"][1]["min"], req["steps"][1]["max"], req["steps"][1]["default"]) == (1, 50, 1)
    assert req["seed"][1]["control_after_generate"] is True
    assert req["mode"][1]["options"] == ["jump", "flowmap", "renoise"]
    assert req["color_fix"][1]["options"] == ["wavelet", "adain", "none"]
    assert set(sampler["optional"]) == {"timesteps", "end_ratio", "attention_tile", "conditioning"}
    assert sampler["optional"]["end_ratio"][1]["default"] == -1.0  # the model's own
    tiled_req = pack.nodes.tiled.TEASRTiledUpscale.GET_NODE_INFO_V1()["input"]["required"]
    assert tiled_req["tile_size"][1]["default"] == 0 and tiled_req["tile_overlap"][0] == "INT"
    loader = pack.nodes.loader.TEASRLoader.GET_NODE_INFO_V1()["input"]
    assert loader["required"]["checkpoint"][1]["options"][0] == "teasr-small (bundled)"
    assert loader["required"]["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    assert loader["optional"]["vae"][0] == "VAE"


def test_timesteps_are_validated_at_queue_time(pack):
    node = pack.nodes.sampler.TEASRAnyStepSampler
    assert node.validate_inputs(timesteps="") is True
    assert node.validate_inputs(timesteps="999, 500,250") is True
    assert "strictly decreasing" in node.validate_inputs(timesteps="250,500")
    assert "comma-separated" in pack.nodes.tiled.TEASRTiledUpscale.validate_inputs(timesteps="a,b")


def test_model_folder_is_registered_once_with_safetensors_only(pack, teasr_dir):
    import folder_paths
    paths, extensions = folder_paths.folder_names_and_paths["teasr"]
    assert extensions == {".safetensors", ".sft"}
    assert paths.count(teasr_dir) == 1 and teasr_dir.startswith(folder_paths.models_dir)
    asyncio.run(pack.extension.get_node_list())       # a second start-up must not duplicate the path
    assert folder_paths.folder_names_and_paths["teasr"][0].count(teasr_dir) == 1


# ---- loader --------------------------------------------------------------------------------------
def test_loader_wraps_the_model_for_comfy_memory_management(pack, tiny):
    from comfy.model_patcher import ModelPatcher
    assert isinstance(tiny.patcher, ModelPatcher)
    from teasr_pack.teasr_core.upscale.pipeline import default_dtype
    assert tiny.patcher.load_device.type == "cpu" and tiny.dit.compute_dtype == default_dtype("cpu")  # auto: as the CLI
    assert tiny.patcher.model_size() > 0 and tiny.name == "tiny"


def test_loader_dtype_and_listing(pack, teasr_dir, tiny):
    import folder_paths
    assert "tiny.safetensors" in folder_paths.get_filename_list("teasr")
    loader = pack.nodes.loader.TEASRLoader
    half = loader.execute("tiny.safetensors", "bf16", False).result[0]
    assert half.dit.compute_dtype == torch.bfloat16
    assert "tiny.safetensors" in loader.GET_NODE_INFO_V1()["input"]["required"]["checkpoint"][1]["options"]


def test_loader_bundled_choice_resolves_to_the_bundled_file(pack):
    from teasr_pack.teasr_core.formats.load import BUNDLED_CHECKPOINT
    from teasr_pack.teasr_core.safetensors_io import CheckpointError
    loader = pack.nodes.loader
    if BUNDLED_CHECKPOINT.is_file():
        assert loader.checkpoint_path(loader.BUNDLED) == BUNDLED_CHECKPOINT
    else:
        with pytest.raises(CheckpointError, match="bundled TEASR model"):
            loader.checkpoint_path(loader.BUNDLED)


def test_loader_reports_a_corrupt_checkpoint(pack, teasr_dir):
    from pathlib import Path
    from teasr_pack.teasr_core.safetensors_io import CheckpointError
    (Path(teasr_dir) / "broken.safetensors").write_bytes(b"\x80\x04garbage, not a safetensors header")
    with pytest.raises(CheckpointError, match="broken.safetensors is not a readable safetensors file"):
        pack.nodes.loader.TEASRLoader.execute("broken.safetensors", "auto", False)


def test_fingerprint_changes_when_the_checkpoint_is_rewritten(pack, teasr_dir):
    import os
    from pathlib import Path
    path = save_tiny(pack, Path(teasr_dir) / "retrained.safetensors")
    loader = pack.nodes.loader.TEASRLoader
    before = loader.fingerprint_inputs(checkpoint="retrained.safetensors")
    save_tiny(pack, path, seed=1)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs(checkpoint="retrained.safetensors") != before


class FakeVAE:
    """A ComfyUI VAE's interface (IMAGE [B, H, W, C] <-> raw latent) as lossless space-to-depth x2.

    latent_dim 3 mimics video VAEs (Wan / Qwen-Image): latents and decoded images carry a frame axis.
    """

    latent_channels = 12

    def __init__(self, latent_dim=2):
        self.latent_dim, self.batches = latent_dim, []

    def spacial_compression_encode(self):
        return 2

    def encode(self, pixels):
        self.batches.append(pixels.shape[0])
        z = F.pixel_unshuffle(pixels.movedim(-1, 1), 2)
        return z[:, :, None] if self.latent_dim == 3 else z

    def decode(self, z):
        image = F.pixel_shuffle(z[:, :, 0] if self.latent_dim == 3 else z, 2).movedim(1, -1)
        return image[:, None] if self.latent_dim == 3 else image


EXTERNAL = {"name": "external", "vae": "fake-s2d", "latent_mean": [0.5] * 12, "latent_std": [0.5] * 12}


@pytest.mark.parametrize("latent_dim", [2, 3])
def test_latent_checkpoint_runs_through_a_connected_vae(pack, teasr_dir, latent_dim):
    from pathlib import Path
    save_tiny(pack, Path(teasr_dir) / "latent.safetensors", in_channels=12, codec=EXTERNAL)
    vae = FakeVAE(latent_dim)
    model = pack.nodes.loader.TEASRLoader.execute("latent.safetensors", "auto", False, vae=vae).result[0]
    image = torch.rand(2, 12, 16, 3)
    out = sample(pack, model, image, steps=1)
    assert out.shape == (2, 48, 64, 3) and vae.batches == [1, 1]   # one image per encode: no frames mix-up


def test_latent_checkpoint_without_vae_says_what_to_connect(pack, teasr_dir):
    from pathlib import Path
    save_tiny(pack, Path(teasr_dir) / "latent.safetensors", in_channels=12, codec=EXTERNAL)
    with pytest.raises(ValueError, match="connect that VAE .* to the vae input"):
        pack.nodes.loader.TEASRLoader.execute("latent.safetensors", "auto", False)


def test_vae_with_the_wrong_channel_count_is_refused(pack, teasr_dir):
    from pathlib import Path
    codec = {**EXTERNAL, "latent_mean": [0.0] * 16, "latent_std": [1.0] * 16}
    save_tiny(pack, Path(teasr_dir) / "latent16.safetensors", in_channels=16, codec=codec)
    with pytest.raises(ValueError, match="12-channel latents.*16-channel"):
        pack.nodes.loader.TEASRLoader.execute("latent16.safetensors", "auto", False, vae=FakeVAE())


def test_pixel_checkpoint_ignores_a_connected_vae(pack, tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="teasr"):
        model = pack.nodes.loader.TEASRLoader.execute("tiny.safetensors", "auto", False, vae=FakeVAE()).result[0]
    assert model.codec.name == "pixel" and "not used" in caplog.text


def test_lora_checkpoint_loads_on_its_base_model(pack, teasr_dir):
    import folder_paths
    from pathlib import Path
    base_dir = Path(folder_paths.models_dir) / "diffusion_models"
    folder_paths.add_model_folder_path("diffusion_models", str(base_dir), is_default=True)
    save_tiny(pack, base_dir / "base.safetensors")
    save_tiny(pack, Path(teasr_dir) / "delta.safetensors", lora_ranks=(2, 2), lora_only=True)
    loader = pack.nodes.loader.TEASRLoader
    with pytest.raises(ValueError, match="LoRA checkpoint"):
        loader.execute("delta.safetensors", "auto", False)
    model = loader.execute("delta.safetensors", "auto", False, base_model="base.safetensors").result[0]
    assert model.dit.cfg.lora_ranks == (2, 2)


# ---- IMAGE layout, alpha, gray, batch -------------------------------------------------------------
def test_channel_split_round_trip(pack):
    common = pack.nodes.common
    for channels in (1, 2, 3, 4):
        image = torch.rand(2, 5, 7, channels)
        rgb, alpha, color = common.split_channels(image)
        assert rgb.shape == (2, 3, 5, 7)
        out = torch.empty_like(image)
        for index in range(2):
            canvas = common.ImageCanvas(out, index, color)
            canvas.write(0, canvas.convert(rgb[index:index + 1]))
            if alpha is not None:
                canvas.write(0, alpha[index:index + 1], first=color)
        torch.testing.assert_close(out, image)
    with pytest.raises(ValueError, match="C in 1..4"):
        common.split_channels(torch.rand(1, 5, 7, 6))


def test_rgb_output_layout_and_content(pack, tiny):
    image = torch.rand(1, 16, 20, 3)
    out = sample(pack, tiny, image)
    assert out.shape == (1, 64, 80, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    assert (out - bicubic_x4(image)).abs().mean() > 1e-3   # the model did something


def test_rgba_alpha_is_upscaled_bicubically_and_reattached(pack, tiny):
    image = torch.rand(1, 16, 20, 4)
    out = sample(pack, tiny, image)
    assert out.shape == (1, 64, 80, 4)
    torch.testing.assert_close(out[..., 3:], bicubic_x4(image[..., 3:]))
    torch.testing.assert_close(out[..., :3], sample(pack, tiny, image[..., :3]))   # colour ignores alpha


def test_grayscale_stays_grayscale(pack, tiny):
    out = sample(pack, tiny, torch.rand(1, 16, 20, 1))
    assert out.shape == (1, 64, 80, 1)


def test_batch_images_are_independent_of_their_position(pack, tiny):
    images = torch.rand(3, 16, 20, 3)
    batch = sample(pack, tiny, images)
    torch.testing.assert_close(batch[2:], sample(pack, tiny, images[2:]))


# ---- progress and interrupt ------------------------------------------------------------------------
def test_progress_total_is_steps_x_tiles_x_batch(pack, tiny, progress):
    tiled(pack, tiny, torch.rand(2, 32, 32, 3), tile_size=64, tile_overlap=16, steps=2)
    (bar,) = progress
    tiles = 9   # 128 px output, 64 px tiles with 16 px overlap: 3 x 3
    assert bar.total == 2 * tiles * 2
    values = [value for value, _ in bar.updates]
    assert values == list(range(1, bar.total + 1))


def test_interrupt_stops_the_sampler(pack, tiny, progress):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            tiled(pack, tiny, torch.rand(1, 32, 32, 3), tile_size=64, steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert progress[0].updates == []    # raised at the first model call, before any progress


# ---- memory: auto tile size, OOM back-off ----------------------------------------------------------
def test_auto_tile_is_untiled_when_the_image_fits_and_tiles_when_not(pack, tiny, monkeypatch):
    import comfy.model_management as mm
    tile_for = pack.nodes.tiled.auto_tile_size
    assert tile_for(tiny, (128, 128)) is None
    budget = tiny.window_bytes(64, 64) / pack.nodes.model.DEFAULT_BUDGET_SHARE
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: budget)
    assert tile_for(tiny, (512, 256)) == pack.nodes.tiled.TILE_FLOOR   # never below the floor
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: budget * 64)
    tile = tile_for(tiny, (2048, 2048))
    assert 128 < tile < 2048 and tiny.window_bytes(tile, tile) <= budget * 64 * pack.nodes.model.DEFAULT_BUDGET_SHARE


def test_cpu_memory_estimate_matches_the_documented_formula(pack, tiny):
    tiny.load((64, 64))
    cfg = tiny.dit.cfg
    tokens = 2 * (64 // 8) * (64 // 8) + cfg.null_context_tokens   # pixel scale 4 x patch 2 = 8 px per token
    element = tiny.dit.compute_dtype.itemsize   # 4 (fp32), or 2 where bf16 is native (auto)
    assert tiny.window_bytes(64, 64) == int(element * cfg.width * (16 + 3 * cfg.mlp_ratio) * tokens)


def test_cuda_cost_is_fitted_from_two_probe_forwards(pack, tiny, monkeypatch):
    """The probe arithmetic, with CUDA's allocator statistics faked (no GPU here): peak = a n + c n^2."""
    per_token, per_pair, seen = 3000.0, 0.5, []
    real_forward = tiny.dit.forward

    def forward(x, cond, sigma, target, context=None):
        seen.append(2 * (x.shape[-2] // 2) * (x.shape[-1] // 2) + tiny.dit.cfg.null_context_tokens)
        return real_forward(x, cond, sigma, target, context)
    monkeypatch.setattr(tiny.dit, "forward", forward)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 10**9)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 10**9 + per_token * seen[-1] + per_pair * seen[-1] ** 2)
    a, c = pack.nodes.model.measure_token_cost(tiny.dit, torch.device("cpu"))
    assert len(seen) == 2 and a == pytest.approx(per_token) and c == pytest.approx(per_pair)


def fake_memory_limit(monkeypatch, model, max_latent_side, calls):
    """The DiT raises CUDA's OOM error for windows larger than max_latent_side (a small GPU)."""
    real_forward = model.dit.forward

    def forward(x, *args, **kwargs):
        calls.append(x.shape[-1])
        if max(x.shape[-2:]) > max_latent_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(x, *args, **kwargs)
    monkeypatch.setattr(model.dit, "forward", forward)


def test_oom_halves_the_tile_until_it_fits(pack, tiny, monkeypatch, caplog):
    tiles = []
    real = pack.nodes.tiled.upscale_images
    monkeypatch.setattr(pack.nodes.tiled, "upscale_images",
                        lambda model, image, settings, c: tiles.append(settings.tile) or real(model, image, settings, c))
    calls = []
    fake_memory_limit(monkeypatch, tiny, max_latent_side=40, calls=calls)   # 160 px of output
    with caplog.at_level(logging.WARNING, logger="teasr"):
        out = tiled(pack, tiny, torch.rand(1, 128, 128, 3), tile_size=512, tile_overlap=32)
    assert tiles == [512, 256, 128] and out.shape == (1, 512, 512, 3)
    assert "retrying with 256 px tiles" in caplog.text


def test_oom_below_the_floor_gives_an_actionable_error(pack, tiny, monkeypatch):
    fake_memory_limit(monkeypatch, tiny, max_latent_side=8, calls=[])
    with pytest.raises(torch.OutOfMemoryError, match="even with 128 px tiles. Free memory"):
        tiled(pack, tiny, torch.rand(1, 64, 64, 3), tile_size=256)


def test_untiled_sampler_oom_points_to_the_tiled_node(pack, tiny, monkeypatch):
    fake_memory_limit(monkeypatch, tiny, max_latent_side=8, calls=[])
    with pytest.raises(torch.OutOfMemoryError, match="use TEASR Tiled Upscale"):
        sample(pack, tiny, torch.rand(1, 32, 32, 3))


@pytest.mark.parametrize("node", [sample, tiled])
def test_an_output_larger_than_free_memory_is_refused_before_any_work(pack, tiny, node, monkeypatch):
    """A 60000 x 60000 IMAGE (a broadcast view: no memory) would need a 691 GB output; both nodes say so
    at once, instead of allocating, or halving tiles that cannot help."""
    import comfy.model_management as mm
    forwards = []
    monkeypatch.setattr(tiny.dit, "forward", lambda *a, **k: forwards.append(1))
    huge = torch.zeros(1, 1, 1, 3).expand(1, 60000, 60000, 3)
    with pytest.raises(ValueError, match=r"1 x 240000x240000 \(643.7 GiB as a float32 IMAGE\), more than the [0-9.]+ "
                                         r"GiB of memory free on cpu. Upscale fewer images"):
        node(pack, tiny, huge)
    assert not forwards
    free = mm.get_free_memory(mm.intermediate_device())
    side = int((free / 2 / 4 / 3) ** 0.5 / 4)                     # an output of about half the free memory
    from teasr_pack.nodes.common import check_output_fits
    check_output_fits(torch.zeros(1, 1, 1, 3).expand(1, side, side, 3), 4)


def test_other_errors_are_not_mistaken_for_oom(pack, tiny, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("a real bug")
    monkeypatch.setattr(tiny.dit, "forward", broken)
    with pytest.raises(ValueError, match="a real bug"):
        tiled(pack, tiny, torch.rand(1, 32, 32, 3), tile_size=64)
    assert len(calls) == 1


# ---- text conditioning -----------------------------------------------------------------------------
def test_conditioning_is_required_by_text_models_and_ignored_by_others(pack, teasr_dir, tiny, caplog):
    from pathlib import Path
    save_tiny(pack, Path(teasr_dir) / "text.safetensors", context_dim=16)
    text = pack.nodes.loader.TEASRLoader.execute("text.safetensors", "auto", False).result[0]
    image = torch.rand(2, 16, 16, 3)
    with pytest.raises(ValueError, match="has a text stream"):
        sample(pack, text, image)
    conditioning = [[torch.randn(1, 5, 16), {"pooled_output": None}]]
    assert sample(pack, text, image, conditioning=conditioning).shape == (2, 64, 64, 3)
    with caplog.at_level(logging.WARNING, logger="teasr"):
        sample(pack, tiny, image, conditioning=conditioning)
    assert "no text stream" in caplog.text


# ---- packaging ---------------------------------------------------------------------------------------
def test_pyproject_matches_requirements_and_pins_comfyui(pack):
    import tomllib
    from teasr_pack.teasr_core.formats.load import BUNDLED_CHECKPOINT
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert project["project"]["dependencies"] == [line for line in lines if line]
    assert project["tool"]["comfy"]["requires-comfyui"] == ">=0.3.75"
    shipped = [REPO / path for path in project["tool"]["comfy"]["includes"]]
    assert any(folder in BUNDLED_CHECKPOINT.parents for folder in shipped), "the bundled model must ship"
    assert project["project"]["urls"]["Repository"]


def test_text_features_node_writes_the_trainers_context_file(pack, tmp_path, monkeypatch):
    import folder_paths
    from teasr_pack.teasr_core.formats.text_features import load_text_features
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    conditioning = [[torch.randn(2, 5, 16), {"pooled_output": None}], [torch.randn(1, 3, 16), {}]]
    node = pack.nodes.text_features.TEASRSaveTextFeatures
    out = node.execute(conditioning, "TEASR/text_features")
    node.execute(conditioning, "TEASR/text_features")
    first, second = sorted((tmp_path / "TEASR").glob("*.safetensors"))
    assert (first.name, second.name) == ("text_features_00001_.safetensors", "text_features_00002_.safetensors")
    assert torch.equal(load_text_features(first, 16), conditioning[0][0][0])   # the first prompt, [T, D]
    assert "5 tokens x 16 features" in json.dumps(out.ui.as_dict())
    with pytest.raises(ValueError, match="16-dim text features.*takes 40"):
        load_text_features(first, 40)
