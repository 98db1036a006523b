/* cpu_ops.c — CPU reference ops (see cpu_ops.h). Float32 throughout; SIMD where it is free.
 * With a scratch initialised for the fast path (exact = 0), cpu_linear and cpu_attention hand
 * off to the kernels of cpu_simd.c; the code below stays the reference they are tested against. */
#include "cpu_ops.h"

#include "cpu_simd.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* scratch */

int cpu_scratch_init(cpu_scratch *s, int n_threads, size_t row_cap, int max_batch, int exact) {
    memset(s, 0, sizeof *s);
    s->n_threads = n_threads;
    s->row_cap = (row_cap + 15) & ~(size_t)15;
    s->exact = exact ? 1 : 0;
    s->max_batch = max_batch < 8 ? 8 : max_batch;
    s->simd = exact ? CPU_SIMD_NONE : cpu_simd_level();
    s->actq = !exact && !getenv("STRATA_NO_ACTQ");
    s->actq_gemm = s->actq && !getenv("STRATA_NO_ACTQ_GEMM");
    s->actq8 = s->actq && !getenv("STRATA_NO_ACTQ8");
    const char *ms = getenv("STRATA_MV_SPLIT");
    s->mv_split = ms && *ms ? atoi(ms) : 8;
    s->buf = st_alloc_aligned((size_t)n_threads * s->row_cap * sizeof(float));
    if (!s->buf) return ST_ERR_NOMEM;
    if (s->simd >= CPU_SIMD_AVX2) {
        size_t xp_n, tb_n;
        s->tbuf_cap = cpu_simd_tbuf_floats(s->row_cap, s->max_batch);
        if (st_mul_size(((size_t)s->max_batch + 8) * sizeof(float), s->row_cap, &xp_n) ||
            st_mul_size(s->tbuf_cap * sizeof(float), (size_t)n_threads, &tb_n))
            return ST_ERR_NOMEM;
        s->xp = st_alloc_aligned(xp_n);
        s->xs = st_alloc_aligned(4 * (s->row_cap / 32 + 32) * sizeof(float));
        s->tbuf = st_alloc_aligned(tb_n);
        s->ap_cap = getenv("STRATA_ATTN_NOSPLIT") ? 0 : cpu_simd_attn_floats(s->row_cap);
        s->ap = s->ap_cap ? st_alloc_aligned(s->ap_cap * sizeof(float)) : NULL;
        if (!s->xp || !s->xs || !s->tbuf || (s->ap_cap && !s->ap)) return ST_ERR_NOMEM;
    }
    return ST_OK;
}

void cpu_scratch_free(cpu_scratch *s) {
    st_free_aligned(s->buf);
    st_free_aligned(s->xp);
    st_free_aligned(s->xs);
    st_free_aligned(s->tbuf);
    st_free_aligned(s->ap);
    memset(s, 0, sizeof *s);
}

static inline float *scratch_row(cpu_scratch *s, int thread) { return s->buf + (size_t)thread * s->row_cap; }

/* ------------------------------------------------------------------------------------------ */
/* dot products */

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static int g_have_avx2 = -1;

float cpu_dot(const float *a, const float *b, int64_t n) {
    if (g_have_avx2 < 0) g_have_avx2 = st_cpu_has_avx2() && !getenv("STRATA_NO_SIMD");
    return g_have_avx2 ? dot_avx2(a, b, n) : dot_scalar(a, b, n);
}

/* ------------------------------------------------------------------------------------------ */
/* weight rows */

static inline float load_half(const void *p, int64_t i, sft_dtype dt) {
    uint16_t h;
    memcpy(&h, (const char *)p + 2 * i, 2);
    return dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
}

static inline float load_scale(const void *p, size_t i, sft_dtype dt) {
    if (dt == SFT_F32) {
        float f;
        memcpy(&f, (const char *)p + 4 * i, 4);
        return f;
    }
    return load_half(p, (int64_t)i, dt);
}

