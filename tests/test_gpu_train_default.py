"""scripts/gpu_train_default.py: what a GPU lease carries fits its 64 MiB, the int8 LPIPS-VGG weights come back
within int8 round-off, and `--smoke` runs the lease's whole path on the CPU (train, split) into parts that
`--join` puts back into the trainer's checkpoint bit for bit, which the loader reads with the base's decoder
and sampling defaults."""
from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, shared_path
from teasr_core.eval.weights import weights_path
from teasr_core.formats.load import bundled_checkpoint_path, load_checkpoint

sys.path.insert(0, str(REPO / "scripts"))
import gpu_train_default as lease  # noqa: E402


def test_int8_weights_round_trip_within_half_a_step():
    original = load_file(str(weights_path(lease.LPIPS_VGG)))
    back = lease.dequantise(lease.quantise(original))
    assert back.keys() == original.keys()
    for key, value in original.items():
        step = value.abs().amax(dim=tuple(range(1, value.ndim)), keepdim=True) / 127 if value.ndim == 4 else 0
        assert torch.all((back[key] - value).abs() <= step / 2 + 1e-7), key


def test_smoke_lease_trains_splits_and_joins(tmp_path):
    carry, out, joined = tmp_path / "carry", tmp_path / "out", tmp_path / "joined.safetensors"
    lease.prepare(carry, weights_path(lease.LPIPS_VGG).parent, shared_path("data", "train_pool"), wheels=False)
    carried = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert carried + lease.tracked_bytes() <= lease.LEASE_BYTES - lease.MARGIN_BYTES
    assert len(list((carry / "photos").iterdir())) >= 50

    script = str(REPO / "scripts" / "gpu_train_default.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--carry", str(carry), "--out", str(out),
                           "--scratch", str(tmp_path / "scratch")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(out.glob("*.part*.safetensors"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 16 * 2**20 for p in parts)
    assert '"step": 2,' in (out / "metrics.jsonl").read_text().splitlines()[-1]

    subprocess.run([sys.executable, script, "--join", str(out), "--to", str(joined)], check=True, timeout=120)
    trained = tmp_path / "scratch" / "run" / "checkpoints" / "step-00000002.safetensors"
    want, got = load_file(str(trained)), load_file(str(joined))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model, base = load_checkpoint(joined), load_checkpoint(bundled_checkpoint_path())
    assert model.codec_tensors.keys() == base.codec_tensors.keys()   # the shipped file's own decoder travelled
    assert model.meta["sampling"] == base.meta["sampling"]           # and its grid and attention tile
