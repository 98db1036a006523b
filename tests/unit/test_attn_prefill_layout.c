/* test_attn_prefill_layout.c — host emulation of the CUDA prefill attention kernel
 * (src/backend/cuda/cuda_attn_prefill.cuh) through its integer layout
 * (src/backend/cuda/attn_prefill_layout.h), so that the kernel's index arithmetic is checked on
 * a machine without a GPU.
 *
 * What is checked, and against what:
 *   - the mma.m16n8k16 fragment maps are bijections onto the 16x16 A, 16x8 B and 16x8 C tiles
 *     (every element held by exactly one (lane, register, half)), and P's A registers are held
 *     by the lane that holds the S accumulators they are built from;
 *   - the shared-memory fragment loads of K (32-bit) and V (16-bit) touch 32 distinct banks per
 *     warp-wide load, or share a word (no bank conflicts), for hd 64 and 128;
 *   - the CTA grid covers every (token, q head) row of T tokens exactly once, for G = 1..64;
 *   - a statement-by-statement emulation of the kernel (tile loads with the zero fill, per-lane
 *     S = Q K^T through an mma emulated from the PTX fragment maps, the causal mask, the online
 *     softmax with quad reductions, P rebuilt from S's registers, O += P V, the final scaling
 *     and the stores) against a double-precision causal attention computed directly from the
 *     definition: exact arithmetic (no bf16 rounding) within 1e-5, with the kernel's bf16
 *     rounding of q and P within the bf16 tolerance 1e-2; shapes with G = 1, 4, 6, 8, hd 64 and
 *     128, T not a multiple of the tokens per CTA, positions from 0 and from an offset (earlier
 *     K/V already cached).
 * The maps themselves are transcribed from the PTX ISA; only the GPU (strata cuda-parity)
 * checks them against the hardware.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/attn_prefill_layout.h"
#include "strata/base.h"

static float bf(float x, int round) { return round ? st_bf16_to_f32(st_f32_to_bf16(x)) : x; }

/* ------------------------------------------------------------------------------------------ */
/* fragment maps */

static void test_fragment_maps(void **state) {
    (void)state;
    int a[16][16] = {{0}}, b[16][8] = {{0}}, c[16][8] = {{0}};
    for (int lane = 0; lane < 32; lane++) {
        for (int i = 0; i < 4; i++)
            for (int e = 0; e < 2; e++) a[attp_a_row(lane, i)][attp_a_col(lane, i) + e]++;
        for (int i = 0; i < 2; i++)
            for (int e = 0; e < 2; e++) b[attp_b_k(lane, i) + e][attp_b_n(lane)]++;
        for (int i = 0; i < 4; i++) c[attp_c_row(lane, i)][attp_c_col(lane, i)]++;
        /* P's A register i of k-tile 0 packs S's C registers creg, creg + 1 of n-tile
         * attp_p_ntile: the same (row, key) pairs, in the same lane */
        for (int i = 0; i < 4; i++) {
            const int nt = attp_p_ntile(0, i), cr = attp_p_creg(i);
            assert_int_equal(attp_c_row(lane, cr), attp_a_row(lane, i));
            assert_int_equal(attp_c_row(lane, cr + 1), attp_a_row(lane, i));
            assert_int_equal(8 * nt + attp_c_col(lane, cr), attp_a_col(lane, i));
            assert_int_equal(8 * nt + attp_c_col(lane, cr + 1), attp_a_col(lane, i) + 1);
        }
        /* the kernel's two rows per thread: C registers 0-1 are row h = 0, 2-3 row h = 1, and A
         * register i is row h = i & 1 */
        for (int i = 0; i < 4; i++) {
            assert_int_equal(attp_a_row(lane, i), attp_c_row(lane, 2 * (i & 1)));
            assert_int_equal(attp_c_row(lane, i), attp_c_row(lane, 2 * (i >> 1)));
        }
    }
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 16; k++) assert_int_equal(a[r][k], 1);
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 8; n++) assert_int_equal(b[k][n], 1);
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) assert_int_equal(c[r][n], 1);
}

/* one warp-wide shared-memory load of 32 lanes at byte addresses addr[]: conflict-free when
 * lanes that share a bank read the same 32-bit word */
