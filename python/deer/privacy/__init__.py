"""Differential privacy for LoRA: the Opacus-like PrivacyEngine, clipping, keyed noise, the
accountant and peft-compatible adapter checkpoints."""
from .engine import (DPLoRAOptimizer, PrivacyBudgetExceeded, PrivacyEngine, make_accountant,  # noqa: F401
                     make_private, noise_multiplier_for)
from .checkpoint import load_adapter, save_adapter  # noqa: F401

__all__ = ["PrivacyEngine", "make_private", "DPLoRAOptimizer", "PrivacyBudgetExceeded", "make_accountant", "noise_multiplier_for",
           "save_adapter", "load_adapter"]

try:  # the accountant module is optional for the engine (it falls back to Opacus' accountants)
    from .accountant import DeerAccountant  # noqa: F401
    __all__.append("DeerAccountant")
except (ImportError, AttributeError):
    pass
