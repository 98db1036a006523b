/* quantize.c — MLX affine quantizer and LSB-first bit packer (see strata/quantize.h).
 *
 * The quantizer follows mlx's CPU `quantize()` operation for operation, in float32, so that
 * the codes match mlx bit for bit (including its negative scales and the rint ties). The packer
 * treats a row as one bitstream: a 64-bit accumulator collects codes and spills whole words,
 * which is mlx's layout for every width (word packs for 2/4/8 bits, byte packs for 3/5/6).
 */
#include "strata/quantize.h"
#include "strata/base.h"

#include <math.h>

int mlxq_supported(int bits, int group) {
    int b = bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
    int g = group == 32 || group == 64 || group == 128;
    return b && g;
}

// ----------------------------------------------------------------------------
// quantizer

void mlxq_quantize_group(const float *w, int group, int bits, uint8_t *q, float *scale_out, float *bias_out) {
    const float n_bins = (float)((1 << bits) - 1);
    const float eps = 1e-7f;
    float w_min = INFINITY, w_max = -INFINITY;
    for (int j = 0; j < group; j++) {
        /* std::max / std::min semantics: keep the current value unless the new one is larger */
        if (w_max < w[j]) w_max = w[j];
        if (w[j] < w_min) w_min = w[j];
    }
    const int mask = fabsf(w_min) > fabsf(w_max);
    float scale = (w_max - w_min) / n_bins;
    if (scale < eps) scale = eps;
    scale = mask ? scale : -scale;
    const float edge = mask ? w_min : w_max;
    const float q0 = rintf(edge / scale);
    float bias = 0.0f;
    if (q0 != 0.0f) {
        scale = edge / q0;
        bias = edge;
    }
    for (int j = 0; j < group; j++) {
        float v = rintf((w[j] - bias) / scale);
        v = v < 0.0f ? 0.0f : v; /* also maps -0 and NaN-free negatives to 0 */
        v = v > n_bins ? n_bins : v;
        q[j] = (uint8_t)v;
    }
    *scale_out = scale;
    *bias_out = bias;
}

void mlxq_quantize_row(const float *w, int64_t n, int bits, int group, uint8_t *q, float *scales, float *biases) {
    ST_ASSERT(mlxq_supported(bits, group) && n % group == 0);
    for (int64_t g = 0; g < n / group; g++)
        mlxq_quantize_group(w + g * group, group, bits, q + g * group, &scales[g], &biases[g]);
}

// ----------------------------------------------------------------------------
// packing

void mlxq_pack_row(const uint8_t *q, int64_t n, int bits, uint32_t *out) {
    ST_ASSERT((n * bits) % 32 == 0);
    const uint32_t m = (1u << bits) - 1u;
    uint64_t acc = 0; /* pending bits, LSB first */
    int have = 0;     /* number of pending bits (< 32 between codes) */
    for (int64_t i = 0; i < n; i++) {
        acc |= (uint64_t)(q[i] & m) << have;
        have += bits;
        if (have >= 32) {
            *out++ = (uint32_t)acc;
            acc >>= 32;
            have -= 32;
        }
    }
    ST_ASSERT(have == 0);
}

void mlxq_unpack_row(const uint32_t *in, int64_t n, int bits, uint8_t *q) {
    ST_ASSERT((n * bits) % 32 == 0);
    const uint64_t m = (1u << bits) - 1u;
    uint64_t acc = 0;
    int have = 0;
    for (int64_t i = 0; i < n; i++) {
        if (have < bits) {
            acc |= (uint64_t)*in++ << have;
            have += 32;
        }
        q[i] = (uint8_t)(acc & m);
        acc >>= bits;
        have -= bits;
    }
}

// ----------------------------------------------------------------------------
// whole rows

void mlxq_quantize_row_bf16(const float *w, int64_t n, int bits, int group, uint32_t *packed, uint16_t *scales,
                            uint16_t *biases, uint8_t *codes) {
    ST_ASSERT(mlxq_supported(bits, group) && n % group == 0);
    for (int64_t g = 0; g < n / group; g++) {
        float s, b;
        mlxq_quantize_group(w + g * group, group, bits, codes + g * group, &s, &b);
        scales[g] = st_f32_to_bf16(s);
        biases[g] = st_f32_to_bf16(b);
    }
    mlxq_pack_row(codes, n, bits, packed);
}

void mlxq_dequantize_row(const uint32_t *packed, const float *scales, const float *biases, int64_t n, int bits,
                         int group, float *out) {
    ST_ASSERT(mlxq_supported(bits, group) && n % group == 0);
    const uint64_t m = (1u << bits) - 1u;
    uint64_t acc = 0;
    int have = 0;
    for (int64_t i = 0; i < n; i++) {
        if (have < bits) {
            acc |= (uint64_t)*packed++ << have;
            have += 32;
        }
        out[i] = scales[i / group] * (float)(acc & m) + biases[i / group];
        acc >>= bits;
        have -= bits;
    }
}
