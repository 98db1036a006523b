/* test_quantize.c — MLX affine quantizer and bit packer (quantize.h).
 *
 * Expected values do not come from the code under test:
 *   - hand cases: groups built as bias + scale * k from known codes k, whose scale, bias and
 *     codes follow from mlx's rule by hand (positive scale when |min| > |max|, negative scale
 *     otherwise, rint ties to even, the all-zero and q0 == 0 groups);
 *   - packed words written out by hand for each width, including every value that straddles a
 *     word boundary (formats.md §2.2 lists them: 3-bit v10, v21; 5-bit v6, v12, v19, v25;
 *     6-bit v5, v10);
 *   - an mlx-structured packer (32/bits values per word, or 8 values in 3/5 bytes and 4 values in
 *     3 bytes, as mlx/backend/cpu/quantized.cpp writes them) compared byte for byte;
 *   - the engine's own reader (cpu_mlx_q_get, cpu_weight_row) must reproduce codes and
 *     s * q + b exactly;
 *   - error bounds per group: |w - w'| <= (max - min) / (2^bits - 1) (the rounding step, or the
 *     clamp after mlx re-fits the scale to the edge value), plus bf16 rounding of scale and bias.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"
#include "strata/base.h"
#include "strata/quantize.h"

static const int k_bits[] = {2, 3, 4, 5, 6, 8};
static const int k_groups[] = {32, 64, 128};
#define N_BITS 6
#define N_GROUPS 3

// ----------------------------------------------------------------------------
// helpers

/* Deterministic normal-ish values (sum of 4 uniforms from an LCG), independent of synth.c. */
static uint64_t g_lcg = 12345;
static double lcg_u(void) {
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(g_lcg >> 11) * 0x1.0p-53;
}
static float rnd_normal(void) { return (float)((lcg_u() + lcg_u() + lcg_u() + lcg_u() - 2.0) * 1.7320508); }

/* mlx's packing, structured as mlx writes it: words of 32/bits values for 2/4/8 bits; for 3/5/6
 * bits "packs" of 8/8/4 values stored as 3/5/3 little-endian bytes, back to back. */
static void mlx_pack_ref(const uint8_t *q, int n, int bits, uint8_t *out_bytes) {
    if (bits == 2 || bits == 4 || bits == 8) {
        int per = 32 / bits;
        for (int w = 0; w < n / per; w++) {
            uint32_t x = 0;
            for (int k = 0; k < per; k++) x |= (uint32_t)q[w * per + k] << (k * bits);
            for (int b = 0; b < 4; b++) out_bytes[4 * w + b] = (uint8_t)(x >> (8 * b));
        }
        return;
    }
    int el = bits == 6 ? 4 : 8, nbytes = bits == 5 ? 5 : 3;
    for (int pk = 0; pk < n / el; pk++) {
        uint64_t x = 0;
        for (int k = 0; k < el; k++) x |= (uint64_t)q[pk * el + k] << (k * bits);
        for (int b = 0; b < nbytes; b++) out_bytes[pk * nbytes + b] = (uint8_t)(x >> (8 * b));
    }
}

/* A wt_linear view of one quantized row set [rows, cols] with bf16 scales/biases. */
static wt_linear qview(const uint32_t *w, const uint16_t *s, const uint16_t *b, int64_t rows, int64_t cols, int bits,
                       int group) {
    wt_linear v;
    memset(&v, 0, sizeof v);
    v.qbits = bits;
    v.group = group;
    v.sdtype = SFT_BF16;
    v.rows = rows;
    v.cols = cols;
    v.w = w;
    v.scales = s;
    v.biases = b;
    v.row_bytes = (size_t)cols * (size_t)bits / 8;
    v.srow_elems = (size_t)(cols / group);
    return v;
}

// ----------------------------------------------------------------------------
// hand cases

static void test_supported(void **state) {
    (void)state;
    for (int b = 0; b <= 9; b++)
        for (int g = 0; g <= 256; g += 16) {
            int want = (b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8) && (g == 32 || g == 64 || g == 128);
            assert_int_equal(mlxq_supported(b, g), want);
        }
}

