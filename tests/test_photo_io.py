"""Photos as people have them: orientation, colour profile and EXIF kept, inputs never overwritten, atomic
outputs, size limits, HEIC, resumable folder runs. Every file is generated here; the model is `tiny`."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pillow_heif
import pytest
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps

from teasr_core.upscale.imageio import DEFAULT_MAX_MEGAPIXELS, ImageReadError, atomic_file, read_image, write_image

from conftest import REPO
from test_cli import run

MODEL, DATE_TIME_ORIGINAL = 0x0110, 0x9003
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "teasr_core", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def camera_exif(orientation: int = 6, thumbnail: bool = True) -> bytes:
    """EXIF as a phone writes it: Model and Orientation in IFD0, DateTimeOriginal and the pixel size in the
    Exif IFD, and a JPEG thumbnail in IFD1 (laid out by hand: PIL writes no IFD1)."""
    exif = Image.Exif()
    exif[MODEL], exif[ExifTags.Base.Orientation] = "TEASR TestCam 6", orientation
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[DATE_TIME_ORIGINAL], sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight] = \
        "2026:07:14 10:20:30", 64, 32
    data = exif.tobytes()
    if not thumbnail:
        return data
    tiff = bytearray(data[6:])                     # after "Exif\0\0"; IFD0 starts at the offset in the header
    endian = "<" if tiff[:2] == b"II" else ">"
    ifd0 = struct.unpack(endian + "I", tiff[4:8])[0]
    entries = struct.unpack(endian + "H", tiff[ifd0:ifd0 + 2])[0]
    next_at = ifd0 + 2 + 12 * entries              # IFD0's "next IFD" offset: point it at a new IFD1
    thumb = io.BytesIO()
    Image.new("RGB", (8, 4), (255, 0, 0)).save(thumb, "JPEG")
    ifd1 = len(tiff)
    struct.pack_into(endian + "I", tiff, next_at, ifd1)
    tiff += struct.pack(endian + "H", 2)
    tiff += struct.pack(endian + "HHII", 0x0201, 4, 1, ifd1 + 2 + 24 + 4)   # JPEGInterchangeFormat
    tiff += struct.pack(endian + "HHII", 0x0202, 4, 1, len(thumb.getvalue()))
    tiff += struct.pack(endian + "I", 0) + thumb.getvalue()
    return b"Exif\0\0" + bytes(tiff)


def portrait_jpeg(path, exif: bytes, icc: bytes | None = SRGB) -> None:
    """A phone's portrait shot: stored 64 wide x 32 high, left half red, right half blue; orientation 6
    turns it clockwise, so upright it is 32 x 64 with red on top."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0], pixels[:, 32:, 2] = 230, 230
    Image.fromarray(pixels).save(path, quality=95, exif=exif, **({"icc_profile": icc} if icc else {}))


# ---- orientation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_pillow_shows_it(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    src = tmp_path / "o.png"
    Image.fromarray(pixels).save(src, exif=exif.tobytes())
    with Image.open(src) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255
    photo = read_image(src)
    assert torch.equal(photo.rgb[0].permute(1, 2, 0), torch.from_numpy(upright))


def test_exif_6_jpeg_comes_out_upright_with_the_tag_reset(tmp_path, tiny_ckpt):
    src, out = tmp_path / "portrait.jpg", tmp_path / "x4.png"
    portrait_jpeg(src, camera_exif(6))
    assert Image.open(src).size == (64, 32)
    assert run([src, out], tiny_ckpt) == 0
    with Image.open(out) as im:
        assert im.size == (128, 256)                           # upright: 32 x 64, x4
        assert im.getexif().get(ExifTags.Base.Orientation, 1) == 1
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    top, bottom = rgb[:96].mean((0, 1)), rgb[-96:].mean((0, 1))   # the wavelet colour fix keeps the input's colours
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)


# ---- colour profile and EXIF ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_and_camera_exif_are_carried(tmp_path, tiny_ckpt, suffix):
    src, out = tmp_path / "photo.jpg", tmp_path / f"x4{suffix}"
    portrait_jpeg(src, camera_exif(6))
    with Image.open(src) as im:
        assert im.getexif().get_ifd(ExifTags.IFD.IFD1), "the input must carry a thumbnail for this test"
    assert run([src, out], tiny_ckpt) == 0
    with Image.open(out) as im:
        assert im.info["icc_profile"] == SRGB
        exif = im.getexif()
        assert exif[MODEL] == "TEASR TestCam 6"
        assert ExifTags.Base.Orientation not in exif
        assert not exif.get_ifd(ExifTags.IFD.IFD1)              # the input's thumbnail is not carried
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        assert sub[DATE_TIME_ORIGINAL] == "2026:07:14 10:20:30"
        assert (sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight]) == (128, 256)


