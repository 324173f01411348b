"""deer: fast, honest differentially private (federated) LoRA fine-tuning (DEeR, arXiv 2410.12926).

Importing deer never touches CUDA and never needs the compiled extension; kernels load it lazily
(see deer._ext) and fall back to, or are checked against, the float64 reference (deer.reference).
"""
__version__ = "0.1.0"

from . import reference  # noqa: F401  (pure PyTorch, always available)

__all__ = ["reference", "__version__"]
