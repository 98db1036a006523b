/* cmd_bench.c — `strata bench`: the seed's table (latency, orchestration, TPS, residency, max
 * stable context) plus TTFT, prefill speed, MBU and aggregate throughput.
 *
 * How each figure is measured (also printed in the report's notes):
 * - token latency: wall time of each decode step (forward of one token + greedy pick) after
 *   two warm-up steps; p50/p90/p99 over --gen steps.
 * - orchestration: (decode wall time - time inside forward chunks) / tokens: everything per
 *   token that is not a kernel of the forward pass (sampling, bookkeeping, dispatch).
 * - residency: busy thread-time of the CPU pool / (decode wall time x threads).
 * - MBU: bytes a token must read (weights touched - routed experts only for MoE - plus the KV
 *   cache read at the mean decode position) / mean token time / read bandwidth measured here.
 * - max stable context: the KV cache is allocated for max_position_embeddings (or the largest
 *   that fits in available memory, with the reason), filled with synthetic K/V to the end,
 *   and 8 tokens are decoded there.
 * - aggregate TPS (--concurrency N >= 2): N sequences in N KV slots, each step advancing every
 *   one by a token; tokens x N / wall time. CPU: one forward of N rows per step. CUDA: the
 *   single-stream start position, ceil(N / 8) batched greedy decode calls (one graph replay of
 *   <= 8 rows each, on every GPU with --tp) per step; step p50 in the report.
 */
#include "app.h"
#include "strata/bench.h"
#include "strata/gpu.h"
#include "strata/model.h"
#include "strata/synth.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(void) {
    fprintf(stderr,
            "usage: strata bench MODEL_DIR|--synthetic PRESET[:QUANT] [options]\n"
            "  --prompt N        prompt tokens for TTFT/prefill (default 128)\n"
            "  --gen N           decoded tokens for latency figures (default 64)\n"
            "  --concurrency N   sequences decoding together for aggregate TPS (default 1, at most 1024;\n"
            "                    with --device cuda: N KV slots, rows in graph replays of <= 8 per step)\n"
            "  --peers A:P,...   run on a cluster of `strata node` processes (MODEL_DIR on every node)\n"
            "  --xport nccl      with --peers: hidden states between GPU stages over NCCL\n"
            "  --context N       target context for the max-stable-context test (default: the model's max;\n"
            "                    with --peers only when given: one slot of N positions, a prefill of N - 16)\n"
            "  --no-max-context  skip the max-context test\n"
            "  --threads N       CPU threads (default: all)\n"
            "  --exact           float32 reference kernels\n"
            "  --device cuda     run on the GPU (graph-replayed greedy decode, MBU vs copy bandwidth)\n"
            "  --tp N            with --synthetic and --device cuda: tensor parallel over GPUs 0..N-1\n"
            "  --out DIR         where report.md and report.json go (default .)\n"
            "  --compare FILE    print ratios against an earlier report.json\n");
}

static void machine_desc(char *buf, size_t cap) {
    char cpu[160] = "unknown CPU";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "model name", 10)) {
                char *p = strchr(line, ':');
                if (p) {
                    p += 2;
                    p[strcspn(p, "\n")] = 0;
                    snprintf(cpu, sizeof cpu, "%s", p);
                }
                break;
            }
        fclose(f);
    }
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    char mem[32];
    st_fmt_bytes((double)pages * (double)psz, mem, sizeof mem);
    snprintf(buf, cap, "%s, %d cores, %s RAM", cpu, st_cpu_count(), mem);
}

static double mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    double kb = 0;
    if (!f) return 0;
    char line[256];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024.0;
}

static int32_t argmax(const float *x, int n) {
    int32_t b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* Writes OUT_DIR/report.md and report.json for r and, with compare, prints ratios against an
 * earlier report.json. Failures are reported on stderr; the benchmark itself stands. */
static void write_reports(const bench_result *r, const char *out_dir, const char *compare) {
    st_err err = {0};
    char *pm = st_path_join(out_dir, "report.md"), *pj = st_path_join(out_dir, "report.json");
    if (pm && pj && !st_mkdir_p(out_dir, &err) && !bench_write_md(r, pm, &err) && !bench_write_json(r, pj, &err))
        fprintf(stderr, "strata: wrote %s and %s\n", pm, pj);
    else
        fprintf(stderr, "strata: %s\n", err.msg[0] ? err.msg : "out of memory");
    free(pm);
    free(pj);
    if (compare && bench_compare(r, compare, stdout, &err)) fprintf(stderr, "strata: %s\n", err.msg);
}

#define BENCH_MAX_CONC 1024 /* --concurrency: sequences (KV slots) decoding together */

static int die(const st_err *e) {
    fprintf(stderr, "strata: %s\n", e->msg);
    return 1;
}

#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_backend.h"

/* FLOP of a prefill of T tokens from position 0 (LOGITS_LAST): 2 x the parameters a token
 * passes through in layers [l0, l1) (q/k/v/o; the dense MLP, or the router + n_expert_used
 * experts) x T, the causal attention 4 x n_head x head_dim x sum(pos + 1) per layer (QK^T and
 * PV), and the output layer for the last row. Writes the formula into note. */
static double prefill_flops(const model_desc *d, int l0, int l1, int T, char *note, size_t cap) {
    const double D = d->n_embd, qd = (double)d->n_head * d->head_dim, kvd = (double)d->n_head_kv * d->head_dim;
    double params = 0;
    for (int l = l0; l < l1; l++) {
        params += D * qd * 2 + D * kvd * 2;
        if (d->layer_moe && d->layer_moe[l]) params += D * d->n_expert + 3.0 * D * d->n_ff_expert * d->n_expert_used;
        else params += 3.0 * D * d->n_ff;
    }
    const double attn = 4.0 * qd * ((double)T * (T + 1) / 2) * (l1 - l0), head = 2.0 * D * d->n_vocab;
    const double total = 2.0 * params * T + attn + head;
    snprintf(note, cap,
             "prefill FLOP = 2 x %.3g active params x %d tokens + causal attention 4 x %d heads x %d x sum(pos+1) x %d "
             "layers (%.3g) + lm_head of the last row = %.4g; rate = FLOP / TTFT",
             params, T, d->n_head, d->head_dim, l1 - l0, attn, total);
    return total;
}

/* The device's bf16 matrix rate: cuBLAS 8192^3 and the model's prefill GEMM shapes (rows x cols
 * of q, k/v, o, gate/up, down at `tokens` columns), best of each; prints every figure on f.
 * Returns the best (0: not measured). */
static double measure_matrix_rate(const model_desc *d, int tokens, FILE *f) {
    const int64_t D = d->n_embd, qd = (int64_t)d->n_head * d->head_dim, kvd = (int64_t)d->n_head_kv * d->head_dim;
    const int64_t F = d->n_ff > 0 ? d->n_ff : d->n_ff_expert;
    const struct {
        const char *name;
        int64_t rows, cols;
    } sh[] = {{"q/o", qd, D}, {"k/v", kvd, D}, {"gate/up", F, D}, {"down", D, F}};
    double best = cuda_measure_gemm_tflops(0);
    fprintf(f, "cuda: bf16 matrix rate (cuBLAS GemmEx, bf16 in, fp32 accumulate and out, best of 5): 8192^3 %.1f TFLOPS",
            best);
    for (size_t i = 0; i < sizeof sh / sizeof sh[0]; i++) {
        if (sh[i].rows < 1 || sh[i].cols < 1) continue;
        double t = cuda_measure_gemm_tflops_shape(0, sh[i].rows, tokens, sh[i].cols, 5);
        fprintf(f, "; %s %lldx%lld @%d %.1f", sh[i].name, (long long)sh[i].rows, (long long)sh[i].cols, tokens, t);
        if (t > best) best = t;
    }
    fprintf(f, "; best %.1f TFLOPS\n", best);
    return best;
}


/* The prompt of concurrent sequence `seq` (0: random_prompt's): n ids below V at positions
 * 0..n-1, a different fixed pseudo-random sequence for each seq. */
static void random_prompt_seq(int32_t *toks, int32_t *pos, int n, int V, int seq) {
    uint64_t rng = 0x1234567 + (uint64_t)seq * 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        toks[i] = (int32_t)(rng % (uint64_t)V);
        pos[i] = i;
    }
}

