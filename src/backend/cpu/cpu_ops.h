/* cpu_ops.h — the CPU backend's ops: the reference every other backend is checked against.
 *
 * All activations are float32, row-major; `T` is the number of token rows. Ops borrow every
 * pointer; none allocates: scratch comes from a cpu_scratch sized once by the caller.
 * Threaded ops split work over the st_pool (NULL pool = serial).
 */
#ifndef STRATA_CPU_OPS_H
#define STRATA_CPU_OPS_H

#include "strata/model.h"
#include "strata/pool.h"

/* Scratch for linear/attention, sized once by the caller (model_ctx_init); ops never allocate.
 * The reference path uses `buf` (one weight / score row per thread). The fast path
 * (exact == 0, cpu_simd.c) also uses `xp`, `xs` and `tbuf`, allocated only then. */
typedef struct cpu_scratch {
    float *buf;         /* [n_threads, row_cap]          reference: weight row / attention scores */
    int n_threads;
    size_t row_cap;     /* >= every linear's cols and every attention length (max_ctx)           */
    int exact;          /* 1: float32 reference kernels; 0: fast SIMD kernels                     */
    int simd;           /* fast path ISA (enum cpu_simd_level); tests may lower it                */
    int actq;           /* fast path: int16 activations for 2/4/8-bit weights at T <= 4 (decode)  */
    int actq_gemm;      /* fast path: int16 activations for 4-bit weights at T > 4 (prefill)       */
    int actq8;          /* fast path, with actq: int8 (not int16) activations for 4-bit weights
                         * (decode, and prefill with actq_gemm): ~1/258 of the int16 precision,
                         * within golden.json's bf16_activations tolerance (cpu_simd_actq)        */
    int max_batch;      /* token rows the fast buffers hold; larger T is processed in chunks      */
    int mv_split;       /* fast linears of T <= mv_split rows run as fused passes of <= 4 rows
                         * (batched decode), larger T on the GEMM (STRATA_MV_SPLIT=N; default 8)  */
    float *xp;          /* [max_batch + 8, row_cap]      fast: permuted / panel-packed activations */
    float *xs;          /* [4, row_cap/32 + 16]          fast: per-group sums of the activations   */
    float *tbuf;        /* [n_threads, tbuf_cap]         fast: weight tiles, row scales, scores    */
    size_t tbuf_cap;    /* floats per thread in tbuf                                               */
    float *ap;          /* [ap_cap]                      fast: decode attention partials (split-K) */
    size_t ap_cap;      /* floats in ap; 0 (or too small for a call's heads): no split-K          */
} cpu_scratch;

/* Allocates scratch for n_threads threads, linears of up to row_cap columns, attention over up
 * to row_cap positions and (fast path) up to max_batch token rows per call. exact = 1 selects
 * the float32 reference kernels for every op; exact = 0 the SIMD fast path (falls back to the
 * reference where the CPU lacks AVX2+FMA+F16C or STRATA_NO_SIMD is set). Returns ST_OK or
 * ST_ERR_NOMEM (s is then safe to cpu_scratch_free). */
int cpu_scratch_init(cpu_scratch *s, int n_threads, size_t row_cap, int max_batch, int exact);
void cpu_scratch_free(cpu_scratch *s);

/* Dequantizes / converts row r of w into dst[cols] (float32). Exact: w = s * q + b. */
void cpu_weight_row(const wt_linear *w, int64_t r, float *dst);

/* Reads quantized value v (0-based) of a row's LSB-first uint32 bitstream. */
static inline uint32_t cpu_mlx_q_get(const uint32_t *row, int bits, size_t v) {
    size_t bit = (size_t)bits * v;
    uint64_t x = row[bit >> 5];
    if ((bit & 31) + (size_t)bits > 32) x |= (uint64_t)row[(bit >> 5) + 1] << 32;
    return (uint32_t)(x >> (bit & 31)) & ((1u << bits) - 1u);
}

/* out[T, rows] = x[T, cols] W^T. out must not alias x. Fast path (s->exact == 0, see
 * cpu_simd.c): fused SIMD dequantize-and-dot for T <= 4 (decode; int16 activations for 2/4/8-bit
 * weights when s->actq), tiled dequantize + register-blocked GEMM above (prefill; int16
 * activations for 4-bit weights with cols % 64 == 0 when s->actq_gemm). The float kernels
 * agree with the reference to float32 rounding; the int16 ones within
 * sum|w_i| * max|x_block| / 65534 (tests/unit/test_cpu_ops.c). */
void cpu_linear(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T);

/* Embedding lookup: out[T, cols] = rows tokens[t] of the table (dense or quantized). */
void cpu_embed(float *out, const int32_t *tokens, int T, const wt_linear *table);

/* RMSNorm over n_rows rows of length n: out = x * rsqrt(mean(x^2) + eps) * w. out may alias x. */
void cpu_rmsnorm(float *out, const float *x, const float *w, int64_t n_rows, int n, float eps);

