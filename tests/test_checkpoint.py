"""Checkpoints: bit-exact round trips, LoRA deltas, fp8, atomic writes, Qwen-Image key layouts, refusals."""
from __future__ import annotations

import copy
import json
import pickle
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from teasr_core.formats import load as ckpt_module
from teasr_core.formats.checkpoint import save_checkpoint
from teasr_core.formats.load import load_checkpoint, read_metadata
from teasr_core.formats.qwen_image import infer_qwen_image_config, load_qwen_image_base
from teasr_core.network.lora import FP8
from teasr_core.network.model import DualBranchDiT, preset
from teasr_core.safetensors_io import CheckpointError
from teasr_core.upscale.pipeline import Upscaler, default_codec_dtype, default_dtype, native_bf16

from conftest import assert_close_rel

CODEC = {"name": "pixel", "scale": 4}          # 48 channels: the tiny preset's
# Qwen-shaped tiny model; rope_axes = what shape inference gives for 32-dim heads
QWEN_CFG = preset("tiny", in_channels=16, context_dim=40, rope_axes=(4, 14, 14))


def randomize(model: torch.nn.Module, seed: int = 0, only: str = "") -> None:
    """Non-trivial values (LoRA B included) in every parameter whose name contains `only`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run(model: DualBranchDiT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = model.cfg.in_channels
    x, cond = torch.randn(1, c, 4, 6, generator=g), torch.randn(1, c, 4, 6, generator=g)
    context = None if model.cfg.context_dim is None else torch.randn(1, 3, model.cfg.context_dim, generator=g)
    with torch.no_grad():
        return model(x, cond, torch.tensor([0.7]), torch.tensor([-0.2]), context)


def assert_same_weights(got: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    """Every tensor of `want` is in `got`'s state dict, bit for bit."""
    state = got.state_dict()
    assert all(torch.equal(state[k], v) for k, v in want.items())


def trained_tiny(**overrides) -> DualBranchDiT:
    """A tiny model with LoRA everywhere and two hand-merged layers, so per-layer ranks differ."""
    dit = DualBranchDiT(preset("tiny", **overrides)).eval()
    randomize(dit)
    dit.transformer_blocks[0].attn.to_q.merge_lora("noise")   # ranks (0, r_noise + r_cond)
    dit.transformer_blocks[1].img_mod[1].merge_lora("cond")   # ranks (r_noise + r_cond, 0)
    return dit