def test_16bit_png_keeps_its_profile(tmp_path, tiny_ckpt):
    src, out = tmp_path / "rgb16.png", tmp_path / "x4.png"
    exif = camera_exif(1, thumbnail=False)
    write_image(src, torch.rand(1, 3, 6, 7), bits=16, icc=SRGB, exif=exif)
    photo = read_image(src)
    assert photo.bits == 16 and photo.icc == SRGB
    assert run([src, out], tiny_ckpt) == 0
    with Image.open(out) as im:                                 # PIL reads the iCCP / eXIf chunks pypng cannot write
        assert im.info["icc_profile"] == SRGB and im.getexif()[MODEL] == "TEASR TestCam 6"
    assert read_image(out).bits == 16


def test_a_profile_for_other_planes_is_dropped_with_a_warning(tmp_path):
    cmyk_profile = SRGB[:16] + b"CMYK" + SRGB[20:]   # only the header's colour space is read
    src = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 200, 200, 0)).save(src, icc_profile=cmyk_profile)
    with pytest.warns(UserWarning, match="ICC profile is for CMYK data"):
        photo = read_image(src)
    assert photo.icc is None and photo.rgb.shape == (1, 3, 8, 8)


# ---- never the input, never a half file -----------------------------------------------------------
def test_input_is_never_overwritten(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "in.tif"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src)
    before = digest(src)
    (tmp_path / "link.tif").symlink_to(src)
    os.link(src, tmp_path / "hard.tif")
    for out in (src, tmp_path / "link.tif", tmp_path / "hard.tif", tmp_path / ".." / tmp_path.name / "in.tif"):
        assert run([src, out, "--overwrite"], tiny_ckpt) == 2
        assert "never overwrites an input" in capsys.readouterr().err
    assert digest(src) == before


def test_an_existing_output_needs_overwrite(tmp_path, tiny_ckpt, capsys):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(src)
    Image.new("RGB", (3, 3)).save(out)
    before = digest(out)
    assert run([src, out], tiny_ckpt) == 2
    assert "out.png exists; pass --overwrite" in capsys.readouterr().err and digest(out) == before
    assert run([src, out, "--overwrite"], tiny_ckpt) == 0
    assert Image.open(out).size == (32, 32)


