"""A model's own decoder: carried inside its checkpoint, checked at load, trained by train.decoder_finetune."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from teasr_core.codecs.build import OWN_DECODER, codec_from_config
from teasr_core.codecs.taef2 import BUNDLED_WEIGHTS, LATENT_MEAN, LATENT_STD, WEIGHT_FILES, TAEF2Codec
from teasr_core.formats.checkpoint import checkpoint_metadata, save_checkpoint, write_checkpoint
from teasr_core.formats.load import load_checkpoint
from teasr_core.network.model import DualBranchDiT, preset
from teasr_core.upscale.pipeline import Upscaler, UpscaleSettings, upscale
from safetensors.torch import load_file
from test_pair_cache import make_cache

TAEF2 = {"name": "taef2", "latent_mean": list(LATENT_MEAN), "latent_std": list(LATENT_STD)}


def tiny_taef2_model() -> DualBranchDiT:
    torch.manual_seed(0)
    return DualBranchDiT(replace(preset("tiny"), in_channels=32))


def own_decoder() -> dict[str, torch.Tensor]:
    """TAEF2's decoder with every tensor changed a little: a stand-in for a fine-tuned one."""
    return {f"decoder.{k}": (v.float() * 1.01).half() for k, v in load_file(str(BUNDLED_WEIGHTS / WEIGHT_FILES[1])).items()}


@pytest.fixture(scope="module")
def with_decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "own.safetensors"
    save_checkpoint(path, tiny_taef2_model(), {**TAEF2, "decoder": OWN_DECODER}, preset="tiny",
                    codec_tensors=own_decoder())
    return path


def test_a_checkpoint_carries_its_decoder_into_the_codec(with_decoder):
    ckpt = load_checkpoint(with_decoder)
    assert len(ckpt.codec_tensors) == len(own_decoder()) and all(k.startswith("decoder.") for k in ckpt.codec_tensors)
    codec, plain = codec_from_config(ckpt.codec, tensors=ckpt.codec_tensors), TAEF2Codec()
    own = codec.decoder.state_dict()
    for key, value in own_decoder().items():
        assert torch.equal(own[key[len("decoder."):]], value.float())
    latent = torch.randn(1, 32, 4, 4)
    assert not torch.allclose(codec.decode(latent), plain.decode(latent), atol=1e-3)
    assert torch.equal(codec.encoder[0].weight, plain.encoder[0].weight)   # only the decoder is the model's
    upscaler = Upscaler.from_checkpoint(with_decoder, dtype=torch.float32)
    assert upscale(upscaler, torch.rand(1, 3, 16, 16), UpscaleSettings()).shape == (1, 3, 64, 64)


def test_decoder_and_codec_config_must_agree(with_decoder, tmp_path):
    model = tiny_taef2_model()
    with pytest.raises(ValueError, match="disagree"):
        save_checkpoint(tmp_path / "a.safetensors", model, {**TAEF2, "decoder": OWN_DECODER})
    with pytest.raises(ValueError, match="disagree"):
        save_checkpoint(tmp_path / "b.safetensors", model, TAEF2, codec_tensors=own_decoder())
    stripped = tmp_path / "stripped.safetensors"   # a file whose decoder tensors were lost
    write_checkpoint(stripped, dict(model.state_dict()),
                     checkpoint_metadata(model.cfg, {**TAEF2, "decoder": OWN_DECODER}, kind="full", preset="tiny"))
    with pytest.raises(ValueError, match="no codec.decoder"):
        Upscaler.from_checkpoint(stripped)
    ckpt = load_checkpoint(with_decoder)
    with pytest.raises(ValueError, match="does not use"):
        codec_from_config(TAEF2, tensors=ckpt.codec_tensors)
    broken = {k: v for k, v in ckpt.codec_tensors.items() if k != "decoder.1.weight"}
    broken["decoder.99.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['1.weight'\], unexpected keys \['99.weight'\]"):
        codec_from_config(ckpt.codec, tensors=broken)


