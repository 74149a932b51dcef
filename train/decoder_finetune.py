"""Fine-tune a copy of TAEF2's decoder on a TEASR model's own samples: L1 + LPIPS-VGG against the HR.

  python -m train.decoder_finetune --pairs data_local/pairs-cond --out runs/decoder --steps 1000
  python -m train.decoder_finetune ... --resume                 # continue exactly where the last state left off
  python -m train.decoder_finetune ... --export runs/teasr-small-decoder.safetensors

Why: the model's latents are not the clean latents TAEF2's decoder was made for: its samples are a
little off the data, and the decoder renders that as smear and speckle. A decoder that learns to
turn *these* latents into the HR (CCSR's stage 2) is a cheap lever on a CPU: 1.2 M parameters, no
transformer in the loop, the model's samples computed once. The transformer stays as it is.

First the run folder gets the model's samples of each cached pair (`samples-NNNNN.safetensors`,
one latent per step count in `--sample-steps`, on the grid the model's metadata names unless
`--end-ratio`, from the noised condition as the pipeline starts; the condition is made through
the codec's LR head as `condition="auto"` does). Then the decoder trains on whole crops (the
GroupNorm statistics are the crop's own, as a one-tile decode of a photo that size), starting from
TAEF2's weights. The last `--val` pairs are held out; their L1 / LPIPS-VGG / LPIPS-Alex are printed at
every log step. `--export` writes the model file with the decoder inside it (teasr_core.codecs:
a checkpoint's own decoder), the transformer's tensors unchanged.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from teasr_core.codecs.build import OWN_DECODER
from teasr_core.codecs.taef2 import WEIGHT_FILES, TAEF2Codec, default_weights_dir, load_strict, make_decoder
from teasr_core.eval.metrics import LPIPS
from teasr_core.formats.checkpoint import save_checkpoint
from teasr_core.formats.load import bundled_checkpoint_path, load_checkpoint, read_metadata
from teasr_core.sampling import ModelSampling, sample, shifted_sigmas
from teasr_core.upscale.pipeline import Upscaler, native_bf16

from .codec_run import CodecRun, hold_out
from .pair_cache import CachedPairs, cache_shards
from .state import latest_state


def _sample_settings(args) -> dict:
    sampling = ModelSampling.from_metadata(read_metadata(args.checkpoint).get("sampling"))
    end_ratio = sampling.end_ratio if args.end_ratio is None else args.end_ratio
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "sample_steps": args.sample_steps,
            "start_strength": args.start_strength, "end_ratio": end_ratio, "seed": args.seed}


@torch.no_grad()
def make_samples(args, shard_paths: list[Path], log=print) -> list[Path]:
    """The model's samples of every cached pair, one shard file per pair shard (kept; re-runs skip them)."""
    settings = _sample_settings(args)
    meta = args.out / "samples.json"
    if meta.exists() and json.loads(meta.read_text()) != settings:
        raise ValueError(f"{args.out} holds samples made with {meta.read_text()}, not {settings}; use another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings, indent=1))
    paths = [args.out / f"samples-{i:05d}.safetensors" for i in range(len(shard_paths))]
    if all(p.exists() for p in paths):
        return paths   # resume / export: no model to load
    compute = torch.bfloat16 if native_bf16("cpu") else torch.float32
    upscaler = Upscaler.from_checkpoint(args.checkpoint, dtype=compute, codec_dtype=torch.float32)
    dit, codec = upscaler.dit, upscaler.codec
    for shard_index, (shard, path) in enumerate(zip(shard_paths, paths)):
        if path.exists():
            continue
        t0 = time.perf_counter()
        lr = load_file(str(shard))["lr"]
        gen = torch.Generator().manual_seed(args.seed * 100003 + shard_index)
        parts: dict[str, list[torch.Tensor]] = {f"z{k}": [] for k in args.sample_steps}
        for i in range(0, len(lr), args.sample_batch):
            cond = codec.encode_lr(lr[i:i + args.sample_batch].float() / 255).to(compute)
            noise = torch.randn(cond.shape, generator=gen).to(compute)

            def denoise(x, sigma, target):
                return dit(x, cond, sigma, target, None)

            for k in args.sample_steps:
                sigmas = shifted_sigmas(k, 1.0, args.start_strength, settings["end_ratio"])
                s = sigmas[0].item()
                x = noise if s >= 1 else (1 - s) * cond + s * noise
                parts[f"z{k}"].append(sample(denoise, x, sigmas, "jump").float().half())
        tmp = path.with_suffix(".tmp")
        save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, str(tmp))
        tmp.replace(path)
        log(f"{path.name}: {len(lr)} pairs x {len(args.sample_steps)} step counts in {time.perf_counter() - t0:.0f} s")
    return paths


