/* cpu_simd.h — the CPU backend's fast path (internal to src/backend/cpu).
 *
 * SIMD kernels behind cpu_linear / cpu_attention when the scratch was initialised with
 * exact = 0. x86-64 only: an AVX2+FMA+F16C baseline chosen at run time, AVX-512F for the
 * decode matrix-vector products where present; everything else falls back to the float32
 * reference in cpu_ops.c. Results differ from the reference only by float32 rounding (order of
 * summation, fused multiply-adds, and the group factorisation below).
 *
 * Quantized decode of 2-, 4- and 8-bit weights multiplies the weights' integers with int16
 * activations (pmaddwd; see the comment above q16_prep in cpu_simd.c); 4-bit weights with int8
 * activations (pmaddubsw, mv4i8_rows_avx2) unless the scratch's actq8 is off. 3-, 5- and 6-bit
 * weights, and every weight when actq is off, use float kernels with the group trick on MLX
 * affine weights w = s_g * q + b_g:
 *     y = sum_g s_g * (q_g . x_g) + b_g * sum(x_g)
 * with sum(x_g) computed once per call. Whole 8-value packs are decoded per 32-bit lane (pack k
 * of a block in lane k: 2-bit 2 bytes, 3-bit 3 bytes, 4-bit 4 bytes, 5-bit 5 bytes; 6- and 8-bit
 * use 4-value packs of 3 and 4 bytes), so value s of every lane comes out of one shift + mask.
 * The activations are permuted once per call to match ("xp" layout, see perm_x in cpu_simd.c).
 */
#ifndef STRATA_CPU_SIMD_H
#define STRATA_CPU_SIMD_H

#include "cpu_ops.h"

enum cpu_simd_level {
    CPU_SIMD_NONE = 0,   /* reference kernels only                                            */
    CPU_SIMD_AVX2 = 2,   /* AVX2 + FMA + F16C                                                  */
    CPU_SIMD_AVX512 = 3, /* AVX-512F matrix-vector kernels, AVX2 for the rest                  */
};

/* The best level this CPU supports, capped by the environment: STRATA_NO_SIMD (any value) ->
 * CPU_SIMD_NONE, STRATA_SIMD=avx2 -> at most CPU_SIMD_AVX2. Detected once; thread-safe. */
int cpu_simd_level(void);

/* Per-thread floats the fast path needs in cpu_scratch.tbuf for row_cap and max_batch. */
size_t cpu_simd_tbuf_floats(size_t row_cap, int max_batch);

/* Floats the fast decode attention needs in cpu_scratch.ap (split-K partial results) for
 * row_cap >= n_head * head_dim. */
size_t cpu_simd_attn_floats(size_t row_cap);

/* How the fast linear on scratch s quantizes the activations of a call with T token rows
 * (T <= s->max_batch: one chunk) for weight w. Returns 0 (float activations), 32767 (int16)
 * or 127 (int8), and in *blk (may be NULL) the values per activation block, each block
 * quantized as q = round(x * (qmax / amax)), amax = max|x| over the block:
 *   - T <= 4 (decode), s->actq: 4-bit weights with s->actq8 -> int8, blocks of 32
 *     (vpmaddubsw); otherwise 2-, 4- and 8-bit weights -> int16, blocks of 32;
 *   - T > 4 (prefill), s->actq and s->actq_gemm: 4-bit weights with cols % 64 == 0 ->
 *     int8, blocks of 32 with s->actq8 (the decode kernel's arithmetic); otherwise with
 *     group >= 64 -> int16, blocks of 64.
 * Results then differ from the float reference by up to sum_i |s q_i| * d_i / 2 with
 * d_i = amax / qmax of x_i's block (int16: the bias term b * sum(x) stays exact), or, for int8,
 * sum_i |w_i| * d_i / 2 (the bias term multiplies the sum of the rounded x^: the dot product
 * of w with x^, whose error for zero-centred groups is about half the other form's). */
int cpu_simd_actq(const cpu_scratch *s, const wt_linear *w, int T, int *blk);

/* Test hooks for the int8 4-bit decode kernel (need AVX2). cpu_simd_q8_prep quantizes x[cols]
 * exactly as the kernel does: per full 64-value unit u, xq[64u + i] = q(x[64u + 2i]) and
 * xq[64u + 32 + i] = q(x[64u + 2i + 1]) (i < 32), q = round-to-nearest-even(x * (127 / amax))
 * over each 32-block, and dl[8u + k] = amax / 127 of block 0 (k < 4) or block 1 (k >= 4).
 * cpu_simd_q4i8_sums runs the kernel's integer part over nu units of a 4-bit row (32 bytes
 * each): sums[8u + k] = sum over values v = 64u + 8k .. 64u + 8k + 7 of code(v) * xq(v). */
void cpu_simd_q8_prep(const float *x, int64_t cols, int8_t *xq, float *dl, float *xs, int g);
void cpu_simd_q4i8_sums(const uint8_t *row, const int8_t *xq, int64_t nu, int32_t *sums);

/* Fast out[T, rows] = x[T, cols] W^T (contract of cpu_linear); needs s->simd >= AVX2. */
void cpu_linear_fast(st_pool *pool, cpu_scratch *s, float *out, const float *x, const wt_linear *w, int T);

/* Fast causal attention (contract of cpu_attention_kv); needs s->simd >= AVX2 and hd % 8 == 0.
 * kslot/vslot point at float32 rows (kv_es == 4) or IEEE float16 rows (kv_es == 2, widened with
 * vcvtph2ps as they are read); kv_stride counts elements. */
void cpu_attention_fast(st_pool *pool, cpu_scratch *s, float *out, const float *q, const void *const *kslot,
                        const void *const *vslot, int kv_es, const int32_t *pos, int T, int n_head, int n_head_kv, int hd,
                        size_t kv_stride, float scale);

/* dst[n] = x[n] as float16 (nearest even, clamped to +-65504, NaN kept); needs AVX2 (F16C). */
void cpu_f16_row_fast(uint16_t *dst, const float *x, int64_t n);

/* Rows [r0, r1) of cpu_rmsnorm, vectorised (double sum of squares; may differ from the
 * reference in the last bit); needs AVX2. */
void cpu_rmsnorm_fast(float *out, const float *x, const float *w, int64_t r0, int64_t r1, int n, float eps);

/* cpu_rope, vectorised, bit-identical to the reference; needs AVX2. */
void cpu_rope_fast(float *x, const float *cs, int T, int n_heads, int head_dim, int n_rot);

/* out[i] = silu(gate[i]) * up[i] with a vectorised exp (about 2 ulp); needs AVX2. */
void cpu_swiglu_fast(float *out, const float *gate, const float *up, int64_t n);

#endif
