/* cpu_simd.c — the CPU fast path: SIMD linear (decode + prefill), attention and SwiGLU.
 *
 * Every kernel here has a float32 reference in cpu_ops.c; tests/unit/test_cpu_ops.c checks each
 * bits x group x dtype x token-count combination against it (and the int16-activation kernels
 * against an emulation of their rounding). Functions are compiled for their ISA with target
 * attributes and chosen at run time (cpu_simd_level), so the library still runs without AVX2.
 *
 * Linear, T <= MV_MAX_T tokens (decode): one pass over the weights, rows split over the pool
 * in tasks of 16..256 rows, each row decoded in registers and dotted with the T activation
 * rows, which are prepared once per call:
 *   - 4-bit MLX weights (scratch actq8; dense models): activations quantized to int8 per
 *     32-value block, vpmaddubsw on the nibbles (q8_prep / mv4i8_rows_avx2): ~11 instructions
 *     per 64 weights, errors ~0.4% of the block maximum (golden.json's bf16 criteria);
 *   - 2/4/8-bit MLX weights: activations quantized to int16 per 32-value block, weight bytes
 *     widened to 16-bit lanes, vpmaddwd into int32 (q16_prep / mv8_unit): ~17 instructions
 *     per 64 4-bit weights against ~46 for a float decode, and errors ~1.5e-5 of the block
 *     maximum, well inside the fp32 golden tolerance (routing decisions included);
 *   - 3/5/6-bit weights: float kernels, whole packs per 32-bit lane, the group trick of
 *     cpu_simd.h, activations permuted to match (the "xp layout", perm_x);
 *   - bf16/f16/f32 rows converted in registers (bf16: even/odd halves of each dword).
 * A call of 5 to mv_split (default 8) rows, batched decode of several sequences, runs as
 * balanced passes of <= MV_MAX_T rows (cpu_linear_fast): cheaper than the GEMM below, and each
 * row's result is bit-identical to the row alone (so is attention's, below).
 *
 * Linear, T > MV_MAX_T (prefill): the activations are packed into panels of 6 tokens
 * ([k][6]); each pool task dequantizes GM_TILES tiles of 16 weight rows once into f32
 * ([k][16], through 8x8 register transposes), then runs a 6x16 register-blocked FMA kernel
 * over every panel, blocked over k so a tile's slice stays in L1. Weights are read once per
 * chunk of max_batch tokens. 4-bit weights (with actq) take an integer variant instead: int8
 * (g8_*, with actq8: activations quantized per 32-block as in the int8 decode, weights expanded
 * to byte codes per tile, a 4x16 vpmaddubsw kernel) or int16 (gq_*: 64-blocks, weights widened
 * to int16 per tile, a 4x16 vpmaddwd kernel; ~1.15x the float GEMM per core on Zen 3).
 *
 * Attention, T > MV_MAX_T (prefill): up to 8 (token, query head) rows that share a KV head per
 * task, one per vector lane: scores 4 rows x 2 positions per register block, lane-wise softmax,
 * P V with up to 8 output vectors in registers over all positions.
 * Attention, T <= MV_MAX_T (decode): split-K over positions (fd_*): tasks of (token, chunk of
 * positions) stream the chunk's K and V rows of all KV heads in memory order, online softmax,
 * then a fold of the chunks per (token, head) in a fixed order (batch invariant); T up to
 * mv_split as balanced calls of <= MV_MAX_T rows.
 */
#include "cpu_simd.h"

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INL static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))
#define AVX512_INL static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))

#define MV_MAX_T 4     /* token rows handled by the fused matrix-vector kernels          */
#ifndef MV_PF
#define MV_PF 4096     /* integer decode kernels: weight bytes prefetched ahead (rows are
                        * contiguous, so this runs into the next rows; the hardware prefetcher
                        * alone left one core ~1/3 slower on DRAM-resident weights)          */
#endif
#define GM_ROWS 16     /* weight rows per GEMM tile (two ymm of outputs)                 */
#ifndef GM_TILES
#define GM_TILES 2     /* 16-row tiles per pool task (activation k-block reused from L2)  */
#endif
#define GM_TOK 6       /* tokens per GEMM panel (six broadcasts per k)                   */
#ifndef GQ_TOK
#define GQ_TOK 4       /* tokens per int16 GEMM panel (<= GM_TOK)                         */
#endif
#ifndef GM_KC
#define GM_KC 256      /* k per L1 block in the GEMM (16 rows x 256 x 4 B = 16 KiB)      */
#endif

/* ------------------------------------------------------------------------------------------ */
/* level detection                                                                            */

static _Atomic int g_level = -1;

static int level_detect(void) {
    if (getenv("STRATA_NO_SIMD")) return CPU_SIMD_NONE;
    __builtin_cpu_init();
    if (!st_cpu_has_avx2() || !__builtin_cpu_supports("f16c")) return CPU_SIMD_NONE;
    const char *cap = getenv("STRATA_SIMD");
    if (cap && !strcmp(cap, "avx2")) return CPU_SIMD_AVX2;
    return __builtin_cpu_supports("avx512f") ? CPU_SIMD_AVX512 : CPU_SIMD_AVX2;
}

int cpu_simd_level(void) {
    int l = atomic_load_explicit(&g_level, memory_order_relaxed);
    if (l < 0) {
        l = level_detect();
        atomic_store_explicit(&g_level, l, memory_order_relaxed);
    }
    return l;
}

/* Floats per group-sum / row-scale array for row_cap columns (groups >= 32, +16 padding so
 * kernels may load a full vector past the last group). */
static size_t ng_cap(size_t row_cap) { return (row_cap / 32 + 16 + 15) & ~(size_t)15; }

size_t cpu_simd_tbuf_floats(size_t row_cap, int max_batch) {
    size_t R = (row_cap + 15) & ~(size_t)15;
    size_t panels = (size_t)(max_batch + GM_TOK - 1) / GM_TOK + 1;
    return (GM_TILES * 16 + 8) * R + GM_TILES * panels * GM_TOK * GM_ROWS + 2 * ng_cap(row_cap) + 64;
}

/* ------------------------------------------------------------------------------------------ */
/* layouts and small helpers                                                                  */

/* Values per 32-bit lane in the decode layout: 8-value packs for 2..5 bits, 4-value packs
 * for 6 and 8 bits, 2 for bf16 (even/odd halves of a dword), 1 for f16/f32. */
static int lane_values(const wt_linear *w) {
    if (w->qbits) return w->qbits == 6 || w->qbits == 8 ? 4 : 8;
    return w->dtype == SFT_BF16 ? 2 : 1;
}

/* The xp layout for L lanes of P values: within each full block of L*P values,
 * xp[b*L*P + s*L + k] = x[b*L*P + P*k + s] (value s of lane k); the tail past the last full
 * block keeps x's order. A kernel that decodes value s of all lanes into one vector then
 * multiplies it with the contiguous xp[b*L*P + s*L ...]. */
static void perm_x(float *xp, const float *x, int64_t cols, int P, int L) {
    const int64_t B = (int64_t)L * P, nb = cols / B;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * B;
        float *o = xp + b * B;
        for (int s = 0; s < P; s++)
            for (int k = 0; k < L; k++) o[s * L + k] = xb[P * k + s];
    }
    for (int64_t i = nb * B; i < cols; i++) xp[i] = x[i];
}

/* xs[gi] = sum of x over group gi (ng groups of g, a multiple of 32), zero-padded by 16. */
static AVX2_FN void group_sums(float *xs, const float *x, int64_t ng, int g) {
    for (int64_t gi = 0; gi < ng; gi++) {
        const float *xg = x + gi * g;
        __m256 a = _mm256_add_ps(_mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8));
        __m256 b = _mm256_add_ps(_mm256_loadu_ps(xg + 16), _mm256_loadu_ps(xg + 24));
        for (int i = 32; i < g; i += 32) {
            a = _mm256_add_ps(a, _mm256_add_ps(_mm256_loadu_ps(xg + i), _mm256_loadu_ps(xg + i + 8)));
            b = _mm256_add_ps(b, _mm256_add_ps(_mm256_loadu_ps(xg + i + 16), _mm256_loadu_ps(xg + i + 24)));
        }
        a = _mm256_add_ps(a, b);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        xs[gi] = _mm_cvtss_f32(h);
    }
    memset(xs + ng, 0, 16 * sizeof(float));
}

AVX2_INL float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

AVX2_INL __m256i load2x128(const void *hi, const void *lo) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}

/* dst[0..n) = n scale/bias values of dtype dt starting at element off of p, as f32;
 * dst[n..n+16) = 0. */
AVX2_INL void cvt_f32(float *dst, const void *p, size_t off, int64_t n, sft_dtype dt) {
    int64_t i = 0;
    if (dt == SFT_BF16) {
        const uint16_t *h = (const uint16_t *)p + off;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i))), 16)));
        for (; i < n; i++) {
            uint16_t v;
            memcpy(&v, h + i, 2);
            dst[i] = st_bf16_to_f32(v);
        }
    } else if (dt == SFT_F16) {
        const uint16_t *h = (const uint16_t *)p + off;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
        for (; i < n; i++) {
            uint16_t v;
            memcpy(&v, h + i, 2);
            dst[i] = st_f16_to_f32(v);
        }
    } else {
        memcpy(dst, (const float *)p + off, (size_t)n * sizeof(float));
    }
    memset(dst + n, 0, 16 * sizeof(float));
}

/* sum a[i] * b[i] for i < n (short vectors: group sums x biases). */
AVX2_INL float dot_short(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum8(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* sum over gi < n of b[off + gi] * xs[gi] with b of dtype dt (bf16 / f16 / f32), as a vector
 * of partial sums plus a scalar tail *rest (the bias term of a quantized row, no staging). */
AVX2_INL __m256 bias_dot(const void *b, size_t off, int64_t n, sft_dtype dt, const float *xs, float *rest) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    float r = 0;
    if (dt == SFT_BF16) {
        const uint16_t *h = (const uint16_t *)b + off;
        for (; i + 8 <= n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i))), 16)),
                                  _mm256_loadu_ps(xs + i), acc);
    } else if (dt == SFT_F16) {
        const uint16_t *h = (const uint16_t *)b + off;
        for (; i + 8 <= n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), _mm256_loadu_ps(xs + i), acc);
    } else {
        const float *f = (const float *)b + off;
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(f + i), _mm256_loadu_ps(xs + i), acc);
    }
    for (; i < n; i++) {
        uint16_t h;
        float v;
        if (dt == SFT_F32) memcpy(&v, (const float *)b + off + i, 4);
        else {
            memcpy(&h, (const uint16_t *)b + off + i, 2);
            v = dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
        }
        r += v * xs[i];
    }
    *rest = r;
    return acc;
}

/* exp(x) for 8 floats: Cephes expf (range reduction by ln2 in two parts, degree-5
 * polynomial), within 2 ulp of expf on [-87.3, 88]; inputs are clamped to that range. */
AVX2_INL __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* ------------------------------------------------------------------------------------------ */
/* MLX pack decoding (8 lanes)                                                                */

/* Bytes of one 8-lane block (8 packs) for `bits`: 8 * P * bits / 8. */
#define QBLOCK_BYTES(bits) (((bits) == 6 || (bits) == 8 ? 4 : 8) * (bits))

/* Loads the 8 packs of the block at p so that lane k holds pack k, low-aligned (upper bits
 * zero): 2-bit 2 bytes, 3-bit 3 bytes, 4-bit 4 bytes, 6-bit 3 bytes, 8-bit 4 bytes. 5-bit
 * packs are 40 bits: *a gets bytes 5k..5k+3 (values 0..5), *b bytes 5k+1..5k+4 (values 6, 7).
 * Reads exactly the block's QBLOCK_BYTES bytes. */
AVX2_INL void q_load8(const uint8_t *p, const int bits, __m256i *a, __m256i *b) {
    if (bits == 2) {
        *a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    } else if (bits == 3 || bits == 6) {
        const __m256i m = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, /* bytes 0..11  */
                                           4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1); /* 12..23 */
        *a = _mm256_shuffle_epi8(load2x128(p + 8, p), m);
    } else if (bits == 4 || bits == 8) {
        *a = _mm256_loadu_si256((const __m256i *)p);
    } else { /* 5: halves of 4 packs (20 bytes) from two 16-byte windows, at +0 and +4 */
        const __m256i x0 = load2x128(p + 20, p), x1 = load2x128(p + 24, p + 4);
        const __m256i a0 = _mm256_setr_epi8(0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, -1, -1, -1, -1, 0, 1, 2, 3, 5, 6,
                                            7, 8, 10, 11, 12, 13, -1, -1, -1, -1);
        const __m256i a1 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 11, 12, 13, 14, -1, -1, -1,
                                            -1, -1, -1, -1, -1, -1, -1, -1, -1, 11, 12, 13, 14);
        const __m256i b0 = _mm256_setr_epi8(1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, -1, -1, -1, -1, 1, 2, 3, 4, 6, 7,
                                            8, 9, 11, 12, 13, 14, -1, -1, -1, -1);
        const __m256i b1 = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 12, 13, 14, 15, -1, -1, -1,
                                            -1, -1, -1, -1, -1, -1, -1, -1, -1, 12, 13, 14, 15);
        *a = _mm256_or_si256(_mm256_shuffle_epi8(x0, a0), _mm256_shuffle_epi8(x1, a1));
        *b = _mm256_or_si256(_mm256_shuffle_epi8(x0, b0), _mm256_shuffle_epi8(x1, b1));
    }
}

/* Value s of every lane's pack (from q_load8's a / b) as int32. Constant bits and s. */
AVX2_INL __m256i q_val8(__m256i a, __m256i b, const int bits, const int s) {
    const __m256i m = _mm256_set1_epi32((1 << bits) - 1);
    if (bits == 5 && s == 6) return _mm256_and_si256(_mm256_srli_epi32(b, 22), m);
    if (bits == 5 && s == 7) return _mm256_srli_epi32(b, 27);
    const int P = bits == 6 || bits == 8 ? 4 : 8;
    const __m256i v = s ? _mm256_srli_epi32(a, bits * s) : a;
    if (s == P - 1) return v; /* the top value: the bits above it are zero */
    return _mm256_and_si256(v, m);
}

/* ------------------------------------------------------------------------------------------ */
/* decode: fused matrix-vector products (T <= MV_MAX_T)                                       */

typedef struct mv_job {
    const wt_linear *w;
    float *out;            /* [T, rows]                                                       */
    const float *xp;       /* [T, xstride] activations in the kernel's xp layout               */
    size_t xstride;
    const float *xs;       /* [T, xsstride] per-group sums (quantized weights)                */
    size_t xsstride;
    int T;
    int64_t rows_per_task;
    cpu_scratch *s;
    void (*fn)(const struct mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi);
    /* int16-activation kernels (2/4/8-bit weights) */
    const float *x;        /* [T, cols] the float activations (tails past the last unit)      */
    const int16_t *xq;     /* [T, xqstride] quantized activations in the unit layout          */
    size_t xqstride;       /* int16 elements (int8 kernels: bytes) between token rows of xq   */
    const int8_t *xq8;     /* [T, xqstride] int8 activations in the q8 unit layout (4-bit)    */
    const float *dl;       /* [T, dlstride] activation scale of each lane of each unit         */
    size_t dlstride;
} mv_job;

