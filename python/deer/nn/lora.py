"""LoRA layers whose backward hands each layer's input and output gradient to the DP machinery
(no Python hooks on the hot path).

    y = x W^T + b + s * dropout(x) A^T B^T,     A: (r, n) kaiming-uniform(a=sqrt(5)), B: (m, r) zeros

`LoRALinear` replaces an `nn.Linear`. `LoRAQKV` replaces a fused q/k/v projection (timm's
`attn.qkv`, out = 3 * dim) and carries one independent pair of factors per chosen slice, as the
DEeR paper does for q, k and v. Every pair of factors is a `LoRAFactors` module: the unit the
privacy engine clips, noises and accounts.

While `capture` is True (set by the privacy engine) the custom autograd Function appends, on each
backward call, X = dropout(x), U = X A^T and G = dL/dy to the unit's capture list (a `Captured`
triple, which also carries V = G B when A is trained): everything the per-sample gradient kernels
need (with `capture_lean`, which the engine sets, X is dropped when A is
frozen and U when B is frozen). Several backward calls before one optimizer step (gradient
accumulation over physical batches, "virtual steps") simply append more chunks. While capturing,
the summed .grad of A and B is not computed at all: the DP optimizer writes the private gradient
itself, and skipping the two (T*b x r x max(m, n)) matmuls halves the backward cost of the branch.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reference import check_phase, trained_factors


class Captured(tuple):
    """One backward call's capture: the triple (X, U, G) (X = dropout(x) or None, U = X A^T or None,
    G = dL/dy), plus `V` = G B (or None) when A is trained, computed by the backward anyway.

    `task` (the autograd graph task, i.e. the backward pass, that ran it) and `call` (the forward
    call it belongs to) say which captures are uses of the layer on the same samples: a layer applied
    twice in one forward (weight sharing) yields two captures of one backward pass, a second backward
    through a retained graph yields a second capture of one forward call. deer.privacy.release sums
    such uses per sample; captures of different passes and calls are different physical batches."""

    def __new__(cls, X, U, G, V=None, task: int = -1, call: int = -1):
        self = super().__new__(cls, (X, U, G))
        self.V, self.task, self.call = V, task, call
        return self


_calls = itertools.count()   # numbers every forward call of every LoRA branch (Captured.call)


class _LoRABranch(torch.autograd.Function):
    """s * (x A^T) B^T with a backward that optionally records (X, U, G) for per-sample gradients."""

    @staticmethod
    def forward(ctx, x, A, B, scale, unit):
        u = x @ A.T
        ctx.save_for_backward(x, u, A, B)
        ctx.scale = scale
        ctx.unit = unit
        ctx.call = next(_calls)
        # Under autocast the products above ran in the autocast dtype (bf16, say) and the output
        # gradient arrives in it; the backward re-enters the same autocast state (as
        # torch.amp.custom_bwd does, for whichever device type this ran on) so its products mix
        # that gradient with the fp32 factors the same way.
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        # The scale multiplies the r-wide tensors (u here, v in the backward), not the m- or n-wide
        # outputs: the same product, a fraction of the elementwise work.
        return (u * scale) @ B.T

    @staticmethod
    def backward(ctx, gout):
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return _LoRABranch._backward(ctx, gout)

    @staticmethod
    def _backward(ctx, gout):
        x, u, A, B = ctx.saved_tensors
        s = ctx.scale
        unit = ctx.unit
        capturing = unit is not None and unit.capture
        v = gout @ B                      # (..., r): dL/du / s
        gx = (v * s) @ A if ctx.needs_input_grad[0] else None
        gA = gB = None
        if capturing:
            # Keep only what the trained factors need: B needs (U, G), A needs (X, G). Dropping X in
            # the B phase roughly halves the capture memory (X is n wide, U only r).
            lean = unit.capture_lean
            train_a = unit.lora_A.requires_grad
            keep_x = not lean or train_a
            keep_u = not lean or unit.lora_B.requires_grad
            # A's per-sample gradients need V = G B, which this backward has just computed for the
            # input gradient: hand it over instead of making the DP step recompute it.
            # The graph task id numbers the backward pass this runs in (every use of the layer on the
            # same loss.backward() shares it).
            unit._captured.append(Captured(x.detach() if keep_x else None, u.detach() if keep_u else None,
                                           gout.detach(), v.detach() if train_a else None,
                                           task=torch._C._current_graph_task_id(), call=ctx.call))
        else:
            if ctx.needs_input_grad[1]:
                gA = (v.reshape(-1, v.shape[-1]).T @ x.reshape(-1, x.shape[-1])) * s
            if ctx.needs_input_grad[2]:
                gB = (gout.reshape(-1, gout.shape[-1]).T @ u.reshape(-1, u.shape[-1])) * s
        return gx, gA, gB, None, None


def _check_rank(r, m, n, where):
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
        raise ValueError(f"LoRA rank must be an integer in [1, min(out, in)] = [1, {min(m, n)}] for "
                         f"{where} (out={m}, in={n}), got r={r!r}. Choose a smaller rank.")


class LoRAFactors(nn.Module):
    """One pair of LoRA factors (A: (r, n), B: (m, r), scale alpha / r) with per-sample capture.

    This is the unit the privacy engine works on: its `phase` says which factor trains, its
    capture list holds (X, U, G) chunks of the current logical batch. `trainable`: the factors the
    unit can train (a FullLinear trains B only)."""

    trainable = ("A", "B")

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, dtype: torch.dtype | None = None, device=None, name: str = "",
                 init: str = "kaiming", generator: torch.Generator | None = None):
        super().__init__()
        m, n = out_features, in_features
        if self.trainable == ("A", "B"):
            _check_rank(r, m, n, repr(name) if name else "this layer")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r = r
        self.alpha = float(alpha if alpha is not None else r)
        self.scale = self.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, n, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(m, r, dtype=dtype, device=device))
        self.init = init
        with torch.no_grad():   # a (CPU) `generator` draws A on the CPU, leaving the global RNG alone
            on_cpu = generator is None or self.lora_A.device.type == "cpu"
            A = self.lora_A if on_cpu else torch.empty_like(self.lora_A, device="cpu")
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r, generator=generator)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.lora_A.copy_(A)
        self.lora_dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name
        self.capture = False
        self.capture_lean = False   # True: capture only what the trained factors need (X or U may be None)
        self._captured: list[Captured] = []
        self.phase = "AB"

    def set_phase(self, phase: str):
        """'A': train A (B frozen); 'B': train B (A frozen); 'AB': train both."""
        trained = trained_factors(phase)
        self.phase = phase
        self.lora_A.requires_grad_("A" in trained)
        self.lora_B.requires_grad_("B" in trained)

    @property
    def trained(self) -> tuple[str, ...]:
        return unit_factors(self, self.phase)

    def factor(self, f: str) -> nn.Parameter:
        return self.lora_A if f == "A" else self.lora_B

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * dropout(x) A^T B^T, computed in the factors' dtype, returned in x's dtype."""
        xd = self.dropout(x)
        if xd.dtype != self.lora_A.dtype:
            xd = xd.to(self.lora_A.dtype)
        return _LoRABranch.apply(xd, self.lora_A, self.lora_B, self.scale, self).to(x.dtype)

    def pop_captured(self):
        out, self._captured = self._captured, []
        return out

    def clear_captured(self):
        self._captured = []

    def extra_repr(self):
        return (f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, r={self.r}, "
                f"alpha={self.alpha}, phase={self.phase}")


