/* calib.h — a CPU node's decode matvec rate (private to src/cluster; see calib.c). */
#ifndef STRATA_CALIB_H
#define STRATA_CALIB_H

#include "strata/base.h"

#include <stddef.h>

typedef struct calib_result {
    double bf16_bytes_s;  /* bf16 weights streamed by cpu_linear(T = 1), bytes/s (0 = unknown) */
    double q4_bytes_s;    /* MLX 4-bit g64 weights (packed + scales + biases), bytes/s        */
} calib_result;

/* Times the CPU backend's decode linear with `threads` threads over weights of about `bytes`
 * bytes per format (larger than the caches), the median of `reps`. Returns 0 (figures that could
 * not be measured are 0) or ST_ERR_NOMEM. Allocates and frees its buffers. */
int calib_matvec(int threads, size_t bytes, int reps, calib_result *out);

#endif
