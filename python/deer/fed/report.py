"""Run reports: the results table (rich), results.json and the accuracy-vs-round plot (matplotlib)."""
from __future__ import annotations

import json
import math
import os


def results_rows(results: dict) -> list[dict]:
    rows = []
    for r in results.values():
        f = r.get("final", {})
        rows.append({"method": r["label"], "accuracy": f.get("accuracy", math.nan), "f1": f.get("f1", math.nan),
                     "recall": f.get("recall", math.nan), "precision": f.get("precision", math.nan),
                     "auc": f.get("auc", math.nan), "epsilon": r["epsilon"], "delta": r["delta"],
                     "noise_multiplier": r["noise_multiplier"], "releases": r["releases"],
                     "skipped": len(r["skipped"])})
    return rows


def print_table(results: dict, title: str, console=None) -> str:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for c in ("method", "accuracy", "macro F1", "macro recall", "macro precision", "AUC", "epsilon (delta)",
              "sigma"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in results_rows(results):
        eps = "no DP" if r["noise_multiplier"] == 0 else f"{r['epsilon']:.2f} ({r['delta']:g})"
        t.add_row(r["method"], f"{r['accuracy']:.3f}", f"{r['f1']:.3f}", f"{r['recall']:.3f}",
                  f"{r['precision']:.3f}", f"{r['auc']:.3f}", eps, f"{r['noise_multiplier']:.3g}")
    console = console or Console(width=130)
    with console.capture() as cap:
        console.print(t)
    text = cap.get()
    print(text, end="")
    return text


def save_report(results: dict, run_dir: str, title: str) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    out = {m: {k: v for k, v in r.items() if k != "adapters"} for m, r in results.items()}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"title": title, "methods": out}, f, indent=1, default=float)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for r in results.values():
        h = ([{"round": 0, **r["initial"]}] if r.get("initial") else []) + r["history"]
        ax.plot([x["round"] for x in h], [x["accuracy"] for x in h], marker="o",
                label=f"{r['label']} (eps {r['epsilon']:.2f})" if r["noise_multiplier"] else r["label"])
    ax.set_xlabel("communication round (0 = pretrained backbone, before fine-tuning)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "accuracy.png")
    fig.savefig(path)
    plt.close(fig)
    return {"plot": path, "results": os.path.join(run_dir, "results.json")}
