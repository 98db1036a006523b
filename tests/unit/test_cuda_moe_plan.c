/* test_cuda_moe_plan.c — the index and integer arithmetic of the CUDA MoE kernels
 * (src/backend/cuda/cuda_moe_plan.h, shared with cuda_moe.cuh), checked on the host: no GPU.
 *
 * What is checked, and against what:
 *   - k_moe_router's split of E rows x nch chunks over blocks of 4 warps (S warps per row): every
 *     (row, chunk) pair is visited exactly once, a lane holds at most ceil(nch / (32 S)) chunks,
 *     and the slice sum of the block's shared-memory table (red[rb * S + s]) reads the warps that
 *     computed row rb — by enumerating the kernel's loops;
 *   - k_moe_down's (expert, slice) pairs: every (k, chunk) once, K * S within the shared table;
 *   - the quantised-x layout of moe_quant32 (moe_xq_pos, moe_xq_hi) against the dot product the
 *     dp4a kernels take from it: the MLX 4-bit mask trick and the 8-bit byte permutes, emulated
 *     here byte by byte, must give exactly sum q_i x_i (one plane) and, with two planes,
 *     256 * dot(hi) + dot(lo) = sum q_i x_i for codes up to +-32512, on random codes;
 *   - 5/6-bit experts in the planes layout as the fused kernels read them: E experts packed
 *     mv56_expert_stride apart (padding untouched by the repack), every (expert, row, block)
 *     addressed with moe_pk_w_row / moe_pk_h_row stays inside its expert's plane and, through
 *     mv56_dot32_5 / _6 on two planes of x (moe_quant32's placement), gives exactly
 *     sum code_i x_i and the centred sum (code_i - MID) x_i against the MLX codes read directly;
 *     moe_pk_fits admits those weights and refuses misaligned bases / strides and partial blocks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_moe_plan.h"

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;

static uint32_t rnd32(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}

/* ------------------------------------------------------------------------------------------ */
/* work splits                                                                                */

static void test_router_split(void **state) {
    (void)state;
    static const int Es[] = {1, 7, 60, 64, 100, 128, 256, 512};
    for (int nch = 1; nch <= 300; nch += (nch < 70 ? 1 : 7)) {
        const int S = moe_rt_slices(nch);
        assert_true(S == 1 || S == 2 || S == 4);
        assert_int_equal(MOE_RT_WARPS % S, 0);
        const int rpb = MOE_RT_WARPS / S, max_per_lane = (nch + 32 * S - 1) / (32 * S);
        if (nch <= 128) assert_int_equal(max_per_lane, 1); /* about one chunk per lane */
        for (size_t ei = 0; ei < sizeof Es / sizeof Es[0]; ei++) {
            const int E = Es[ei], nb = moe_rt_blocks(E, S);
            unsigned char *seen = calloc((size_t)E * nch, 1);
            for (int b = 0; b < nb; b++) {
                int wrow[MOE_RT_WARPS], wsl[MOE_RT_WARPS];
                for (int w = 0; w < MOE_RT_WARPS; w++) {
                    const int row = b * rpb + w / S, sl = w % S; /* k_moe_router's prologue */
                    wrow[w] = row, wsl[w] = sl;
                    if (row >= E) continue;
                    for (int lane = 0; lane < 32; lane++) {
                        int n = 0;
                        for (int c = moe_chunk0(sl, lane); c < nch; c += moe_chunk_step(S)) {
                            seen[(size_t)row * nch + c]++;
                            n++;
                        }
                        assert_true(n <= max_per_lane);
                    }
                }
                for (int rb = 0; rb < rpb; rb++) /* the slice sum: red[rb * S + s], s = 0..S-1 */
                    for (int s = 0; s < S; s++) {
                        assert_int_equal(wrow[rb * S + s], b * rpb + rb);
                        assert_int_equal(wsl[rb * S + s], s);
                    }
            }
            for (size_t i = 0; i < (size_t)E * nch; i++) assert_int_equal(seen[i], 1);
            free(seen);
        }
    }
}

