"""Fairness of the end-to-end benchmark: with the noise off, deer, Opacus hooks,
Opacus ghost clipping and "DEeR on Opacus" hand the optimizer the same clipped, averaged gradient of
the same LoRA parameters on the same batch, and that gradient is the float64 reference's.

The models are a 2-block ViT-tiny at 32 px (5 tokens) with LoRA on qkv, and the benchmark's two
decoder LMs (tiny Llama, GPT-2-shaped) cut to one layer, on right-padded sequences of 11 tokens with
the causal LM loss and LoRA on the attention projections; an odd batch (7) and rank 3, both DEeR
phases. The clipping bound is the median per-sample norm, so some samples are clipped and
some are not: a method that skipped clipping, clipped per layer, or scaled by the wrong batch size
would differ from the reference by far more than the tolerance (checked against the unclipped mean).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("opacus")
pytest.importorskip("timm")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from bench.models import (Case, build_lora_model, build_nonprivate_step, clipped_grads, make_batch,  # noqa: E402
                          reference_clipped_grads, to_peft)

RTOL = 2e-4   # fp32 per-sample gradients and norms of a 2-block ViT against the float64 oracle


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


SHAPES = {"vit": dict(depth=2, img=32, targets="qkv"),
          "llama": dict(arch="llama", depth=1, img=0, seq=11, targets="attn"),
          "gpt2": dict(arch="gpt2", depth=1, img=0, seq=11, targets="attn")}


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("phase", ["A", "B"])
def test_clipped_gradients_agree_across_methods(phase, arch, gen):
    seed = gen.initial_seed()
    torch.manual_seed(seed)
    case = Case(method="deer", model="tiny", batch=7, rank=3, phase=phase, noise="isotropic", backend="-",
                sigma=0.0, **SHAPES[arch])
    model, layers = build_lora_model(case)
    inputs, target = make_batch(case, seed=seed % (2 ** 31))
    # Unclipped per-sample norms decide C: the median, so the batch has clipped and unclipped samples.
    _, norms = reference_clipped_grads(case, model, inputs, target, phase, 1e30)  # no clipping
    C = float(norms.median())
    clipped = int((norms > C * (1 + 1e-3)).sum())
    assert 0 < clipped < case.batch, f"seed {seed}: want a partly clipped batch, norms {norms.tolist()}"
    case = replace(case, max_grad_norm=C)
    want, _ = reference_clipped_grads(case, model, inputs, target, phase, C)
    unclipped, _ = reference_clipped_grads(case, model, inputs, target, phase, 1e30)  # no clipping
    # The planted error (no clipping) must be far outside the tolerance, or the test could not fail.
    gap = min(_rel_err(u, w) for u, w in zip(unclipped, want))
    assert gap > 50 * RTOL, f"seed {seed}: clipping changes the gradient by only {gap:.2e}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = clipped_grads(case, model, inputs, target)
    assert set(got) == {"deer", "opacus_hooks", "opacus_ghost", "deer_on_opacus"}
    for meth, grads in got.items():
        assert len(grads) == len(want), f"{meth}: {len(grads)} trained tensors, reference {len(want)}"
        for li, (g, w) in enumerate(zip(grads, want)):
            assert g.shape == w.shape, f"{meth} layer {li}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
            err = _rel_err(g, w)
            assert err < RTOL, (f"seed {seed}, phase {phase}: {meth} layer {li} clipped gradient is off the "
                                f"float64 reference by {err:.2e} (tolerance {RTOL})")


@pytest.mark.parametrize("arch", list(SHAPES))
def test_peft_floor_trains_the_same_parameters(arch, gen):
    """The peft floor is the same non-private LoRA step as deer's floor: same loss, and the same
    gradient of the same trained factor in every layer (only the layer implementation differs)."""
    import copy

    import peft
    seed = gen.initial_seed()
    case = Case(method="nonprivate", model="tiny", batch=5, rank=3, phase="A", noise="none", **SHAPES[arch])
    model, layers = build_lora_model(case)
    inputs, target = make_batch(case, seed=seed % (2 ** 31))
    pm = to_peft(copy.deepcopy(model), case)
    ours = build_nonprivate_step(case, model, inputs, target)(zero_grad=False)
    theirs = build_nonprivate_step(case, pm, inputs, target)(zero_grad=False)
    assert abs(float(ours.detach()) - float(theirs.detach())) <= 1e-5 * abs(float(ours.detach()))
    plyrs = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(plyrs) == len(layers) > 0
    for lyr, p in zip(layers, plyrs):
        assert p.lora_B["default"].weight.grad is None            # phase A: B frozen in both
        err = _rel_err(p.lora_A["default"].weight.grad, lyr.lora_A.grad)
        assert err < 1e-5, f"{arch}: peft's A gradient off deer's by {err:.2e}"


def _bench_json(tmp_path, times_ms: dict, mem_mib: dict, **config):
    import json
    base = dict(device="cpu", model="tiny", depth=None, batch=32, img=64, rank=8, targets="qkv", phase="B",
                device_name="test cpu", torch="t", opacus="o", timm="m", deer="d", python="p",
                date="2026-01-01T00:00:00+00:00", peak_mem_kind="cpu_peak_rss_delta", impl="x")
    base.update(config)
    rows = []
    for key, t in times_ms.items():
        method, _, backend = key.partition(":")
        extra = dict(base, method=method, backend=backend or "-",
                     noise="isotropic", peak_mem_bytes=int(mem_mib[key] * 2 ** 20))
        rows.append({"name": key, "stats": {"median": t / 1e3, "iqr": 0.0, "rounds": 3}, "extra_info": extra})
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"benchmarks": rows, "datetime": "2026-01-01"}))
    return p


@pytest.mark.parametrize("deer_ms,verdict", [(110.0, "met"), (130.0, "MISSED")])
def test_report_overheads_and_targets(tmp_path, deer_ms, verdict):
    """The report's overheads, ratios and target verdicts on hand-made medians: non-private 100 ms,
    Opacus hooks 150 ms (overhead 0.5), ghost 120 ms (0.2). deer at 110 ms meets every target
    (0.1 <= 0.15, <= 0.5/3, < 0.2); at 130 ms it misses all three."""
    from bench import report
    times = {"nonprivate": 100.0, "deer:cpu": deer_ms, "opacus_hooks": 150.0, "opacus_ghost": 120.0}
    mem = {"nonprivate": 100.0, "deer:cpu": 104.0, "opacus_hooks": 160.0, "opacus_ghost": 130.0}
    p = _bench_json(tmp_path, times, mem)
    out = tmp_path / "out"
    assert report.main([str(p), "--out", str(out), "--no-profile"]) == 0
    md = (out / "report.md").read_text()
    over = deer_ms / 100.0 - 1
    # paired overhead (here: none recorded, so the separate medians), separate medians, separate mins
    assert f"| deer[cpu] isotropic | {deer_ms:.1f} | {over:+.3f} | {over:+.3f} | {over:+.3f} | 104 | 1.04 | n/a |" in md
    assert (f"| {deer_ms / 100:.2f} | n/a | {deer_ms / 150:.2f} | {deer_ms / 120:.2f} | {over:+.3f} | +0.500 "
            "| +0.200 |") in md
    line = next(l for l in md.splitlines() if l.startswith("- cpu ViT-tiny b32") and "deer[cpu]" in l)
    assert line.count(verdict) == 3, line
    assert (out / "benchmark.json").exists() and (out / "README_section.md").exists()


def test_report_overhead_is_paired_when_recorded():
    """bench.report takes the overhead from the interleaved (paired) rounds a case recorded, and falls
    back to the ratio of separate medians for rows without them (older JSON files)."""
    from bench.bench_step import paired_overhead
    from bench.report import annotate

    calls = []
    out = paired_overhead(lambda: calls.append("case"), lambda: calls.append("floor"), 4)
    assert calls.count("case") == 4 and calls.count("floor") == 4 and out["paired_rounds"] == 4
    assert calls[:2] == ["case", "floor"] and calls[2:4] == ["floor", "case"]   # order alternates
    base = dict(device="cpu", model="tiny", depth=None, batch=32, img=64, rank=8, targets="qkv", phase="A")
    rows = [dict(base, method="nonprivate", median_s=1.0, min_s=0.9),
            dict(base, method="deer", median_s=1.5, min_s=1.0, paired_overhead=0.04),
            dict(base, method="opacus_hooks", median_s=1.2, min_s=1.1)]
    annotate(rows)
    assert rows[0]["overhead"] == 0.0
    assert rows[1]["overhead"] == 0.04 and abs(rows[1]["overhead_separate"] - 0.5) < 1e-12
    assert abs(rows[2]["overhead"] - 0.2) < 1e-12


@pytest.mark.parametrize("deer_ms,peft_ms,verdicts", [(104.0, 98.0, ("met", "met")), (106.0, 95.0, ("MISSED", "MISSED"))])
def test_report_decoder_target_and_peft_floor(tmp_path, deer_ms, peft_ms, verdicts):
    """A decoder configuration's targets on hand-made medians: deer's overhead at most 0.05 and below
    Opacus hooks' (110 ms) and ghost's (150 ms); deer's non-private step within 3% of peft's
    (100 / 98 = 1.020 met; 100 / 95 = 1.053 missed)."""
    from bench import report
    times = {"nonprivate": 100.0, "peft": peft_ms, "deer:cpu": deer_ms, "opacus_hooks": 110.0, "opacus_ghost": 150.0}
    p = _bench_json(tmp_path, times, {k: 100.0 for k in times}, arch="llama", img=0, seq=128, batch=16,
                    targets="attn")
    out = tmp_path / "out"
    assert report.main([str(p), "--out", str(out), "--no-profile"]) == 0
    md = (out / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("- cpu Llama-tiny b16 T128 r8 attn phase B, deer[cpu]"))
    assert f"overhead {deer_ms / 100 - 1:+.3f} <= 0.05 {verdicts[0]}" in line, line
    assert "< Opacus hooks' +0.100 met" in line and "< Opacus ghost's +0.500 met" in line, line
    floor = next(l for l in md.splitlines() if l.startswith("- cpu Llama-tiny b16 T128") and "peft" in l)
    assert f"= {100 / peft_ms:.3f} <= 1.03 {verdicts[1]}" in floor, floor
    assert "| cpu Llama-tiny b16 T128 r8 attn phase B | peft non-private |" in (out / "README_section.md").read_text()


def test_kept_freed_memory_and_peak_memory(tmp_path):
    """bench.memory in a fresh process (its malloc settings are process-wide): with freed memory
    kept, allocating and freeing a 64 MiB tensor again faults in (almost) no pages, where glibc's
    default faults in all of them; and peak_memory still sees a 96 MiB tensor allocated inside a case
    after 256 MiB were freed before it (the kept pages are not counted as free, reused and missed)."""
    import subprocess
    code = f'''
import resource, sys, torch
sys.path.insert(0, {ROOT!r})
from bench.memory import keep_freed_memory, malloc_state, peak_memory
def faults():
    n = 16 << 20
    torch.ones(n).sum(); torch.ones(n).sum(); f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(n).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
assert malloc_state() == "default"
assert keep_freed_memory() and malloc_state() == "keep-freed"
after = faults()
big = torch.ones(64 << 20); del big
with peak_memory("cpu") as pm:
    x = torch.ones(24 << 20); x.sum(); del x
print(before, after, pm.bytes)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, peak = (int(v) for v in out.stdout.split())
    pages = 3 * (64 << 20) // 4096
    assert before > pages // 2, f"default malloc faulted only {before} pages for 3 x 64 MiB"
    assert after < pages // 20, f"kept memory still faulted {after} pages"
    if peak is not None:
        assert peak >= 90 << 20, f"peak_memory saw {peak / 2 ** 20:.0f} MiB of a 96 MiB tensor"
