/* report.c — benchmark metrics and report writers (see strata/bench.h). */
#include "strata/bench.h"

#include <immintrin.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bench_percentile(double *v, size_t n, double p) {
    if (!n) return 0;
    qsort(v, n, sizeof *v, cmp_double);
    if (p <= 0) return v[0];
    if (p >= 100) return v[n - 1];
    double r = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(r);
    double f = r - (double)lo;
    return lo + 1 < n ? v[lo] + f * (v[lo + 1] - v[lo]) : v[lo];
}

double bench_mbu(double bytes_per_token, double sec_per_token, double bw) {
    if (bytes_per_token <= 0 || sec_per_token <= 0 || bw <= 0) return 0;
    return bytes_per_token / sec_per_token / bw;
}

double bench_residency(uint64_t busy_ns, uint64_t wall_ns, int threads) {
    if (!wall_ns || threads <= 0) return 0;
    double r = (double)busy_ns / ((double)wall_ns * threads);
    return r < 0 ? 0 : r > 1 ? 1 : r;
}

double bench_bytes_per_token(const model *m, int64_t ctx, size_t kv_elem) {
    const model_desc *d = &m->desc;
    double b = 0;
    for (int l = m->layer_begin; l < m->layer_end; l++) {
        const layer_weights *L = &m->layers[l];
        b += (double)(wt_linear_bytes(&L->wq) + wt_linear_bytes(&L->wk) + wt_linear_bytes(&L->wv) + wt_linear_bytes(&L->wo));
        if (!d->layer_moe[l]) {
            b += (double)(wt_linear_bytes(&L->w_gate) + wt_linear_bytes(&L->w_up) + wt_linear_bytes(&L->w_down));
        } else {
            double ex = 0;
            for (int e = 0; e < d->n_expert; e++)
                ex += (double)(wt_linear_bytes(&L->exp_gate[e]) + wt_linear_bytes(&L->exp_up[e]) + wt_linear_bytes(&L->exp_down[e]));
            b += (double)wt_linear_bytes(&L->router) + ex * d->n_expert_used / d->n_expert;
        }
    }
    if (m->holds_output) b += (double)wt_linear_bytes(&m->output);
    if (m->holds_embed) b += (double)wt_linear_bytes(&m->embed) / (double)m->embed.rows;
    b += (double)ctx * (double)model_desc_kv_bytes_per_token(d, kv_elem) * (m->layer_end - m->layer_begin);
    return b;
}

typedef struct bw_job {
    const uint64_t *buf;
    size_t n;      /* u64 words */
    uint64_t sums[256];
} bw_job;

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256(), c = _mm256_setzero_si256(), d = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(p + i + 4)));
        c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i *)(p + i + 8)));
        d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i *)(p + i + 12)));
    }
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    uint64_t o[4];
    _mm256_storeu_si256((__m256i *)o, a);
    return o[0] ^ o[1] ^ o[2] ^ o[3];
}

static void bw_task(void *ctx, int task, int n_tasks, int thread) {
    bw_job *j = ctx;
    size_t per = (j->n / (size_t)n_tasks) & ~(size_t)15;
    const uint64_t *p = j->buf + per * (size_t)task;
    j->sums[task & 255] ^= st_cpu_has_avx2() ? sum_avx2(p, per) : p[0];
}

double bench_measure_bandwidth(st_pool *pool, size_t bytes, int reps) {
    uint64_t *buf = st_alloc_aligned(bytes);
    if (!buf) return 0;
    size_t n = bytes / 8;
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    bw_job j = {buf, n, {0}};
    int tasks = st_pool_threads(pool);
    double best = 0;
    for (int r = 0; r < reps; r++) {
        uint64_t t0 = st_time_ns();
        st_pool_run(pool, bw_task, &j, tasks);
        double s = (double)(st_time_ns() - t0) * 1e-9;
        double bw = (double)((n / (size_t)tasks) & ~(size_t)15) * 8.0 * tasks / s;
        if (bw > best) best = bw;
    }
    st_free_aligned(buf);
    return best;
}

