"""Two checkouts of deer, one benchmark run: the step time of the same cases under each, paired.

Each checkout gets one worker process per case that imports deer and bench.models from that tree
(PYTHONPATH=<tree>/python:<tree>), builds the case with bench.models.build_step and waits. The
driver then alternates the workers (old, new, old, new, ...), each timing a few steps per turn, so
that drift of a shared machine's load hits both alike. Reported per deer case: the median step time
of each tree, their ratio, and the DP overhead of each (deer step / non-private step of the same
configuration and tree, timed in the same turns). Both trees must share the compiled extension (copy python/deer/_C*.so).

    git worktree add /tmp/deer-old HEAD~1 && cp python/deer/_C*.so /tmp/deer-old/python/deer/
    python bench/compare_revisions.py --old /tmp/deer-old --new . --out bench/results/<dir>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.models import device_name, write_results  # noqa: E402

WORKER = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(int(sys.argv[2]))
import deer
from bench.models import Case, build_step
case = Case(**json.loads(sys.argv[1]))
built = build_step(case)
step = built[0] if isinstance(built, tuple) else built
for _ in range(3):
    step()
print(json.dumps({"ready": deer.__file__}), flush=True)
for line in sys.stdin:
    n = int(line)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    print(json.dumps(ts), flush=True)
"""

CENTRE = dict(model="tiny", batch=32, img=64, rank=8, targets="qkv")
CASES = [*[dict(CENTRE, method="deer", backend="cpu", noise=nz, phase=ph)
           for nz in ("isotropic", "regulated") for ph in ("B", "A")],
         dict(CENTRE, method="deer", backend="cpu", noise="isotropic", phase="B", fused=True)]


def _worker(tree: str, case: dict, threads: int):
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(tree, "python"), tree]))
    p = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(case), str(threads)], cwd=tree, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(p.stdout.readline())
    if not ready["ready"].startswith(tree):
        raise RuntimeError(f"the worker for {tree} imported deer from {ready['ready']}")
    return p


def _time(p, n: int) -> list[float]:
    p.stdin.write(f"{n}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3, help="steps per worker per turn")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    trees = {"old": a.old, "new": a.new}
    nonprivate = dict(CENTRE, method="nonprivate", noise="none")
    rows = []
    for case in CASES:
        # per tree: this deer case and the non-private step of its configuration, timed in the same turns
        procs = {(k, w): _worker(t, c, a.threads) for k, t in trees.items() for w, c in (("dp", case), ("np", nonprivate))}
        times = {key: [] for key in procs}
        try:
            for turn in range(a.turns):
                keys = list(procs) if turn % 2 == 0 else list(procs)[::-1]
                for key in keys:
                    times[key].append(statistics.median(_time(procs[key], a.steps)))
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait(timeout=60)
        med = {key: statistics.median(v) for key, v in times.items()}
        paired = lambda x, y: statistics.median(u / v for u, v in zip(times[x], times[y]))  # noqa: E731
        row = {"case": case, "old_ms": 1e3 * med[("old", "dp")], "new_ms": 1e3 * med[("new", "dp")],
               "new_over_old": paired(("new", "dp"), ("old", "dp")),
               "nonprivate_new_over_old": paired(("new", "np"), ("old", "np")),
               "old_dp_overhead": paired(("old", "dp"), ("old", "np")) - 1,
               "new_dp_overhead": paired(("new", "dp"), ("new", "np")) - 1}
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = device_name()
    meta = {"device": device, "threads": a.threads, "turns": a.turns, "steps_per_turn": a.steps,
            "old": subprocess.run(["git", "-C", a.old, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip(), "new": "working tree of " + os.path.abspath(a.new),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = [f"# Step time, {meta['old']} vs the change ({device}, {a.threads} thread(s), {a.turns} turns of {a.steps} "
             f"steps; ratios are medians of per-turn ratios)", "",
             "| case | old ms | new ms | new / old | non-private new / old | DP overhead old | new |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        name = f"{c['noise']} {c['phase']}" + (" fused" if c.get("fused") else "")
        lines.append(f"| {name} | {r['old_ms']:.1f} | {r['new_ms']:.1f} | {r['new_over_old']:.3f} | "
                     f"{r['nonprivate_new_over_old']:.3f} | {100 * r['old_dp_overhead']:.1f}% | "
                     f"{100 * r['new_dp_overhead']:.1f}% |")
    write_results(a.out, "compare_revisions", meta, rows, lines)


if __name__ == "__main__":
    main()