/* A fixed pseudo-random prompt of n ids below V at positions 0..n-1 (the same every run). */
static void random_prompt(int32_t *toks, int32_t *pos, int n, int V) {
    random_prompt_seq(toks, pos, n, V, 0);
}

/* r->quant for a synthetic preset's descriptor. */
static void quant_name(bench_result *r, const model_desc *d) {
    if (d->q_bits) snprintf(r->quant, sizeof r->quant, "MLX affine %d-bit g%d", d->q_bits, d->q_group);
    else snprintf(r->quant, sizeof r->quant, "bf16");
}

/* Decode figures from `gen` per-step times in ms (lat: scratch of gen doubles): mean, tok/s,
 * p50/p90/p99 (one stream: aggregate = decode rate). */
static void step_stats(bench_result *r, const float *step, double *lat, int gen) {
    double sum = 0;
    for (int i = 0; i < gen; i++) lat[i] = step[i], sum += step[i];
    r->lat_mean_ms = sum / gen;
    r->decode_tok_s = 1000.0 / r->lat_mean_ms;
    r->aggregate_tok_s = r->decode_tok_s;
    r->lat_p50_ms = bench_percentile(lat, (size_t)gen, 50);
    r->lat_p90_ms = bench_percentile(lat, (size_t)gen, 90);
    r->lat_p99_ms = bench_percentile(lat, (size_t)gen, 99);
}

/* Index of the largest of x[0..n) (the first on ties). */
static int32_t argmax_f(const float *x, int n) {
    int32_t k = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[k]) k = i;
    return k;
}

/* ---- N sequences decoding together (--concurrency N >= 2) ---------------------------------- */

#define CONC_ROWS 8 /* rows of one batched decode call: the matrix-vector kernels' token limit */

/* The operations the concurrent phase needs, over one GPU or a tensor-parallel group. */
typedef struct conc_ops {
    int (*forward)(void *h, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T, float *logits,
                   logits_mode mode, st_err *err);
    int (*kv_fill)(void *h, int slot, int n_tokens, st_err *err);
    bench_decode_fn decode;
    const char *replay; /* what one call replays, for the note */
} conc_ops;

static int fwd_gpu(void *h, const int32_t *t, const int32_t *p, const int32_t *s, int T, float *lg, logits_mode m,
                   st_err *e) {
    return cuda_model_forward(h, t, p, s, T, lg, m, e);
}
static int fill_gpu(void *h, int slot, int n, st_err *e) { return cuda_model_kv_fill_synthetic(h, slot, n, e); }
static int dec_gpu(void *h, const int32_t *t, const int32_t *p, const int32_t *s, int B, int32_t *nx, st_err *e) {
    return cuda_model_decode_greedy(h, t, p, s, B, nx, e);
}
static int fwd_tp(void *h, const int32_t *t, const int32_t *p, const int32_t *s, int T, float *lg, logits_mode m,
                  st_err *e) {
    return cuda_tp_forward(h, t, p, s, T, lg, m, e);
}
static int fill_tp(void *h, int slot, int n, st_err *e) { return cuda_tp_kv_fill_synthetic(h, slot, n, e); }
static int dec_tp(void *h, const int32_t *t, const int32_t *p, const int32_t *s, int B, int32_t *nx, st_err *e) {
    return cuda_tp_decode_greedy(h, t, p, s, B, nx, e);
}
static const conc_ops CONC_GPU = {fwd_gpu, fill_gpu, dec_gpu, "one graph replay"};
static const conc_ops CONC_TP = {fwd_tp, fill_tp, dec_tp, "one graph replay on every GPU"};

/* A failed cuda_model_init / cuda_tp_init on stderr, one line. Out of device memory, the line
 * adds the KV cache the run asked for (n_slots x ctx tokens over `layers` layers, bf16) and the
 * flags that shrink it. Returns 1. */
static int die_init(const st_err *e, const model_desc *d, int layers, int64_t ctx, int n_slots) {
    if (e->code != ST_ERR_NOMEM) return die(e);
    char kb[32];
    const double kv = (double)model_desc_kv_bytes_per_token(d, 2) * layers * (double)ctx * n_slots;
    fprintf(stderr, "strata: %s; the KV cache for %d sequence%s x %lld tokens is %s: lower --context%s\n", e->msg, n_slots,
            n_slots > 1 ? "s" : "", (long long)ctx, st_fmt_bytes(kv, kb, sizeof kb),
            n_slots > 1 ? " or --concurrency" : "");
    return 1;
}

/* The stored weight bytes of a synthetic preset (0 if the spec does not name one). */
static double preset_bytes(const char *spec) {
    uint64_t np = 0, nb = 0;
    st_err e = {0};
    return synth_preset_size(spec, &np, &nb, &e) ? 0 : (double)nb;
}

/* Refuses, before anything is allocated on a device, a KV cache that cannot fit: n_slots x ctx
 * tokens of bf16 K/V over `layers` layers, split over tp GPUs, plus weight_bytes / tp (a lower
 * bound of a GPU's weights: the embedding and output layer are whole on every GPU) beyond the
 * free memory of one of GPUs 0..tp-1. One line on stderr with the sizes and the flags that shrink
 * them; returns 1. 0: it may fit (cuda_model_init decides), or there is no GPU to ask. */
