/* bench_cpu_kernels.c — benchmarks of the CPU linear/attention kernels at qwen3-0.6b shapes.
 *
 * Not part of libstrata (CMake target bench_cpu_kernels). Three parts:
 *   bw      the machine's read bandwidth: a streaming AVX2 sum over 1 GiB, 1 thread and all
 *           threads, best of 5 (GB = 1e9 bytes);
 *   linear  the seven layer linears of 28 qwen3-0.6b layers plus the tied lm_head, run in
 *           decode order (T = 1) and as a prefill chunk (T = 256, lm_head excluded), for the
 *           reference (exact) and fast paths: per-shape microseconds, GB/s and GFLOP/s, and the
 *           per-token total as tok/s and model-bandwidth utilisation (MBU);
 *   attention  one layer's attention for a 256-token prefill chunk at 256..511 and a decode
 *           token at 512;
 *   rows    batched decode: the seven layer linears of 28 layers (fast path) with T = 1..16 rows
 *           per call, as a pipeline stage or the serve scheduler runs T sequences in one step:
 *           ms per step, per row, and the speed-up over T single-row steps;
 *   hot     the fast decode linear on one 3072 x 1024 weight that stays in L3: the kernel's
 *           compute ceiling (GB/s of weight bytes without DRAM), to compare with `linear`;
 *   model   a synthetic qwen3-0.6b (random weights, built in memory) through model_forward:
 *           decode tok/s + MBU (p50 and min step), and a 512-token prefill. --pos N decodes from
 *           position N (after the prefill's K/V; default 16); --no-prefill skips the prefill.
 * usage: bench_cpu_kernels [bw|linear|attention|model|rows|hot|all] [--fmt q4g64|bf16|both] [--threads N]
 *                          [--iters N] [--gen N] [--pos N] [--no-prefill] [--no-exact] [--cpu-time]
 * --iters also sets the attention part's repetitions (best of max(iters, 5)). STRATA_NO_ACTQ8=1
 * switches the 4-bit kernels from int8 back to int16 activations (decode and prefill GEMM),
 * STRATA_NO_ACTQ_GEMM=1 and STRATA_ATTN_NOSPLIT=1 switch off the integer prefill GEMM and
 * split-K decode attention (A/B on one build).
 * --cpu-time (with --threads 1) times the linear, attention and model parts with the thread's CPU
 * clock: per-core throughput that stays meaningful while other processes load the machine.
 */
#include "strata/base.h"
#include "strata/model.h"
#include "strata/pool.h"

#include "backend/cpu/cpu_ops.h"

#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

// ----------------------------------------------------------------------------
// qwen3-0.6b shapes

#define Q_LAYERS 28
#define Q_D 1024
#define Q_FF 3072
#define Q_H 16
#define Q_HKV 8
#define Q_HD 128
#define Q_VOCAB 151936

