/* calib.c — what a CPU node can really stream through a decode matvec.
 *
 * The planner predicts a stage's decode time as bytes read / bandwidth. A CPU decode step is
 * a chain of matrix-vector products; how fast those read their weights depends on the kernel
 * (bf16 widening, dequantizing MLX 4-bit groups) and the thread count, not only on the DRAM
 * — a plain read sum overstates or understates it. So a node times the CPU backend's own
 * linear op (cpu_linear, T = 1: the decode path) over a matrix larger than any cache, once for
 * bf16 weights and once for MLX 4-bit g64, and reports bytes / second of each (the median of
 * a few runs: the machine may be shared). */
#include "calib.h"

#include "backend/cpu/cpu_ops.h"
#include "strata/pool.h"

#include <stdlib.h>
#include <string.h>

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Times cpu_linear(T = 1) over one [rows, cols] weight w of `bytes` bytes, `reps` times after
 * one warm-up; returns the median bytes / second (0 on failure). The median, not the best:
 * a shared machine's decode runs at its typical rate, not at its luckiest. */
static double time_linear(st_pool *pool, int threads, const wt_linear *w, size_t bytes, int reps) {
    cpu_scratch sc;
    if (reps < 1) reps = 1;
    if (reps > 64) reps = 64;
    if (cpu_scratch_init(&sc, threads, (size_t)w->cols, 1, 0)) return 0;
    float *x = st_alloc_aligned((size_t)w->cols * 4), *y = st_alloc_aligned((size_t)w->rows * 4);
    double rate[64], med = 0;
    if (x && y) {
        for (int64_t i = 0; i < w->cols; i++) x[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
        for (int r = -1; r < reps; r++) {
            uint64_t t0 = st_time_ns();
            cpu_linear(pool, &sc, y, x, w, 1);
            double s = (double)(st_time_ns() - t0) * 1e-9;
            if (r >= 0) rate[r] = s > 0 ? (double)bytes / s : 0;
        }
        qsort(rate, (size_t)reps, sizeof rate[0], cmp_dbl);
        med = reps % 2 ? rate[reps / 2] : 0.5 * (rate[reps / 2 - 1] + rate[reps / 2]);
    }
    st_free_aligned(x), st_free_aligned(y);
    cpu_scratch_free(&sc);
    return med;
}

int calib_matvec(int threads, size_t bytes, int reps, calib_result *out) {
    memset(out, 0, sizeof *out);
    st_pool *pool = st_pool_init(threads > 0 ? threads : st_cpu_count());
    if (!pool) return ST_ERR_NOMEM;
    const int64_t cols = 4096;
    /* bf16: rows x cols x 2 bytes */
    int64_t rows = (int64_t)(bytes / ((size_t)cols * 2));
    if (rows < 64) rows = 64;
    size_t nb = (size_t)rows * (size_t)cols * 2;
    uint16_t *wb = st_alloc_aligned(nb);
    if (wb) {
        for (size_t i = 0; i < nb / 2; i++) wb[i] = (uint16_t)(0x3c00u + (i * 2654435761u >> 20 & 0x3ff)) ^ (i & 1 ? 0x8000u : 0);
        wt_linear w = {.dtype = SFT_BF16, .rows = rows, .cols = cols, .w = wb, .row_bytes = (size_t)cols * 2};
        out->bf16_bytes_s = time_linear(pool, st_pool_threads(pool), &w, nb, reps);
        st_free_aligned(wb);
    }
    /* MLX affine 4-bit, group 64: packed u32 + bf16 scales and biases per group */
    const int bits = 4, group = 64;
    size_t row_q = (size_t)cols * bits / 8, row_s = (size_t)cols / group;
    rows = (int64_t)(bytes / (row_q + 4 * row_s));
    if (rows < 64) rows = 64;
    size_t nq = (size_t)rows * row_q, ns = (size_t)rows * row_s * 2;
    uint32_t *wq = st_alloc_aligned(nq);
    uint16_t *sc = st_alloc_aligned(ns), *bi = st_alloc_aligned(ns);
    if (wq && sc && bi) {
        for (size_t i = 0; i < nq / 4; i++) wq[i] = (uint32_t)(i * 2654435761u);
        for (size_t i = 0; i < ns / 2; i++) sc[i] = 0x3c00, bi[i] = 0xbc00;
        wt_linear w = {.qbits = bits, .group = group, .sdtype = SFT_BF16, .rows = rows, .cols = cols, .w = wq,
                       .scales = sc, .biases = bi, .row_bytes = row_q, .srow_elems = row_s};
        out->q4_bytes_s = time_linear(pool, st_pool_threads(pool), &w, nq + 2 * ns, reps);
    }
    st_free_aligned(wq), st_free_aligned(sc), st_free_aligned(bi);
    st_pool_free(pool);
    return 0;
}
