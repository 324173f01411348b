"""deer.nn LoRA layers: forward against the float64 reference, merge/unmerge, per-sample capture
(2-D, 3-D and 4-D activations, dropout), fp32 factors on a low-precision base, fused-qkv slices."""
import pytest
import torch
import torch.nn as nn
from torch.func import grad, vmap

from deer import reference as ref
from deer.nn import LoRALinear, LoRAQKV, lora_layers

D = torch.float64


def _lora(gen, n, m, r, alpha=None, dtype=D, bias=True):
    base = nn.Linear(n, m, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=gen, dtype=dtype))
        if bias:
            base.bias.copy_(torch.randn(m, generator=gen, dtype=dtype))
    layer = LoRALinear(base, r=r, alpha=alpha)
    with torch.no_grad():   # B = 0 at init would hide every bug in the B path
        layer.lora_B.copy_(torch.randn(m, r, generator=gen, dtype=dtype))
        layer.lora_A.copy_(torch.randn(r, n, generator=gen, dtype=dtype))
    return layer


@pytest.mark.parametrize("shape_in,m,r,alpha", [((5, 7), 11, 1, None), ((3, 97, 9), 6, 3, 7.0),
                                                ((2, 3, 4, 13), 5, 4, 2.0)])
def test_forward_matches_reference(gen, shape_in, m, r, alpha):
    n = shape_in[-1]
    layer = _lora(gen, n, m, r, alpha)
    x = torch.randn(*shape_in, generator=gen, dtype=D)
    want = ref.lora_forward(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scale)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12, msg=f"seed {gen.initial_seed()}")
    assert layer.scale == (alpha if alpha is not None else r) / r


def test_merge_unmerge(gen):
    layer = _lora(gen, 13, 9, 3, alpha=6.0)
    x = torch.randn(4, 5, 13, generator=gen, dtype=D)
    w0 = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.base.weight, w0 + 2.0 * layer.lora_B @ layer.lora_A)
    layer.merge()  # idempotent
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape_in", [(6, 7), (4, 5, 7), (3, 2, 3, 7)])
def test_capture_gives_per_sample_grads(gen, shape_in):
    """The captured (X, U, G) reproduce per-sample gradients computed independently by torch.func."""
    n, m, r = 7, 5, 2
    layer = _lora(gen, n, m, r, alpha=3.0)
    x = torch.randn(*shape_in, generator=gen, dtype=D)
    t = torch.randn(*shape_in[:-1], m, generator=gen, dtype=D)
    W, bias, A, B = layer.base.weight, layer.base.bias, layer.lora_A.detach(), layer.lora_B.detach()

    def loss(A_, B_, xi, ti):
        y = ref.lora_forward(xi, W, bias, A_, B_, layer.scale)
        return (y * ti).sum() + 0.5 * (y ** 2).sum()
    gA, gB = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(A, B, x, t)

    layer.capture = True
    y = layer(x)
    ((y * t).sum() + 0.5 * (y ** 2).sum()).backward()
    (X, U, G), = layer.pop_captured()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # capture replaces the summed grad
    X, G = X.reshape(X.shape[0], -1, n), G.reshape(G.shape[0], -1, m)
    torch.testing.assert_close(U.reshape(U.shape[0], -1, r), X @ A.T)
    ps = ref.per_sample_grads(X, G, A, B, layer.scale, "AB")
    torch.testing.assert_close(ps["A"], gA, rtol=1e-10, atol=1e-10, msg=f"seed {gen.initial_seed()}")
    torch.testing.assert_close(ps["B"], gB, rtol=1e-10, atol=1e-10, msg=f"seed {gen.initial_seed()}")


def test_capture_accumulates_over_backward_calls(gen):
    layer = _lora(gen, 6, 4, 2)
    layer.capture = True
    for b in (3, 1, 5):
        layer(torch.randn(b, 6, generator=gen, dtype=D)).sum().backward()
    chunks = layer.pop_captured()
    assert [c[0].shape[0] for c in chunks] == [3, 1, 5]
    assert layer.pop_captured() == []


