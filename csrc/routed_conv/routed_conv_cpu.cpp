// CPU registration: forward()/backward() of routed_conv_aten.cpp (the direct kernels
// where they apply, oneDNN on the compacted active blocks otherwise).
#include <torch/library.h>

#include "routed_conv/routed_conv.h"

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("routed_conv2d", &fastmod::routed_conv::forward);
  m.impl("routed_conv2d_backward", &fastmod::routed_conv::backward);
}