/* |min| > |max|: w = -1 + s0 * k with s0 = 2^-(bits+1). By hand: scale0 = s0, edge = -1,
 * q0 = rint(-1 / s0) = -2^(bits+1), scale = -1 / q0 = s0, bias = -1, codes = k. */
static void test_hand_positive_scale(void **state) {
    (void)state;
    for (int bi = 0; bi < N_BITS; bi++) {
        const int bits = k_bits[bi], nb = (1 << bits) - 1;
        const float s0 = ldexpf(1.0f, -(bits + 1));
        float w[32];
        uint8_t k[32], q[32];
        for (int j = 0; j < 32; j++) k[j] = (uint8_t)((j * 7 + 3) % (nb + 1));
        k[0] = 0;
        k[1] = (uint8_t)nb;
        for (int j = 0; j < 32; j++) w[j] = -1.0f + s0 * (float)k[j];
        float sc = 0, bs = 0;
        mlxq_quantize_group(w, 32, bits, q, &sc, &bs);
        assert_true(sc == s0);
        assert_true(bs == -1.0f);
        assert_memory_equal(q, k, 32);
    }
}

/* |max| >= |min|: w = 1 - s0 * k. By hand: scale0 = -s0, edge = max = 1, q0 = -2^(bits+1),
 * scale = 1 / q0 = -s0 (NEGATIVE), bias = 1, codes = rint((w - 1) / -s0) = k. */
static void test_hand_negative_scale(void **state) {
    (void)state;
    for (int bi = 0; bi < N_BITS; bi++) {
        const int bits = k_bits[bi], nb = (1 << bits) - 1;
        const float s0 = ldexpf(1.0f, -(bits + 1));
        float w[32];
        uint8_t k[32], q[32];
        for (int j = 0; j < 32; j++) k[j] = (uint8_t)((j * 5 + 1) % (nb + 1));
        k[0] = 0;
        k[1] = (uint8_t)nb;
        for (int j = 0; j < 32; j++) w[j] = 1.0f - s0 * (float)k[j];
        float sc = 0, bs = 0;
        mlxq_quantize_group(w, 32, bits, q, &sc, &bs);
        assert_true(sc == -s0);
        assert_true(bs == 1.0f);
        assert_memory_equal(q, k, 32);
        /* dequantization gives the inputs back exactly */
        for (int j = 0; j < 32; j++) assert_true(sc * (float)q[j] + bs == w[j]);
    }
}

/* rint ties go to even: 2-bit, s0 = 1/8, bias -1: (w + 1) * 8 = 2.5 -> 2, 1.5 -> 2; 4-bit,
 * s0 = 1/32: 2.5 -> 2, 3.5 -> 4. */
static void test_hand_ties(void **state) {
    (void)state;
    float w[32];
    uint8_t q[32];
    float sc, bs;
    for (int j = 0; j < 32; j++) w[j] = -1.0f;
    w[1] = -0.625f;   /* max: code 3 */
    w[2] = -0.6875f;  /* 2.5 -> 2 */
    w[3] = -0.8125f;  /* 1.5 -> 2 */
    w[4] = -0.875f;   /* 1 */
    mlxq_quantize_group(w, 32, 2, q, &sc, &bs);
    assert_true(sc == 0.125f && bs == -1.0f);
    assert_int_equal(q[0], 0);
    assert_int_equal(q[1], 3);
    assert_int_equal(q[2], 2);
    assert_int_equal(q[3], 2);
    assert_int_equal(q[4], 1);
    for (int j = 0; j < 32; j++) w[j] = -1.0f;
    w[1] = -1.0f + 15.0f / 32.0f; /* max: code 15 -> s0 = 1/32 exactly; |max| < |min| */
    w[2] = -1.0f + 2.5f / 32.0f;
    w[3] = -1.0f + 3.5f / 32.0f;
    mlxq_quantize_group(w, 32, 4, q, &sc, &bs);
    assert_true(sc == 1.0f / 32.0f && bs == -1.0f);
    assert_int_equal(q[1], 15);
    assert_int_equal(q[2], 2);
    assert_int_equal(q[3], 4);
}

/* A constant group: range 0 -> scale = eps = 1e-7, negated (|min| == |max|), edge = w.
 * w = 0: q0 = 0 -> bias 0, codes 0. w = 3e-8: q0 = rint(-0.3) = -0 -> bias 0, codes clamp to 0.
 * w = 1: q0 = rint(-1e7) != 0 -> scale = 1 / -1e7, bias = 1, codes 0 (exact reconstruction). */