void cpu_weight_row(const wt_linear *w, int64_t r, float *dst) {
    const char *row = (const char *)w->w + (size_t)r * w->row_bytes;
    const int64_t n = w->cols;
    if (!w->qbits) {
        if (w->dtype == SFT_F32) {
            memcpy(dst, row, (size_t)n * 4);
        } else if (w->dtype == SFT_BF16) {
            const uint16_t *h = (const uint16_t *)row;
            for (int64_t i = 0; i < n; i++) dst[i] = st_bf16_to_f32(h[i]);
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = load_half(row, i, SFT_F16);
        }
        return;
    }
    const uint32_t *q = (const uint32_t *)row;
    const int bits = w->qbits, g = w->group;
    const size_t so = (size_t)r * w->srow_elems;
    for (int64_t gi = 0; gi < n / g; gi++) {
        const float s = load_scale(w->scales, so + (size_t)gi, w->sdtype);
        const float b = load_scale(w->biases, so + (size_t)gi, w->sdtype);
        float *d = dst + gi * g;
        const size_t v0 = (size_t)gi * (size_t)g;
        if (bits == 4) {
            const uint32_t *wq = q + v0 / 8;
            for (int k = 0; k < g / 8; k++) {
                uint32_t x = wq[k];
                for (int j = 0; j < 8; j++) d[k * 8 + j] = s * (float)((x >> (4 * j)) & 15u) + b;
            }
        } else if (bits == 8) {
            const uint32_t *wq = q + v0 / 4;
            for (int k = 0; k < g / 4; k++) {
                uint32_t x = wq[k];
                for (int j = 0; j < 4; j++) d[k * 4 + j] = s * (float)((x >> (8 * j)) & 255u) + b;
            }
        } else {
            for (int j = 0; j < g; j++) d[j] = s * (float)cpu_mlx_q_get(q, bits, v0 + (size_t)j) + b;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* linear */

typedef struct linear_job {
    float *out;
    const float *x;
    const wt_linear *w;
    int T;
    int64_t rows_per_task;
    cpu_scratch *s;
} linear_job;

static void linear_task(void *ctx, int task, int n_tasks, int thread) {
    linear_job *j = ctx;
    const wt_linear *w = j->w;
    int64_t r0 = task * j->rows_per_task, r1 = r0 + j->rows_per_task;
    if (r1 > w->rows) r1 = w->rows;
    float *row = scratch_row(j->s, thread);
    const int64_t cols = w->cols, rows = w->rows;
    for (int64_t r = r0; r < r1; r++) {
        const float *wr;
        if (!w->qbits && w->dtype == SFT_F32) {
            wr = (const float *)((const char *)w->w + (size_t)r * w->row_bytes);
        } else {
            cpu_weight_row(w, r, row);
            wr = row;
        }
        for (int t = 0; t < j->T; t++) j->out[(size_t)t * rows + r] = cpu_dot(j->x + (size_t)t * cols, wr, cols);
    }
}

void cpu_linear(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T) {
    ST_ASSERT((size_t)w->cols <= s->row_cap);
    if (!s->exact && s->simd >= CPU_SIMD_AVX2) {
        cpu_linear_fast(pool, s, out, x, w, T);
        return;
    }
    int nt = st_pool_threads(pool);
    int64_t rows = w->rows;
    int64_t per = (rows + (int64_t)nt * 8 - 1) / ((int64_t)nt * 8);
    if (per < 4) per = 4;
    int n_tasks = (int)((rows + per - 1) / per);
    linear_job j = {out, x, w, T, per, s};
    st_pool_run(pool, linear_task, &j, n_tasks);
}

/* ------------------------------------------------------------------------------------------ */
/* elementwise */

void cpu_embed(float *out, const int32_t *tokens, int T, const wt_linear *table) {
    for (int t = 0; t < T; t++) cpu_weight_row(table, tokens[t], out + (size_t)t * table->cols);
}

void cpu_rmsnorm(float *out, const float *x, const float *w, int64_t n_rows, int n, float eps) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / n + (double)eps));
        for (int i = 0; i < n; i++) o[i] = xr[i] * inv * w[i];
    }
}

typedef struct rms_job {
    float *out;
    const float *x, *w;
    int64_t n_rows, per;
    int n;
    float eps;
} rms_job;

