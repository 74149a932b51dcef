"""The distillation trainer on the CPU: losses fall, resume is bit-exact, DDP/FSDP match one process,
checkpoints load in the core library and CLI, and the TAD-SR baseline runs with its cost fields.

Every run is the tiny preset on 64 px crops of the shared photo pool, one CPU thread (faster than
two on a busy machine, and it keeps float reductions in one fixed order).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, shared_path
from teasr_core.codecs.codec import PixelCodec
from teasr_core.formats.layout import is_delta_key
from teasr_core.formats.load import load_checkpoint, read_metadata
from teasr_core.formats.text_features import save_text_features
from teasr_core.network.lora import dual_lora_layers
from teasr_core.network.model import DualBranchDiT, preset
from train import bench_step
from train.config import TrainConfig, parse_config
from train.distill import main
from teasr_core.sampling import sample, shifted_sigmas
from train.objectives.teasr import TeasrObjective, draw_one_step, draw_own_path, loss_pixel, own_path_states, rcgm_target
from train.state import join_tree, split_tree

STEPS = 30
TIMING = ("sec_per_step", "peak_rss_mb", "peak_mem_mb", "cpu_hours")


def pool() -> Path:
    return shared_path("data", "train_pool")


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data", str(pool()), "--out", str(out), "--crop", "64", "--batch", "4",
            "--lr", "1e-3", "--sample-every", "0", "--cpu-threads", "1", *extra]


def train(*argv: str) -> None:
    """One in-process training run; the thread count it sets is restored for the other tests."""
    threads = torch.get_num_threads()
    try:
        main(list(argv))
    finally:
        torch.set_num_threads(threads)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}.safetensors"


@pytest.fixture(scope="module")
def run30(tmp_path_factory) -> Path:
    """30 TEASR steps with EMA, a checkpoint every 6 and a sample grid at the end."""
    out = tmp_path_factory.mktemp("run30")
    train(*tiny_args(out, "--max-steps", str(STEPS), "--ckpt-every", "6", "--ema-decay", "0.9",
                     "--sample-every", str(STEPS), "--sample-images", "2"))
    return out


def test_every_optimised_term_falls(run30):
    log = rows(run30)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(r["fwd_grad"] == 4 and r["fwd_nograd"] == 5 for r in log), "TEASR's cost per step changed"
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    terms = ["loss", "any", "e2e", "fm", "adv", "pix_mse"] + (["pix_lpips"] if "pix_lpips" in log[0] else [])
    for term in terms:
        first, last = mean(log[:5], term), mean(log[-5:], term)
        assert last < first, f"{term}: mean of the first 5 steps {first:.4g}, of the last 5 {last:.4g}"
    # L_rect's value is mean(dv^2), the fake-vs-real velocity gap: exactly 0 at init (both flows are
    # one network) and opened by L_adv learning the fake flow; its gradient, not its value, is the signal.
    assert 0 < mean(log[-5:], "rect") < 1 and mean(log[-5:], "rect") > mean(log[:5], "rect")
    assert (run30 / "samples" / f"step-{STEPS:08d}.png").is_file()


def assert_resumed_exactly(resumed: Path, straight: Path, steps: int, stopped_at: int) -> None:
    """Steps after the stop log the same losses, and the final (EMA) weights equal the straight run's."""
    log = rows(resumed)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    for a, b in zip(log[stopped_at:], rows(straight)[stopped_at:steps]):
        assert losses(a) == losses(b)
    a, b = load_file(checkpoint(resumed, steps)), load_file(checkpoint(straight, steps))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact(run30, tmp_path):
    train(*tiny_args(tmp_path, "--max-steps", "3", "--ckpt-every", "6", "--ema-decay", "0.9"))
    train(*tiny_args(tmp_path, "--max-steps", "6", "--ckpt-every", "6", "--ema-decay", "0.9", "--resume"))
    assert_resumed_exactly(tmp_path, run30, steps=6, stopped_at=3)


