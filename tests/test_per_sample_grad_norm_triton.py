"""Triton per_sample_grad_norm against the float64 reference twin (deer.ops.per_sample_grad_norm).

Runs on a GPU, or on the CPU through TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU):
shapes stay small there, the interpreter runs each program in Python."""
import os

import pytest
import torch


def _why_not() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device and TRITON_INTERPRET != 1: Triton kernels cannot run here"
    return None


pytestmark = [pytest.mark.triton, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kern():
    from deer_kernels import per_sample_grad_norm as k
    return k


def _ref(left, right, scale, gram=None, side=1):
    from deer.ops.per_sample_grad_norm import per_sample_grad_norm_reference
    return per_sample_grad_norm_reference(left.double().cpu(), right.double().cpu(), scale,
                                          None if gram is None else gram.double().cpu(), side)


def _spd(k, gen):
    M = torch.randn(k, k + 2, generator=gen, dtype=torch.float64)
    return M @ M.T / (k + 2) + 0.1 * torch.eye(k, dtype=torch.float64)


def _rel(x, ref):
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


def _max_rel(x, ref):
    return ((x.double().cpu() - ref).abs() / ref.abs()).max().item()


# (b, T, p, q, side): side None = Euclidean; 1 = B phase (p = m, q = r, K (r, r)); 0 = A phase (p = r, q = n).
CASES = [
    (1, 1, 13, 6, None),
    (5, 97, 6, 3, None),
    (5, 1, 9, 4, 1),      # B phase, r = 4, T = 1
    (1, 97, 1, 7, 0),     # A phase, r = 1
    (5, 97, 8, 5, 0),     # A phase, r = 8, T = 97
    (5, 3, 11, 1, 1),     # B phase, r = 1
    (2, 3, 300, 5, None),  # p > one interpreter tile: several tiles, summed norm shares
    (2, 2, 300, 8, 1),     # several row tiles with the regulated metric
]


@pytest.mark.parametrize("b,T,p,q,side", CASES)
def test_fp32_matches_float64_reference(kern, gen, b, T, p, q, side):
    seed = gen.initial_seed()
    left = torch.randn(b, T, p, generator=gen).to(DEV)
    right = torch.randn(b, T, q, generator=gen).to(DEV)
    gram = None if side is None else _spd(q if side == 1 else p, gen).float().to(DEV)
    scale = 0.37
    g, n = kern.per_sample_grad_norm(left, right, scale, gram, 1 if side is None else side)
    g_ref, n_ref = _ref(left, right, scale, gram, 1 if side is None else side)
    assert g.dtype == torch.float32 and n.dtype == torch.float32
    assert g.shape == (b, p, q) and n.shape == (b,)
    assert torch.isfinite(g).all() and torch.isfinite(n).all(), f"seed {seed}"
    assert _rel(g, g_ref) <= 1e-5, f"grads rel err {_rel(g, g_ref):.2e} (seed {seed})"
    assert _max_rel(n, n_ref) <= 1e-5, f"norms rel err {_max_rel(n, n_ref):.2e} (seed {seed})"
    if side is not None and p * q > 1:
        # The bound can fail: ignoring K (Euclidean norm) is far outside it.
        eucl = g_ref.flatten(1).pow(2).sum(1)
        assert _max_rel(eucl, n_ref) > 1e-3


def _torch_lowp(left, right, scale, gram, side):
    """The same math done by torch in the inputs' dtype (grads and norms rounded to that dtype)."""
    dt = left.dtype
    lc, rc = left.cpu(), right.cpu()
    g = torch.einsum("btp,btq->bpq", lc, rc) * torch.tensor(scale, dtype=dt)
    if gram is None:
        n = (g * g).sum((1, 2))
    elif side == 1:
        n = ((g @ gram.cpu().to(dt)) * g).sum((1, 2))
    else:
        n = ((gram.cpu().to(dt) @ g) * g).sum((1, 2))
    return g, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,T,p,q,side", [(5, 97, 6, 3, None), (5, 1, 9, 4, 1), (1, 97, 8, 5, 0)])
def test_low_precision_within_twice_torch_error(kern, gen, dtype, b, T, p, q, side):
    seed = gen.initial_seed()
    left = torch.randn(b, T, p, generator=gen).to(dtype).to(DEV)
    right = torch.randn(b, T, q, generator=gen).to(dtype).to(DEV)
    gram = None if side is None else _spd(q if side == 1 else p, gen).float().to(DEV)
    scale = 0.37
    g, n = kern.per_sample_grad_norm(left, right, scale, gram, 1 if side is None else side)
    g_ref, n_ref = _ref(left, right, scale, gram, 1 if side is None else side)  # exact in the rounded inputs
    g_t, n_t = _torch_lowp(left, right, scale, gram, 1 if side is None else side)
    eg, en = _rel(g, g_ref), _max_rel(n, n_ref)
    tg, tn = _rel(g_t, g_ref), _max_rel(n_t, n_ref)
    assert eg <= 2 * tg + 1e-6, f"{dtype} grads err {eg:.2e} vs torch {tg:.2e} (seed {seed})"
    assert en <= 2 * tn + 1e-6, f"{dtype} norms err {en:.2e} vs torch {tn:.2e} (seed {seed})"


def test_strided_2d_and_mixed_inputs(kern, gen):
    seed = gen.initial_seed()
    b, T, p, q = 3, 5, 7, 10
    left = torch.randn(b, p, T, generator=gen).to(DEV).transpose(1, 2)   # token stride 1, feature stride T
    right = torch.randn(b, T, 2 * q, generator=gen).to(DEV)[..., ::2]    # feature stride 2
    g, n = kern.per_sample_grad_norm(left, right, 1.5)
    g_ref, n_ref = _ref(left, right, 1.5)
    assert _rel(g, g_ref) <= 1e-5 and _max_rel(n, n_ref) <= 1e-5, f"seed {seed}"
    # (b, features) inputs are one token per sample; bf16 with fp32 computes in fp32.
    l2 = torch.randn(4, 9, generator=gen).to(torch.bfloat16).to(DEV)
    r2 = torch.randn(4, 3, generator=gen).to(DEV)
    K = _spd(3, gen).to(DEV)  # float64 K is accepted (rounded once to fp32)
    g, n = kern.per_sample_grad_norm(l2, r2, 0.5, K, 1)
    g_ref, n_ref = _ref(l2[:, None], r2[:, None], 0.5, K, 1)
    assert _rel(g, g_ref) <= 1e-5 and _max_rel(n, n_ref) <= 1e-5, f"seed {seed}"


def test_launch_config(kern, gen):
    b, T, p, q = 2, 3, 300, 8
    K = _spd(q, gen).float().to(DEV)
    left = torch.randn(b, T, p, generator=gen).to(DEV)
    right = torch.randn(b, T, q, generator=gen).to(DEV)
    _, _, cfg = kern.per_sample_grad_norm_launch(left, right, 1.0, K, 1)
    for k in ("BLOCK_T", "BLOCK_P", "BLOCK_Q"):
        assert cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0
    assert cfg["BLOCK_Q"] >= q  # the regulated metric needs all of r in one tile
    n_tiles = -(-p // cfg["BLOCK_P"]) * -(-q // cfg["BLOCK_Q"])
    assert cfg["n_tiles"] == n_tiles and cfg["grid"] == (b * n_tiles,)


def test_bad_inputs_say_what_is_wrong(kern, gen):
    L = torch.randn(2, 3, 4, generator=gen).to(DEV)
    R = torch.randn(2, 3, 5, generator=gen).to(DEV)
    with pytest.raises(TypeError, match="float64"):
        kern.per_sample_grad_norm(L.double(), R.double(), 1.0)
    with pytest.raises(ValueError, match="share"):
        kern.per_sample_grad_norm(L, R[:, :2], 1.0)
    with pytest.raises(ValueError, match="b, T, features"):
        kern.per_sample_grad_norm(L[None], R, 1.0)
    with pytest.raises(ValueError, match=r"\(q, q\)"):
        kern.per_sample_grad_norm(L, R, 1.0, torch.eye(4, device=DEV), 1)
    with pytest.raises(ValueError, match="gram_side"):
        kern.per_sample_grad_norm(L, R, 1.0, torch.eye(5, device=DEV), 2)
    big = torch.randn(1, 1, 200, generator=gen).to(DEV)
    with pytest.raises(ValueError, match="supports up to"):
        kern.per_sample_grad_norm(big, big, 1.0, torch.eye(200, device=DEV), 1)


# A GPU-free check that the kernels compile for Hopper (sm_90) with the tiles _config picks for a
# CUDA device, and take the tensor-core path: the interpreter never runs Triton's compiler, so
# without this a kernel could pass every test above and fail to build on the first GPU.
AOT = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.getcwd())
import torch, triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

FLOATS = ("scale", "noise_std", "expected_batch_size",   # and the fused optimizer step's scalars
          "lr", "wd", "momentum", "damp_c", "beta1_c", "beta2", "beta2_c", "eps", "step_size", "bias2_sqrt", "decay")

def aot(fn, ptrs, consts, num_warps, num_stages):
    """Compile fn for sm_90 as a launch with aligned tensors and dims divisible by 16 would be."""
    sig, attrs = {}, {}
    for i, prm in enumerate(fn.params):
        n = prm.name
        if n in consts:
            sig[n] = "constexpr"
            continue
        sig[n] = ptrs.get(n) or ("fp32" if n in FLOATS else "i64" if n == "key" else "i32")
        if sig[n][0] in "*i" and n not in ("T", "B", "key", "step", "layer", "client"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    return {o: ptx.count(o) for o in ("wgmma.mma_async", "mma.sync", "cp.async", "ld.local")}

cuda = torch.device("cuda")
out = {}
''' 

AOT_KERNELS = r'''
from deer_kernels import per_sample_grad_norm as psg, clip_reduce_noise as crn, _config as C
for tag, dt, ptr, prec, side, p, q in (("psg_bf16_B", tl.bfloat16, "*bf16", "tf32", 1, 768, 16),
                                        ("psg_fp32_A", tl.float32, "*fp32", "tf32x3", 0, 16, 768)):
    cfg = C.grad_tiles(p, q, 197, 2 if dt == tl.bfloat16 else 4, side, cuda)
    out[tag] = aot(psg._per_sample_grad_norm_kernel, dict(L=ptr, R=ptr, K="*fp32", G="*fp32", NP="*fp32"),
                   dict(s_lp=1, s_rq=1, s_gq=1, GRAM_SIDE=side, COMPUTE=dt, DOT_PRECISION=prec,
                        BLOCK_T=cfg["BLOCK_T"], BLOCK_P=cfg["BLOCK_P"], BLOCK_Q=cfg["BLOCK_Q"]),
                   cfg["num_warps"], cfg["num_stages"])
rc = C.reduce_tiles(768, 16, cuda)
out["reduce"] = aot(crn._clip_reduce_kernel, dict(Gr="*fp32", C="*fp32", Part="*fp32"),
                    dict(s_gq=1, BLOCK_P=rc["BLOCK_P"], BLOCK_Q=rc["BLOCK_Q"], STAGES=rc["num_stages"]),
                    rc["num_warps"], rc["num_stages"])
gc = C.grad_tiles(768, 16, 197, 2, None, cuda)
out["fused_bf16"] = aot(crn._clip_reduce_fused_kernel, dict(L="*bf16", R="*bf16", C="*fp32", Part="*fp32"),
                        dict(s_lp=1, s_rq=1, COMPUTE=tl.bfloat16, DOT_PRECISION="tf32", BLOCK_T=gc["BLOCK_T"],
                             BLOCK_P=gc["BLOCK_P"], BLOCK_Q=gc["BLOCK_Q"]), gc["num_warps"], gc["num_stages"])
fc = C.noise_tiles(16, 768, 0, cuda)
fin_ptrs = dict(Part="*fp32", Out="*fp32", Rinv="*fp32", Param="*fp32", Buf1="*fp32", Buf2="*fp32")
no_update = dict(UPDATE=0, DECAY=False, MOMENTUM=False, NESTEROV=False, FIRST=False)
out["finish"] = aot(crn._finish_kernel, fin_ptrs, dict(NOISE=2, BLOCK_P=fc["BLOCK_P"], BLOCK_Q=fc["BLOCK_Q"], **no_update),
                    fc["num_warps"], fc["num_stages"])
# The fused optimizer step's epilogue (AdamW with decay; SGD with nesterov momentum) on isotropic noise.
fi = C.noise_tiles(768, 16, None, cuda)
for tag, upd in (("finish_iso", no_update), ("finish_adamw", dict(no_update, UPDATE=3, DECAY=True)),
                 ("finish_sgd", dict(no_update, UPDATE=1, DECAY=True, MOMENTUM=True, NESTEROV=True))):
    out[tag] = aot(crn._finish_kernel, fin_ptrs, dict(NOISE=1, BLOCK_P=fi["BLOCK_P"], BLOCK_Q=fi["BLOCK_Q"], **upd),
                   fi["num_warps"], fi["num_stages"])
try:  # kernels built for the GPU (TRITON_INTERPRET unset at import) must refuse CPU tensors clearly
    psg.per_sample_grad_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1.0)
    cpu_error = ""
except RuntimeError as e:
    cpu_error = str(e)
print(json.dumps(dict(out, cpu_error=cpu_error)))
'''


def run_aot(code: str) -> dict:
    """Run an AOT snippet in a fresh interpreter-free process; skip when Triton's CUDA toolchain is
    not there."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", AOT + code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        if "ptxas" in r.stderr and ("not found" in r.stderr or "No such file" in r.stderr):
            pytest.skip("Triton's bundled ptxas is missing: cannot compile for sm_90 here")
        raise AssertionError(f"compiling for sm_90 failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_hopper_on_tensor_cores():
    """Both ops' kernels (per_sample_grad_norm, clip_reduce_noise: reduce, fused, finish with and without
    the fused optimizer step)."""
    res = run_aot(AOT_KERNELS)
    assert "TRITON_INTERPRET=1" in res.pop("cpu_error"), "CPU tensors without the interpreter: unclear error"
    tc = {k: v["wgmma.mma_async"] + v["mma.sync"] for k, v in res.items()}
    # bf16 with a 64-row tile: Hopper's wgmma; fp32: 3xTF32 on the tensor cores; dot loops pipelined.
    assert res["psg_bf16_B"]["wgmma.mma_async"] > 0, res
    assert tc["psg_fp32_A"] > 0 and tc["fused_bf16"] > 0, res
    for k in ("psg_bf16_B", "psg_fp32_A", "fused_bf16", "reduce"):
        assert res[k]["cp.async"] > 0, f"{k} not pipelined: {res}"
        assert res[k]["ld.local"] == 0, f"{k} uses local memory: {res}"
    # The regulated-noise product with R^-1 stays in full fp32 (no TF32 tensor-core rounding).
    assert tc["finish"] == 0, res
    # The optimizer epilogue keeps to registers: no local memory beyond what the float64 Box-Muller's
    # sin/cos argument reduction already has in the same kernel without it.
    for k in ("finish_adamw", "finish_sgd"):
        assert res[k]["ld.local"] == res["finish_iso"]["ld.local"], f"{k} spills: {res}"
