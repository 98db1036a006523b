/* decode_steps.c — the stepping loop of concurrent decode benchmarks (see strata/bench.h):
 * n sequences advanced together, their rows submitted in groups a batched decode call takes. */
#include "strata/bench.h"

int bench_decode_steps(bench_decode_fn fn, void *ctx, int n, int max_rows, int steps, int32_t *cur, int32_t *pos,
                       int32_t *scratch, double *step_ms, int32_t *log0, st_progress *pr, st_err *err) {
    if (n < 1 || max_rows < 1 || steps < 0)
        return st_err_set(err, ST_ERR_ARG, "decode steps: %d sequences, %d rows per call, %d steps", n, max_rows, steps);
    ST_ASSERT(fn && cur && pos && scratch);
    int32_t *slot = scratch, *next = scratch + n; /* [n] each */
    for (int i = 0; i < n; i++) slot[i] = i;
    for (int s = 0; s < steps; s++) {
        const uint64_t t0 = st_time_ns();
        for (int i = 0; i < n; i += max_rows) {
            const int B = n - i < max_rows ? n - i : max_rows;
            int rc = fn(ctx, cur + i, pos + i, slot + i, B, next + i, err);
            if (rc) return rc;
        }
        /* after every group: on a failure cur/pos still describe the last complete step */
        for (int i = 0; i < n; i++) cur[i] = next[i], pos[i] += 1;
        if (step_ms) step_ms[s] = (double)(st_time_ns() - t0) * 1e-6;
        if (log0) log0[s] = next[0];
        if (pr) st_progress_update(pr, s + 1);
    }
    return ST_OK;
}
