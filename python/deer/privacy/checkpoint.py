"""Adapter checkpoints in peft's format: `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r x in) / `.lora_B.weight` (out x r) and an
`adapter_config.json`, so that `peft.PeftModel.from_pretrained(base_model, directory)` loads a deer
adapter into the same base model and gives the same outputs. adapter_config.json is the model's
`LoRAConfig` (deer.nn.LoRAConfig.to_peft: r, lora_alpha, target_modules, rank_pattern, ...).

peft has no notion of LoRA on a slice of a fused projection: a model with `LoRAQKV` layers (timm
qkv with per-slice factors) cannot be written in this format. Inject with `qkv_slices=None` (the
default) for a peft-compatible adapter, or keep deer's own format (`save_lora_state`: the same
safetensors file with the model.state_dict() names, loaded by `load_lora_state`; the federated run
directory's adapter.safetensors is one).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn

from ..nn.config import LoRAConfig
from ..nn.inject import _require_lora, get_lora_state, set_lora_state
from ..nn.lora import FullLinear, LoRAConv2d, LoRAEmbedding, LoRALinear, LoRAQKV
from ..nn.mha import LinearMultiheadAttention

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def _peft_units(model: nn.Module):
    qkv = [n for n, m in model.named_modules() if isinstance(m, LoRAQKV)]
    if qkv:
        raise ValueError(f"save_adapter: {len(qkv)} layers carry LoRA on slices of a fused qkv projection "
                         f"(e.g. {qkv[0]!r}), which peft cannot represent. Inject them with qkv_slices=None "
                         f"for a peft-compatible adapter, or use deer.privacy.checkpoint.save_lora_state.")
    units = [(n, m) for n, m in _require_lora(model, "save_adapter")]
    attn = [n for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention)
            and any(u.startswith(n + ".") for u, _ in units)]
    if attn:
        raise ValueError(f"save_adapter: LoRA on the projections of nn.MultiheadAttention modules (e.g. {attn[0]!r}, "
                         "converted by inject_lora to q_proj/k_proj/v_proj/out_proj) has no peft equivalent (peft "
                         "adapts the fused in_proj of the original module): use "
                         "deer.privacy.checkpoint.save_lora_state")
    odd = [n for n, m in units if not isinstance(m, (LoRALinear, LoRAConv2d, LoRAEmbedding, FullLinear))]
    if odd:
        raise ValueError(f"save_adapter: LoRA units {odd[:3]} are not LoRALinear / LoRAConv2d / LoRAEmbedding / "
                         "FullLinear layers; peft cannot load them")
    # paths as peft names them: a PeftModel's own start with base_model.model., which peft adds on load
    strip = _own_prefix(model)
    return [(n.removeprefix(strip), m) for n, m in units]


def _peft_shapes(m) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """peft's shapes of (lora_A, lora_B): (r, in) and (out, r) for a Linear; for a Conv2d its A is a
    convolution (r, in, kh, kw) and its B a 1x1 convolution (out, r, 1, 1)."""
    r = m.lora_A.shape[0]
    if isinstance(m, LoRAConv2d):
        return (r, *m.base.weight.shape[1:]), (m.base.weight.shape[0], r, 1, 1)
    return tuple(m.lora_A.shape), tuple(m.lora_B.shape)


def _peft_keys(m) -> tuple[str, str]:
    """peft's names of a layer's (A, B): Parameters lora_embedding_A / _B (r x num_embeddings and
    dim x r) on an Embedding, the weights of the lora_A / lora_B modules elsewhere."""
    if isinstance(m, LoRAEmbedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def _own_prefix(model: nn.Module) -> str:
    return PREFIX if getattr(model, "peft_config", None) else ""


def save_adapter(model: nn.Module, directory: str | os.PathLike,
                 base_model_name_or_path: str | os.PathLike | None = None) -> str | os.PathLike:
    """Write the model's LoRA adapter in peft's format to `directory`; returns the directory. The files
    are written in a temporary folder beside it and then moved into place, so a failed save leaves
    `directory` as it was (an existing one has its two files replaced, each atomically)."""
    from safetensors.torch import save_file
    units = _peft_units(model)
    if any(m.merged for _, m in units):
        raise ValueError("save_adapter: some LoRA layers are merged into their base weights; unmerge() first")
    tensors = {}
    for name, m in units:
        if isinstance(m, FullLinear):   # peft's modules_to_save: the module's own state dict keys
            tensors[f"{PREFIX}{name}.weight"] = m.weight.detach().contiguous().cpu()
            if m.has_bias:
                tensors[f"{PREFIX}{name}.bias"] = m.bias.detach().contiguous().cpu()
            continue
        A, B = _peft_shapes(m)
        ka, kb = _peft_keys(m)
        tensors[f"{PREFIX}{name}.{ka}"] = m.lora_A.detach().reshape(A).contiguous().cpu()
        tensors[f"{PREFIX}{name}.{kb}"] = m.lora_B.detach().reshape(B).contiguous().cpu()
    base = None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
    try:   # the model's LoRAConfig (what inject_lora was given), written as peft's adapter_config.json
        config = LoRAConfig.from_units(units).to_peft([n for n, _ in units], base)
        # peft keeps one flag per adapter and corrects it per layer type; True says "Conv1D layers here"
        config["fan_in_fan_out"] = any(getattr(m, "fan_in_fan_out", False) for _, m in units)
    except ValueError as e:
        raise ValueError(f"save_adapter: {e}") from None
    path = os.path.abspath(directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if not os.path.isdir(path):
            os.replace(tmp, path)
        else:   # an existing adapter folder: replace its two files (other files in it are kept)
            for name in (WEIGHTS, CONFIG):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str) -> None:
    """Load a peft-format adapter (deer's or peft's own save) into a deer model with the same LoRA
    targets and ranks (as inject_lora(model, target_modules=config['target_modules'], r=...) made)."""
    from safetensors.torch import load_file
    units = dict(_peft_units(model))
    tensors = load_file(os.path.join(directory, WEIGHTS))
    state = {}
    full = {}
    for key, t in tensors.items():
        head, _, leaf = key[len(PREFIX):].rpartition(".")
        if key.startswith(PREFIX) and isinstance(units.get(head), FullLinear) and leaf in ("weight", "bias"):
            full.setdefault(head, {})[leaf] = t
            continue
        if not key.startswith(PREFIX):
            raise KeyError(f"load_adapter: unexpected key {key!r} (expected {PREFIX}<path>.lora_A/B.weight or "
                           f"<path>.lora_embedding_A/B)")
        rel = key[len(PREFIX):]
        path, which = rel.removesuffix(".weight").rsplit(".", 1)
        leaf = rel[len(path) + 1:]             # lora_A.weight, lora_embedding_B, ...
        path = path.replace(".default", "") if path not in units else path
        unit = units.get(path)
        if unit is None or leaf not in _peft_keys(unit):
            raise KeyError(f"load_adapter: {key!r} has no matching LoRA layer in this model; LoRA layers: "
                           f"{list(units)[:5]}")
        which = "lora_" + which[-1]
        state[f"{_own_prefix(model)}{path}.{which}"] = t.reshape(unit.factor(which[-1]).shape) \
            if t.numel() == unit.factor(which[-1]).numel() else t
    for path, wb in full.items():
        unit = units[path]
        if set(wb) != ({"weight", "bias"} if unit.has_bias else {"weight"}):
            raise KeyError(f"load_adapter: the fully trained module {path!r} needs "
                           f"{'weight and bias' if unit.has_bias else 'weight'}, the file has {sorted(wb)}")
        B = torch.cat([wb["weight"], wb["bias"][:, None]], 1) if unit.has_bias else wb["weight"]
        state[f"{_own_prefix(model)}{path}.lora_B"] = B.to(unit.lora_B.dtype)
    set_lora_state(model, state, strict=True)


def save_lora_state(model: nn.Module, path: str) -> None:
    """deer's own format (any LoRA layout, including qkv slices): safetensors keyed like get_lora_state."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous().cpu() for k, v in get_lora_state(model).items()}, path)


def load_lora_state(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file
    set_lora_state(model, load_file(path), strict=True)