/* ------------------------------------------------------------------------------------------ */
/* writers */

static json_t *to_json(const bench_result *r) {
    return json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:i,s:i,s:i,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I,s:f,s:f,s:s,s:f}",
                     "model", r->model, "machine", r->machine, "backend", r->backend, "quant", r->quant, "flags", r->flags,
                     "threads", r->threads, "prompt_tokens", r->prompt_tokens, "gen_tokens", r->gen_tokens,
                     "concurrency", r->concurrency, "params", (json_int_t)r->params, "weight_bytes", r->weight_bytes,
                     "ttft_s", r->ttft_s, "prefill_tok_s", r->prefill_tok_s, "decode_tok_s", r->decode_tok_s,
                     "lat_p50_ms", r->lat_p50_ms, "lat_p90_ms", r->lat_p90_ms, "lat_p99_ms", r->lat_p99_ms,
                     "lat_mean_ms", r->lat_mean_ms, "aggregate_tok_s", r->aggregate_tok_s, "orch_us_per_token",
                     r->orch_us_per_token, "residency_cpu", r->residency_cpu, "bytes_per_token", r->bytes_per_token,
                     "mem_bw_gbs", r->mem_bw_gbs, "mbu", r->mbu, "predicted_tok_s", r->predicted_tok_s,
                     "max_ctx_target", (json_int_t)r->max_ctx_target, "max_ctx_stable", (json_int_t)r->max_ctx_stable,
                     "kv_bytes", r->kv_bytes, "lat_at_max_ctx_ms", r->lat_at_max_ctx_ms, "max_ctx_note", r->max_ctx_note,
                     "unused", 0.0);
}

/* to_json plus the fields added after the seed's set (appended, so older readers ignore them) */
static json_t *to_json_all(const bench_result *r) {
    json_t *j = to_json(r);
    if (j && r->matrix_tflops > 0) {
        json_object_set_new(j, "prefill_tflops", json_real(r->prefill_tflops));
        json_object_set_new(j, "matrix_tflops", json_real(r->matrix_tflops));
    }
    if (j && r->agg_step_p50_ms > 0) {
        json_object_set_new(j, "agg_step_p50_ms", json_real(r->agg_step_p50_ms));
        json_object_set_new(j, "agg_note", json_string(r->agg_note));
    }
    return j;
}

int bench_write_json(const bench_result *r, const char *path, st_err *err) {
    json_t *j = to_json_all(r);
    if (!j) return st_err_set(err, ST_ERR_NOMEM, "cannot build report JSON");
    json_object_del(j, "unused");
    int rc = json_dump_file(j, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER) ? st_err_set(err, ST_ERR_IO, "%s: cannot write", path) : ST_OK;
    json_decref(j);
    return rc;
}