static void test_down_split(void **state) {
    (void)state;
    for (int K = 1; K <= MOE_DN_MAXP; K++) {
        const int S = moe_dn_slices(K);
        assert_true(S >= 1 && K * S <= MOE_DN_MAXP);
        if (K <= MOE_DN_WARPS) assert_true(K * S <= MOE_DN_WARPS && K * S > MOE_DN_WARPS - K); /* < K idle warps */
        for (int nch = 1; nch <= 80; nch += 3) {
            unsigned char *seen = calloc((size_t)K * nch, 1);
            for (int w = 0; w < MOE_DN_WARPS; w++)
                for (int p = w; p < K * S; p += MOE_DN_WARPS) { /* k_moe_down's pair loop */
                    const int k = p / S, sl = p % S;
                    for (int lane = 0; lane < 32; lane++)
                        for (int c = moe_chunk0(sl, lane); c < nch; c += moe_chunk_step(S)) seen[(size_t)k * nch + c]++;
                }
            for (size_t i = 0; i < (size_t)K * nch; i++) assert_int_equal(seen[i], 1);
            free(seen);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* quantised-x layout against the dp4a dot products                                            */

/* c + dot(4 unsigned bytes of a, 4 signed bytes of b): dp4a.u32.s32 */
static int dp4a_us(uint32_t a, uint32_t b, int c) {
    for (int i = 0; i < 4; i++) c += (int)((a >> (8 * i)) & 0xffu) * (int)(int8_t)((b >> (8 * i)) & 0xffu);
    return c;
}

/* __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8 bytes [x, y] */
static uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t v = (uint64_t)x | (uint64_t)y << 32;
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) r |= (uint32_t)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
    return r;
}

/* cuda_kernels.cuh's dot32: 32 weight codes (BITS words, MLX packing) with 8 words of x bytes */
static int dot32(int bits, const uint32_t *wv, const uint32_t *xv) {
    if (bits == 4) {
        int lo = 0, hi16 = 0;
        for (int k = 0; k < 4; k++) {
            lo = dp4a_us(wv[k] & 0x0F0F0F0Fu, xv[2 * k], lo);
            hi16 = dp4a_us(wv[k] & 0xF0F0F0F0u, xv[2 * k + 1], hi16);
        }
        return lo + (hi16 >> 4);
    }
    int s = 0;
    for (int k = 0; k < 4; k++) {
        s = dp4a_us(byte_perm(wv[2 * k], wv[2 * k + 1], 0x6420), xv[2 * k], s);
        s = dp4a_us(byte_perm(wv[2 * k], wv[2 * k + 1], 0x7531), xv[2 * k + 1], s);
    }
    return s;
}

/* moe_quant32's byte placement of codes q[32] into planes (plane 0 = hi when two) */
static void place(const int *q, int planes, uint8_t *out) {
    for (int lane = 0; lane < 32; lane++) {
        const int pos = moe_xq_pos(lane);
        if (planes == 2) {
            const int hi = moe_xq_hi(q[lane]);
            out[pos] = (uint8_t)(int8_t)hi;
            out[32 + pos] = (uint8_t)(int8_t)(q[lane] - hi * 256);
        } else out[pos] = (uint8_t)(int8_t)q[lane];
    }
}

static void test_xq_layout_dot(void **state) {
    (void)state;
    int seen[32] = {0};
    for (int lane = 0; lane < 32; lane++) seen[moe_xq_pos(lane)]++;
    for (int i = 0; i < 32; i++) assert_int_equal(seen[i], 1);
    for (int q = -32512; q <= 32512; q++) {
        const int hi = moe_xq_hi(q), lo = q - 256 * hi;
        assert_true(hi >= -127 && hi <= 127 && lo >= -128 && lo <= 127);
    }
    for (int iter = 0; iter < 4000; iter++) {
        const int bits = iter & 1 ? 8 : 4, planes = iter & 2 ? 2 : 1, qmax = planes == 2 ? 32512 : 127;
        int code[32], q[32];
        uint32_t wv[8] = {0};
        for (int i = 0; i < 32; i++) {
            code[i] = (int)(rnd32() & ((1u << bits) - 1u));
            q[i] = (int)(rnd32() % (uint32_t)(2 * qmax + 1)) - qmax;
            if (iter % 7 == 0) q[i] = i & 1 ? qmax : -qmax; /* the extremes */
            wv[i * bits / 32] |= (uint32_t)code[i] << ((i * bits) % 32); /* MLX: value i at bit bits*i */
        }
        long long want = 0;
        for (int i = 0; i < 32; i++) want += (long long)code[i] * q[i];
        uint8_t bytes[64];
        place(q, planes, bytes);
        uint32_t xh[8], xl[8];
        memcpy(xh, bytes, 32);
        memcpy(xl, bytes + 32, 32);
        long long got = dot32(bits, wv, xh);
        if (planes == 2) got = got * 256 + dot32(bits, wv, xl);
        assert_true(got == want);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 5/6-bit planes experts                                                                      */

static void test_pk_experts(void **state) {
    (void)state;
    static const int rows_l[] = {1, 3, 8, 33}, cols_l[] = {32, 64, 96, 192};
    for (int bits = 5; bits <= 6; bits++)
        for (int ri = 0; ri < 4; ri++)
            for (int ci = 0; ci < 4; ci++) {
                const int64_t rows = rows_l[ri], cols = cols_l[ci];
                const int E = 3, MID = 1 << (bits - 1);
                const size_t stride = mv56_expert_stride(bits, rows, cols), bytes = mv56_bytes(bits, rows, cols);
                assert_int_equal(stride % 16, 0);
                const size_t wpr = (size_t)(cols * bits / 32); /* MLX words per row */
                uint32_t *mlx = malloc((size_t)E * rows * wpr * 4);
                for (size_t i = 0; i < (size_t)E * rows * wpr; i++) mlx[i] = rnd32();
                char *buf = aligned_alloc(16, stride * E + 16);
                memset(buf, 0xA5, stride * E + 16);
                for (int e = 0; e < E; e++) mv56_pack(bits, rows, cols, mlx + (size_t)e * rows * wpr, buf + (size_t)e * stride);
                for (int e = 0; e < E; e++) /* the padding between experts is not written */
                    for (size_t i = bytes; i < stride; i++) assert_int_equal((unsigned char)buf[(size_t)e * stride + i], 0xA5);
                const int group = cols % 64 ? 32 : 64;
                assert_true(moe_pk_fits(bits, rows, cols, group, (uintptr_t)buf, stride));
                assert_false(moe_pk_fits(bits, rows, cols, group, (uintptr_t)buf + 4, stride));
                assert_false(moe_pk_fits(bits, rows, cols, group, (uintptr_t)buf, stride + 8));
                assert_false(moe_pk_fits(bits, rows, cols, group, (uintptr_t)buf, stride - 16)); /* short of an expert */
                assert_false(moe_pk_fits(bits, rows, cols + 16, group, (uintptr_t)buf, stride * 2));
                assert_false(moe_pk_fits(4, rows, cols, group, (uintptr_t)buf, stride));
                for (int e = 0; e < E; e++)
                    for (int64_t r = 0; r < rows; r++) {
                        const size_t wo = moe_pk_w_row(stride, e, cols, r), ho = moe_pk_h_row(bits, stride, e, rows, cols, r);
                        for (int64_t c = 0; c < cols / 32; c++) {
                            /* inside expert e: W blocks in its first rows * cols / 2 bytes, H after */
                            assert_true(wo + 16 * (size_t)c >= (size_t)e * stride);
                            assert_true(wo + 16 * (size_t)(c + 1) <= (size_t)e * stride + (size_t)(rows * cols / 2));
                            assert_true(ho + 4 * (size_t)(bits - 4) * (size_t)c >= (size_t)e * stride + (size_t)(rows * cols / 2));
                            assert_true(ho + 4 * (size_t)(bits - 4) * (size_t)(c + 1) <= (size_t)e * stride + bytes);
                            assert_int_equal((wo + 16 * (size_t)c) % 16, 0);
                            assert_int_equal((ho + 4 * (size_t)(bits - 4) * (size_t)c) % (size_t)(4 * (bits - 4)), 0);
                            uint32_t wv[4], hv[2];
                            memcpy(wv, buf + wo + 16 * (size_t)c, 16);
                            memcpy(hv, buf + ho + 4 * (size_t)(bits - 4) * (size_t)c, 4 * (size_t)(bits - 4));
                            const uint32_t *blk = mlx + ((size_t)e * rows + (size_t)r) * wpr + (size_t)c * (size_t)bits;
                            int q[32];
                            long long want = 0, want_c = 0, qsum = 0;
                            for (int i = 0; i < 32; i++) {
                                q[i] = (int)(rnd32() % 65025u) - 32512;
                                if ((e + r + c) % 5 == 0) q[i] = i & 1 ? 32512 : -32512; /* the extremes */
                                const int code = (int)mv56_mlx_get(blk, bits, i);
                                want += (long long)code * q[i], want_c += (long long)(code - MID) * q[i], qsum += q[i];
                            }
                            uint8_t bytes2[64];
                            place(q, 2, bytes2);
                            uint32_t xh[8], xl[8];
                            memcpy(xh, bytes2, 32);
                            memcpy(xl, bytes2 + 32, 32);
                            /* k_moe_gateup / k_moe_down: is = 256 dot(hi) + dot(lo) - MID qsum (int32) */
                            int32_t is = bits == 5 ? mv56_dot32_5(wv, hv[0], xh) : mv56_dot32_6(wv, hv, xh);
                            is = is * 256 + (bits == 5 ? mv56_dot32_5(wv, hv[0], xl) : mv56_dot32_6(wv, hv, xl));
                            assert_true((long long)is == want);
                            is -= MID * (int32_t)qsum;
                            assert_true((long long)is == want_c);
                        }
                    }
                free(buf);
                free(mlx);
            }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_router_split),
        cmocka_unit_test(test_down_split),
        cmocka_unit_test(test_xq_layout_dot),
        cmocka_unit_test(test_pk_experts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