def export(args, decoder: nn.Sequential, step: int, val: dict) -> None:
    """The checkpoint with this decoder inside (fp16), sampled by default on the grid it was trained on."""
    loaded = load_checkpoint(args.checkpoint)
    if loaded.meta["kind"] != "full":
        raise SystemExit(f"{args.checkpoint} is a LoRA delta; the decoder ships inside a full checkpoint")
    settings = json.loads((args.out / "samples.json").read_text())
    training = {**loaded.meta.get("training", {}),
                "decoder_finetune": {"steps": step, "blend": args.blend, "sample_steps": args.sample_steps, "w_l1": args.w_l1,
                                     "w_lpips_vgg": args.w_lpips, "pairs": str(args.pairs), "val": val}}
    sampling = {**(loaded.meta.get("sampling") or {}), "end_ratio": settings["end_ratio"]}
    codec = {**loaded.codec, "decoder": OWN_DECODER}
    tensors = {f"decoder.{k}": v.half() for k, v in decoder.state_dict().items()}
    save_checkpoint(args.export, loaded.dit, codec, preset=loaded.meta.get("preset"), training=training,
                    sampling=sampling, dtype=torch.float16, codec_tensors=tensors)
    print(f"wrote {args.export} ({args.export.stat().st_size / 1e6:.1f} MB; decoder step {step}, val {val})")


def trainable_decoder(device="cpu") -> nn.Sequential:
    """TAEF2's decoder in float32 with gradients: the starting point of the fine-tune."""
    decoder = make_decoder()
    load_strict(decoder, default_weights_dir() / WEIGHT_FILES[1])
    return decoder.to(device, memory_format=torch.channels_last)


def load_training_pairs(args, sample_paths: list[Path]) -> CachedPairs:
    """The cached HR crops with the model's samples beside them (z<k> per step count)."""
    pairs = CachedPairs(args.pairs, batch_size=args.batch, seed=args.seed, shards=args.shards)
    pairs.tensors = {"hr": pairs.tensors["hr"]}
    samples = [load_file(str(p)) for p in sample_paths]
    for k in args.sample_steps:
        pairs.tensors[f"z{k}"] = torch.cat([s[f"z{k}"] for s in samples])
    return pairs


def pick_latents(batch: dict, steps: list[int], first_sample: int) -> torch.Tensor:
    """Sample i of the stream decodes the latent of step count steps[i % len(steps)]: every count, equally."""
    rows = [batch[f"z{steps[(first_sample + i) % len(steps)]}"][i] for i in range(len(batch["hr"]))]
    return torch.stack(rows)


@torch.no_grad()
def validate(codec: TAEF2Codec, decoder, held: dict, steps: list[int], lpips_vgg, lpips_alex, autocast: bool,
             batch: int = 16) -> dict:
    """Per step count: mean L1, LPIPS-VGG (trained on) and LPIPS-Alex (scored by the eval) of the clamped decode."""
    out = {}
    for k in steps:
        sums = torch.zeros(3)
        for i in range(0, len(held["hr"]), batch):
            hr = held["hr"][i:i + batch].float() / 255
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                pixels = codec.decode_unclamped(held[f"z{k}"][i:i + batch], decoder).float()
            pixels = pixels.clamp(0, 1)
            sums += torch.stack([(pixels - hr).abs().mean((1, 2, 3)).sum(), lpips_vgg(pixels, hr).sum(),
                                 lpips_alex(pixels, hr).sum()])
        out[k] = [round(v, 4) for v in (sums / len(held["hr"])).tolist()]
    return out


