"""LoRA files in the TEASR authors' dual-LoRA naming, as TEASR LoRA deltas over a Qwen-Image base.

The authors' precursor (Z-Image-SR-with-TwinFlow, built on DiffSynth-Studio) and their group's
ODTSR wrap every targeted Linear: the frozen base moves to `<module>.linear`, and two LoRAs sit beside
it, `<module>.lora_A1` / `lora_B1` for the first (noise) half of the image sequence and `lora_A2` /
`lora_B2` for the second (condition) half. They are nn.Linear weights (A [rank, in], B [out, rank]),
scaled by alpha / rank, and the alphas are not stored: the precursor trains with alpha1 = alpha2 =
rank, ODTSR with alpha1 = 0 (noise branch frozen at the base), alpha2 = rank. A second timestep
embedder for the condition branch (the precursor's `t_embedder_2`) may come with them.

Our delta keeps the same factors under our names (`lora_noise_A` = A1, ...), so the conversion is a
renaming, exact to the bit. `<module>.linear.*` and other copies of base tensors are checked for
shape and left out: the base is the one given.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..codecs.qwen_vae import codec_config
from ..network.lora import dual_lora_layers
from ..safetensors_io import CheckpointError, check_names, header_shapes, read_header, read_tensors
from .checkpoint import METADATA_KEY, checkpoint_metadata, write_checkpoint
from .layout import meta_model
from .qwen_image import infer_qwen_image_config, read_qwen_base_tensors

EMBEDDER = "time_text_embed_2."
EMBEDDER_PREFIXES = (EMBEDDER, "t_embedder_2.")        # ours, the precursor's
# sub-keys of a second embedder: ours / diffusers', bare, and the precursor's Z-Image `mlp` Sequential
EMBEDDER_LEAVES = {"timestep_embedder.linear_1": "linear_1", "timestep_embedder.linear_2": "linear_2",
                   "linear_1": "linear_1", "linear_2": "linear_2", "mlp.0": "linear_1", "mlp.2": "linear_2"}
LORA_KEY = re.compile(r"(.+)\.lora_([AB])([12])\.weight")
BASE_COPY = re.compile(r"(.+)\.linear\.(weight|bias)")
OURS = {("A", "1"): "lora_noise_A", ("B", "1"): "lora_noise_B", ("A", "2"): "lora_cond_A", ("B", "2"): "lora_cond_B"}
log = logging.getLogger("teasr")


def is_dual_lora_file(path) -> bool:
    """A safetensors file in the authors' naming, without TEASR metadata (reads the header only)."""
    path = Path(path)
    if path.is_dir():
        return False
    header = read_header(path)
    return (METADATA_KEY not in (header.get("__metadata__") or {})
            and any(LORA_KEY.fullmatch(name) for name in header_shapes(header)))


def _strip_file_prefix(tensors: dict) -> dict:
    """Drop a trainer's wrapper prefix (e.g. `pipe.dit.`): whatever precedes `transformer_blocks.`."""
    block = next((k for k in tensors if LORA_KEY.fullmatch(k) and "transformer_blocks." in k), "transformer_blocks.")
    prefix = block[:block.index("transformer_blocks.")]
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def _second_embedder(tensors: dict, prefixes) -> tuple[dict, set]:
    """Our `time_text_embed_2.*` from the first prefix that holds one, and the file keys it came from."""
    for prefix in prefixes:
        out, used = {}, set()
        for key, t in tensors.items():
            leaf, _, kind = key.removeprefix(prefix).rpartition(".")
            if key.startswith(prefix) and leaf in EMBEDDER_LEAVES:
                out[f"{EMBEDDER}timestep_embedder.{EMBEDDER_LEAVES[leaf]}.{kind}"] = t
                used.add(key)
        if used:
            return out, used
    return {}, set()