typedef void (*mv_fn)(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi);

/* Rows [r0, r1) of a quantized weight against TT activation rows, 8 lanes: per block of
 * 8*P values, value s of all 8 packs is converted once, multiplied by its group scale(s) and
 * accumulated into the TT token accumulators; the bias term comes from the per-group sums.
 * Accumulators are split M ways by s so every dependency chain is short (one FMA per block)
 * and successive blocks overlap. sc/bi: thread-local row scale/bias buffers (ng + 16 floats). */
AVX2_INL void mvq_rows_avx2(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi, const int bits, const int TT) {
    const wt_linear *w = j->w;
    const int P = bits == 6 || bits == 8 ? 4 : 8, BV = 8 * P, BB = QBLOCK_BYTES(bits);
    /* accumulators per token: fixed, not a function of TT, so a row gives the same bits whether
     * it is decoded alone or batched with others (batch invariance; test_forward checks it) */
    const int M = 4 < P ? 4 : P;
    const int64_t cols = w->cols, rows = w->rows, nblk = cols / BV, g = w->group, ng = cols / g;
    const int split = g < BV; /* 2-5 bits at group 32: lanes 0-3 and 4-7 have their own scale */
    const int gsh = split ? 0 : __builtin_ctz((unsigned)(g / BV));
    const __m256i sidx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const float *xp = j->xp;
    const size_t xst = j->xstride;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
        const size_t so = (size_t)r * w->srow_elems;
        cvt_f32(sc, w->scales, so, ng, w->sdtype);
        cvt_f32(bi, w->biases, so, ng, w->sdtype);
        __m256 acc[MV_MAX_T][8];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) acc[t][m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nblk; b++) {
            __m256i va, vb = _mm256_setzero_si256();
            q_load8(q + b * BB, bits, &va, &vb);
            const float *xb = xp + b * BV;
            const __m256 sv = split ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 2 * b), sidx)
                                    : _mm256_broadcast_ss(sc + (b >> gsh));
#pragma GCC unroll 8
            for (int s = 0; s < P; s++) {
                const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(q_val8(va, vb, bits, s)), sv);
#pragma GCC unroll 4
                for (int t = 0; t < TT; t++)
                    acc[t][s % M] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xb + (size_t)t * xst + 8 * s), acc[t][s % M]);
            }
        }
        __m256 accs[MV_MAX_T];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            accs[t] = acc[t][0];
#pragma GCC unroll 8
            for (int m = 1; m < M; m++) accs[t] = _mm256_add_ps(accs[t], acc[t][m]);
        }
        float tail[MV_MAX_T] = {0};
        for (int64_t i = nblk * BV; i < cols; i++) { /* only 2-5 bits, group 32, odd group count */
            const float qs = sc[i / g] * (float)cpu_mlx_q_get((const uint32_t *)q, bits, (size_t)i);
            for (int t = 0; t < TT; t++) tail[t] += qs * xp[(size_t)t * xst + i];
        }
        for (int t = 0; t < TT; t++)
            j->out[(size_t)t * rows + r] =
                hsum8(accs[t]) + tail[t] + dot_short(bi, j->xs + (size_t)t * j->xsstride, ng);
    }
}

/* Rows [r0, r1) of a dense weight (bf16 in the P = 2 layout, f16/f32 in natural order)
 * against TT activation rows, 8 lanes. */
AVX2_INL void mvd_rows_avx2(const mv_job *j, int64_t r0, int64_t r1, const int dt, const int TT) {
    const wt_linear *w = j->w;
    const int64_t cols = w->cols, rows = w->rows;
    const float *xp = j->xp;
    const size_t xst = j->xstride;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)w->w + (size_t)r * w->row_bytes;
        __m256 a0[MV_MAX_T], a1[MV_MAX_T];
        for (int t = 0; t < TT; t++) a0[t] = a1[t] = _mm256_setzero_ps();
        int64_t i = 0;
        if (dt == SFT_BF16) {
            for (; i + 16 <= cols; i += 16) { /* dword k = (x[i+2k], x[i+2k+1]): even = <<16, odd = & hi */
                const __m256i v = _mm256_loadu_si256((const __m256i *)(row + 2 * i));
                const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                const __m256 o = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
                for (int t = 0; t < TT; t++) {
                    a0[t] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xp + (size_t)t * xst + i), a0[t]);
                    a1[t] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xp + (size_t)t * xst + i + 8), a1[t]);
                }
            }
        } else {
            for (; i + 16 <= cols; i += 16) {
                __m256 f0, f1;
                if (dt == SFT_F16) {
                    f0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
                    f1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16)));
                } else {
                    f0 = _mm256_loadu_ps((const float *)row + i);
                    f1 = _mm256_loadu_ps((const float *)row + i + 8);
                }
                for (int t = 0; t < TT; t++) {
                    a0[t] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xp + (size_t)t * xst + i), a0[t]);
                    a1[t] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xp + (size_t)t * xst + i + 8), a1[t]);
                }
            }
        }
        for (int t = 0; t < TT; t++) {
            float v = hsum8(_mm256_add_ps(a0[t], a1[t]));
            for (int64_t k = i; k < cols; k++) { /* tail: natural order in every layout */
                uint16_t h;
                float wf;
                if (dt == SFT_F32) memcpy(&wf, row + 4 * k, 4);
                else {
                    memcpy(&h, row + 2 * k, 2);
                    wf = dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
                }
                v += wf * xp[(size_t)t * xst + k];
            }
            j->out[(size_t)t * rows + r] = v;
        }
    }
}

/* 16-lane (AVX-512F) variants: a block is 16 packs = two 8-lane blocks side by side. */

AVX512_INL __m512i q_val16(__m512i a, __m512i b, const int bits, const int s) {
    const __m512i m = _mm512_set1_epi32((1 << bits) - 1);
    if (bits == 5 && s == 6) return _mm512_and_si512(_mm512_srli_epi32(b, 22), m);
    if (bits == 5 && s == 7) return _mm512_srli_epi32(b, 27);
    const int P = bits == 6 || bits == 8 ? 4 : 8;
    const __m512i v = s ? _mm512_srli_epi32(a, bits * s) : a;
    if (s == P - 1) return v;
    return _mm512_and_si512(v, m);
}

AVX512_INL float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

AVX512_INL void mvq_rows_avx512(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi, const int bits,
                                const int TT) {
    const wt_linear *w = j->w;
    const int P = bits == 6 || bits == 8 ? 4 : 8, BV = 16 * P, BB = 2 * QBLOCK_BYTES(bits);
    const int M = 4 < P ? 4 : P; /* fixed for batch invariance, as above */
    const int64_t cols = w->cols, rows = w->rows, nblk = cols / BV, g = w->group, ng = cols / g;
    const int split = g < BV;
    const int gsh = split ? 0 : __builtin_ctz((unsigned)(g / BV));
    int32_t ix[16];
    for (int k = 0; k < 16; k++) ix[k] = (int32_t)((P * k) / g);
    const __m512i sidx = _mm512_loadu_si512(ix);
    const float *xp = j->xp;
    const size_t xst = j->xstride;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
        const size_t so = (size_t)r * w->srow_elems;
        cvt_f32(sc, w->scales, so, ng, w->sdtype);
        cvt_f32(bi, w->biases, so, ng, w->sdtype);
        __m512 acc[MV_MAX_T][8];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) acc[t][m] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblk; b++) {
            __m256i a0, b0 = _mm256_setzero_si256(), a1, b1 = _mm256_setzero_si256();
            q_load8(q + b * BB, bits, &a0, &b0);
            q_load8(q + b * BB + BB / 2, bits, &a1, &b1);
            const __m512i va = _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
            const __m512i vb = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
            const float *xb = xp + b * BV;
            const __m512 sv = split ? _mm512_permutexvar_ps(sidx, _mm512_loadu_ps(sc + (b * BV) / g))
                                    : _mm512_set1_ps(sc[b >> gsh]);
#pragma GCC unroll 8
            for (int s = 0; s < P; s++) {
                const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(q_val16(va, vb, bits, s)), sv);
#pragma GCC unroll 4
                for (int t = 0; t < TT; t++)
                    acc[t][s % M] = _mm512_fmadd_ps(f, _mm512_loadu_ps(xb + (size_t)t * xst + 16 * s), acc[t][s % M]);
            }
        }
        __m512 accs[MV_MAX_T];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            accs[t] = acc[t][0];
#pragma GCC unroll 8
            for (int m = 1; m < M; m++) accs[t] = _mm512_add_ps(accs[t], acc[t][m]);
        }
        float tail[MV_MAX_T] = {0};
        for (int64_t i = nblk * BV; i < cols; i++) {
            const float qs = sc[i / g] * (float)cpu_mlx_q_get((const uint32_t *)q, bits, (size_t)i);
            for (int t = 0; t < TT; t++) tail[t] += qs * xp[(size_t)t * xst + i];
        }
        for (int t = 0; t < TT; t++)
            j->out[(size_t)t * rows + r] =
                hsum16(accs[t]) + tail[t] + dot_short(bi, j->xs + (size_t)t * j->xsstride, ng);
    }
}

AVX512_INL void mvd_rows_avx512(const mv_job *j, int64_t r0, int64_t r1, const int dt, const int TT) {
    const wt_linear *w = j->w;
    const int64_t cols = w->cols, rows = w->rows;
    const float *xp = j->xp;
    const size_t xst = j->xstride;
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)w->w + (size_t)r * w->row_bytes;
        __m512 a0[MV_MAX_T], a1[MV_MAX_T];
        for (int t = 0; t < TT; t++) a0[t] = a1[t] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= cols; i += 32) {
            __m512 f0, f1;
            if (dt == SFT_BF16) {
                const __m512i v = _mm512_loadu_si512(row + 2 * i);
                f0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                f1 = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            } else if (dt == SFT_F16) {
                f0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i)));
                f1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i + 32)));
            } else {
                f0 = _mm512_loadu_ps((const float *)row + i);
                f1 = _mm512_loadu_ps((const float *)row + i + 16);
            }
            for (int t = 0; t < TT; t++) {
                a0[t] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xp + (size_t)t * xst + i), a0[t]);
                a1[t] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xp + (size_t)t * xst + i + 16), a1[t]);
            }
        }
        for (int t = 0; t < TT; t++) {
            float v = hsum16(_mm512_add_ps(a0[t], a1[t]));
            for (int64_t k = i; k < cols; k++) {
                uint16_t h;
                float wf;
                if (dt == SFT_F32) memcpy(&wf, row + 4 * k, 4);
                else {
                    memcpy(&h, row + 2 * k, 2);
                    wf = dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
                }
                v += wf * xp[(size_t)t * xst + k];
            }
            j->out[(size_t)t * rows + r] = v;
        }
    }
}

/* int16-activation decode for 2-, 4- and 8-bit weights. The activations of each token are
 * quantized per block of 32 values (d = max|x| / 32767, q = round(x / d), |q| <= 32767), so a
 * dot product is exact in int32 except for the rounding of x: |y - y_float| <= sum |w_i| d/2,
 * about 1.5e-5 of the block maximum per element. Weight bytes are widened to 16-bit lanes by
 * unpacking with zero, nibbles (crumbs) split off with shifts/masks, and multiplied with
 * vpmaddwd (no overflow: at most 8 products of 255 x 32767 per int32 lane). A unit is 32
 * weight bytes (4-bit: 64 values, 2-bit: 128, 8-bit: 32); its int32 lanes are converted once
 * and scaled by group scale x activation scale. The bias term uses the exact float group
 * sums. Within a 128-bit half, unpacklo takes bytes 0..7 and unpackhi bytes 8..15, so the
 * activations are laid out per unit as: ja(i) = i < 8 ? i : 8 + i (bytes of unpacklo, i < 16),
 * jb(i) = ja(i) + 8 (unpackhi):
 *   4-bit: X0[i] = x[2 ja(i)], X1[i] = x[2 ja(i) + 1], X2[i] = x[2 jb(i)], X3[i] = x[2 jb(i) + 1]
 *   8-bit: X0[i] = x[ja(i)], X1[i] = x[jb(i)]
 *   2-bit: Xa_s[i] = x[4 ja(i) + s], Xb_s[i] = x[4 jb(i) + s], s = 0..3 (a: values 0..31 and
 *          64..95 of the unit, b: 32..63 and 96..127, kept apart: different 32-blocks) */
#define Q8_UNIT(bits) ((bits) == 2 ? 128 : (bits) == 4 ? 64 : 32)

int cpu_simd_actq(const cpu_scratch *s, const wt_linear *w, int T, int *blk) {
    int b = 0, qmax = 0;
    if (s->exact || s->simd < CPU_SIMD_AVX2 || !s->actq || T < 1) qmax = 0;
    else if (T > MV_MAX_T) { /* prefill: g8_* (int8) or gq_* (int16) */
        if (s->actq_gemm && s->actq8 && w->qbits == 4 && w->cols % 64 == 0) qmax = 127, b = 32;
        else if (s->actq_gemm && w->qbits == 4 && w->group >= 64 && w->cols % 64 == 0) qmax = 32767, b = 64;
    } else if (w->qbits == 4 && s->actq8) qmax = 127, b = 32;
    else if (w->qbits == 2 || w->qbits == 4 || w->qbits == 8) qmax = 32767, b = 32;
    if (blk) *blk = b;
    return qmax;
}

/* 32 values of x as int16 in natural order (lo: 0..15, hi: 16..31): q = round-to-nearest-even(
 * x * (32767 / amax)) (what lrintf gives in the default rounding mode); *d = amax / 32767. */
AVX2_INL void q16_block32(const float *x, float *d, __m256i *lo, __m256i *hi) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    *d = amax / 32767.0f;
    const __m256 id = _mm256_set1_ps(amax > 0 ? 32767.0f / amax : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    *lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    *hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
}

/* Quantizes one token's x[cols] for `bits` into xq (int16, the unit layout above, full units
 * only) and dl (per unit: 8 lane scales; 16 for 2-bit, a then b). */
