"""Utility benchmark: does DEeR beat FFA-LoRA and FedAvg-LoRA at equal privacy? A grid of
(privacy level x Dirichlet alpha x epsilon x method x seed) on deer's embedded data, one JSON row per
run, resumable, with the clipping bound tuned per method on a public validation split, then a report
(mean +- std over seeds, the paper's headline claim checked, accuracy vs epsilon plots).

    python bench/utility.py --out bench/results/<date>-utility [--grid bench/utility_grid.yaml] [--jobs 2]
    python bench/utility.py --out DIR --quick      # the grid's quick variant (one seed, two epsilons)

The grid file has `base` (FedConfig keys shared by every run), `methods`, `epsilons`, `alphas`,
`privacy` (sample | client), `seeds`, `clip_bounds` and `tune` (the alpha, epsilon and seed at which
the clipping bound is chosen), and `quick` (keys that replace those for --quick; its `base` updates
the base). Two stages, each run's row appended to DIR/runs.jsonl the moment it ends (a rerun skips the
rows already there):

1. tune: for every (privacy level, method), one run per clipping bound at the tune cell; the bound
   with the best accuracy on the validation split (val_fraction of the training data, all classes,
   held out from the clients, the pretraining and the test split: public data, so the choice spends
   no privacy) is used for that method at that level everywhere in the grid.
2. grid: every (privacy, alpha, seed) cell runs non-private FedAvg-LoRA (the ceiling) and every
   (method, epsilon) with its tuned bound; the pretrained backbone before fine-tuning is the floor.

A run's reported test metrics are those of the round with the best validation accuracy (the authors'
model selection, here on public data); the last round's are kept too. Beside deer's epsilon each row
carries the epsilon the DEeR authors' accounting would report for the same noise (`authors_epsilon`:
not a guarantee). The report is DIR/report.md and DIR/accuracy_vs_epsilon.png; DIR/wall.json holds
the wall time of every invocation.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

KEYS = ("stage", "privacy", "alpha", "epsilon", "method", "seed", "max_grad_norm")
HEADLINE = ("deer", "ffa", "fedavg")   # the paper's claim: DEeR > FFA-LoRA > FedAvg-LoRA at equal epsilon


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEYS)


def _grid(path: str, quick: bool) -> dict:
    import yaml
    with open(path) as f:
        g = yaml.safe_load(f)
    if quick:
        q = dict(g.get("quick") or {})
        g = {**g, **q, "base": {**g.get("base", {}), **(q.get("base") or {})}}
    for k in ("base", "methods", "epsilons", "alphas", "privacy", "seeds", "clip_bounds", "tune"):
        if k not in g:
            raise ValueError(f"{path}: the grid needs a {k!r} entry")
    if not g["base"].get("val_fraction"):
        raise ValueError(f"{path}: base.val_fraction must be > 0: the clipping bound and the reported round are "
                         "chosen on the validation split")
    return g


def authors_epsilon(cfg, phases: int, sigma: float, n_private: int) -> float:
    """The epsilon the DEeR authors' accounting reports for this run's noise: the whole federation's
    releases treated as one sample-level DP-SGD run over all N private records (sample rate
    b_total / N with b_total = batch_size x num_clients, rounds x phases x local_epochs x N / b_total
    steps, delta = 1 / num_clients). NOT a guarantee of this run: at client level it charges a
    client's whole update as if it were one record's gradient."""
    from deer.fed.accounting import epsilon
    if sigma <= 0:
        return 0.0
    b = cfg.batch_size * cfg.num_clients
    per_sub = cfg.local_steps or cfg.local_epochs * math.ceil(n_private / b)
    return epsilon([(sigma, min(1.0, b / n_private), cfg.rounds * phases * per_sub)], 1.0 / cfg.num_clients)


def _tasks(g: dict, tuned: dict | None):
    """(stage, privacy, alpha, seed, [(method, epsilon or None, clipping bound)]): one task per data
    split and backbone, which depend on (alpha, seed) only. tuned: {(privacy, method): bound}."""
    t = g["tune"]
    if tuned is None:
        for privacy in g["privacy"]:
            for m in g["methods"]:
                yield "tune", privacy, t["alpha"], t["seed"], [(m, t["epsilon"], c) for c in g["clip_bounds"]]
        return
    c0 = g["base"].get("max_grad_norm", 1.0)
    for privacy in g["privacy"]:
        for alpha in g["alphas"]:
            for seed in g["seeds"]:
                yield "grid", privacy, alpha, seed, [("fedavg", None, c0)] + [
                    (m, e, tuned[(privacy, m)]) for e in g["epsilons"] for m in g["methods"]]


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def _run_task(g: dict, out: str, task, done_keys: set) -> list[dict]:
    """Run one task's missing rows (in a worker process or inline), appending each to runs.jsonl."""
    import torch
    from deer.fed import FedConfig, method_spec, prepare_job, run_method
    stage, privacy, alpha, seed, runs = task
    if g["base"].get("torch_threads"):
        torch.set_num_threads(int(g["base"]["torch_threads"]))
    job, rows = None, []
    for method, eps, clip in runs:
        level = "none" if eps is None else privacy
        key = (stage, privacy, alpha, eps, method, seed, clip)
        if key in done_keys:
            continue
        cfg = FedConfig(**{**g["base"], "alpha": alpha, "seed": seed, "methods": [method], "progress": False,
                           "privacy": level, "max_grad_norm": clip,
                           "target_epsilon": eps if eps is not None else 8.0}).validate()
        if job is None:
            job = prepare_job(cfg, log=lambda *a: None)
        t0 = time.time()
        res = run_method(dataclasses.replace(job, cfg=cfg), method, log=lambda *a: None)
        n_private = sum(len(c) for c in job.data.clients)
        phases = len(method_spec(method).phases)
        row = {"stage": stage, "privacy": privacy, "alpha": alpha, "epsilon": eps, "method": method, "seed": seed,
               "max_grad_norm": clip, "level": level,
               "label": res["label"] if eps is not None else "FedAvg-LoRA, no DP (ceiling)",
               "best": res["best"], "final": res["final"], "initial": res["initial"],
               "epsilon_spent": res["epsilon"], "sigma": res["noise_multiplier"],
               "authors_epsilon": authors_epsilon(cfg, phases, res["noise_multiplier"], n_private) if eps else 0.0,
               "seconds": round(time.time() - t0, 2), "config": cfg.to_dict()}
        _append(os.path.join(out, "runs.jsonl"), row)
        rows.append(row)
    return rows