def test_dropout_captures_the_dropped_input(gen):
    """With dropout the summed gradient equals the sum of per-sample gradients from the capture
    (same dropout mask through the same RNG state): the capture sees dropout(x), not x."""
    layer = _lora(gen, 8, 6, 3)
    layer.dropout = nn.Dropout(0.5)
    layer.lora_dropout_p = 0.5
    x = torch.randn(5, 4, 8, generator=gen, dtype=D)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    torch.manual_seed(seed)
    layer(x).pow(2).sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.capture = True
    torch.manual_seed(seed)
    layer(x).pow(2).sum().backward()
    (X, U, G), = layer.pop_captured()
    assert (X == 0).float().mean() > 0.3  # the mask is really in the capture
    ps = ref.per_sample_grads(X, G, layer.lora_A.detach(), layer.lora_B.detach(), layer.scale, "AB")
    torch.testing.assert_close(ps["A"].sum(0), gA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ps["B"].sum(0), gB, rtol=1e-10, atol=1e-10)


def test_summed_grads_without_capture_match_autograd(gen):
    layer = _lora(gen, 9, 7, 3, alpha=5.0)
    x = torch.randn(4, 11, 9, generator=gen, dtype=D, requires_grad=True)
    layer(x).pow(2).sum().backward()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref.lora_forward(x2, layer.base.weight, layer.base.bias, A, B, layer.scale).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_fp32_factors_on_bf16_base(gen):
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


def test_phase_freezes_the_other_factor(gen):
    layer = _lora(gen, 5, 4, 2)
    for phase, a, b in (("A", True, False), ("B", False, True), ("AB", True, True)):
        layer.set_phase(phase)
        assert (layer.lora_A.requires_grad, layer.lora_B.requires_grad) == (a, b)
    with pytest.raises(ValueError, match="phase must be one of"):
        layer.set_phase("C")


@pytest.mark.parametrize("slices", [("q", "k", "v"), ("q", "v"), ("k",)])
def test_qkv_slices(gen, slices):
    dim = 12
    base = nn.Linear(dim, 3 * dim).to(D)
    qkv = LoRAQKV(base, r=3, alpha=6.0, slices=slices)
    assert tuple(qkv.slices) == slices and len(lora_layers(qkv)) == len(slices)
    with torch.no_grad():
        for u in qkv.slices.values():
            u.lora_B.copy_(torch.randn_like(u.lora_B))
    x = torch.randn(2, 7, dim, generator=gen, dtype=D)
    y = qkv(x)
    want = base(x).clone()
    for j, s in enumerate("qkv"):
        if s in slices:
            u = qkv.slices[s]
            want[..., j * dim:(j + 1) * dim] += 2.0 * (x @ u.lora_A.T) @ u.lora_B.T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    # each slice captures its own output gradient (the matching third of dL/dy)
    for u in qkv.slices.values():
        u.capture = True
    gy = torch.randn_like(y)
    (qkv(x) * gy).sum().backward()
    for s, u in qkv.slices.items():
        j = "qkv".index(s)
        (X, U, G), = u.pop_captured()
        torch.testing.assert_close(G, gy[..., j * dim:(j + 1) * dim])
    qkv.merge()
    torch.testing.assert_close(qkv(x), y, rtol=1e-12, atol=1e-12)
    qkv.unmerge()
    torch.testing.assert_close(qkv(x), y, rtol=1e-12, atol=1e-12)


def test_qkv_rejects_bad_slices():
    with pytest.raises(ValueError, match="qkv_slices"):
        LoRAQKV(nn.Linear(4, 12), r=2, slices=("q", "x"))
    with pytest.raises(ValueError, match="3 \\* dim"):
        LoRAQKV(nn.Linear(4, 10), r=2)


@pytest.mark.parametrize("phase,has_x,has_u", [("B", False, True), ("A", True, False), ("AB", True, True)])
def test_lean_capture_keeps_what_the_phase_needs(gen, phase, has_x, has_u):
    layer = _lora(gen, 6, 5, 2)
    layer.set_phase(phase)
    layer.capture = layer.capture_lean = True
    layer(torch.randn(3, 4, 6, generator=gen, dtype=D)).sum().backward()
    (X, U, G), = layer.pop_captured()
    assert (X is not None, U is not None, G.shape) == (has_x, has_u, (3, 4, 5))