def unit_factors(unit: "LoRAFactors", phase: str) -> tuple[str, ...]:
    """The factors `unit` trains in `phase`: the phase's, less those the unit never trains."""
    return tuple(f for f in trained_factors(phase) if f in unit.trainable)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's attention and MLP projections): y = x W + b with W of shape
    (in, out), a Linear with its weight stored transposed."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def adaptable(module: nn.Module) -> bool:
    """A module inject_lora can adapt: nn.Linear or transformers' Conv1D (LoRALinear), nn.Conv2d
    (LoRAConv2d), nn.Embedding (LoRAEmbedding)."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_conv1d(module)


def lora_class(module: nn.Module) -> type:
    """The deer LoRA layer that wraps an adaptable module."""
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d
    return LoRAEmbedding if isinstance(module, nn.Embedding) else LoRALinear


def max_rank(module: nn.Module) -> int:
    """The largest LoRA rank a layer allows: min(out, in) of the matrix its LoRA factors multiply to."""
    if isinstance(module, nn.Conv2d):
        return min(module.out_channels, module.weight[0].numel())
    return min(module.weight.shape)


class _Wrapped(LoRAFactors):
    """LoRA factors beside a frozen base layer: forward is base(x) + the branch, merge folds the delta
    into the base weight in the base's own layout (`_delta_as_base`)."""

    def _wrap(self, base: nn.Module) -> None:
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged = False

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @torch.no_grad()
    def merge(self):
        """Fold s B A into the base weight (inference); forward then skips the branch."""
        if not self.merged:
            self.base.weight += self._delta_as_base()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self._delta_as_base()
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self._branch(x, y)