static int conflict_free(const int *addr) {
    for (int x = 0; x < 32; x++)
        for (int y = x + 1; y < 32; y++)
            if ((addr[x] / 4) % 32 == (addr[y] / 4) % 32 && addr[x] / 4 != addr[y] / 4) return 0;
    return 1;
}

static void test_smem_banks(void **state) {
    (void)state;
    const int hds[] = {64, 128};
    for (int hi = 0; hi < 2; hi++) {
        const int hd = hds[hi], ld = attp_ld(hd);
        int addr[32];
        for (int nt = 0; nt < ATTP_BN / 8; nt++)
            for (int kk = 0; kk < hd / 16; kk++)
                for (int i = 0; i < 2; i++) {
                    for (int lane = 0; lane < 32; lane++) addr[lane] = 2 * attp_k_off(lane, nt, kk, i, ld);
                    assert_true(conflict_free(addr));
                    for (int lane = 0; lane < 32; lane++) assert_int_equal(addr[lane] % 4, 0); /* 32-bit aligned */
                }
        for (int kt = 0; kt < ATTP_BN / 16; kt++)
            for (int nd = 0; nd < hd / 8; nd++)
                for (int i = 0; i < 2; i++)
                    for (int e = 0; e < 2; e++) { /* the low and the high half (one row further) */
                        for (int lane = 0; lane < 32; lane++) addr[lane] = 2 * (attp_v_off(lane, kt, nd, i, ld) + e * ld);
                        assert_true(conflict_free(addr));
                    }
        /* cp.async writes 16-byte chunks: rows and both buffers stay 16-byte aligned */
        assert_int_equal((ld * 2) % 16, 0);
        assert_int_equal(attp_smem_bytes(hd) % 64, 0);
    }
}

static void test_grid_cover(void **state) {
    (void)state;
    const int Ts[] = {1, 16, 33, 128, 300};
    for (int G = 1; G <= ATTP_ROWS; G++)
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            const int T = Ts[ti], nblk = attp_blocks(T, G);
            int *seen = calloc((size_t)T * G, sizeof *seen);
            assert_non_null(seen);
            for (int bx = 0; bx < nblk; bx++) {
                const int t0 = attp_block_t0(bx, nblk, G);
                assert_true(t0 >= 0 && t0 < T);
                for (int r = 0; r < ATTP_ROWS; r++) {
                    const int t = attp_row_token(r, t0, T, G), h = attp_row_head(r, 0, G);
                    assert_true(t >= t0 && t < T && h >= 0 && h < G);
                    if (attp_row_valid(r, t0, T, G)) seen[(size_t)t * G + h]++;
                }
            }
            for (int i = 0; i < T * G; i++) assert_int_equal(seen[i], 1);
            free(seen);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* the kernel, emulated */

/* c[lane][4] += A B with A, B given as per-lane registers (two halves each), through the maps */
static void mma_emul(float c[32][4], float a[32][4][2], float b[32][2][2]) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; lane++) {
        for (int i = 0; i < 4; i++)
            for (int e = 0; e < 2; e++) A[attp_a_row(lane, i)][attp_a_col(lane, i) + e] = a[lane][i][e];
        for (int i = 0; i < 2; i++)
            for (int e = 0; e < 2; e++) B[attp_b_k(lane, i) + e][attp_b_n(lane)] = b[lane][i][e];
    }
    for (int lane = 0; lane < 32; lane++)
        for (int i = 0; i < 4; i++) {
            float s = 0.f;
            for (int k = 0; k < 16; k++) s += A[attp_c_row(lane, i)][k] * B[k][attp_c_col(lane, i)];
            c[lane][i] += s;
        }
}

typedef struct shape {
    int T, H, Hkv, hd, pos0;
} shape;

/* out[T, H*hd] as k_attn_prefill<hd> computes it for rows at pos0..pos0+T-1 of a cache of
 * n_ctx = pos0 + T rows k/v [n_ctx][Hkv*hd] (already bf16 values); round: the kernel's bf16
 * rounding of q and P */
