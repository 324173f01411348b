"""Shared options of the benchmark suites.

`--quick` (or DEER_BENCH_QUICK=1) shrinks every shape and the number of rounds: a CI smoke run of the
kernel benches then takes seconds and checks that they run, not how fast. Without it the kernel
benches use ViT-B shapes (b = 32, T = 197, n = 768, m = 768 / 2304, r = 8).
At the end of a run the kernel benches print, per group, the ratio of every baseline's median (and
min) time to deer's (so `pytest bench/bench_clip_reduce_noise.py` reports the speed-ups directly).
"""
from __future__ import annotations

import os
import platform
from collections import defaultdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="deer benches: tiny shapes and few rounds (CI smoke run)")


def is_quick(config) -> bool:
    return bool(config.getoption("--quick", default=False)) or os.environ.get("DEER_BENCH_QUICK", "0") == "1"


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    """DEER_BENCH_THREADS sets torch's intra-op threads for every suite (rows record the count): on a
    shared, oversubscribed machine one intra-op thread per process is far more stable than two threads
    spinning at OpenMP barriers."""
    if os.environ.get("DEER_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["DEER_BENCH_THREADS"]))
    yield


@pytest.fixture(scope="session", autouse=True)
def _bench_malloc():
    """glibc keeps freed memory for reuse (bench.memory.keep_freed_memory, why: there) unless
    DEER_BENCH_MALLOC=default; rows record which (`malloc`)."""
    from bench.memory import keep_freed_memory
    if os.environ.get("DEER_BENCH_MALLOC", "keep") != "default":
        keep_freed_memory()
    yield


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return is_quick(request.config)


def machine_row() -> dict:
    """What a result row needs to be comparable later: device, versions, date, load."""
    import datetime
    row = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        row["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        row["gpu"] = torch.cuda.get_device_name()
    try:
        import deer._C as C
        row["deer_cpu_isa"] = C.cpu_isa()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return row


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Median-time ratios baseline / deer per benchmark group (extra_info: role = 'deer' | 'baseline')."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return
    groups = defaultdict(dict)
    for b in bs.benchmarks:
        info = getattr(b, "extra_info", {}) or {}
        if "role" not in info or not getattr(b, "stats", None):
            continue
        groups[b.group][info.get("label", b.name)] = (info["role"], b.stats.median, b.stats.min)
    if not groups:
        return
    tr = terminalreporter
    tr.write_sep("-", "deer kernel benches: median (min) time; baseline / fastest deer, by medians (by mins)")
    for g in sorted(groups):
        rows = groups[g]
        deer = [(med, mn) for role, med, mn in rows.values() if role == "deer"]
        best = min(d[0] for d in deer) if deer else None
        best_min = min(d[1] for d in deer) if deer else None
        tr.write_line(f"[{g}]")
        for label, (role, med, mn) in sorted(rows.items(), key=lambda kv: kv[1][1]):
            ratio = f"{med / best:6.2f}x ({mn / best_min:5.2f}x)" if best and role == "baseline" else ""
            tr.write_line(f"    {role:8s} {label:40s} {med * 1e3:9.2f} ms ({mn * 1e3:8.2f})  {ratio}")
