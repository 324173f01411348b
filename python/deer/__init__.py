"""deer: fast, honest differentially private (federated) LoRA fine-tuning (DEeR, arXiv 2410.12926).

Importing deer never touches CUDA and never needs the compiled extension; kernels load it lazily
(see deer._ext) and fall back to, or are checked against, the float64 reference (deer.reference).
The drop-in API below is resolved on first use, so `import deer` stays cheap (Opacus, peft and
timm are imported only when a name that needs them is touched).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import losses, reference  # noqa: F401,E402  (pure PyTorch, always available)

# public name -> submodule that defines it
_LAZY = {
    "inject_lora": "nn", "set_phase": "nn", "get_phase": "nn", "get_lora_state": "nn",
    "set_lora_state": "nn", "LoRALinear": "nn", "LoRAQKV": "nn", "NoLoRALayersError": "nn", "LoRAConfig": "nn",
    "from_peft": "nn",
    "PrivacyEngine": "privacy", "make_private": "privacy", "DPLoRAOptimizer": "privacy",
    "PrivacyBudgetExceeded": "privacy", "save_adapter": "privacy", "load_adapter": "privacy",
}

__all__ = ["losses", "reference", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