static void emulate(const shape *sh, const float *q, const float *k, const float *v, const int32_t *pos, float *out,
                    int round) {
    const int T = sh->T, H = sh->H, Hkv = sh->Hkv, hd = sh->hd, G = H / Hkv, TM = attp_tokens_per_cta(G);
    const int kvd = Hkv * hd, qd = H * hd, ld = attp_ld(hd), KT = hd / 16, ND = hd / 8, NT = ATTP_BN / 8;
    const float scale_log2 = 1.0f / sqrtf((float)hd) * 1.4426950408889634f;
    float *ks = malloc((size_t)ATTP_BN * ld * sizeof *ks), *vs = malloc((size_t)ATTP_BN * ld * sizeof *vs);
    /* per-lane state of one warp */
    static float qf[32][8][4][2], o[32][16][4], s[32][8][4], pa[32][4][2], bb[32][2][2];
    static int tok[32][2], head[32][2], rpos[32][2], valid[32][2];
    static float m[32][2], l[32][2];
    assert_non_null(ks);
    assert_non_null(vs);
    const int nblk = attp_blocks(T, G);
    for (int kvh = 0; kvh < Hkv; kvh++)
        for (int bx = 0; bx < nblk; bx++) {
            const int t0 = attp_block_t0(bx, nblk, G);
            int pmax = 0;
            for (int i = 0; i < TM && t0 + i < T; i++) pmax = pos[t0 + i] > pmax ? pos[t0 + i] : pmax;
            const int ntiles = pmax / ATTP_BN + 1;
            const float *kg = k + (size_t)kvh * hd, *vg = v + (size_t)kvh * hd;
            for (int warp = 0; warp < ATTP_WARPS; warp++) {
                for (int lane = 0; lane < 32; lane++) {
                    for (int h = 0; h < 2; h++) {
                        const int r = warp * 16 + attp_c_row(lane, 2 * h);
                        valid[lane][h] = attp_row_valid(r, t0, T, G);
                        tok[lane][h] = attp_row_token(r, t0, T, G);
                        head[lane][h] = attp_row_head(r, kvh, G);
                        rpos[lane][h] = pos[tok[lane][h]];
                        m[lane][h] = -INFINITY, l[lane][h] = 0.f;
                    }
                    for (int kk = 0; kk < KT; kk++)
                        for (int i = 0; i < 4; i++) {
                            const int h = i & 1, col = 16 * kk + attp_a_col(lane, i);
                            const float *qp = q + (size_t)tok[lane][h] * qd + (size_t)head[lane][h] * hd + col;
                            qf[lane][kk][i][0] = bf(qp[0], round), qf[lane][kk][i][1] = bf(qp[1], round);
                        }
                    memset(o[lane], 0, sizeof o[lane]);
                }
                for (int j = 0; j < ntiles; j++) {
                    /* attp_load_tile: 16-byte chunks, rows past pmax zero-filled */
                    const int CH = hd / 8;
                    for (int c = 0; c < ATTP_BN * CH; c++) {
                        const int r = c / CH, ch = c % CH, kp = j * ATTP_BN + r, ok = kp <= pmax;
                        for (int e = 0; e < 8; e++) {
                            ks[r * ld + ch * 8 + e] = ok ? kg[(size_t)kp * kvd + ch * 8 + e] : 0.f;
                            vs[r * ld + ch * 8 + e] = ok ? vg[(size_t)kp * kvd + ch * 8 + e] : 0.f;
                        }
                    }
                    memset(s, 0, sizeof s);
                    for (int nt = 0; nt < NT; nt++)
                        for (int kk = 0; kk < KT; kk++) {
                            float cc[32][4];
                            for (int lane = 0; lane < 32; lane++) {
                                for (int i = 0; i < 2; i++)
                                    for (int e = 0; e < 2; e++) bb[lane][i][e] = ks[attp_k_off(lane, nt, kk, i, ld) + e];
                                memcpy(cc[lane], s[lane][nt], sizeof cc[lane]);
                            }
                            float aa[32][4][2];
                            for (int lane = 0; lane < 32; lane++) memcpy(aa[lane], qf[lane][kk], sizeof aa[lane]);
                            mma_emul(cc, aa, bb);
                            for (int lane = 0; lane < 32; lane++) memcpy(s[lane][nt], cc[lane], sizeof cc[lane]);
                        }
                    const int kp0 = j * ATTP_BN;
                    float mx[32][2], mref[32][2];
                    for (int lane = 0; lane < 32; lane++) {
                        const int rmin = rpos[lane][0] < rpos[lane][1] ? rpos[lane][0] : rpos[lane][1];
                        const int need_mask = kp0 + ATTP_BN - 1 > rmin;
                        mx[lane][0] = mx[lane][1] = -INFINITY;
                        for (int nt = 0; nt < NT; nt++)
                            for (int i = 0; i < 4; i++) {
                                float x = s[lane][nt][i] * scale_log2;
                                if (need_mask && kp0 + 8 * nt + attp_c_col(lane, i) > rpos[lane][i >> 1]) x = -INFINITY;
                                s[lane][nt][i] = x;
                                mx[lane][i >> 1] = fmaxf(mx[lane][i >> 1], x);
                            }
                    }
                    for (int h = 0; h < 2; h++) { /* quad max via xor 1, xor 2 */
                        float t1[32], t2[32];
                        for (int lane = 0; lane < 32; lane++) t1[lane] = fmaxf(mx[lane][h], mx[lane ^ 1][h]);
                        for (int lane = 0; lane < 32; lane++) t2[lane] = fmaxf(t1[lane], t1[lane ^ 2]);
                        for (int lane = 0; lane < 32; lane++) {
                            const float mn = fmaxf(m[lane][h], t2[lane]);
                            mref[lane][h] = mn == -INFINITY ? 0.f : mn;
                            const float corr = exp2f(m[lane][h] - mref[lane][h]);
                            m[lane][h] = mn;
                            l[lane][h] *= corr;
                            for (int nd = 0; nd < ND; nd++) o[lane][nd][2 * h] *= corr, o[lane][nd][2 * h + 1] *= corr;
                        }
                    }
                    for (int lane = 0; lane < 32; lane++)
                        for (int nt = 0; nt < NT; nt++)
                            for (int i = 0; i < 4; i++) {
                                const float p = exp2f(s[lane][nt][i] - mref[lane][i >> 1]);
                                s[lane][nt][i] = p;
                                l[lane][i >> 1] += p;
                            }
                    for (int kt = 0; kt < ATTP_BN / 16; kt++) {
                        for (int lane = 0; lane < 32; lane++)
                            for (int i = 0; i < 4; i++) {
                                const float *c = s[lane][attp_p_ntile(kt, i)] + attp_p_creg(i);
                                pa[lane][i][0] = bf(c[0], round), pa[lane][i][1] = bf(c[1], round);
                            }
                        for (int nd = 0; nd < ND; nd++) {
                            float cc[32][4];
                            for (int lane = 0; lane < 32; lane++) {
                                for (int i = 0; i < 2; i++) {
                                    const int off = attp_v_off(lane, kt, nd, i, ld);
                                    bb[lane][i][0] = vs[off], bb[lane][i][1] = vs[off + ld];
                                }
                                memcpy(cc[lane], o[lane][nd], sizeof cc[lane]);
                            }
                            mma_emul(cc, pa, bb);
                            for (int lane = 0; lane < 32; lane++) memcpy(o[lane][nd], cc[lane], sizeof cc[lane]);
                        }
                    }
                }
                for (int h = 0; h < 2; h++) {
                    float t1[32], t2[32];
                    for (int lane = 0; lane < 32; lane++) t1[lane] = l[lane][h] + l[lane ^ 1][h];
                    for (int lane = 0; lane < 32; lane++) t2[lane] = t1[lane] + t1[lane ^ 2];
                    for (int lane = 0; lane < 32; lane++) l[lane][h] = t2[lane] > 0.f ? 1.0f / t2[lane] : 0.f;
                }
                for (int lane = 0; lane < 32; lane++)
                    for (int h = 0; h < 2; h++) {
                        if (!valid[lane][h]) continue;
                        float *orow = out + (size_t)tok[lane][h] * qd + (size_t)head[lane][h] * hd + 2 * (lane & 3);
                        for (int nd = 0; nd < ND; nd++) {
                            orow[8 * nd] = o[lane][nd][2 * h] * l[lane][h];
                            orow[8 * nd + 1] = o[lane][nd][2 * h + 1] * l[lane][h];
                        }
                    }
            }
        }
    free(ks);
    free(vs);
}