static int kv_precheck(const model_desc *d, int layers, int64_t ctx, int n_slots, int tp, double weight_bytes) {
    const double kv = (double)model_desc_kv_bytes_per_token(d, 2) * layers * (double)ctx * n_slots;
    for (int i = 0; i < tp; i++) {
        char name[128], b1[32], b2[32], b3[32], b4[32];
        size_t total = 0, free_b = 0;
        if (st_gpu_describe(i, name, sizeof name, &total, &free_b)) return 0;
        if (kv / tp + weight_bytes / tp <= (double)free_b) continue;
        fprintf(stderr,
                "strata: the KV cache for %d sequences x %lld tokens is %s (%s per GPU) and the weights at least %s per "
                "GPU: more than the %s free on GPU %d; lower --context or --concurrency\n",
                n_slots, (long long)ctx, st_fmt_bytes(kv, b1, sizeof b1), st_fmt_bytes(kv / tp, b2, sizeof b2),
                st_fmt_bytes(weight_bytes / tp, b3, sizeof b3), st_fmt_bytes((double)free_b, b4, sizeof b4), i);
        return 1;
    }
    return 0;
}

/* The aggregate figures of n >= 2 sequences in slots 0..n-1, every one decoding from position
 * p0 as the single stream did. Sequence 0 is the single stream's (slot 0 already holds its
 * context; it restarts from `next`); the others are started either (fill: the KV cache of their
 * slot filled synthetically to p0, as the single stream's, so they start from distinct tokens
 * next + 7919 s) or (!fill: a prefill of their own `prompt`-token prompt, random_prompt_seq, and
 * its greedy id). Then one warm-up step (captures the graphs of both group sizes) and `gen` timed
 * steps from p0 again, each advancing every sequence by one token in ceil(n / 8) decode calls of
 * <= 8 rows (bench_decode_steps), timed by the host clock (staging, the replays and one
 * synchronisation per call). Fills r->aggregate_tok_s, r->agg_step_p50_ms and r->agg_note; with
 * ref[gen] (the single stream's ids from the same start) prints how far sequence 0 agrees with
 * it (information: the B-row kernels need not round as the 1-row ones do). Returns 0, or 1
 * after printing the error. */
static int conc_phase(const conc_ops *ops, void *h, bench_result *r, int n, int prompt, int V, int32_t next, int fill,
                      int p0, int gen, const int32_t *ref) {
    st_err err = {0};
    int rc = 1;
    float *logits = malloc((size_t)V * sizeof(float));
    int32_t *start = malloc((size_t)n * 4), *cur = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4),
            *scratch = malloc((size_t)n * 8), *log0 = malloc((size_t)gen * 4);
    int32_t *toks = malloc((size_t)prompt * 4), *ppos = malloc((size_t)prompt * 4), *pslot = malloc((size_t)prompt * 4);
    double *step = malloc((size_t)gen * sizeof(double));
    if (!logits || !start || !cur || !pos || !scratch || !log0 || !toks || !ppos || !pslot || !step) {
        fprintf(stderr, "strata: out of memory\n");
        goto out;
    }
    st_progress pr;
    st_progress_begin(&pr, fill ? "kv fill" : "prefill", n - 1, "seq");
    start[0] = next;
    for (int s = 1; s < n; s++) {
        if (fill) {
            if (ops->kv_fill(h, s, p0, &err)) goto fail;
            start[s] = (int32_t)(((int64_t)next + 7919LL * s) % V);
        } else {
            random_prompt_seq(toks, ppos, prompt, V, s);
            for (int i = 0; i < prompt; i++) pslot[i] = s;
            if (ops->forward(h, toks, ppos, pslot, prompt, logits, LOGITS_LAST, &err)) goto fail;
            start[s] = argmax_f(logits, V);
        }
        st_progress_update(&pr, s);
    }
    st_progress_end(&pr);
    /* warm-up step: captures the graph of each group size; then the timed run from p0 again */
    memcpy(cur, start, (size_t)n * 4);
    for (int s = 0; s < n; s++) pos[s] = p0;
    if (bench_decode_steps(ops->decode, h, n, CONC_ROWS, 1, cur, pos, scratch, NULL, NULL, NULL, &err)) goto fail;
    memcpy(cur, start, (size_t)n * 4);
    for (int s = 0; s < n; s++) pos[s] = p0;
    char label[48];
    snprintf(label, sizeof label, "decode x %d", n);
    st_progress_begin(&pr, label, gen, "step");
    if (bench_decode_steps(ops->decode, h, n, CONC_ROWS, gen, cur, pos, scratch, step, log0, &pr, &err)) goto fail;
    st_progress_end(&pr);
    double sum = 0;
    for (int i = 0; i < gen; i++) sum += step[i];
    const int calls = (n + CONC_ROWS - 1) / CONC_ROWS;
    r->aggregate_tok_s = (double)n * gen / (sum * 1e-3);
    r->agg_step_p50_ms = bench_percentile(step, (size_t)gen, 50);
    snprintf(r->agg_note, sizeof r->agg_note,
             "%d sequences: %d replays of <= %d rows per step (%s each), from position %d (%s); host wall time per "
             "step",
             n, calls, CONC_ROWS, ops->replay, p0,
             fill ? "KV of every slot filled synthetically" : "each slot prefilled with its own prompt");
    printf("cuda: %d sequences: %.1f tok/s aggregate, step p50 %.2f ms", n, r->aggregate_tok_s, r->agg_step_p50_ms);
    if (ref) {
        int agree = 0;
        while (agree < gen && log0[agree] == ref[agree]) agree++;
        printf("; sequence 0 matches the single stream for its first %d of %d tokens", agree, gen);
    }
    printf("\n");
    rc = 0;
    goto out;
fail:
    st_progress_end(&pr);
    die(&err);
out:
    free(logits), free(start), free(cur), free(pos), free(scratch), free(log0), free(toks), free(ppos), free(pslot);
    free(step);
    return rc;
}

/* --device cuda: prefill (second of two runs, wall time incl. the logits copy), then `gen`
 * greedy steps replayed as a CUDA graph entirely on the device (per-step time from CUDA events),
 * MBU against the device-to-device copy bandwidth, and a per-kernel breakdown of one step. With
 * conc >= 2 the cache holds conc slots and conc_phase measures the aggregate rate (each sequence
 * prefilled with its own prompt). */
