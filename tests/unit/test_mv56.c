/* test_mv56.c — the planes layout of MLX 5- and 6-bit weights for the CUDA dp4a matrix-vector
 * kernels (src/backend/cuda/mv56_layout.h), checked on the host with the same functions the GPU
 * runs (no GPU, no CUDA toolkit needed).
 *
 * What is checked, and against what:
 *   - the repack of random MLX rows (5 and 6 bits, odd row counts, 1..128 blocks per row): every
 *     value read back from the planes with mv56_code equals the value read from the MLX bit
 *     stream by this file's own reader (value v of a row at bit v * bits, little-endian); the
 *     planes fill exactly rows * cols * bits / 8 bytes; repacking in row chunks (what the upload
 *     does through its staging buffer, one work item per thread) gives the same bytes;
 *   - the kernels' integer dot product (mv56_dot32_5 / _6: masks, dp4a emulated as four byte
 *     products, exact shifts) on x stored as k_quant_x stores it ([x0 x2 x4 x6][x1 x3 x5 x7] per
 *     8 values) equals the plain sum over the 32 values of code * x, for random codes and x and
 *     for the extremes (every code at its maximum, x = 127 / -128 / mixed signs), one x plane
 *     ([-127, 127]) and the low plane of two ([-128, 127]);
 *   - the centred form the kernels accumulate, isum - MID * sum(qx) = sum (q - MID) qx.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "backend/cuda/mv56_layout.h"

static uint64_t g_rng = 0x243F6A8885A308D3ull;

static uint32_t rnd32(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}

/* value v of an MLX row (words at row): bits [v * bits, v * bits + bits) of the row read as one
 * little-endian bit stream, one bit at a time (independent of mv56_mlx_get) */
static uint32_t ref_mlx_value(const uint32_t *row, int bits, int64_t v) {
    uint32_t q = 0;
    for (int b = 0; b < bits; b++) {
        const int64_t bit = v * bits + b;
        q |= ((row[bit / 32] >> (bit % 32)) & 1u) << b;
    }
    return q;
}

/* x of 32 values as k_quant_x stores a block: per 8 values [x0 x2 x4 x6] then [x1 x3 x5 x7] */
static void ref_x_words(const int8_t *x, uint32_t *xw) {
    for (int k = 0; k < 4; k++) {
        uint32_t ev = 0, od = 0;
        for (int j = 0; j < 4; j++) {
            ev |= (uint32_t)(uint8_t)x[8 * k + 2 * j] << (8 * j);
            od |= (uint32_t)(uint8_t)x[8 * k + 2 * j + 1] << (8 * j);
        }
        xw[2 * k] = ev, xw[2 * k + 1] = od;
    }
}

static void test_pack_roundtrip(void **state) {
    (void)state;
    const int64_t shapes[][2] = {{1, 32}, {3, 64}, {7, 96}, {5, 384}, {33, 1024}, {2, 4096}};
    for (int bits = 5; bits <= 6; bits++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const int64_t rows = shapes[si][0], cols = shapes[si][1], nb = cols / 32, wpr = cols * bits / 32;
            const size_t bytes = mv56_bytes(bits, rows, cols);
            assert_int_equal(bytes, (size_t)(rows * wpr * 4)); /* the same bytes as MLX */
            assert_int_equal(mv56_expert_stride(bits, rows, cols) % 16, 0);
            assert_true(mv56_expert_stride(bits, rows, cols) >= bytes && mv56_expert_stride(bits, rows, cols) < bytes + 16);
            /* the last H block ends exactly at the end; W rows are 16-byte multiples */
            assert_int_equal(mv56_h_off(bits, rows, cols, rows - 1, nb - 1) + 4 * (size_t)(bits - 4), bytes);
            assert_int_equal(mv56_w_off(cols, rows - 1, nb - 1) + 16, mv56_h_off(bits, rows, cols, 0, 0));
            assert_int_equal(mv56_w_off(cols, 1, 0) % 16, 0);
            uint32_t *mlx = malloc(bytes);
            for (int64_t i = 0; i < rows * wpr; i++) mlx[i] = rnd32();
            char *dst = malloc(bytes), *dst2 = malloc(bytes);
            memset(dst, 0xA5, bytes);
            memset(dst2, 0x5A, bytes);
            mv56_pack(bits, rows, cols, mlx, dst);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t v = 0; v < cols; v++) {
                    const uint32_t *wp = (const uint32_t *)(dst + mv56_w_off(cols, r, v / 32));
                    const uint32_t *hp = (const uint32_t *)(dst + mv56_h_off(bits, rows, cols, r, v / 32));
                    const uint32_t want = ref_mlx_value(mlx + r * wpr, bits, v);
                    const uint32_t got = mv56_code(bits, wp, hp, (int)(v % 32));
                    if (got != want) fail_msg("bits %d %lldx%lld row %lld value %lld: %u, want %u", bits, (long long)rows,
                                              (long long)cols, (long long)r, (long long)v, got, want);
                    /* the MLX reader of the repack agrees with the reference too */
                    assert_int_equal(mv56_mlx_get(mlx + r * wpr + (v / 32) * bits, bits, (int)(v % 32)), want);
                }
            /* the upload's chunked repack: rows [r0, r0 + n) from a staging copy of just those rows */
            const int64_t chunk = rows > 2 ? 2 : 1;
            for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
                const int64_t n = rows - r0 < chunk ? rows - r0 : chunk;
                uint32_t *stg = malloc((size_t)(n * wpr * 4));
                memcpy(stg, mlx + r0 * wpr, (size_t)(n * wpr * 4));
                for (int64_t i = 0; i < n * nb; i++) mv56_pack_item(bits, rows, cols, stg, r0, i, dst2);
                free(stg);
            }
            assert_memory_equal(dst, dst2, bytes); /* every byte written, the same bytes */
            free(mlx), free(dst), free(dst2);
        }
}

