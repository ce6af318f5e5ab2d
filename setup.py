"""Build script for fastmod.

Builds the extension ``fastmod._C`` from ``csrc/``:
  * the C++ CPU sources (``csrc/**/*.cpp``) always;
  * the CUDA sources (``csrc/**/*.cu``) when torch is a CUDA build and nvcc is
    found.  ``FASTMOD_CUDA=0`` forces them off, ``FASTMOD_CUDA=1`` forces them on
    (and fails loudly if that is impossible).

``FASTMOD_BUILD_EXT=0`` skips the extension altogether (Triton and reference
backends only).

``kernels/`` (Triton) is installed as the subpackage ``fastmod.kernels``.

The extension is compiled against the torch found at build time and is only
ABI-compatible with that exact torch release, so the runtime requirement is
pinned to it (see README, "Installing").
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"error: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_include_dirs(torch):
    # CUDA wheels of torch ship the CUDA runtime headers under
    # site-packages/nvidia/cu13/include; the system toolkit may lack some of them.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]


def _default_cuda_home():
    # torch looks for nvcc on PATH first; a stray /usr/local/bin/nvcc then makes
    # CUDA_HOME=/usr/local, which has no libcudart to link.  Prefer the toolkit.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extensions():
    _default_cuda_home()  # before cpp_extension computes its CUDA_HOME at import
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

    forced = _env_flag("FASTMOD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced and not cuda_possible:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc/CUDA_HOME not found"
        sys.exit(f"error: FASTMOD_CUDA=1 but the CUDA extension cannot be built: {why}")
    with_cuda = cuda_possible if forced is None else forced

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU on the build machine: compile for Ampere and Hopper explicitly.
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    opt = ["-O3"]
    cxx_flags = opt + ["-fopenmp", "-DFASTMOD_WITH_OPENMP"] if sys.platform.startswith("linux") else opt
    extra = {"cxx": cxx_flags}
    define_macros = []
    sources = list(cpu_sources)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += cuda_sources
        define_macros.append(("FASTMOD_WITH_CUDA", None))
        extra["nvcc"] = opt + ["--use_fast_math"]  # the C++ standard comes from torch (C++20 for 2.14)
        include_dirs += _cuda_include_dirs(torch)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(f"fastmod: building fastmod._C with CUDA={'on' if with_cuda else 'off'} "
          f"against torch {torch.__version__}", file=sys.stderr)
    return [
        ext_cls(
            name="fastmod._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    ], cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)


def _torch_requirement():
    import torch

    # The compiled extension only loads into the torch it was built against.
    return f"torch=={torch.__version__.split('+')[0]}"


if _env_flag("FASTMOD_BUILD_EXT") is False:
    # Pure-Python install: Triton kernels and PyTorch references only.
    ext_modules, cmdclass = [], {}
else:
    ext_modules, build_ext = _extensions()
    cmdclass = {"build_ext": build_ext}

setup(
    name="fastmod",
    version="0.1.0",
    description="Custom kernels for modular visual-reasoning networks (LNMN, QGMRN)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmod", "fastmod.*"]) + ["fastmod.kernels"],
    package_dir={"fastmod.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        _torch_requirement(),
        "numpy",
        "h5py",
        "pillow",
        "tqdm",
        "pyyaml",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
        "plots": ["matplotlib"],
    },
)