static AVX2_FN void q16_prep(const float *x, int64_t cols, int bits, int16_t *xq, float *dl) {
    const int U = Q8_UNIT(bits);
    const int64_t nu = cols / U;
    /* per 128-bit lane: 4 even int16 then 4 odd int16 */
    const __m256i eo = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2,
                                        3, 6, 7, 10, 11, 14, 15);
    for (int64_t u = 0; u < nu; u++) {
        const float *xu = x + u * U;
        __m256i *o = (__m256i *)(xq + u * U);
        if (bits == 8) { /* N0 = x0..15, N1 = x16..31: X0 = [N0 lane 0 | N1 lane 0], X1 = lanes 1 */
            float d;
            __m256i n0, n1;
            q16_block32(xu, &d, &n0, &n1);
            _mm256_storeu_si256(o, _mm256_permute2x128_si256(n0, n1, 0x20));
            _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(n0, n1, 0x31));
            _mm256_storeu_ps(dl + u * 8, _mm256_set1_ps(d));
        } else if (bits == 4) { /* N' = [evens | odds] of 16 values; X0 = ev(N0) ev(N2), X1 = od(N0) od(N2), ... */
            float d0, d1;
            __m256i n[4];
            q16_block32(xu, &d0, &n[0], &n[1]);
            q16_block32(xu + 32, &d1, &n[2], &n[3]);
            for (int k = 0; k < 4; k++) n[k] = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(n[k], eo), 0xD8);
            _mm256_storeu_si256(o, _mm256_permute2x128_si256(n[0], n[2], 0x20));
            _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(n[0], n[2], 0x31));
            _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(n[1], n[3], 0x20));
            _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(n[1], n[3], 0x31));
            _mm256_storeu_ps(dl + u * 8, _mm256_setr_ps(d0, d0, d0, d0, d1, d1, d1, d1));
        } else { /* 2-bit: quantize naturally, then gather (not a hot format) */
            float d[4];
            int16_t q[128];
            for (int k = 0; k < 4; k++) {
                __m256i lo, hi;
                q16_block32(xu + 32 * k, &d[k], &lo, &hi);
                _mm256_storeu_si256((__m256i *)(q + 32 * k), lo);
                _mm256_storeu_si256((__m256i *)(q + 32 * k + 16), hi);
            }
            int16_t *oq = xq + u * U;
            for (int sh = 0; sh < 4; sh++)
                for (int i = 0; i < 16; i++) {
                    const int ja = i < 8 ? i : 8 + i, jb = ja + 8;
                    oq[16 * sh + i] = q[4 * ja + sh];
                    oq[64 + 16 * sh + i] = q[4 * jb + sh];
                }
            _mm256_storeu_ps(dl + u * 16, _mm256_setr_ps(d[0], d[0], d[0], d[0], d[2], d[2], d[2], d[2]));
            _mm256_storeu_ps(dl + u * 16 + 8, _mm256_setr_ps(d[1], d[1], d[1], d[1], d[3], d[3], d[3], d[3]));
        }
    }
}

/* One unit u (32 weight bytes) of a 2/4/8-bit row q into acc[t][par] for TT tokens. sv / svb:
 * per-lane group scales (svb: 2-bit b half). par is a constant so the accumulators stay in
 * registers. */
AVX2_INL void mv8_unit(const mv_job *j, const uint8_t *q, int64_t u, __m256 sv, __m256 svb, __m256 (*acc)[2],
                       const int par, const int bits, const int TT) {
    const __m256i z = _mm256_setzero_si256(), m4 = _mm256_set1_epi16(0x0F), m2 = _mm256_set1_epi16(3);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(q + u * 32));
    const __m256i a = _mm256_unpacklo_epi8(v, z), b = _mm256_unpackhi_epi8(v, z);
    __m256i p[MV_MAX_T], pb[MV_MAX_T];
    if (bits == 4) {
        const __m256i al = _mm256_and_si256(a, m4), ah = _mm256_srli_epi16(a, 4);
        const __m256i bl = _mm256_and_si256(b, m4), bh = _mm256_srli_epi16(b, 4);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const __m256i *xb = (const __m256i *)(j->xq + (size_t)t * j->xqstride) + u * 4;
            p[t] = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(al, _mm256_loadu_si256(xb)),
                                                     _mm256_madd_epi16(ah, _mm256_loadu_si256(xb + 1))),
                                    _mm256_add_epi32(_mm256_madd_epi16(bl, _mm256_loadu_si256(xb + 2)),
                                                     _mm256_madd_epi16(bh, _mm256_loadu_si256(xb + 3))));
        }
    } else if (bits == 8) {
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const __m256i *xb = (const __m256i *)(j->xq + (size_t)t * j->xqstride) + u * 2;
            p[t] = _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(xb)), _mm256_madd_epi16(b, _mm256_loadu_si256(xb + 1)));
        }
    } else { /* 2 */
        const __m256i a0 = _mm256_and_si256(a, m2), a1 = _mm256_and_si256(_mm256_srli_epi16(a, 2), m2);
        const __m256i a2 = _mm256_and_si256(_mm256_srli_epi16(a, 4), m2), a3 = _mm256_srli_epi16(a, 6);
        const __m256i b0 = _mm256_and_si256(b, m2), b1 = _mm256_and_si256(_mm256_srli_epi16(b, 2), m2);
        const __m256i b2 = _mm256_and_si256(_mm256_srli_epi16(b, 4), m2), b3 = _mm256_srli_epi16(b, 6);
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const __m256i *xb = (const __m256i *)(j->xq + (size_t)t * j->xqstride) + u * 8;
            p[t] = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(a0, _mm256_loadu_si256(xb)),
                                                     _mm256_madd_epi16(a1, _mm256_loadu_si256(xb + 1))),
                                    _mm256_add_epi32(_mm256_madd_epi16(a2, _mm256_loadu_si256(xb + 2)),
                                                     _mm256_madd_epi16(a3, _mm256_loadu_si256(xb + 3))));
            pb[t] = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(b0, _mm256_loadu_si256(xb + 4)),
                                                      _mm256_madd_epi16(b1, _mm256_loadu_si256(xb + 5))),
                                     _mm256_add_epi32(_mm256_madd_epi16(b2, _mm256_loadu_si256(xb + 6)),
                                                      _mm256_madd_epi16(b3, _mm256_loadu_si256(xb + 7))));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) {
        const float *dl = j->dl + (size_t)t * j->dlstride + u * (bits == 2 ? 16 : 8);
        acc[t][par] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), _mm256_mul_ps(sv, _mm256_loadu_ps(dl)), acc[t][par]);
        if (bits == 2)
            acc[t][par] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb[t]), _mm256_mul_ps(svb, _mm256_loadu_ps(dl + 8)), acc[t][par]);
    }
}

/* Rows [r0, r1) of a 2/4/8-bit weight against TT int16 activation rows (see above); units in
 * pairs with two accumulators per token. */
AVX2_INL void mv8_rows_avx2(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi, const int bits, const int TT) {
    (void)bi;
    const wt_linear *w = j->w;
    const int U = Q8_UNIT(bits);
    const int64_t cols = w->cols, rows = w->rows, nu = cols / U, g = w->group, ng = cols / g;
    const int split = g < U;
    const int gsh = split ? 0 : __builtin_ctz((unsigned)(g / U));
    /* group of lane k: lanes 0-3 hold values from the unit's first 32 (4-bit), 16 (8-bit) or
     * 32 (2-bit a) / 32..63 (2-bit b); lanes 4-7 from 32.., 16.., 64.. / 96.. (layout above) */
    int32_t ia[8], ib[8];
    for (int k = 0; k < 8; k++) {
        const int va = k < 4 ? 0 : bits == 2 ? 64 : bits == 4 ? 32 : 16;
        ia[k] = (int32_t)(va / g);
        ib[k] = (int32_t)((va + 32) / g);
    }
    const __m256i sia = _mm256_loadu_si256((const __m256i *)ia), sib = _mm256_loadu_si256((const __m256i *)ib);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
        const size_t so = (size_t)r * w->srow_elems;
        cvt_f32(sc, w->scales, so, ng, w->sdtype);
        __m256 acc[MV_MAX_T][2];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        int64_t u = 0;
#define SVA(uu) (split ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + ((uu) * U) / g), sia) : _mm256_broadcast_ss(sc + ((uu) >> gsh)))
#define SVB(uu) (split ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + ((uu) * U) / g), sib) : _mm256_broadcast_ss(sc + ((uu) >> gsh)))
        for (; u + 2 <= nu; u += 2) {
            _mm_prefetch((const char *)q + 32 * u + MV_PF, _MM_HINT_T0);
            mv8_unit(j, q, u, SVA(u), SVB(u), acc, 0, bits, TT);
            mv8_unit(j, q, u + 1, SVA(u + 1), SVB(u + 1), acc, 1, bits, TT);
        }
        if (u < nu) mv8_unit(j, q, u, SVA(u), SVB(u), acc, 0, bits, TT);
#undef SVA
#undef SVB
        float tail[MV_MAX_T] = {0};
        for (int64_t i = nu * U; i < cols; i++) { /* past the last full unit: float */
            const float qs = sc[i / g] * (float)cpu_mlx_q_get((const uint32_t *)q, bits, (size_t)i);
            for (int t = 0; t < TT; t++) tail[t] += qs * j->x[(size_t)t * cols + i];
        }
        for (int t = 0; t < TT; t++) {
            float rest;
            const __m256 bd = bias_dot(w->biases, so, ng, w->sdtype, j->xs + (size_t)t * j->xsstride, &rest);
            j->out[(size_t)t * rows + r] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), bd)) + tail[t] + rest;
        }
    }
}

#define MV8(B, TT) \
    static AVX2_FN void mv8_##B##_##TT(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi) { mv8_rows_avx2(j, r0, r1, sc, bi, B, TT); }
#define MV8_T(B) MV8(B, 1) MV8(B, 2) MV8(B, 3) MV8(B, 4)
MV8_T(2)
MV8_T(4)
MV8_T(8)

/* int8-activation decode for 4-bit weights (s->actq8): vpmaddubsw multiplies 32 unsigned
 * bytes by 32 signed bytes and adds adjacent pairs into int16, i.e. half the instructions
 * per weight byte of the int16 kernel above (no widening unpacks, one multiply per 32 codes
 * instead of two). Activations are quantized per 32-value block to int8 (q8_block32: d =
 * amax / 127, q = round-to-nearest-even(x * (127 / amax)), |q| <= 127), and the bias term
 * multiplies the group sums of the dequantized x^ (q8_prep), so the result is the exact dot
 * product of w with x^: the error is up to sum |w_i| * d_i / 2 with d_i = max|x| / 127 over
 * x_i's block (~258x the int16 kernel's step, about half of it recovered by the centring;
 * eval-golden's bf16_activations criteria, not the fp32 ones). A unit is 32 weight bytes = 64 values;
 * byte i holds value 2i in its low nibble and 2i + 1 in its high nibble (MLX's LSB-first
 * packing), so the unit's activations are stored as XE[i] = q(x[2i]) then XO[i] = q(x[2i+1])
 * (64 bytes per unit, cpu_simd_q8_prep): maddubs(lo nibbles, XE) + maddubs(hi nibbles, XO)
 * gives int16 lane k = the 4 products of bytes 2k, 2k+1 (|.| <= 4 * 15 * 127 = 7620: no
 * saturation), vpmaddwd with ones adds lanes pairwise into int32 lane k' = values 8k'..8k'+7:
 * lanes 0-3 are the unit's first 32-block, lanes 4-7 its second, matching dl's 8 lane scales
 * (as the int16 4-bit layout). */

/* One unit's integer part: int32 lane k = sum over its 8 values v of code(v) * xq(v). */
AVX2_INL __m256i q4i8_unit(const uint8_t *q, const int8_t *xb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i v = _mm256_loadu_si256((const __m256i *)q);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xb)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xb + 32))));
    return _mm256_madd_epi16(p, ones);
}

/* 32 values of x as int8 q = round-to-nearest-even(x * (127 / amax)) in natural order (one
 * ymm); *d = amax / 127. */
AVX2_INL __m256i q8_block32(const float *x, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    *d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8); /* int16 0..15  */
    const __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8); /* int16 16..31 */
    return _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
}

/* Quantizes one token's x[cols] for the int8 4-bit kernel: per full 64-value unit u, 64 bytes
 * xq[64u..): XE (q of x[64u + 2i], i < 32) then XO (q of x[64u + 2i + 1]); dl[8u..8u+8): the
 * lane scales d0 x 4, d1 x 4 of the unit's two 32-blocks. Values past the last full unit are
 * not touched (the kernel takes them in float). If xs is not NULL, xs[gi] for each group gi
 * of g values inside the full units becomes the sum of the dequantized x^ = q * d over it
 * (sum over its 32-blocks of d * sum q, in block order), so that the kernel's bias term
 * b * sum(x^) completes the dot product with x^ of the whole weight w = s q + b: the error is
 * then sum w_i (x^_i - x_i), i.e. proportional to |w| and not to |s q| (for MLX's zero-centred
 * groups, b ~ -7.5 s, about half; the exact sum of x would leave s q's error uncancelled). */
static AVX2_FN void q8_prep(const float *x, int64_t cols, int8_t *xq, float *dl, float *xs, int g) {
    /* per 128-bit lane: the 8 even bytes, then the 8 odd ones */
    const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1,
                                        3, 5, 7, 9, 11, 13, 15);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const int64_t nu = cols / 64;
    if (xs) memset(xs, 0, (size_t)(nu * 64 / g) * sizeof(float));
    for (int64_t u = 0; u < nu; u++) {
        float d[2];
        __m256i n[2];
        for (int h = 0; h < 2; h++) {
            const __m256i qv = q8_block32(x + 64 * u + 32 * h, &d[h]);
            if (xs) { /* sum of the 32 codes: maddubs with ones (sign of q kept), then pairs */
                const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qv), ones16);
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
                xs[(64 * u + 32 * h) / g] += d[h] * (float)_mm_cvtsi128_si32(t);
            }
            /* after the shuffle and the qword permute: [evens of the 32 | odds of the 32] */
            n[h] = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(qv, eo), 0xD8);
        }
        _mm256_storeu_si256((__m256i *)(xq + 64 * u), _mm256_permute2x128_si256(n[0], n[1], 0x20));
        _mm256_storeu_si256((__m256i *)(xq + 64 * u + 32), _mm256_permute2x128_si256(n[0], n[1], 0x31));
        _mm256_storeu_ps(dl + 8 * u, _mm256_setr_ps(d[0], d[0], d[0], d[0], d[1], d[1], d[1], d[1]));
    }
}

void cpu_simd_q8_prep(const float *x, int64_t cols, int8_t *xq, float *dl, float *xs, int g) {
    ST_ASSERT(cpu_simd_level() >= CPU_SIMD_AVX2 && g >= 32 && g % 32 == 0);
    q8_prep(x, cols, xq, dl, xs, g);
}

static AVX2_FN void q4i8_sums(const uint8_t *row, const int8_t *xq, int64_t nu, int32_t *sums) {
    for (int64_t u = 0; u < nu; u++) _mm256_storeu_si256((__m256i *)(sums + 8 * u), q4i8_unit(row + 32 * u, xq + 64 * u));
}

void cpu_simd_q4i8_sums(const uint8_t *row, const int8_t *xq, int64_t nu, int32_t *sums) {
    ST_ASSERT(cpu_simd_level() >= CPU_SIMD_AVX2);
    q4i8_sums(row, xq, nu, sums);
}

/* Rows [r0, r1) of a 4-bit weight against TT int8 activation rows (layout above): per unit,
 * the int32 lanes are converted and scaled by group scale x activation scale; units in pairs
 * with two accumulators per token. GK (a constant, so the unit loop has no branch): 0 = group
 * 32 (lanes 0-3 and 4-7 have their own scale), 1 = group 64 (one scale per unit), 2 = group
 * 64 << gsh. */
