// CPU registration: the ATen implementation in routed_conv_aten.cpp, which runs
// oneDNN convolutions on the compacted active blocks only.
#include <torch/library.h>

#include "routed_conv/routed_conv.h"

TORCH_LIBRARY_IMPL(fastmod, CPU, m) {
  m.impl("routed_conv2d", &fastmod::routed_conv::forward);
  m.impl("routed_conv2d_backward", &fastmod::routed_conv::backward);
}
