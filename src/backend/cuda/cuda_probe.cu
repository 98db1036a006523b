// cuda_probe.cu — CUDA device discovery (see strata/gpu.h). The CUDA backend's kernels live
// beside this file; a machine without a driver or device reports 0 devices and the reason.
#include "strata/gpu.h"

#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int st_cuda_count(char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && cap) snprintf(why, cap, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return 0;
    }
    if (n == 0 && why && cap) snprintf(why, cap, "no CUDA device");
    return n;
}

extern "C" int st_cuda_describe(int i, char *name, size_t cap, size_t *mem_total, size_t *mem_free) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) return -1;
    if (name && cap) snprintf(name, cap, "%s (sm_%d%d)", p.name, p.major, p.minor);
    size_t fr = 0, tot = 0;
    int prev = 0;
    cudaGetDevice(&prev);
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&fr, &tot) == cudaSuccess) {
        if (mem_total) *mem_total = tot;
        if (mem_free) *mem_free = fr;
    }
    cudaSetDevice(prev);
    return 0;
}
