"""Put LoRA into an existing model, move its factors in and out, and switch DEeR phases.

    model = timm.create_model(...)                                   # or a transformers model
    inject_lora(model, ["qkv", "head"], r=8, alpha=16, seed=0)       # timm: fused qkv + head
    inject_lora(model, LoRAConfig(["qkv"], r=8, qkv_slices=("q", "v")))  # the same from a config
    inject_lora(bert, ["query", "key", "value"], r=8)                # HF attention projections
    set_phase(model, "B")                                            # DEeR: train B, A frozen
    state = get_lora_state(model, factors=("B",))                    # what a client uploads
    set_lora_state(model, state)                                     # what the server sends back

A LoRA state is one flat dict {'<unit path>.lora_A' / '.lora_B': tensor} (names as in
model.state_dict()); `lora_key` splits a name into (unit path, factor) where a per-unit view is needed.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..reference import check_phase
from .config import LoRAConfig, Target
from .lora import FullLinear, LoRAFactors, LoRAQKV, adaptable, lora_class, lora_units
from .mha import PROJECTIONS, LinearMultiheadAttention

LoRAState = dict[str, torch.Tensor]


class NoLoRALayersError(ValueError):
    """The model has no LoRA layers where some were required."""


def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.split(".")[-1] == "qkv" and module.out_features % 3 == 0 \
        and module.out_features // 3 == module.in_features


def _summary_of_names(model: nn.Module, limit: int = 40) -> str:
    linear = [n for n, m in model.named_modules() if adaptable(m) and n]
    shown = ", ".join(map(repr, linear[:limit])) + (f", ... ({len(linear) - limit} more)" if len(linear) > limit else "")
    return f"nn.Linear / Conv2d / Conv1D / Embedding modules in this model: [{shown}]" if linear else \
        f"this model has no nn.Linear, Conv2d, Conv1D or Embedding modules (module types: {sorted({type(m).__name__ for m in model.modules()})})"


_UNSET = object()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the qualified module path `name` of `model`."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def inject_lora(model: nn.Module, target_modules: LoRAConfig | Target | Sequence[Target], r: int = _UNSET,
                alpha: float | None = _UNSET, dropout: float = _UNSET, qkv_slices: Iterable[str] | None = _UNSET,
                dtype: torch.dtype | None = None, freeze_base: bool = True, *, rank_pattern: dict = _UNSET,
                init: str = _UNSET, seed: int | None = None, modules_to_save: Sequence[str] = _UNSET) -> nn.Module:
    """Replace the matched `nn.Linear` modules of `model` (in place) by LoRA layers and return it.

    target_modules: a `LoRAConfig`, or its target_modules with the other LoRAConfig fields as
      keywords (r=8, alpha=None (= r), dropout=0, qkv_slices=None, rank_pattern={}, init='kaiming'):
      names/regexes (matched like peft: exact, dotted suffix or full regex), module types (e.g.
      nn.Linear), or callables (name, module) -> bool.
    seed: every A drawn from torch.Generator().manual_seed(seed), in module order, so every party that
      builds the model with the same seed gets the same adapters; the global RNG is not touched
      (None: A comes from the global RNG).
    freeze_base: freeze every parameter that is not a LoRA factor (as peft does).
    modules_to_save: nn.Linear modules to train fully (e.g. a fresh classifier head), as peft's option:
      each becomes a FullLinear, clipped and noised jointly with the LoRA factors and saved with the
      adapter (LoRAConfig.modules_to_save).
    """
    kw = dict(r=r, alpha=alpha, dropout=dropout, qkv_slices=qkv_slices, rank_pattern=rank_pattern, init=init,
              modules_to_save=modules_to_save)
    config = LoRAConfig.of(target_modules, **{k: v for k, v in kw.items() if v is not _UNSET})
    # Modules inside an existing LoRA wrapper (its frozen base, its factors) are never targets.
    wrapped = [n for n, m in model.named_modules() if isinstance(m, (LoRAFactors, LoRAQKV))]
    _convert_attention(model, config)
    matched = []
    for name, module in model.named_modules():
        if any(name == w or name.startswith(w + ".") for w in wrapped):
            continue
        if any(name.startswith(n + ".") for n, _ in matched):
            continue  # inside a module already matched (which is then rejected below)
        if isinstance(module, LinearMultiheadAttention):
            continue  # a container: its projections are matched on their own names
        if config.matches(name, module):
            matched.append((name, module))
    if not matched:
        raise NoLoRALayersError(f"inject_lora: no module matched target_modules={list(config.target_modules)!r}. "
                                f"{_summary_of_names(model)}")
    for name, module in matched:
        if isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"inject_lora: target {name!r} is an nn.MultiheadAttention; name its projections "
                            f"instead: {[f'{name}.{p}' for p in PROJECTIONS]} (or suffixes such as 'q_proj', "
                            f"'out_proj'), which deer then adapts as Linear layers")
        if not adaptable(module):
            raise TypeError(f"inject_lora: target {name!r} is a {type(module).__name__}, not an nn.Linear, "
                            f"nn.Conv2d, nn.Embedding or transformers Conv1D; LoRA here adapts those layers only. Narrow target_modules (e.g. "
                            f"{name + '.<linear name>'!r}). {_summary_of_names(model)}")
        if name == "":
            raise ValueError("inject_lora: the model itself is the target Linear; wrap it yourself with "
                             "deer.nn.LoRALinear(model, r=...)")

    full = [(n, m) for n, m in model.named_modules() if n and config.saves(n)
            and not any(n == w or n.startswith(w + ".") for w in wrapped)]
    if config.modules_to_save and not full:
        raise NoLoRALayersError(f"inject_lora: no module matched modules_to_save={list(config.modules_to_save)!r}. "
                                f"{_summary_of_names(model)}")
    for name, module in full:
        if any(name == n for n, _ in matched):
            raise ValueError(f"inject_lora: {name!r} is both a LoRA target and in modules_to_save; a module is "
                             f"either adapted with LoRA or trained fully")
        if type(module) is not nn.Linear:
            raise TypeError(f"inject_lora: modules_to_save entry {name!r} is a {type(module).__name__}; deer trains "
                            f"nn.Linear modules fully (a classifier head), other module types not yet")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    for name, module in matched:
        args = (module, config.rank_for(name), config.alpha_for(name), config.dropout)
        init = dict(name=name, dtype=dtype, init=config.init, generator=gen)
        if config.qkv_slices is not None and _is_fused_qkv(name, module):
            new = LoRAQKV(*args, slices=config.qkv_slices, **init)
        else:
            new = lora_class(module)(*args, **init)
        replace_module(model, name, new)
    for name, module in full:
        replace_module(model, name, FullLinear(module, name=name, dtype=dtype))
    return model


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _convert_attention(model: nn.Module, config: LoRAConfig) -> None:
    """Replace every nn.MultiheadAttention one of whose projections (q_proj, k_proj, v_proj, out_proj) is
    a target by the equivalent LinearMultiheadAttention, whose projections are modules LoRA can wrap.

    Checked before anything changes: a sequence-first nn.TransformerEncoderLayer / DecoderLayer
    (batch_first=False) with a target outside its attention is refused, since its other Linear layers
    see (seq, batch, features) and deer would read positions as samples (the converted attention
    transposes to batch-first itself, so targets inside it are fine)."""
    mhas = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mhas:
        return
    convert = []
    for name, mha in mhas:
        dims = {"q_proj": mha.embed_dim, "k_proj": mha.kdim, "v_proj": mha.vdim, "out_proj": mha.embed_dim}
        probes = {p: mha.out_proj if p == "out_proj" else nn.Linear(dims[p], mha.embed_dim, device="meta")
                  for p in PROJECTIONS}
        if any(config.matches(f"{name}.{p}" if name else p, probes[p]) for p in PROJECTIONS):
            convert.append(name)
    if not convert:
        return
    targets = convert + [n for n, m in model.named_modules() if adaptable(m) and config.matches(n, m)]
    for lname, layer in model.named_modules():
        if not isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or layer.self_attn.batch_first:
            continue
        attn = [f"{lname}.{a}" if lname else a for a in ("self_attn", "multihead_attn") if hasattr(layer, a)]
        outside = [t for t in targets if _inside(t, lname) and not any(_inside(t, a) for a in attn)]
        if outside:
            raise ValueError(f"inject_lora: {lname or 'the model'!r} is a {type(layer).__name__} with batch_first=False: "
                             f"its Linear layers {outside} see (seq, batch, features), and deer reads dim 0 of a "
                             f"LoRA layer's input as the sample. Build it with batch_first=True (the weights are "
                             f"the same; transpose its inputs), or target only its attention projections")
    for name in convert:
        replace_module(model, name, LinearMultiheadAttention.from_mha(model.get_submodule(name), name))
    # nn.TransformerEncoder may have chosen its nested-tensor fast path when it was built; that path
    # packs the batch and would bypass the converted layers' forward.
    for name, enc in model.named_modules():
        if isinstance(enc, nn.TransformerEncoder) and any(_inside(c, name) for c in convert):
            enc.use_nested_tensor = False


def _require_lora(model: nn.Module, what: str):
    units = lora_units(model)
    if not units:
        raise NoLoRALayersError(f"{what}: the model has no LoRA layers yet. Call "
                                f"deer.nn.inject_lora(model, target_modules=[...]) first. {_summary_of_names(model)}")
    return units


def set_phase(model: nn.Module, phase: str) -> nn.Module:
    """DEeR phase on every LoRA unit: 'A' trains A (B frozen), 'B' trains B (A frozen), 'AB' both."""
    check_phase(phase)
    for _, u in _require_lora(model, f"set_phase({phase!r})"):
        u.set_phase(phase)
    return model


def get_phase(model: nn.Module) -> str:
    phases = {u.phase for _, u in _require_lora(model, "get_phase")}
    if len(phases) != 1:
        raise ValueError(f"LoRA layers are in different phases {sorted(phases)}; call set_phase(model, ...)")
    return phases.pop()


def get_lora_state(model: nn.Module, factors: Sequence[str] = ("A", "B")) -> dict[str, torch.Tensor]:
    """Detached copies of the LoRA factors: {'<unit name>.lora_A': (r, n), '<unit name>.lora_B': (m, r)}
    (names as in model.state_dict()). factors=('B',) gives only what the B phase trains. A factor a
    unit never trains (a FullLinear's identity A) is a constant, not state: it is left out."""
    bad = [f for f in factors if f not in ("A", "B")]
    if bad:
        raise ValueError(f"factors must be a subset of ('A', 'B'), got {tuple(factors)!r}")
    out = {}
    for name, u in _require_lora(model, "get_lora_state"):
        for f in u.trainable:
            if f in factors:
                out[f"{name}.lora_{f}"] = u.factor(f).detach().clone()
    return out


@torch.no_grad()
def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = False) -> None:
    """Copy factors from `state` (as get_lora_state returns, any subset of factors) into the model.
    Unknown names or wrong shapes are errors; strict=True also requires every factor to be present."""
    params = {}
    for name, u in _require_lora(model, "set_lora_state"):
        for f in u.trainable:
            params[f"{name}.lora_{f}"] = u.factor(f)
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"set_lora_state: {len(unknown)} names are not LoRA factors of this model, e.g. "
                       f"{unknown[:5]}; expected names like {list(params)[:3]}")
    if strict:
        missing = [k for k in params if k not in state]
        if missing:
            raise KeyError(f"set_lora_state(strict=True): missing {len(missing)} factors, e.g. {missing[:5]}")
    for k, v in state.items():
        p = params[k]
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"set_lora_state: {k} has shape {tuple(v.shape)}, the model's is {tuple(p.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"set_lora_state: {k} contains NaN or Inf; refusing to load it")
        p.copy_(v.to(dtype=p.dtype, device=p.device))


def lora_key(name: str) -> tuple[str, str]:
    """'<unit path>.lora_A' -> ('<unit path>', 'A') (and .lora_B -> 'B'): the unit and factor of a LoRA
    state entry, for code that works per unit (the federated aggregate's metric grams)."""
    unit, sep, f = name.rpartition(".lora_")
    if not sep or f not in ("A", "B"):
        raise KeyError(f"{name!r} is not a LoRA state name ('<unit path>.lora_A' or '.lora_B')")
    return unit, f
