import os
import sys

import pytest
import torch

# Triton kernels run through the interpreter on machines without a GPU (CI): the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # deer_kernels lives at the repository root
    sys.path.insert(0, ROOT)


@pytest.fixture
def gen():
    """A generator seeded from OS entropy: fresh random inputs on every run (seed: gen.initial_seed())."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.fixture
def one_thread():
    """One intra-op thread for the tests of tiny models (the fed engine, CLI, Flower): on a 2-core
    machine it is several times faster. Kernel tests keep torch's default so OpenMP paths run threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