AVX2_INL void mv4i8_rows_avx2(const mv_job *j, int64_t r0, int64_t r1, float *sc, const int GK, const int TT) {
    const wt_linear *w = j->w;
    const int64_t cols = w->cols, rows = w->rows, nu = cols / 64, g = w->group, ng = cols / g;
    const int gsh = GK == 2 ? __builtin_ctz((unsigned)(g / 64)) : 0;
    const __m256i sia = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const int8_t *xq[MV_MAX_T];
    const float *dl[MV_MAX_T];
    for (int t = 0; t < TT; t++) {
        xq[t] = j->xq8 + (size_t)t * j->xqstride;
        dl[t] = j->dl + (size_t)t * j->dlstride;
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
        const size_t so = (size_t)r * w->srow_elems;
        cvt_f32(sc, w->scales, so, ng, w->sdtype);
        __m256 acc[MV_MAX_T][2];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
#define UNIT8(uu, par)                                                                                          \
    do {                                                                                                        \
        const __m256 sv_ = GK == 0 ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 2 * (uu)), sia)              \
                           : GK == 1 ? _mm256_broadcast_ss(sc + (uu)) : _mm256_broadcast_ss(sc + ((uu) >> gsh)); \
        _Pragma("GCC unroll 4") for (int t = 0; t < TT; t++) {                                                  \
            const __m256i p_ = q4i8_unit(q + 32 * (uu), xq[t] + 64 * (uu));                                     \
            acc[t][par] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_), _mm256_mul_ps(sv_, _mm256_loadu_ps(dl[t] + 8 * (uu))), \
                                          acc[t][par]);                                                         \
        }                                                                                                       \
    } while (0)
        int64_t u = 0;
        for (; u + 2 <= nu; u += 2) {
            _mm_prefetch((const char *)q + 32 * u + MV_PF, _MM_HINT_T0); /* one line per 2 units */
            UNIT8(u, 0);
            UNIT8(u + 1, 1);
        }
        if (u < nu) UNIT8(u, 0);
#undef UNIT8
        float tail[MV_MAX_T] = {0};
        for (int64_t i = nu * 64; i < cols; i++) { /* past the last full unit: float */
            const float qs = sc[i / g] * (float)cpu_mlx_q_get((const uint32_t *)q, 4, (size_t)i);
            for (int t = 0; t < TT; t++) tail[t] += qs * j->x[(size_t)t * cols + i];
        }
        for (int t = 0; t < TT; t++) {
            float rest;
            const __m256 bd = bias_dot(w->biases, so, ng, w->sdtype, j->xs + (size_t)t * j->xsstride, &rest);
            j->out[(size_t)t * rows + r] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), bd)) + tail[t] + rest;
        }
    }
}

#define MV4I8(GK, TT)                                                                                         \
    static AVX2_FN void mv4i8_##GK##_##TT(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi) { \
        (void)bi;                                                                                         \
        mv4i8_rows_avx2(j, r0, r1, sc, GK, TT);                                                           \
    }
#define MV4I8_T(GK) MV4I8(GK, 1) MV4I8(GK, 2) MV4I8(GK, 3) MV4I8(GK, 4)
MV4I8_T(0)
MV4I8_T(1)
MV4I8_T(2)
static const mv_fn mv4i8_tab[3][MV_MAX_T] = {{mv4i8_0_1, mv4i8_0_2, mv4i8_0_3, mv4i8_0_4},
                                            {mv4i8_1_1, mv4i8_1_2, mv4i8_1_3, mv4i8_1_4},
                                            {mv4i8_2_1, mv4i8_2_2, mv4i8_2_3, mv4i8_2_4}};

/* One specialised function per (ISA, format, token count) so every shift is an immediate. */
#define MVQ(ISA, ATTR, B, TT)                                                                     \
    static ATTR void mvq_##ISA##_##B##_##TT(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi) { \
        mvq_rows_##ISA(j, r0, r1, sc, bi, B, TT);                                                 \
    }
#define MVQ_T(ISA, ATTR, B) MVQ(ISA, ATTR, B, 1) MVQ(ISA, ATTR, B, 2) MVQ(ISA, ATTR, B, 3) MVQ(ISA, ATTR, B, 4)
#define MVQ_ALL(ISA, ATTR)                                                                        \
    MVQ_T(ISA, ATTR, 2) MVQ_T(ISA, ATTR, 3) MVQ_T(ISA, ATTR, 4) MVQ_T(ISA, ATTR, 5) MVQ_T(ISA, ATTR, 6) \
    MVQ_T(ISA, ATTR, 8)
MVQ_ALL(avx2, AVX2_FN)
MVQ_ALL(avx512, AVX512_FN)

#define MVD(ISA, ATTR, NAME, DT, TT)                                                              \
    static ATTR void mvd_##ISA##_##NAME##_##TT(const mv_job *j, int64_t r0, int64_t r1, float *sc, float *bi) { \
        (void)sc;                                                                                 \
        (void)bi;                                                                                 \
        mvd_rows_##ISA(j, r0, r1, DT, TT);                                                        \
    }
#define MVD_T(ISA, ATTR, NAME, DT) \
    MVD(ISA, ATTR, NAME, DT, 1) MVD(ISA, ATTR, NAME, DT, 2) MVD(ISA, ATTR, NAME, DT, 3) MVD(ISA, ATTR, NAME, DT, 4)
#define MVD_ALL(ISA, ATTR) \
    MVD_T(ISA, ATTR, bf16, SFT_BF16) MVD_T(ISA, ATTR, f16, SFT_F16) MVD_T(ISA, ATTR, f32, SFT_F32)
MVD_ALL(avx2, AVX2_FN)
MVD_ALL(avx512, AVX512_FN)

#define ROW4(ISA, PFX, X) {PFX##_##ISA##_##X##_1, PFX##_##ISA##_##X##_2, PFX##_##ISA##_##X##_3, PFX##_##ISA##_##X##_4}
static const mv_fn mvq_tab[2][9][MV_MAX_T] = {
    {[2] = ROW4(avx2, mvq, 2), [3] = ROW4(avx2, mvq, 3), [4] = ROW4(avx2, mvq, 4), [5] = ROW4(avx2, mvq, 5),
     [6] = ROW4(avx2, mvq, 6), [8] = ROW4(avx2, mvq, 8)},
    {[2] = ROW4(avx512, mvq, 2), [3] = ROW4(avx512, mvq, 3), [4] = ROW4(avx512, mvq, 4), [5] = ROW4(avx512, mvq, 5),
     [6] = ROW4(avx512, mvq, 6), [8] = ROW4(avx512, mvq, 8)},
};
static const mv_fn mv8_tab[9][MV_MAX_T] = {[2] = {mv8_2_1, mv8_2_2, mv8_2_3, mv8_2_4},
                                           [4] = {mv8_4_1, mv8_4_2, mv8_4_3, mv8_4_4},
                                           [8] = {mv8_8_1, mv8_8_2, mv8_8_3, mv8_8_4}};
static const mv_fn mvd_tab[2][3][MV_MAX_T] = {
    {ROW4(avx2, mvd, bf16), ROW4(avx2, mvd, f16), ROW4(avx2, mvd, f32)},
    {ROW4(avx512, mvd, bf16), ROW4(avx512, mvd, f16), ROW4(avx512, mvd, f32)},
};

static void mv_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const mv_job *j = ctx;
    const int64_t r0 = (int64_t)task * j->rows_per_task;
    int64_t r1 = r0 + j->rows_per_task;
    if (r1 > j->w->rows) r1 = j->w->rows;
    float *tb = j->s->tbuf + (size_t)thread * j->s->tbuf_cap;
    const size_t ngc = ng_cap(j->s->row_cap);
    j->fn(j, r0, r1, tb, tb + ngc);
}

/* Decode path: permutes the T (<= MV_MAX_T) activation rows into the xp layout and computes
 * their group sums (serially: cols floats each), then splits the rows over the pool. */
static void linear_mv(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T) {
    const int isa = s->simd >= CPU_SIMD_AVX512, L = isa ? 16 : 8, P = lane_values(w);
    const int64_t cols = w->cols, rows = w->rows;
    mv_job j = {.w = w, .out = out, .T = T, .s = s, .x = x};
    if (w->qbits) {
        j.xsstride = ng_cap(s->row_cap);
        for (int t = 0; t < T; t++) group_sums(s->xs + (size_t)t * j.xsstride, x + (size_t)t * cols, cols / w->group, w->group);
        j.xs = s->xs;
    }
    const int aq = cpu_simd_actq(s, w, T, NULL);
    if (aq == 127) {
        /* xp region: [0, R) floats hold T <= 4 rows of R int8, [2R, 3R) the lane scales */
        j.xq8 = (const int8_t *)(const void *)s->xp;
        j.xqstride = s->row_cap;
        j.dl = s->xp + 2 * s->row_cap;
        j.dlstride = s->row_cap / 4;
        for (int t = 0; t < T; t++)
            q8_prep(x + (size_t)t * cols, cols, (int8_t *)(void *)s->xp + (size_t)t * j.xqstride,
                    s->xp + 2 * s->row_cap + (size_t)t * j.dlstride, s->xs + (size_t)t * j.xsstride, (int)w->group);
        j.fn = mv4i8_tab[w->group < 64 ? 0 : w->group == 64 ? 1 : 2][T - 1];
    } else if (aq) {
        /* xp region: [0, 2R) floats hold T <= 4 rows of R int16, [2R, 3R) the lane scales */
        j.xq = (const int16_t *)(const void *)s->xp;
        j.xqstride = s->row_cap;
        j.dl = s->xp + 2 * s->row_cap;
        j.dlstride = s->row_cap / 4;
        for (int t = 0; t < T; t++)
            q16_prep(x + (size_t)t * cols, cols, w->qbits, (int16_t *)(void *)s->xp + (size_t)t * j.xqstride,
                     s->xp + 2 * s->row_cap + (size_t)t * j.dlstride);
        j.fn = mv8_tab[w->qbits][T - 1];
    } else {
        if (P == 1) {
            j.xp = x;
            j.xstride = (size_t)cols;
        } else {
            for (int t = 0; t < T; t++) perm_x(s->xp + (size_t)t * s->row_cap, x + (size_t)t * cols, cols, P, L);
            j.xp = s->xp;
            j.xstride = s->row_cap;
        }
        if (w->qbits) j.fn = mvq_tab[isa][w->qbits][T - 1];
        else j.fn = mvd_tab[isa][w->dtype == SFT_BF16 ? 0 : w->dtype == SFT_F16 ? 1 : 2][T - 1];
    }
    ST_ASSERT(j.fn);
    /* a few tasks per thread for balance, each large enough to amortise the hand-out */
    const int nt = st_pool_threads(pool);
    int64_t per = rows / ((int64_t)nt * 4);
    if (per < 16) per = 16;
    if (per > 256) per = 256;
    per = (per + 3) & ~(int64_t)3;
    j.rows_per_task = per;
    st_pool_run(pool, mv_task, &j, (int)((rows + per - 1) / per));
}

/* ------------------------------------------------------------------------------------------ */
/* prefill: dequantized tiles x packed token panels                                           */

typedef struct gm_job {
    const wt_linear *w;
    float *out;          /* [T, rows]                                                         */
    const float *x;      /* [T, cols]                                                         */
    float *xpk;          /* [n_panels, cols, GM_TOK] packed activations                       */
    int T, n_panels;
    cpu_scratch *s;
} gm_job;

/* Dequantizes row r of a quantized weight into dst[cols] in the 8-lane xp layout of its
 * format (w = s * q + b, fused). sc/bi: thread-local buffers of ng + 16 floats. */
AVX2_INL void deq_row_q(const wt_linear *w, int64_t r, float *dst, float *sc, float *bi, const int bits) {
    const int P = bits == 6 || bits == 8 ? 4 : 8, BV = 8 * P, BB = QBLOCK_BYTES(bits);
    const int64_t cols = w->cols, nblk = cols / BV, g = w->group, ng = cols / g;
    const int split = g < BV;
    const int gsh = split ? 0 : __builtin_ctz((unsigned)(g / BV));
    const __m256i sidx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
    const size_t so = (size_t)r * w->srow_elems;
    cvt_f32(sc, w->scales, so, ng, w->sdtype);
    cvt_f32(bi, w->biases, so, ng, w->sdtype);
    for (int64_t b = 0; b < nblk; b++) {
        __m256i va, vb = _mm256_setzero_si256();
        q_load8(q + b * BB, bits, &va, &vb);
        const __m256 sv = split ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 2 * b), sidx)
                                : _mm256_broadcast_ss(sc + (b >> gsh));
        const __m256 bv = split ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(bi + 2 * b), sidx)
                                : _mm256_broadcast_ss(bi + (b >> gsh));
#pragma GCC unroll 8
        for (int s = 0; s < P; s++)
            _mm256_storeu_ps(dst + b * BV + 8 * s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q_val8(va, vb, bits, s)), sv, bv));
    }
    for (int64_t i = nblk * BV; i < cols; i++)
        dst[i] = sc[i / g] * (float)cpu_mlx_q_get((const uint32_t *)q, bits, (size_t)i) + bi[i / g];
}

#define DEQ(B) \
    static AVX2_FN void deq_q##B(const wt_linear *w, int64_t r, float *dst, float *sc, float *bi) { deq_row_q(w, r, dst, sc, bi, B); }
DEQ(2)
DEQ(3)
DEQ(4)
DEQ(5)
DEQ(6)
DEQ(8)

typedef void (*deq_fn)(const wt_linear *w, int64_t r, float *dst, float *sc, float *bi);

/* Converts row r of a dense weight into dst[cols] (natural order). */
static AVX2_FN void deq_dense(const wt_linear *w, int64_t r, float *dst, float *sc, float *bi) {
    (void)sc;
    (void)bi;
    const char *row = (const char *)w->w + (size_t)r * w->row_bytes;
    const int64_t n = w->cols;
    int64_t i = 0;
    if (w->dtype == SFT_F32) {
        memcpy(dst, row, (size_t)n * 4);
        return;
    }
    if (w->dtype == SFT_BF16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i))), 16)));
    else
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, row + 2 * i, 2);
        dst[i] = w->dtype == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
    }
}