static int bench_cuda(model *m, bench_result *r, int prompt, int gen, int conc, const char *out_dir, const char *compare) {
    st_err err = {0};
    cuda_model *cm = NULL;
    const int V = m->desc.n_vocab;
    int rc = 1;
    float *logits = malloc((size_t)V * 4), *step = malloc((size_t)gen * sizeof(float));
    int32_t *toks = malloc((size_t)prompt * 4), *pos = malloc((size_t)prompt * 4), *slot = calloc((size_t)prompt, 4),
            *outt = malloc((size_t)gen * 4);
    double *lat = malloc((size_t)gen * sizeof(double));
    cuda_model_opts o = {.max_ctx = prompt + gen + 8, .n_slots = conc, .max_batch = prompt < 2048 ? prompt : 2048};
    if (conc > 1 && o.max_batch < CONC_ROWS) o.max_batch = CONC_ROWS; /* decode calls of up to 8 rows */
    if (!logits || !step || !toks || !pos || !slot || !outt || !lat) goto out;
    if (conc > 1 && kv_precheck(&m->desc, m->layer_end - m->layer_begin, o.max_ctx, conc, 1, (double)m->weight_bytes))
        goto out;
    r->matrix_tflops = measure_matrix_rate(&m->desc, o.max_batch, stdout); /* before the weights take the memory */
    if (cuda_model_init(&cm, m, &o, &err)) {
        die_init(&err, &m->desc, m->layer_end - m->layer_begin, o.max_ctx, conc);
        goto out;
    }
    cuda_model_info info;
    cuda_model_get_info(cm, &info);
    snprintf(r->backend, sizeof r->backend, "CUDA %s", info.device);
    snprintf(r->machine + strlen(r->machine), sizeof r->machine - strlen(r->machine), "; %s, %.0f GB", info.device,
             info.mem_total / 1e9);
    fprintf(stderr, "strata: weights %.2f GB on the device, KV %.2f GB, activations %.2f GB\n", info.weight_bytes / 1e9,
            info.kv_bytes / 1e9, info.act_bytes / 1e9);
    r->mem_bw_gbs = cuda_measure_copy_bandwidth(0, (size_t)2 << 30, 5) / 1e9;
    random_prompt(toks, pos, prompt, V);
    uint64_t t0 = 0;
    for (int rep = 0; rep < 2; rep++) {
        t0 = st_time_ns();
        if (cuda_model_forward(cm, toks, pos, slot, prompt, logits, LOGITS_LAST, &err)) {
            die(&err);
            goto out;
        }
    }
    const int32_t next = argmax_f(logits, V);
    r->ttft_s = (double)(st_time_ns() - t0) * 1e-9;
    r->prefill_tok_s = prompt / r->ttft_s;
    r->prefill_tflops = prefill_flops(&m->desc, m->layer_begin, m->layer_end, prompt, r->prefill_note,
                                      sizeof r->prefill_note) / r->ttft_s / 1e12;
    /* warm-up (captures the graph), then the timed run from the same position */
    if (cuda_model_generate_greedy(cm, next, prompt, 0, 4, outt, NULL, &err)) {
        die(&err);
        goto out;
    }
    uint64_t d0 = st_time_ns();
    if (cuda_model_generate_greedy(cm, next, prompt, 0, gen, outt, step, &err)) {
        die(&err);
        goto out;
    }
    double wall = (double)(st_time_ns() - d0);
    double sum = 0;
    for (int i = 0; i < gen; i++) lat[i] = step[i], sum += step[i];
    r->lat_mean_ms = sum / gen;
    r->decode_tok_s = 1000.0 / r->lat_mean_ms;
    r->aggregate_tok_s = r->decode_tok_s;
    r->orch_us_per_token = (wall * 1e-6 - sum) * 1e3 / gen;
    r->lat_p50_ms = bench_percentile(lat, (size_t)gen, 50);
    r->lat_p90_ms = bench_percentile(lat, (size_t)gen, 90);
    r->lat_p99_ms = bench_percentile(lat, (size_t)gen, 99);
    r->bytes_per_token = bench_bytes_per_token(m, prompt + gen / 2, 2);
    r->mbu = bench_mbu(r->bytes_per_token, r->lat_mean_ms * 1e-3, r->mem_bw_gbs * 1e9);
    r->max_ctx_target = m->desc.max_pos;
    r->kv_bytes = (double)info.kv_bytes / conc; /* one sequence's (the cache holds conc slots) */
    snprintf(r->max_ctx_note, sizeof r->max_ctx_note,
             "not measured on CUDA; bandwidth = device-to-device copy (read + write); latency = CUDA events per graph replay");
    if (conc > 1 && conc_phase(&CONC_GPU, cm, r, conc, prompt, V, next, 0, prompt, gen, outt)) goto out;
    bench_print_table(r, stdout);
    printf("\ncuda: weights on device %.2f GB, bytes/token %.2f GB, %.1f tok/s, MBU %.3f (copy bw %.0f GB/s)\n",
           info.weight_bytes / 1e9, r->bytes_per_token / 1e9, r->decode_tok_s, r->mbu, r->mem_bw_gbs);
    if (cuda_model_profile_step(cm, prompt, stdout, &err)) fprintf(stderr, "strata: profile: %s\n", err.msg);
    if (cuda_model_profile_prefill(cm, o.max_batch, stdout, &err)) fprintf(stderr, "strata: prefill profile: %s\n", err.msg);
    write_reports(r, out_dir, compare);
    rc = 0;
out:
    cuda_model_free(cm);
    free(logits), free(step), free(toks), free(pos), free(slot), free(outt), free(lat);
    return rc;
}
#endif

#ifdef STRATA_HAVE_CUDA
/* --synthetic SPEC --device cuda for presets larger than host memory: the weights are generated
 * in device memory (cuda_model_init_synthetic); prefill of `prompt` tokens, then with ctx > 0 the
 * KV cache is filled and `gen` greedy steps decode at the end of a ctx-token context. With
 * conc >= 2: conc slots of ctx tokens, and conc_phase's aggregate rate from the same position
 * (KV filled synthetically when ctx leaves room beyond the prompt, else prefilled prompts). */
