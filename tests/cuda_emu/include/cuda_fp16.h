// tests/cuda_emu: the CUDA 16-bit type is c10's (same bits), for the WMMA emulation.
#pragma once
#include <c10/util/Half.h>
using __half = c10::Half;