/* In-register transpose of an 8x8 float block (r[i] lane j <-> r[j] lane i). */
AVX2_INL void transpose8(__m256 *r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Fills wt[cols][16] with rows r0..r0+15 (zeros past the last row) as f32 in natural k
 * order: 8 rows at a time are dequantized into tmp (8 x R, decode layout), then each
 * 8-row x 8-lane block is transposed so that lane k of value s lands at its column. */
static AVX2_FN void gm_tile(const wt_linear *w, int64_t r0, float *wt, float *tmp, size_t R, float *sc, float *bi) {
    static const deq_fn deq_tab[9] = {[2] = deq_q2, [3] = deq_q3, [4] = deq_q4, [5] = deq_q5, [6] = deq_q6, [8] = deq_q8};
    const deq_fn deq = w->qbits ? deq_tab[w->qbits] : deq_dense;
    const int P = w->qbits ? lane_values(w) : 1, BV = 8 * P;
    const int64_t cols = w->cols, nblk = cols / BV;
    for (int h = 0; h < 2; h++) {
        for (int i = 0; i < 8; i++) {
            const int64_t r = r0 + 8 * h + i;
            if (r < w->rows) deq(w, r, tmp + (size_t)i * R, sc, bi);
            else memset(tmp + (size_t)i * R, 0, (size_t)cols * sizeof(float));
        }
        for (int64_t b = 0; b < nblk; b++)
            for (int s = 0; s < P; s++) {
                __m256 v[8];
                for (int i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(tmp + (size_t)i * R + b * BV + 8 * s);
                transpose8(v);
                for (int k = 0; k < 8; k++) _mm256_storeu_ps(wt + (size_t)(b * BV + P * k + s) * GM_ROWS + 8 * h, v[k]);
            }
        for (int64_t k = nblk * BV; k < cols; k++)
            for (int i = 0; i < 8; i++) wt[(size_t)k * GM_ROWS + 8 * h + i] = tmp[(size_t)i * R + k];
    }
}

/* c[6][16] (+)= sum over k < kn of xk[k][j] * wt[k][i]: 12 ymm accumulators, two weight
 * vectors and one broadcast per step. first: start from zero instead of c. */
static AVX2_FN void gm_kernel(const float *wt, const float *xk, int64_t kn, float *c, int first) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (first) {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    } else {
        c00 = _mm256_loadu_ps(c + 0), c01 = _mm256_loadu_ps(c + 8);
        c10 = _mm256_loadu_ps(c + 16), c11 = _mm256_loadu_ps(c + 24);
        c20 = _mm256_loadu_ps(c + 32), c21 = _mm256_loadu_ps(c + 40);
        c30 = _mm256_loadu_ps(c + 48), c31 = _mm256_loadu_ps(c + 56);
        c40 = _mm256_loadu_ps(c + 64), c41 = _mm256_loadu_ps(c + 72);
        c50 = _mm256_loadu_ps(c + 80), c51 = _mm256_loadu_ps(c + 88);
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kn; k++) {
        const __m256 w0 = _mm256_loadu_ps(wt + 16 * k), w1 = _mm256_loadu_ps(wt + 16 * k + 8);
        const float *xv = xk + 6 * k;
        __m256 b = _mm256_broadcast_ss(xv + 0);
        c00 = _mm256_fmadd_ps(w0, b, c00), c01 = _mm256_fmadd_ps(w1, b, c01);
        b = _mm256_broadcast_ss(xv + 1);
        c10 = _mm256_fmadd_ps(w0, b, c10), c11 = _mm256_fmadd_ps(w1, b, c11);
        b = _mm256_broadcast_ss(xv + 2);
        c20 = _mm256_fmadd_ps(w0, b, c20), c21 = _mm256_fmadd_ps(w1, b, c21);
        b = _mm256_broadcast_ss(xv + 3);
        c30 = _mm256_fmadd_ps(w0, b, c30), c31 = _mm256_fmadd_ps(w1, b, c31);
        b = _mm256_broadcast_ss(xv + 4);
        c40 = _mm256_fmadd_ps(w0, b, c40), c41 = _mm256_fmadd_ps(w1, b, c41);
        b = _mm256_broadcast_ss(xv + 5);
        c50 = _mm256_fmadd_ps(w0, b, c50), c51 = _mm256_fmadd_ps(w1, b, c51);
    }
    _mm256_storeu_ps(c + 0, c00), _mm256_storeu_ps(c + 8, c01);
    _mm256_storeu_ps(c + 16, c10), _mm256_storeu_ps(c + 24, c11);
    _mm256_storeu_ps(c + 32, c20), _mm256_storeu_ps(c + 40, c21);
    _mm256_storeu_ps(c + 48, c30), _mm256_storeu_ps(c + 56, c31);
    _mm256_storeu_ps(c + 64, c40), _mm256_storeu_ps(c + 72, c41);
    _mm256_storeu_ps(c + 80, c50), _mm256_storeu_ps(c + 88, c51);
}

/* Packs tokens 6p..6p+5 of x into xpk panel p as [cols][6] (zeros past T). */
static void gm_pack_task(void *ctx, int p, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const gm_job *j = ctx;
    const int64_t cols = j->w->cols;
    float *dst = j->xpk + (size_t)p * GM_TOK * cols;
    const float *src[GM_TOK];
    int n = 0;
    for (int i = 0; i < GM_TOK; i++) {
        const int t = p * GM_TOK + i;
        src[i] = t < j->T ? j->x + (size_t)t * cols : NULL;
        n += t < j->T;
    }
    if (n == GM_TOK) {
        for (int64_t k = 0; k < cols; k++)
            for (int i = 0; i < GM_TOK; i++) dst[k * GM_TOK + i] = src[i][k];
    } else {
        for (int64_t k = 0; k < cols; k++)
            for (int i = 0; i < GM_TOK; i++) dst[k * GM_TOK + i] = src[i] ? src[i][k] : 0.0f;
    }
}

/* GM_TILES tiles of 16 weight rows against all panels. Per-thread tbuf: wt [GM_TILES, 16 R],
 * tmp [8 R], c [GM_TILES, n_panels, 6, 16], sc/bi [ng_cap] each. Loop order k-block, tile,
 * panel: a tile's k-block (16 KiB) stays in L1 across all panels, and the activations'
 * k-block (T x GM_KC floats, 256 KiB at T = 256) stays in L2 across the task's tiles. */
static AVX2_FN void gm_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const gm_job *j = ctx;
    const wt_linear *w = j->w;
    const size_t R = j->s->row_cap, ngc = ng_cap(R), cstride = (size_t)j->n_panels * GM_TOK * GM_ROWS;
    const int64_t cols = w->cols, rows = w->rows, r0 = (int64_t)task * GM_ROWS * GM_TILES;
    const int nt = (int)((rows - r0 + GM_ROWS - 1) / GM_ROWS < GM_TILES ? (rows - r0 + GM_ROWS - 1) / GM_ROWS : GM_TILES);
    float *tb = j->s->tbuf + (size_t)thread * j->s->tbuf_cap;
    float *wt = tb, *tmp = tb + GM_TILES * 16 * R, *c = tmp + 8 * R;
    float *sc = c + GM_TILES * cstride, *bi = sc + ngc;
    for (int i = 0; i < nt; i++) gm_tile(w, r0 + (int64_t)i * GM_ROWS, wt + (size_t)i * 16 * R, tmp, R, sc, bi);
    for (int64_t k0 = 0; k0 < cols; k0 += GM_KC) {
        const int64_t kn = cols - k0 < GM_KC ? cols - k0 : GM_KC;
        for (int i = 0; i < nt; i++)
            for (int p = 0; p < j->n_panels; p++)
                gm_kernel(wt + (size_t)i * 16 * R + (size_t)k0 * GM_ROWS, j->xpk + ((size_t)p * cols + (size_t)k0) * GM_TOK,
                          kn, c + (size_t)i * cstride + (size_t)p * GM_TOK * GM_ROWS, k0 == 0);
    }
    for (int i = 0; i < nt; i++) {
        const int64_t ri = r0 + (int64_t)i * GM_ROWS;
        const int nr = rows - ri < GM_ROWS ? (int)(rows - ri) : GM_ROWS;
        for (int t = 0; t < j->T; t++) {
            const float *ct = c + (size_t)i * cstride + (size_t)t * GM_ROWS; /* (t/6*6 + t%6) * 16 */
            float *o = j->out + (size_t)t * rows + ri;
            if (nr == GM_ROWS) {
                _mm256_storeu_ps(o, _mm256_loadu_ps(ct));
                _mm256_storeu_ps(o + 8, _mm256_loadu_ps(ct + 8));
            } else {
                for (int r = 0; r < nr; r++) o[r] = ct[r];
            }
        }
    }
}

/* Prefill with int16 activations (4-bit weights, group >= 64, when the scratch's actq and
 * actq_gemm are set): the activations are quantized per 64-value block (q16_block64: as the
 * decode kernels' 32-blocks, over 64), the weights widened to int16 once per tile, and the
 * GQ_TOK x 16 block accumulates vpmaddwd products in int32 over each 64-value block (no
 * overflow: 32 x 2 x 15 x 32767 < 2^31), then adds them in float scaled by activation scale x
 * group scale; the bias term b_g * sum(x_g) uses the exact float group sums. vpmaddwd + vpaddd
 * do 16 multiply-adds where an FMA does 8 (measured ~1.6x the FMA rate per core on this Zen 3;
 * the kernel ~1.2x the float GEMM). Error: sum |s q_i| * d_i / 2, d_i = max|x| / 32767 of the
 * 64-block of x_i. Panel p (in xp, GQ_TOK * cols floats apart): xk [cols/2, GQ_TOK] int32
 * (pairs of int16), xd [cols/64, GQ_TOK] activation scales, xg [cols/group, GQ_TOK] group sums.
 * Tile (tbuf, 16 R floats apart): wt [cols/2, 16, 2] int16, sct / bit [cols/group, 16]. */

/* 64 values of x as int16 pairs pr[32] (natural order), q = round-to-nearest-even(
 * x * (32767 / amax)) over the 64; returns amax / 32767. */
AVX2_INL float q16_block64(const float *x, int32_t *pr) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[8], m = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const __m256 id = _mm256_set1_ps(amax > 0 ? 32767.0f / amax : 0.0f);
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)), b = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], id));
        _mm256_storeu_si256((__m256i *)(pr + 4 * i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    return amax / 32767.0f;
}

static AVX2_FN void gq_pack_task(void *ctx, int p, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const gm_job *j = ctx;
    const int64_t cols = j->w->cols, g = j->w->group, ng = cols / g;
    float *base = j->xpk + (size_t)p * GQ_TOK * cols;
    int32_t *xk = (int32_t *)(void *)base;
    float *xd = base + (size_t)cols / 2 * GQ_TOK, *xg = xd + GQ_TOK * (cols / 64);
    for (int i = 0; i < GQ_TOK; i++) {
        const int t = p * GQ_TOK + i;
        if (t >= j->T) {
            for (int64_t k = 0; k < cols / 2; k++) xk[k * GQ_TOK + i] = 0;
            for (int64_t b = 0; b < cols / 64; b++) xd[b * GQ_TOK + i] = 0;
            for (int64_t gi = 0; gi < ng; gi++) xg[gi * GQ_TOK + i] = 0;
            continue;
        }
        const float *x = j->x + (size_t)t * cols;
        for (int64_t b = 0; b < cols / 64; b++) {
            int32_t pr[32];
            xd[b * GQ_TOK + i] = q16_block64(x + b * 64, pr);
            for (int k = 0; k < 32; k++) xk[(b * 32 + k) * GQ_TOK + i] = pr[k];
        }
        for (int64_t gi = 0; gi < ng; gi++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < g; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + gi * g + k));
            xg[gi * GQ_TOK + i] = hsum8(a);
        }
    }
}

/* Tile of rows r0..r0+15 (zeros past the last row) of a 4-bit weight: wt [cols/2, 16, 2]
 * int16, sct / bit [ng, 16] f32. tmp: 8 rows x cols int16. */
static AVX2_FN void gq_tile(const wt_linear *w, int64_t r0, int16_t *wt, float *sct, float *bit, int16_t *tmp, float *sc,
                            float *bi) {
    const int64_t cols = w->cols, ng = cols / w->group;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int h = 0; h < 2; h++) {
        for (int i = 0; i < 8; i++) {
            const int64_t r = r0 + 8 * h + i;
            int16_t *d = tmp + (size_t)i * cols;
            if (r >= w->rows) {
                memset(d, 0, (size_t)cols * sizeof(int16_t));
                for (int64_t gi = 0; gi < ng; gi++) sct[gi * 16 + 8 * h + i] = bit[gi * 16 + 8 * h + i] = 0;
                continue;
            }
            const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
            for (int64_t b = 0; b < cols / 32; b++) { /* 16 bytes = 32 values, low nibble first */
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + b * 16));
                const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                _mm256_storeu_si256((__m256i *)(d + b * 32), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi)));
                _mm256_storeu_si256((__m256i *)(d + b * 32 + 16), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi)));
            }
            const size_t so = (size_t)r * w->srow_elems;
            cvt_f32(sc, w->scales, so, ng, w->sdtype);
            cvt_f32(bi, w->biases, so, ng, w->sdtype);
            for (int64_t gi = 0; gi < ng; gi++) sct[gi * 16 + 8 * h + i] = sc[gi], bit[gi * 16 + 8 * h + i] = bi[gi];
        }
        for (int64_t k = 0; k < cols / 2; k += 8) { /* 8 pairs of 8 rows: dword transpose */
            __m256 v[8];
            for (int i = 0; i < 8; i++) v[i] = _mm256_loadu_ps((const float *)(const void *)(tmp + (size_t)i * cols + 2 * k));
            transpose8(v);
            for (int q = 0; q < 8; q++) _mm256_storeu_ps((float *)(void *)(wt + ((k + q) * 16 + 8 * h) * 2), v[q]);
        }
    }
}

/* c[GQ_TOK][16] (+)= the block's contribution over columns [k0, k0 + kn) (multiples of 64; k0
 * a multiple of the group, 2^gsh blocks of 64): per 64-value block, int32 sums of vpmaddwd
 * products (2 GQ_TOK accumulators + 2 weight vectors + a broadcast + 2 temporaries fit the 16
 * ymm registers), then c += float(sum) * (x scale * group scale), and at each group start
 * c += bias * group sum. */
static AVX2_FN void gq_kernel(const int16_t *wt, const int32_t *xk, const float *xd, const float *xg, const float *sct,
                              const float *bit, int64_t k0, int64_t kn, int gsh, float *c, int first) {
    if (first) memset(c, 0, GQ_TOK * 16 * sizeof(float));
    for (int64_t kb = k0 / 64; kb < (k0 + kn) / 64; kb++) {
        __m256i acc[GQ_TOK][2];
#pragma GCC unroll 8
        for (int t = 0; t < GQ_TOK; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
        const int16_t *wk = wt + (size_t)kb * 32 * 32;
        const int32_t *xv = xk + (size_t)kb * 32 * GQ_TOK;
#pragma GCC unroll 2
        for (int kp = 0; kp < 32; kp++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wk + kp * 32));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wk + kp * 32 + 16));
#pragma GCC unroll 8
            for (int t = 0; t < GQ_TOK; t++) {
                const __m256i b = _mm256_set1_epi32(xv[kp * GQ_TOK + t]);
                acc[t][0] = _mm256_add_epi32(acc[t][0], _mm256_madd_epi16(w0, b));
                acc[t][1] = _mm256_add_epi32(acc[t][1], _mm256_madd_epi16(w1, b));
            }
        }
        const int64_t gi = kb >> gsh;
        const __m256 s0 = _mm256_loadu_ps(sct + gi * 16), s1 = _mm256_loadu_ps(sct + gi * 16 + 8);
        const float *d = xd + kb * GQ_TOK;
        const int gstart = (kb & ((1 << gsh) - 1)) == 0;