class LoRALinear(_Wrapped):
    """Drop-in replacement for an `nn.Linear` (frozen) plus a LoRA branch; also wraps transformers'
    Conv1D (weight stored (in, out): `fan_in_fan_out` is True, as peft names it).

    `dtype` sets the factors' dtype (default: the base weight's), e.g. fp32 factors on a bf16 base."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 name: str = "", dtype: torch.dtype | None = None, **init):
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a transformers Conv1D, got {type(base).__name__}"
                            + (f" at {name!r}" if name else ""))
        w = base.weight
        fan_in_fan_out = is_conv1d(base)
        n, m = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        super().__init__(n, m, r, alpha, dropout, dtype=dtype or w.dtype, device=w.device, name=name, **init)
        self._wrap(base)
        self.fan_in_fan_out = fan_in_fan_out

    @property
    def in_features(self):
        return self.lora_A.shape[1]

    @property
    def out_features(self):
        return self.lora_B.shape[0]

    def _delta_as_base(self) -> torch.Tensor:
        d = self.delta_weight().to(self.base.weight.dtype)
        return d.T if self.fan_in_fan_out else d

    def _branch(self, x, y):
        return self.lora_delta(x)


class LoRAConv2d(_Wrapped):
    """An `nn.Conv2d` (frozen) plus a LoRA branch, as peft's conv LoRA: A is a convolution with the
    base's kernel, stride, padding and dilation into r channels, B a 1x1 convolution to the output
    channels. deer computes it as a Linear branch on the unfolded input (patches of in x kh x kw
    values, one row per output position), so the per-sample capture and kernels are those of every
    LoRA layer: A is (r, in * kh * kw), B (out, r), and each output position is one of the sample's
    rows (as a token is). Unfolding costs kh x kw times the input's memory in the branch."""

    def __init__(self, base: nn.Conv2d, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 name: str = "", dtype: torch.dtype | None = None, **init):
        where = f" at {name!r}" if name else ""
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}{where}")
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(f"LoRAConv2d{where}: groups={base.groups}, padding_mode={base.padding_mode!r}, "
                             f"padding={base.padding!r}; deer adapts convolutions with groups=1, zero padding "
                             "given as numbers (depthwise and 'same'/'valid' padding are not supported)")
        w = base.weight
        super().__init__(w[0].numel(), base.out_channels, r, alpha, dropout, dtype=dtype or w.dtype,
                         device=w.device, name=name, **init)
        self._wrap(base)

    def _delta_as_base(self) -> torch.Tensor:
        return self.delta_weight().to(self.base.weight.dtype).view_as(self.base.weight)

    def _branch(self, x, y):
        b = self.base
        cols = F.unfold(x, b.kernel_size, dilation=b.dilation, padding=b.padding, stride=b.stride)
        delta = self.lora_delta(cols.transpose(1, 2))        # (batch, positions, out)
        return delta.transpose(1, 2).reshape(y.shape)


class LoRAEmbedding(_Wrapped):
    """An `nn.Embedding` (frozen) plus a LoRA branch, as peft's embedding LoRA: the delta of the
    (num_embeddings x dim) table is s (B A)^T with A: (r, num_embeddings), B: (dim, r), so a token t
    gets s B A[:, t]. deer computes the branch as a Linear on the one-hot tokens (X = one_hot(ids),
    n = num_embeddings), so the per-sample capture and kernels are those of every LoRA layer and each
    token is one of the sample's rows. The one-hot input costs tokens x num_embeddings of memory in
    the branch: fine for small vocabularies (special tokens, positions, a few thousand words), not
    for a 50k-token table at a large batch. As in peft the branch has no dropout; the factors start as
    every deer layer's (A kaiming-uniform, B zero; peft starts A at zero and B Gaussian)."""

    def __init__(self, base: nn.Embedding, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 name: str = "", dtype: torch.dtype | None = None, **init):
        where = f" at {name!r}" if name else ""
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}{where}")
        if base.max_norm is not None:
            raise ValueError(f"LoRAEmbedding{where}: max_norm={base.max_norm} renormalises the table's rows in place "
                             "at every lookup; deer adapts embeddings without max_norm")
        if dropout:
            raise ValueError(f"LoRAEmbedding{where}: dropout={dropout}; the embedding branch has no dropout (as in "
                             "peft): use dropout 0 for embedding targets")
        w = base.weight
        super().__init__(base.num_embeddings, base.embedding_dim, r, alpha, 0.0, dtype=dtype or w.dtype,
                         device=w.device, name=name, **init)
        self._wrap(base)

    def _delta_as_base(self) -> torch.Tensor:
        return self.delta_weight().to(self.base.weight.dtype).T

    def _branch(self, x, y):
        return self.lora_delta(F.one_hot(x, self.base.num_embeddings).to(self.lora_A.dtype))