def _load(path: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[_key(row)] = row
    return done


def tuned_bounds(g: dict, done: dict) -> dict | None:
    """{(privacy, method): the clipping bound with the best validation accuracy at the tune cell}
    (ties: the smaller bound), or None while a tune run is missing."""
    t, out = g["tune"], {}
    for privacy in g["privacy"]:
        for m in g["methods"]:
            scores = []
            for c in g["clip_bounds"]:
                r = done.get(("tune", privacy, t["alpha"], t["epsilon"], m, t["seed"], c))
                if r is None:
                    return None
                scores.append((-_val(r), c))
            out[(privacy, m)] = min(scores)[1]
    return out


def _val(r: dict) -> float:
    v = r["best"]["val"]["accuracy"] if r.get("best") else math.nan
    return v if math.isfinite(v) else -1.0


def run_grid(grid_path: str, out: str, quick: bool = False, jobs: int = 1, log=print) -> list[dict]:
    g = _grid(grid_path, quick)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "runs.jsonl")
    done = _load(path)
    t_start, ran, commit = time.time(), [0], _commit()   # the code that runs is the one checked out now
    try:
        _stages(g, out, done, jobs, log, ran)
    finally:   # an interrupted invocation's time counts too
        if ran[0]:
            wall = os.path.join(out, "wall.json")
            hist = json.load(open(wall)) if os.path.exists(wall) else []
            hist.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)), "runs": ran[0],
                         "jobs": jobs, "seconds": round(time.time() - t_start, 1), "commit": commit})
            with open(wall, "w") as f:
                json.dump(hist, f, indent=1)
    rows = _ordered(done)
    report(rows, out, g)
    return rows