def test_a_lora_delta_carries_the_decoder_too(with_decoder, tmp_path):
    """A delta trained over a model with its own decoder (train.distill saves it along) is self-contained."""
    base = load_checkpoint(with_decoder)
    lora = DualBranchDiT(replace(base.dit.cfg, lora_ranks=(2, 2)))
    lora.load_state_dict(base.dit.state_dict(), strict=False)
    delta = tmp_path / "delta.safetensors"
    save_checkpoint(delta, lora, base.codec, preset="tiny", lora_only=True, codec_tensors=base.codec_tensors)
    ckpt = load_checkpoint(delta, base=with_decoder)
    assert set(ckpt.codec_tensors) == set(own_decoder()) and ckpt.codec["decoder"] == OWN_DECODER
    codec_from_config(ckpt.codec, tensors=ckpt.codec_tensors)


def test_decoder_finetune_resumes_exactly_and_exports_a_loadable_model(tmp_path):
    """Samples of a tiny TAEF2-space model, a few fine-tune steps straight and stopped + resumed (the same
    decoder, bit for bit: the same computation), then the export upscales with the trained decoder inside."""
    from train.decoder_finetune import main as finetune
    cache, model = tmp_path / "pairs", tmp_path / "model.safetensors"
    make_cache(cache, 16)
    save_checkpoint(model, tiny_taef2_model(), TAEF2, preset="tiny")
    common = ["--pairs", str(cache), "--checkpoint", str(model), "--shards", "2", "--sample-steps", "1,2",
              "--end-ratio", "0", "--sample-batch", "4", "--batch", "2", "--val", "4", "--steps", "4", "--lr", "1e-3",
              "--warmup", "1", "--log-every", "2", "--val-every", "2", "--save-every", "2", "--threads", "1",
              "--precision", "fp32"]
    finetune([*common, "--out", str(tmp_path / "straight")])
    finetune([*common, "--out", str(tmp_path / "split"), "--stop-at", "2"])
    finetune([*common, "--out", str(tmp_path / "split"), "--resume"])
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("straight", "split")]
    assert set(logs[0][0]["val"]) == {"1", "2"} and logs[0][-1]["step"] == 4
    assert [r["l1"] for r in logs[0] if r["step"] > 2] == [r["l1"] for r in logs[1] if r["step"] > 2]
    exported = []
    for run in ("straight", "split"):
        out = tmp_path / f"{run}.safetensors"
        finetune([*common, "--out", str(tmp_path / run), "--export", str(out)])
        exported.append(load_checkpoint(out))
    assert all(torch.equal(exported[0].codec_tensors[k], exported[1].codec_tensors[k]) for k in exported[0].codec_tensors)
    assert exported[0].codec["decoder"] == OWN_DECODER and exported[0].sampling.end_ratio == 0
    assert exported[0].meta["training"]["decoder_finetune"]["steps"] == 4
    start = load_file(str(BUNDLED_WEIGHTS / WEIGHT_FILES[1]))
    assert any(not torch.equal(exported[0].codec_tensors[f"decoder.{k}"], v) for k, v in start.items())
    upscaler = Upscaler.from_checkpoint(tmp_path / "split.safetensors", dtype=torch.float32)
    assert upscale(upscaler, torch.rand(1, 3, 16, 16)).isfinite().all()
    half = tmp_path / "half.safetensors"   # --blend 0.5: half-way between TAEF2's decoder and the trained one
    finetune([*common, "--out", str(tmp_path / "split"), "--export", str(half), "--blend", "0.5"])
    blended = load_checkpoint(half).codec_tensors
    for k, v in start.items():
        want = (v.float() + exported[1].codec_tensors[f"decoder.{k}"].float()) / 2
        assert torch.allclose(blended[f"decoder.{k}"].float(), want, atol=2e-3, rtol=2e-3)   # fp16 storage
