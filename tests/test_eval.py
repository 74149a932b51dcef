"""`python -m teasr_core eval`: pairing, scoring and the table, on real pairs with a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from teasr_core.__main__ import main
from teasr_core.eval.evaluate import pair_files
from teasr_core.eval.metrics import psnr_y
from teasr_core.eval.prepare import CONVERTERS, prepare
from teasr_core.eval.weights import WEIGHTS_DIR
from teasr_core.upscale.imageio import read_image

from conftest import REPO, shared_path


def test_eval_writes_per_image_and_mean_scores(tmp_path, tiny_ckpt):
    lr_dir, hr_dir = shared_path("data", "RealSR_crop128", "lr"), shared_path("data", "RealSR_crop128", "hr")
    out = tmp_path / "results.json"
    code = main(["eval", "--lr", str(lr_dir), "--hr", str(hr_dir), "--steps", "1,2", "--limit", "2",
                 "--baselines", "bicubic", "--checkpoint", str(tiny_ckpt), "--out", str(out),
                 "--figures", str(tmp_path / "fig")])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["methods"]) == {"bicubic", "TEASR 1 step", "TEASR 2 steps"}
    names = [n for n, _, _ in pair_files(lr_dir, hr_dir)[:2]]
    bicubic = results["methods"]["bicubic"]
    assert sorted(bicubic["images"]) == sorted(names)
    # the bicubic row is reproducible from the metric module directly
    lr, hr = read_image(lr_dir / names[0]).rgb, read_image(hr_dir / names[0]).rgb
    sr = torch.round(torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic",
                                                     align_corners=False).clamp(0, 1) * 255) / 255
    assert bicubic["images"][names[0]]["psnr"] == pytest.approx(float(psnr_y(sr, hr)), abs=1e-6)
    for row in bicubic["images"].values():
        assert set(row) >= {"psnr", "ssim", "lpips", "dists", "niqe", "sec"}
    assert bicubic["mean"]["lpips"] == pytest.approx(sum(r["lpips"] for r in bicubic["images"].values()) / 2)
    assert len(list((tmp_path / "fig").glob("*.png"))) == 2


def test_held_out_pairs_are_those_every_leaves_out(tmp_path):
    lr_dir, hr_dir = shared_path("data", "RealSR_crop128", "lr"), shared_path("data", "RealSR_crop128", "hr")
    names = [n for n, _, _ in pair_files(lr_dir, hr_dir)]
    scored = {}
    for option in ("--every", "--held-out"):
        out = tmp_path / f"{option}.json"
        assert main(["eval", "--lr", str(lr_dir), "--hr", str(hr_dir), "--steps", "", option, "16", "--limit", "3",
                     "--baselines", "bicubic", "--out", str(out)]) == 0
        scored[option] = set(json.loads(out.read_text())["methods"]["bicubic"]["images"])
    assert scored["--every"] == set(names[::16][:3])
    assert scored["--held-out"] == set([n for i, n in enumerate(names) if i % 16][:3]) == set(names[1:4])


def test_unpaired_lr_is_reported(tmp_path):
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "lr" / "a.png")
    with pytest.raises(FileNotFoundError, match="a.png"):
        pair_files(tmp_path / "lr", tmp_path / "hr")


def test_the_upscale_path_never_imports_the_evaluation_tools():
    """teasr_core/eval/ is tooling: the CLI, the pipeline and the node pack's core imports stay without it."""
    probe = ("import sys, teasr_core.__main__, teasr_core.upscale.pipeline, teasr_core.formats.load, teasr_core.codecs.taef2; "
             "print(sorted(m for m in sys.modules if m.startswith('teasr_core.eval')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_prepare_keeps_converted_weights(tmp_path):
    """Set-up's `python -m teasr_core.eval.prepare` is idempotent: present files are not converted again."""
    for name in CONVERTERS:
        (tmp_path / name).symlink_to(WEIGHTS_DIR / name)
    assert prepare(tmp_path / "no-packages-needed", tmp_path) == []
