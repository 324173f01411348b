"""LoRA layers with per-sample gradient capture for DP training, and tools to inject them."""
from .lora import (QKV_SLICES, FullLinear, LoRAConv2d, LoRAEmbedding, LoRAFactors, LoRALinear, LoRAQKV, lora_layers,  # noqa: F401
                   lora_units)
from .config import LoRAConfig  # noqa: F401
from .mha import LinearMultiheadAttention  # noqa: F401
from .from_peft import from_peft  # noqa: F401
from .inject import (LoRAState, NoLoRALayersError, get_lora_state, get_phase, inject_lora,  # noqa: F401
                     lora_key, set_lora_state, set_phase)

__all__ = ["LoRAConfig", "LoRAFactors", "LoRALinear", "LoRAConv2d", "LoRAEmbedding", "FullLinear", "LoRAQKV", "QKV_SLICES", "lora_layers", "lora_units",
           "inject_lora", "set_phase", "get_phase", "get_lora_state", "set_lora_state", "lora_key", "LoRAState",
           "NoLoRALayersError", "LinearMultiheadAttention", "from_peft"]