/* one block: codes q[32] packed from an MLX block built from them, dotted with x[32] */
static void check_dot(int bits, const uint32_t *q, const int8_t *x) {
    uint32_t mlx[6] = {0};
    for (int v = 0; v < 32; v++)
        for (int b = 0; b < bits; b++) {
            const int bit = v * bits + b;
            mlx[bit / 32] |= ((q[v] >> b) & 1u) << (bit % 32);
        }
    uint32_t w[4], h[2], xw[8];
    mv56_pack_block(bits, mlx, w, h);
    ref_x_words(x, xw);
    int64_t want = 0, qx = 0;
    for (int v = 0; v < 32; v++) want += (int64_t)q[v] * x[v], qx += x[v];
    const int32_t got = bits == 5 ? mv56_dot32_5(w, h[0], xw) : mv56_dot32_6(w, h, xw);
    if ((int64_t)got != want) fail_msg("bits %d: dot %d, want %lld", bits, got, (long long)want);
    /* what the kernels accumulate: the codes centred at MID */
    const int mid = 1 << (bits - 1);
    int64_t centred = 0;
    for (int v = 0; v < 32; v++) centred += ((int64_t)q[v] - mid) * x[v];
    assert_true((int64_t)got - mid * qx == centred);
}

static void test_dot_random(void **state) {
    (void)state;
    for (int bits = 5; bits <= 6; bits++)
        for (int it = 0; it < 20000; it++) {
            uint32_t q[32];
            int8_t x[32];
            for (int v = 0; v < 32; v++) {
                q[v] = rnd32() & ((1u << bits) - 1u);
                /* one plane: [-127, 127]; the low plane of two: [-128, 127] */
                x[v] = it & 1 ? (int8_t)((int)(rnd32() % 255u) - 127) : (int8_t)(uint8_t)rnd32();
            }
            check_dot(bits, q, x);
        }
}

static void test_dot_extremes(void **state) {
    (void)state;
    for (int bits = 5; bits <= 6; bits++) {
        const uint32_t qmax = (1u << bits) - 1u;
        const int8_t xs[] = {127, -128, -127, 1, -1, 0};
        for (size_t a = 0; a < sizeof xs; a++)
            for (int pattern = 0; pattern < 6; pattern++) {
                uint32_t q[32];
                int8_t x[32];
                for (int v = 0; v < 32; v++) {
                    /* all max, all zero, max on odd values only (the H plane), on even only,
                     * one value at a time at the top bit, alternating signs of x */
                    q[v] = pattern == 0   ? qmax
                           : pattern == 1 ? 0
                           : pattern == 2 ? (v & 1 ? qmax : 0)
                           : pattern == 3 ? (v & 1 ? 0 : qmax)
                           : pattern == 4 ? (v % 5 == 0 ? 1u << (bits - 1) : 1u)
                                          : (uint32_t)v & qmax;
                    x[v] = pattern == 5 && (v & 2) ? (int8_t)(xs[a] == -128 ? 127 : -xs[a]) : xs[a];
                }
                check_dot(bits, q, x);
            }
        /* each single value of each code: isolates every bit position of both planes */
        for (int v = 0; v < 32; v++)
            for (uint32_t c = 0; c <= qmax; c++) {
                uint32_t q[32] = {0};
                int8_t x[32] = {0};
                q[v] = c, x[v] = (int8_t)(v & 1 ? -128 : 127);
                check_dot(bits, q, x);
            }
    }
}

static void test_dp4a_emulation(void **state) {
    (void)state;
    assert_int_equal(mv56_dp4a(0xFF000102u, 0x80FF7F01u, 5), 5 + 2 * 1 + 1 * 127 + 0 * -1 + 255 * -128);
    for (int it = 0; it < 1000; it++) {
        const uint32_t a = rnd32(), b = rnd32();
        const int32_t c = (int32_t)(rnd32() % 100000u) - 50000;
        int32_t want = c;
        for (int i = 0; i < 4; i++) want += (int32_t)((a >> (8 * i)) & 255u) * (int32_t)(int8_t)(uint8_t)(b >> (8 * i));
        assert_int_equal(mv56_dp4a(a, b, c), want);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_roundtrip),
        cmocka_unit_test(test_dot_random),
        cmocka_unit_test(test_dot_extremes),
        cmocka_unit_test(test_dp4a_emulation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
