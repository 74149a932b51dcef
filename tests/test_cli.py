"""`python -m teasr_core upscale` end to end: formats, directories, and refusals."""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from teasr_core.__main__ import main
from teasr_core.upscale.imageio import read_image, write_image
from teasr_core.upscale.process import reuse_freed_memory

from conftest import REPO, shared_path



def run(args, ckpt):
    return main(["upscale", *map(str, args), "--checkpoint", str(ckpt)])


def test_real_photo_file(tmp_path, tiny_ckpt):
    src = shared_path("data", "RealSR_crop128", "lr", "Canon_004_LR4.png")
    out = tmp_path / "x4.png"
    assert run([src, out, "--steps", "2"], tiny_ckpt) == 0
    assert Image.open(out).size == (512, 512)


@pytest.mark.parametrize("mode, make", [
    ("RGBA", lambda rng: Image.fromarray(rng.integers(0, 255, (10, 12, 4), dtype=np.uint8), "RGBA")),
    ("L", lambda rng: Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8), "L")),
    ("I;16", lambda rng: Image.fromarray(rng.integers(0, 65535, (10, 12), dtype=np.uint16))),
])
def test_alpha_grayscale_and_16bit_are_kept(tmp_path, tiny_ckpt, mode, make):
    src = tmp_path / "in.png"
    make(np.random.default_rng(0)).save(src)
    out = tmp_path / "out.png"
    assert run([src, out], tiny_ckpt) == 0
    with Image.open(out) as im:
        assert im.size == (48, 40)
        assert im.mode == {"RGBA": "RGBA", "L": "L", "I;16": "I;16"}[mode]


def test_16bit_rgb_png_round_trips_at_16_bits(tmp_path, tiny_ckpt):
    rgb = torch.rand(1, 3, 6, 7)
    src = tmp_path / "rgb16.png"
    write_image(src, rgb, bits=16)
    photo = read_image(src)
    assert photo.bits == 16 and torch.allclose(photo.rgb, rgb, atol=1 / 65535)
    out = tmp_path / "out16.png"
    assert run([src, out], tiny_ckpt) == 0
    assert read_image(out).bits == 16 and read_image(out).rgb.shape == (1, 3, 24, 28)


def test_directory_in_directory_out(tmp_path, tiny_ckpt):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(src / "a.jpg")
    Image.new("RGB", (6, 5), (200, 10, 30)).save(src / "b.webp")
    (src / "notes.txt").write_text("not an image")
    assert run([src, dst], tiny_ckpt) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "b.png"]
    assert Image.open(dst / "b.png").size == (24, 20)


def test_non_image_is_refused_with_a_clear_message(tmp_path, tiny_ckpt, capsys):
    bad = tmp_path / "fake.png"
    bad.write_text("this is text")
    assert run([bad, tmp_path / "o.png"], tiny_ckpt) == 2
    err = capsys.readouterr().err
    assert "fake.png" in err and "not a readable image" in err
    assert not (tmp_path / "o.png").exists()


def test_bad_settings_give_a_message_not_a_traceback(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(src)
    assert run([src, tmp_path / "o.png", "--steps", "0"], tiny_ckpt) == 2
    assert "steps must be in 1..50" in capsys.readouterr().err


def test_cli_subprocess_uses_the_bundled_default(tmp_path):
    """The README's main command, end to end in a fresh interpreter, with the bundled model."""
    src = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (120, 60, 200)).save(src)
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "teasr_core", "upscale", str(src), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)


def test_allocator_setting_takes_on_glibc_and_is_a_no_op_elsewhere():
    """The CLI keeps big freed blocks for reuse on untiled images and restores glibc's handling for tiled ones."""
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_memory(True) is expected
    assert reuse_freed_memory(False) is expected