def test_a_signal_stops_after_the_step_and_loses_nothing(run30, tmp_path, monkeypatch):
    """Ctrl-C or `timeout`'s SIGTERM mid-run: the step finishes, a checkpoint and the state are written,
    the exit status names the signal, and --resume ends where the uninterrupted run ends."""
    from train import distill
    step = distill.Trainer.train_step

    def signalled_in_step_4(self, batches):
        row = step(self, batches)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(distill.Trainer, "train_step", signalled_in_step_4)
    with pytest.raises(SystemExit) as stopped:
        train(*tiny_args(tmp_path, "--max-steps", "6", "--ckpt-every", "6", "--ema-decay", "0.9"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4] and checkpoint(tmp_path, 4).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the trainer must restore the handlers"
    monkeypatch.undo()
    train(*tiny_args(tmp_path, "--max-steps", "6", "--ckpt-every", "6", "--ema-decay", "0.9", "--resume"))
    assert_resumed_exactly(tmp_path, run30, steps=6, stopped_at=4)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one(engine, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 2 x grad_accum 2: the same micro-batch streams."""
    base = ["--preset", "tiny", "--data", str(pool()), "--crop", "64", "--batch", "2", "--lr", "1e-3",
            "--sample-every", "0", "--max-steps", "3", "--cpu-threads", "1"]
    train(*base, "--grad-accum", "2", "--out", str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.distill", *base, "--out", str(tmp_path / "two")] + (["--fsdp"] if engine == "fsdp" else [])
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        for k, v in losses(a).items():
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    a, b = load_file(checkpoint(tmp_path / "one", 3)), load_file(checkpoint(tmp_path / "two", 3))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_checkpoint_upscales_through_the_cli(run30, tmp_path):
    lr = Image.open(sorted(pool().rglob("*.jpg"))[0]).convert("RGB").crop((0, 0, 40, 24))
    lr.save(tmp_path / "lr.png")
    ckpt = checkpoint(run30, STEPS)
    assert read_metadata(ckpt)["kind"] == "full" and read_metadata(ckpt)["training"]["step"] == STEPS
    done = subprocess.run([sys.executable, "-m", "teasr_core", "upscale", str(tmp_path / "lr.png"),
                           str(tmp_path / "sr.png"), "--checkpoint", str(ckpt), "--steps", "2", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(tmp_path / "sr.png").size == (160, 96)


def test_lora_on_a_checkpoint_base(run30, tmp_path):
    """LoRA (fp8 base) from a trained checkpoint: the delta loads on that base; merged is self-contained."""
    base = checkpoint(run30, STEPS)
    for mode in ("delta", "merged"):
        out = tmp_path / mode
        train(*tiny_args(out, "--base", str(base), "--no-full-finetune", "--lora-ranks", "4", "2", "--fp8-base",
                         "--lora-save", mode, "--max-steps", "2"))
        ckpt = checkpoint(out, 2)
        kind = read_metadata(ckpt)["kind"]
        assert kind == ("lora" if mode == "delta" else "full")
        model = load_checkpoint(ckpt, base=base if kind == "lora" else None).dit
        x = torch.randn(1, model.cfg.in_channels, 8, 8)
        assert torch.isfinite(model(x, x, torch.tensor([0.5]), torch.tensor([0.0]))).all()
        ranks = {layer.ranks for _, layer in dual_lora_layers(model) if any(layer.ranks)}
        assert ranks == ({(4, 2)} if mode == "delta" else {(0, 6)})  # merged: noise LoRA folded into the base
    assert any(k.startswith("time_text_embed_2") for k in load_file(checkpoint(tmp_path / "delta", 2)))


def test_lora_on_a_qwen_image_layout_base(tmp_path):
    """A base in Qwen-Image's layout (text stream, no TEASR tensors) trains as LoRA with a fixed context."""
    base_file, context_file = tmp_path / "base.safetensors", tmp_path / "context.safetensors"
    base = DualBranchDiT(preset("tiny", context_dim=40))
    save_file({k: v for k, v in base.state_dict().items() if not is_delta_key(k)}, base_file)
    save_text_features(context_file, torch.randn(5, 40))
    train(*tiny_args(tmp_path / "run", "--base", str(base_file), "--context-file", str(context_file),
                     "--no-full-finetune", "--lora-ranks", "4", "4", "--max-steps", "2", "--batch", "2"))
    ckpt = checkpoint(tmp_path / "run", 2)
    assert read_metadata(ckpt)["kind"] == "lora"
    model = load_checkpoint(ckpt, base=base_file).dit
    x = torch.randn(1, 48, 8, 8)
    assert torch.isfinite(model(x, x, torch.tensor([0.5]), torch.tensor([0.0]), torch.randn(1, 5, 40))).all()


def test_bench_step_smoke(capsys):
    threads = torch.get_num_threads()
    try:
        bench_step.main(["--preset", "tiny", "--resolution", "64", "--rank", "4", "--fp8", "--batch", "2",
                         "--warmup", "0", "--repeat", "1", "--cpu-threads", "1"])
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert "teasr " in table and "fwd_grad=4 fwd_nograd=5" in table
    assert "tadsr " in table and "enc_grad=1 enc_nograd=1 fwd_grad=1 fwd_nograd=6" in table


def test_zero_weighted_terms_cost_no_passes(tmp_path):
    """An ablation without L_any and L_adv runs L_e2e (1 + substeps), L_FM (1) and L_rect's two
    no-grad passes (its fake flow now without grad), and logs only the terms it optimises."""
    train(*tiny_args(tmp_path, "--max-steps", "2", "--w-any", "0", "--w-adv", "0", "--w-lpips", "0"))
    log = rows(tmp_path)
    assert all((r["fwd_grad"], r["fwd_nograd"]) == (2, 4) for r in log)
    assert {"e2e", "fm", "rect", "pix_mse"} <= log[0].keys() and not {"any", "adv"} & log[0].keys()


def test_pixel_regression_only_is_one_pass(tmp_path):
    """The bundled recipe's objective: the one-step jump scored by the pixel terms alone."""
    train(*tiny_args(tmp_path, "--max-steps", "2", "--w-any", "0", "--w-e2e", "0", "--w-fm", "0",
                     "--w-adv", "0", "--w-rect", "0", "--w-lpips", "0", "--e2e-pure-noise-share", "0.5"))
    log = rows(tmp_path)
    assert all((r["fwd_grad"], r.get("fwd_nograd", 0)) == (1, 0) for r in log)
    assert {"loss", "pix_mse"} <= log[0].keys() and log[0]["loss"] == pytest.approx(log[0]["pix_mse"])


def test_split_batch_gives_each_term_its_share():
    """TwinFlow's split: L_any and L_FM a quarter of the batch each, the one-step terms the other half."""
    seen = []

    def net(x, cond, sigma, target):
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    x0 = torch.randn(8, 4, 4, 4)
    codec = type("Identity", (), {"decode": staticmethod(lambda x: x)})
    cfg = replace(TrainConfig(), split_batch=True, w_lpips=0.0, batch=8, stack_passes=False, backward_per_group=False)
    TeasrObjective(cfg, codec, None)(net, x0, x0.clone(), x0.clone(), torch.Generator(), lambda loss: None)
    # L_any 1 + 2 target passes on 2; L_e2e 1 + 2 on 4; L_FM 1 on 2; L_adv 1 and L_rect 1 on 4
    assert seen == [2, 2, 2, 4, 4, 4, 2, 4, 4]
    seen.clear()    # the default schedule: the jump; both RCGM chains and L_rect's real flow stacked; L_adv; L_any; L_FM
    TeasrObjective(replace(cfg, stack_passes=True, backward_per_group=True), codec, None)(
        net, x0, x0.clone(), x0.clone(), torch.Generator(), lambda loss: None)
    assert seen == [4, 2 + 4 + 4, 2 + 4, 4, 2, 2]
    with pytest.raises(ValueError, match="batch >= 4"):
        replace(TrainConfig(), split_batch=True, batch=2)


def test_pixel_weight_at_pure_noise():
    """weight = 1 - (1 - w_noise) sigma: a start at sigma = 1 counts fully with w_noise = 1, not at all with 0."""
    codec = type("Identity", (), {"decode": staticmethod(lambda x: x)})
    hr, fake = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.25)
    sigma, generator = torch.tensor([1.0, 0.5]), torch.Generator()
    pixel = TrainConfig(w_mse=1.0, w_l1=1.0)
    full = loss_pixel(codec, None, fake, hr, sigma, replace(pixel, pixel_weight_at_noise=1.0), generator)
    precursor = loss_pixel(codec, None, fake, hr, sigma, replace(pixel, pixel_weight_at_noise=0.0), generator)
    assert full["pix_mse"].item() == pytest.approx(0.25) and precursor["pix_mse"].item() == pytest.approx(0.25 * 0.5 / 2)
    assert full["pix_l1"].item() == pytest.approx(0.25) and precursor["pix_l1"].item() == pytest.approx(0.25 * 0.5 / 2)


def test_pixel_window_scores_the_hr_pixels_under_the_decoded_window():
    """A window decoded with its margin, margin cropped off, lines up with the HR pixels under it.

    The pixel codec is exactly local, so a wrong offset anywhere (latent window, margin crop, HR
    crop) breaks the equality; a perceptual network is not needed for that.
    """
    from train.objectives.teasr import pixel_window
    codec = PixelCodec(2)
    hr = torch.rand(2, 3, 32, 32)
    latent = codec.encode(hr)                                    # [2, 12, 16, 16]
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        window, hr_window, (rows, cols) = pixel_window(latent, hr, 5, 3, codec.scale, generator)
        assert hr_window.shape[-2:] == (10, 10) and 5 <= window.shape[-1] <= 11
        assert torch.equal(codec.decode(window)[..., rows, cols], hr_window)
    cfg = TrainConfig(w_mse=1.0, w_l1=0.0, pixel_window=4, pixel_margin=2)
    perfect = loss_pixel(codec, None, latent, hr, torch.zeros(2), cfg, torch.Generator())
    assert perfect == {"pix_mse": 0.0}
    with pytest.raises(ValueError, match="pixel_window"):
        TrainConfig(pixel_window=-1)


def test_tadsr_runs_and_logs_its_cost(tmp_path):
    """Also resumes exactly: the discriminator and its optimizer are part of the training state."""
    train(*tiny_args(tmp_path, "--objective", "tadsr", "--max-steps", "3", "--batch", "2"))
    for steps, resume in (("2", ()), ("3", ("--resume",))):
        train(*tiny_args(tmp_path / "resumed", "--objective", "tadsr", "--max-steps", steps, "--batch", "2", *resume))
    log = rows(tmp_path)
    assert losses(rows(tmp_path / "resumed")[2]) == losses(log[2])
    assert len(log) == 3
    for r in log:
        assert {"reg", "hfsd", "gan", "disc", "loss"} <= r.keys()
        assert r["sec_per_step"] > 0 and ("peak_mem_mb" in r or r["peak_rss_mb"] > 0)
        # student 1 pass with grad; teacher 4 rollout + 2 HFSD passes; discriminator: half-depth encoder
        assert (r["fwd_grad"], r["fwd_nograd"], r["enc_grad"], r["enc_nograd"]) == (1, 6, 1, 1)
    assert read_metadata(checkpoint(tmp_path, 3))["training"]["objective"] == "tadsr"


def test_device_option_resolves_to_an_indexed_gpu():
    """`--device cuda` once failed on a GPU machine (torch.cuda.set_device needs an index)."""
    from train.distill import resolve_device
    assert resolve_device("cuda", 3, True) == torch.device("cuda", 3)
    assert resolve_device("", 1, True) == torch.device("cuda", 1)
    assert resolve_device("", 1, False) == torch.device("cpu")
    assert resolve_device("cuda:2", 0, True) == torch.device("cuda", 2)
    assert resolve_device("cpu", 0, True) == torch.device("cpu")


def test_rcgm_target_is_exact_for_a_true_flow_map():
    """For one data point the straight path is the flow: v* at every (sigma, target) has zero residual."""
    x0 = torch.randn(3, 4, 2, 2)
    eps = torch.randn_like(x0)
    sigma, target = torch.tensor([0.9, 0.5, 0.012]), torch.tensor([0.0, 0.3, 0.011])
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    net = lambda x, cond, s, t: (x - x0) / s.view(-1, 1, 1, 1)  # noqa: E731  (exact average velocity)
    v = eps - x0
    # atol: the identity divides by dt = 0.01, so float32 round-off of the path grows 100x
    assert torch.allclose(rcgm_target(net, x_t, None, v, sigma, target, v, 0.01, 2), v, atol=1e-4)
    wrong = v + 5.0  # the clamp bounds the correction per step to 1
    assert torch.allclose(rcgm_target(net, x_t, None, v, sigma, target, wrong, 0.01, 2), wrong - 1)


def test_own_path_starts_are_the_samplers_own_states():
    """Each own-path start is where the upscale's `jump` sampler is after i of k steps, and its v* jumps to x0."""
    assert own_path_states([1, 2, 4]) == [(1, 0), (2, 1), (4, 1), (4, 2), (4, 3)]
    cfg = replace(TrainConfig(), own_path_share=1.0, own_path_steps=(2, 4), own_path_start=0.5, own_path_regression=0.3)
    torch.manual_seed(0)
    x0, cond = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    weight = torch.randn(4, 4) / 2
    def net(x, c, s, t):   # a nonlinear stand-in: any deterministic function of its inputs will do
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x) + c) * s.view(-1, 1, 1, 1) + x - c
    g = torch.Generator().manual_seed(3)
    d = draw_own_path(net, x0, cond, g, cfg)
    g.manual_seed(3)   # the same draws, replayed: which state, then the start noise
    states = own_path_states(cfg.own_path_steps)
    pick = torch.randint(len(states), (6,), generator=g).tolist()
    eps = torch.randn(x0.shape, generator=g)
    for b, j in enumerate(pick):
        k, i = states[j]
        grid = shifted_sigmas(k, start=0.5)
        start = 0.5 * cond[b:b + 1] + 0.5 * eps[b:b + 1]
        expected = sample(lambda x, s, t: net(x, cond[b:b + 1], s, t), start, grid[:i + 1], "jump")
        torch.testing.assert_close(d.x_t[b:b + 1], expected)
        assert d.sigma[b] == grid[i] and d.target[b] == 0
        assert d.regress[b] == pytest.approx(1.0 if i == 0 else 0.3)   # the start itself keeps full regression
    torch.testing.assert_close(d.x_t - d.sigma.view(-1, 1, 1, 1) * d.v_star, x0, rtol=0, atol=1e-5)
    assert len(set(pick)) > 1   # the seed draws several states
    mixed = draw_one_step(net, x0, cond, torch.Generator().manual_seed(3), replace(cfg, own_path_share=0.5))
    on_path = torch.isclose(mixed.x_t - mixed.sigma.view(-1, 1, 1, 1) * mixed.v_star, x0, atol=1e-5).flatten(1).all(1)
    assert on_path.all()   # both kinds of start keep x_t - sigma v* = x0