def convert_dual_lora(path, base, *, alpha_noise: float | None = None, alpha_cond: float | None = None,
                      embedder_prefix: str | None = None) -> tuple[dict, dict]:
    """(delta tensors, TEASR metadata) of a dual-LoRA file over the Qwen-Image base `base`.

    alpha_noise / alpha_cond: None = rank (the precursor's); 0 drops that branch's LoRA (ODTSR's
    frozen noise branch). The second embedder is looked for under `embedder_prefix` if given, else
    under ours and the precursor's name; without one it starts as a copy of the base's (as the
    precursor initialises it). Missing, unexpected and wrongly shaped tensors are refused by name.
    """
    path = Path(path)
    tensors = read_tensors(path, "cpu")
    if not any(LORA_KEY.fullmatch(k) for k in tensors):
        raise CheckpointError(f"{path} has no <module>.lora_A1/B1/A2/B2 tensors: it is not in the dual-LoRA naming")
    tensors = _strip_file_prefix(tensors)
    cfg = infer_qwen_image_config(base)
    shapes = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}   # base tensors + our embedder
    probe = meta_model(replace(cfg, lora_ranks=(1, 1)))
    branch_layers = {name: layer for name, layer in dual_lora_layers(probe) if any(layer.ranks)}
    prefixes = [embedder_prefix.rstrip(".") + "."] if embedder_prefix else EMBEDDER_PREFIXES
    delta, used = _second_embedder(tensors, prefixes)
    if embedder_prefix and not used:
        raise CheckpointError(f"{path} has no second timestep embedder under {embedder_prefix!r}")

    expected = {k: shapes[k] for k in shapes if k.startswith(EMBEDDER)} if used else {}
    found = {k: tuple(v.shape) for k, v in delta.items()}
    for module in sorted({m[1] for k in tensors if (m := LORA_KEY.fullmatch(k)) and m[1] in branch_layers}):
        layer = branch_layers[module]
        for branch in "12":   # both LoRAs of every wrapped Linear, ranks as found
            a, b = tensors.get(f"{module}.lora_A{branch}.weight"), tensors.get(f"{module}.lora_B{branch}.weight")
            rank = a.shape[0] if a is not None else b.shape[-1] if b is not None else 0
            expected[f"{module}.lora_A{branch}.weight"] = (rank, layer.in_features)
            expected[f"{module}.lora_B{branch}.weight"] = (layer.out_features, rank)
    for key, t in tensors.items():
        if key in used:
            continue
        found[key] = tuple(t.shape)
        lora, copy = LORA_KEY.fullmatch(key), BASE_COPY.fullmatch(key)
        if lora and key in expected:
            delta[f"{lora[1]}.{OURS[lora[2], lora[3]]}"] = t
        elif copy and copy[1] in branch_layers:
            expected[key] = shapes[f"{copy[1]}.{copy[2]}"]
        elif key in shapes:       # a whole-model dump: the base's own tensors
            expected[key] = shapes[key]
    check_names(path, expected, found, f"the dual-LoRA naming over the base {Path(base).name} (LoRA on its "
                                        "image-stream Linears; base copies and a second embedder optional)")
    if not used:
        log.info("TEASR: %s has no second timestep embedder; it starts as a copy of the base's", path.name)
        first = read_qwen_base_tensors(base, [k.replace(EMBEDDER, "time_text_embed.") for k in shapes
                                              if k.startswith(EMBEDDER)])
        delta.update({EMBEDDER + k.removeprefix("time_text_embed."): v for k, v in first.items()})
    return _as_delta(delta, cfg, alpha_noise, alpha_cond, path, base)


def _as_delta(delta: dict, cfg, alpha_noise, alpha_cond, path: Path, base) -> tuple[dict, dict]:
    """Per-layer alphas (alpha = rank by default), zero-scaled LoRAs dropped, and the metadata."""
    layer_alphas, ranks = {}, Counter()
    for key in [k for k in delta if k.endswith("lora_noise_A")]:
        module = key.removesuffix(".lora_noise_A")
        r_noise, r_cond = delta[key].shape[0], delta[f"{module}.lora_cond_A"].shape[0]
        alphas = [float(r_noise if alpha_noise is None else alpha_noise), float(r_cond if alpha_cond is None else alpha_cond)]
        for branch, alpha in zip(("noise", "cond"), alphas):
            if alpha == 0:
                del delta[f"{module}.lora_{branch}_A"], delta[f"{module}.lora_{branch}_B"]
        kept = (r_noise if alphas[0] else 0, r_cond if alphas[1] else 0)
        layer_alphas[module] = alphas
        ranks[kept] += 1
    common = ranks.most_common(1)[0][0] if ranks else (0, 0)
    dit_cfg = replace(cfg, lora_ranks=common, lora_alphas=None)
    meta = checkpoint_metadata(dit_cfg, codec_config(), kind="lora", layer_alphas=layer_alphas,
                               training={"imported_from": path.name, "base": Path(base).name,
                                         "alphas": {"noise": alpha_noise, "cond": alpha_cond}})
    return delta, meta


def import_dual_lora(path, base, out, **options) -> Path:
    """Write the TEASR LoRA delta of a dual-LoRA file (see convert_dual_lora) to `out`."""
    tensors, meta = convert_dual_lora(path, base, **options)
    return write_checkpoint(out, {k: v.contiguous() for k, v in tensors.items()}, meta)