def _stages(g: dict, out: str, done: dict, jobs: int, log, ran: list) -> None:
    for stage in ("tune", "grid"):
        tasks = [t for t in _tasks(g, None if stage == "tune" else tuned_bounds(g, done))
                 if any((t[0], t[1], t[2], e, m, t[3], c) not in done for m, e, c in t[4])]
        if not tasks:
            continue
        log(f"[utility] {stage}: {len(tasks)} tasks, {sum(len(t[4]) for t in tasks)} runs, {jobs} process(es)")
        keys = set(done)
        if jobs > 1:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as ex:
                futures = [ex.submit(_run_task, g, out, t, keys) for t in tasks]
                results = (f.result() for f in futures)
                _collect(results, done, out, g, log, ran)
        else:
            _collect((_run_task(g, out, t, keys) for t in tasks), done, out, g, log, ran)


def _collect(results, done, out, g, log, ran: list) -> None:
    for rows in results:
        for row in rows:
            done[_key(row)] = row
            ran[0] += 1
            log(f"[utility] {row['stage']} {row['privacy']} alpha={row['alpha']} eps={row['epsilon']} "
                f"{row['method']} C={row['max_grad_norm']} seed={row['seed']}: test acc "
                f"{row['best']['accuracy']:.3f} at best val ({row['seconds']:.0f}s)")
        report(_ordered(done), out, g)   # after every task: an interrupted grid still has its report


def _ordered(done: dict) -> list[dict]:
    return [done[k] for k in sorted(done, key=lambda k: tuple(str(x) for x in k))]


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _fmt(ms) -> str:
    return f"{ms[0]:.3f} +- {ms[1]:.3f}"


def headline(rows: list[dict], g: dict) -> list[str]:
    """Per privacy level: in every (alpha, epsilon) cell, the seed-paired gaps DEeR - FFA-LoRA and
    FFA-LoRA - FedAvg-LoRA (test accuracy at best validation), and a verdict: 'supported' when both
    gaps are positive with mean above their seed std in every cell; 'not supported' when both gaps are
    positive (in the mean) in fewer than half the cells; otherwise 'partly supported'."""
    if not all(m in g["methods"] for m in HEADLINE):
        return []
    acc = {(r["privacy"], r["alpha"], r["epsilon"], r["method"], r["seed"]): r["best"]["accuracy"]
           for r in rows if r["stage"] == "grid" and r["epsilon"] is not None}
    lines = ["\n## The paper's headline claim: DEeR > FFA-LoRA > FedAvg-LoRA at equal epsilon\n",
             "Seed-paired gaps in test accuracy (at the best validation round), mean +- std over seeds. "
             "Verdict rule: supported = both gaps > 0 with mean above their std in every cell; not supported = "
             "both gaps > 0 (mean) in fewer than half the cells; otherwise partly supported.\n"]
    for privacy in g["privacy"]:
        lines += [f"\n### privacy {privacy}\n", "| alpha | epsilon | DEeR - FFA-LoRA | FFA-LoRA - FedAvg-LoRA | order holds |",
                  "| ---: | ---: | ---: | ---: | --- |"]
        cells, both, firm = 0, 0, 0
        for alpha in g["alphas"]:
            for eps in g["epsilons"]:
                gaps = [[], []]
                for s in g["seeds"]:
                    v = [acc.get((privacy, alpha, eps, m, s)) for m in HEADLINE]
                    if None not in v:
                        gaps[0].append(v[0] - v[1])
                        gaps[1].append(v[1] - v[2])
                if not gaps[0]:
                    continue
                d1, d2 = _mean_std(gaps[0]), _mean_std(gaps[1])
                cells += 1
                pos = d1[0] > 0 and d2[0] > 0
                both += pos
                firm += pos and d1[0] > d1[1] and d2[0] > d2[1]
                lines.append(f"| {alpha} | {eps} | {d1[0]:+.3f} +- {d1[1]:.3f} | {d2[0]:+.3f} +- {d2[1]:.3f} | "
                             f"{'yes' if pos else 'no'} ({len(gaps[0])} seeds) |")
        if cells:
            verdict = "supported" if firm == cells else "not supported" if 2 * both < cells else "partly supported"
            lines.append(f"\n**{privacy} level: {verdict}** (order holds in the mean in {both} of {cells} cells, beyond "
                         f"the seed spread in {firm}).")
    return lines