def test_config_file_documents_every_option_and_flags_override_it():
    default = REPO / "train" / "configs" / "default.toml"
    assert parse_config(["--config", str(default)]) == TrainConfig()
    text = default.read_text()
    assert all(f"\n{name} = " in text for name in TrainConfig().to_dict())
    cfg = parse_config(["--config", str(default), "--max-steps", "7", "--no-full-finetune", "--lora-ranks", "8", "8"])
    assert (cfg.max_steps, cfg.full_finetune, cfg.lora_ranks) == (7, False, (8, 8))
    with pytest.raises(ValueError):
        parse_config(["--lora-ranks", "8", "8"])  # full fine-tune and LoRA at once


def test_state_tree_round_trip():
    tree = {"a": torch.arange(3), "opt": {"state": {0: {"step": torch.tensor(2.0)}}, "groups": [{"betas": [0.9, 0.99]}]},
            "n": None, "s": "x"}
    tensors = {}
    back = join_tree(json.loads(json.dumps(split_tree(tree, tensors))), tensors)
    assert back["opt"]["state"][0]["step"] == 2.0 and torch.equal(back["a"], tree["a"])
    assert back["opt"]["groups"] == tree["opt"]["groups"] and back["n"] is None and back["s"] == "x"


def test_qwen_image_recipe_parses_with_its_three_files():
    cfg = parse_config(["--config", str(REPO / "train" / "configs" / "qwen-image.toml"), "--base", "qwen.safetensors",
                        "--vae", "qwen_image_vae.safetensors", "--context-file", "features.safetensors"])
    assert (cfg.lora_ranks, cfg.fp8_base, cfg.full_finetune, cfg.crop) == ((128, 128), True, False, 512)
    assert (cfg.base, cfg.vae, cfg.context_file) == ("qwen.safetensors", "qwen_image_vae.safetensors", "features.safetensors")
    with pytest.raises(ValueError, match="cannot be combined with codec = 'taef2'"):
        parse_config(["--vae", "qwen_image_vae.safetensors", "--codec", "taef2"])


