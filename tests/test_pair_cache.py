"""The pair cache: shards are independent of how the cache was grown, batches resume exactly, the
trainer runs from it (TAEF2 latents read, not recomputed) and a pixel model encodes its pixels."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from test_train import rows, train
from train.pair_cache import CachedPairs, build, main as cache_main

SETTINGS = ["--crop", "64", "--shard-size", "8", "--batch", "4", "--hr-scale-min", "0.5", "--light-share", "0.5"]


def make_cache(out, pairs: int, codec: str = "taef2") -> None:
    cache_main(["--data", str(shared_path("data", "train_pool")), "--out", str(out), "--pairs", str(pairs),
                "--codec", codec, "--threads", "1", *SETTINGS])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    make_cache(out, 16)
    return out


def test_a_grown_cache_equals_one_made_at_once(cache, tmp_path):
    make_cache(tmp_path, 8, codec="none")
    make_cache(tmp_path, 16, codec="none")  # adds the second shard only
    for name in ("pairs-00000.safetensors", "pairs-00001.safetensors"):
        grown, whole = load_file(str(tmp_path / name)), load_file(str(cache / name))
        assert set(grown) == {"lr", "hr"} and set(whole) == {"lr", "hr", "x0", "cond"}
        assert torch.equal(grown["hr"], whole["hr"]) and torch.equal(grown["lr"], whole["lr"])
    assert whole["x0"].shape == (8, 32, 8, 8) and whole["cond"].dtype == torch.float16
    assert whole["lr"].shape == (8, 3, 16, 16) and whole["hr"].dtype == torch.uint8


def test_other_settings_are_refused(cache):
    settings = json.loads((cache / "cache.json").read_text())
    with pytest.raises(ValueError, match="other settings"):
        build({**settings, "crop": 128}, cache, 8)


def test_batches_resume_exactly_and_cover_every_pair_per_epoch(cache):
    stream = CachedPairs(cache, batch_size=4, seed=3)
    epoch = [next(stream)["hr"] for _ in range(4)]  # 16 pairs
    assert len({t.sum().item() for t in torch.cat(epoch)}) == 16
    state = stream.state_dict()
    expected = next(stream)
    resumed = CachedPairs(cache, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in ("lr", "hr", "x0", "cond"))
    with pytest.warns(UserWarning, match="hold 8 pairs"):
        CachedPairs(cache, batch_size=4, shards=1).load_state_dict(state)
    pooled = CachedPairs([cache, cache], batch_size=4, shards=1)
    assert len(pooled) == 16 and torch.equal(pooled.tensors["hr"][:8], pooled.tensors["hr"][8:])


def test_trainer_reads_the_cached_latents(cache, tmp_path, caplog):
    flow = ["--w-any", "0", "--w-e2e", "0", "--w-adv", "0", "--w-rect", "0", "--w-mse", "0", "--w-lpips", "0",
            "--w-fm", "1", "--w-jump", "1", "--sigma-weight-c", "0.3"]
    common = ["--data-cache", str(cache), "--crop", "64", "--batch", "4", "--max-steps", "2", "--sample-every", "0",
              "--cpu-threads", "1", *flow]
    caplog.set_level(logging.INFO, logger="train")
    train("--preset", "tiny", "--codec", "taef2", "--out", str(tmp_path / "latent"), *common)
    train("--preset", "tiny", "--out", str(tmp_path / "pixel"), *common)  # pixel codec: encodes the cached pixels
    for run in ("latent", "pixel"):
        last = rows(tmp_path / run)[-1]
        assert last["step"] == 2 and {"fm", "jump"} <= set(last) and last["fwd_grad"] == 2
    assert "latents of another codec (taef2)" in caplog.text


def test_lr_head_trains_resumes_exactly_and_exports(cache, tmp_path):
    """train.condition_encoder on the cache's LR / condition pairs: the loss falls, a run stopped and
    resumed ends with the same head as one run straight through, and the export loads in the codec."""
    from teasr_core.codecs.taef2 import LR_HEAD_FILE, WEIGHT_FILES, BUNDLED_WEIGHTS, TAEF2Codec
    from train.condition_encoder import main as train_head
    common = ["--pairs", str(cache), "--batch", "4", "--val", "4", "--lr", "3e-3", "--log-every", "2",
              "--save-every", "3", "--threads", "1", "--precision", "fp32"]
    train_head([*common, "--out", str(tmp_path / "straight"), "--steps", "6"])
    train_head([*common, "--out", str(tmp_path / "split"), "--steps", "6", "--stop-at", "3"])
    train_head([*common, "--out", str(tmp_path / "split"), "--steps", "6", "--resume"])
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("straight", "split")]
    assert logs[0][-1]["val_mse"] < 0.9 * logs[0][0]["val_mse"]   # 0.81 -> 0.65 here
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in WEIGHT_FILES:
        (weights / name).write_bytes((BUNDLED_WEIGHTS / name).read_bytes())
    heads = []
    for run in ("straight", "split"):
        train_head([*common, "--out", str(tmp_path / run), "--steps", "6", "--export", str(weights / LR_HEAD_FILE)])
        heads.append(load_file(str(weights / LR_HEAD_FILE)))
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])   # the same computation, resumed
    assert [r["loss"] for r in logs[0] if r["step"] > 3] == [r["loss"] for r in logs[1] if r["step"] > 3]
    assert TAEF2Codec(weights_dir=weights).lr_scale == 4