def summary(grid: list[dict], g: dict) -> list[str]:
    """One compact table per privacy level (the README's): test accuracy at the best validation round,
    mean +- std over seeds, a column per (alpha, epsilon), a row per method, floor and ceiling first."""
    lines = ["\n## Summary (test accuracy at the best validation round, mean +- std over seeds)\n"]
    cols = [(a, e) for a in g["alphas"] for e in g["epsilons"]]
    labels = {}
    for r in grid:
        if r["epsilon"] is not None:
            labels.setdefault(r["method"], r["label"])
    for privacy in g["privacy"]:
        sub = [r for r in grid if r["privacy"] == privacy]
        if not sub:
            continue
        lines += [f"\n### {privacy} level\n", "| method | " + " | ".join(f"alpha {a}, eps {e}" for a, e in cols) + " |",
                  "| --- |" + " ---: |" * len(cols)]
        for name, pick in (("backbone, no fine-tuning (floor)", lambda r, a: r["alpha"] == a and r["epsilon"] is None),
                           ("FedAvg-LoRA, no DP (ceiling)", lambda r, a: r["alpha"] == a and r["epsilon"] is None)):
            key = (lambda r: r["initial"]["accuracy"]) if "floor" in name else (lambda r: r["best"]["accuracy"])
            lines.append(f"| {name} | " + " | ".join(_fmt(_mean_std([key(r) for r in sub if pick(r, a)]))
                                                    for a, _ in cols) + " |")
        for m in g["methods"]:
            lines.append(f"| {labels.get(m, m)} | " + " | ".join(_fmt(_mean_std(
                [r["best"]["accuracy"] for r in sub if r["method"] == m and r["alpha"] == a and r["epsilon"] == e]))
                for a, e in cols) + " |")
    return lines