/* causal attention from the definition, in double */
static void reference(const shape *sh, const float *q, const float *k, const float *v, const int32_t *pos, float *out) {
    const int H = sh->H, Hkv = sh->Hkv, hd = sh->hd, G = H / Hkv, kvd = Hkv * hd;
    double *w = malloc(((size_t)pos[sh->T - 1] + 1) * sizeof *w);
    assert_non_null(w);
    for (int t = 0; t < sh->T; t++)
        for (int h = 0; h < H; h++) {
            const float *qr = q + ((size_t)t * H + h) * hd;
            const int kvh = h / G, n = pos[t] + 1;
            double mx = -INFINITY, sum = 0;
            for (int p = 0; p < n; p++) {
                double d = 0;
                for (int i = 0; i < hd; i++) d += (double)qr[i] * k[(size_t)p * kvd + (size_t)kvh * hd + i];
                w[p] = d / sqrt((double)hd);
                mx = w[p] > mx ? w[p] : mx;
            }
            for (int p = 0; p < n; p++) sum += (w[p] = exp(w[p] - mx));
            for (int i = 0; i < hd; i++) {
                double acc = 0;
                for (int p = 0; p < n; p++) acc += w[p] * v[(size_t)p * kvd + (size_t)kvh * hd + i];
                out[((size_t)t * H + h) * hd + i] = (float)(acc / sum);
            }
        }
    free(w);
}

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static float rnd(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static void run_shape(const shape *sh) {
    const int n_ctx = sh->pos0 + sh->T, kvd = sh->Hkv * sh->hd, qd = sh->H * sh->hd;
    float *k = malloc((size_t)n_ctx * kvd * 4), *v = malloc((size_t)n_ctx * kvd * 4), *q = malloc((size_t)sh->T * qd * 4);
    float *ref = malloc((size_t)sh->T * qd * 4), *got = malloc((size_t)sh->T * qd * 4);
    int32_t *pos = malloc((size_t)sh->T * 4);
    assert_true(k && v && q && ref && got && pos);
    for (size_t i = 0; i < (size_t)n_ctx * kvd; i++) k[i] = bf(rnd() * 2, 1), v[i] = bf(rnd(), 1);
    for (size_t i = 0; i < (size_t)sh->T * qd; i++) q[i] = rnd() * 2;
    for (int t = 0; t < sh->T; t++) pos[t] = sh->pos0 + t;
    reference(sh, q, k, v, pos, ref);
    for (int round = 0; round < 2; round++) {
        for (size_t i = 0; i < (size_t)sh->T * qd; i++) got[i] = NAN; /* every output must be written */
        emulate(sh, q, k, v, pos, got, round);
        double md = 0, mr = 0;
        for (size_t i = 0; i < (size_t)sh->T * qd; i++) {
            const double d = fabs((double)got[i] - ref[i]);
            if (!(d <= md)) md = d;
            if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
        }
        const double rel = md / mr, tol = round ? 1e-2 : 1e-5;
        printf("prefill attention emulation T=%d H=%d Hkv=%d hd=%d pos0=%d %s: rel %.2e (tol %.0e)\n", sh->T, sh->H,
               sh->Hkv, sh->hd, sh->pos0, round ? "bf16" : "exact", rel, tol);
        assert_true(rel <= tol);
    }
    free(k), free(v), free(q), free(ref), free(got), free(pos);
}

static void test_emulated_kernel(void **state) {
    (void)state;
    const shape shapes[] = {
        {16, 4, 4, 64, 0},    /* G = 1: 64 tokens per CTA, one partial block            */
        {33, 32, 8, 128, 0},  /* G = 4 (qwen3-8b), T not a multiple of 16               */
        {33, 48, 8, 128, 70}, /* G = 6 (minimax): 10 tokens + 4 idle rows per CTA; offset */
        {70, 16, 2, 64, 0},   /* G = 8, several key tiles, hd 64                         */
        {40, 8, 2, 128, 100}, /* a second chunk: keys 0..139 (3 tiles), mask in the last */
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) run_shape(&shapes[i]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fragment_maps),
        cmocka_unit_test(test_smem_banks),
        cmocka_unit_test(test_grid_cover),
        cmocka_unit_test(test_emulated_kernel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
