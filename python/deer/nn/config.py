"""LoRAConfig: the one description of a LoRA adapter, shared by `deer.nn.inject_lora` (drop-in),
the federated trainer (FedConfig.lora_config) and `deer.save_adapter` (peft's adapter_config.json)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.nn as nn

from .lora import adaptable, max_rank

Target = Union[str, type, Callable[[str, nn.Module], bool]]
INITS = ("kaiming", "gaussian")   # A ~ kaiming-uniform(a=sqrt(5)) (LoRA's and peft's default) | N(0, 1/r^2)


def _name_matches(name: str, key: str) -> bool:
    """peft-style: an exact qualified name, a dotted suffix ('attn.qkv' matches 'blocks.0.attn.qkv'),
    or a regular expression matched against the full name."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class LoRAConfig:
    """r, alpha (None: r, i.e. scale 1), target_modules (names/regexes matched like peft, nn.Linear
    subclasses, or callables (name, module) -> bool), rank_pattern / alpha_pattern ({name, dotted
    suffix or regex: value}; an exact name wins, else the first matching key), dropout, init of A
    ('kaiming' | 'gaussian'; B starts at 0) and qkv_slices: None wraps a fused timm `qkv` in one
    LoRALinear like any Linear (the default: fewer, larger units and peft-compatible; the README's
    drop-in section), a subset of ('q', 'k', 'v') gives it a LoRAQKV with one pair per slice.
    modules_to_save: names (matched like target_modules) of nn.Linear modules trained fully beside
    the LoRA factors, as peft's option of that name (deer.nn.FullLinear: clipped and noised jointly
    with them, saved with the adapter), e.g. a freshly initialised classifier head."""
    target_modules: Any = ()
    r: int = 8
    alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    dropout: float = 0.0
    init: str = "kaiming"
    qkv_slices: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        t = self.target_modules
        targets = (t,) if isinstance(t, (str, type)) or callable(t) else tuple(t)
        if not targets:
            raise ValueError("inject_lora: target_modules is empty; name the nn.Linear modules to adapt")
        for t in targets:
            if isinstance(t, type) and not issubclass(t, (nn.Linear, nn.Conv2d, nn.Embedding)):
                raise TypeError(f"inject_lora: LoRA targets must be nn.Linear, nn.Conv2d or nn.Embedding modules, but "
                                f"the target type {t.__name__} is none of them")
            if not isinstance(t, (str, type)) and not callable(t):
                raise TypeError(f"target_modules entries must be names/regexes (str), module types, or "
                                f"callables (name, module) -> bool; got {t!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        if self.qkv_slices is not None:
            object.__setattr__(self, "qkv_slices", tuple(self.qkv_slices))
        full = self.modules_to_save
        full = (full,) if isinstance(full, str) else tuple(full or ())
        if any(not isinstance(n, str) or not n for n in full):
            raise TypeError(f"modules_to_save must be module names (str), got {list(full)!r}")
        object.__setattr__(self, "modules_to_save", full)

    @classmethod
    def of(cls, spec, **kw) -> "LoRAConfig":
        """`spec` itself when it is a LoRAConfig (then no keyword may be given), else
        LoRAConfig(target_modules=spec, **kw)."""
        if isinstance(spec, cls):
            if kw:
                raise TypeError(f"inject_lora: pass a LoRAConfig or keyword arguments, not both (got {sorted(kw)})")
            return spec
        return cls(target_modules=spec, **kw)

    def saves(self, name: str) -> bool:
        """`name` is one of modules_to_save (trained fully)."""
        return any(_name_matches(name, k) for k in self.modules_to_save)

    def matches(self, name: str, module: nn.Module) -> bool:
        return any(_name_matches(name, t) if isinstance(t, str) else
                   isinstance(module, t) if isinstance(t, type) else bool(t(name, module))
                   for t in self.target_modules)

    @staticmethod
    def _lookup(pattern: dict, name: str, default):
        if name in pattern:
            return pattern[name]
        return next((v for k, v in pattern.items() if _name_matches(name, k)), default)

    def rank_for(self, name: str) -> int:
        return self._lookup(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float | None:
        return self._lookup(self.alpha_pattern, name, self.alpha)

    def too_large(self, model: nn.Module) -> dict[str, int]:
        """{target name: the largest rank it allows, min(out, in)} for each matched Linear of `model`
        whose configured rank exceeds it (e.g. a classifier head with fewer classes than r)."""
        return {n: max_rank(m) for n, m in model.named_modules()
                if adaptable(m) and self.matches(n, m) and self.rank_for(n) > max_rank(m)}

    @classmethod
    def from_units(cls, units) -> "LoRAConfig":
        """The config of injected LoRA units [(module path, LoRALinear)] (several inject_lora calls
        included): the most common rank and alpha, exact-path patterns for the others."""
        from .lora import FullLinear
        full = tuple(n for n, u in units if isinstance(u, FullLinear))
        units = [(n, u) for n, u in units if not isinstance(u, FullLinear)]
        if not units:
            raise ValueError(f"the model has fully trained modules {list(full)} but no LoRA layers")
        ranks, alphas = {n: u.r for n, u in units}, {n: u.alpha for n, u in units}
        drops = {u.lora_dropout_p for _, u in units}
        if len(drops) > 1:
            raise ValueError(f"peft has one lora_dropout per adapter, this model uses {sorted(drops)}")
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        a0 = max(set(alphas.values()), key=list(alphas.values()).count)
        return cls(tuple(ranks), r0, a0, {n: r for n, r in ranks.items() if r != r0},
                   {n: a for n, a in alphas.items() if a != a0}, drops.pop(), units[0][1].init,
                   modules_to_save=full)

    def to_peft(self, names: list[str], base_model_name_or_path: str | None = None) -> dict:
        """peft's adapter_config.json for this config injected at the module paths `names` (matched
        exactly by peft; the patterns resolved to those paths)."""
        def alpha(n):
            a = self.alpha_for(n)
            return float(a if a is not None else self.rank_for(n))
        a0 = float(self.alpha if self.alpha is not None else self.r)
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "r": self.r, "lora_alpha": a0, "lora_dropout": self.dropout, "target_modules": sorted(names),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "modules_to_save": sorted(self.modules_to_save) or None,
            "init_lora_weights": True if self.init == "kaiming" else self.init, "inference_mode": True,
            "rank_pattern": {n: self.rank_for(n) for n in sorted(names) if self.rank_for(n) != self.r},
            "alpha_pattern": {n: alpha(n) for n in sorted(names) if alpha(n) != a0},
        }