static int bench_cuda_devsynth(const char *spec, bench_result *r, int prompt, int gen, int conc, int64_t ctx,
                               const char *out_dir) {
    st_err err = {0};
    model_desc d;
    memset(&d, 0, sizeof d);
    if (synth_preset_desc(spec, &d, &err)) return die(&err);
    cuda_model *cm = NULL;
    const int V = d.n_vocab;
    int rc = 1;
    if (ctx < prompt + gen + 8) ctx = prompt + gen + 8;
    const int pos0 = (int)ctx - gen - 8; /* decode from here (KV filled before it) */
    float *logits = malloc((size_t)V * 4), *step = malloc((size_t)gen * sizeof(float));
    int32_t *toks = malloc((size_t)prompt * 4), *pos = malloc((size_t)prompt * 4), *slot = calloc((size_t)prompt, 4),
            *outt = malloc((size_t)gen * 4);
    double *lat = malloc((size_t)gen * sizeof(double));
    cuda_model_opts o = {.max_ctx = (int)ctx, .n_slots = conc, .max_batch = prompt < 512 ? prompt : 512};
    if (conc > 1 && o.max_batch < CONC_ROWS) o.max_batch = CONC_ROWS; /* decode calls of up to 8 rows */
    if (!logits || !step || !toks || !pos || !slot || !outt || !lat) goto out;
    if (conc > 1 && kv_precheck(&d, d.n_layer, ctx, conc, 1, preset_bytes(spec))) goto out;
    r->matrix_tflops = measure_matrix_rate(&d, o.max_batch, stdout); /* before the weights take the memory */
    fprintf(stderr, "strata: generating %s on the device (weights never on the host) ...\n", spec);
    uint64_t g0 = st_time_ns();
    if (cuda_model_init_synthetic(&cm, &d, &o, 1, &err)) {
        die_init(&err, &d, d.n_layer, ctx, conc);
        goto out;
    }
    cuda_model_info info;
    cuda_model_get_info(cm, &info);
    fprintf(stderr, "strata: weights %.2f GB generated on the device in %.1f s, KV %.2f GB, activations %.2f GB\n",
            info.weight_bytes / 1e9, (double)(st_time_ns() - g0) * 1e-9, info.kv_bytes / 1e9, info.act_bytes / 1e9);
    snprintf(r->backend, sizeof r->backend, "CUDA %s", info.device);
    snprintf(r->model, sizeof r->model, "synthetic %s (random weights generated on the device)", spec);
    quant_name(r, &d);
    r->weight_bytes = (double)info.weight_bytes;
    r->mem_bw_gbs = cuda_measure_copy_bandwidth(0, (size_t)2 << 30, 5) / 1e9;
    random_prompt(toks, pos, prompt, V);
    uint64_t t0 = 0;
    for (int rep = 0; rep < 2; rep++) {
        t0 = st_time_ns();
        if (cuda_model_forward(cm, toks, pos, slot, prompt, logits, LOGITS_LAST, &err)) {
            die(&err);
            goto out;
        }
    }
    r->ttft_s = (double)(st_time_ns() - t0) * 1e-9;
    r->prefill_tok_s = prompt / r->ttft_s;
    r->prefill_tflops = prefill_flops(&d, 0, d.n_layer, prompt, r->prefill_note, sizeof r->prefill_note) / r->ttft_s / 1e12;
    const int32_t next = argmax_f(logits, V);
    if (pos0 > prompt && cuda_model_kv_fill_synthetic(cm, 0, pos0, &err)) {
        die(&err);
        goto out;
    }
    const int p0 = pos0 > prompt ? pos0 : prompt;
    if (cuda_model_generate_greedy(cm, next, p0, 0, 4, outt, NULL, &err) ||
        cuda_model_generate_greedy(cm, next, p0, 0, gen, outt, step, &err)) {
        die(&err);
        goto out;
    }
    step_stats(r, step, lat, gen);
    r->bytes_per_token = (double)info.active_bytes + (double)model_desc_kv_bytes_per_token(&d, 2) * d.n_layer * (p0 + gen / 2);
    r->mbu = bench_mbu(r->bytes_per_token, r->lat_mean_ms * 1e-3, r->mem_bw_gbs * 1e9);
    r->max_ctx_target = d.max_pos;
    r->max_ctx_stable = ctx;
    r->lat_at_max_ctx_ms = r->lat_p50_ms; /* these steps ran at the end of the context */
    r->kv_bytes = (double)info.kv_bytes / conc; /* one sequence's (the cache holds conc slots) */
    snprintf(r->max_ctx_note, sizeof r->max_ctx_note, "decode from position %d (KV filled synthetically); CUDA events per graph replay", p0);
    if (conc > 1 && conc_phase(&CONC_GPU, cm, r, conc, prompt, V, next, pos0 > prompt, p0, gen, outt)) goto out;
    bench_print_table(r, stdout);
    printf("\ncuda: weights on device %.2f GB, bytes/token %.2f GB (weights %.2f GB), %.1f tok/s, MBU %.3f (copy bw %.0f GB/s)\n",
           info.weight_bytes / 1e9, r->bytes_per_token / 1e9, info.active_bytes / 1e9, r->decode_tok_s, r->mbu,
           r->mem_bw_gbs);
    if (cuda_model_profile_step(cm, p0, stdout, &err)) fprintf(stderr, "strata: profile: %s\n", err.msg);
    if (cuda_model_profile_prefill(cm, o.max_batch, stdout, &err)) fprintf(stderr, "strata: prefill profile: %s\n", err.msg);
    write_reports(r, out_dir, NULL);
    rc = 0;
out:
    cuda_model_free(cm);
    model_desc_free(&d);
    free(logits), free(step), free(toks), free(pos), free(slot), free(outt), free(lat);
    return rc;
}

/* --synthetic SPEC --device cuda --tp N: the preset split over N GPUs of this process (tensor
 * parallel, weights generated on each GPU); prefill of `prompt` tokens, KV filled to ctx, then
 * `gen` graph-replayed greedy steps timed on GPU 0's stream (its step ends after the last
 * all-reduce, i.e. after every GPU's layers). MBU per GPU: each GPU's bytes per token (its
 * weight share + its KV share) / time / that GPU's copy bandwidth. */
