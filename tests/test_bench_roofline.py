"""bench/roofline.py (the GPU lease's kernel roofline, run by bench/gpu_check.sh) works end to end on
the CPU with its --quick shapes: every op, shape and method writes a row whose byte count is the one
the docstring states and whose bandwidth is bytes / median time; the case regex of bench_step.py
selects the subset gpu_check.sh asks for."""
from __future__ import annotations

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import roofline  # noqa: E402


def test_roofline_quick_cpu(tmp_path):
    assert roofline.main(["--device", "cpu", "--quick", "--rounds", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "roofline.json").read_text())
    env, rows = data["environment"], data["rows"]
    assert env["copy_gbps"] > 0 and env["b"] == 4 and env["T"] == 17
    b, T, r, n = env["b"], env["T"], env["r"], env["n"]
    psgn = [x for x in rows if x["op"] == "per_sample_grad_norm"]
    crn = [x for x in rows if x["op"] == "clip_reduce_noise"]
    # 3 shapes x (deer[cpu], its regulated metric, reference, opacus-style); 2 shapes x (deer iso, deer
    # regulated, reference, opacus)
    assert len(psgn) == 12 and len(crn) == 8
    assert {x["method"] for x in psgn} == {"deer[cpu]", "deer[cpu] regulated metric", "reference (PyTorch ops)",
                                           "opacus-style einsum + norm"}
    for x in psgn:
        p, q = (int(x["shape"].split()[3][1:]), int(x["shape"].split()[4][1:]))
        assert x["bytes"] == b * T * (p + q) * 4 + b * p * q * 4 + b * 4
    for x in rows:
        assert x["median_us"] >= x["min_us"] > 0
        assert math.isclose(x["gbps"], x["bytes"] / (x["median_us"] * 1e-6) / 1e9, rel_tol=1e-9)
        assert math.isclose(x["pct_copy"], 100 * x["gbps"] / env["copy_gbps"], rel_tol=1e-9)
    md = (tmp_path / "roofline.md").read_text()
    assert md.count("\n| per_sample_grad_norm |") == 12 and md.count("\n| clip_reduce_noise |") == 8


def test_gpu_check_case_selection():
    """The default DEER_BENCH_CASES of gpu_check.sh picks ViT-B/16 at b 64 and 256, both phases, the
    non-private floor, deer's CUDA kernels and Opacus hooks -- and nothing else."""
    import re
    from bench.models import Case
    text = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    pattern = re.search(r"^CASES='([^']+)'", text, re.M).group(1)
    keep = Case(method="deer", model="base", batch=256, img=224, phase="A", noise="regulated", backend="cuda",
                device="cuda")
    others = [Case(method="deer", model="base", batch=128, img=224, backend="cuda", device="cuda"),
              Case(method="deer", model="base", batch=64, img=224, backend="triton", device="cuda"),
              Case(method="opacus_ghost", model="base", batch=64, img=224, device="cuda"),
              Case(method="deer", model="base", batch=64, img=224, backend="cpu", device="cpu")]
    assert re.search(pattern, keep.id())
    assert re.search(pattern, Case(method="nonprivate", model="base", batch=64, img=224, device="cuda",
                                   noise="none").id())
    assert re.search(pattern, Case(method="opacus_hooks", model="base", batch=256, img=224, device="cuda").id())
    assert not any(re.search(pattern, c.id()) for c in others)