def train(args, sample_paths: list[Path]) -> None:
    autocast = args.precision == "bf16" or (args.precision == "auto" and native_bf16("cpu"))
    codec, decoder = TAEF2Codec(), trainable_decoder()   # the codec de-normalises; `decoder` is what trains
    lpips_vgg, lpips_alex = LPIPS(net="vgg"), LPIPS(net="alex")
    pairs = load_training_pairs(args, sample_paths)
    held = hold_out(pairs, args.val)
    run = CodecRun(args.out, "decoder", decoder, pairs, lr=args.lr, steps=args.steps, warmup=args.warmup)
    if args.resume or args.export:
        run.restore("export" if args.export else "resume")
    elif latest_state(args.out) is not None:
        raise SystemExit(f"{args.out} already holds training states: --resume, or use another --out")
    if args.export:
        if args.blend != 1:   # weight-space interpolation towards TAEF2's decoder (WiSE-FT), the codec's own
            start = codec.decoder.state_dict()
            decoder.load_state_dict({k: start[k] + args.blend * (v - start[k]) for k, v in decoder.state_dict().items()})
        export(args, decoder, run.step, validate(codec, decoder, held, args.sample_steps, lpips_vgg, lpips_alex, False))
        return

    if run.step == 0:
        run.record({"val": validate(codec, decoder, held, args.sample_steps, lpips_vgg, lpips_alex, autocast)})
    last = min(args.steps, args.stop_at or args.steps)
    while run.step < last:
        first = pairs.samples_drawn
        batch = next(pairs)
        latents = pick_latents(batch, args.sample_steps, first)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            pixels = codec.decode_unclamped(latents, decoder).float()
            l1 = (pixels - batch["hr"]).abs().mean()
            perceptual = lpips_vgg(pixels.clamp(0, 1), batch["hr"]).mean()
        run.update(args.w_l1 * l1 + args.w_lpips * perceptual)
        if run.step % args.log_every == 0 or run.step == last:
            values = {"l1": round(l1.item(), 4), "lpips_vgg": round(perceptual.item(), 4)}
            if run.step % args.val_every == 0 or run.step == last:
                values["val"] = validate(codec, decoder, held, args.sample_steps, lpips_vgg, lpips_alex, autocast)
            run.record(values, args.log_every)
        if run.step % args.save_every == 0 or run.step == last:
            run.save()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.decoder_finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True, type=Path, help="a pair cache folder (train.pair_cache, --codec taef2)")
    ap.add_argument("--out", type=Path, required=True, help="run folder: samples, states, log.jsonl")
    ap.add_argument("--checkpoint", default=str(bundled_checkpoint_path()), help="the TEASR model whose samples to decode")
    ap.add_argument("--shards", type=int, default=4, help="pair shards to use (512 pairs each)")
    ap.add_argument("--sample-steps", type=lambda s: [int(k) for k in s.split(",")], default=[1, 2, 4],
                    help="step counts whose samples the decoder learns from, e.g. 1,2,4")
    ap.add_argument("--start-strength", type=float, default=0.5)
    ap.add_argument("--end-ratio", type=float, help="the sampling grid's end ratio; default: the model's own")
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--samples-only", action="store_true", help="make the samples and stop")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, cosine decay to 1 %%)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--w-l1", type=float, default=1.0)
    ap.add_argument("--w-lpips", type=float, default=1.0, help="weight of LPIPS-VGG (the eval scores LPIPS-Alex)")
    ap.add_argument("--val", type=int, default=64, help="pairs held out for validation")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 autocast where the CPU runs it natively")
    ap.add_argument("--stop-at", type=int, help="save and stop at this step (the schedule still runs to --steps)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest state in --out")
    ap.add_argument("--export", type=Path, help="write the checkpoint with this decoder inside and stop")
    ap.add_argument("--blend", type=float, default=1.0,
                    help="export TAEF2's decoder + blend x (trained - TAEF2's): 1 = as trained, 0.5 = half-way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, shard_paths = cache_shards(args.pairs, args.shards)
    sample_paths = make_samples(args, shard_paths)
    if args.samples_only:
        return
    train(args, sample_paths)


if __name__ == "__main__":
    main()
