/* strata/gpu.h — GPU discovery. Built with CUDA when nvcc was found at configure time; at run
 * time a missing driver or device falls back to the CPU backend with one line on stderr. */
#ifndef STRATA_GPU_H
#define STRATA_GPU_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices (0 when built without CUDA or when no driver/device is
 * present); on 0 writes the reason into why[cap]. Never fails otherwise. */
int st_gpu_count(char *why, size_t cap);

/* Name and memory of device i into name[cap]; returns 0 or -1. */
int st_gpu_describe(int i, char *name, size_t cap, size_t *mem_total, size_t *mem_free);

/* Prints the one-line backend choice ("strata: backend: CPU (2 threads, AVX2) — no CUDA
 * device: ...") to stderr at info level, once per process. Returns the GPU count. */
int st_backend_announce(int cpu_threads);

#ifdef __cplusplus
}
#endif
#endif