#pragma GCC unroll 8
        for (int t = 0; t < GQ_TOK; t++) {
            const __m256 dt = _mm256_broadcast_ss(d + t);
            __m256 c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][0]), _mm256_mul_ps(s0, dt), _mm256_loadu_ps(c + 16 * t));
            __m256 c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][1]), _mm256_mul_ps(s1, dt), _mm256_loadu_ps(c + 16 * t + 8));
            if (gstart) {
                const __m256 xs = _mm256_broadcast_ss(xg + gi * GQ_TOK + t);
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(bit + gi * 16), xs, c0);
                c1 = _mm256_fmadd_ps(_mm256_loadu_ps(bit + gi * 16 + 8), xs, c1);
            }
            _mm256_storeu_ps(c + 16 * t, c0);
            _mm256_storeu_ps(c + 16 * t + 8, c1);
        }
    }
}

/* The last step of a gm_task: the nt tiles' accumulators c (tile i at c + i * cstride, token t
 * at + t * GM_ROWS) written to rows r0.. of j->out for every token (a short last tile by element). */
static AVX2_FN void gm_store_tiles(const gm_job *j, const float *c, size_t cstride, int64_t r0, int nt) {
    const int64_t rows = j->w->rows;
    for (int i = 0; i < nt; i++) {
        const int64_t ri = r0 + (int64_t)i * GM_ROWS;
        const int nr = rows - ri < GM_ROWS ? (int)(rows - ri) : GM_ROWS;
        for (int t = 0; t < j->T; t++) {
            const float *ct = c + (size_t)i * cstride + (size_t)t * GM_ROWS;
            float *o = j->out + (size_t)t * rows + ri;
            if (nr == GM_ROWS) {
                _mm256_storeu_ps(o, _mm256_loadu_ps(ct));
                _mm256_storeu_ps(o + 8, _mm256_loadu_ps(ct + 8));
            } else {
                for (int r = 0; r < nr; r++) o[r] = ct[r];
            }
        }
    }
}

/* gm_task for the int16 path: tiles of int16 weights against int16 panels. */
static AVX2_FN void gq_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const gm_job *j = ctx;
    const wt_linear *w = j->w;
    const size_t R = j->s->row_cap, ngc = ng_cap(R), cstride = (size_t)j->n_panels * GQ_TOK * GM_ROWS;
    const int64_t cols = w->cols, rows = w->rows, r0 = (int64_t)task * GM_ROWS * GM_TILES, ng = cols / w->group;
    const int gsh = __builtin_ctz((unsigned)(w->group / 64));
    const int nt = (int)((rows - r0 + GM_ROWS - 1) / GM_ROWS < GM_TILES ? (rows - r0 + GM_ROWS - 1) / GM_ROWS : GM_TILES);
    float *tb = j->s->tbuf + (size_t)thread * j->s->tbuf_cap;
    float *wt = tb, *tmp = tb + GM_TILES * 16 * R, *c = tmp + 8 * R;
    float *sc = c + GM_TILES * cstride, *bi = sc + ngc;
    for (int i = 0; i < nt; i++) {
        float *ti = wt + (size_t)i * 16 * R; /* int16 tile: 8 cols floats, then scales and biases */
        gq_tile(w, r0 + (int64_t)i * GM_ROWS, (int16_t *)(void *)ti, ti + 8 * cols, ti + 8 * cols + 16 * ng,
                (int16_t *)(void *)tmp, sc, bi);
    }
    for (int64_t k0 = 0; k0 < cols; k0 += GM_KC) {
        const int64_t kn = cols - k0 < GM_KC ? cols - k0 : GM_KC;
        for (int i = 0; i < nt; i++) {
            const float *ti = wt + (size_t)i * 16 * R;
            for (int p = 0; p < j->n_panels; p++) {
                const float *pb = j->xpk + (size_t)p * GQ_TOK * cols;
                gq_kernel((const int16_t *)(const void *)ti, (const int32_t *)(const void *)pb, pb + cols / 2 * GQ_TOK,
                          pb + cols / 2 * GQ_TOK + GQ_TOK * (cols / 64), ti + 8 * cols, ti + 8 * cols + 16 * ng, k0, kn, gsh,
                          c + (size_t)i * cstride + (size_t)p * GQ_TOK * GM_ROWS, k0 == 0);
            }
        }
    }
    gm_store_tiles(j, c, cstride, r0, nt);
}

/* Prefill with int8 activations (4-bit weights, cols % 64 == 0, when actq8 and actq_gemm are
 * set; cpu_simd_actq): the decode kernel's arithmetic in a GEMM. Activations are quantized
 * per 32-value block exactly as q8_prep does (q8_block32), the bias term multiplies group
 * sums of the rounded x^ (so each output is the dot product of w with x^, as in decode), and
 * the weights are expanded to one byte per code once per tile. Per 32-block and token, the
 * 8 k-quads' vpmaddubsw products (unsigned code x signed int8, pairs added: |.| <= 3810) are
 * summed in int16 (|.| <= 8 x 3810 = 30480 < 32767: no wrap), then vpmaddwd with ones makes
 * one int32 per row, scaled in float by activation scale x group scale. Against the int16
 * GEMM: ~38 instead of ~66 vector operations per token, 32 k values and 16 rows.
 * Panel p (in xp, GQ_TOK * cols floats apart): xk [cols/4, GQ_TOK] int32 (4 int8 codes),
 * xd [cols/32, GQ_TOK] activation scales, xg [cols/group, GQ_TOK] group sums of x^.
 * Tile (tbuf, 16 R floats apart): wt [cols/4, 16, 4] uint8 codes, then sct / bit [ng, 16]. */
static AVX2_FN void g8_pack_task(void *ctx, int p, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const gm_job *j = ctx;
    const int64_t cols = j->w->cols, g = j->w->group, ng = cols / g, nb = cols / 32;
    float *base = j->xpk + (size_t)p * GQ_TOK * cols;
    int32_t *xk = (int32_t *)(void *)base;
    float *xd = base + (size_t)cols / 4 * GQ_TOK, *xg = xd + GQ_TOK * nb;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int i = 0; i < GQ_TOK; i++) {
        const int t = p * GQ_TOK + i;
        for (int64_t gi = 0; gi < ng; gi++) xg[gi * GQ_TOK + i] = 0;
        if (t >= j->T) {
            for (int64_t k = 0; k < cols / 4; k++) xk[k * GQ_TOK + i] = 0;
            for (int64_t b = 0; b < nb; b++) xd[b * GQ_TOK + i] = 0;
            continue;
        }
        const float *x = j->x + (size_t)t * cols;
        for (int64_t b = 0; b < nb; b++) {
            float d;
            const __m256i qv = q8_block32(x + 32 * b, &d);
            int32_t qd[8];
            _mm256_storeu_si256((__m256i *)qd, qv);
            for (int k = 0; k < 8; k++) xk[(b * 8 + k) * GQ_TOK + i] = qd[k];
            xd[b * GQ_TOK + i] = d;
            const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qv), ones16);
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            xg[(b * 32 / g) * GQ_TOK + i] += d * (float)_mm_cvtsi128_si32(h); /* as q8_prep, block order */
        }
    }
}

/* Tile of rows r0..r0+15 (zeros past the last row) of a 4-bit weight: wt [cols/4, 16, 4]
 * uint8 codes, sct / bit [ng, 16] f32. tmp: 8 rows x cols bytes. */
static AVX2_FN void g8_tile(const wt_linear *w, int64_t r0, uint8_t *wt, float *sct, float *bit, uint8_t *tmp, float *sc,
                            float *bi) {
    const int64_t cols = w->cols, ng = cols / w->group;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int h = 0; h < 2; h++) {
        for (int i = 0; i < 8; i++) {
            const int64_t r = r0 + 8 * h + i;
            uint8_t *d = tmp + (size_t)i * cols;
            if (r >= w->rows) {
                memset(d, 0, (size_t)cols);
                for (int64_t gi = 0; gi < ng; gi++) sct[gi * 16 + 8 * h + i] = bit[gi * 16 + 8 * h + i] = 0;
                continue;
            }
            const uint8_t *q = (const uint8_t *)w->w + (size_t)r * w->row_bytes;
            for (int64_t b = 0; b < cols / 32; b++) { /* 16 bytes = 32 codes, low nibble first */
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + b * 16));
                const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                _mm_storeu_si128((__m128i *)(d + b * 32), _mm_unpacklo_epi8(lo, hi));
                _mm_storeu_si128((__m128i *)(d + b * 32 + 16), _mm_unpackhi_epi8(lo, hi));
            }
            const size_t so = (size_t)r * w->srow_elems;
            cvt_f32(sc, w->scales, so, ng, w->sdtype);
            cvt_f32(bi, w->biases, so, ng, w->sdtype);
            for (int64_t gi = 0; gi < ng; gi++) sct[gi * 16 + 8 * h + i] = sc[gi], bit[gi * 16 + 8 * h + i] = bi[gi];
        }
        for (int64_t k = 0; k < cols / 4; k += 8) { /* 8 quads of 8 rows: dword transpose */
            __m256 v[8];
            for (int i = 0; i < 8; i++) v[i] = _mm256_loadu_ps((const float *)(const void *)(tmp + (size_t)i * cols + 4 * k));
            transpose8(v);
            for (int q = 0; q < 8; q++) _mm256_storeu_ps((float *)(void *)(wt + ((k + q) * 16 + 8 * h) * 4), v[q]);
        }
    }
}

/* c[GQ_TOK][16] (+)= the block's contribution over columns [k0, k0 + kn) (multiples of 32; k0
 * a multiple of the group, 2^gsh blocks of 32 per group): per 32-block, int16 sums of the
 * vpmaddubsw products (2 GQ_TOK accumulators + 2 weight vectors + a broadcast), vpmaddwd with
 * ones, then c += float(sum) * (x scale * group scale), and at each group start c += bias *
 * group sum of x^. */
static AVX2_FN void g8_kernel(const uint8_t *wt, const int32_t *xk, const float *xd, const float *xg, const float *sct,
                              const float *bit, int64_t k0, int64_t kn, int gsh, float *c, int first) {
    if (first) memset(c, 0, GQ_TOK * 16 * sizeof(float));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t kb = k0 / 32; kb < (k0 + kn) / 32; kb++) {
        __m256i acc[GQ_TOK][2];
#pragma GCC unroll 8
        for (int t = 0; t < GQ_TOK; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
        const uint8_t *wk = wt + (size_t)kb * 8 * 64;
        const int32_t *xv = xk + (size_t)kb * 8 * GQ_TOK;
#pragma GCC unroll 2
        for (int kq = 0; kq < 8; kq++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wk + kq * 64));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wk + kq * 64 + 32));
#pragma GCC unroll 8
            for (int t = 0; t < GQ_TOK; t++) {
                const __m256i b = _mm256_set1_epi32(xv[kq * GQ_TOK + t]);
                acc[t][0] = _mm256_add_epi16(acc[t][0], _mm256_maddubs_epi16(w0, b));
                acc[t][1] = _mm256_add_epi16(acc[t][1], _mm256_maddubs_epi16(w1, b));
            }
        }
        const int64_t gi = kb >> gsh;
        const __m256 s0 = _mm256_loadu_ps(sct + gi * 16), s1 = _mm256_loadu_ps(sct + gi * 16 + 8);
        const float *d = xd + kb * GQ_TOK;
        const int gstart = (kb & ((1 << gsh) - 1)) == 0;
#pragma GCC unroll 8
        for (int t = 0; t < GQ_TOK; t++) {
            const __m256 dt = _mm256_broadcast_ss(d + t);
            const __m256i p0 = _mm256_madd_epi16(acc[t][0], ones), p1 = _mm256_madd_epi16(acc[t][1], ones);
            __m256 c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(s0, dt), _mm256_loadu_ps(c + 16 * t));
            __m256 c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(s1, dt), _mm256_loadu_ps(c + 16 * t + 8));
            if (gstart) {
                const __m256 xs = _mm256_broadcast_ss(xg + gi * GQ_TOK + t);
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(bit + gi * 16), xs, c0);
                c1 = _mm256_fmadd_ps(_mm256_loadu_ps(bit + gi * 16 + 8), xs, c1);
            }
            _mm256_storeu_ps(c + 16 * t, c0);
            _mm256_storeu_ps(c + 16 * t + 8, c1);
        }
    }
}

/* gm_task for the int8 path: tiles of byte codes against int8 panels. */
static AVX2_FN void g8_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const gm_job *j = ctx;
    const wt_linear *w = j->w;
    const size_t R = j->s->row_cap, ngc = ng_cap(R), cstride = (size_t)j->n_panels * GQ_TOK * GM_ROWS;
    const int64_t cols = w->cols, rows = w->rows, r0 = (int64_t)task * GM_ROWS * GM_TILES, ng = cols / w->group;
    const int gsh = __builtin_ctz((unsigned)(w->group / 32));
    const int nt = (int)((rows - r0 + GM_ROWS - 1) / GM_ROWS < GM_TILES ? (rows - r0 + GM_ROWS - 1) / GM_ROWS : GM_TILES);
    float *tb = j->s->tbuf + (size_t)thread * j->s->tbuf_cap;
    float *wt = tb, *tmp = tb + GM_TILES * 16 * R, *c = tmp + 8 * R;
    float *sc = c + GM_TILES * cstride, *bi = sc + ngc;
    for (int i = 0; i < nt; i++) {
        float *ti = wt + (size_t)i * 16 * R; /* byte tile: 4 cols floats, then scales and biases */
        g8_tile(w, r0 + (int64_t)i * GM_ROWS, (uint8_t *)(void *)ti, ti + 4 * cols, ti + 4 * cols + 16 * ng,
                (uint8_t *)(void *)tmp, sc, bi);
    }
    for (int64_t k0 = 0; k0 < cols; k0 += GM_KC) {
        const int64_t kn = cols - k0 < GM_KC ? cols - k0 : GM_KC;
        for (int i = 0; i < nt; i++) {
            const float *ti = wt + (size_t)i * 16 * R;
            for (int p = 0; p < j->n_panels; p++) {
                const float *pb = j->xpk + (size_t)p * GQ_TOK * cols;
                g8_kernel((const uint8_t *)(const void *)ti, (const int32_t *)(const void *)pb, pb + cols / 4 * GQ_TOK,
                          pb + cols / 4 * GQ_TOK + GQ_TOK * (cols / 32), ti + 4 * cols, ti + 4 * cols + 16 * ng, k0, kn, gsh,
                          c + (size_t)i * cstride + (size_t)p * GQ_TOK * GM_ROWS, k0 == 0);
            }
        }
    }
    gm_store_tiles(j, c, cstride, r0, nt);
}

/* Prefill path for T <= s->max_batch tokens: pack panels (parallel), then tiles (parallel). */
static void linear_gemm(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T) {
    const int aq = cpu_simd_actq(s, w, T, NULL), pt = aq ? GQ_TOK : GM_TOK;
    gm_job j = {.w = w, .out = out, .x = x, .xpk = s->xp, .T = T, .n_panels = (T + pt - 1) / pt, .s = s};
    st_pool_run(pool, aq == 127 ? g8_pack_task : aq ? gq_pack_task : gm_pack_task, &j, j.n_panels);
    const int64_t per = GM_ROWS * GM_TILES;
    st_pool_run(pool, aq == 127 ? g8_task : aq ? gq_task : gm_task, &j, (int)((w->rows + per - 1) / per));
}

