/* strata/quantize.h — MLX affine quantization: the quantizer and the bit packer.
 *
 * Reproduces mlx's CPU `quantize()` (mlx/backend/cpu/quantized.cpp) for affine mode, so a
 * checkpoint written by strata holds the codes mlx would have produced from the same float
 * weights. Per group of `group` consecutive values of a row:
 *
 *     n_bins = 2^bits - 1
 *     scale  = max((max - min) / n_bins, 1e-7)          all in float32
 *     scale  = |min| > |max| ? scale : -scale           scales may be NEGATIVE
 *     edge   = |min| > |max| ? min : max
 *     q0     = rint(edge / scale)
 *     if q0 != 0: scale = edge / q0, bias = edge         (the edge value is exactly representable)
 *     else:       bias = 0
 *     q[i]   = clamp(rint((w[i] - bias) / scale), 0, n_bins)
 *
 * rint rounds half to even (the default FP environment). The codes are computed with the
 * float32 scale/bias; a checkpoint then stores scale and bias rounded to its dtype (bf16 for
 * mlx-community models), and dequantization is w' = scale * q + bias.
 *
 * Packing: value v of a row occupies bits [bits*v, bits*v + bits) of the row's LSB-first
 * bitstream formed by its little-endian uint32 words; a row of n values takes n*bits/32 words.
 * For bits 2/4/8 this is mlx's `32/bits` values per word; for 3/5/6 it is mlx's byte packs
 * (8 values in 3 or 5 bytes, 4 values in 3 bytes) laid back to back, straddling words.
 *
 * Supported (mlx's affine limits): bits in {2, 3, 4, 5, 6, 8}, group in {32, 64, 128}.
 */
#ifndef STRATA_QUANTIZE_H
#define STRATA_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if (bits, group) is a supported affine quantization, else 0. */
int mlxq_supported(int bits, int group);

/* Quantizes one group of `group` floats with mlx's affine rule (above). Writes the codes to
 * q[group] (each in [0, 2^bits - 1]) and the float32 scale and bias. Non-finite input is a
 * caller bug (the result is unspecified, never out-of-range codes). */
void mlxq_quantize_group(const float *w, int group, int bits, uint8_t *q, float *scale, float *bias);

/* Quantizes a row of n values (n a multiple of group): codes q[n], scales[n/group] and
 * biases[n/group] in float32. */
void mlxq_quantize_row(const float *w, int64_t n, int bits, int group, uint8_t *q, float *scales, float *biases);

/* Packs codes q[n] (each < 2^bits) into out[n*bits/32] uint32 words, LSB-first bitstream.
 * n*bits must be a multiple of 32 (always true for whole groups). */
void mlxq_pack_row(const uint8_t *q, int64_t n, int bits, uint32_t *out);

/* Inverse of mlxq_pack_row: q[n] from in[n*bits/32]. */
void mlxq_unpack_row(const uint32_t *in, int64_t n, int bits, uint8_t *q);

/* The whole checkpoint path for one row: quantize w[n], pack into packed[n*bits/32], and store
 * scales/biases[n/group] as bf16 (round to nearest even, as mlx's bfloat16 cast does).
 * `codes` is caller scratch of n bytes. */
void mlxq_quantize_row_bf16(const float *w, int64_t n, int bits, int group, uint32_t *packed, uint16_t *scales,
                            uint16_t *biases, uint8_t *codes);

/* Dequantizes packed[n*bits/32] with float32 scales/biases[n/group] into out[n]
 * (out[i] = scales[i/group] * q[i] + biases[i/group]). A plain reference for tests and tools. */
void mlxq_dequantize_row(const uint32_t *packed, const float *scales, const float *biases, int64_t n, int bits,
                         int group, float *out);

#ifdef __cplusplus
}
#endif
#endif