def test_export_records_the_recommended_grid_and_keeps_the_origin(tmp_path):
    from teasr_core.formats.checkpoint import save_checkpoint
    from teasr_core.sampling import ModelSampling
    from teasr_core.upscale.pipeline import Upscaler
    from train.export import main as export
    trained = save_checkpoint(tmp_path / "step-00000010.safetensors", DualBranchDiT(preset("tiny")),
                              {"name": "pixel", "scale": 4}, preset="tiny", training={"steps": 10})
    first, second = tmp_path / "shipped.safetensors", tmp_path / "reshipped.safetensors"
    export([str(trained), str(first)])
    export([str(first), str(second), "--end-ratio", "0.85"])
    meta = read_metadata(second)
    assert meta["sampling"] == {"end_ratio": 0.85} and "sampling" not in read_metadata(first)
    assert meta["training"] == {"steps": 10, "exported_from": trained.name}  # the trainer's file, not the copy
    assert Upscaler.from_checkpoint(second).sampling.end_ratio == 0.85 and Upscaler.from_checkpoint(first).sampling.end_ratio == 0.0
    assert all(torch.equal(a, b) for a, b in zip(load_file(first).values(), load_file(second).values()))
    export([str(second), str(first), "--attention-tile", "384", "--attention-overlap", "64"])   # end ratio kept
    assert Upscaler.from_checkpoint(first).sampling == ModelSampling(0.85, attention_tile=384, attention_overlap=64)
    with pytest.raises(SystemExit, match="end ratio"):
        export([str(first), str(tmp_path / "bad.safetensors"), "--end-ratio", "1.5"])
    with pytest.raises(SystemExit, match="attention_overlap 384 must be smaller than attention_tile 384"):
        export([str(first), str(tmp_path / "bad.safetensors"), "--attention-overlap", "384"])
    assert not (tmp_path / "bad.safetensors").exists()
