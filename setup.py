"""Build deer._C: CPU kernels (C++20, as torch 2.14 requires; OpenMP) always; CUDA kernels when torch has CUDA and nvcc is found.

Switches (environment):
  DEER_SKIP_CUDA=1   build the CPU kernels only, even where CUDA is available.
  DEER_FORCE_CUDA=1  fail if the CUDA kernels cannot be built (no nvcc, or a CPU-only torch).
  TORCH_CUDA_ARCH_LIST  architectures to compile for (default "8.0;9.0+PTX": A100 and H100/H200).
  MAX_JOBS           parallel compile jobs (default: cores, capped so each nvcc job has ~3 GiB).
Build with torch already installed:  pip install --no-build-isolation -e .
"""
import glob
import platform
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME must be known before torch.utils.cpp_extension is imported (it reads it once)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvidia_wheel_dirs(sub):
    """Headers/libraries of the nvidia-* wheels that the CUDA torch build installs (nvidia/cu13/...)."""
    out = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        out += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", sub)))
    return [d for d in out if os.path.isdir(d)]


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        avail_kb = int([l for l in open("/proc/meminfo") if l.startswith("MemAvailable")][0].split()[1])
        by_mem = max(1, int(avail_kb / (3 * 1024 * 1024)))  # nvcc peaks near 2-3 GiB per job
    except (OSError, IndexError, ValueError):
        by_mem = 1
    return str(max(1, min(cores, by_mem)))


cuda_home = None if _flag("DEER_SKIP_CUDA") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("MAX_JOBS", _default_max_jobs())
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None and not _flag("DEER_SKIP_CUDA")
if _flag("DEER_FORCE_CUDA") and not with_cuda:
    sys.exit(
        "DEER_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
        f"nvcc found at {cuda_home!r}, torch CUDA version {torch.version.cuda!r}. "
        "Install the CUDA toolkit (nvcc) and a CUDA build of torch, or unset DEER_FORCE_CUDA."
    )

cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
cpp_sources = [s for s in cpp_sources if not s.startswith(os.path.join("csrc", "tests"))]

# -fno-math-errno: deer never reads errno, and without it every std::sqrt carries a branch to set it,
# which keeps loops (the fused optimizer step's) from vectorising.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
define_macros = []
include_dirs = [os.path.join(ROOT, "csrc")]
library_dirs = []
# glibc's vector math library: the AVX2 / AVX-512 Box-Muller of csrc/clip_reduce_noise/philox_normals_cpu.cpp.
_libmvec = sys.platform.startswith("linux") and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"
link_args = ["-fopenmp"] + (["-lmvec"] if _libmvec else [])
if with_cuda:
    define_macros.append(("DEER_WITH_CUDA", "1"))
    include_dirs += _nvidia_wheel_dirs("include")
    library_dirs += _nvidia_wheel_dirs("lib")
    ext = CUDAExtension(
        "deer._C",
        cpp_sources + cu_sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=link_args,
    )
else:
    ext = CppExtension(
        "deer._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )
print(f"[deer build] CUDA kernels: {'yes (CUDA_HOME=' + cuda_home + ')' if with_cuda else 'no'}; "
      f"MAX_JOBS={os.environ['MAX_JOBS']}; arch={os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'}")

setup(
    package_dir={"": "python", "deer_kernels": "deer_kernels"},
    packages=find_packages("python") + ["deer_kernels"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_data={"deer": ["configs/*.yaml"]},
)
