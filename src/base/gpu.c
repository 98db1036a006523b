/* gpu.c — GPU discovery front (see strata/gpu.h): forwards to the CUDA probe when built with
 * CUDA, reports "built without CUDA" otherwise. */
#include "strata/gpu.h"

#include "strata/base.h"

#include <stdio.h>

#ifdef STRATA_HAVE_CUDA
int st_cuda_count(char *why, size_t cap);
int st_cuda_describe(int i, char *name, size_t cap, size_t *mem_total, size_t *mem_free);
#endif

int st_gpu_count(char *why, size_t cap) {
#ifdef STRATA_HAVE_CUDA
    return st_cuda_count(why, cap);
#else
    if (why && cap) snprintf(why, cap, "built without CUDA (nvcc was not found at configure time)");
    return 0;
#endif
}

int st_gpu_describe(int i, char *name, size_t cap, size_t *mem_total, size_t *mem_free) {
#ifdef STRATA_HAVE_CUDA
    return st_cuda_describe(i, name, cap, mem_total, mem_free);
#else
    (void)i, (void)name, (void)cap, (void)mem_total, (void)mem_free;
    return -1;
#endif
}

int st_backend_announce(int cpu_threads) {
    static int done = 0, count = 0;
    if (done) return count;
    done = 1;
    char why[256] = "";
    count = st_gpu_count(why, sizeof why);
    const char *simd = st_cpu_has_avx512() ? "AVX-512" : st_cpu_has_avx2() ? "AVX2" : "scalar";
    if (count == 0)
        ST_INFO("backend: CPU (%d threads, %s) - no GPU: %s", cpu_threads, simd, why);
    else {
        char name[256] = "?";
        st_gpu_describe(0, name, sizeof name, NULL, NULL);
        ST_INFO("backend: CPU (%d threads, %s); %d CUDA device(s), first: %s (CUDA kernels are not wired into the "
                "forward pass yet)", cpu_threads, simd, count, name);
    }
    return count;
}