class FullLinear(LoRAFactors):
    """An `nn.Linear` trained fully (peft's `modules_to_save`, e.g. a fresh classifier head) as one
    privacy unit of the same kind as the LoRA layers: its weight and bias are B = [W | b] (out x
    (in + 1)), applied to [x, 1] through a frozen identity A, so

        y = [x, 1] I^T B^T = x W^T + b

    and the per-sample gradient of B (weight and bias together) is the B-phase gradient G_i^T U_i
    with U = [x, 1]: deer's kernels compute it, and it is clipped jointly with the LoRA factors
    (one flat norm) and noised in the same release. It trains whenever B trains (phases 'B' and
    'AB'; in an 'A' phase it is frozen). Under a regulated metric its K = I + lam I is isotropic, so
    its noise is isotropic too. The original module is kept (frozen, unchanged) as `base`; `weight`
    and `bias` are views of B. The identity A costs (in + 1)^2 entries: meant for heads and other
    small layers."""

    trainable = ("B",)

    def __init__(self, base: nn.Linear, name: str = "", dtype: torch.dtype | None = None, **_):
        where = f" at {name!r}" if name else ""
        if type(base) is not nn.Linear:
            raise TypeError(f"FullLinear trains an nn.Linear fully, got {type(base).__name__}{where}")
        w = base.weight
        dtype = dtype or w.dtype
        self.has_bias = base.bias is not None
        n = base.in_features + self.has_bias
        super().__init__(n, base.out_features, r=n, alpha=float(n), dtype=dtype, device=w.device, name=name)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.lora_A = nn.Parameter(torch.eye(n, dtype=dtype, device=w.device), requires_grad=False)
            B = w.detach().to(dtype)
            if self.has_bias:
                B = torch.cat([B, base.bias.detach().to(dtype)[:, None]], 1)
            self.lora_B = nn.Parameter(B.clone())
        self.merged = False

    @property
    def weight(self):
        return self.lora_B[:, :self.base.in_features]

    @property
    def bias(self):
        return self.lora_B[:, -1] if self.has_bias else None

    def set_phase(self, phase: str):
        self.phase = check_phase(phase)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(phase in ("B", "AB"))

    def forward(self, x):
        if self.has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
        return self.lora_delta(x)

    def extra_repr(self):
        return f"in={self.base.in_features}, out={self.base.out_features}, bias={self.has_bias} (trained fully)"


QKV_SLICES = ("q", "k", "v")


class LoRAQKV(nn.Module):
    """A fused q/k/v projection (nn.Linear with out = 3 * d, as timm's `Attention.qkv`) with an
    independent LoRA pair on each chosen slice: y[..., j*d:(j+1)*d] += s dropout(x) A_j^T B_j^T.
    The slices' factors live in `self.slices[j]` (LoRAFactors), one privacy unit each."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 slices=QKV_SLICES, name: str = "", dtype: torch.dtype | None = None, **init):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAQKV wraps an nn.Linear, got {type(base).__name__}"
                            + (f" at {name!r}" if name else ""))
        if base.out_features % 3 != 0:
            raise ValueError(f"LoRAQKV needs a fused projection with out_features = 3 * dim, got "
                             f"out_features={base.out_features} at {name!r}; inject a plain LoRALinear "
                             f"instead (qkv_slices=None)")
        slices = tuple(slices)
        bad = [s for s in slices if s not in QKV_SLICES]
        if not slices or bad or len(set(slices)) != len(slices):
            raise ValueError(f"qkv_slices must be a non-empty subset of {QKV_SLICES} without repeats, "
                             f"got {slices!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.dim = base.out_features // 3
        w = base.weight
        self.slices = nn.ModuleDict({
            s: LoRAFactors(base.in_features, self.dim, r, alpha, dropout, dtype=dtype or w.dtype,
                           device=w.device, name=f"{name}[{s}]" if name else s, **init)
            for s in QKV_SLICES if s in slices})
        self.name = name
        self.merged = False

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def set_phase(self, phase: str):
        for u in self.slices.values():
            u.set_phase(phase)

    def delta_weight(self) -> torch.Tensor:
        d = torch.zeros_like(self.base.weight, dtype=next(iter(self.slices.values())).lora_A.dtype)
        for s, u in self.slices.items():
            j = QKV_SLICES.index(s)
            d[j * self.dim:(j + 1) * self.dim] = u.delta_weight()
        return d

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        if self.merged:
            return y
        parts = list(y.split(self.dim, dim=-1))
        for s, u in self.slices.items():
            j = QKV_SLICES.index(s)
            parts[j] = parts[j] + u.lora_delta(x)
        return torch.cat(parts, dim=-1)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, slices={tuple(self.slices)}"


def lora_units(model: nn.Module) -> list[tuple[str, LoRAFactors]]:
    """(qualified name, unit) of every pair of LoRA factors in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAFactors)]


def lora_layers(model: nn.Module) -> list[LoRAFactors]:
    """Every pair of LoRA factors in `model` (a LoRALinear, or one slice of a LoRAQKV)."""
    return [m for _, m in lora_units(model)]
