"""clip_reduce_noise's fused optimizer step (FusedUpdate) on every available backend against the real
torch.optim SGD / Adam / AdamW (foreach=False) stepping a clone of the parameter with the op's own
unfused output as .grad: several consecutive steps (momentum's first step, Adam's bias correction),
isotropic, regulated (both sides) and no noise, fp32 and fp64, odd sizes; the grouped launch against
per-layer calls; non-finite gradient elements never reach the weights; refused calls leave the state
untouched; optimizer state dicts move between fused and unfused runs."""
import copy

import pytest
import torch

from deer.ops import FusedUpdate, clip_reduce_noise, clip_reduce_noise_grouped
from test_clip_reduce_noise import _backends, _chol, _device, _key, _skip_if_unavailable

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.2, weight_decay=0.05),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1, foreach=False),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1, foreach=False),
}

# (b, p, q), noise: regulated side 0 acts on the p rows (r = p), side 1 on the q columns (r = q).
CASES = [((33, 9, 5), "none"), ((33, 9, 5), "isotropic"), ((1, 9, 5), "regulated0"), ((33, 9, 5), "regulated1"),
         ((2, 8, 2304), "regulated0"), ((3, 768, 8), "isotropic")]


# Optimizer state (moments, momentum buffers) after the fused step vs torch's: no division involved.
STATE_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def _noise_args(noise, p, q, gen, device):
    if not noise.startswith("regulated"):
        return None, 1, 0.0 if noise == "none" else 0.7
    side = int(noise[-1])
    _, R = _chol(p if side == 0 else q, gen)
    return R.to(device), side, 0.7


def _state_close(got, want, tol):
    assert got.keys() == want.keys()
    for k in want:
        if torch.is_tensor(want[k]) and want[k].dim() > 0:
            torch.testing.assert_close(got[k], want[k], **tol, msg=k)
        else:
            assert float(got[k]) == float(want[k]), k


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_step_equals_torch_optim(backend, case, opt, dtype, gen):
    (b, p, q), noise = case
    _skip_if_unavailable(backend)
    if backend == "triton" and (dtype == torch.float64 or p * q > 4096):
        pytest.skip("Triton takes fp32; large shapes are too slow under the interpreter")
    dev = _device(backend)
    chol, side, sigma = _noise_args(noise, p, q, gen, dev)
    key = _key(gen)
    w = torch.nn.Parameter(torch.randn(p, q, generator=gen, dtype=dtype).to(dev))
    w_ref = torch.nn.Parameter(w.detach().clone())
    w64 = torch.nn.Parameter(w.detach().double().clone())   # torch's step in float64: the oracle for fp32 runs
    fused_opt, ref_opt, opt64 = OPTIMIZERS[opt]([w]), OPTIMIZERS[opt]([w_ref]), OPTIMIZERS[opt]([w64])
    for step in range(3):
        g = torch.randn(b, p, q, generator=gen, dtype=dtype).to(dev)
        clip = torch.rand(b, generator=gen, dtype=dtype).to(dev)
        args = (g, clip, sigma, 7.5, chol, side, key["seed"], key["step"] + step, key["layer"], key["client"])
        plain = clip_reduce_noise(*args, backend=backend)
        w_ref.grad, w64.grad = plain, plain.double()
        ref_opt.step()
        opt64.step()
        out = clip_reduce_noise(*args, backend=backend, update=FusedUpdate.from_optimizer(fused_opt, w))
        torch.testing.assert_close(out, plain, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
        msg = f"step {step}, seed {gen.initial_seed()}"
        if dtype == torch.float64:
            # (Adam's m / (sqrt(v) + eps) amplifies rounding where g is near 0, hence not 1e-14.)
            torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-9, atol=1e-12, msg=msg)
        else:
            # fp32: no further from torch's float64 step than torch's own fp32 step is (up to 4x: with
            # L2 decay, g + wd * p cancels near 0 and the two roundings differ), so an ill-conditioned
            # element cannot fail it while a wrong formula (errors ~ lr) always does.
            err = (w.detach().double() - w64.detach()).abs().max().item()
            err_torch = (w_ref.detach().double() - w64.detach()).abs().max().item()
            assert err <= 4 * err_torch + 1e-7, (err, err_torch, msg)
        _state_close(fused_opt.state[w], ref_opt.state[w_ref], STATE_TOL[dtype])
    assert w.grad is None   # the fused step never goes through .grad


