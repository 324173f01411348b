"""A fused timm `qkv` projection as one LoRA unit (qkv_slices=None, deer's default on every path) or as
three per-slice units q, k, v (LoRAConfig.qkv_slices=('q', 'k', 'v')): the private step's time and the
trained parameters, measured side by side in one run (paired, interleaved repeats).

    python bench/qkv_layout.py --out bench/results/<date>-<device>-qkv [--repeats 15]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.models import build_vit, device_name, write_results  # noqa: E402

from deer.nn import LoRAConfig, inject_lora, lora_units  # noqa: E402
from deer.privacy import PrivacyEngine  # noqa: E402

LAYOUTS = {"fused": None, "sliced": ("q", "k", "v")}


def build(layout: str, model: str, img: int, rank: int, phase: str, mechanism: str, batch: int):
    vit = build_vit(model, img, seed=0)
    inject_lora(vit, LoRAConfig(["attn.qkv"], r=rank, alpha=2 * rank, qkv_slices=LAYOUTS[layout]), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():   # B as after a few rounds of training, so both phases are generic
        for _, u in lora_units(vit):
            u.lora_B.copy_(torch.randn(u.lora_B.shape, generator=g) / u.lora_B.shape[0] ** 0.5)
    params = [p for p in vit.parameters() if p.requires_grad]
    engine = PrivacyEngine()
    model_p, opt, _ = engine.make_private(vit, torch.optim.SGD(params, lr=1e-3), noise_multiplier=1.0,
                                          max_grad_norm=1.0, mechanism=mechanism, phase=phase, seed=3,
                                          sample_rate=0.01, expected_batch_size=batch)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    trained = sum(u.factor(phase).numel() for _, u in lora_units(vit))

    def step():
        F.cross_entropy(model_p(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, len(lora_units(vit)), trained


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args(argv)
    device = device_name()
    rows = []
    for mech in ("isotropic", "regulated_metric"):
        for phase in ("B", "A"):
            steps = {lay: build(lay, a.model, a.img, a.rank, phase, mech, a.batch) for lay in LAYOUTS}
            for lay in LAYOUTS:
                for _ in range(a.warmup):
                    steps[lay][0]()
            times = {lay: [] for lay in LAYOUTS}
            for _ in range(a.repeats):   # interleaved: drift hits both layouts alike
                for lay in LAYOUTS:
                    t0 = time.perf_counter()
                    steps[lay][0]()
                    times[lay].append(time.perf_counter() - t0)
            med = {lay: statistics.median(t) for lay, t in times.items()}
            row = {"mechanism": mech, "phase": phase,
                   **{f"{lay}_ms": 1e3 * med[lay] for lay in LAYOUTS},
                   **{f"{lay}_units": steps[lay][1] for lay in LAYOUTS},
                   **{f"{lay}_trained_params": steps[lay][2] for lay in LAYOUTS},
                   "sliced_over_fused": med["sliced"] / med["fused"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "model": a.model,
            "img": a.img, "batch": a.batch, "rank": a.rank, "repeats": a.repeats, "date": time.strftime("%Y-%m-%d")}
    lines = [f"# qkv as one LoRA unit (fused) or three (sliced q, k, v): ViT-{a.model}, img {a.img}, batch {a.batch}, "
             f"r {a.rank}, {device}, {meta['threads']} threads, median of {a.repeats} paired steps", "",
             "| mechanism | phase | fused ms | sliced ms | sliced / fused | trained params fused | sliced |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mechanism']} | {r['phase']} | {r['fused_ms']:.1f} | {r['sliced_ms']:.1f} | "
              f"{r['sliced_over_fused']:.2f} | {r['fused_trained_params']} | {r['sliced_trained_params']} |" for r in rows]
    write_results(a.out, "qkv_layout", meta, rows, lines)


if __name__ == "__main__":
    main()