void cpu_linear_fast(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T) {
    ST_ASSERT((size_t)w->cols <= s->row_cap && s->simd >= CPU_SIMD_AVX2 && s->xp && s->tbuf);
    if (T <= 0) return;
    /* chunks of max_batch rows; a chunk of up to max(MV_MAX_T, s->mv_split) rows (batched decode:
     * a row per sequence) runs as ceil(n / MV_MAX_T) balanced fused passes, larger ones on the
     * GEMM, which expands every weight tile once per call: a few rows do not repay that. 28
     * qwen3-0.6b q4g64 layers on one thread: T = 4 36.7 ms, T = 5 97.4 ms on the GEMM and 50-55
     * ms as 3 + 2; at T = 12 the GEMM wins (PERF.md "Batched decode on the CPU: a few rows as
     * fused passes") */
    const int split = s->mv_split > MV_MAX_T ? s->mv_split : MV_MAX_T;
    for (int t0 = 0; t0 < T; t0 += s->max_batch) {
        const int n = T - t0 < s->max_batch ? T - t0 : s->max_batch;
        if (n > split) {
            linear_gemm(pool, s, out + (size_t)t0 * w->rows, x + (size_t)t0 * w->cols, w, n);
            continue;
        }
        const int np = (n + MV_MAX_T - 1) / MV_MAX_T;
        for (int i = 0, u = t0; i < np; i++) {
            const int k = (t0 + n - u + (np - i) - 1) / (np - i);
            linear_mv(pool, s, out + (size_t)u * w->rows, x + (size_t)u * w->cols, w, k);
            u += k;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* attention                                                                                  */

typedef struct fa_job {
    float *out;
    const float *q;
    const void *const *k; /* per token: its slot's K rows, float32 or float16 (es)  */
    const void *const *v;
    const int32_t *pos;
    int T, n_head, n_head_kv, hd;
    float scale;
    int tb;       /* tokens per task                                   */
    int nh;       /* query heads per task (of one KV group), tb*nh <= 8 */
    int n_hg;     /* head groups per KV head                           */
    cpu_scratch *s;
    int kvw;      /* elements between the cache rows of consecutive positions */
    int es;       /* bytes per cache element: 4 (float32) or 2 (float16)   */
} fa_job;

#ifndef FA_VPF
#define FA_VPF 1 /* prefetch V rows (to L2) during the scores pass */
#endif
#ifndef FA_PF
#define FA_PF 8 /* K / V rows prefetched ahead. Rows of one KV head are n_head_kv * hd floats
                 * apart (4 KiB for qwen3): every row is its own page, beyond the hardware
                 * prefetchers' reach                                                          */
#endif
/* 8 cache values starting at element i of p as float32: p holds float32 (es == 4) or IEEE
 * float16 (es == 2, widened exactly by vcvtph2ps). es is a constant in every caller. */
AVX2_INL __m256 kv_load8(const void *p, size_t i, const int es) {
    if (es == 2) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* Lane i of the result = sum of the 8 lanes of a[i]. */
AVX2_INL __m256 reduce8(const __m256 *a) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* Scores of NR (1..4) rows (queries qr[], visible lengths np[]) at NP (1 or 2) positions p,
 * p+1: sc[8 q + r] = qr[r] . K[q] * scale, -inf where q >= np[r]. NR x NP accumulators,
 * per 8 dims NP K loads + NR query loads. */
AVX2_INL void fa_scores(const float *const *qr, const int *np, const char *kc, const char *vc, int p, int hd, int kvw,
                        float scale, float *sc, const int NR, const int NP, const int es) {
    const size_t rb = (size_t)kvw * es; /* bytes between positions */
    const char *k0 = kc + (size_t)p * rb, *k1 = k0 + rb;
    if (vc) /* the V rows P V will read, into L2 */
        for (int i = 0; i < hd * es; i += 64) {
            _mm_prefetch(vc + (size_t)(p + FA_PF) * rb + i, _MM_HINT_T1);
            if (NP == 2) _mm_prefetch(vc + (size_t)(p + 1 + FA_PF) * rb + i, _MM_HINT_T1);
        }
    for (int i = 0; i < hd * es; i += 64) {
        _mm_prefetch(k0 + (size_t)FA_PF * rb + i, _MM_HINT_T0);
        if (NP == 2) _mm_prefetch(k1 + (size_t)FA_PF * rb + i, _MM_HINT_T0);
    }
    __m256 acc[8];
#pragma GCC unroll 8
    for (int a = 0; a < 8; a++) acc[a] = _mm256_setzero_ps();
    for (int i = 0; i < hd; i += 8) {
        const __m256 kv0 = kv_load8(k0, (size_t)i, es), kv1 = NP == 2 ? kv_load8(k1, (size_t)i, es) : kv0;
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const __m256 qv = _mm256_loadu_ps(qr[r] + i);
            acc[r] = _mm256_fmadd_ps(qv, kv0, acc[r]);
            if (NP == 2) acc[4 + r] = _mm256_fmadd_ps(qv, kv1, acc[4 + r]);
        }
    }
    int n4[8];
#pragma GCC unroll 8
    for (int a = 0; a < 8; a++) n4[a] = a % 4 < NR ? np[a % 4] : 0;
    const __m256i live = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)n4), _mm256_setr_epi32(p, p, p, p, p + 1, p + 1, p + 1, p + 1));
    const __m256 sv = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)),
                                       _mm256_castsi256_ps(live));
    float o[8];
    _mm256_storeu_ps(o, sv);
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        sc[8 * (size_t)p + r] = o[r];
        if (NP == 2) sc[8 * (size_t)(p + 1) + r] = o[4 + r];
    }
}

/* orow[r][0..hd) = sum_p P[p][r] V[p] for NR (constant) rows whose probabilities are lanes
 * r of P (P + 8p: the [n, 8] layout of fa_rows, offset to the first row). C chunks of 8 output
 * floats per row stay in registers over all n positions (NR*C accumulators; per position C V
 * loads + NR broadcasts for NR*C FMAs). (Software prefetch of V lines measured slower.) */
AVX2_INL void fa_pv(float *const *orow, const float *P, const char *vc, int n, int hd, int kvw, const int NR, const int C,
                    const int es) {
    int c0 = 0;
    for (; c0 + 8 * C <= hd; c0 += 8 * C) {
        __m256 acc[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
        for (int p = 0; p < n; p++) {
            const char *vr = vc + ((size_t)p * kvw + (size_t)c0) * es;
            __m256 v[4];
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) v[c] = kv_load8(vr, (size_t)(8 * c), es);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                const __m256 b = _mm256_broadcast_ss(P + 8 * (size_t)p + r);
#pragma GCC unroll 4
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(b, v[c], acc[r][c]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) _mm256_storeu_ps(orow[r] + c0 + 8 * c, acc[r][c]);
    }
    for (; c0 < hd; c0 += 8) { /* hd % (8C) != 0 */
        __m256 acc[4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
        for (int p = 0; p < n; p++) {
            const __m256 v = kv_load8(vc, (size_t)p * kvw + (size_t)c0, es);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + 8 * (size_t)p + r), v, acc[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) _mm256_storeu_ps(orow[r] + c0, acc[r]);
    }
}

/* Attention for NQ (1..8, constant) query rows sharing one KV head: row j has query qr[j],
 * output orow[j] and sees positions 0..npos[j]-1 of K rows kc / V rows vc (row stride kvw).
 * One vector lane per row: sc [n, 8] holds scores, then probabilities (0 where masked).
 * K rows are read once for all rows; P V in fa_pv. */
AVX2_INL void fa_rows(const float *const *qr, float *const *orow, const int *npos, const char *kc, const char *vc, int hd,
                      int kvw, float scale, float *sc, const int NQ, const int es) {
    int np8[8] = {0}, nmax = 0;
    #pragma GCC unroll 8
    for (int j = 0; j < NQ; j++) {
        np8[j] = npos[j];
        nmax = npos[j] > nmax ? npos[j] : nmax;
    }
    const __m256i npv = _mm256_loadu_si256((const __m256i *)np8);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    /* 1. scores, 4 rows x 2 positions per register block */
    const int NA = NQ < 4 ? NQ : 4, NB = NQ > 4 ? NQ - 4 : 1; /* rows 0..3, 4..7 (NB unused if NQ <= 4) */
    int p = 0;
    for (; p + 2 <= nmax; p += 2) {
        fa_scores(qr, np8, kc, FA_VPF ? vc : NULL, p, hd, kvw, scale, sc, NA, 2, es);
        if (NQ > 4) fa_scores(qr + 4, np8 + 4, kc, NULL, p, hd, kvw, scale, sc + 4, NB, 2, es);
    }
    if (p < nmax) {
        fa_scores(qr, np8, kc, NULL, p, hd, kvw, scale, sc, NA, 1, es);
        if (NQ > 4) fa_scores(qr + 4, np8 + 4, kc, NULL, p, hd, kvw, scale, sc + 4, NB, 1, es);
    }
    /* 2. softmax per lane */
    __m256 mx = ninf, sum = _mm256_setzero_ps();
    for (int p = 0; p < nmax; p++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc + 8 * (size_t)p));
    for (int p = 0; p < nmax; p++) {
        const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(npv, _mm256_set1_epi32(p)));
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + 8 * (size_t)p), mx)), live);
        _mm256_storeu_ps(sc + 8 * (size_t)p, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), sum),
                                     _mm256_cmp_ps(sum, _mm256_setzero_ps(), _CMP_GT_OQ)); /* unused lanes: 0 */
    for (int p = 0; p < nmax; p++) _mm256_storeu_ps(sc + 8 * (size_t)p, _mm256_mul_ps(_mm256_loadu_ps(sc + 8 * (size_t)p), inv));
    /* 3. out = P V in passes of up to 4 rows */
    fa_pv(orow, sc, vc, nmax, hd, kvw, NA, NA <= 2 ? 4 : 2, es);
    if (NQ > 4) fa_pv(orow + 4, sc + 4, vc, nmax, hd, kvw, NB, NB <= 2 ? 4 : 2, es);
}

/* One task: tokens [t0, t0 + tb) x query heads [hg*nh, hg*nh + nh) of KV head kvh. Tokens
 * that share a KV cache slot (the usual prefill case) go through fa_rows together. */
AVX2_INL void fa_task_es(const fa_job *j, int task, int thread, const int es) {
    const int Hkv = j->n_head_kv, rep = j->n_head / Hkv, hd = j->hd;
    const int n_tb = (j->T + j->tb - 1) / j->tb; /* KV-head-major: a thread's next task reuses the K/V in L2 */
    const int hg = task % j->n_hg, tbi = (task / j->n_hg) % n_tb, kvh = task / (j->n_hg * n_tb);
    const int t0 = tbi * j->tb, t1 = t0 + j->tb < j->T ? t0 + j->tb : j->T;
    const int h0 = hg * j->nh, hn = rep - h0 < j->nh ? rep - h0 : j->nh;
    float *sc = j->s->tbuf + (size_t)thread * j->s->tbuf_cap; /* [row_cap, 8] */
    for (int ta = t0; ta < t1;) {
        int tz = ta + 1;
        while (tz < t1 && j->k[tz] == j->k[ta] && j->v[tz] == j->v[ta]) tz++;
        const float *qr[8];
        float *orow[8];
        int npos[8], nq = 0;
        for (int t = ta; t < tz; t++)
            for (int r = 0; r < hn; r++) {
                const size_t head = (size_t)t * j->n_head + (size_t)kvh * rep + (size_t)(h0 + r);
                qr[nq] = j->q + head * hd;
                orow[nq] = j->out + head * hd;
                npos[nq++] = j->pos[t] + 1;
            }
        const char *kc = (const char *)j->k[ta] + (size_t)kvh * hd * es, *vc = (const char *)j->v[ta] + (size_t)kvh * hd * es;
        const int kvw = j->kvw;
        switch (nq) {
        case 1: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 1, es); break;
        case 2: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 2, es); break;
        case 3: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 3, es); break;
        case 4: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 4, es); break;
        case 5: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 5, es); break;
        case 6: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 6, es); break;
        case 7: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 7, es); break;
        default: fa_rows(qr, orow, npos, kc, vc, hd, kvw, j->scale, sc, 8, es); break;
        }
        ta = tz;
    }
}

/* One prefill attention task (fa_task_es) for a float32 or a float16 cache. */
static AVX2_FN void fa_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const fa_job *j = ctx;
    if (j->es == 2) fa_task_es(j, task, thread, 2);
    else fa_task_es(j, task, thread, 4);
}

/* Decode attention (T <= MV_MAX_T): split-K over positions. Token t's positions 0..npos-1 are
 * cut into n_ch = min(FD_MAX_CH, ceil(npos / FD_MIN_CH)) chunks of ch_len (a function of npos
 * only, so a row gives the same bits whatever T or the thread count). One pool task per
 * (token, chunk) reads the chunk's K rows and then its V rows front to back, all KV heads at
 * once (the cache rows of consecutive positions are contiguous: one sequential stream per task
 * instead of one 512-byte row per page per head), with online softmax over sub-blocks of FD_SB
 * positions. It leaves an unnormalised output, running max and sum per query head; a second
 * pass folds the chunks of each (token, head) in chunk order. */
#ifndef FD_MAX_CH
#define FD_MAX_CH 16 /* chunks per token (split-K factor)                               */
#endif
#define FD_MIN_CH 32 /* positions per chunk at least                                   */
#define FD_SB 64     /* positions per sub-block: scores [FD_SB, heads] stay in L1        */
#define FD_MAX_H 256 /* query heads the split-K kernel takes                             */
#ifndef FD_PF
#define FD_PF 8      /* rows of K / V prefetched ahead (0: none); 4..16 measured alike   */
#endif

size_t cpu_simd_attn_floats(size_t row_cap) { return (size_t)MV_MAX_T * FD_MAX_CH * (row_cap + 2 * (row_cap / 8 + 8)); }

typedef struct fd_job {
    float *out;
    const float *q;
    const void *const *k;             /* per token: its slot's K rows (es bytes each)     */
    const void *const *v;
    int T, n_head, n_head_kv, hd, hp; /* hp: n_head rounded up to 8                     */
    int kvw;                          /* elements between consecutive positions' rows     */
    int es;                           /* bytes per cache element: 4 (f32) or 2 (f16)      */
    float scale;
    int n_ch[MV_MAX_T], ch_len[MV_MAX_T], npos[MV_MAX_T], task0[MV_MAX_T + 1];
    float *part;                      /* [T, FD_MAX_CH, n_head, hd] unnormalised outputs  */
    float *ml;                        /* [T, FD_MAX_CH, 2, hp] running max, sum           */
    cpu_scratch *s;
} fd_job;