static void rms_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const rms_job *j = ctx;
    const int64_t r0 = task * j->per, r1 = r0 + j->per < j->n_rows ? r0 + j->per : j->n_rows;
    cpu_rmsnorm_fast(j->out, j->x, j->w, r0, r1, j->n, j->eps);
}

void cpu_rmsnorm_s(st_pool *pool, const cpu_scratch *s, float *out, const float *x, const float *w, int64_t n_rows, int n,
                   float eps) {
    if (s->exact || s->simd < CPU_SIMD_AVX2) {
        cpu_rmsnorm(out, x, w, n_rows, n, eps);
        return;
    }
    const int nt = st_pool_threads(pool);
    if (nt == 1 || n_rows * n < 16384) { /* decode-sized: a pool hand-out costs more than the op */
        cpu_rmsnorm_fast(out, x, w, 0, n_rows, n, eps);
        return;
    }
    const int64_t per = (n_rows + 4 * nt - 1) / (4 * nt);
    rms_job j = {out, x, w, n_rows, per, n, eps};
    st_pool_run(pool, rms_task, &j, (int)((n_rows + per - 1) / per));
}

void cpu_rope_s(const cpu_scratch *s, float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot) {
    if (s->exact || s->simd < CPU_SIMD_AVX2) cpu_rope(x, cs, T, n_heads, head_dim, n_rot);
    else cpu_rope_fast(x, cs, T, n_heads, head_dim, n_rot);
}

void cpu_rope_table(float *cs, const int32_t *pos, int T, const double *inv_freq, int n_rot) {
    int half = n_rot / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            double a = (double)pos[t] * inv_freq[i];
            cs[((size_t)t * half + i) * 2] = (float)cos(a);
            cs[((size_t)t * half + i) * 2 + 1] = (float)sin(a);
        }
}

void cpu_rope(float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot) {
    int half = n_rot / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cs + (size_t)t * half * 2;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half], co = c[2 * i], si = c[2 * i + 1];
                v[i] = x1 * co - x2 * si;
                v[i + half] = x2 * co + x1 * si;
            }
        }
    }
}

void cpu_swiglu(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void cpu_swiglu_s(const cpu_scratch *s, float *out, const float *gate, const float *up, int64_t n) {
    if (!s->exact && s->simd >= CPU_SIMD_AVX2) cpu_swiglu_fast(out, gate, up, n);
    else cpu_swiglu(out, gate, up, n);
}

void cpu_add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* Element-wise ops split over the pool in chunks of `per` values (a multiple of 16: chunk
 * borders fall on cache lines and on the 8-lane steps of the vector kernels, so every element
 * takes the same code path, and gets the same bits, as in one serial call). */
typedef struct ew_job {
    float *out;
    const float *a, *b;
    int64_t n, per;
    int swiglu;           /* 1: out = silu(a) * b; 0: out += a (out == x of cpu_add) */
    const cpu_scratch *s;
} ew_job;

static void ew_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const ew_job *j = ctx;
    const int64_t i0 = task * j->per, i1 = i0 + j->per < j->n ? i0 + j->per : j->n;
    if (j->swiglu) cpu_swiglu_s(j->s, j->out + i0, j->a + i0, j->b + i0, i1 - i0);
    else cpu_add(j->out + i0, j->a + i0, i1 - i0);
}

#define EW_MIN 32768 /* values below which a pool hand-out costs more than the op (decode sizes) */

static void ew_run(st_pool *pool, ew_job *j) {
    const int nt = pool ? st_pool_threads(pool) : 1;
    if (nt == 1 || j->n < EW_MIN) {
        ew_task(j, 0, 1, 0);
        return;
    }
    j->per = ((j->n + 4 * nt - 1) / (4 * nt) + 15) & ~(int64_t)15;
    st_pool_run(pool, ew_task, j, (int)((j->n + j->per - 1) / j->per));
}

void cpu_swiglu_p(st_pool *pool, const cpu_scratch *s, float *out, const float *gate, const float *up, int64_t n) {
    ew_job j = {.out = out, .a = gate, .b = up, .n = n, .per = n, .swiglu = 1, .s = s};
    ew_run(pool, &j);
}

