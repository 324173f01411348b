"""Differential privacy for LoRA: the mechanism, the one private release, the Opacus-like
PrivacyEngine, the accountant and peft-compatible adapter checkpoints."""
from .accountant import DeerAccountant, noise_multiplier_for  # noqa: F401
from .checkpoint import load_adapter, save_adapter  # noqa: F401
from .engine import DPLoRAOptimizer, PrivacyBudgetExceeded, PrivacyEngine, make_private  # noqa: F401
from .mechanism import LAM, PRESETS, Mechanism, mechanism  # noqa: F401

__all__ = ["PrivacyEngine", "make_private", "DPLoRAOptimizer", "PrivacyBudgetExceeded", "DeerAccountant",
           "noise_multiplier_for", "Mechanism", "mechanism", "PRESETS", "LAM", "save_adapter", "load_adapter"]
