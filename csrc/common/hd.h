// Host/device portability macros, defined once for every header that the CPU kernels, the CUDA
// kernels and the CPU grid emulator of the CUDA kernels (cpu/cuda_emulation.cpp) share.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
// A function compiled for both the GPU and the host: the CUDA kernels and their CPU emulation run
// the same source.
#define DAWIN_HD __host__ __device__ __forceinline__
#else
#define DAWIN_HD inline
#endif

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__clang__)
#define DAWIN_UNROLL _Pragma("unroll")
#else
#define DAWIN_UNROLL _Pragma("GCC unroll 16")
#endif