static const char *const shape_names[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const int64_t shape_rc[7][2] = {{Q_H * Q_HD, Q_D}, {Q_HKV * Q_HD, Q_D}, {Q_HKV * Q_HD, Q_D}, {Q_D, Q_H * Q_HD},
                                       {Q_FF, Q_D},       {Q_FF, Q_D},         {Q_D, Q_FF}};

static uint64_t g_rng = 12345;
static uint64_t rng_u64(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rng_f(void) { return (float)((double)(rng_u64() >> 11) * 0x1.0p-53 * 2.0 - 1.0); }

/* Fills a weight's buffers (already sized) with random data: quantized words uniform, scales
 * ~ std so outputs stay O(1), biases centring each group; dense values ~ U(-a, a). */
static void fill_weight(void *w, void *sc, void *bi, int64_t rows, int64_t cols, int qbits, int group) {
    if (qbits) {
        size_t nw = (size_t)rows * (size_t)cols * (size_t)qbits / 32;
        uint32_t *q = w;
        for (size_t i = 0; i < nw; i++) q[i] = (uint32_t)rng_u64();
        size_t ns = (size_t)rows * (size_t)(cols / group);
        float s = (float)(1.7 / sqrt((double)cols) / (double)((1 << qbits) - 1));
        uint16_t *ps = sc, *pb = bi;
        for (size_t i = 0; i < ns; i++) {
            float si = s * (1.0f + 0.2f * rng_f());
            ps[i] = st_f32_to_bf16(si);
            pb[i] = st_f32_to_bf16(-si * (float)((1 << qbits) - 1) / 2);
        }
    } else {
        uint16_t *h = w;
        float a = (float)(1.7 / sqrt((double)cols));
        for (size_t i = 0; i < (size_t)rows * (size_t)cols; i++) h[i] = st_f32_to_bf16(a * rng_f());
    }
}

/* A standalone weight with owned buffers (bf16 scales/biases when quantized). */
static int weight_make(wt_linear *w, int64_t rows, int64_t cols, int qbits, int group) {
    memset(w, 0, sizeof *w);
    w->qbits = qbits;
    w->group = group;
    w->dtype = SFT_BF16;
    w->sdtype = SFT_BF16;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = qbits ? (size_t)cols * qbits / 8 : (size_t)cols * 2;
    w->srow_elems = qbits ? (size_t)(cols / group) : 0;
    void *d = st_alloc_aligned((size_t)rows * w->row_bytes), *s = NULL, *b = NULL;
    if (qbits) {
        s = st_alloc_aligned((size_t)rows * w->srow_elems * 2);
        b = st_alloc_aligned((size_t)rows * w->srow_elems * 2);
    }
    if (!d || (qbits && (!s || !b))) return -1;
    fill_weight(d, s, b, rows, cols, qbits, group);
    w->w = d;
    w->scales = s;
    w->biases = b;
    return 0;
}

static void weight_drop(wt_linear *w) {
    st_free_aligned((void *)w->w);
    st_free_aligned((void *)w->scales);
    st_free_aligned((void *)w->biases);
}

// ----------------------------------------------------------------------------
// bandwidth

typedef struct bw_job {
    const float *buf;
    size_t n_per_task; /* floats */
    double sums[256];
} bw_job;

__attribute__((target("avx2"))) static void bw_task(void *ctx, int task, int n_tasks, int thread) {
    bw_job *j = ctx;
    const float *p = j->buf + (size_t)task * j->n_per_task;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < j->n_per_task; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    j->sums[task] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

/* Best-of-5 streaming read bandwidth (GB/s) over 1 GiB with `threads` threads. */
static double measure_bw(int threads) {
    const size_t bytes = (size_t)1 << 30;
    float *buf = st_alloc_aligned(bytes); /* zeroed: every page is touched */
    st_pool *pool = st_pool_init(threads);
    if (!buf || !pool) return 0;
    bw_job j = {.buf = buf, .n_per_task = bytes / 4 / 64};
    double best = 0;
    for (int rep = 0; rep < 6; rep++) {
        double t0 = st_time_s();
        st_pool_run(pool, bw_task, &j, 64);
        double gbs = (double)bytes / (st_time_s() - t0) / 1e9;
        if (rep > 0 && gbs > best) best = gbs; /* rep 0 warms up */
    }
    st_pool_free(pool);
    st_free_aligned(buf);
    return best;
}

// ----------------------------------------------------------------------------
// linear sequences

typedef struct fmt_spec {
    const char *name;
    int qbits, group;
} fmt_spec;

static double g_bw = 0; /* measured read bandwidth, GB/s */
static int g_no_prefill; /* --no-prefill: skip the model's 512-token prefill */
static int g_cpu_time;  /* --cpu-time: time with the calling thread's CPU clock (1 thread only) */

/* Nanoseconds on the wall clock, or with --cpu-time on this thread's CPU clock: on a machine
 * shared with other work that counts only the time this thread actually ran. */
static uint64_t now_ns(void) {
    if (!g_cpu_time) return st_time_ns();
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The seven layer linears of 28 qwen3-0.6b layers in format f (exits when out of memory);
 * layers_drop releases them. */
static wt_linear (*layers_make(const fmt_spec *f))[7] {
    wt_linear (*L)[7] = calloc(Q_LAYERS, sizeof *L);
    if (!L) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int l = 0; l < Q_LAYERS; l++)
        for (int s = 0; s < 7; s++)
            if (weight_make(&L[l][s], shape_rc[s][0], shape_rc[s][1], f->qbits, f->group)) {
                fprintf(stderr, "out of memory\n");
                exit(1);
            }
    return L;
}

static void layers_drop(wt_linear (*L)[7]) {
    for (int l = 0; l < Q_LAYERS; l++)
        for (int s = 0; s < 7; s++) weight_drop(&L[l][s]);
    free(L);
}

/* Runs the decode (T = 1) and prefill (T = 256) linear sequences of 28 layers in format f
 * through path exact / fast and prints the per-shape table. */
static void bench_linear(const fmt_spec *f, int threads, int iters, int do_exact) {
    wt_linear (*L)[7] = layers_make(f);
    wt_linear head;
    if (weight_make(&head, Q_VOCAB, Q_D, f->qbits, f->group)) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    size_t layer_bytes = 0;
    for (int s = 0; s < 7; s++) layer_bytes += wt_linear_bytes(&L[0][s]);
    const size_t tok_bytes = layer_bytes * Q_LAYERS + wt_linear_bytes(&head);
    const int TP = 256;
    float *x = st_alloc_aligned((size_t)TP * Q_FF * 4), *y = st_alloc_aligned((size_t)TP * Q_VOCAB * 4);
    for (size_t i = 0; i < (size_t)TP * Q_FF; i++) x[i] = rng_f();
    st_pool *pool = st_pool_init(threads);
    printf("\n== %s: weights per token %.1f MB (28 layers x %.2f MB + lm_head %.1f MB), %d threads\n", f->name,
           tok_bytes / 1e6, layer_bytes / 1e6, wt_linear_bytes(&head) / 1e6, st_pool_threads(pool));
    for (int exact = do_exact ? 1 : 0; exact >= 0; exact--) {
        cpu_scratch sc;
        if (cpu_scratch_init(&sc, st_pool_threads(pool), Q_FF, TP, exact)) exit(1);
        /* decode: per-shape time inside the real sequence, best of `iters` token times */
        double shape_ns[8] = {0}, best_tok = 1e30;
        const int dit = exact ? 3 : iters;
        for (int it = 0; it < dit; it++) {
            double sn[8] = {0};
            uint64_t t0 = now_ns();
            for (int l = 0; l < Q_LAYERS; l++)
                for (int s = 0; s < 7; s++) {
                    uint64_t a = now_ns();
                    cpu_linear(pool, &sc, y, x, &L[l][s], 1);
                    sn[s] += (double)(now_ns() - a);
                }
            uint64_t a = now_ns();
            cpu_linear(pool, &sc, y, x, &head, 1);
            sn[7] += (double)(now_ns() - a);
            double tok = (double)(now_ns() - t0);
            if (tok < best_tok) {
                best_tok = tok;
                memcpy(shape_ns, sn, sizeof sn);
            }
        }
        printf("-- %s path, decode (T=1), best of %d tokens\n", exact ? "exact" : "fast", dit);
        printf("   %-10s %14s %10s %8s\n", "shape", "rows x cols", "us/call", "GB/s");
        for (int s = 0; s < 8; s++) {
            const wt_linear *w = s < 7 ? &L[0][s] : &head;
            double us = shape_ns[s] / 1e3 / (s < 7 ? Q_LAYERS : 1);
            printf("   %-10s %7lld x %-5lld %10.1f %8.2f\n", s < 7 ? shape_names[s] : "lm_head", (long long)w->rows,
                   (long long)w->cols, us, wt_linear_bytes(w) / (us * 1e3));
        }
        printf("   per token: %.2f ms -> %.1f tok/s, %.2f GB/s", best_tok / 1e6, 1e9 / best_tok, tok_bytes / best_tok);
        if (g_bw > 0) printf(", MBU %.2f (of %.1f GB/s)", tok_bytes / best_tok / g_bw, g_bw);
        printf("\n");
        /* prefill chunk of 256 tokens (exact: 2 layers, scaled) */
        const int nl = exact ? 2 : Q_LAYERS;
        double pn[7] = {0}, best_chunk = 1e30;
        for (int it = 0; it < (exact ? 1 : 3); it++) {
            double sn[7] = {0};
            uint64_t t0 = now_ns();
            for (int l = 0; l < nl; l++)
                for (int s = 0; s < 7; s++) {
                    uint64_t a = now_ns();
                    cpu_linear(pool, &sc, y, x, &L[l][s], TP);
                    sn[s] += (double)(now_ns() - a);
                }
            double ch = (double)(now_ns() - t0) * Q_LAYERS / nl;
            if (ch < best_chunk) {
                best_chunk = ch;
                memcpy(pn, sn, sizeof sn);
            }
        }
        printf("-- %s path, prefill chunk (T=%d)%s\n", exact ? "exact" : "fast", TP, exact ? ", 2 layers scaled to 28" : "");
        printf("   %-10s %10s %9s\n", "shape", "ms/call", "GFLOP/s");
        for (int s = 0; s < 7; s++) {
            double ms = pn[s] / 1e6 / nl;
            printf("   %-10s %10.2f %9.1f\n", shape_names[s], ms, 2.0 * shape_rc[s][0] * shape_rc[s][1] * TP / (ms * 1e6));
        }
        printf("   linears of 512 prompt tokens: %.3f s -> %.1f tok/s (linears only; attention, norms excluded)\n",
               2 * best_chunk / 1e9, 512.0 / (2 * best_chunk / 1e9));
        cpu_scratch_free(&sc);
    }
    st_pool_free(pool);
    st_free_aligned(x);
    st_free_aligned(y);
    layers_drop(L);
    weight_drop(&head);
}

/* Batched decode: the 28 layers' linears (fast path, no lm_head) at T = 1..16 rows per call,
 * best of `iters` steps each. */
static void bench_rows(const fmt_spec *f, int threads, int iters) {
    wt_linear (*L)[7] = layers_make(f);
    const int TM = 16;
    float *x = st_alloc_aligned((size_t)TM * Q_FF * 4), *y = st_alloc_aligned((size_t)TM * Q_FF * 4);
    for (size_t i = 0; i < (size_t)TM * Q_FF; i++) x[i] = rng_f();
    st_pool *pool = st_pool_init(threads);
    cpu_scratch sc;
    if (cpu_scratch_init(&sc, st_pool_threads(pool), Q_FF, 64, 0)) exit(1);
    printf("\n== %s: batched decode, 28 layers' linears (no lm_head), %d threads, best of %d steps\n", f->name,
           st_pool_threads(pool), iters);
    printf("   %4s %10s %10s %10s\n", "rows", "ms/step", "ms/row", "vs 1 row");
    const int Ts[] = {1, 2, 3, 4, 5, 6, 8, 12, 16};
    double t1 = 0;
    for (size_t k = 0; k < sizeof Ts / sizeof Ts[0]; k++) {
        const int T = Ts[k];
        double best = 1e30;
        for (int it = 0; it < iters; it++) {
            uint64_t t0 = now_ns();
            for (int l = 0; l < Q_LAYERS; l++)
                for (int s = 0; s < 7; s++) cpu_linear(pool, &sc, y, x, &L[l][s], T);
            double d = (double)(now_ns() - t0);
            if (d < best) best = d;
        }
        if (T == 1) t1 = best;
        fflush(stdout);
        printf("   %4d %10.2f %10.2f %9.2fx\n", T, best / 1e6, best / 1e6 / T, t1 * T / best);
    }
    cpu_scratch_free(&sc);
    st_pool_free(pool);
    st_free_aligned(x);
    st_free_aligned(y);
    layers_drop(L);
}

// ----------------------------------------------------------------------------
// attention

/* qwen3-0.6b attention: one layer's prefill chunk of 256 tokens at positions 256..511 (the
 * second chunk of a 512-token prompt), and a decode token at position 512 through 28 layers'
 * distinct K/V (the cache does not fit L3, as in the model), both paths. */
static void bench_attention(int threads, int iters, int do_exact) {
    const int T = 256, ctx = 1024, kvw = Q_HKV * Q_HD + (getenv("BENCH_KV_PAD") ? atoi(getenv("BENCH_KV_PAD")) : 0); /* row stride */
    float *q = st_alloc_aligned((size_t)T * Q_H * Q_HD * 4), *o = st_alloc_aligned((size_t)T * Q_H * Q_HD * 4);
    /* 28 layers' K/V like the model (121 MB at 1024 positions): decode streams it from DRAM */
    float *kc = st_alloc_aligned((size_t)Q_LAYERS * ctx * kvw * 4), *vc = st_alloc_aligned((size_t)Q_LAYERS * ctx * kvw * 4);
    if (getenv("BENCH_HUGE")) {
        free(kc), free(vc);
        size_t nb = (size_t)Q_LAYERS * ctx * kvw * 4;
        kc = aligned_alloc(1 << 21, nb), vc = aligned_alloc(1 << 21, nb);
        madvise(kc, nb, MADV_HUGEPAGE), madvise(vc, nb, MADV_HUGEPAGE);
    }
    for (size_t i = 0; i < (size_t)T * Q_H * Q_HD; i++) q[i] = rng_f();
    for (size_t i = 0; i < (size_t)Q_LAYERS * ctx * kvw; i++) kc[i] = rng_f(), vc[i] = rng_f();
    const float *kp[256], *vp[256];
    int32_t pos[256];
    for (int t = 0; t < T; t++) kp[t] = kc, vp[t] = vc, pos[t] = 256 + t;
    st_pool *pool = st_pool_init(threads);
    printf("\n== attention (16 heads, 8 KV heads, hd 128), %d threads\n", st_pool_threads(pool));
    for (int exact = do_exact ? 1 : 0; exact >= 0; exact--) {
        cpu_scratch sc;
        if (cpu_scratch_init(&sc, st_pool_threads(pool), ctx, T, exact)) exit(1);
        double bp = 1e30, bd = 1e30;
        for (int it = 0; it < (iters > 5 ? iters : 5); it++) {
            uint64_t a0 = now_ns();
            cpu_attention_kv(pool, &sc, o, q, kp, vp, pos, T, Q_H, Q_HKV, Q_HD, kvw, 0.088f);
            uint64_t a1 = now_ns();
            int32_t p1 = 512;
            for (int l = 0; l < Q_LAYERS; l++) {
                const float *kl = kc + (size_t)l * ctx * kvw, *vl = vc + (size_t)l * ctx * kvw;
                cpu_attention_kv(pool, &sc, o, q, &kl, &vl, &p1, 1, Q_H, Q_HKV, Q_HD, kvw, 0.088f);
            }
            uint64_t a2 = now_ns();
            if ((double)(a1 - a0) < bp) bp = (double)(a1 - a0);
            if ((double)(a2 - a1) / Q_LAYERS < bd) bd = (double)(a2 - a1) / Q_LAYERS;
        }
        printf("-- %s path: prefill chunk 256 @ 256..511: %.2f ms/layer (%.1f GFLOP/s) -> x 28 layers: %.0f ms; decode @ 512 (28 layers' K/V, from DRAM): %.1f us/layer (%.1f GB/s)\n",
               exact ? "exact" : "fast", bp / 1e6, 4.0 * Q_H * Q_HD * (256.0 * 256 + 256.0 * 257 / 2) / bp, bp * 28 / 1e6,
               bd / 1e3, 2.0 * 513 * Q_HKV * Q_HD * 4 / bd);
        cpu_scratch_free(&sc);
    }
    st_pool_free(pool);
    st_free_aligned(q);
    st_free_aligned(o);
    st_free_aligned(kc);
    st_free_aligned(vc);
}

// ----------------------------------------------------------------------------
// synthetic model

/* Appends tensor (name, dtype, shape) at offset *off of the data block; returns its index. */
typedef struct tlist {
    sft_tensor *t;
    size_t n, cap;
    size_t off;
} tlist;

static void tl_add(tlist *l, const char *name, sft_dtype dt, int64_t d0, int64_t d1) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = realloc(l->t, l->cap * sizeof *l->t);
    }
    sft_tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->dtype = dt;
    t->ndim = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->numel = d0 * (d1 ? d1 : 1);
    t->nbytes = (size_t)t->numel * (size_t)sft_dtype_bits(dt) / 8;
    t->begin = l->off;
    t->end = l->off + t->nbytes;
    l->off = (t->end + 63) & ~(uint64_t)63;
}

static void tl_linear(tlist *l, const char *path, int64_t rows, int64_t cols, const fmt_spec *f) {
    char n[256];
    if (f->qbits) {
        snprintf(n, sizeof n, "%s.weight", path);
        tl_add(l, n, SFT_U32, rows, cols * f->qbits / 32);
        snprintf(n, sizeof n, "%s.scales", path);
        tl_add(l, n, SFT_BF16, rows, cols / f->group);
        snprintf(n, sizeof n, "%s.biases", path);
        tl_add(l, n, SFT_BF16, rows, cols / f->group);
    } else {
        snprintf(n, sizeof n, "%s.weight", path);
        tl_add(l, n, SFT_BF16, rows, cols);
    }
}

/* Builds a random qwen3-0.6b in format f in memory. */
static model *synth_qwen3(const fmt_spec *f) {
    char cfg[1024];
    int n = snprintf(cfg, sizeof cfg,
                     "{\"model_type\":\"qwen3\",\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,"
                     "\"num_attention_heads\":%d,\"num_key_value_heads\":%d,\"head_dim\":%d,\"vocab_size\":%d,"
                     "\"max_position_embeddings\":40960,\"rms_norm_eps\":1e-6,\"rope_theta\":1000000,"
                     "\"tie_word_embeddings\":true,\"bos_token_id\":151643,\"eos_token_id\":151645%s",
                     Q_D, Q_FF, Q_LAYERS, Q_H, Q_HKV, Q_HD, Q_VOCAB, f->qbits ? "," : "}");
    if (f->qbits) snprintf(cfg + n, sizeof cfg - (size_t)n, "\"quantization\":{\"group_size\":%d,\"bits\":%d}}", f->group, f->qbits);
    st_err err = {0};
    model_desc d;
    if (model_desc_parse(&d, cfg, strlen(cfg), "synthetic qwen3-0.6b", &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return NULL;
    }
    tlist l = {0};
    char p[256];
    tl_linear(&l, "model.embed_tokens", Q_VOCAB, Q_D, f);
    tl_add(&l, "model.norm.weight", SFT_BF16, Q_D, 0);
    for (int i = 0; i < Q_LAYERS; i++) {
        const char *lin[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
        for (int s = 0; s < 7; s++) {
            snprintf(p, sizeof p, "model.layers.%d.%s", i, lin[s]);
            tl_linear(&l, p, shape_rc[s][0], shape_rc[s][1], f);
        }
        snprintf(p, sizeof p, "model.layers.%d.input_layernorm.weight", i);
        tl_add(&l, p, SFT_BF16, Q_D, 0);
        snprintf(p, sizeof p, "model.layers.%d.post_attention_layernorm.weight", i);
        tl_add(&l, p, SFT_BF16, Q_D, 0);
        snprintf(p, sizeof p, "model.layers.%d.self_attn.q_norm.weight", i);
        tl_add(&l, p, SFT_BF16, Q_HD, 0);
        snprintf(p, sizeof p, "model.layers.%d.self_attn.k_norm.weight", i);
        tl_add(&l, p, SFT_BF16, Q_HD, 0);
    }
    char *buf = NULL;
    if (posix_memalign((void **)&buf, 64, l.off)) return NULL;
    for (size_t i = 0; i < l.n; i++) l.t[i].data = buf + l.t[i].begin;
    for (size_t i = 0; i < l.n; i++) {
        sft_tensor *t = &l.t[i];
        size_t nl = strlen(t->name);
        if (t->ndim == 1) { /* norms: 1.0 */
            uint16_t *h = (uint16_t *)t->data;
            for (int64_t k = 0; k < t->numel; k++) h[k] = st_f32_to_bf16(1.0f);
        } else if (t->dtype == SFT_U32 || (!f->qbits && nl > 7 && !strcmp(t->name + nl - 7, ".weight"))) {
            /* weight [+ the scales and biases that follow it] */
            int64_t rows = t->shape[0], cols = f->qbits ? t->shape[1] * 32 / f->qbits : t->shape[1];
            fill_weight((void *)t->data, f->qbits ? (void *)l.t[i + 1].data : NULL, f->qbits ? (void *)l.t[i + 2].data : NULL,
                        rows, cols, f->qbits, f->group);
        }
    }
    sft_set set;
    if (sft_set_from_memory(&set, l.t, l.n, buf, "synthetic", &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return NULL;
    }
    model *m = NULL;
    if (model_bind(&m, &d, &set, NULL, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return NULL;
    }
    return m;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Decode and 512-token prefill through model_forward on a synthetic qwen3-0.6b. */
static void bench_model(const fmt_spec *f, int threads, int gen, int start_pos, int do_exact) {
    double t0 = st_time_s();
    model *m = synth_qwen3(f);
    if (!m) exit(1);
    printf("\n== model: synthetic qwen3-0.6b %s, %.1f MB of weights per token, built in %.1f s\n", f->name,
           m->weight_bytes / 1e6, st_time_s() - t0);
    const int V = m->desc.n_vocab, P = 512;
    float *logits = malloc((size_t)V * sizeof(float));
    const int ntok = (start_pos > P ? start_pos : P) + gen + 8; /* decode reads toks[start_pos + i], i < gen + 4 */
    int32_t *toks = malloc((size_t)ntok * sizeof(int32_t));
    for (int i = 0; i < ntok; i++) toks[i] = (int32_t)(rng_u64() % (uint64_t)V);
    float *ref_logits = malloc((size_t)V * sizeof(float));
    for (int exact = do_exact ? 1 : 0; exact >= 0; exact--) {
        model_ctx_opts o = {.max_ctx = ntok > 1024 ? ntok : 1024, .n_slots = 1, .max_batch = 256, .n_threads = threads, .exact = exact};
        model_ctx *c = NULL;
        st_err err = {0};
        if (model_ctx_init(&c, m, &o, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            exit(1);
        }
        /* prefill 512 (exact: skipped, minutes) */
        double pre = 0, pre_pool = 0, pre_busy = 0;
        if (!exact && !g_no_prefill)
            for (int rep = 0; rep < 3; rep++) {
                st_pool_stats_reset(model_ctx_pool(c));
                double a = now_ns() / 1e9;
                if (model_forward_seq(c, toks, P, 0, logits, LOGITS_LAST, &err)) {
                    fprintf(stderr, "%s\n", err.msg);
                    exit(1);
                }
                double d = now_ns() / 1e9 - a;
                uint64_t busy, wall;
                st_pool_stats(model_ctx_pool(c), &busy, &wall);
                if (rep == 0 || d < pre) pre = d, pre_pool = wall / 1e9, pre_busy = busy / 1e9;
            }
        /* decode: 16-token prompt, then gen steps; per-step times */
        const int g = exact ? 4 : gen, start = exact ? 16 : start_pos;
        if (exact || start <= 16) model_forward_seq(c, toks, start, 0, logits, LOGITS_LAST, &err); /* else: the prefill's K/V */
        double *st = malloc((size_t)g * sizeof(double)), sum = 0;
        for (int i = 0; i < g; i++) {
            double a = now_ns() / 1e9;
            if (model_forward_seq(c, &toks[start + i], 1, start + i, logits, LOGITS_LAST, &err)) {
                fprintf(stderr, "%s\n", err.msg);
                exit(1);
            }
            st[i] = now_ns() / 1e9 - a;
            sum += st[i];
        }
        /* the same 16 + 4 tokens' final logits through both paths: fast vs exact */
        if (exact || do_exact) {
            if (g != 4) {
                for (int i = 0; i < 4; i++) model_forward_seq(c, &toks[start + i], 1, start + i, logits, LOGITS_LAST, &err);
            }
            if (exact) memcpy(ref_logits, logits, (size_t)V * sizeof(float));
            else {
                double md = 0, mr = 0;
                for (int i = 0; i < V; i++) {
                    double d = fabs((double)logits[i] - ref_logits[i]);
                    md = d > md || d != d ? d : md;
                    mr = fabs(ref_logits[i]) > mr ? fabs(ref_logits[i]) : mr;
                }
                printf("   fast vs exact logits after %d tokens: max|dlogit| %.3g, max|logit| %.3g, ratio %.2e\n", start + 4, md, mr,
                       md / mr);
            }
        }
        qsort(st, (size_t)g, sizeof(double), cmp_double);
        double p50 = st[g / 2], mean = sum / g;
        /* KV read at the median position: 2 * layers * pos * kv_dim * 4 bytes */
        double kv = 2.0 * Q_LAYERS * (start + g / 2) * Q_HKV * Q_HD * 4;
        printf("-- %s path: decode %d tokens (pos %d..%d): p50 %.2f ms, mean %.2f ms, min %.2f ms -> %.1f tok/s (p50)",
               exact ? "exact" : "fast", g, start, start + g - 1, p50 * 1e3, mean * 1e3, st[0] * 1e3, 1.0 / p50);
        if (g_bw > 0)
            printf(", MBU %.2f weights-only / %.2f with KV (of %.1f GB/s)", m->weight_bytes / p50 / 1e9 / g_bw,
                   (m->weight_bytes + kv) / p50 / 1e9 / g_bw, g_bw);
        printf("\n");
        if (!exact && !g_no_prefill)
            printf("   prefill %d tokens (max_batch 256, LOGITS_LAST): %.2f s -> %.1f tok/s; %.2f s inside pool regions "
                   "(threads busy %.2f s), %.2f s serial\n",
                   P, pre, P / pre, pre_pool, pre_busy, pre - pre_pool);
        free(st);
        model_ctx_free(c);
    }
    free(logits);
    free(ref_logits);
    free(toks);
    model_free(m);
}

// ----------------------------------------------------------------------------
// hot: the decode kernel with its weight in cache

/* The fast decode linear (T = 1) on one gate_proj-shaped weight (3072 x 1024, 1.8 MB at
 * q4g64: stays in L3), called `iters` x 50 times: the kernel's compute ceiling in GB/s of
 * weight bytes, without DRAM. Against `linear` (the real, DRAM-streaming sequence) it says
 * whether decode is bound by instructions or by memory. Best of 5 rounds. */
static void bench_hot(const fmt_spec *f, int threads, int iters) {
    wt_linear w;
    if (weight_make(&w, Q_FF, Q_D, f->qbits, f->group)) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    float *x = st_alloc_aligned((size_t)Q_FF * 4), *y = st_alloc_aligned((size_t)Q_FF * 4);
    for (int i = 0; i < Q_FF; i++) x[i] = rng_f();
    st_pool *pool = st_pool_init(threads);
    cpu_scratch sc;
    if (cpu_scratch_init(&sc, st_pool_threads(pool), Q_FF, 8, 0)) exit(1);
    const int n = 50 * iters;
    double best = 1e30;
    for (int round = 0; round < 5; round++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < n; i++) cpu_linear(pool, &sc, y, x, &w, 1);
        const double dt = (double)(now_ns() - t0) / n;
        best = dt < best ? dt : best;
    }
    printf("hot %s %lld x %lld, T=1, %d threads: %.1f us/call, %.2f GB/s of weights (best of 5 x %d calls)\n", f->name,
           (long long)w.rows, (long long)w.cols, st_pool_threads(pool), best * 1e-3, (double)wt_linear_bytes(&w) / best, n);
    cpu_scratch_free(&sc);
    st_pool_free(pool);
    st_free_aligned(x);
    st_free_aligned(y);
    weight_drop(&w);
}

// ----------------------------------------------------------------------------
// main

int main(int argc, char **argv) {
    const char *what = "all", *fmt = "both";
    int threads = 0, iters = 10, gen = 64, do_exact = 1, start_pos = 16;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--fmt") && i + 1 < argc) fmt = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gen") && i + 1 < argc) gen = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--pos") && i + 1 < argc) start_pos = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-exact")) do_exact = 0;
        else if (!strcmp(argv[i], "--cpu-time")) g_cpu_time = 1;
        else if (!strcmp(argv[i], "--no-prefill")) g_no_prefill = 1;
        else if (argv[i][0] != '-') what = argv[i];
        else {
            fprintf(stderr, "usage: bench_cpu_kernels [bw|linear|attention|model|rows|hot|all] [--fmt q4g64|bf16|both] [--threads N] "
                            "[--iters N] [--gen N] [--pos N] [--no-prefill] [--no-exact] [--cpu-time]\n");
            return 2;
        }
    }
    if (iters < 1) iters = 1;
    if (g_cpu_time && threads != 1) {
        fprintf(stderr, "--cpu-time needs --threads 1\n");
        return 2;
    }
    if (gen < 2) gen = 2;
    printf("cpus %d, avx2 %d, avx512 %d\n", st_cpu_count(), st_cpu_has_avx2(), st_cpu_has_avx512());
    g_bw = measure_bw(threads > 0 ? threads : st_cpu_count());
    printf("read bandwidth: %.1f GB/s with %d threads, %.1f GB/s with 1 (streaming sum of 1 GiB, best of 5)\n", g_bw,
           threads > 0 ? threads : st_cpu_count(), measure_bw(1));
    const fmt_spec fmts[2] = {{"q4g64", 4, 64}, {"bf16", 0, 0}};
    for (int k = 0; k < 2; k++) {
        if (strcmp(fmt, "both") && strcmp(fmt, fmts[k].name)) continue;
        if (!strcmp(what, "linear") || !strcmp(what, "all")) bench_linear(&fmts[k], threads, iters, do_exact);
        if (!strcmp(what, "model") || !strcmp(what, "all")) bench_model(&fmts[k], threads, gen, start_pos, do_exact);
        if (!strcmp(what, "hot")) bench_hot(&fmts[k], threads, iters);
        if (!strcmp(what, "rows")) bench_rows(&fmts[k], threads, iters);
    }
    if (!strcmp(what, "attention") || !strcmp(what, "all")) bench_attention(threads, iters, do_exact);
    return 0;
}
