"""The extension was built the way setup.py promises."""
import os

import pytest
import torch

from fastmod import _extension


def test_extension_loads():
    assert _extension.load(), f"fastmod._C failed to load: {_extension.error()}"
    for op in ("mixed_node_fwd", "gumbel_sigmoid_gate", "routed_conv2d"):
        assert _extension.has_op(op, "CPU"), op


@pytest.mark.skipif(torch.version.cuda is None or os.environ.get("FASTMOD_CUDA") == "0",
                    reason="CPU-only torch, or CUDA build switched off")
def test_cuda_sources_compiled_with_a_cuda_torch():
    # CI installs a CUDA build of torch precisely so that the CUDA sources are compiled.
    assert _extension.cuda_compiled()
    assert _extension.has_op("routed_conv2d", "CUDA")
