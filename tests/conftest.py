"""Test setup.  Without a GPU, Triton kernels run in Triton's CPU interpreter:
TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at collection time, before fastmod is imported."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastmod  # noqa: E402,F401
from fastmod import backends  # noqa: E402


def kernel_devices_and_backends(op, cpp_op, implemented):
    """(device, backend) pairs that can run on this machine for an op."""
    pairs = []
    for dev in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        d = torch.device(dev)
        for b in implemented:
            if backends.available(b, d, cpp_op if b in ("cpu", "cuda") else None):
                pairs.append((dev, b))
    return pairs


@pytest.fixture(autouse=True)
def _seed_and_full_fp32():
    torch.manual_seed(0)
    # fp32 means fp32 in comparisons against references: TF32 convolutions and
    # matmuls (on by default for cuDNN) differ from each other by ~1e-3.
    cudnn_tf32, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.set_float32_matmul_precision(matmul)


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_runtest_logreport(report):
    """With FASTMOD_FAIL_LOG set, append each failure (node id and traceback) to that
    file as it happens: a GPU run cut by its time limit (pytest-xdist prints failures
    only at the end) still names what failed."""
    path = os.environ.get("FASTMOD_FAIL_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
