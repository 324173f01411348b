"""Turn a pytest-benchmark JSON of bench/bench_step.py into a markdown report and PNG plots.

    python -m bench.report path/to/benchmark.json [--out DIR] [--note TEXT] [--no-profile]

Writes into DIR (default bench/results/<date>-<device>/): report.md (every case: median step time,
DP overhead = time / non-private time - 1 (paired rounds when recorded), peak memory and its ratio to non-private; deer's ratios to
non-private, Opacus hooks and Opacus ghost; the step-time and memory targets, met or missed), README_section.md
(the compact table for the README), time_vs_batch_<device>.png and memory_vs_batch_<device>.png, and a
copy of the JSON (benchmark.json). When a target is missed the report profiles the deer step
(torch.profiler: time per stage and the top operators) next to the non-private step, so it says where
the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import defaultdict

CONFIG_KEYS = ("device", "arch", "model", "depth", "batch", "img", "seq", "rank", "targets", "phase")
_DEFAULTS = {"arch": "vit", "seq": 0}       # rows written before the decoder cases are ViT rows
CPU_TARGET, GPU_TARGET, GPU_MEM_TARGET = 0.15, 0.05, 1.05
DECODER_TARGET = 0.05       # deer's DP overhead on the decoder cases
PEFT_FLOOR_TARGET = 1.03    # deer's non-private LoRA step time / peft's, every configuration
ARCH_NAMES = {"vit": "ViT", "llama": "Llama", "gpt2": "GPT-2"}


def load_rows(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        e = dict(b.get("extra_info", {}))
        if "method" not in e:
            continue          # a kernel benchmark from another suite: not part of this report
        st = b["stats"]
        e["median_s"] = st["median"]
        e["min_s"] = st.get("min", st["median"])
        e["iqr_s"] = st.get("iqr", 0.0)
        e["rounds"] = st.get("rounds")
        e["name"] = b.get("name", "")
        rows.append(e)
    if not rows:
        raise SystemExit(f"{path}: no bench_step rows (benchmarks with extra_info['method']) found")
    return rows, data


def label(r: dict) -> str:
    m = r["method"]
    if m == "deer":
        return f"deer[{r['backend']}] {r['noise']}" + (" fused step" if r.get("fused") else "")
    return {"nonprivate": "non-private", "peft": "peft non-private", "opacus_hooks": "Opacus hooks", "opacus_ghost": "Opacus ghost",
            "deer_on_opacus": "DEeR on Opacus (paper noise)"}.get(m, m)


def config_of(r: dict, skip: tuple = ()) -> tuple:
    return tuple(r.get(k, _DEFAULTS.get(k)) for k in CONFIG_KEYS if k not in skip)


def config_str(cfg: tuple, keys: tuple = CONFIG_KEYS) -> str:
    d = dict(zip(keys, cfg))
    depth = f" d{d['depth']}" if d.get("depth") else ""
    shape = f"img{d['img']}" if d["arch"] == "vit" else f"T{d['seq']}"
    batch = f" b{d['batch']}" if "batch" in d else ""
    return (f"{d['device']} {ARCH_NAMES.get(d['arch'], d['arch'])}-{d['model']}{depth}{batch} {shape} r{d['rank']} "
            f"{d['targets']} phase {d['phase']}")


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def annotate(rows: list[dict]) -> dict:
    """Adds overhead / memory ratio against the non-private step of the same configuration."""
    by_cfg = defaultdict(list)
    for r in rows:
        by_cfg[config_of(r)].append(r)
    for cfg, rs in by_cfg.items():
        floor = next((r for r in rs if r["method"] == "nonprivate"), None)
        for r in rs:
            # separate runs: this case's median against the non-private case's median (minutes apart)
            r["overhead_separate"] = None if floor is None else r["median_s"] / floor["median_s"] - 1
            # the same from the fastest round: less sensitive to other processes on a shared machine
            r["overhead_min"] = None if floor is None else r["min_s"] / floor["min_s"] - 1
            # paired: rounds interleaved with the non-private step (median per-pair ratio - 1), the
            # measurement a drifting load moves least; the overhead used everywhere when recorded
            if r["method"] == "nonprivate":
                r["overhead"] = 0.0 if floor is not None else None
            elif r.get("paired_overhead") is not None:
                r["overhead"] = r["paired_overhead"]
            else:
                r["overhead"] = r["overhead_separate"]
            fm, m = (floor or {}).get("peak_mem_bytes"), r.get("peak_mem_bytes")
            r["mem_ratio"] = m / fm if (fm and m is not None) else None
    return by_cfg


def _fmt_over(o) -> str:
    return "n/a" if o is None else f"{o:+.3f}"


def main_table(by_cfg: dict) -> str:
    out = ["| configuration | method | median ms | DP overhead (paired) | overhead (separate medians) "
           "| overhead (separate mins) | peak MiB | mem / non-private | load |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg in sorted(by_cfg, key=_cfg_sort):
        for r in sorted(by_cfg[cfg], key=_method_sort):
            load = r.get("loadavg_1min")
            out.append(f"| {config_str(cfg)} | {label(r)} | {r['median_s'] * 1e3:.1f} | {_fmt_over(r['overhead'])} "
                       f"| {_fmt_over(r.get('overhead_separate'))} "
                       f"| {_fmt_over(r.get('overhead_min'))} | {_mib(r.get('peak_mem_bytes'))} "
                       f"| {_ratio(r.get('peak_mem_bytes'), _floor_mem(by_cfg[cfg]))} "
                       f"| {'n/a' if load is None else f'{load:.1f}'} |")
    return "\n".join(out)


def _floor_mem(rs):
    f = next((r for r in rs if r["method"] == "nonprivate"), None)
    return None if f is None else f.get("peak_mem_bytes")


_ORDER = {"nonprivate": 0, "peft": 1, "deer": 2, "opacus_hooks": 3, "opacus_ghost": 4, "deer_on_opacus": 5}


def _method_sort(r):
    return (_ORDER.get(r["method"], 9), r.get("backend", ""), r.get("noise", ""), bool(r.get("fused")))


def _cfg_sort(cfg):
    d = dict(zip(CONFIG_KEYS, cfg))
    return (d["device"], list(ARCH_NAMES).index(d["arch"]) if d["arch"] in ARCH_NAMES else 9, d["model"],
            d.get("depth") or 0, d["targets"], d["img"], d["seq"], d["rank"], d["batch"], d["phase"])


def ratio_table(by_cfg: dict) -> str:
    out = ["| configuration | deer variant | deer / non-private | deer / peft non-private | deer / Opacus hooks "
           "| deer / Opacus ghost | overhead deer | overhead hooks | overhead ghost | overhead DEeR-on-Opacus |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg in sorted(by_cfg, key=_cfg_sort):
        rs = by_cfg[cfg]
        get = {r["method"]: r for r in rs if r["method"] != "deer"}
        np_, pf, hk, gh, do = (get.get(k) for k in ("nonprivate", "peft", "opacus_hooks", "opacus_ghost",
                                                    "deer_on_opacus"))
        for r in sorted((r for r in rs if r["method"] == "deer"), key=_method_sort):
            # time ratios through the (paired) overheads: (1 + o_deer) / (1 + o_other)
            t = None if r["overhead"] is None else 1 + r["overhead"]

            def rel(o):
                return None if (o is None or o["overhead"] is None) else 1 + o["overhead"]
            out.append(
                f"| {config_str(cfg)} | {label(r)} | {_ratio(t, rel(np_))} | {_ratio(t, rel(pf))} "
                f"| {_ratio(t, rel(hk))} | {_ratio(t, rel(gh))} "
                f"| {_fmt_over(r['overhead'])} | {_fmt_over(hk and hk['overhead'])} "
                f"| {_fmt_over(gh and gh['overhead'])} | {_fmt_over(do and do['overhead'])} |")
    return "\n".join(out)


def targets(by_cfg: dict) -> tuple[str, list[dict]]:
    """The step-time and memory targets (CPU_TARGET, GPU_TARGET, GPU_MEM_TARGET) against the
    measurement. Returns (markdown, missed deer rows)."""
    lines, missed = [], []
    for cfg in sorted(by_cfg, key=_cfg_sort):
        d = dict(zip(CONFIG_KEYS, cfg))
        vit = d["arch"] == "vit"
        cpu = vit and d["device"] == "cpu" and d["model"] in ("tiny", "small") and d["batch"] == 32 and not d.get("depth")
        gpu = vit and d["device"] != "cpu" and d["model"] == "base" and 64 <= d["batch"] <= 256
        decoder = not vit and d["device"] == "cpu" and not d.get("depth")
        if not (cpu or gpu or decoder):
            continue
        rs = by_cfg[cfg]
        get = {r["method"]: r for r in rs if r["method"] != "deer"}
        hk, gh = get.get("opacus_hooks"), get.get("opacus_ghost")
        limit = DECODER_TARGET if decoder else CPU_TARGET if cpu else GPU_TARGET
        for r in sorted((r for r in rs if r["method"] == "deer" and r.get("backend") != "reference"),
                        key=_method_sort):
            o = r["overhead"]
            if o is None:
                continue
            checks = [(f"overhead {o:+.3f} <= {limit}", o <= limit)]
            if decoder and hk and hk["overhead"] is not None:
                checks.append((f"< Opacus hooks' {hk['overhead']:+.3f}", o < hk["overhead"]))
            elif hk and hk["overhead"] is not None:
                checks.append((f"<= 1/3 of Opacus hooks' {hk['overhead']:+.3f}",
                               o <= hk["overhead"] / 3 if hk["overhead"] > 0 else o <= 0))
            if gh and gh["overhead"] is not None:
                checks.append((f"< Opacus ghost's {gh['overhead']:+.3f}", o < gh["overhead"]))
            if gpu and r.get("mem_ratio") is not None:
                checks.append((f"peak memory x{r['mem_ratio']:.3f} <= {GPU_MEM_TARGET}", r["mem_ratio"] <= GPU_MEM_TARGET))
            ok = all(c for _, c in checks)
            if not ok:
                missed.append(r)
            parts = "; ".join(f"{t} {'met' if c else 'MISSED'}" for t, c in checks)
            lines.append(f"- {config_str(cfg)}, {label(r)}: {parts}")
    if not lines:
        lines.append("- no case of this run is at a target configuration (CPU ViT-tiny/small batch 32; "
                     "CPU decoders; GPU ViT-base batch 64-256)")
    return "\n".join(lines), missed


def peft_floor(by_cfg: dict) -> tuple[str, list[tuple]]:
    """deer's non-private LoRA step against peft's on every configuration that ran both:
    deer / peft = 1 / (1 + peft's paired overhead), since peft's rounds were paired with deer's
    non-private step. Returns (markdown, configurations that miss PEFT_FLOOR_TARGET)."""
    lines, missed = [], []
    for cfg in sorted(by_cfg, key=_cfg_sort):
        pf = next((r for r in by_cfg[cfg] if r["method"] == "peft"), None)
        if pf is None or pf["overhead"] is None or not any(r["method"] == "nonprivate" for r in by_cfg[cfg]):
            continue
        ratio = 1 / (1 + pf["overhead"])
        ok = ratio <= PEFT_FLOOR_TARGET
        if not ok:
            missed.append(cfg)
        lines.append(f"- {config_str(cfg)}: deer non-private / peft non-private = {ratio:.3f} "
                     f"<= {PEFT_FLOOR_TARGET} {'met' if ok else 'MISSED'}")
    if not lines:
        lines.append("- no configuration of this run has both non-private floors")
    return "\n".join(lines), missed


# ------------------------------------------------------------------------------------------------
# Profile of the deer step (where the time goes)
# ------------------------------------------------------------------------------------------------

def profile_case(row: dict, steps: int = 3, top: int = 15) -> tuple[dict, str]:
    """Profiles `steps` steps of the case in `row` (after 2 warm-up steps): ms per stage (forward,
    backward, step) and the top operators by self time."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import models
    from bench.models import Case, build_step
    fields = {k: row[k] for k in Case.__dataclass_fields__ if k in row}
    case = Case(**fields)
    if row.get("torch_threads"):
        torch.set_num_threads(int(row["torch_threads"]))     # as the benchmark ran
    if row.get("malloc") == "keep-freed":
        from bench.memory import keep_freed_memory
        keep_freed_memory()                                  # as the benchmark ran
    warnings.filterwarnings("ignore", category=UserWarning)
    models.PROFILE_STAGES = True
    try:
        step, _ = build_step(case)
        step()
        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device != "cpu" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if case.device != "cpu":
                torch.cuda.synchronize()
    finally:
        models.PROFILE_STAGES = False
    ka = prof.key_averages()
    stages = {}
    for ev in ka:
        if ev.key in ("forward", "backward", "step"):
            stages[ev.key] = ev.cpu_time_total / 1e3 / steps          # ms per step (wall, CPU side)
    sort = "self_cpu_time_total" if case.device == "cpu" else "self_cuda_time_total"
    table = ka.table(sort_by=sort, row_limit=top, max_name_column_width=60)
    return stages, table, _stage_ops(prof, "step", steps, top)


def _stage_ops(prof, stage: str, steps: int, top: int) -> str:
    """Markdown table of the operators run inside `stage` (self CPU time per step, calls per step)."""
    agg = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        p = ev.cpu_parent
        while p is not None and p.name != stage:
            p = p.cpu_parent
        if p is not None:
            agg[ev.name][0] += ev.self_cpu_time_total
            agg[ev.name][1] += 1
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
    out = ["| operator inside '" + stage + "' | self ms / step | calls / step |", "|---|---:|---:|"]
    out += [f"| `{n}` | {t / 1e3 / steps:.2f} | {c / steps:.0f} |" for n, (t, c) in rows]
    return "\n".join(out)


def _is_centre(cfg) -> bool:
    d = dict(zip(CONFIG_KEYS, cfg))
    return (not d.get("depth") and d["targets"] == "qkv" and d["rank"] == 8 and
            ((d["device"] == "cpu" and d["model"] == "tiny" and d["batch"] == 32 and d["img"] == 64) or
             (d["device"] != "cpu" and d["model"] == "base" and d["batch"] == 64 and d["img"] == 224)))


def profile_section(missed: list[dict], by_cfg: dict, floor_missed: list[tuple] = ()) -> str:
    """Profiles where a target was missed: deer's DP step next to the floors and Opacus (`missed`
    deer rows), and deer's non-private step next to peft's (`floor_missed` configurations, the worst
    ratio per architecture)."""
    if not missed and not floor_missed:
        return ""
    out = ["## Where the time goes (profile of the deer step)", "",
           "A target was missed, so deer's step is profiled with torch.profiler next to the non-private and "
           "Opacus steps of the same configuration (per device and architecture: the centre configuration of "
           "the sweep when a target was missed there, else the worst missed case). Stages are timed with record_function: 'forward' "
           "(model + loss), 'backward' (all backward passes, LoRA captures / Opacus hooks included), 'step' "
           "(per-sample norms, clipping, noise, optimizer update). Every method is profiled back to back in "
           "one process right after the sweep, so this comparison is less exposed to load changes than the "
           "medians above; absolute numbers differ from them.", ""]
    for device, arch in sorted({(r["device"], r.get("arch", _DEFAULTS["arch"])) for r in missed}):
        dm = [r for r in missed if r["device"] == device and r.get("arch", _DEFAULTS["arch"]) == arch]
        centre = [r for r in dm if _is_centre(config_of(r))]
        groups = defaultdict(list)
        for r in (centre or [max(dm, key=lambda r: r["overhead"] or 0)]):
            groups[config_of(r)].append(r)
        for cfg, chosen in sorted(groups.items(), key=lambda kv: _cfg_sort(kv[0])):
            out += _profile_config(cfg, chosen, by_cfg)
    worst = {}
    for cfg in floor_missed:
        arch = dict(zip(CONFIG_KEYS, cfg))["arch"]
        o = next(r["overhead"] for r in by_cfg[cfg] if r["method"] == "peft")
        if arch not in worst or o < worst[arch][0]:
            worst[arch] = (o, cfg)
    for _, cfg in worst.values():
        out += ["Non-private floors: deer's LoRA layer missed the 3% target against peft's here.", ""]
        out += _profile_config(cfg, [], by_cfg, ("nonprivate", "peft"))
    return "\n".join(out)


def _profile_config(cfg, chosen, by_cfg, compare=("nonprivate", "peft", "opacus_hooks", "opacus_ghost")) -> list[str]:
    out = []
    others = {x["method"]: x for x in by_cfg[cfg] if x["method"] != "deer"}
    runs = [(label(r), r) for r in sorted(chosen, key=_method_sort)]
    runs += [(label(others[m]), others[m]) for m in compare if m in others]
    prof = {name: profile_case(row) for name, row in runs}
    floor = prof.get("non-private")
    out.append(f"### {config_str(cfg)}")
    out.append("")
    out.append("| stage (ms / step) | " + " | ".join(prof) + " |")
    out.append("|---|" + "---:|" * len(prof))
    for st in ("forward", "backward", "step"):
        out.append(f"| {st} | " + " | ".join(f"{p[0].get(st, float('nan')):.1f}" for p in prof.values()) + " |")
    tot = {n: sum(p[0].get(st, 0.0) for st in ("forward", "backward", "step")) for n, p in prof.items()}
    out.append("| total | " + " | ".join(f"{t:.1f}" for t in tot.values()) + " |")
    if floor is not None and tot["non-private"] > 0:
        out.append("| overhead vs non-private | " +
                   " | ".join(f"{t / tot['non-private'] - 1:+.3f}" for t in tot.values()) + " |")
    out.append("")
    worst = (chosen[0] if len(chosen) == 1 else max(chosen, key=lambda r: r["overhead"] or 0)) if chosen else None
    if worst is not None:
        out += [f"Top operators of the {label(worst)} step (self time):", "", "```",
                prof[label(worst)][1].rstrip(), "```", ""]
    for name in ("non-private", "peft non-private"):
        if name in prof:
            out += [f"Top operators of the {name} step:", "", "```", prof[name][1].rstrip(), "```", ""]
    for name, p in prof.items():
        if name not in ("non-private", "peft non-private"):
            out += [f"Inside the 'step' stage of {name} (the DP work outside autograd):", "", p[2], ""]
    return out


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plots(rows: list[dict], outdir: str) -> list[str]:
    """Time and peak memory vs batch size per method, for the batch sweep of each device (the
    configuration that has the most batch sizes; phase B)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for device in sorted({r["device"] for r in rows}):
        groups = defaultdict(set)
        for r in rows:
            if r["device"] == device:
                key = config_of(r, skip=("batch",))
                groups[key].add(r["batch"])
        key = max(groups, key=lambda k: (len(groups[k]), k[-1] == "B"))
        if len(groups[key]) < 2:
            continue
        sel = [r for r in rows if r["device"] == device and config_of(r, skip=("batch",)) == key]
        title = config_str(key, tuple(k for k in CONFIG_KEYS if k != "batch"))
        for what, field, scale, unit in (("time", "median_s", 1e3, "median step time (ms)"),
                                         ("memory", "peak_mem_bytes", 1 / 2 ** 20, "peak memory (MiB)")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            series = defaultdict(list)
            for r in sel:
                if r.get(field) is not None:
                    series[label(r)].append((r["batch"], r[field] * scale))
            if not series:
                plt.close(fig)
                continue
            for name in sorted(series, key=lambda n: (not n.startswith("non"), n)):
                pts = sorted(series[name])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        linestyle="--" if name == "non-private" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(outdir, f"{what}_vs_batch_{device}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# ------------------------------------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:40]


def header(rows: list[dict], data: dict, note: str | None) -> str:
    r0 = rows[0]
    devices = sorted({(r["device"], r.get("device_name", "?")) for r in rows})
    mem_kinds = sorted({r.get("peak_mem_kind") for r in rows if r.get("peak_mem_kind")})
    lines = ["# deer vs Opacus vs non-private LoRA: one private training step", "",
             f"- date: {r0.get('date', data.get('datetime', '?'))}",
             "- devices: " + "; ".join(f"{d} = {n}" for d, n in devices),
             f"- versions: torch {r0.get('torch')}, opacus {r0.get('opacus')}, timm {r0.get('timm')}, "
             f"deer {r0.get('deer')}, python {r0.get('python')}; torch threads {r0.get('torch_threads')}, "
             f"CPU count {r0.get('cpu_count')}",
             f"- deer implementation: {', '.join(sorted({r.get('impl', '?') for r in rows if r['method'] == 'deer'}))}",
             "- step = forward + backward + per-sample clipping + noise (sigma 1, C 1) + SGD update of the LoRA "
             "factor trained in the phase; ViT: fixed batch of random 3-channel images, 10 classes, cross-entropy; "
             "decoders (tiny Llama, GPT-2-shaped; width 256, 4 layers, vocabulary 8192): fixed batch of random "
             "token sequences, right-padded (lengths T down to about T/2), causal LM loss with each sample's loss "
             "the mean over its own tokens; LoRA alpha = 2r, "
             "B random (as after training), regulated noise with ridge lambda = 1e-2 and the metric regulator",
             "- floors: 'non-private' = deer's LoRA layer, plain backward + SGD; 'peft non-private' = peft "
             f"{r0.get('peft', '?')}'s LoRA layers around the same frozen modules with the same factors, plain "
             "backward + SGD (its paired overhead is its time / deer's non-private time - 1)",
             "- DP overhead (used for the targets and ratios) = paired: after its own rounds every case runs up to 5 "
             "more rounds interleaved with the non-private step of its configuration, and the overhead "
             "is the median per-pair time ratio - 1 (both sides under the same load). 'separate medians' = "
             "median step time / median of the non-private case run minutes apart, 'separate mins' the same "
             "from the fastest rounds (the earlier reports' columns); 'load' is the machine's 1-minute load "
             "average when the case started. Rows without a paired measurement fall back to separate medians",
             "- peak memory: " + ", ".join(mem_kinds) + " (cpu_peak_rss_delta: process peak RSS while the case "
             "is built and stepped minus RSS before it; cuda_max_allocated_delta: torch.cuda.max_memory_allocated "
             "over the same span)",
             f"- rounds per case: {sorted({r.get('rounds') for r in rows})}",
             "- glibc malloc: " + ", ".join(sorted({r.get("malloc", "default") for r in rows})) +
             " ('keep-freed': freed memory is kept for reuse, not unmapped and faulted in again every step; "
             "bench/memory.py)"]
    if note:
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def readme_section(by_cfg: dict, rows: list[dict]) -> str:
    """The compact README table: target configurations (else the centre) with every method."""
    devs = sorted({(r["device"], r.get("device_name", "?")) for r in rows})
    out = ["Measured on " + "; ".join(f"{n} ({d})" for d, n in devs) + f", {rows[0].get('date', '')[:10]}, "
           f"torch {rows[0].get('torch')}, opacus {rows[0].get('opacus')}. One private LoRA training step "
           "(forward, backward, clipping, noise, SGD). DP overhead = median over paired rounds (each round of the "
           "case alternated with its configuration's non-private step) of time / non-private time - 1; the median "
           "ms column is of separate runs, which drift with machine load, so the two need not agree.", "",
           "| configuration | method | median ms | DP overhead (paired) | peak mem / non-private |",
           "|---|---|---:|---:|---:|"]
    for cfg in sorted(by_cfg, key=_cfg_sort):
        d = dict(zip(CONFIG_KEYS, cfg))
        if d.get("depth"):
            continue
        if d["arch"] == "vit" and (d["batch"] not in (32, 64) or d["targets"] != "qkv" or d["rank"] != 8 or
                                   (d["device"] == "cpu" and d["img"] != 64)):
            continue
        for r in sorted(by_cfg[cfg], key=_method_sort):
            if r.get("backend") == "reference":
                continue
            mr = "n/a" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.2f}"
            out.append(f"| {config_str(cfg)} | {label(r)} | {r['median_s'] * 1e3:.1f} | {_fmt_over(r['overhead'])} "
                       f"| {mr} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    ap.add_argument("--out", help="output folder (default bench/results/<date>-<device>/)")
    ap.add_argument("--note", help="a line added to the report header (e.g. machine load)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of missed targets")
    a = ap.parse_args(argv)

    rows, data = load_rows(a.json)
    by_cfg = annotate(rows)
    if a.out:
        outdir = a.out
    else:
        date = (rows[0].get("date") or data.get("datetime") or "undated")[:10]
        main_dev = "cuda" if any(r["device"] != "cpu" for r in rows) else "cpu"
        name = next((r.get("device_name") for r in rows if r["device"].startswith(main_dev)), main_dev)
        outdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{date}-{_slug(name)}")
    os.makedirs(outdir, exist_ok=True)

    tgt, missed = targets(by_cfg)
    floor_md, floor_missed = peft_floor(by_cfg)
    parts = [header(rows, data, a.note), "",
             "## Targets", "", tgt, "",
             "## deer's LoRA layer against peft's (non-private steps, paired)", "", floor_md, "",
             "## deer against the others", "", ratio_table(by_cfg), "",
             "## Every case", "", main_table(by_cfg), ""]
    pngs = plots(rows, outdir)
    if pngs:
        parts += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    if (missed or floor_missed) and not a.no_profile:
        parts.append(profile_section(missed, by_cfg, floor_missed))
    report = "\n".join(parts)
    with open(os.path.join(outdir, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(outdir, "README_section.md"), "w") as f:
        f.write(readme_section(by_cfg, rows) + "\n")
    dst = os.path.join(outdir, "benchmark.json")
    if os.path.abspath(a.json) != os.path.abspath(dst):
        shutil.copyfile(a.json, dst)
    print(f"wrote {outdir}/report.md, README_section.md, benchmark.json" + (f" and {len(pngs)} plots" if pngs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
