"""Lazy access to the compiled extension deer._C.

`import deer` must work on a machine where the extension was not built (docs, a CPU-only wheel
being inspected, a broken toolchain). Only a call that needs a compiled kernel loads it, and if it
is missing the error names the command that builds it.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

BUILD_HINT = (
    "deer's compiled extension deer._C is not available. Build it from the repository root with\n"
    "    bash scripts/setup.sh\n"
    "or, inside an environment that already has torch:\n"
    "    pip install --no-build-isolation -e .\n"
    "(set DEER_SKIP_CUDA=1 to build the CPU kernels only). Alternatively use the pure-PyTorch "
    "backend with DEER_BACKEND=reference."
)


class ExtensionUnavailable(RuntimeError):
    """Raised when a kernel needs deer._C and it cannot be imported."""


@lru_cache(maxsize=1)
def load():
    """Import deer._C (registers torch.ops.deer.*) or raise ExtensionUnavailable with the build command."""
    try:
        return importlib.import_module("deer._C")
    except ImportError as e:  # missing file, or built against another torch (undefined symbols)
        raise ExtensionUnavailable(f"{BUILD_HINT}\n(import error: {e})") from e


def available() -> bool:
    try:
        load()
        return True
    except ExtensionUnavailable:
        return False


def compiled_backends() -> list[str]:
    """'cpu' and possibly 'cuda', as compiled into deer._C; [] when the extension is missing."""
    try:
        return list(load().compiled_backends())
    except ExtensionUnavailable:
        return []
