"""peft models in: `from_peft(model)` turns the LoRA layers of a peft model into deer's LoRALinear, in
place, sharing peft's factor tensors, so an optimizer built on the peft model's parameters keeps
working and `make_private` can clip and noise them.

What carries over: r, lora_alpha (and rank_pattern / alpha_pattern, which peft has already resolved
per layer into r and scaling), use_rslora (its scaling alpha / sqrt(r) becomes deer's scale), lora_dropout,
target_modules, Linear, Conv1D and Embedding base layers (an Embedding's lora_embedding_A / _B become
LoRAEmbedding's A / B). What deer refuses, by name, rather than train wrongly:
DoRA (use_dora), trainable biases (bias != 'none', lora_bias), several adapters in one layer, a merged
layer, peft's conv LoRA other than Conv2d with dilation 1 (peft's A ignores the base's dilation), and
modules_to_save other than nn.Linear. peft's Conv2d LoRA becomes LoRAConv2d with A and B as 2-D views
of peft's (r, in, kh, kw) and (out, r, 1, 1) tensors (the same storage, new Parameters); a Linear in
modules_to_save becomes a FullLinear, whose weight and bias are one new Parameter, B = [W | b]. Such a
unit keeps peft's original Parameters in `replaced`, and make_private swaps them for the unit's in the
optimizer.
After the conversion, save with deer.save_adapter (peft's format; PeftModel.from_pretrained loads it).
"""
from __future__ import annotations

import torch.nn as nn

from .lora import FullLinear, lora_class


def _refuse(what: str, why: str):
    raise ValueError(f"from_peft: {what}; {why}")


def is_peft_lora(model: nn.Module) -> bool:
    """The model holds peft LoRA layers (peft importable and at least one LoraLayer)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def from_peft(model: nn.Module) -> nn.Module:
    """Convert every peft LoRA layer of `model` (a PeftModel, or a model with peft's LoRA layers) to a
    deer LoRALinear in place, with the same base layer, factors (the same Parameter objects), scale and
    dropout; returns the model. The forward is unchanged."""
    from peft.tuners.lora import LoraLayer
    from .inject import NoLoRALayersError, replace_module
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        if getattr(cfg, "peft_type", None) is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            _refuse(f"adapter {name!r} is {cfg.peft_type}", "deer converts LoRA adapters only")
        if getattr(cfg, "use_dora", False):
            _refuse(f"adapter {name!r} uses DoRA (use_dora=True)", "deer's per-sample gradients are for plain LoRA")
        if getattr(cfg, "bias", "none") != "none":
            _refuse(f"adapter {name!r} trains biases (bias={cfg.bias!r})",
                    "those gradients would escape clipping; use bias='none'")
    saved = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise NoLoRALayersError("from_peft: the model has no peft LoRA layers (peft.get_peft_model(model, "
                                "LoraConfig(...)) makes them)")
    for name, layer in layers:
        adapters = list(layer.lora_embedding_A.keys() if type(layer).__name__ == "Embedding" else layer.lora_A.keys())
        if len(adapters) != 1 or list(layer.active_adapters) != adapters:
            _refuse(f"{name!r} holds adapters {adapters} (active {list(layer.active_adapters)})",
                    "deer trains one adapter: delete the others (model.delete_adapter) first")
        a = adapters[0]
        kind = type(layer).__name__
        if kind not in ("Linear", "Embedding", "Conv2d"):
            _refuse(f"{name!r} is peft's LoRA on a {type(layer.get_base_layer()).__name__}",
                    "deer converts LoRA on Linear, Conv1D, Conv2d and Embedding layers only")
        if kind == "Conv2d" and tuple(layer.get_base_layer().dilation) != (1, 1):
            _refuse(f"{name!r} is peft's conv LoRA on a Conv2d with dilation {layer.get_base_layer().dilation}",
                    "peft's A convolution ignores the dilation, deer's branch follows the base layer")
        if getattr(layer, "lora_bias", {}).get(a, False):
            _refuse(f"{name!r} has a LoRA bias (lora_bias=True)", "its gradient would escape clipping")
        if layer.merged:
            _refuse(f"{name!r} is merged into its base weight", "call model.unmerge_adapter() first")
        drop = layer.lora_dropout[a]
        r, scale = int(layer.r[a]), float(layer.scaling[a])
        base = layer.get_base_layer()
        # peft applies no dropout on the embedding branch, nor does deer
        p = drop.p if isinstance(drop, nn.Dropout) and kind != "Embedding" else 0.0
        unit = lora_class(base)(base, r, alpha=scale * r, dropout=p, name=name)
        if kind == "Conv2d":
            pa, pb = layer.lora_A[a].weight, layer.lora_B[a].weight
            unit.lora_A = nn.Parameter(pa.data.view(r, -1), requires_grad=pa.requires_grad)
            unit.lora_B = nn.Parameter(pb.data.view(pb.shape[0], r), requires_grad=pb.requires_grad)
            unit.replaced = [pa, pb]
        elif kind == "Embedding":
            unit.lora_A = layer.lora_embedding_A[a]    # the same Parameters: (r, num_embeddings), (dim, r)
            unit.lora_B = layer.lora_embedding_B[a]
        else:
            unit.lora_A = layer.lora_A[a].weight       # the same Parameters: (r, in) and (out, r)
            unit.lora_B = layer.lora_B[a].weight
        unit.train(layer.training)
        replace_module(model, name, unit)
    for name, wrapper in saved:
        adapters = list(wrapper.modules_to_save.keys())
        if len(adapters) != 1:
            _refuse(f"{name!r} (modules_to_save) holds copies for adapters {adapters}",
                    "deer trains one adapter: delete the others first")
        trained = wrapper.modules_to_save[adapters[0]]
        if type(trained) is not nn.Linear:
            _refuse(f"{name!r} (modules_to_save) is a {type(trained).__name__}",
                    "deer trains nn.Linear modules fully (a classifier head), other module types not yet")
        unit = FullLinear(trained, name=name)
        unit.replaced = [p for p in (trained.weight, trained.bias) if p is not None]
        unit.train(wrapper.training)
        replace_module(model, name, unit)
    return model