def test_two_inputs_for_one_output_are_refused(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.jpg")
    Image.new("RGB", (8, 8)).save(src / "a.webp")
    assert run([src, tmp_path / "out"], tiny_ckpt) == 2
    assert "would both be written to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


KILL_MID_WRITE = """
import sys
import numpy as np
from teasr_core.upscale.imageio import ImageCanvas
canvas = ImageCanvas(sys.argv[1], 3000, 3000)
canvas.pixels[:] = np.random.default_rng(0).integers(0, 256, canvas.pixels.shape, dtype=np.uint8)
print("writing", flush=True)
canvas.save()
print("written", flush=True)
"""


def test_a_write_killed_midway_leaves_no_file_under_the_final_name(tmp_path):
    """SIGKILL while the CLI's writer streams a 27 MB PNG: the final name never holds a partial image."""
    out = tmp_path / "x4.png"
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not [p for p in tmp_path.iterdir() if p.name.endswith(".part") and p.stat().st_size > 0]:
            assert time.monotonic() < deadline and proc.poll() is None, "the write never started"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    [part] = [p for p in tmp_path.iterdir()]
    assert part.name.startswith(".x4.png.") and part.name.endswith(".part")   # the half file, hidden beside it


def test_a_failed_write_removes_its_temporary_file(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(tmp_path / "x4.png") as f:
            f.write(b"\x89PNG half an image")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_exif_too_long_for_jpeg_is_dropped_with_a_warning(tmp_path):
    exif = Image.Exif()
    exif[MODEL], exif[ExifTags.Base.ImageDescription] = "TEASR TestCam 6", "x" * 70000
    with pytest.warns(UserWarning, match="JPEG holds at most"):
        write_image(tmp_path / "o.jpg", torch.rand(1, 3, 4, 4), exif=exif.tobytes())
    assert not Image.open(tmp_path / "o.jpg").getexif()


# ---- size limits ----------------------------------------------------------------------------------
def png_header_only(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A ~70-byte PNG whose header claims width x height (a decompression bomb's first bytes)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_a_bomb_is_refused_in_one_line_naming_size_limit_and_flag(tmp_path, bit_depth):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(60000, 60000, bit_depth))
    proc = cli("upscale", bomb, tmp_path / "out.png")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "60000x60000" in lines[0] and f"limit of {DEFAULT_MAX_MEGAPIXELS:g} MP" in lines[0]
    assert "--max-megapixels" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.png").exists()


def test_the_limit_flag_sets_the_limit(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (100, 50)).save(src)
    assert run([src, tmp_path / "o.png", "--max-megapixels", "0.004"], tiny_ckpt) == 2
    assert "100x50 pixels" in capsys.readouterr().err
    with pytest.raises(ImageReadError, match="limit of 0.004 MP"):
        read_image(src, max_megapixels=0.004)
    assert read_image(src, max_megapixels=0).rgb.shape == (1, 3, 50, 100)
    assert run([src, tmp_path / "o.png", "--max-megapixels", "0.005", "--steps", "1"], tiny_ckpt) == 0


def test_an_output_too_wide_for_its_format_is_refused_before_the_model_runs(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "wide.png"
    Image.new("RGB", (4100, 2)).save(src)
    assert run([src, tmp_path / "o.webp"], tiny_ckpt) == 2
    assert "16400x8" in capsys.readouterr().err and not (tmp_path / "o.webp").exists()


# ---- HEIC -----------------------------------------------------------------------------------------
def test_a_heic_photo_upscales_with_its_profile(tmp_path, tiny_ckpt):
    pillow_heif.register_heif_opener()
    src, out = tmp_path / "IMG_0001.HEIC", tmp_path / "x4.png"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src, format="HEIF", quality=95, icc_profile=SRGB,
                                 exif=camera_exif(1, thumbnail=False))
    assert src.read_bytes()[4:12] == b"ftypheic"
    assert run([src, out], tiny_ckpt) == 0
    with Image.open(out) as im:
        assert im.size == (64, 48) and im.info["icc_profile"] == SRGB and im.getexif()[MODEL] == "TEASR TestCam 6"


def test_heic_without_pillow_heif_says_how_to_add_it(tmp_path):
    src = tmp_path / "photo.heic"
    src.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    code = ("import sys; sys.modules['pillow_heif'] = None; from teasr_core.__main__ import main; "
            f"sys.exit(main(['upscale', {str(src)!r}, {str(tmp_path / 'o.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "pip install pillow-heif" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- folder runs resume -----------------------------------------------------------------------------
def test_an_interrupted_folder_run_resumes_where_it_stopped(tmp_path, tiny_ckpt, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, side in (("a", 8), ("b", 192), ("c", 8)):   # b takes long enough to be killed during
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(src / f"{name}.png")
    proc = subprocess.Popen([sys.executable, "-m", "teasr_core", "upscale", str(src), str(dst), "--checkpoint",
                             str(tiny_ckpt)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (dst / "a.png").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the first photo never finished"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished = sorted(p.name for p in dst.glob("*.png"))
    assert finished[:1] == ["a.png"] and len(finished) < 3, finished
    kept = {name: digest(dst / name) for name in finished}
    capsys.readouterr()
    assert run([src, dst], tiny_ckpt) == 0
    assert f"{len(finished)} of 3 already upscaled" in capsys.readouterr().out
    assert {name: digest(dst / name) for name in finished} == kept           # not redone
    assert sorted(p.name for p in dst.glob("*.png")) == ["a.png", "b.png", "c.png"]
    assert Image.open(dst / "b.png").size == (768, 768)
    assert run([src, dst], tiny_ckpt) == 0                                     # all done: nothing to do
    assert "3 of 3 already upscaled" in capsys.readouterr().out
    assert run([src, dst, "--overwrite"], tiny_ckpt) == 0                      # --overwrite redoes them all
    assert "already upscaled" not in capsys.readouterr().out