def report(rows: list[dict], out: str, g: dict) -> str:
    """report.md and accuracy_vs_epsilon.png from the rows so far."""
    import torch
    wall = os.path.join(out, "wall.json")
    hist = json.load(open(wall)) if os.path.exists(wall) else []
    grid = [r for r in rows if r["stage"] == "grid"]
    lines = ["# Utility benchmark\n",
             f"{len(rows)} runs ({len(grid)} grid, {len(rows) - len(grid)} tuning); machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU used; torch "
             f"{torch.__version__}; code at commit {', '.join(sorted({h['commit'] for h in hist})) or _commit()}; wall "
             f"time {sum(h['seconds'] for h in hist) / 60:.1f} min over {len(hist)} invocation(s) "
             f"({', '.join(str(h['jobs']) for h in hist) or '-'} processes); the runs' own times add up to "
             f"{sum(r['seconds'] for r in rows) / 60:.1f} min.\n",
             f"Grid: methods {g['methods']}, epsilons {g['epsilons']}, alphas {g['alphas']}, privacy {g['privacy']}, "
             f"seeds {g['seeds']}; base {json.dumps(g['base'])}.\n",
             "Test metrics are the round's with the best accuracy on the public validation split (mean +- std over "
             "seeds); 'last' is the final round's accuracy. Floor: the pretrained backbone before fine-tuning; "
             "ceiling: FedAvg-LoRA without DP. 'authors' eps' is what the DEeR authors' accounting would report for "
             "the same noise (the federation as one sample-level DP-SGD run, delta = 1/clients): NOT a guarantee.\n"]
    tuned = tuned_bounds(g, {_key(r): r for r in rows})
    t = g["tune"]
    lines += [f"\n## Clipping bound, chosen on the validation split (alpha {t['alpha']}, epsilon {t['epsilon']}, "
              f"seed {t['seed']})\n", "| privacy | method | " + " | ".join(f"C={c}" for c in g["clip_bounds"])
              + " | chosen |", "| --- | --- |" + " ---: |" * (len(g["clip_bounds"]) + 1)]
    by = {_key(r): r for r in rows if r["stage"] == "tune"}
    for privacy in g["privacy"]:
        for m in g["methods"]:
            vals = [by.get(("tune", privacy, t["alpha"], t["epsilon"], m, t["seed"], c)) for c in g["clip_bounds"]]
            lines.append(f"| {privacy} | {m} | " + " | ".join(f"{_val(v):.3f}" if v else "-" for v in vals)
                         + f" | {tuned[(privacy, m)] if tuned else '-'} |")
    cells = defaultdict(list)
    for r in grid:
        cells[(r["privacy"], r["alpha"], r["label"], r["epsilon"])].append(r)
    for privacy in g["privacy"]:
        for alpha in g["alphas"]:
            sub = [r for r in grid if r["privacy"] == privacy and r["alpha"] == alpha]
            if not sub:
                continue
            lines += [f"\n## privacy {privacy}, Dirichlet alpha {alpha}\n",
                      "| method | epsilon | C | accuracy | last | macro F1 | AUC | epsilon spent | authors' eps | "
                      "sigma | seeds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            floor = _mean_std([r["initial"]["accuracy"] for r in sub])
            lines.append(f"| backbone, no fine-tuning (floor) | - | - | {_fmt(floor)} | | | | | | | |")
            for (_, _, label, eps), rs in sorted(((k, v) for k, v in cells.items() if k[:2] == (privacy, alpha)),
                                                 key=lambda kv: (kv[0][3] is not None, kv[0][3] or 0, kv[0][2])):
                acc, f1, auc = (_mean_std([r["best"].get(m) for r in rs]) for m in ("accuracy", "f1", "auc"))
                last = _mean_std([r["final"].get("accuracy") for r in rs])
                spent, auth, sig = (_mean_std([r[k] for r in rs]) for k in ("epsilon_spent", "authors_epsilon", "sigma"))
                lines.append(f"| {label} | {'-' if eps is None else eps} | {'-' if eps is None else rs[0]['max_grad_norm']} | "
                             f"{_fmt(acc)} | {last[0]:.3f} | {_fmt(f1)} | {_fmt(auc)} | {spent[0]:.2f} | "
                             f"{auth[0]:.3g} | {sig[0]:.3g} | {len(rs)} |")
    lines += headline(rows, g)
    lines += summary(grid, g)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    _plot(grid, out, g)
    return text


def _plot(rows, out, g):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(p, a) for p in g["privacy"] for a in g["alphas"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (p, a) in zip(axes[0], panels):
        sub = [r for r in rows if r["privacy"] == p and r["alpha"] == a]
        for label in sorted({r["label"] for r in sub if r["epsilon"] is not None}):
            eps = sorted({r["epsilon"] for r in sub if r["label"] == label})
            acc = [_mean_std([r["best"].get("accuracy") for r in sub if r["label"] == label and r["epsilon"] == e])
                   for e in eps]
            ax.errorbar(eps, [m for m, _ in acc], yerr=[s for _, s in acc], marker="o", capsize=3, label=label)
        for label, style in (("floor", ":"), ("ceiling", "--")):
            vals = [r["initial"]["accuracy"] for r in sub] if label == "floor" else \
                [r["best"].get("accuracy") for r in sub if r["epsilon"] is None]
            m, _ = _mean_std(vals)
            if math.isfinite(m):
                ax.axhline(m, color="gray", linestyle=style, label=f"{label} {m:.3f}")
        ax.set(title=f"privacy {p}, alpha {a}", xlabel="epsilon", ylabel="test accuracy (best val round)",
               xscale="log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
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
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (each runs one data split at a time, one torch thread)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    run_grid(args.grid, args.out, args.quick, args.jobs)
    print(f"[utility] wrote {os.path.join(args.out, 'report.md')} and accuracy_vs_epsilon.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
