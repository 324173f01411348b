"""LoRA layers with per-sample gradient capture for DP training."""
from .lora import LoRALinear, lora_layers  # noqa: F401
