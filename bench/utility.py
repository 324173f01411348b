"""Utility benchmark: does DEeR beat FFA-LoRA and FedAvg-LoRA at equal privacy? A grid of
(privacy level x Dirichlet alpha x epsilon x method x seed) on deer's embedded data, one JSON row per
run, resumable, then a report (mean +- std over seeds, accuracy vs epsilon plots).

    python bench/utility.py --grid bench/utility_grid.yaml --out bench/results/<date>-utility
    python bench/utility.py --grid bench/utility_grid.yaml --out DIR --quick      # one seed, two epsilons

The grid file has `base` (FedConfig keys shared by every run), `methods`, `epsilons`, `alphas`,
`privacy` (sample | client), `seeds`, and `quick` (keys that replace those for --quick). Each run's row
goes to DIR/runs.jsonl as soon as it ends (a rerun skips the rows already there), with its config,
final test metrics, epsilon spent, sigma, clipping bound and wall time. Two references frame each
(privacy, alpha, seed) cell: the pretrained backbone before fine-tuning (the floor) and non-private
FedAvg-LoRA (the ceiling). Metrics are the final round's on the held-out test split; nothing is
selected on private data. The report is DIR/report.md and DIR/accuracy_vs_epsilon.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

KEYS = ("privacy", "alpha", "epsilon", "method", "seed")


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEYS)


def _grid(path: str, quick: bool) -> dict:
    import yaml
    with open(path) as f:
        g = yaml.safe_load(f)
    if quick:
        g = {**g, **(g.get("quick") or {})}
    for k in ("base", "methods", "epsilons", "alphas", "privacy", "seeds"):
        if k not in g:
            raise ValueError(f"{path}: the grid needs a {k!r} entry")
    return g


def _runs(g: dict):
    """(privacy, alpha, seed) cells, each with its list of (method, epsilon); None = a reference."""
    for privacy in g["privacy"]:
        for alpha in g["alphas"]:
            for seed in g["seeds"]:
                cells = [("fedavg", None)] + [(m, e) for e in g["epsilons"] for m in g["methods"]]
                yield privacy, alpha, seed, cells


def run_grid(grid_path: str, out: str, quick: bool = False, log=print) -> list[dict]:
    from deer.fed import FedConfig, prepare_job, run_method
    g = _grid(grid_path, quick)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "runs.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[_key(row)] = row
    todo = sum(len(cells) for *_, cells in _runs(g))
    n = 0
    for privacy, alpha, seed, cells in _runs(g):
        job = None
        for method, eps in cells:
            n += 1
            level = "none" if eps is None else privacy
            key = (privacy, alpha, eps, method, seed)
            if key in done:
                continue
            cfg = FedConfig(**{**g["base"], "alpha": alpha, "seed": seed, "methods": [method], "progress": False,
                               "privacy": level, "target_epsilon": eps if eps is not None else 8.0})
            if job is None:    # data split and backbone depend on (alpha, seed) only: one per cell
                job = prepare_job(cfg, log=lambda *a: None)
            t0 = time.time()
            res = run_method(dataclasses.replace(job, cfg=cfg), method, log=lambda *a: None)
            row = {"privacy": privacy, "alpha": alpha, "epsilon": eps, "method": method, "seed": seed,
                   "level": level, "label": res["label"] if eps is not None else "FedAvg-LoRA, no DP (ceiling)",
                   "final": res["final"], "initial": res["initial"], "epsilon_spent": res["epsilon"],
                   "sigma": res["noise_multiplier"], "max_grad_norm": cfg.max_grad_norm,
                   "seconds": round(time.time() - t0, 2), "config": cfg.to_dict()}
            with open(path, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            done[key] = row
            report(_ordered(done), out, g)   # after every run: an interrupted grid still has its report
            log(f"[utility] {n}/{todo} {privacy} alpha={alpha} eps={eps} {method} seed={seed}: "
                f"acc {row['final'].get('accuracy', math.nan):.3f} ({row['seconds']:.0f}s)")
    rows = _ordered(done)
    report(rows, out, g)
    return rows


def _ordered(done: dict) -> list[dict]:
    return [done[k] for k in sorted(done, key=lambda k: tuple(str(x) for x in k))]


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def report(rows: list[dict], out: str, g: dict) -> str:
    """report.md (a table per (privacy, alpha): mean +- std over seeds of the final test metrics) and
    accuracy_vs_epsilon.png (one panel per (privacy, alpha), a line per method)."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["privacy"], r["alpha"], r["label"], r["epsilon"])].append(r)
    lines = ["# Utility benchmark\n", f"{len(rows)} runs; machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; commit {_commit()}; grid: methods {g['methods']}, epsilons {g['epsilons']}, "
             f"alphas {g['alphas']}, privacy {g['privacy']}, seeds {g['seeds']}.\n",
             "Metrics: the final round's, on the held-out test split (mean +- std over seeds). Floor: the "
             "pretrained backbone before fine-tuning; ceiling: FedAvg-LoRA without DP.\n"]
    for privacy in g["privacy"]:
        for alpha in g["alphas"]:
            sub = [r for r in rows if r["privacy"] == privacy and r["alpha"] == alpha]
            if not sub:
                continue
            lines += [f"\n## privacy {privacy}, Dirichlet alpha {alpha}\n",
                      "| method | epsilon | accuracy | macro F1 | AUC | epsilon spent | sigma | seeds |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            floor = _mean_std([r["initial"]["accuracy"] for r in sub])
            lines.append(f"| backbone, no fine-tuning (floor) | - | {floor[0]:.3f} +- {floor[1]:.3f} | | | | | |")
            for (p, a, label, eps), rs in sorted(((k, v) for k, v in cells.items() if k[0] == privacy and k[1] == alpha),
                                                 key=lambda kv: (kv[0][3] is not None, kv[0][3] or 0, kv[0][2])):
                acc, f1, auc = (_mean_std([r["final"].get(m) for r in rs]) for m in ("accuracy", "f1", "auc"))
                spent, sig = _mean_std([r["epsilon_spent"] for r in rs]), _mean_std([r["sigma"] for r in rs])
                lines.append(f"| {label} | {'-' if eps is None else eps} | {acc[0]:.3f} +- {acc[1]:.3f} | "
                             f"{f1[0]:.3f} +- {f1[1]:.3f} | {auc[0]:.3f} +- {auc[1]:.3f} | {spent[0]:.2f} | "
                             f"{sig[0]:.3g} | {len(rs)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    _plot(rows, out, g)
    return text


def _plot(rows, out, g):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(p, a) for p in g["privacy"] for a in g["alphas"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (p, a) in zip(axes[0], panels):
        sub = [r for r in rows if r["privacy"] == p and r["alpha"] == a]
        for label in sorted({r["label"] for r in sub if r["epsilon"] is not None}):
            eps = sorted({r["epsilon"] for r in sub if r["label"] == label})
            acc = [_mean_std([r["final"].get("accuracy") for r in sub if r["label"] == label and r["epsilon"] == e])
                   for e in eps]
            ax.errorbar(eps, [m for m, _ in acc], yerr=[s for _, s in acc], marker="o", capsize=3, label=label)
        for label, style in (("floor", ":"), ("ceiling", "--")):
            vals = [r["initial"]["accuracy"] for r in sub] if label == "floor" else \
                [r["final"].get("accuracy") for r in sub if r["epsilon"] is None]
            m, _ = _mean_std(vals)
            if math.isfinite(m):
                ax.axhline(m, color="gray", linestyle=style, label=f"{label} {m:.3f}")
        ax.set(title=f"privacy {p}, alpha {a}", xlabel="epsilon", ylabel="test accuracy", xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_epsilon.png"), dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default=os.path.join(ROOT, "bench", "utility_grid.yaml"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="the grid's quick variant (one seed, two epsilons)")
    args = ap.parse_args(argv)
    run_grid(args.grid, args.out, args.quick)
    print(f"[utility] wrote {os.path.join(args.out, 'report.md')} and accuracy_vs_epsilon.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
