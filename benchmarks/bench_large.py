"""Time and peak memory of a whole CLI upscale against output megapixels, one fresh process per run.

  python benchmarks/bench_large.py run --photo P --sizes 3,12,48,96 [--code DIR] [--label after] [--out F]
  python benchmarks/bench_large.py run --photo P --sizes 3,12 --method realesrgan --out F
  python benchmarks/bench_large.py plot --out F --figure benchmarks/large_images.svg
  python benchmarks/bench_large.py table --out F      # the BENCHMARKS.md table of every row in F

`run` resizes the photo (bicubic) to the input size of each output size (4:3, x4), runs
`python -m teasr_core upscale IN OUT --steps 1` (or Real-ESRGAN x4plus's tiled path) from the
repository at --code (default: this one; an older commit's tree gives the "before" rows) in a child
process, and appends {label, method, output MP, seconds, peak RSS} to the JSON file. Peak RSS is the
child's own (os.wait4), so the benchmark's process does not count. `plot` draws seconds and GB per
output MP as an SVG (no plotting library needed); `table` prints the rows as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = {3: (500, 375), 12: (1000, 750), 48: (2000, 1500), 96: (3000, 2000), 192: (4000, 3000)}  # output MP -> input px

REALESRGAN = """
import sys, numpy as np, torch
from PIL import Image
from teasr_core.eval.baselines import load_realesrgan, realesrgan_upscale
image = torch.from_numpy(np.asarray(Image.open(sys.argv[1]).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
out = realesrgan_upscale(load_realesrgan(), image)
Image.fromarray(out[0].mul(255).round().byte().permute(1, 2, 0).numpy()).save(sys.argv[2])
"""


def measure(command: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024 / 1e9


def cmd_run(args) -> None:
    from PIL import Image
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    with tempfile.TemporaryDirectory() as tmp, Image.open(args.photo) as photo:
        for mp in (int(s) for s in args.sizes.split(",")):
            src, dst = Path(tmp) / f"in_{mp}.png", Path(tmp) / f"out_{mp}.png"
            photo.convert("RGB").resize(INPUTS[mp], Image.BICUBIC).save(src)
            if args.method == "teasr":
                command = [sys.executable, "-m", "teasr_core", "upscale", str(src), str(dst), "--steps", "1"]
                command += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
            else:
                command = [sys.executable, "-c", REALESRGAN, str(src), str(dst)]
            seconds, gb = measure(command, args.code)
            row = dict(label=args.label, method=args.method, checkpoint=str(args.checkpoint or "bundled"),
                       input=list(INPUTS[mp]), output_mp=mp, seconds=round(seconds, 1), peak_rss_gb=round(gb, 2),
                       date=time.strftime("%Y-%m-%d"))
            print(json.dumps(row), flush=True)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
            dst.unlink(missing_ok=True)


def cmd_table(args) -> None:
    """One Markdown row per run, in the file's order: time and memory per output megapixel beside the totals."""
    print("| run | method | output MP | seconds | s / MP | peak RSS (GB) | bytes / output px | date |")
    print("|---|---|---|---|---|---|---|---|")
    for r in json.loads(args.out.read_text()):
        mp, seconds, gb = r["output_mp"], r["seconds"], r["peak_rss_gb"]
        print(f"| {r['label']} | {r['method']} | {mp} | {seconds:.0f} | {seconds / mp:.1f} | {gb:.2f} | "
              f"{gb * 1e9 / (mp * 1e6):.0f} | {r['date']} |")


def cmd_plot(args) -> None:
    """Two panels (seconds, peak GB) against output MP, one polyline per (method, label)."""
    rows = json.loads(args.out.read_text())
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['method']} {r['label']}", []).append((r["output_mp"], r["seconds"], r["peak_rss_gb"]))
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    max_mp = max(r["output_mp"] for r in rows)
    width, height, pad = 420, 300, 50
    parts = []
    for panel, (field, unit) in enumerate(((1, "seconds"), (2, "peak RSS (GB)"))):
        top = max(p[field] for pts in series.values() for p in pts) * 1.1
        ox = panel * (width + 40)
        x = lambda mp: ox + pad + (width - pad - 10) * mp / max_mp  # noqa: E731
        y = lambda v: height - pad + 10 - (height - pad - 10) * v / top  # noqa: E731
        parts.append(f'<rect x="{ox + pad}" y="10" width="{width - pad - 10}" height="{height - pad}" '
                     'fill="none" stroke="#888"/>')
        for i in range(5):
            v = top * i / 4
            parts.append(f'<text x="{ox + pad - 4}" y="{y(v) + 4:.0f}" font-size="11" text-anchor="end">'
                         f'{v:.{0 if top >= 8 else 1}f}</text>')
        for mp in sorted({r["output_mp"] for r in rows}):
            parts.append(f'<text x="{x(mp):.0f}" y="{height - pad + 26}" font-size="11" text-anchor="middle">{mp}</text>')
        parts.append(f'<text x="{ox + width / 2 + 20:.0f}" y="{height - 6}" font-size="12" text-anchor="middle">'
                     f'output megapixels</text>')
        parts.append(f'<text x="{ox + pad}" y="{height + 12}" font-size="12">{unit}</text>')
        for (name, pts), colour in zip(sorted(series.items()), colours):
            pts = sorted(pts)
            line = " ".join(f"{x(p[0]):.1f},{y(p[field]):.1f}" for p in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
            parts += [f'<circle cx="{x(p[0]):.1f}" cy="{y(p[field]):.1f}" r="3" fill="{colour}"/>' for p in pts]
    for i, ((name, _), colour) in enumerate(zip(sorted(series.items()), colours)):
        parts.append(f'<text x="{pad + 10}" y="{30 + 16 * i}" font-size="12" fill="{colour}">{name}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 40}" height="{height + 20}" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')
    args.figure.write_text(svg)
    print(f"wrote {args.figure}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    results = argparse.ArgumentParser(add_help=False)  # every subcommand reads or appends this file
    results.add_argument("--out", type=Path, default=REPO / "results" / "bench_large.json")
    run = sub.add_parser("run", parents=[results])
    run.add_argument("--photo", type=Path, required=True, help="source photo, resized to each input size")
    run.add_argument("--sizes", default="3,12,48,96", help=f"output MP, of {sorted(INPUTS)}")
    run.add_argument("--method", choices=("teasr", "realesrgan"), default="teasr")
    run.add_argument("--code", type=Path, default=REPO, help="repository tree to run (an older commit for 'before')")
    run.add_argument("--checkpoint", type=Path)
    run.add_argument("--label", default="after")
    run.set_defaults(run=cmd_run)
    plot = sub.add_parser("plot", parents=[results])
    plot.add_argument("--figure", type=Path, default=REPO / "benchmarks" / "large_images.svg")
    plot.set_defaults(run=cmd_plot)
    table = sub.add_parser("table", parents=[results])
    table.set_defaults(run=cmd_table)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
