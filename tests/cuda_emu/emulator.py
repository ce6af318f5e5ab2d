"""Build fastmod's routed-conv CUDA source as a CPU library (torch.ops.fastmod_emu).

csrc/routed_conv/routed_conv_cuda.cu is copied with its kernel launches
(``kernel<<<grid, threads, 0, stream>>>(args)``) rewritten to ``emu_launch(kernel,
grid, threads, args)`` and its CUDA-only includes dropped; shim.h (force-included)
and include/ (fake cuda_fp16.h, cuda_bf16.h, mma.h) stand in for the CUDA runtime.
The same host code, work list, tiling and kernels then run on CPU tensors, so the
index math can be checked against the reference on a machine without a GPU.  It
says nothing about timing, inter-CTA races or real WMMA fragment layouts.
"""
from __future__ import annotations

import os
import re
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
CUDA_ONLY_INCLUDES = ("#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAException.h>",
                      "#include <c10/cuda/CUDAGuard.h>")
LAUNCH = re.compile(r"(kern::[\w:]+(?:<[^<>]*>)?)<<<([^,]+), ([^,]+), 0, stream>>>\(")
REGISTRATION = "TORCH_LIBRARY_IMPL(fastmod, CUDA, m)"
EMU_LIBRARY = """TORCH_LIBRARY(fastmod_emu, m) {
  m.def("routed_conv2d(Tensor x, Tensor weight, Tensor gates, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, str gate_on, bool exact) -> Tensor",
        &fastmod::routed_conv::forward_cuda);
  m.def("routed_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor gates, "
        "Tensor? bias, Tensor? out, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "str gate_on, bool[4] output_mask, bool exact) -> (Tensor, Tensor, Tensor, Tensor)",
        &fastmod::routed_conv::backward_cuda);
  m.def("mma_calls() -> int", []() -> int64_t { return emu_mma_calls.load(); });
}
"""


def emulated_source() -> str:
    with open(os.path.join(CSRC, "routed_conv", "routed_conv_cuda.cu")) as f:
        src = f.read()
    for inc in CUDA_ONLY_INCLUDES:
        if inc not in src:
            raise RuntimeError(f"emulator out of date: {inc!r} not in routed_conv_cuda.cu")
        src = src.replace(inc, "")
    src, launches = LAUNCH.subn(r"emu_launch(\1, \2, \3, ", src)
    if launches == 0 or "<<<" in src:
        raise RuntimeError("emulator out of date: a kernel launch was not rewritten")
    head, sep, _ = src.partition(REGISTRATION)
    if not sep:
        raise RuntimeError("emulator out of date: no CUDA registration block found")
    return head + '#include <mma.h>\n' + EMU_LIBRARY


def host_sources() -> list[str]:
    """csrc/routed_conv/*.cpp minus the op registrations (the emulator registers its own
    library; fastmod._C may be loaded in the same process): parse_mode, check_inputs."""
    out = []
    for name in sorted(os.listdir(os.path.join(CSRC, "routed_conv"))):
        path = os.path.join(CSRC, "routed_conv", name)
        if name.endswith(".cpp") and "TORCH_LIBRARY" not in open(path).read():
            out.append(path)
    return out


def load():
    """Compile (cached by torch.utils.cpp_extension) and load; returns torch.ops.fastmod_emu."""
    from torch.utils import cpp_extension

    build = os.path.join(tempfile.gettempdir(), "fastmod_cuda_emu")
    os.makedirs(build, exist_ok=True)
    src = os.path.join(build, "routed_conv_cuda_emu.cpp")
    text = emulated_source()
    if not os.path.exists(src) or open(src).read() != text:  # keep ninja's cache when unchanged
        with open(src, "w") as f:
            f.write(text)
    cpp_extension.load(
        name="fastmod_cuda_emu",
        sources=[src] + host_sources(),
        # include/ first: its fake CUDA headers; csrc for the real kernel headers.
        extra_include_paths=[os.path.join(HERE, "include"), CSRC],
        extra_cflags=["-O1", "-include", os.path.join(HERE, "shim.h"),
                      "-Wno-unknown-pragmas", "-DFASTMOD_WITH_CUDA"],
        build_directory=build, is_python_module=False, verbose=False)
    return torch.ops.fastmod_emu
