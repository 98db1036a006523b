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

/* Prints new/old ratios of the numeric metrics against an earlier report.json. */
int bench_compare(const bench_result *r, const char *old_json_path, FILE *f, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