static int bench_cuda_tp(const char *spec, bench_result *r, int prompt, int gen, int conc, int64_t ctx, int tp,
                         const char *out_dir) {
    st_err err = {0};
    model_desc d;
    memset(&d, 0, sizeof d);
    if (synth_preset_desc(spec, &d, &err)) return die(&err);
    cuda_tp *ct = NULL;
    const int V = d.n_vocab;
    int rc = 1;
    if (ctx < prompt + gen + 8) ctx = prompt + gen + 8;
    if (ctx > d.max_pos) ctx = d.max_pos;
    const int pos0 = (int)ctx - gen - 8;
    float *logits = malloc((size_t)V * 4), *step = malloc((size_t)gen * sizeof(float));
    int32_t *toks = malloc((size_t)prompt * 4), *pos = malloc((size_t)prompt * 4), *slot = calloc((size_t)prompt, 4),
            *outt = malloc((size_t)gen * 4);
    double *lat = malloc((size_t)gen * sizeof(double));
    int devs[8];
    for (int i = 0; i < 8; i++) devs[i] = i;
    cuda_model_opts o = {.max_ctx = (int)ctx, .n_slots = conc, .max_batch = prompt < 512 ? prompt : 512};
    if (conc > 1 && o.max_batch < CONC_ROWS) o.max_batch = CONC_ROWS; /* decode calls of up to 8 rows */
    if (!logits || !step || !toks || !pos || !slot || !outt || !lat) goto out;
    if (conc > 1 && kv_precheck(&d, d.n_layer, ctx, conc, tp, preset_bytes(spec))) goto out;
    fprintf(stderr, "strata: generating %s on %d GPUs (tensor parallel; weights never on the host) ...\n", spec, tp);
    uint64_t g0 = st_time_ns();
    if (cuda_tp_init_synthetic(&ct, &d, &o, devs, tp, 1, &err)) {
        die_init(&err, &d, d.n_layer, ctx, conc);
        goto out;
    }
    cuda_model_info info[8];
    size_t wsum = 0, kvsum = 0, act_max = 0;
    for (int i = 0; i < tp; i++) {
        cuda_tp_get_info(ct, i, &info[i]);
        wsum += info[i].weight_bytes, kvsum += info[i].kv_bytes;
        if (info[i].active_bytes > act_max) act_max = info[i].active_bytes;
        fprintf(stderr,
                "strata: GPU %d: weights %.2f GB, KV %.2f GB (%d tokens x %d slots), activations %.2f GB, free %.1f of "
                "%.1f GB\n",
                i, info[i].weight_bytes / 1e9, info[i].kv_bytes / 1e9, (int)ctx, conc, info[i].act_bytes / 1e9,
                info[i].mem_free / 1e9, info[i].mem_total / 1e9);
    }
    fprintf(stderr, "strata: generated in %.1f s\n", (double)(st_time_ns() - g0) * 1e-9);
    snprintf(r->backend, sizeof r->backend, "CUDA %d x %s, tensor parallel (peer all-reduce)", tp, info[0].device);
    snprintf(r->model, sizeof r->model, "synthetic %s (random weights generated on the devices)", spec);
    quant_name(r, &d);
    snprintf(r->flags + strlen(r->flags), sizeof r->flags - strlen(r->flags), " --tp %d --context %lld", tp, (long long)ctx);
    r->weight_bytes = (double)wsum;
    r->mem_bw_gbs = cuda_measure_copy_bandwidth(0, (size_t)2 << 30, 5) / 1e9;
    random_prompt(toks, pos, prompt, V);
    uint64_t t0 = 0;
    for (int rep = 0; rep < 2; rep++) {
        t0 = st_time_ns();
        if (cuda_tp_forward(ct, toks, pos, slot, prompt, logits, LOGITS_LAST, &err)) {
            die(&err);
            goto out;
        }
    }
    r->ttft_s = (double)(st_time_ns() - t0) * 1e-9;
    r->prefill_tok_s = prompt / r->ttft_s;
    const int32_t next = argmax_f(logits, V);
    if (pos0 > prompt) {
        fprintf(stderr, "strata: filling the KV cache of every GPU to position %d ...\n", pos0);
        if (cuda_tp_kv_fill_synthetic(ct, 0, pos0, &err)) {
            die(&err);
            goto out;
        }
    }
    const int p0 = pos0 > prompt ? pos0 : prompt;
    if (cuda_tp_generate_greedy(ct, next, p0, 0, 4, outt, NULL, &err) ||
        cuda_tp_generate_greedy(ct, next, p0, 0, gen, outt, step, &err)) {
        die(&err);
        goto out;
    }
    step_stats(r, step, lat, gen);
    /* per GPU: its weight share + its share of the KV read at the mean decode position */
    const double kv_tok = (double)model_desc_kv_bytes_per_token(&d, 2) * d.n_layer * (p0 + gen / 2);
    r->bytes_per_token = (double)act_max + kv_tok / tp;
    r->mbu = bench_mbu(r->bytes_per_token, r->lat_mean_ms * 1e-3, r->mem_bw_gbs * 1e9);
    r->max_ctx_target = d.max_pos;
    r->max_ctx_stable = ctx;
    r->lat_at_max_ctx_ms = r->lat_p50_ms; /* these steps ran at the end of the context */
    r->kv_bytes = (double)kvsum / conc; /* one sequence's (the cache holds conc slots) */
    snprintf(r->max_ctx_note, sizeof r->max_ctx_note,
             "decode from position %d (KV of every GPU filled synthetically); KV split over %d GPUs; CUDA events per "
             "graph replay; MBU per GPU",
             p0, tp);
    if (conc > 1 && conc_phase(&CONC_TP, ct, r, conc, prompt, V, next, pos0 > prompt, p0, gen, outt)) goto out;
    bench_print_table(r, stdout);
    printf("\ncuda tp=%d: weights %.2f GB in all, per GPU bytes/token %.2f GB (weights %.2f GB), %.1f tok/s, MBU per GPU "
           "%.3f (copy bw %.0f GB/s)\n",
           tp, wsum / 1e9, r->bytes_per_token / 1e9, act_max / 1e9, r->decode_tok_s, r->mbu, r->mem_bw_gbs);
    if (cuda_tp_profile_step(ct, p0, stdout, &err)) fprintf(stderr, "strata: profile: %s\n", err.msg);
    write_reports(r, out_dir, NULL);
    rc = 0;
out:
    cuda_tp_free(ct);
    model_desc_free(&d);
    free(logits), free(step), free(toks), free(pos), free(slot), free(outt), free(lat);
    return rc;
}
#endif

