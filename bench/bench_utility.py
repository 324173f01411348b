"""The utility benchmark's quick variant (bench/utility.py --quick: one seed, two epsilons, two
clipping bounds, a CI-length schedule) as one benchmark case, so the benchmark smoke run checks the
whole pipeline (tuning, grid, report) on every commit. It measures the pipeline, not the methods: the
methods' comparison is the default grid, `python bench/utility.py --out bench/results/<date>-utility`
(about an hour on the 2-core CPU machine)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def test_utility_quick_grid(benchmark, tmp_path):
    import utility
    grid = os.path.join(os.path.dirname(os.path.abspath(__file__)), "utility_grid.yaml")
    out = {}

    def run():
        d = tmp_path / f"run{len(out)}"
        out["rows"] = utility.run_grid(grid, str(d), quick=True, jobs=min(2, os.cpu_count() or 1), log=lambda *a: None)
        out["dir"] = d

    benchmark.group = "utility-quick"
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    rows = out["rows"]
    benchmark.extra_info.update({"runs": len(rows), "run_seconds": sum(r["seconds"] for r in rows)})
    assert {r["method"] for r in rows} >= {"deer", "ffa", "fedavg", "fedsa"}
    assert "### privacy client" in (out["dir"] / "report.md").read_text()
