/* strata/bench.h — benchmark metrics and the report (the seed's table and more).
 *
 * The metric functions are pure (tested on synthetic timings); cmd_bench.c runs the model and
 * fills a bench_result.
 */
#ifndef STRATA_BENCH_H
#define STRATA_BENCH_H

#include "strata/base.h"
#include "strata/model.h"
#include "strata/pool.h"

#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bench_result {
    /* what ran */
    char model[256];
    char machine[256];
    char backend[128];
    char quant[64];
    char flags[256];
    int threads;
    int prompt_tokens, gen_tokens, concurrency;
    int64_t params;               /* stored parameters bound                               */
    double weight_bytes;          /* bytes of weights as stored                            */
    /* speed */
    double ttft_s;                /* prompt prefill + first token                          */
    double prefill_tok_s;
    double decode_tok_s;          /* single stream: 1 / mean inter-token time              */
    double lat_p50_ms, lat_p90_ms, lat_p99_ms, lat_mean_ms;
    double aggregate_tok_s;       /* with `concurrency` sequences decoding together          */
    /* overhead and residency */
    double orch_us_per_token;     /* wall time per token outside the forward pass's kernels */
    double residency_cpu;         /* busy share of the CPU pool's threads during decode      */
    /* bandwidth */
    double bytes_per_token;       /* weights touched + KV read per decoded token             */
    double mem_bw_gbs;            /* measured read bandwidth                                 */
    double mbu;                   /* bytes_per_token / time per token / bandwidth            */
    /* context */
    int64_t max_ctx_target;       /* the model's max_position_embeddings                     */
    int64_t max_ctx_stable;       /* context allocated, filled and decoded at                */
    double kv_bytes;              /* KV cache allocation for that context                    */
    double lat_at_max_ctx_ms;     /* decode latency at the end of the full context           */
    char max_ctx_note[256];
    /* planner */
    double predicted_tok_s;       /* 0 when no prediction                                    */
    /* prefill compute (CUDA): FLOP rate of the prefill vs the device's measured matrix rate  */
    double prefill_tflops;        /* prefill FLOP / TTFT, TFLOP/s (0: not measured)          */
    double matrix_tflops;         /* measured bf16 GEMM rate, TFLOP/s (0: not measured)      */
    char prefill_note[256];       /* how the FLOP were counted                               */
    /* concurrent decode (CUDA, --concurrency N >= 2): wall time of one step that advances every
     * sequence by one token; how the sequences were started and submitted */
    double agg_step_p50_ms;       /* 0: not measured this way                                */
    char agg_note[256];
} bench_result;

/* p-th percentile (0..100) of n values by linear interpolation between order statistics
 * (numpy's default). v is sorted in place. n == 0 -> 0. */
double bench_percentile(double *v, size_t n, double p);

/* Model-bandwidth utilisation: (bytes / seconds) / bandwidth; 0 if any input is <= 0. */
double bench_mbu(double bytes_per_token, double sec_per_token, double bw_bytes_per_s);

/* Bytes a single decoded token must read: every weight of dense layers, attention + router +
 * n_expert_used/n_expert of the expert weights of MoE layers, the output layer and one
 * embedding row, plus the KV cache read at context length `ctx` with kv_elem bytes per
 * element. */
double bench_bytes_per_token(const model *m, int64_t ctx, size_t kv_elem);

/* Measures read bandwidth (bytes/s) with all pool threads summing a buffer of `bytes`
 * (best of `reps`). Returns 0 if the buffer cannot be allocated. */
double bench_measure_bandwidth(st_pool *pool, size_t bytes, int reps);

/* Residency: busy thread-ns / (wall ns * threads), clamped to [0, 1]. */
double bench_residency(uint64_t busy_ns, uint64_t wall_ns, int threads);

/* Writes the seed-style table (metric | value | notes) as markdown / the result as JSON. */
int bench_write_md(const bench_result *r, const char *path, st_err *err);
int bench_write_json(const bench_result *r, const char *path, st_err *err);
void bench_print_table(const bench_result *r, FILE *f);

/* One greedy decode step of B rows (a backend's batched decode, e.g. cuda_model_decode_greedy):
 * tokens[b] at pos[b] of slot[b] -> next[b]. Returns 0 or an ST_ERR_* code with err set. */
typedef int (*bench_decode_fn)(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int B,
                               int32_t *next, st_err *err);

/* Advances n sequences (sequence i in slot i with token cur[i] at position pos[i]) by `steps`
 * tokens: each step submits the rows in ceil(n / max_rows) calls of fn (rows i..i+max_rows-1,
 * the last call the remainder), then every sequence's id becomes its token and its position
 * advances by one. cur[n], pos[n] are updated in place (after a failure they hold the last
 * complete step); scratch[2 n] (slots and ids) belongs to the caller, so nothing is allocated.
 * step_ms[steps] (may be NULL) receives the wall time of each step, log0[steps] (may be NULL)
 * sequence 0's ids, pr (may be NULL) one update per step. ST_ERR_ARG for n < 1, max_rows < 1,
 * steps < 0; otherwise fn's first failure (err set by fn), the remaining rows not submitted. */
int bench_decode_steps(bench_decode_fn fn, void *ctx, int n, int max_rows, int steps, int32_t *cur, int32_t *pos,
                       int32_t *scratch, double *step_ms, int32_t *log0, st_progress *pr, st_err *err);

/* Prints new/old ratios of the numeric metrics against an earlier report.json. */
int bench_compare(const bench_result *r, const char *old_json_path, FILE *f, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
