// CUDA registration of the routed convolution (compiled only in CUDA builds).
//
// First version: the CUDA path is the shared ATen implementation
// (routed_conv_aten.cpp) on CUDA tensors, i.e. cuDNN convolutions on compacted
// sub-problems that contain the active (sample, block) pairs only (tensor cores for
// fp16/bf16, TF32 as the torch.backends flags allow).  It reads the gates on the
// host once per call (one device-to-host copy = one synchronisation) to size those
// sub-problems; a device-built work list with custom kernels is future work.
//
// There is no device code here, so this is a .cpp compiled by the host compiler.
#ifdef FASTMOD_WITH_CUDA
#include <torch/library.h>

#include "routed_conv/routed_conv.h"

TORCH_LIBRARY_IMPL(fastmod, CUDA, m) {
  m.impl("routed_conv2d", &fastmod::routed_conv::forward);
  m.impl("routed_conv2d_backward", &fastmod::routed_conv::backward);
}
#endif  // FASTMOD_WITH_CUDA