/* cpu_rmsnorm on the scratch's path: the reference when s->exact (or without AVX2), else
 * vectorised (double sum of squares in 16 lanes: may differ from the reference in the last bit
 * of the scale) and split over the pool by rows when there are >= 16384 values. Each row's
 * result depends only on that row (batch invariant). */
void cpu_rmsnorm_s(st_pool *pool, const cpu_scratch *s, float *out, const float *x, const float *w, int64_t n_rows, int n,
                   float eps);

/* cpu_rope on the scratch's path: vectorised when !s->exact (bit-identical to cpu_rope). */
void cpu_rope_s(const cpu_scratch *s, float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot);

/* Rotate-half RoPE on the first n_rot dims of each of n_heads heads of x[T, n_heads, head_dim]
 * with cs[T, n_rot/2, 2] = (cos, sin) per token and frequency. */
void cpu_rope(float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot);

/* Computes cos/sin tables cs[T, n_rot/2, 2] for positions pos[T] and inv_freq[n_rot/2]
 * (angles in double precision). */
void cpu_rope_table(float *cs, const int32_t *pos, int T, const double *inv_freq, int n_rot);

/* Causal attention against a KV cache (fast path when s->exact == 0 and hd % 8 == 0). q[T, n_head, hd]; for token t the keys/values are
 * kc/vc rows 0..pos[t] of its slot: kc + slot_off[t] is [max_ctx, n_head_kv, hd].
 * out[T, n_head, hd]. Needs s->row_cap >= max_ctx. On the fast path, T <= 4 with
 * s->row_cap >= n_head * hd runs split-K over positions (both threads stream K/V; a token's
 * result does not depend on T or the thread count). */
void cpu_attention(st_pool *pool, cpu_scratch *s, float *out, const float *q, const float *const *kslot,
                   const float *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                   float scale);

/* cpu_attention with cache rows kv_stride >= n_head_kv * hd floats apart (position p of a slot
 * at kslot[t] + p * kv_stride). A stride that is not a multiple of 1 KiB keeps the rows of one
 * KV head from aliasing to the same cache sets (4 KiB rows use 1/8 of L1 and L2 otherwise). */
void cpu_attention_kv(st_pool *pool, cpu_scratch *s, float *out, const float *q, const float *const *kslot,
                      const float *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                      size_t kv_stride, float scale);

/* 1 if this scratch's path keeps a float16 KV cache for heads of hd dims: the fast path
 * (!s->exact) with AVX2+F16C and hd % 8 == 0. The exact path always keeps float32. */
int cpu_kv_f16_ok(const cpu_scratch *s, int hd);

/* dst[n] = x[n] rounded to IEEE float16 (nearest even; |x| > 65504 clamped to 65504 rather
 * than inf; NaN stays NaN): one K or V row into a float16 cache. Needs cpu_kv_f16_ok. */
void cpu_kv_store_f16(const cpu_scratch *s, uint16_t *dst, const float *x, int64_t n);

/* cpu_attention over a float16 KV cache (rows as cpu_kv_store_f16 writes them, same layout as
 * cpu_attention's float32 one). Fast path only (asserts cpu_kv_f16_ok): the result is that of
 * the fast float32 kernels on the float16 values widened to float32 (exact), so it differs
 * from float32 K/V only by their rounding to float16 (relative 2^-11 per element). The same
 * split-K / batch-invariance properties as cpu_attention. */
void cpu_attention_f16(st_pool *pool, cpu_scratch *s, float *out, const float *q, const uint16_t *const *kslot,
                       const uint16_t *const *vslot, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                       float scale);

/* out[i] = silu(gate[i]) * up[i] for n elements (out may alias gate). */
void cpu_swiglu(float *out, const float *gate, const float *up, int64_t n);

/* cpu_swiglu on the scratch's path: the reference above when s->exact (or without AVX2), else
 * a vectorised exp (within 2 ulp of expf; about 5x faster, which matters in prefill where the
 * op runs serially over T x n_ff values). */
void cpu_swiglu_s(const cpu_scratch *s, float *out, const float *gate, const float *up, int64_t n);

/* x[i] += y[i]. */
void cpu_add(float *x, const float *y, int64_t n);

/* cpu_swiglu_s and cpu_add split over the pool when n >= 32768 (prefill; decode-sized calls
 * run serially on the caller). Bit-identical to the serial calls: chunk borders are multiples
 * of 16 values, so each element goes through the same code as in one call. out may alias
 * gate (not up). pool may be NULL (serial). */
void cpu_swiglu_p(st_pool *pool, const cpu_scratch *s, float *out, const float *gate, const float *up, int64_t n);
void cpu_add_p(st_pool *pool, float *x, const float *y, int64_t n);

/* AVX2-or-scalar dot product. */
float cpu_dot(const float *a, const float *b, int64_t n);

#endif