static void table(const bench_result *r, FILE *f) {
    char b1[32], b2[32];
    fprintf(f, "| Metric | Value | Notes |\n| :--- | :--- | :--- |\n");
    fprintf(f, "| **Token Latency** (p50 / p90 / p99) | **%.2f ms** / %.2f / %.2f ms | decode, inter-token, 1 stream, %d tokens |\n",
            r->lat_p50_ms, r->lat_p90_ms, r->lat_p99_ms, r->gen_tokens);
    fprintf(f, "| **Orchestration** | **%.1f us/token** | wall time per token outside the forward pass's kernels |\n",
            r->orch_us_per_token);
    fprintf(f, "| **Tokens Per Second** | **%.1f TPS** | single stream decode |\n", r->decode_tok_s);
    if (r->concurrency > 1 && r->agg_step_p50_ms > 0)
        fprintf(f, "| **Aggregate TPS** | **%.1f TPS** | %d sequences decoding together, step p50 %.2f ms; %s |\n",
                r->aggregate_tok_s, r->concurrency, r->agg_step_p50_ms, r->agg_note);
    else if (r->concurrency > 1)
        fprintf(f, "| **Aggregate TPS** | **%.1f TPS** | %d sequences decoding together |\n", r->aggregate_tok_s,
                r->concurrency);
    if (r->threads > 0)
        fprintf(f, "| **CPU Residency** | **%.0f%%** | busy share of %d pool threads during decode |\n", 100 * r->residency_cpu,
                r->threads);
    if (r->max_ctx_stable > 0 && r->kv_bytes > 0)
        fprintf(f, "| **Max Context (Stable)** | **%lld** of %lld | %s; KV %s; decode there %.2f ms/token |\n",
                (long long)r->max_ctx_stable, (long long)r->max_ctx_target, r->max_ctx_note,
                st_fmt_bytes(r->kv_bytes, b1, sizeof b1), r->lat_at_max_ctx_ms);
    else if (r->max_ctx_stable > 0) /* KV size not known here (a cluster: the nodes' load lines give it) */
        fprintf(f, "| **Max Context (Stable)** | **%lld** of %lld | %s; decode there %.2f ms/token |\n",
                (long long)r->max_ctx_stable, (long long)r->max_ctx_target, r->max_ctx_note, r->lat_at_max_ctx_ms);
    else
        fprintf(f, "| **Max Context (Stable)** | - | %s |\n", r->max_ctx_note);
    fprintf(f, "| TTFT | %.1f ms | prompt of %d tokens |\n", 1000 * r->ttft_s, r->prompt_tokens);
    fprintf(f, "| Prefill | %.1f tok/s | |\n", r->prefill_tok_s);
    if (r->mem_bw_gbs > 0)
        fprintf(f, "| MBU | %.2f | %s per token / %.2f ms / %.1f GB/s measured read bandwidth |\n", r->mbu,
                st_fmt_bytes(r->bytes_per_token, b2, sizeof b2), r->lat_mean_ms, r->mem_bw_gbs);
    if (r->matrix_tflops > 0)
        fprintf(f, "| Prefill compute | %.1f TFLOPS | %.0f%% of the measured bf16 matrix rate %.1f TFLOPS; %s |\n",
                r->prefill_tflops, 100 * r->prefill_tflops / r->matrix_tflops, r->matrix_tflops, r->prefill_note);
    if (r->predicted_tok_s > 0)
        fprintf(f, "| Predicted vs achieved | %.1f / %.1f TPS | planner prediction |\n", r->predicted_tok_s, r->decode_tok_s);
    fprintf(f, "\nMachine: %s. Backend: %s. Model: %s (%s, %s weights). Flags: %s.\n", r->machine, r->backend, r->model,
            r->quant, st_fmt_bytes(r->weight_bytes, b1, sizeof b1), r->flags);
}

void bench_print_table(const bench_result *r, FILE *f) { table(r, f); }

int bench_write_md(const bench_result *r, const char *path, st_err *err) {
    FILE *f = fopen(path, "w");
    if (!f) return st_err_set(err, ST_ERR_IO, "%s: cannot write", path);
    fprintf(f, "# strata benchmark report\n\n");
    table(r, f);
    if (fclose(f)) return st_err_set(err, ST_ERR_IO, "%s: write failed", path);
    return ST_OK;
}

int bench_compare(const bench_result *r, const char *old_path, FILE *f, st_err *err) {
    json_error_t je;
    json_t *old = json_load_file(old_path, 0, &je);
    if (!old) return st_err_set(err, ST_ERR_FORMAT, "%s: invalid JSON at line %d: %s", old_path, je.line, je.text);
    json_t *now = to_json_all(r);
    fprintf(f, "| Metric | Old | New | New/Old |\n| :--- | ---: | ---: | ---: |\n");
    const char *key;
    json_t *v;
    json_object_foreach(now, key, v) {
        json_t *o = json_object_get(old, key);
        if (!json_is_number(v) || !json_is_number(o) || !strcmp(key, "unused")) continue;
        double a = json_number_value(o), b = json_number_value(v);
        if (a != 0) fprintf(f, "| %s | %.4g | %.4g | %.3f |\n", key, a, b, b / a);
        else fprintf(f, "| %s | %.4g | %.4g | - |\n", key, a, b);
    }
    json_decref(now);
    json_decref(old);
    return ST_OK;
}