void cpu_add_p(st_pool *pool, float *x, const float *y, int64_t n) {
    ew_job j = {.out = x, .a = y, .n = n, .per = n, .swiglu = 0};
    ew_run(pool, &j);
}

/* ------------------------------------------------------------------------------------------ */
/* attention */

typedef struct attn_job {
    float *out;
    const float *q;
    const float *const *k;
    const float *const *v;
    const int32_t *pos;
    int n_head, n_head_kv, hd;
    float scale;
    cpu_scratch *s;
    size_t kvw; /* floats between consecutive positions' cache rows */
} attn_job;

static void attn_task(void *ctx, int task, int n_tasks, int thread) {
    attn_job *j = ctx;
    int t = task / j->n_head, h = task % j->n_head;
    int kvh = h / (j->n_head / j->n_head_kv);
    const int hd = j->hd;
    const size_t kvw = j->kvw;
    const float *q = j->q + ((size_t)t * j->n_head + h) * hd;
    const float *kc = j->k[t] + (size_t)kvh * hd, *vc = j->v[t] + (size_t)kvh * hd;
    float *sc = scratch_row(j->s, thread);
    int n = j->pos[t] + 1;
    float mx = -INFINITY;
    for (int p = 0; p < n; p++) {
        float d = cpu_dot(q, kc + (size_t)p * kvw, hd) * j->scale;
        sc[p] = d;
        if (d > mx) mx = d;
    }
    double sum = 0;
    for (int p = 0; p < n; p++) {
        sc[p] = expf(sc[p] - mx);
        sum += sc[p];
    }
    float inv = (float)(1.0 / sum);
    float *o = j->out + ((size_t)t * j->n_head + h) * hd;
    for (int i = 0; i < hd; i++) o[i] = 0;
    for (int p = 0; p < n; p++) {
        float a = sc[p] * inv;
        const float *vr = vc + (size_t)p * kvw;
        for (int i = 0; i < hd; i++) o[i] += a * vr[i];
    }
}

void cpu_attention(st_pool *pool, cpu_scratch *s, float *out, const float *q, const float *const *kslot,
                   const float *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                   float scale) {
    cpu_attention_kv(pool, s, out, q, kslot, vslot, pos, T, n_head, n_head_kv, hd, (size_t)n_head_kv * hd, scale);
}

void cpu_attention_kv(st_pool *pool, cpu_scratch *s, float *out, const float *q, const float *const *kslot,
                      const float *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                      size_t kv_stride, float scale) {
    ST_ASSERT(kv_stride >= (size_t)n_head_kv * hd);
    if (!s->exact && s->simd >= CPU_SIMD_AVX2 && hd % 8 == 0) {
        cpu_attention_fast(pool, s, out, q, (const void *const *)kslot, (const void *const *)vslot, 4, pos, T, n_head,
                           n_head_kv, hd, kv_stride, scale);
        return;
    }
    for (int t = 0; t < T; t++) ST_ASSERT((size_t)pos[t] < s->row_cap);
    attn_job j = {out, q, kslot, vslot, pos, n_head, n_head_kv, hd, scale, s, kv_stride};
    st_pool_run(pool, attn_task, &j, T * n_head);
}

int cpu_kv_f16_ok(const cpu_scratch *s, int hd) { return !s->exact && s->simd >= CPU_SIMD_AVX2 && hd % 8 == 0; }

void cpu_kv_store_f16(const cpu_scratch *s, uint16_t *dst, const float *x, int64_t n) {
    ST_ASSERT(s->simd >= CPU_SIMD_AVX2);
    cpu_f16_row_fast(dst, x, n);
}

void cpu_attention_f16(st_pool *pool, cpu_scratch *s, float *out, const float *q, const uint16_t *const *kslot,
                       const uint16_t *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                       float scale) {
    ST_ASSERT(cpu_kv_f16_ok(s, hd));
    cpu_attention_fast(pool, s, out, q, (const void *const *)kslot, (const void *const *)vslot, 2, pos, T, n_head,
                       n_head_kv, hd, (size_t)n_head_kv * hd, scale);
}
