"""Merge eval result JSONs of one data set (e.g. baselines and TEASR run separately) into one table.

  python benchmarks/report.py results/baselines_RealSR_crop128.json results/teasr_RealSR_crop128.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teasr_core.eval.evaluate import format_table  # noqa: E402


def main(paths: list[str]) -> None:
    merged = {"methods": {}}
    for path in paths:
        results = json.loads(Path(path).read_text())
        print(f"# {path}: {results['images']} images, {results['device']}, {results['date']}, "
              f"checkpoint {results.get('checkpoint')}")
        merged["methods"].update(results["methods"])
    print(format_table(merged))


if __name__ == "__main__":
    main(sys.argv[1:])