/* Positions [p0, p1) of token t for all query heads: o[n_head, hd] (unnormalised), m/l[hp]. */
AVX2_INL void fd_chunk_es(const fd_job *j, int t, int p0, int p1, float *o, float *m, float *l, float *sc, const int es) {
    const int H = j->n_head, hd = j->hd, hp = j->hp, rep = H / j->n_head_kv, kvw = j->kvw;
    const size_t rb = (size_t)kvw * es; /* bytes between positions */
    const float *q = j->q + (size_t)t * H * hd;
    const char *kc = j->k[t], *vc = j->v[t];
    const __m256 scale = _mm256_set1_ps(j->scale);
    int koff[FD_MAX_H + 8]; /* head h's K/V offset within a cache row (no division in the loops) */
    for (int h = 0; h < H; h++) koff[h] = (h / rep) * hd;
    memset(o, 0, (size_t)H * hd * sizeof(float));
    for (int g = 0; g < hp; g += 8) {
        _mm256_storeu_ps(m + g, _mm256_set1_ps(-INFINITY));
        _mm256_storeu_ps(l + g, _mm256_setzero_ps());
    }
    for (int b0 = p0; b0 < p1; b0 += FD_SB) {
        const int b1 = b0 + FD_SB < p1 ? b0 + FD_SB : p1;
        /* 1. scores sc[p - b0][h], 8 heads per register block, K rows read in order */
        for (int p = b0; p < b1; p++) {
            const char *kr = kc + (size_t)p * rb;
#if FD_PF
            for (size_t i = 0; i < rb; i += 64) _mm_prefetch(kr + (size_t)FD_PF * rb + i, _MM_HINT_T0);
#endif
            for (int g = 0; g < H; g += 8) {
                const int nr = H - g < 8 ? H - g : 8;
                __m256 acc[8];
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
                if (nr == 8) {
                    for (int i = 0; i < hd; i += 8)
#pragma GCC unroll 8
                        for (int r = 0; r < 8; r++)
                            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(g + r) * hd + i),
                                                     kv_load8(kr, (size_t)(koff[g + r] + i), es), acc[r]);
                } else {
                    for (int r = 0; r < nr; r++)
                        for (int i = 0; i < hd; i += 8)
                            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(g + r) * hd + i),
                                                     kv_load8(kr, (size_t)(koff[g + r] + i), es), acc[r]);
                }
                _mm256_storeu_ps(sc + (size_t)(p - b0) * hp + g, _mm256_mul_ps(reduce8(acc), scale));
            }
        }
        /* 2. online softmax per head (lane): new max, rescale factor, probabilities in place */
        for (int g = 0; g < hp; g += 8) {
            __m256 mb = _mm256_loadu_ps(m + g);
            for (int p = b0; p < b1; p++) mb = _mm256_max_ps(mb, _mm256_loadu_ps(sc + (size_t)(p - b0) * hp + g));
            const __m256 f = exp8(_mm256_sub_ps(_mm256_loadu_ps(m + g), mb)); /* first block: exp(-inf) -> ~0, o = l = 0 */
            __m256 sum = _mm256_setzero_ps();
            for (int p = b0; p < b1; p++) {
                float *sp = sc + (size_t)(p - b0) * hp + g;
                const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), mb));
                _mm256_storeu_ps(sp, e);
                sum = _mm256_add_ps(sum, e);
            }
            _mm256_storeu_ps(l + g, _mm256_fmadd_ps(_mm256_loadu_ps(l + g), f, sum));
            _mm256_storeu_ps(m + g, mb);
            if (b0 > p0) {
                float fv[8];
                _mm256_storeu_ps(fv, f);
                for (int r = 0; r < 8 && g + r < H; r++) {
                    const __m256 fr = _mm256_set1_ps(fv[r]);
                    float *orow = o + (size_t)(g + r) * hd;
                    for (int i = 0; i < hd; i += 8) _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_loadu_ps(orow + i), fr));
                }
            }
        }
        /* 3. o += P V: 4 positions per pass over the heads, V rows read in order */
        int p = b0;
        for (; p + 4 <= b1; p += 4) {
            const char *v0 = vc + (size_t)p * rb;
            const float *sp = sc + (size_t)(p - b0) * hp;
#if FD_PF
            for (size_t i = 0; i < 4 * rb; i += 64) _mm_prefetch(v0 + (size_t)FD_PF * rb + i, _MM_HINT_T0);
#endif
            for (int h = 0; h < H; h++) {
                const __m256 a0 = _mm256_broadcast_ss(sp + h), a1 = _mm256_broadcast_ss(sp + hp + h);
                const __m256 a2 = _mm256_broadcast_ss(sp + 2 * hp + h), a3 = _mm256_broadcast_ss(sp + 3 * hp + h);
                const char *vr = v0 + (size_t)koff[h] * es;
                float *orow = o + (size_t)h * hd;
                for (int i = 0; i < hd; i += 8) {
                    __m256 acc = _mm256_loadu_ps(orow + i);
                    acc = _mm256_fmadd_ps(a0, kv_load8(vr, (size_t)i, es), acc);
                    acc = _mm256_fmadd_ps(a1, kv_load8(vr, (size_t)(kvw + i), es), acc);
                    acc = _mm256_fmadd_ps(a2, kv_load8(vr, (size_t)(2 * kvw + i), es), acc);
                    acc = _mm256_fmadd_ps(a3, kv_load8(vr, (size_t)(3 * kvw + i), es), acc);
                    _mm256_storeu_ps(orow + i, acc);
                }
            }
        }
        for (; p < b1; p++) {
            const float *sp = sc + (size_t)(p - b0) * hp;
            for (int h = 0; h < H; h++) {
                const __m256 a0 = _mm256_broadcast_ss(sp + h);
                const char *vr = vc + (size_t)p * rb + (size_t)koff[h] * es;
                float *orow = o + (size_t)h * hd;
                for (int i = 0; i < hd; i += 8)
                    _mm256_storeu_ps(orow + i, _mm256_fmadd_ps(a0, kv_load8(vr, (size_t)i, es), _mm256_loadu_ps(orow + i)));
            }
        }
    }
}

/* fd_chunk_es for a float32 or a float16 cache. */
static AVX2_FN void fd_chunk(const fd_job *j, int t, int p0, int p1, float *o, float *m, float *l, float *sc) {
    if (j->es == 2) fd_chunk_es(j, t, p0, p1, o, m, l, sc, 2);
    else fd_chunk_es(j, t, p0, p1, o, m, l, sc, 4);
}

static void fd_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    const fd_job *j = ctx;
    int t = 0;
    while (task >= j->task0[t + 1]) t++;
    const int c = task - j->task0[t], p0 = c * j->ch_len[t];
    const int p1 = p0 + j->ch_len[t] < j->npos[t] ? p0 + j->ch_len[t] : j->npos[t];
    const size_t tc = (size_t)t * FD_MAX_CH + (size_t)c;
    float *ml = j->ml + tc * 2 * (size_t)j->hp;
    fd_chunk(j, t, p0, p1, j->part + tc * (size_t)j->n_head * j->hd, ml, ml + j->hp,
             j->s->tbuf + (size_t)thread * j->s->tbuf_cap);
}

/* Folds the chunks of (token, head) = task in chunk order: out = sum_c e_c o_c / sum_c e_c l_c,
 * e_c = exp(m_c - max m). */
static AVX2_FN void fd_combine_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    (void)thread;
    const fd_job *j = ctx;
    const int t = task / j->n_head, h = task % j->n_head, hd = j->hd, nc = j->n_ch[t];
    const size_t tc0 = (size_t)t * FD_MAX_CH;
    float mx = -INFINITY, e[FD_MAX_CH], L = 0;
    for (int c = 0; c < nc; c++) {
        const float mc = j->ml[(tc0 + c) * 2 * j->hp + h];
        mx = mc > mx ? mc : mx;
    }
    for (int c = 0; c < nc; c++) {
        e[c] = expf(j->ml[(tc0 + c) * 2 * j->hp + h] - mx);
        L += e[c] * j->ml[(tc0 + c) * 2 * j->hp + j->hp + h];
    }
    const float inv = 1.0f / L;
    float *orow = j->out + ((size_t)t * j->n_head + h) * hd;
    for (int i = 0; i < hd; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int c = 0; c < nc; c++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(e[c]), _mm256_loadu_ps(j->part + ((tc0 + c) * j->n_head + h) * hd + i), acc);
        _mm256_storeu_ps(orow + i, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
    }
}

/* 1 if the split-K decode kernel takes this call (T <= MV_MAX_T and the scratch holds its
 * partial results and score block). */
static int fd_fits(const cpu_scratch *s, int T, int n_head, int hd) {
    const size_t hp = (size_t)(n_head + 7) & ~(size_t)7;
    return T <= MV_MAX_T && n_head <= FD_MAX_H && s->ap && (size_t)T * FD_MAX_CH * ((size_t)n_head * hd + 2 * hp) <= s->ap_cap &&
           (size_t)FD_SB * hp <= s->tbuf_cap;
}

/* The split-K decode kernel on T <= MV_MAX_T rows (fd_fits holds). */
static void fd_run(st_pool *pool, cpu_scratch *s, float *out, const float *q, const void *const *kslot,
                   const void *const *vslot, int kv_es, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                   size_t kv_stride, float scale) {
    fd_job j = {.out = out, .q = q, .k = kslot, .v = vslot, .T = T, .n_head = n_head, .n_head_kv = n_head_kv,
                .hd = hd, .hp = (n_head + 7) & ~7, .kvw = (int)kv_stride, .es = kv_es, .scale = scale, .part = s->ap,
                .s = s};
    j.ml = s->ap + (size_t)T * FD_MAX_CH * n_head * hd;
    for (int t = 0; t < T; t++) {
        const int np = pos[t] + 1;
        int nc = (np + FD_MIN_CH - 1) / FD_MIN_CH;
        nc = nc < FD_MAX_CH ? nc : FD_MAX_CH;
        j.npos[t] = np;
        j.ch_len[t] = (np + nc - 1) / nc;
        j.n_ch[t] = (np + j.ch_len[t] - 1) / j.ch_len[t];
        j.task0[t + 1] = j.task0[t] + j.n_ch[t];
    }
    st_pool_run(pool, fd_task, &j, j.task0[T]);
    st_pool_run(pool, fd_combine_task, &j, T * n_head);
}

void cpu_attention_fast(st_pool *pool, cpu_scratch *s, float *out, const float *q, const void *const *kslot,
                        const void *const *vslot, int kv_es, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                        size_t kv_stride, float scale) {
    ST_ASSERT(kv_es == 4 || kv_es == 2);
    ST_ASSERT(s->simd >= CPU_SIMD_AVX2 && hd % 8 == 0 && n_head % n_head_kv == 0 && s->tbuf &&
              s->tbuf_cap >= 8 * s->row_cap);
    for (int t = 0; t < T; t++) ST_ASSERT((size_t)pos[t] < s->row_cap);
    /* up to MV_MAX_T rows on the split-K decode kernel; up to mv_split rows (batched decode of
     * several sequences) as balanced calls of it, so each row stays bit-identical to its row
     * alone (the prefill kernel below sums in another order) */
    const int split = s->mv_split > MV_MAX_T ? s->mv_split : MV_MAX_T;
    if (T <= split && fd_fits(s, T < MV_MAX_T ? T : MV_MAX_T, n_head, hd)) {
        const int nc = (T + MV_MAX_T - 1) / MV_MAX_T;
        const size_t row = (size_t)n_head * hd;
        for (int i = 0, t0 = 0; i < nc; i++) {
            const int k = (T - t0 + (nc - i) - 1) / (nc - i);
            fd_run(pool, s, out + (size_t)t0 * row, q + (size_t)t0 * row, kslot + t0, vslot + t0, kv_es, pos + t0, k,
                   n_head, n_head_kv, hd, kv_stride, scale);
            t0 += k;
        }
        return;
    }
    const int rep = n_head / n_head_kv, nh = rep < 8 ? rep : 8;
    fa_job j = {out, q, kslot, vslot, pos, T, n_head, n_head_kv, hd, scale, 8 / nh, nh, (rep + nh - 1) / nh, s, (int)kv_stride,
                kv_es};
    st_pool_run(pool, fa_task, &j, ((T + j.tb - 1) / j.tb) * n_head_kv * j.n_hg);
}

/* ------------------------------------------------------------------------------------------ */
/* elementwise                                                                                */

/* dst[i] = x[i] as IEEE float16, round to nearest even, |x| clamped to 65504 first (a value
 * beyond float16's range becomes the largest finite one, not inf, which would turn softmax and
 * P V into NaN); NaN stays NaN. */
AVX2_FN void cpu_f16_row_fast(uint16_t *dst, const float *x, int64_t n) {
    const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { /* max/min return their second operand when one is NaN: x's NaN survives */
        const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(x + i)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) {
        const float v = x[i] > 65504.0f ? 65504.0f : x[i] < -65504.0f ? -65504.0f : x[i];
        dst[i] = st_f32_to_f16(v);
    }
}

AVX2_FN void cpu_swiglu_fast(float *out, const float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* Rows [r0, r1) of cpu_rmsnorm: the sum of squares in double (4 x 4 lanes; the reference sums
 * serially, so results may differ in the last bit of the scale), the scaling as the reference
 * ((x * inv) * w, float). out may alias x. */
AVX2_FN void cpu_rmsnorm_fast(float *out, const float *x, const float *w, int64_t r0, int64_t r1, int n, float eps) {
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m256 v0 = _mm256_loadu_ps(xr + i), v1 = _mm256_loadu_ps(xr + i + 8);
            const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v0)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1));
            const __m256d d2 = _mm256_cvtps_pd(_mm256_castps256_ps128(v1)), d3 = _mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1));
            a0 = _mm256_fmadd_pd(d0, d0, a0), a1 = _mm256_fmadd_pd(d1, d1, a1);
            a2 = _mm256_fmadd_pd(d2, d2, a2), a3 = _mm256_fmadd_pd(d3, d3, a3);
        }
        const __m256d a = _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3));
        __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
        double ss = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
        for (; i < n; i++) ss += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(ss / n + (double)eps));
        const __m256 iv = _mm256_set1_ps(inv);
        i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), iv), _mm256_loadu_ps(w + i)));
        for (; i < n; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* cpu_rope with 8 frequencies per step: cos/sin de-interleaved in registers, the same
 * products and sums as the reference (x1 co - x2 si, x2 co + x1 si; no fused multiply-add), so
 * the results are bit-identical to it. */
AVX2_FN void cpu_rope_fast(float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot) {
    const int half = n_rot / 2;
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int t = 0; t < T; t++) {
        const float *c = cs + (size_t)t * half * 2;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            int i = 0;
            for (; i + 8 <= half; i += 8) {
                const __m256 q0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(c + 2 * i), idx);
                const __m256 q1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(c + 2 * i + 8), idx);
                const __m256 co = _mm256_permute2f128_ps(q0, q1, 0x20), si = _mm256_permute2f128_ps(q0, q1, 0x31);
                const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + i + half);
                _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(x1, co), _mm256_mul_ps(x2, si)));
                _mm256_storeu_ps(v + i + half, _mm256_add_ps(_mm256_mul_ps(x2, co), _mm256_mul_ps(x1, si)));
            }
            for (; i < half; i++) {
                const float x1 = v[i], x2 = v[i + half], co = c[2 * i], si = c[2 * i + 1];
                v[i] = x1 * co - x2 * si;
                v[i + half] = x2 * co + x1 * si;
            }
        }
    }
}
