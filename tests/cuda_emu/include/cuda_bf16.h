// tests/cuda_emu: the CUDA 16-bit type is c10's (same bits), for the WMMA emulation.
#pragma once
#include <c10/util/BFloat16.h>
using __nv_bfloat16 = c10::BFloat16;