def rewrite(path, edit) -> None:
    """Re-save a safetensors file with edited tensors and the same metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


# ---- TEASR checkpoints ---------------------------------------------------------------------------
def test_full_round_trip_is_bit_exact_with_uneven_lora_ranks(tmp_path):
    dit = trained_tiny(lora_ranks=(4, 2), lora_alphas=(8.0, 3.0))
    path = save_checkpoint(tmp_path / "m.safetensors", dit, CODEC, preset="tiny", training={"steps": 7})
    assert not list(tmp_path.glob("*.tmp"))

    loaded = load_checkpoint(path)
    assert not loaded.dit.training
    assert loaded.codec == CODEC and loaded.meta["training"] == {"steps": 7} and loaded.name == "teasr-tiny-pixel"
    assert read_metadata(path) == loaded.meta
    merged = loaded.dit.transformer_blocks[0].attn.to_q
    assert merged.lora_noise_A is None and merged.ranks == (0, 6)
    for (name, a), (_, b) in zip(dit.named_modules(), loaded.dit.named_modules()):
        assert getattr(a, "ranks", None) == getattr(b, "ranks", None), name
        assert getattr(a, "alphas", None) == getattr(b, "alphas", None), name
    assert loaded.dit.state_dict().keys() == dit.state_dict().keys()
    assert_same_weights(loaded.dit, dit.state_dict())
    assert_close_rel(run(loaded.dit), run(dit))


def test_fp16_file_is_half_the_size_and_loads_within_fp16_tolerance(tmp_path):
    dit = trained_tiny(lora_ranks=(4, 4))
    full = save_checkpoint(tmp_path / "fp32.safetensors", dit, CODEC)
    half = save_checkpoint(tmp_path / "fp16.safetensors", dit, CODEC, dtype=torch.float16)
    assert half.stat().st_size < 0.52 * full.stat().st_size

    as_stored = load_checkpoint(half).dit
    assert {p.dtype for p in as_stored.parameters()} == {torch.float16}
    upcast = load_checkpoint(half, dtype=torch.float32).dit
    assert_close_rel(run(upcast), run(dit), 5e-3)
    # The upscaler computes in the device's dtype, not the file's: fp16 matmuls are slow on CPUs.
    assert Upscaler.from_checkpoint(half).dit.compute_dtype == default_dtype("cpu")
    assert Upscaler.from_checkpoint(half, dtype=torch.bfloat16).dit.compute_dtype == torch.bfloat16
    assert default_dtype("cuda:0") == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == (torch.bfloat16 if native_bf16("cpu") else torch.float32)


def test_precision_per_stage_codec_in_bf16_where_native():
    """auto: the transformer and the codec in bf16 only where bf16 is native; an explicit dtype: both."""
    assert default_codec_dtype("cuda:0") == torch.bfloat16
    assert default_codec_dtype("cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    auto = Upscaler.from_checkpoint()
    assert auto.dit.compute_dtype == default_dtype("cpu") and auto.codec.dtype == default_codec_dtype("cpu")
    fp32 = Upscaler.from_checkpoint(dtype=torch.float32)
    assert (fp32.dit.compute_dtype, fp32.codec.dtype) == (torch.float32, torch.float32)
    mixed = Upscaler.from_checkpoint(dtype=torch.float32, codec_dtype=torch.bfloat16)
    assert (mixed.dit.compute_dtype, mixed.codec.dtype) == (torch.float32, torch.bfloat16)


def test_lora_delta_on_a_full_base_equals_the_full_model(tmp_path):
    trained = trained_tiny(lora_ranks=(4, 2))
    base = copy.deepcopy(trained)
    randomize(base, seed=1, only="lora_")              # the base's own (pre-training) LoRA and embedder
    randomize(base, seed=2, only="time_text_embed_2")
    randomize(base, seed=3, only="null_context")
    base_path = save_checkpoint(tmp_path / "base.safetensors", base, CODEC, preset="tiny")
    delta = save_checkpoint(tmp_path / "delta.safetensors", trained, CODEC, preset="tiny", lora_only=True)

    with safe_open(str(delta), framework="pt") as f:
        names = list(f.keys())
    assert all(".lora_" in k or k.startswith("time_text_embed_2.") or k == "null_context" for k in names)
    assert read_metadata(delta)["kind"] == "lora"
    assert delta.stat().st_size < base_path.stat().st_size / 2

    with pytest.raises(CheckpointError, match="base"):
        load_checkpoint(delta)
    loaded = load_checkpoint(delta, base=base_path)
    assert loaded.dit.transformer_blocks[1].img_mod[1].ranks == (6, 0)
    assert_same_weights(loaded.dit, trained.state_dict())
    assert_close_rel(run(loaded.dit), run(trained))


def test_fp8_load_option_and_fp8_files(tmp_path):
    dit = trained_tiny(lora_ranks=(2, 2))
    path = save_checkpoint(tmp_path / "m.safetensors", dit, CODEC)
    fp8 = load_checkpoint(path, fp8=True).dit
    assert fp8.transformer_blocks[0].attn.to_k.weight.dtype == FP8
    assert_close_rel(run(fp8), run(dit), 0.05)

    # an fp8 model saved with dtype=bf16: fp8 weights and their fp32 scales stay as they are
    fp8_path = save_checkpoint(tmp_path / "fp8.safetensors", fp8, CODEC, dtype=torch.bfloat16)
    with safe_open(str(fp8_path), framework="pt") as f:
        assert f.get_slice("transformer_blocks.0.attn.to_k.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("transformer_blocks.0.attn.to_k.weight_scale").get_dtype() == "F32"
        assert f.get_slice("img_in.weight").get_dtype() == "BF16"
    reloaded = load_checkpoint(fp8_path, dtype=torch.float32).dit
    assert reloaded.transformer_blocks[0].attn.to_k.weight.dtype == FP8
    assert torch.equal(reloaded.transformer_blocks[0].attn.to_k.weight_scale,
                       fp8.transformer_blocks[0].attn.to_k.weight_scale)
    assert_close_rel(run(reloaded), run(fp8), 2e-2)


def test_save_is_atomic(tmp_path, monkeypatch):
    dit = DualBranchDiT(preset("tiny")).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", dit, CODEC)
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, trained_tiny(lora_ranks=(2, 2)), CODEC)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_shared_and_strided_tensors_are_saved(tmp_path):
    dit = DualBranchDiT(preset("tiny")).eval()
    with torch.no_grad():   # time_text_embed_2 as views of one buffer: shared storage, non-contiguous
        embedder = dit.time_text_embed_2.timestep_embedder
        embedder.linear_2.weight = torch.nn.Parameter(dit.time_text_embed.timestep_embedder.linear_2.weight.t())
    path = save_checkpoint(tmp_path / "m.safetensors", dit, CODEC)
    assert_same_weights(load_checkpoint(path).dit, dit.state_dict())


def test_codec_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="192-channel"):
        save_checkpoint(tmp_path / "m.safetensors", DualBranchDiT(preset("tiny")), {"name": "pixel", "scale": 8})


# ---- Qwen-Image base transformers ---------------------------------------------------------------
def qwen_source() -> tuple[DualBranchDiT, dict]:
    """A random Qwen-shaped model (embedder 2 = copy of 1) and its state dict under Qwen-Image's names."""
    torch.manual_seed(0)
    model = DualBranchDiT(QWEN_CFG).eval()
    randomize(model)
    model.time_text_embed_2.load_state_dict(model.time_text_embed.state_dict())
    state = {k: v for k, v in model.state_dict().items()
             if "lora_" not in k and not k.startswith("time_text_embed_2.") and k != "null_context"}
    return model, state