int cmd_bench(int argc, char **argv) {
    const char *dir = NULL, *synthetic = NULL, *out_dir = ".", *compare = NULL, *peers = NULL;
    int bench_nccl = 0;
    int prompt = 128, gen = 64, conc = 1, threads = 0, exact = 0, do_max = 1, cuda = 0, tp = 1;
    int64_t ctx_target = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--synthetic") && more) synthetic = argv[++i];
        else if (!strcmp(a, "--peers") && more) peers = argv[++i];
        else if (!strcmp(a, "--xport") && more) {
            const char *x = argv[++i];
            if (strcmp(x, "nccl") && strcmp(x, "auto")) {
                fprintf(stderr, "strata bench: --xport is nccl or auto, got '%s'\n", x);
                return 2;
            }
            bench_nccl = !strcmp(x, "nccl");
        }
        else if (!strcmp(a, "--prompt") && more) prompt = atoi(argv[++i]);
        else if (!strcmp(a, "--gen") && more) gen = atoi(argv[++i]);
        else if (!strcmp(a, "--concurrency") && more) {
            if (app_parse_int(argv[++i], 1, BENCH_MAX_CONC, &conc)) {
                fprintf(stderr, "strata: bench: --concurrency '%s': not a sequence count (1..%d)\n", argv[i],
                        BENCH_MAX_CONC);
                return 2;
            }
        }
        else if (!strcmp(a, "--context") && more) ctx_target = atoll(argv[++i]);
        else if (!strcmp(a, "--threads") && more) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--tp") && more) tp = atoi(argv[++i]);
        else if (!strcmp(a, "--out") && more) out_dir = argv[++i];
        else if (!strcmp(a, "--compare") && more) compare = argv[++i];
        else if (!strcmp(a, "--exact")) exact = 1;
        else if (!strcmp(a, "--device") && more) cuda = !strcmp(argv[++i], "cuda");
        else if (!strcmp(a, "--no-max-context")) do_max = 0;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else if (a[0] != '-' && !dir) dir = a;
        else {
            fprintf(stderr, "strata bench: unknown or incomplete option '%s'\n", a);
            usage();
            return 2;
        }
    }
    if ((!dir) == (!synthetic) || prompt < 1 || gen < 4 || conc < 1) {
        usage();
        return 2;
    }
    if (tp < 1 || tp > 8 || (tp > 1 && (!synthetic || !cuda))) {
        fprintf(stderr, "strata bench: --tp N (2..8) needs --synthetic PRESET --device cuda\n");
        return 2;
    }
    if (peers) { /* the cluster path: the nodes hold the weights */
        if (!dir) {
            fprintf(stderr, "strata bench: --peers needs a MODEL_DIR present on every node\n");
            return 2;
        }
        bench_result cr;
        memset(&cr, 0, sizeof cr);
        machine_desc(cr.machine, sizeof cr.machine);
        snprintf(cr.model, sizeof cr.model, "%s", dir);
        snprintf(cr.flags, sizeof cr.flags, "--peers %s --prompt %d --gen %d --concurrency %d%s", peers, prompt, gen, conc,
                 bench_nccl ? " --xport nccl" : "");
        snprintf(cr.max_ctx_note, sizeof cr.max_ctx_note, "not measured: give --context N (a prefill of N tokens)");
        cr.prompt_tokens = prompt, cr.gen_tokens = gen, cr.concurrency = conc;
        st_err cerr = {0};
        if (bench_cluster(dir, peers, prompt, gen, conc, threads, bench_nccl, do_max ? ctx_target : 0, &cr, &cerr)) {
            fprintf(stderr, "strata: %s\n", cerr.msg);
            return 1;
        }
        bench_print_table(&cr, stdout);
        write_reports(&cr, out_dir, compare);
        return 0;
    }
    st_err err = {0};
    model *m = NULL;
    model_ctx *ctx = NULL;
    float *logits = NULL;
    int32_t *toks = NULL, *pos = NULL, *slot = NULL, *cur = NULL;
    double *lat = NULL;
    int rc = 1;
    bench_result r;
    memset(&r, 0, sizeof r);
    machine_desc(r.machine, sizeof r.machine);
    snprintf(r.flags, sizeof r.flags, "--prompt %d --gen %d --concurrency %d%s", prompt, gen, conc, exact ? " --exact" : "");
#ifdef STRATA_HAVE_CUDA
    if (synthetic && cuda && tp > 1) {
        r.prompt_tokens = prompt, r.gen_tokens = gen, r.concurrency = conc;
        return bench_cuda_tp(synthetic, &r, prompt, gen, conc, ctx_target, tp, out_dir);
    }
    if (synthetic && cuda) { /* presets beyond host memory: weights generated on the GPU */
        uint64_t np = 0, nb = 0;
        if (!synth_preset_size(synthetic, &np, &nb, &err) && (nb > ((uint64_t)48 << 30) || getenv("STRATA_CUDA_DEVICE_SYNTH"))) {
            machine_desc(r.machine, sizeof r.machine);
            r.prompt_tokens = prompt, r.gen_tokens = gen, r.concurrency = conc, r.params = (int64_t)np;
            return bench_cuda_devsynth(synthetic, &r, prompt, gen, conc, ctx_target, out_dir);
        }
    }