static void test_hand_constant_groups(void **state) {
    (void)state;
    float w[32], sc, bs;
    uint8_t q[32];
    for (int j = 0; j < 32; j++) w[j] = 0.0f;
    mlxq_quantize_group(w, 32, 4, q, &sc, &bs);
    assert_true(sc == -1e-7f && bs == 0.0f);
    for (int j = 0; j < 32; j++) assert_int_equal(q[j], 0);
    for (int j = 0; j < 32; j++) w[j] = 3e-8f;
    mlxq_quantize_group(w, 32, 4, q, &sc, &bs);
    assert_true(sc == -1e-7f && bs == 0.0f);
    for (int j = 0; j < 32; j++) assert_int_equal(q[j], 0);
    for (int j = 0; j < 32; j++) w[j] = 1.0f;
    mlxq_quantize_group(w, 32, 3, q, &sc, &bs);
    assert_true(sc < 0 && bs == 1.0f);
    for (int j = 0; j < 32; j++) {
        assert_int_equal(q[j], 0);
        assert_true(sc * (float)q[j] + bs == 1.0f);
    }
}

/* Packed words by hand. For each width the codes are zero except the ones listed. */
static void test_hand_packing(void **state) {
    (void)state;
    uint8_t q[128];
    uint32_t w[32];
    /* 2-bit: codes 0,1,2,3 repeated -> every byte is 0b11100100 */
    for (int i = 0; i < 32; i++) q[i] = (uint8_t)(i & 3);
    mlxq_pack_row(q, 32, 2, w);
    for (int i = 0; i < 2; i++) assert_int_equal(w[i], 0xE4E4E4E4u);
    /* 4-bit: codes 0..7 then 8..15 -> nibbles LSB first */
    for (int i = 0; i < 32; i++) q[i] = (uint8_t)(i & 15);
    mlxq_pack_row(q, 32, 4, w);
    assert_int_equal(w[0], 0x76543210u);
    assert_int_equal(w[1], 0xFEDCBA98u);
    /* 8-bit: 1, 2, 3, 4 -> 0x04030201 */
    memset(q, 0, sizeof q);
    q[0] = 1, q[1] = 2, q[2] = 3, q[3] = 4, q[31] = 0xAB;
    mlxq_pack_row(q, 32, 8, w);
    assert_int_equal(w[0], 0x04030201u);
    assert_int_equal(w[7], 0xAB000000u);

    struct { int bits, v; uint32_t expect[8]; } cases[] = { /* unlisted words are 0 */
        /* 3-bit: v10 = w0 bits 30-31 + w1 bit 0; v21 = w1 bit 31 + w2 bits 0-1; v1 inside w0 */
        {3, 10, {0xC0000000u, 0x00000001u, 0, 0, 0}},
        {3, 21, {0, 0x80000000u, 0x00000003u, 0, 0}},
        {3, 1, {0x00000038u, 0, 0, 0, 0}},
        {3, 31, {0, 0, 0xE0000000u, 0, 0}},
        /* 5-bit: v6 = w0 30-31 + w1 0-2; v12 = w1 28-31 + w2 0; v19 = w2 31 + w3 0-3;
         * v25 = w3 29-31 + w4 0-1; v31 = w4 27-31 */
        {5, 6, {0xC0000000u, 0x00000007u, 0, 0, 0}},
        {5, 12, {0, 0xF0000000u, 0x00000001u, 0, 0}},
        {5, 19, {0, 0, 0x80000000u, 0x0000000Fu, 0}},
        {5, 25, {0, 0, 0, 0xE0000000u, 0x00000003u}},
        {5, 31, {0, 0, 0, 0, 0xF8000000u}},
        /* 6-bit: v5 = w0 30-31 + w1 0-3; v10 = w1 28-31 + w2 0-1; v15 = w2 26-31 */
        {6, 5, {0xC0000000u, 0x0000000Fu, 0, 0, 0}},
        {6, 10, {0, 0xF0000000u, 0x00000003u, 0, 0}},
        {6, 15, {0, 0, 0xFC000000u, 0, 0}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int bits = cases[c].bits, words = bits; /* 32 values -> `bits` words */
        memset(q, 0, sizeof q);
        q[cases[c].v] = (uint8_t)((1 << bits) - 1);
        memset(w, 0xEE, sizeof w);
        mlxq_pack_row(q, 32, bits, w);
        for (int i = 0; i < words; i++) {
            if (w[i] != cases[c].expect[i])
                fail_msg("%d-bit v%d: word %d is 0x%08x, expected 0x%08x", bits, cases[c].v, i, w[i], cases[c].expect[i]);
        }
        assert_int_equal(w[words], 0xEEEEEEEEu); /* nothing written past the row */
    }
}

// ----------------------------------------------------------------------------
// packing against mlx's structure and the engine's reader

static void test_pack_matches_mlx_and_engine(void **state) {
    (void)state;
    enum { N = 384, ROWS = 3 };
    uint8_t q[ROWS * N], back[N], ref_bytes[N];
    uint32_t w[ROWS * N / 4];
    for (int bi = 0; bi < N_BITS; bi++) {
        const int bits = k_bits[bi];
        const int words = N * bits / 32;
        for (int i = 0; i < ROWS * N; i++) q[i] = (uint8_t)(lcg_u() * (1 << bits));
        for (int r = 0; r < ROWS; r++) mlxq_pack_row(q + r * N, N, bits, w + r * words);
        for (int r = 0; r < ROWS; r++) {
            const uint32_t *row = w + r * words;
            mlx_pack_ref(q + r * N, N, bits, ref_bytes);
            assert_memory_equal(row, ref_bytes, (size_t)words * 4); /* little-endian host */
            for (int v = 0; v < N; v++)
                if (cpu_mlx_q_get(row, bits, (size_t)v) != q[r * N + v])
                    fail_msg("%d-bit row %d value %d: engine reads %u, packed %u", bits, r, v,
                             cpu_mlx_q_get(row, bits, (size_t)v), q[r * N + v]);
            mlxq_unpack_row(row, N, bits, back);
            assert_memory_equal(back, q + r * N, N);
        }
    }
}

/* Quantize rows with every (bits, group), then read them through cpu_weight_row: the engine must
 * produce exactly bf16(s) * q + bf16(b), and that must be within the error bound of the input. */
static void test_roundtrip_engine_and_error_bounds(void **state) {
    (void)state;
    enum { N = 384, ROWS = 4 };
    float w[ROWS * N], deq[N], deqf[N], sf[N / 32], bf[N / 32];
    uint32_t packed[ROWS * N / 4];
    uint16_t sc[ROWS * N / 32], bs[ROWS * N / 32];
    uint8_t codes[N], q2[N];
    double mean_err[N_BITS] = {0};
    for (int bi = 0; bi < N_BITS; bi++) {
        const int bits = k_bits[bi];
        const float nb = (float)((1 << bits) - 1);
        long n_groups = 0;
        for (int gi = 0; gi < N_GROUPS; gi++) {
            const int g = k_groups[gi];
            /* rows: centred normal, shifted normal (all positive), tiny scale, wide uniform */
            for (int r = 0; r < ROWS; r++)
                for (int i = 0; i < N; i++) {
                    float x = r == 0 ? rnd_normal() * 0.03f
                              : r == 1 ? 2.0f + rnd_normal() * 0.1f
                              : r == 2 ? rnd_normal() * 1e-4f
                                       : (float)(lcg_u() * 200.0 - 120.0);
                    w[r * N + i] = st_bf16_to_f32(st_f32_to_bf16(x)); /* bf16 inputs, as in checkpoints */
                }
            const int words = N * bits / 32, ng = N / g;
            for (int r = 0; r < ROWS; r++)
                mlxq_quantize_row_bf16(w + r * N, N, bits, g, packed + r * words, sc + r * ng, bs + r * ng, codes);
            wt_linear v = qview(packed, sc, bs, ROWS, N, bits, g);
            for (int r = 0; r < ROWS; r++) {
                const float *x = w + r * N;
                cpu_weight_row(&v, r, deq);
                /* float-parameter path from the same quantizer */
                mlxq_quantize_row(x, N, bits, g, q2, sf, bf);
                mlxq_unpack_row(packed + r * words, N, bits, codes);
                assert_memory_equal(codes, q2, N); /* packed codes are the quantizer's codes */
                mlxq_dequantize_row(packed + r * words, sf, bf, N, bits, g, deqf);
                for (int k = 0; k < ng; k++) {
                    const float s16 = st_bf16_to_f32(sc[r * ng + k]), b16 = st_bf16_to_f32(bs[r * ng + k]);
                    assert_true(s16 == st_bf16_to_f32(st_f32_to_bf16(sf[k])));
                    assert_true(b16 == st_bf16_to_f32(st_f32_to_bf16(bf[k])));
                    float mn = INFINITY, mx = -INFINITY;
                    for (int i = k * g; i < (k + 1) * g; i++) {
                        mn = fminf(mn, x[i]);
                        mx = fmaxf(mx, x[i]);
                    }
                    const double step = (double)(mx - mn) / nb, amax = fmax(fabs(mn), fabs(mx));
                    double esum = 0;
                    for (int i = k * g; i < (k + 1) * g; i++) {
                        /* the engine's reader is exact */
                        const float want = s16 * (float)codes[i] + b16;
                        if (deq[i] != want) fail_msg("%d-bit g%d: engine %g != s*q+b %g at %d", bits, g, deq[i], want, i);
                        /* float parameters: one rounding step (or the clamp), plus float rounding */
                        const double e = fabs((double)deqf[i] - x[i]);
                        const double bound = step * 1.0001 + 8 * FLT_EPSILON * amax + 1e-30;
                        if (!(e <= bound))
                            fail_msg("%d-bit g%d row %d: |w - w'| = %g > bound %g (step %g)", bits, g, r, e, bound, step);
                        /* bf16 parameters: + n_bins * |s| * 2^-8 + |b| * 2^-8 */
                        const double e16 = fabs((double)want - x[i]);
                        const double b16b = bound + nb * fabs(sf[k]) * 0x1p-8 + fabs(bf[k]) * 0x1p-8 + 8 * FLT_EPSILON * amax;
                        if (!(e16 <= b16b)) fail_msg("%d-bit g%d: bf16-parameter error %g > %g", bits, g, e16, b16b);
                        if (step > 0) esum += e / step;
                    }
                    mean_err[bi] += esum / g;
                    n_groups++;
                }
            }
        }
        mean_err[bi] /= (double)n_groups;
        /* rounding error is ~uniform over half a step: the mean is about a quarter step */
        if (!(mean_err[bi] < 0.35)) fail_msg("%d-bit: mean |error| %.3f steps, expected about 0.25", bits, mean_err[bi]);
    }
}

/* More bits, smaller error on the same data. */
static void test_error_decreases_with_bits(void **state) {
    (void)state;
    enum { N = 4096 };
    static float w[N], d[N], sf[N / 32], bf[N / 32];
    static uint8_t q[N];
    static uint32_t packed[N];
    for (int i = 0; i < N; i++) w[i] = rnd_normal();
    double prev = INFINITY;
    for (int bi = 0; bi < N_BITS; bi++) {
        mlxq_quantize_row(w, N, k_bits[bi], 64, q, sf, bf);
        mlxq_pack_row(q, N, k_bits[bi], packed);
        mlxq_dequantize_row(packed, sf, bf, N, k_bits[bi], 64, d);
        double se = 0;
        for (int i = 0; i < N; i++) se += (d[i] - w[i]) * (d[i] - w[i]);
        double rms = sqrt(se / N);
        if (!(rms < prev * 0.75)) fail_msg("%d-bit rms error %g is not well below %g", k_bits[bi], rms, prev);
        prev = rms;
    }
    assert_true(prev < 0.01); /* 8 bits on unit normals: step ~ 6/255 / sqrt(12) */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_supported),
        cmocka_unit_test(test_hand_positive_scale),
        cmocka_unit_test(test_hand_negative_scale),
        cmocka_unit_test(test_hand_ties),
        cmocka_unit_test(test_hand_constant_groups),
        cmocka_unit_test(test_hand_packing),
        cmocka_unit_test(test_pack_matches_mlx_and_engine),
        cmocka_unit_test(test_roundtrip_engine_and_error_bounds),
        cmocka_unit_test(test_error_decreases_with_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