def scaled_fp8(state: dict) -> dict:
    """ComfyUI's scaled fp8: fp8 e4m3 weights, a per-tensor `scale_weight`, a `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.tensor([], dtype=FP8)}
    for name, t in state.items():
        if name.endswith(".weight") and t.ndim == 2:
            scale = t.abs().amax() / torch.finfo(FP8).max
            out[name] = (t / scale).to(FP8)
            out[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[name] = t
    out["transformer_blocks.0.attn.to_q.scale_input"] = torch.tensor(1.0)
    return out


def dequantized(fp8_state: dict) -> dict:
    """What a scaled-fp8 file means: weight * scale_weight, in float32."""
    return {name: t.float() * fp8_state[name.removesuffix("weight") + "scale_weight"] if t.dtype == FP8 else t
            for name, t in fp8_state.items() if name != "scaled_fp8" and "scale_" not in name}


def write_qwen(tmp_path, layout: str, state: dict):
    if layout == "diffusers-sharded":
        folder = tmp_path / "transformer"
        folder.mkdir()
        cfg = QWEN_CFG
        (folder / "config.json").write_text(json.dumps({
            "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": cfg.in_channels * 4,
            "out_channels": cfg.in_channels, "num_layers": cfg.depth, "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.heads, "joint_attention_dim": cfg.context_dim, "guidance_embeds": False,
            "axes_dims_rope": list(cfg.rope_axes)}))
        names = sorted(state)
        shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
        for shard, keys in shards.items():
            safetensors.torch.save_file({k: state[k] for k in keys}, str(folder / shard))
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
        return folder
    path = tmp_path / f"qwen_image_{layout}.safetensors"
    if layout == "comfy-prefixed":   # a full ComfyUI checkpoint: the VAE's keys are not ours to load
        state = {"model.diffusion_model." + k: v for k, v in state.items()}
        state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    elif layout == "comfy-scaled-fp8":
        state = scaled_fp8(state)
    safetensors.torch.save_file(state, str(path))
    return path


@pytest.mark.parametrize("layout", ["comfy-bare", "comfy-prefixed", "comfy-scaled-fp8", "diffusers-sharded"])
def test_qwen_image_layouts_load_with_inferred_config(tmp_path, layout):
    source, state = qwen_source()
    path = write_qwen(tmp_path, layout, state)
    assert infer_qwen_image_config(path) == QWEN_CFG

    dit = load_qwen_image_base(path)
    assert dit.cfg == QWEN_CFG and not dit.training
    first, second = dit.time_text_embed.state_dict(), dit.time_text_embed_2.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if layout == "comfy-scaled-fp8":
        to_q = dit.transformer_blocks[0].attn.to_q
        assert to_q.weight.dtype == FP8 and to_q.weight_scale.shape == (to_q.out_features,)
        assert torch.all(to_q.weight_scale == to_q.weight_scale[0])
        assert_close_rel(run(dit), run(source), 0.15)          # fp8 rounding through a random model
        source.load_state_dict(dequantized(scaled_fp8(state)), strict=False)
        source.time_text_embed_2.load_state_dict(source.time_text_embed.state_dict())
        assert_close_rel(run(dit), run(source))                # exact up to float round-off
    else:
        assert_same_weights(dit, state)
        assert_close_rel(run(dit), run(source))


def test_qwen_image_base_with_lora_config_starts_as_the_base(tmp_path):
    source, state = qwen_source()
    path = write_qwen(tmp_path, "comfy-bare", state)
    dit = load_qwen_image_base(path, cfg=replace(QWEN_CFG, lora_ranks=(4, 2)), dtype=torch.float32)
    to_v = dit.transformer_blocks[1].attn.to_v
    assert to_v.lora_noise_A.shape == (4, to_v.in_features) and to_v.lora_cond_B.shape == (to_v.out_features, 2)
    assert torch.count_nonzero(to_v.lora_noise_B) == 0 and torch.count_nonzero(to_v.lora_noise_A) > 0
    assert to_v.lora_noise_A.requires_grad and not to_v.weight.requires_grad
    assert_same_weights(dit, state)
    assert_close_rel(run(dit), run(source))


def test_lora_delta_on_a_qwen_image_base(tmp_path):
    _, state = qwen_source()
    base = write_qwen(tmp_path, "diffusers-sharded", state)
    trained = load_qwen_image_base(base, cfg=replace(QWEN_CFG, lora_ranks=(4, 2)))
    randomize(trained, seed=5, only="lora_")
    randomize(trained, seed=6, only="time_text_embed_2")
    delta = save_checkpoint(tmp_path / "delta.safetensors", trained, {"name": "external", "vae": "qwen-image",
                            "latent_mean": [0.0] * 16, "latent_std": [1.0] * 16}, lora_only=True)
    loaded = load_checkpoint(delta, base=base)
    assert loaded.codec["vae"] == "qwen-image"
    assert_same_weights(loaded.dit, trained.state_dict())
    assert_close_rel(run(loaded.dit), run(trained))


# ---- refusals and error messages ----------------------------------------------------------------
def never(*args, **kwargs):
    raise AssertionError("something tried to unpickle")


@pytest.mark.parametrize("name, zip_format", [("model.pth", True), ("model.ckpt", False)])
def test_pickles_are_refused_without_unpickling(tmp_path, monkeypatch, name, zip_format):
    path = tmp_path / name
    torch.save({"img_in.weight": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=zip_format)
    for target, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, attr, never)
    for load in (load_checkpoint, load_qwen_image_base, read_metadata):
        with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
            load(path)
        assert str(path) in str(e.value)


def test_random_bytes_and_truncated_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk)

    path = save_checkpoint(tmp_path / "m.safetensors", DualBranchDiT(preset("tiny")), CODEC)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    for load in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="truncated"):
            load(path)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt header"):
        load_checkpoint(path)


def test_base_transformer_passed_as_a_teasr_checkpoint_points_to_the_base_loader(tmp_path):
    _, state = qwen_source()
    path = write_qwen(tmp_path, "comfy-prefixed", state)
    with pytest.raises(CheckpointError, match="load_qwen_image_base.*--base"):
        load_checkpoint(path)


@pytest.mark.parametrize("sampling, why", [({"end_ratio": 1.2}, "end ratio must be a number in \\[0, 1\\), got 1.2"),
                                           ({"attention_tile": 384, "attention_overlap": 400}, "must be smaller"),
                                           ({"attention_tile": -16}, "attention_tile must be a whole number"),
                                           ({"window": 384}, "unknown sampling keys \\['window'\\]")])
def test_bad_sampling_metadata_is_refused_at_load(tmp_path, sampling, why):
    path = save_checkpoint(tmp_path / "m.safetensors", DualBranchDiT(preset("tiny")), CODEC, sampling=sampling)
    with pytest.raises(CheckpointError, match=why):
        Upscaler.from_checkpoint(path)


def test_unknown_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", DualBranchDiT(preset("tiny")), CODEC)
    meta = read_metadata(path)
    meta["format_version"] = 2
    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(tensors, str(path), metadata={"teasr": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(path)


def test_key_errors_name_the_keys_and_the_claimed_preset(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", DualBranchDiT(preset("tiny", lora_ranks=(2, 2))),
                           CODEC, preset="tiny")

    def damage(tensors):
        del tensors["transformer_blocks.1.attn.to_k.weight"]
        tensors["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
        tensors["img_in.bias"] = torch.zeros(5)

    rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    for expected in ("1 missing: transformer_blocks.1.attn.to_k.weight",
                     "1 unexpected: transformer_blocks.0.attn.extra.weight",
                     "1 with the wrong shape: img_in.bias (file [5], model [64])", "preset 'tiny'"):
        assert expected in message, message


def test_qwen_base_with_foreign_tensors_names_them(tmp_path):
    _, state = qwen_source()
    state["time_text_embed.guidance_embedder.linear_1.weight"] = torch.zeros(64, 256)
    del state["proj_out.bias"]
    path = write_qwen(tmp_path, "comfy-bare", state)
    with pytest.raises(CheckpointError, match="guidance_embedder.*proj_out.bias|proj_out.bias.*guidance_embedder"):
        load_qwen_image_base(path)


def test_bundled_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_module, "BUNDLED_CHECKPOINT", tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="absent.safetensors"):
        ckpt_module.bundled_checkpoint_path()
    present = save_checkpoint(tmp_path / "teasr-small.safetensors", DualBranchDiT(preset("tiny")), CODEC)
    monkeypatch.setattr(ckpt_module, "BUNDLED_CHECKPOINT", present)
    assert ckpt_module.bundled_checkpoint_path() == present
