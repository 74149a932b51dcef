"""`import-lora`: LoRA files in the TEASR authors' dual-LoRA naming become TEASR deltas that load like ours.

The files are synthetic, in exactly the precursor's layout: `<module>.linear.weight/bias` (the
frozen base), `<module>.lora_A1/B1` (noise tokens) and `lora_A2/B2` (condition tokens) as nn.Linear
weights, a DiffSynth wrapper prefix, and the second timestep embedder as the precursor's
`t_embedder_2.mlp.{0,2}`.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import safetensors.torch
import torch

from conftest import assert_close_rel
from teasr_core.__main__ import main
from teasr_core.formats.load import load_checkpoint, read_metadata
from teasr_core.formats.qwen_image import load_qwen_image_base
from teasr_core.network.lora import dual_lora_layers
from teasr_core.safetensors_io import CheckpointError
from test_checkpoint import QWEN_CFG, qwen_source, randomize, run, write_qwen


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    _, state = qwen_source()
    return write_qwen(tmp_path_factory.mktemp("base"), "comfy-bare", state)


def trained(base, ranks=(4, 3), alphas=None):
    """The model an author trained: the base, LoRA on both branches, a trained second embedder."""
    model = load_qwen_image_base(base, cfg=replace(QWEN_CFG, lora_ranks=ranks, lora_alphas=alphas))
    randomize(model, seed=7, only="lora_")
    randomize(model, seed=8, only="time_text_embed_2")
    return model


def authors_file(path, model, *, embedder="t_embedder_2.", leaves=("mlp.0", "mlp.2"), prefix="pipe.dit.", edit=None):
    """`model`'s LoRA and second embedder in the authors' naming (their layout of every wrapped Linear)."""
    tensors = {}
    for name, layer in dual_lora_layers(model):
        if any(layer.ranks):
            tensors.update({f"{name}.linear.weight": layer.weight, f"{name}.linear.bias": layer.bias,
                            f"{name}.lora_A1.weight": layer.lora_noise_A, f"{name}.lora_B1.weight": layer.lora_noise_B,
                            f"{name}.lora_A2.weight": layer.lora_cond_A, f"{name}.lora_B2.weight": layer.lora_cond_B})
    second = model.time_text_embed_2.timestep_embedder
    for leaf, linear in zip(leaves, (second.linear_1, second.linear_2)):
        tensors.update({f"{embedder}{leaf}.weight": linear.weight, f"{embedder}{leaf}.bias": linear.bias})
    tensors = {prefix + k: v.detach().bfloat16().float().clone() for k, v in tensors.items()}  # stored in bf16
    if edit:
        edit(tensors)
    safetensors.torch.save_file({k: v.bfloat16() for k, v in tensors.items()}, str(path))
    return path


def stored(model):
    """`model` with its LoRA and second embedder rounded to bf16, as an author's file stores them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("time_text_embed_2."):
                p.copy_(p.bfloat16().float())
    return model


@pytest.mark.parametrize("alphas, flags", [(None, []), ((0.0, 8.0), ["--alpha-noise", "0", "--alpha-cond", "8"])])
def test_imported_model_equals_the_model_built_directly(tmp_path, base, alphas, flags):
    model = stored(trained(base, alphas=alphas))
    lora = authors_file(tmp_path / "authors.safetensors", model)
    out = tmp_path / "teasr.safetensors"
    assert main(["import-lora", str(lora), "--base", str(base), "--out", str(out), *flags]) == 0

    meta = read_metadata(out)
    assert meta["kind"] == "lora" and meta["codec"]["name"] == "qwen-image-vae"
    imported = load_checkpoint(out, base=base).dit
    to_q = imported.transformer_blocks[0].attn.to_q
    assert to_q.ranks == ((0, 3) if alphas else (4, 3))     # alpha 0: the branch's LoRA is dropped
    assert_close_rel(run(imported), run(model))


def test_loader_takes_the_authors_file_directly(tmp_path, base):
    model = stored(trained(base))
    lora = authors_file(tmp_path / "authors.safetensors", model, prefix="", embedder="time_text_embed_2.",
                        leaves=("timestep_embedder.linear_1", "timestep_embedder.linear_2"))
    direct = load_checkpoint(lora, base=base)
    assert direct.codec["name"] == "qwen-image-vae"
    assert_close_rel(run(direct.dit), run(model))
    with pytest.raises(CheckpointError, match="dual-LoRA file.*base"):
        load_checkpoint(lora)


def test_second_embedder_under_a_given_prefix_or_copied_from_the_base(tmp_path, base):
    model = stored(trained(base))
    lora = authors_file(tmp_path / "custom.safetensors", model, embedder="cond_t_embedder.")
    out = tmp_path / "custom_teasr.safetensors"
    assert main(["import-lora", str(lora), "--base", str(base), "--out", str(out),
                 "--embedder-prefix", "cond_t_embedder"]) == 0
    assert_close_rel(run(load_checkpoint(out, base=base).dit), run(model))

    without = authors_file(tmp_path / "no_embedder.safetensors", model,
                           edit=lambda t: [t.pop(k) for k in list(t) if "t_embedder_2" in k])
    with torch.no_grad():   # the precursor's rule: a missing second embedder starts as a copy of the first
        model.time_text_embed_2.load_state_dict(model.time_text_embed.state_dict())
    imported = load_checkpoint(without, base=base).dit
    assert_close_rel(run(imported), run(model))


def test_missing_and_extra_keys_are_named(tmp_path, base, capsys):
    def damage(tensors):
        del tensors["pipe.dit.transformer_blocks.1.attn.to_v.lora_B2.weight"]
        tensors["pipe.dit.transformer_blocks.0.attn.add_q_proj.lora_A1.weight"] = torch.zeros(4, 64)  # text stream
        tensors["pipe.dit.transformer_blocks.0.img_mlp.net.2.lora_A1.weight"] = torch.zeros(4, 7)     # wrong width
        tensors["pipe.dit.some_other.weight"] = torch.zeros(2)

    lora = authors_file(tmp_path / "damaged.safetensors", trained(base), edit=damage)
    assert main(["import-lora", str(lora), "--base", str(base), "--out", str(tmp_path / "x.safetensors")]) == 2
    message = capsys.readouterr().err
    for expected in ("1 missing: transformer_blocks.1.attn.to_v.lora_B2.weight",
                     "transformer_blocks.0.attn.add_q_proj.lora_A1.weight", "some_other.weight",
                     "transformer_blocks.0.img_mlp.net.2.lora_A1.weight (file [4, 7], model [4, 256])"):
        assert expected in message, message
    assert not (tmp_path / "x.safetensors").exists()


def test_a_file_without_the_naming_is_refused(tmp_path, base, capsys):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"to_q.lora_A.weight": torch.zeros(2, 2)}, str(plain))
    assert main(["import-lora", str(plain), "--base", str(base), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not in the dual-LoRA naming" in capsys.readouterr().err