#endif
    if (synthetic) {
        if (synth_model(&m, synthetic, 1, NULL, &err)) return die(&err);
        snprintf(r.model, sizeof r.model, "synthetic %s (random weights)", synthetic);
    } else {
        if (model_load(&m, dir, NULL, &err)) return die(&err);
        snprintf(r.model, sizeof r.model, "%s", dir);
    }
    const model_desc *d = &m->desc;
    const int V = d->n_vocab;
    if (d->q_bits) snprintf(r.quant, sizeof r.quant, "MLX affine %d-bit g%d", d->q_bits, d->q_group);
    else snprintf(r.quant, sizeof r.quant, "%s", sft_dtype_name(m->layers[0].wq.dtype));
    r.weight_bytes = (double)m->weight_bytes;
    r.prompt_tokens = prompt;
    r.gen_tokens = gen;
    r.concurrency = conc;
    if (cuda) {
#ifdef STRATA_HAVE_CUDA
        rc = bench_cuda(m, &r, prompt, gen, conc, out_dir, compare);
#else
        fprintf(stderr, "strata: --device cuda: built without CUDA\n");
#endif
        goto out;
    }
    int need_ctx = prompt + gen + 8;
    if (need_ctx > d->max_pos) {
        fprintf(stderr, "strata: prompt + gen (%d) exceeds the model's context %lld\n", need_ctx, (long long)d->max_pos);
        goto out;
    }
    model_ctx_opts o = {.max_ctx = need_ctx, .n_slots = conc, .max_batch = prompt < 256 ? prompt : 256, .exact = exact,
                        .n_threads = threads};
    if (model_ctx_init(&ctx, m, &o, &err)) {
        die(&err);
        goto out;
    }
    st_pool *pool = model_ctx_pool(ctx);
    /* K/V bytes follow the cache's element size: float16 on the fast path, float32 with --exact */
    const size_t kv_es = model_ctx_kv_elem_bytes(ctx);
    r.threads = st_pool_threads(pool);
    st_backend_announce(r.threads);
    snprintf(r.backend, sizeof r.backend, "CPU, %d threads, %s%s", r.threads,
             st_cpu_has_avx512() ? "AVX-512" : st_cpu_has_avx2() ? "AVX2" : "scalar", exact ? ", exact f32" : "");
    fprintf(stderr, "strata: measuring memory read bandwidth ...\n");
    r.mem_bw_gbs = bench_measure_bandwidth(pool, (size_t)1 << 30, 4) / 1e9;

    logits = malloc((size_t)V * (size_t)conc * sizeof(float));
    toks = malloc((size_t)(prompt > conc ? prompt : conc) * sizeof(int32_t));
    pos = malloc((size_t)conc * sizeof(int32_t));
    slot = malloc((size_t)conc * sizeof(int32_t));
    cur = malloc((size_t)conc * sizeof(int32_t));
    lat = malloc((size_t)gen * sizeof(double));
    if (!logits || !toks || !pos || !slot || !lat || !cur) {
        fprintf(stderr, "strata: out of memory\n");
        goto out;
    }
    uint64_t rng = 0x1234567;
    for (int i = 0; i < prompt; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        toks[i] = (int32_t)(rng % (uint64_t)V);
    }
    /* TTFT and prefill */
    fprintf(stderr, "strata: prefill of %d tokens ...\n", prompt);
    uint64_t t0 = st_time_ns();
    if (model_forward_seq(ctx, toks, prompt, 0, logits, LOGITS_LAST, &err)) {
        die(&err);
        goto out;
    }
    int32_t next = argmax(logits, V);
    uint64_t t1 = st_time_ns();
    r.ttft_s = (double)(t1 - t0) * 1e-9;
    r.prefill_tok_s = prompt / r.ttft_s;
    /* decode: 2 warm-up steps, then gen timed steps */
    int p = prompt;
    for (int w = 0; w < 2; w++) {
        if (model_forward_seq(ctx, &next, 1, p++, logits, LOGITS_LAST, &err)) {
            die(&err);
            goto out;
        }
        next = argmax(logits, V);
    }
    model_ctx_timers_reset(ctx);
    st_progress pr;
    st_progress_begin(&pr, "decode", gen, "tok");
    uint64_t d0 = st_time_ns();
    for (int i = 0; i < gen - 2; i++) {
        uint64_t s = st_time_ns();
        if (model_forward_seq(ctx, &next, 1, p++, logits, LOGITS_LAST, &err)) {
            die(&err);
            goto out;
        }
        next = argmax(logits, V);
        lat[i] = (double)(st_time_ns() - s) * 1e-6;
        st_progress_update(&pr, i + 1);
    }
    uint64_t d1 = st_time_ns();
    st_progress_end(&pr);
    int n_lat = gen - 2;
    uint64_t compute_ns = 0, busy = 0;
    model_ctx_timers(ctx, &compute_ns, NULL);
    st_pool_stats(pool, &busy, NULL);
    double wall = (double)(d1 - d0);
    r.lat_mean_ms = wall * 1e-6 / n_lat;
    r.decode_tok_s = 1000.0 / r.lat_mean_ms;
    r.orch_us_per_token = (wall - (double)compute_ns) * 1e-3 / n_lat;
    r.residency_cpu = bench_residency(busy, d1 - d0, r.threads);
    r.lat_p50_ms = bench_percentile(lat, (size_t)n_lat, 50);
    r.lat_p90_ms = bench_percentile(lat, (size_t)n_lat, 90);
    r.lat_p99_ms = bench_percentile(lat, (size_t)n_lat, 99);
    r.bytes_per_token = bench_bytes_per_token(m, prompt + gen / 2, kv_es);
    r.mbu = bench_mbu(r.bytes_per_token, r.lat_mean_ms * 1e-3, r.mem_bw_gbs * 1e9);
    /* aggregate throughput: conc sequences, short prompts, decoded together */
    r.aggregate_tok_s = r.decode_tok_s;
    if (conc > 1) {
        int sp = 16 < prompt ? 16 : prompt;
        for (int s = 0; s < conc; s++) {
            for (int i = 0; i < sp; i++) toks[i] = (int32_t)((i * 7919 + s * 104729) % V);
            int32_t ps[16], ss[16];
            for (int i = 0; i < sp; i++) ps[i] = i, ss[i] = s;
            if (model_forward(ctx, toks, ps, ss, sp, logits, LOGITS_LAST, &err)) {
                die(&err);
                goto out;
            }
            cur[s] = argmax(logits, V);
        }
        int steps = gen;
        uint64_t a0 = st_time_ns();
        for (int st = 0; st < steps; st++) {
            for (int s = 0; s < conc; s++) pos[s] = sp + st, slot[s] = s;
            if (model_forward(ctx, cur, pos, slot, conc, logits, LOGITS_ALL, &err)) {
                die(&err);
                goto out;
            }
            for (int s = 0; s < conc; s++) cur[s] = argmax(logits + (size_t)s * V, V);
        }
        r.aggregate_tok_s = (double)conc * steps / ((double)(st_time_ns() - a0) * 1e-9);
    }
    model_ctx_free(ctx);
    ctx = NULL;
    /* max stable context */
    r.max_ctx_target = ctx_target > 0 ? ctx_target : d->max_pos;
    if (r.max_ctx_target > d->max_pos) {
        fprintf(stderr, "strata: --context %lld exceeds the model's max_position_embeddings %lld\n",
                (long long)r.max_ctx_target, (long long)d->max_pos);
        goto out;
    }
    if (do_max) {
        int64_t c = r.max_ctx_target;
        double avail = mem_available();
        double per_tok = (double)model_desc_kv_bytes_per_token(d, kv_es) * (m->layer_end - m->layer_begin);
        snprintf(r.max_ctx_note, sizeof r.max_ctx_note, "full context, KV %s", kv_es == 2 ? "f16" : "f32");
        while (c > 64 && per_tok * (double)c > 0.85 * avail) c /= 2;
        if (c < r.max_ctx_target) {
            char b1[32], b2[32];
            snprintf(r.max_ctx_note, sizeof r.max_ctx_note, "largest that fits: KV for %lld tokens needs %s, %s available",
                     (long long)r.max_ctx_target, st_fmt_bytes(per_tok * (double)r.max_ctx_target, b1, sizeof b1),
                     st_fmt_bytes(avail, b2, sizeof b2));
        }
        model_ctx_opts mo = {.max_ctx = (int)c, .n_slots = 1, .max_batch = 8, .n_threads = threads, .exact = exact};
        fprintf(stderr, "strata: allocating the KV cache for %lld tokens and decoding at its end ...\n", (long long)c);
        if (model_ctx_init(&ctx, m, &mo, &err)) {
            die(&err);
            goto out;
        }
        r.kv_bytes = (double)model_ctx_kv_bytes(ctx);
        int fill = (int)c - 8;
        if (model_ctx_kv_fill_synthetic(ctx, 0, fill, 7, &err)) {
            die(&err);
            goto out;
        }
        int32_t tk = 1;
        uint64_t m0 = st_time_ns();
        for (int i = 0; i < 8; i++) {
            if (model_forward_seq(ctx, &tk, 1, fill + i, logits, LOGITS_LAST, &err)) {
                die(&err);
                goto out;
            }
            tk = argmax(logits, V);
            if (!isfinite(logits[tk])) {
                fprintf(stderr, "strata: non-finite logits at context %d\n", fill + i);
                goto out;
            }
        }
        r.lat_at_max_ctx_ms = (double)(st_time_ns() - m0) * 1e-6 / 8;
        r.max_ctx_stable = c;
        strncat(r.max_ctx_note, "; filled with synthetic K/V", sizeof r.max_ctx_note - strlen(r.max_ctx_note) - 1);
    } else {
        snprintf(r.max_ctx_note, sizeof r.max_ctx_note, "not measured (--no-max-context)");
    }
    bench_print_table(&r, stdout);
    write_reports(&r, out_dir, compare);
    rc = 0;
out:
    free(logits);
    free(toks);
    free(pos);
    free(slot);
    free(cur);
    free(lat);
    model_ctx_free(ctx);
    model_free(m);
    return rc;
}