@pytest.mark.parametrize("backend", _backends())
def test_grouped_fused_step_equals_per_layer(backend, gen):
    """Mixed kinds, one layer without an update, regulated and isotropic layers; 8 x (8 x 2304) layers are
    enough element pairs for CUDA's one-launch grouped kernel."""
    _skip_if_unavailable(backend)
    dev = _device(backend)
    small = backend == "triton"
    shapes = [(3, 9, 5), (2, 17, 4), (4, 6, 11)] if small else [(3, 9, 5), (2, 17, 4)] + [(2, 8, 2304)] * 8
    kinds = ["sgd_momentum", "adamw", None, "sgd_nesterov", "adam", "sgd"]
    layers = []
    for k, (b, p, q) in enumerate(shapes):
        side = k % 2
        r = p if side == 0 else q
        chol = _chol(r, gen)[1].to(dev) if k % 3 != 2 and r <= 64 else None   # every third layer isotropic
        w = torch.randn(p, q, generator=gen).to(dev)
        layers.append(dict(g=torch.randn(b, p, q, generator=gen).to(dev), clip=torch.rand(b, generator=gen).to(dev),
                           chol=chol, side=side, w=w, kind=kinds[k % len(kinds)]))
    key = _key(gen)
    runs = {}
    for mode in ("grouped", "per_layer"):
        params = [torch.nn.Parameter(L["w"].clone()) for L in layers]
        opts = [OPTIMIZERS[L["kind"]]([w]) if L["kind"] else None for L, w in zip(layers, params)]
        for step in range(2):
            ups = [FusedUpdate.from_optimizer(o, w) if o else None for o, w in zip(opts, params)]
            kw = dict(seed=key["seed"], step=key["step"] + step, client=key["client"], backend=backend)
            if mode == "grouped":
                outs = clip_reduce_noise_grouped([L["g"] for L in layers], [L["clip"] for L in layers], 0.9, 5.0,
                                                 [L["chol"] for L in layers], [L["side"] for L in layers],
                                                 layers=list(range(len(layers))), updates=ups, **kw)
            else:
                outs = [clip_reduce_noise(L["g"], L["clip"], 0.9, 5.0, L["chol"], L["side"], layer=k, update=u, **kw)
                        for k, (L, u) in enumerate(zip(layers, ups))]
        runs[mode] = (outs, params, opts)
    (og, pg, sg), (op, pp, sp) = runs["grouped"], runs["per_layer"]
    for k in range(len(layers)):
        torch.testing.assert_close(og[k], op[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pg[k].detach(), pp[k].detach(), rtol=2e-5, atol=2e-6, msg=f"layer {k}")
        if sg[k] is not None:
            _state_close(sg[k].state[pg[k]], sp[k].state[pp[k]], dict(rtol=2e-5, atol=2e-6))
    assert torch.equal(pg[2].detach(), layers[2]["w"])   # the layer without an update is not stepped


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])
def test_nonfinite_gradient_element_is_not_stepped(backend, opt, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    b, p, q = 4, 7, 5
    g = torch.randn(b, p, q, generator=gen)
    g[1, 2, 3] = float("inf")
    g, clip = g.to(dev), torch.rand(b, generator=gen).to(dev)
    w = torch.nn.Parameter(torch.randn(p, q, generator=gen).to(dev))
    w0 = w.detach().clone()
    o = OPTIMIZERS[opt]([w])
    out = clip_reduce_noise(g, clip, 0.5, 4.0, seed=3, step=1, backend=backend, update=FusedUpdate.from_optimizer(o, w))
    bad = ~torch.isfinite(out)
    assert bad.sum() == 1 and bad[2, 3]
    assert torch.equal(w.detach()[2, 3], w0[2, 3]) and torch.isfinite(w.detach()).all()
    for v in o.state[w].values():
        if torch.is_tensor(v) and v.dim() > 0:
            assert v[2, 3] == 0 and torch.isfinite(v).all()   # fresh buffers, untouched at the bad element
    # every finite element took exactly torch's step (the optimizers are elementwise)
    w_ref = torch.nn.Parameter(w0.clone())
    w_ref.grad = torch.where(bad, 0.0, out)
    OPTIMIZERS[opt]([w_ref]).step()
    torch.testing.assert_close(w.detach()[~bad], w_ref.detach()[~bad], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", _backends())
def test_refused_call_leaves_parameter_and_state_untouched(backend, gen):
    _skip_if_unavailable(backend)
    dev = _device(backend)
    g, clip = torch.randn(3, 6, 4, generator=gen).to(dev), torch.rand(3, generator=gen).to(dev)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(dev))
    w0 = w.detach().clone()
    o = OPTIMIZERS["adamw"]([w])
    bad_chol = -torch.eye(4, device=dev)   # negative diagonal: not a Cholesky factor
    with pytest.raises((ValueError, RuntimeError), match="positive"):
        clip_reduce_noise(g, clip, 1.0, 3.0, bad_chol, 1, backend=backend, update=FusedUpdate.from_optimizer(o, w))
    assert torch.equal(w.detach(), w0) and len(o.state[w]) == 0


def test_unsupported_settings_are_refused_with_the_reason():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    for opt, match in [(torch.optim.Adam([w], amsgrad=True), "amsgrad"), (torch.optim.SGD([w], lr=0.1, maximize=True),
                       "maximize"), (torch.optim.AdamW([w], capturable=True), "capturable")]:
        with pytest.raises(ValueError, match=match):
            FusedUpdate.from_optimizer(opt, w)
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        FusedUpdate.from_optimizer(torch.optim.RMSprop([w]), w)
    with pytest.raises(ValueError, match="not in any"):
        FusedUpdate.from_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), w)
    g, clip = torch.randn(2, 3, 2), torch.rand(2)
    for bad, match in [(torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16)), "bfloat16"),
                       (torch.nn.Parameter(torch.zeros(2, 3)), r"\(3, 2\)")]:
        with pytest.raises(ValueError, match=match):
            clip_reduce_noise(g, clip, 1.0, 2.0, update=FusedUpdate.from_optimizer(torch.optim.SGD([bad], lr=0.1), bad))


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adamw"])
def test_state_dict_moves_between_fused_and_unfused(opt, gen):
    """Two fused steps, then the optimizer's state dict resumes an unfused optimizer: the same as three
    fused steps (and torch's own three steps)."""
    p, q, b = 5, 3, 4
    data = [(torch.randn(b, p, q, generator=gen), torch.rand(b, generator=gen)) for _ in range(3)]
    w0 = torch.randn(p, q, generator=gen)

    def out(step, g, c):
        return clip_reduce_noise(g, c, 0.4, 4.0, seed=9, step=step)

    w = torch.nn.Parameter(w0.clone())
    o = OPTIMIZERS[opt]([w])
    for s, (g, c) in enumerate(data[:2]):
        clip_reduce_noise(g, c, 0.4, 4.0, seed=9, step=s, update=FusedUpdate.from_optimizer(o, w))
    w2 = torch.nn.Parameter(w.detach().clone())
    o2 = OPTIMIZERS[opt]([w2])
    o2.load_state_dict(copy.deepcopy(o.state_dict()))
    w2.grad = out(2, *data[2])
    o2.step()
    clip_reduce_noise(*data[2], 0.4, 4.0, seed=9, step=2, update=FusedUpdate.from_optimizer(o, w))
    torch.testing.assert_close(w2.detach(), w.detach(), rtol=2e-5, atol=2e-6)
    w3 = torch.nn.Parameter(w0.clone())
    o3 = OPTIMIZERS[opt]([w3])
    for s, (g, c) in enumerate(data):
        w3.grad = out(s, g, c)
        o3.step()
    torch.testing.assert_close(w3.detach(), w.detach(), rtol=2e-5, atol=2e-6)
