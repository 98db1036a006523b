/* test_cpu_ops.c — the CPU backend's linear, attention and SwiGLU kernels (cpu_ops.h).
 *
 * Two layers of checks:
 *   1. the float32 reference (exact = 1) against a naive double-precision computation that
 *      dequantizes every weight with cpu_mlx_q_get: |ref - naive| <= 1e-6 * sum|w x|;
 *   2. the SIMD fast path (exact = 0; every ISA the CPU has: AVX2 and, where present, AVX-512)
 *      against the reference: |fast - ref| <= 1e-5 * sum|w x| for the float kernels; the
 *      quantized-activation kernels (cpu_simd_actq: int16 for 2/4/8-bit weights at T <= 4,
 *      int8 for 4-bit weights at T <= 4 when actq8 is on, int16 for the 4-bit prefill GEMM)
 *      may add their quantization error, bounded by sum_i |s q_i| * d_i / 2 (d_i = max|x| /
 *      qmax of x_i's block, qmax 32767 or 127; int8: sum_i |w_i| * d_i / 2, its bias term
 *      taking the rounded x^ too), which the test computes itself, and must match
 *      an emulation of their documented rounding within 1e-5; every case runs with int8, int16
 *      and float activations. test_q4i8_exact checks the int8 kernel's quantizer and integer
 *      sums bit for bit against a scalar emulation.
 * sum|w x| (per output, in double) is the scale float32 rounding errors of a dot product are
 * proportional to, so the bounds hold for outputs that cancel to ~0 and still catch a single
 * wrong weight (which moves the result by ~1/cols of that scale, >= 1e-3 here).
 * Weights live in exactly-sized heap buffers so AddressSanitizer builds catch any read past a
 * row, a scale array or an activation. Random data from a fixed seed: deterministic.
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

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/cpu_simd.h"
#include "strata/base.h"
#include "strata/pool.h"

#include <math.h>

// ----------------------------------------------------------------------------
// helpers

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint64_t rng_u64(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_unif(double lo, double hi) { return lo + (hi - lo) * (double)(rng_u64() >> 11) * 0x1.0p-53; }

/* A float in dtype dt stored at p[i]; returns the value actually stored (after rounding). */
static float put_float(void *p, size_t i, sft_dtype dt, float v) {
    if (dt == SFT_F32) {
        memcpy((char *)p + 4 * i, &v, 4);
        return v;
    }
    uint16_t h = dt == SFT_BF16 ? st_f32_to_bf16(v) : st_f32_to_f16(v);
    memcpy((char *)p + 2 * i, &h, 2);
    return dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
}

static double get_float(const void *p, size_t i, sft_dtype dt) {
    if (dt == SFT_F32) {
        float f;
        memcpy(&f, (const char *)p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)p + 2 * i, 2);
    return dt == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
}

static int dtype_bytes(sft_dtype dt) { return dt == SFT_F32 ? 4 : 2; }

/* A weight with its own exactly-sized buffers (freed by weight_free). */
typedef struct test_weight {
    wt_linear w;
    void *data, *scales, *biases;
} test_weight;

/* Random MLX affine weight [rows, cols] at bits/group with scales/biases in sdt, shaped like
 * mlx's quantizer output: s > 0, b ~ -s * (2^bits - 1) / 2 (a zero-centred group). */
static void weight_quant(test_weight *t, int64_t rows, int64_t cols, int bits, int group, sft_dtype sdt) {
    memset(t, 0, sizeof *t);
    wt_linear *w = &t->w;
    w->qbits = bits;
    w->group = group;
    w->sdtype = sdt;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = (size_t)cols * bits / 8;
    w->srow_elems = (size_t)(cols / group);
    size_t nw = (size_t)rows * w->row_bytes / 4, ns = (size_t)rows * w->srow_elems;
    uint32_t *q = malloc(nw * 4);
    t->scales = malloc(ns * (size_t)dtype_bytes(sdt));
    t->biases = malloc(ns * (size_t)dtype_bytes(sdt));
    assert_true(q && t->scales && t->biases);
    for (size_t i = 0; i < nw; i++) q[i] = (uint32_t)rng_u64();
    const double qmax = (double)((1 << bits) - 1);
    for (size_t i = 0; i < ns; i++) {
        double s = rng_unif(0.5, 1.5) / qmax;
        put_float(t->scales, i, sdt, (float)s);
        put_float(t->biases, i, sdt, (float)(-s * qmax / 2 * rng_unif(0.8, 1.2)));
    }
    t->data = q;
    w->w = q;
    w->scales = t->scales;
    w->biases = t->biases;
}

/* Random dense weight [rows, cols] in dt. */
static void weight_dense(test_weight *t, int64_t rows, int64_t cols, sft_dtype dt) {
    memset(t, 0, sizeof *t);
    wt_linear *w = &t->w;
    w->dtype = dt;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = (size_t)cols * (size_t)dtype_bytes(dt);
    t->data = malloc((size_t)rows * w->row_bytes);
    assert_non_null(t->data);
    for (size_t i = 0; i < (size_t)(rows * cols); i++) put_float(t->data, i, dt, (float)rng_unif(-1, 1));
    w->w = t->data;
}

static void weight_free(test_weight *t) {
    free(t->data);
    free(t->scales);
    free(t->biases);
}

/* Weight (r, i) in double, straight from the stored format (cpu_mlx_q_get for quantized). */
static double weight_at(const wt_linear *w, int64_t r, int64_t i) {
    const char *row = (const char *)w->w + (size_t)r * w->row_bytes;
    if (!w->qbits) return get_float(row, (size_t)i, w->dtype);
    size_t gi = (size_t)r * w->srow_elems + (size_t)(i / w->group);
    double q = cpu_mlx_q_get((const uint32_t *)row, w->qbits, (size_t)i);
    return get_float(w->scales, gi, w->sdtype) * q + get_float(w->biases, gi, w->sdtype);
}

/* y[T, rows] and the error scale sum|w x| [T, rows], both in double. */
static void linear_naive(const wt_linear *w, const float *x, int T, double *y, double *mag) {
    for (int64_t r = 0; r < w->rows; r++)
        for (int t = 0; t < T; t++) {
            double s = 0, m = 0;
            for (int64_t i = 0; i < w->cols; i++) {
                double p = weight_at(w, r, i) * x[(size_t)t * w->cols + i];
                s += p;
                m += fabs(p);
            }
            y[(size_t)t * w->rows + r] = s;
            mag[(size_t)t * w->rows + r] = m;
        }
}

/* Max over outputs of |a - b| / mag; prints the worst one when it exceeds tol. */
static double rel_err(const float *a, const double *b, const double *mag, size_t n, double tol, const char *what) {
    double worst = 0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (mag[i] > 0 ? mag[i] : 1.0);
        if (!(e <= worst)) worst = e, wi = i; /* NaN counts as worst */
    }
    if (!(worst <= tol)) printf("  %s: output %zu: got %.9g want %.9g (scale %.3g): rel %.3g > %.1g\n", what, wi,
                                (double)a[wi], b[wi], mag[wi], worst, tol);
    return worst;
}

/* Max over outputs of |a - b| / bound (fails above 1); prints the worst one when it fails. */
static double bound_err(const float *a, const double *b, const double *bound, size_t n, const char *what) {
    double worst = 0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / bound[i];
        if (!(e <= worst)) worst = e, wi = i;
    }
    if (!(worst <= 1.0)) printf("  %s: output %zu: got %.9g want %.9g: error %.3g > bound %.3g\n", what, wi, (double)a[wi],
                                b[wi], fabs((double)a[wi] - b[wi]), bound[wi]);
    return worst;
}

/* The quantized-activation error bound of output (t, r): sum_i |s q_ri| * d_ti / 2 with
 * d_ti = max|x_t| / qmax over the blk-value block holding i (the int16 kernels round x_i / d to
 * the nearest integer and multiply only s * q by it; the bias term uses x itself), in
 * qb[T, rows]. centred (the int8 kernel, whose bias term uses the sum of the rounded x^ over
 * full units): sum_i |w_ri| * d_ti / 2. (blk, qmax): (32, 32767) int16 decode, (64, 32767)
 * int16 prefill GEMM, (32, 127) int8 decode. */
static void actq_bound(const wt_linear *w, const float *x, int T, int blk, int qmax, int centred, double *qb) {
    for (int t = 0; t < T; t++)
        for (int64_t r = 0; r < w->rows; r++) {
            double e = 0;
            for (int64_t b = 0; b < w->cols / blk; b++) {
                double amax = 0, sw = 0;
                for (int i = 0; i < blk; i++) {
                    double xv = fabs(x[(size_t)t * w->cols + b * blk + i]);
                    amax = xv > amax ? xv : amax;
                    double wb = 0; /* the bias of (r, i)'s group, 0 for dense weights */
                    if (w->qbits && !centred)
                        wb = get_float(w->biases, (size_t)r * w->srow_elems + (size_t)((b * blk + i) / w->group), w->sdtype);
                    sw += fabs(weight_at(w, r, b * blk + i) - wb);
                }
                e += sw * amax / qmax / 2;
            }
            qb[(size_t)t * w->rows + r] = e;
        }
}

/* The quantized-activation kernels' result in double: s*q of each weight in a full unit of U
 * values (U = 128, 64, 32 for 2-, 4-, 8-bit weights; 64 for the int8 4-bit kernel) multiplies x
 * quantized per blk-block exactly as documented in cpu_simd.c (float amax, q = lrintf(x *
 * (qmax_f / amax)), x^ = q * (amax / qmax_f)); the bias term b * sum(x) and values past the
 * last full unit use x itself, except with centred (int8), where the bias multiplies x^ too. */
static void actq_emulate(const wt_linear *w, const float *x, int T, int blk, int qmax, int centred, double *yq) {
    const int U = blk == 64 ? 64 : w->qbits == 2 ? 128 : w->qbits == 4 ? 64 : 32;
    const float qf = (float)qmax;
    const int64_t full = w->cols / U * U;
    double *xh = malloc((size_t)w->cols * sizeof(double));
    assert_non_null(xh);
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * w->cols;
        for (int64_t i = 0; i < w->cols; i++) xh[i] = xt[i];
        for (int64_t b = 0; b < full / blk; b++) {
            float amax = 0;
            for (int i = 0; i < blk; i++) amax = fabsf(xt[b * blk + i]) > amax ? fabsf(xt[b * blk + i]) : amax;
            const float id = amax > 0 ? qf / amax : 0.0f, d = amax / qf;
            for (int i = 0; i < blk; i++) xh[b * blk + i] = (double)lrintf(xt[b * blk + i] * id) * d;
        }
        for (int64_t r = 0; r < w->rows; r++) { /* s*q times x^, the bias times x itself */
            double acc = 0;
            const uint32_t *row = (const uint32_t *)(const void *)((const char *)w->w + (size_t)r * w->row_bytes);
            for (int64_t i = 0; i < w->cols; i++) {
                size_t gi = (size_t)r * w->srow_elems + (size_t)(i / w->group);
                acc += get_float(w->scales, gi, w->sdtype) * cpu_mlx_q_get(row, w->qbits, (size_t)i) * xh[i] +
                       get_float(w->biases, gi, w->sdtype) * (centred ? xh[i] : xt[i]);
            }
            yq[(size_t)t * w->rows + r] = acc;
        }
    }
    free(xh);
}

static float *rand_vec(size_t n, double lo, double hi) {
    float *v = malloc(n * sizeof(float));
    assert_non_null(v);
    for (size_t i = 0; i < n; i++) v[i] = (float)rng_unif(lo, hi);
    return v;
}

/* The fast-path ISAs this CPU can run (CPU_SIMD_AVX2, and CPU_SIMD_AVX512 where present). */
static int simd_levels(int *lv) {
    int n = 0, top = cpu_simd_level();
    if (top >= CPU_SIMD_AVX2) lv[n++] = CPU_SIMD_AVX2;
    if (top >= CPU_SIMD_AVX512) lv[n++] = CPU_SIMD_AVX512;
    return n;
}

static st_pool *g_pool; /* 2 threads, shared by all tests */

static int setup(void **state) {
    (void)state;
    g_pool = st_pool_init(2);
    return g_pool ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    st_pool_free(g_pool);
    return 0;
}

/* The rows token t of T shares a fast linear call with (cpu_linear_fast): its chunk of
 * max_batch rows, and within a chunk of up to max(4, mv_split) rows its balanced fused pass of
 * <= 4 rows; a larger chunk runs whole on the GEMM. */
static int token_chunk(int T, int t, int maxb, int mv_split) {
    const int c0 = t / maxb * maxb, c = T - c0 < maxb ? T - c0 : maxb;
    if (c > (mv_split > 4 ? mv_split : 4)) return c;
    const int np = (c + 3) / 4;
    for (int i = 0, u = 0; i < np; i++) {
        const int k = (c - u + (np - i) - 1) / (np - i);
        if (t - c0 < u + k) return k;
        u += k;
    }
    return c;
}

/* Checks one weight for every T in ts: reference vs naive (1e-6) and every fast ISA vs the
 * reference (1e-5), with max_batch 256 and 8 (the latter chunks T = 17 into 8 + 8 + 1), the
 * rows of a small chunk as fused passes of <= 4 (mv_split 8, the default) and on the GEMM
 * (mv_split 0). Returns the number of failed comparisons. */
static int check_linear(const wt_linear *w, const int *ts, int nts, const char *label) {
    int fails = 0, lv[2], nlv = simd_levels(lv);
    size_t cap = (size_t)w->cols;
    for (int k = 0; k < nts; k++) {
        const int T = ts[k];
        float *x = rand_vec((size_t)T * w->cols, -1, 1);
        size_t n = (size_t)T * w->rows;
        double *y = malloc(n * sizeof(double)), *mag = malloc(n * sizeof(double));
        float *ref = malloc(n * sizeof(float)), *fast = malloc(n * sizeof(float));
        assert_true(y && mag && ref && fast);
        linear_naive(w, x, T, y, mag);
        cpu_scratch se;
        assert_int_equal(cpu_scratch_init(&se, 2, cap, 256, 1), ST_OK);
        cpu_linear(g_pool, &se, ref, x, w, T);
        cpu_scratch_free(&se);
        char what[160];
        snprintf(what, sizeof what, "%s T=%d reference vs naive", label, T);
        fails += !(rel_err(ref, y, mag, n, 1e-6, what) <= 1e-6);
        /* per token, the bound and emulation of each activation quantization: [0] int16
         * 32-blocks (decode), [1] int16 64-blocks (prefill GEMM), [2] int8 32-blocks (decode) */
        static const int kblk[3] = {32, 64, 32}, kqmax[3] = {32767, 32767, 127};
        double *refd = malloc(n * sizeof(double)), *qb[3], *yq[3];
        double *bound = malloc(n * sizeof(double));
        assert_true(refd && bound);
        for (size_t i = 0; i < n; i++) refd[i] = ref[i];
        for (int k2 = 0; k2 < 3; k2++) {
            qb[k2] = malloc(n * sizeof(double));
            yq[k2] = malloc(n * sizeof(double));
            assert_true(qb[k2] && yq[k2]);
            actq_bound(w, x, T, kblk[k2], kqmax[k2], k2 == 2, qb[k2]);
            if (w->qbits) actq_emulate(w, x, T, kblk[k2], kqmax[k2], k2 == 2, yq[k2]);
        }
        for (int l = 0; l < nlv; l++)
            for (int mb = 0; mb < 4; mb++)
                for (int am = 2; am >= 0; am--) { /* activations: 2 int8 + int16, 1 int16 only, 0 float */
                    cpu_scratch sf;
                    assert_int_equal(cpu_scratch_init(&sf, 2, cap, mb & 1 ? 8 : 256, 0), ST_OK);
                    sf.mv_split = mb & 2 ? 0 : 8;
                    sf.simd = lv[l];
                    sf.actq = am >= 1;
                    sf.actq_gemm = am >= 1;
                    sf.actq8 = am == 2;
                    for (size_t i = 0; i < n; i++) fast[i] = NAN;
                    cpu_linear(mb & 1 ? NULL : g_pool, &sf, fast, x, w, T);
                    /* each token's chunk: T <= 4 directly, else chunks of max_batch and a last
                     * one of T % max_batch tokens; its quantization from cpu_simd_actq */
                    const int maxb = sf.max_batch;
                    int kind[64];
                    assert_true(T <= 64);
                    for (int t = 0; t < T; t++) {
                        int chunk = token_chunk(T, t, maxb, sf.mv_split), blk = 0;
                        int qmax = cpu_simd_actq(&sf, w, chunk, &blk);
                        kind[t] = !qmax ? -1 : qmax == 127 ? 2 : blk == 64 ? 1 : 0;
                        assert_true(qmax == 0 || (qmax == 127 && blk == 32) || (qmax == 32767 && (blk == 32 || blk == 64)));
                        if (am == 2 && w->qbits == 4 && chunk <= 4) assert_int_equal(kind[t], 2);
                        if (am == 0) assert_int_equal(kind[t], -1);
                        for (int64_t r = 0; r < w->rows; r++) {
                            size_t i = (size_t)t * w->rows + r;
                            bound[i] = 1e-5 * mag[i] + (kind[t] >= 0 ? qb[kind[t]][i] : 0.0);
                        }
                    }
                    cpu_scratch_free(&sf);
                    static const char *const am_name[3] = {"", ", int16 activations", ", int8/int16 activations"};
                    snprintf(what, sizeof what, "%s T=%d fast (%s, max_batch %d, mv_split %d%s) vs reference", label, T,
                             lv[l] == CPU_SIMD_AVX512 ? "avx512" : "avx2", mb & 1 ? 8 : 256, mb & 2 ? 0 : 8, am_name[am]);
                    fails += !(bound_err(fast, refd, bound, n, what) <= 1.0);
                    for (int t = 0; t < T; t++) { /* quantized tokens also against the emulation, at float tolerance */
                        if (kind[t] < 0) continue;
                        static const char *const kn[3] = {"int16, decode 32-blocks", "int16, prefill 64-blocks",
                                                          "int8, 32-blocks"};
                        snprintf(what, sizeof what, "%s T=%d token %d fast (%s, max_batch %d, mv_split %d) vs emulation (%s)", label,
                                 T, t, lv[l] == CPU_SIMD_AVX512 ? "avx512" : "avx2", mb & 1 ? 8 : 256, mb & 2 ? 0 : 8,
                                 kn[kind[t]]);
                        size_t o = (size_t)t * w->rows;
                        fails += !(rel_err(fast + o, yq[kind[t]] + o, mag + o, (size_t)w->rows, 1e-5, what) <= 1e-5);
                    }
                }
        for (int k2 = 0; k2 < 3; k2++) free(qb[k2]), free(yq[k2]);
        free(bound);
        free(refd);
        free(x);
        free(y);
        free(mag);
        free(ref);
        free(fast);
    }
    return fails;
}

// ----------------------------------------------------------------------------
// tests

/* The bit reader itself against a bit-by-bit decode of the LSB-first stream. */
static void test_mlx_q_get(void **state) {
    (void)state;
    uint32_t row[15];
    for (int i = 0; i < 15; i++) row[i] = (uint32_t)rng_u64();
    const int widths[] = {2, 3, 4, 5, 6, 8};
    for (int wi = 0; wi < 6; wi++) {
        int bits = widths[wi];
        for (size_t v = 0; v < 15 * 32 / (size_t)bits; v++) {
            uint32_t want = 0;
            for (int b = 0; b < bits; b++) {
                size_t bit = v * (size_t)bits + (size_t)b;
                want |= ((row[bit / 32] >> (bit % 32)) & 1u) << b;
            }
            assert_int_equal(cpu_mlx_q_get(row, bits, v), want);
        }
    }
}

/* Every MLX width x group x scale dtype, odd row counts, column counts with and without a
 * partial decode block, T = 1..5 and 17 (decode kernels for 1..4, GEMM above). */
static void test_linear_quant(void **state) {
    (void)state;
    const int widths[] = {2, 3, 4, 5, 6, 8}, groups[] = {32, 64, 128};
    const sft_dtype sdts[] = {SFT_BF16, SFT_F16, SFT_F32};
    /* 7: batched decode, fused passes of 4 + 3; 12: the GEMM (max_batch 256), or chunks of 8 + 4
     * as fused passes (max_batch 8) */
    const int ts[] = {1, 2, 3, 4, 5, 17, 7, 12};
    int fails = 0, cases = 0;
    for (int bi = 0; bi < 6; bi++)
        for (int gi = 0; gi < 3; gi++)
            for (int si = 0; si < 3; si++) {
                const int g = groups[gi];
                /* 5 groups: 160/320/640 columns -> a 32-value tail for 8-value packs at group 32
                 * (two in the 16-lane layout); rows 37 is not a multiple of 4, 16 or 6 */
                const int64_t shapes[2][2] = {{37, 5 * (int64_t)g}, {3, 1024}};
                for (int sh = 0; sh < 2; sh++) {
                    test_weight t;
                    weight_quant(&t, shapes[sh][0], shapes[sh][1], widths[bi], g, sdts[si]);
                    char label[96];
                    snprintf(label, sizeof label, "q%dg%d %s [%lld x %lld]", widths[bi], g, sft_dtype_name(sdts[si]),
                             (long long)t.w.rows, (long long)t.w.cols);
                    fails += check_linear(&t.w, ts, sh == 0 ? 8 : 2, label);
                    cases++;
                    weight_free(&t);
                }
            }
    printf("  %d quantized weights checked, %d failures\n", cases, fails);
    assert_int_equal(fails, 0);
}

/* bf16 / f16 / f32 weights with column counts that exercise every tail. */
static void test_linear_dense(void **state) {
    (void)state;
    const sft_dtype dts[] = {SFT_BF16, SFT_F16, SFT_F32};
    const int64_t shapes[][2] = {{1, 1}, {5, 7}, {17, 16}, {37, 100}, {19, 1024}, {3, 1061}};
    const int ts[] = {1, 2, 3, 4, 5, 17};
    int fails = 0;
    for (int di = 0; di < 3; di++)
        for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
            test_weight t;
            weight_dense(&t, shapes[sh][0], shapes[sh][1], dts[di]);
            char label[96];
            snprintf(label, sizeof label, "%s [%lld x %lld]", sft_dtype_name(dts[di]), (long long)t.w.rows,
                     (long long)t.w.cols);
            fails += check_linear(&t.w, ts, 6, label);
            weight_free(&t);
        }
    assert_int_equal(fails, 0);
}

/* Larger T through the GEMM with several tiles and panels, at the qwen3 hidden width. */
static void test_linear_prefill_shape(void **state) {
    (void)state;
    const int ts[] = {64};
    test_weight t;
    weight_quant(&t, 50, 1024, 4, 64, SFT_BF16);
    int fails = check_linear(&t.w, ts, 1, "q4g64 prefill [50 x 1024]");
    weight_free(&t);
    weight_quant(&t, 50, 1024, 4, 32, SFT_F16); /* the int8 GEMM with one scale per 32-block */
    fails += check_linear(&t.w, ts, 1, "q4g32 prefill [50 x 1024]");
    weight_free(&t);
    weight_dense(&t, 40, 512, SFT_BF16);
    fails += check_linear(&t.w, ts, 1, "bf16 prefill [40 x 512]");
    weight_free(&t);
    assert_int_equal(fails, 0);
}

/* The int8 4-bit decode kernel's integer part, bit for bit: cpu_simd_q8_prep against a scalar
 * quantizer (per 32-block: float amax, id = 127f / amax, q = lrintf(x * id), d = amax / 127f;
 * stored evens then odds per 64-value unit; group sums of x^ = d * sum q in block order, the
 * bias term's input) and cpu_simd_q4i8_sums against int32 sums of
 * code * q over each 8-value lane. Random rows and activations (with zero blocks and exact
 * ties q + 0.5 among them), plus the saturation extremes: every code 15 against q = +-127
 * (|lane| = 8 * 15 * 127 = 15240, the int16 pair sums 7620 before vpmaddwd). */
static void test_q4i8_exact(void **state) {
    (void)state;
    if (cpu_simd_level() < CPU_SIMD_AVX2) skip();
    const int64_t cols = 1024 + 64 * 3, nu = cols / 64;
    float *x = malloc((size_t)cols * sizeof(float));
    int8_t *xq = malloc((size_t)cols), *want = malloc((size_t)cols);
    float *dl = malloc((size_t)nu * 8 * sizeof(float)), *dwant = malloc((size_t)nu * 8 * sizeof(float));
    uint8_t *row = malloc((size_t)cols / 2);
    int32_t *sums = malloc((size_t)nu * 8 * sizeof(int32_t));
    assert_true(x && xq && want && dl && dwant && row && sums);
    for (int rep = 0; rep < 6; rep++) {
        for (int64_t i = 0; i < cols; i++) x[i] = (float)rng_unif(-2, 2) * (rep == 1 ? 1e-20f : rep == 2 ? 1e20f : 1.0f);
        for (int64_t i = 0; i < cols / 2; i++) row[i] = (uint8_t)rng_u64();
        if (rep == 3) /* block 1 all zero; block 2 with amax 127 so x = k + 0.5 are exact ties */
            for (int i = 0; i < 32; i++) x[32 + i] = 0.0f, x[64 + i] = i == 0 ? 127.0f : (float)(i - 16) + 0.5f;
        if (rep >= 4) /* extremes: all codes 15 against +amax (rep 4) or -amax (rep 5) */
            for (int64_t i = 0; i < cols; i++) x[i] = rep == 4 ? 3.0f : -3.0f, row[i / 2] = 0xFF;
        for (int64_t u = 0; u < nu; u++)
            for (int h = 0; h < 2; h++) {
                const float *xb = x + 64 * u + 32 * h;
                float amax = 0;
                for (int i = 0; i < 32; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
                const float id = amax > 0 ? 127.0f / amax : 0.0f;
                for (int i = 0; i < 32; i++) {
                    const long q = lrintf(xb[i] * id);
                    assert_true(q >= -127 && q <= 127);
                    const int v = 32 * h + i; /* value index within the unit */
                    want[64 * u + (v & 1) * 32 + v / 2] = (int8_t)q;
                }
                for (int k = 0; k < 4; k++) dwant[8 * u + 4 * h + k] = amax / 127.0f;
            }
        memset(xq, 0x55, (size_t)cols);
        const int g = rep % 2 ? 64 : 32, ng = (int)(cols / g);
        float xs[64], xswant[64];
        assert_true(ng <= 64);
        for (int gi = 0; gi < ng; gi++) { /* sum of x^ per group: d * sum q per 32-block, in order */
            xswant[gi] = 0;
            for (int b = gi * g / 32; b < (gi + 1) * g / 32; b++) {
                int32_t qs = 0;
                for (int i = 0; i < 32; i++) qs += want[64 * (b / 2) + (b % 2) * 16 + (i & 1) * 32 + i / 2];
                xswant[gi] += dwant[8 * (b / 2) + 4 * (b % 2)] * (float)qs;
            }
        }
        cpu_simd_q8_prep(x, cols, xq, dl, xs, g);
        if (memcmp(xs, xswant, (size_t)ng * sizeof(float))) fail_msg("rep %d: q8_prep sums of x^ (group %d) differ", rep, g);
        for (int64_t i = 0; i < cols; i++)
            if (xq[i] != want[i]) fail_msg("rep %d: q8_prep byte %lld = %d, want %d", rep, (long long)i, xq[i], want[i]);
        if (memcmp(dl, dwant, (size_t)nu * 8 * sizeof(float))) fail_msg("rep %d: q8_prep scales differ", rep);
        cpu_simd_q4i8_sums(row, xq, nu, sums);
        for (int64_t u = 0; u < nu; u++)
            for (int k = 0; k < 8; k++) {
                int32_t e = 0;
                for (int v = 8 * k; v < 8 * k + 8; v++) { /* value v of the unit: byte v/2, nibble v&1 */
                    const int code = (row[32 * u + v / 2] >> (4 * (v & 1))) & 15;
                    e += code * want[64 * u + (v & 1) * 32 + v / 2];
                }
                if (rep == 4) assert_int_equal(e, 15240);
                if (rep == 5) assert_int_equal(e, -15240);
                if (sums[8 * u + k] != e)
                    fail_msg("rep %d: unit %lld lane %d: sum %d, want %d", rep, (long long)u, k, sums[8 * u + k], e);
            }
    }
    free(x), free(xq), free(want), free(dl), free(dwant), free(row), free(sums);
}

/* Naive causal attention in double: out[t, h] = softmax(q.k * scale) v over 0..pos[t]. */
static void attention_naive(const float *q, const float *const *kp, const float *const *vp, const int32_t *pos, int T,
                            int H, int Hkv, int hd, float scale, double *out) {
    const int kvw = Hkv * hd;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const int kvh = h / (H / Hkv), n = pos[t] + 1;
            const float *qv = q + ((size_t)t * H + h) * hd;
            double *s = malloc((size_t)n * sizeof(double)), mx = -INFINITY, sum = 0;
            assert_non_null(s);
            for (int p = 0; p < n; p++) {
                double d = 0;
                for (int i = 0; i < hd; i++) d += (double)qv[i] * kp[t][(size_t)p * kvw + (size_t)kvh * hd + i];
                s[p] = d * scale;
                if (s[p] > mx) mx = s[p];
            }
            for (int p = 0; p < n; p++) sum += s[p] = exp(s[p] - mx);
            double *o = out + ((size_t)t * H + h) * hd;
            for (int i = 0; i < hd; i++) {
                double a = 0;
                for (int p = 0; p < n; p++) a += s[p] / sum * vp[t][(size_t)p * kvw + (size_t)kvh * hd + i];
                o[i] = a;
            }
            free(s);
        }
}

/* Reference and fast attention against the double computation: GQA ratios 1, 2, 3, 6, 7 (the
 * fast kernel takes query heads up to 4 at a time: 6 = 4 + 2, 7 = 4 + 3), head dims 8..128
 * (48 and 40 leave 8-wide remainders after the 16/32-wide output chunks), contexts 1..76. */
static void test_attention(void **state) {
    (void)state;
    const int cfg[][3] = {{4, 4, 8}, {4, 2, 64}, {12, 2, 128}, {16, 8, 128}, {6, 2, 48}, {7, 1, 40}}; /* H, Hkv, hd */
    const int lens[] = {1, 2, 5, 17};
    int lv[2], nlv = simd_levels(lv), fails = 0;
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++)
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            const int H = cfg[ci][0], Hkv = cfg[ci][1], hd = cfg[ci][2], T = lens[li], ctx = 80;
            const float scale = 1.0f / sqrtf((float)hd);
            float *q = rand_vec((size_t)T * H * hd, -2, 2);
            float *kc = rand_vec((size_t)2 * ctx * Hkv * hd, -2, 2), *vc = rand_vec((size_t)2 * ctx * Hkv * hd, -1, 1);
            const float *kp[17], *vp[17];
            int32_t pos[17];
            for (int t = 0; t < T; t++) { /* alternate slots, positions up to 75 */
                int slot = t & 1;
                kp[t] = kc + (size_t)slot * ctx * Hkv * hd;
                vp[t] = vc + (size_t)slot * ctx * Hkv * hd;
                pos[t] = (int32_t)((t * 37 + 3 * li) % 76);
            }
            size_t n = (size_t)T * H * hd;
            double *want = malloc(n * sizeof(double)), *one = malloc(n * sizeof(double));
            float *got = malloc(n * sizeof(float));
            assert_true(want && one && got);
            for (size_t i = 0; i < n; i++) one[i] = 1.0; /* |out| <= max|v| = 1: absolute bound */
            attention_naive(q, kp, vp, pos, T, H, Hkv, hd, scale, want);
            for (int l = -1; l < nlv; l++) {
                cpu_scratch s;
                assert_int_equal(cpu_scratch_init(&s, 2, ctx, 64, l < 0), ST_OK);
                if (l >= 0) s.simd = lv[l];
                cpu_attention(g_pool, &s, got, q, kp, vp, pos, T, H, Hkv, hd, scale);
                cpu_scratch_free(&s);
                char what[128];
                snprintf(what, sizeof what, "attention H=%d Hkv=%d hd=%d T=%d %s", H, Hkv, hd, T,
                         l < 0 ? "reference" : lv[l] == CPU_SIMD_AVX512 ? "fast/avx512" : "fast/avx2");
                fails += !(rel_err(got, want, one, n, 1e-5, what) <= 1e-5);
            }
            free(q);
            free(kc);
            free(vc);
            free(want);
            free(one);
            free(got);
        }
    assert_int_equal(fails, 0);
}

/* Rounds x[n] to float16 with cpu_kv_store_f16 into h and widens it back into w (exactly):
 * the values a float16 cache holds. */
static void kv_to_f16(const cpu_scratch *s, const float *x, uint16_t *h, float *w, size_t n) {
    cpu_kv_store_f16(s, h, x, (int64_t)n);
    for (size_t i = 0; i < n; i++) w[i] = st_f16_to_f32(h[i]);
}

/* One attention call's rows for batch_invariance: float32 K/V (kf, vf) or, with kh set, float16. */
typedef struct attn_rows {
    cpu_scratch *s;
    const float *q;              /* [T, H * hd] */
    const float *const *kf, *const *vf;
    const uint16_t *const *kh, *const *vh;
    const int32_t *pos;
    int H, Hkv, hd;
    float scale;
} attn_rows;

/* Batch invariance of the decode attention: each token t of a T > 1 call (output `got`) run
 * alone (serially for odd t, on the pool for even t) must give bit-identical rows. Returns the
 * number of tokens that differ (printed); `alone` holds H * hd floats. */
static int batch_invariance(const char *what, const attn_rows *a, int T, const float *got, float *alone) {
    const size_t row = (size_t)a->H * a->hd;
    int fails = 0;
    for (int t = 0; t < T && T > 1; t++) {
        st_pool *pool = t & 1 ? NULL : g_pool;
        if (a->kh)
            cpu_attention_f16(pool, a->s, alone, a->q + (size_t)t * row, &a->kh[t], &a->vh[t], &a->pos[t], 1, a->H, a->Hkv,
                              a->hd, a->scale);
        else
            cpu_attention(pool, a->s, alone, a->q + (size_t)t * row, &a->kf[t], &a->vf[t], &a->pos[t], 1, a->H, a->Hkv, a->hd,
                          a->scale);
        if (memcmp(alone, got + (size_t)t * row, row * sizeof(float))) {
            print_message("%s: token %d alone differs from the batch\n", what, t);
            fails++;
        }
    }
    return fails;
}

/* The float16 KV cache of the fast path: cpu_kv_store_f16 rounds as the scalar st_f32_to_f16
 * (nearest even) for every finite float16 value, clamps beyond +-65504 instead of producing
 * inf and keeps NaN; cpu_attention_f16 (prefill tokens sharing a slot, alternating slots, and
 * split-K decode at 0..2100 positions with exactly sized buffers) equals the double
 * computation on the widened float16 values within 1e-5, and a decode token's result does not
 * depend on the other tokens of its batch. */
static void test_attention_f16(void **state) {
    (void)state;
    if (cpu_simd_level() < CPU_SIMD_AVX2) skip();
    int lv[2], nlv = simd_levels(lv), fails = 0;
    { /* the store */
        cpu_scratch s;
        assert_int_equal(cpu_scratch_init(&s, 1, 64, 4, 0), ST_OK);
        assert_true(cpu_kv_f16_ok(&s, 128) && !cpu_kv_f16_ok(&s, 36));
        enum { N = 4099 };
        float *x = malloc(N * sizeof(float));
        uint16_t *h = malloc(N * sizeof(uint16_t));
        assert_true(x && h);
        for (int i = 0; i < N; i++) { /* magnitudes 2^-30 .. 2^20, some exact ties of float16 */
            const double e = -30.0 + 50.0 * rng_unif(0, 1);
            x[i] = (float)(ldexp(1.0, (int)e) * rng_unif(-2, 2));
            if (i % 7 == 0) x[i] = (float)ldexp(1.0 + (2 * (i % 64) + 1) / 2048.0, i % 10); /* halfway between float16s */
        }
        x[1] = 65504.0f, x[2] = -65519.0f, x[3] = 65520.0f, x[4] = -1e30f, x[5] = NAN, x[6] = 0.0f, x[8] = -0.0f;
        cpu_kv_store_f16(&s, h, x, N);
        for (int i = 0; i < N; i++) {
            uint16_t want;
            if (isnan(x[i])) {
                if ((h[i] & 0x7c00) != 0x7c00 || !(h[i] & 0x3ff)) print_message("f16 store: NaN at %d became 0x%04x\n", i, h[i]), fails++;
                continue;
            }
            want = fabsf(x[i]) > 65504.0f ? (uint16_t)(x[i] < 0 ? 0xfbff : 0x7bff) : st_f32_to_f16(x[i]);
            if (h[i] != want) {
                print_message("f16 store: x[%d] = %a -> 0x%04x, want 0x%04x\n", i, (double)x[i], h[i], want);
                fails++;
            }
        }
        free(x);
        free(h);
        cpu_scratch_free(&s);
    }
    const int cfg[][3] = {{16, 8, 128}, {12, 2, 128}, {7, 1, 40}, {4, 4, 8}}; /* H, Hkv, hd */
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        const int H = cfg[ci][0], Hkv = cfg[ci][1], hd = cfg[ci][2], kvw = Hkv * hd;
        const float scale = 1.0f / sqrtf((float)hd);
        /* prefill: T = 5 (alternating slots) and 17 (one slot, consecutive positions) */
        for (int T = 5; T <= 17; T += 12) {
            const int ctx = 80;
            float *q = rand_vec((size_t)T * H * hd, -2, 2);
            float *k32 = rand_vec((size_t)2 * ctx * kvw, -2, 2), *v32 = rand_vec((size_t)2 * ctx * kvw, -1, 1);
            float *kw = malloc((size_t)2 * ctx * kvw * sizeof(float)), *vw = malloc((size_t)2 * ctx * kvw * sizeof(float));
            uint16_t *kh = malloc((size_t)2 * ctx * kvw * 2), *vh = malloc((size_t)2 * ctx * kvw * 2);
            const size_t n = (size_t)T * H * hd;
            double *want = malloc(n * sizeof(double)), *one = malloc(n * sizeof(double));
            float *got = malloc(n * sizeof(float));
            assert_true(kw && vw && kh && vh && want && one && got);
            const float *kp[17], *vp[17];
            const uint16_t *khp[17], *vhp[17];
            int32_t pos[17];
            for (int l = 0; l < nlv; l++) {
                cpu_scratch s;
                assert_int_equal(cpu_scratch_init(&s, 2, ctx, 64, 0), ST_OK);
                s.simd = lv[l];
                kv_to_f16(&s, k32, kh, kw, (size_t)2 * ctx * kvw);
                kv_to_f16(&s, v32, vh, vw, (size_t)2 * ctx * kvw);
                for (int t = 0; t < T; t++) {
                    const int slot = T == 5 ? t & 1 : 0;
                    kp[t] = kw + (size_t)slot * ctx * kvw, vp[t] = vw + (size_t)slot * ctx * kvw;
                    khp[t] = kh + (size_t)slot * ctx * kvw, vhp[t] = vh + (size_t)slot * ctx * kvw;
                    pos[t] = T == 5 ? (int32_t)((t * 37 + 11) % 76) : (int32_t)(40 + t);
                }
                for (size_t i = 0; i < n; i++) one[i] = 1.0;
                attention_naive(q, kp, vp, pos, T, H, Hkv, hd, scale, want);
                cpu_attention_f16(g_pool, &s, got, q, khp, vhp, pos, T, H, Hkv, hd, scale);
                char what[128];
                snprintf(what, sizeof what, "f16 attention H=%d Hkv=%d hd=%d T=%d %s", H, Hkv, hd, T,
                         lv[l] == CPU_SIMD_AVX512 ? "avx512" : "avx2");
                fails += !(rel_err(got, want, one, n, 1e-5, what) <= 1e-5);
                cpu_scratch_free(&s);
            }
            free(q), free(k32), free(v32), free(kw), free(vw), free(kh), free(vh), free(want), free(one), free(got);
        }
        /* decode: split-K, each token's cache exactly pos + 1 rows */
        const int32_t plist[] = {0, 31, 64, 200, 1100, 2100};
        for (int T = 1; T <= 4; T++) {
            int32_t pos[4], maxp = 0;
            float *kw[4], *vw[4];
            uint16_t *kb[4], *vb[4];
            const float *kp[4], *vp[4];
            const uint16_t *khp[4], *vhp[4];
            cpu_scratch s;
            for (int t = 0; t < T; t++) maxp = plist[(ci + 2 * (size_t)t + (size_t)T) % 6] > maxp ? plist[(ci + 2 * (size_t)t + (size_t)T) % 6] : maxp;
            const size_t cap = (size_t)(maxp + 1) > (size_t)H * hd ? (size_t)(maxp + 1) : (size_t)H * hd;
            assert_int_equal(cpu_scratch_init(&s, 2, cap, 64, 0), ST_OK);
            for (int t = 0; t < T; t++) {
                pos[t] = plist[(ci + 2 * (size_t)t + (size_t)T) % 6];
                const size_t nr = (size_t)(pos[t] + 1) * kvw;
                float *k32 = rand_vec(nr, -2, 2), *v32 = rand_vec(nr, -1, 1);
                kw[t] = malloc(nr * sizeof(float)), vw[t] = malloc(nr * sizeof(float));
                kb[t] = malloc(nr * 2), vb[t] = malloc(nr * 2);
                assert_true(kw[t] && vw[t] && kb[t] && vb[t]);
                kv_to_f16(&s, k32, kb[t], kw[t], nr);
                kv_to_f16(&s, v32, vb[t], vw[t], nr);
                free(k32), free(v32);
                kp[t] = kw[t], vp[t] = vw[t], khp[t] = kb[t], vhp[t] = vb[t];
            }
            float *q = rand_vec((size_t)T * H * hd, -2, 2);
            const size_t n = (size_t)T * H * hd;
            double *want = malloc(n * sizeof(double)), *one = malloc(n * sizeof(double));
            float *got = malloc(n * sizeof(float)), *alone = malloc((size_t)H * hd * sizeof(float));
            assert_true(want && one && got && alone);
            for (size_t i = 0; i < n; i++) one[i] = 1.0;
            attention_naive(q, kp, vp, pos, T, H, Hkv, hd, scale, want);
            for (int l = 0; l < nlv; l++) {
                s.simd = lv[l];
                cpu_attention_f16(g_pool, &s, got, q, khp, vhp, pos, T, H, Hkv, hd, scale);
                char what[160];
                snprintf(what, sizeof what, "f16 decode attention H=%d Hkv=%d hd=%d T=%d pos[0]=%d %s", H, Hkv, hd, T, pos[0],
                         lv[l] == CPU_SIMD_AVX512 ? "avx512" : "avx2");
                fails += !(rel_err(got, want, one, n, 1e-5, what) <= 1e-5);
                attn_rows a = {&s, q, NULL, NULL, khp, vhp, pos, H, Hkv, hd, scale};
                fails += batch_invariance(what, &a, T, got, alone);
            }
            cpu_scratch_free(&s);
            for (int t = 0; t < T; t++) free(kw[t]), free(vw[t]), free(kb[t]), free(vb[t]);
            free(q), free(want), free(one), free(got), free(alone);
        }
    }
    assert_int_equal(fails, 0);
}

/* The split-K decode attention (T <= 4 per call, T = 5..8 as balanced calls of it: batched
 * decode; chunks of >= 32 positions, up to 16 per token, online softmax over 64-position
 * sub-blocks): against the double computation at contexts that give one chunk, several, and
 * chunks of several sub-blocks, with each token's K/V in a buffer of exactly pos + 1 rows
 * (AddressSanitizer catches a read past the last visible position); and batch invariance:
 * every token of a T = 2..8 call bit-identical to the same token alone. */
static void test_attention_decode(void **state) {
    (void)state;
    if (cpu_simd_level() < CPU_SIMD_AVX2) skip();
    const int cfg[][3] = {{16, 8, 128}, {12, 2, 128}, {7, 1, 40}, {6, 2, 48}, {4, 4, 8}}; /* H, Hkv, hd */
    const int32_t plist[] = {0, 1, 30, 31, 32, 63, 64, 65, 200, 512, 1100, 2100};
    const int np = (int)(sizeof plist / sizeof plist[0]);
    int lv[2], nlv = simd_levels(lv), fails = 0;
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++)
        for (int k = 0; k < np; k += 2)
            for (int T = 1; T <= 8; T++) {
                const int H = cfg[ci][0], Hkv = cfg[ci][1], hd = cfg[ci][2], kvw = Hkv * hd;
                const float scale = 1.0f / sqrtf((float)hd);
                int32_t pos[8];
                float *kb[8], *vb[8];
                const float *kp[8], *vp[8];
                int32_t maxp = 0;
                for (int t = 0; t < T; t++) {
                    pos[t] = plist[(k + 5 * t) % np];
                    maxp = pos[t] > maxp ? pos[t] : maxp;
                    kb[t] = rand_vec((size_t)(pos[t] + 1) * kvw, -2, 2);
                    vb[t] = rand_vec((size_t)(pos[t] + 1) * kvw, -1, 1);
                    kp[t] = kb[t], vp[t] = vb[t];
                }
                float *q = rand_vec((size_t)T * H * hd, -2, 2);
                const size_t n = (size_t)T * H * hd, cap = (size_t)(maxp + 1) > (size_t)H * hd ? (size_t)(maxp + 1) : (size_t)H * hd;
                double *want = malloc(n * sizeof(double)), *one = malloc(n * sizeof(double));
                float *got = malloc(n * sizeof(float)), *alone = malloc((size_t)H * hd * sizeof(float));
                assert_true(want && one && got && alone);
                for (size_t i = 0; i < n; i++) one[i] = 1.0;
                attention_naive(q, kp, vp, pos, T, H, Hkv, hd, scale, want);
                for (int l = 0; l < nlv; l++) {
                    cpu_scratch s;
                    assert_int_equal(cpu_scratch_init(&s, 2, cap, 64, 0), ST_OK);
                    s.simd = lv[l];
                    assert_non_null(s.ap);
                    cpu_attention(g_pool, &s, got, q, kp, vp, pos, T, H, Hkv, hd, scale);
                    char what[160];
                    snprintf(what, sizeof what, "decode attention H=%d Hkv=%d hd=%d T=%d pos[0]=%d %s", H, Hkv, hd, T, pos[0],
                             lv[l] == CPU_SIMD_AVX512 ? "avx512" : "avx2");
                    fails += !(rel_err(got, want, one, n, 1e-5, what) <= 1e-5);
                    attn_rows a = {&s, q, kp, vp, NULL, NULL, pos, H, Hkv, hd, scale};
                    fails += batch_invariance(what, &a, T, got, alone);
                    cpu_scratch_free(&s);
                }
                for (int t = 0; t < T; t++) free(kb[t]), free(vb[t]);
                free(q);
                free(want);
                free(one);
                free(got);
                free(alone);
            }
    assert_int_equal(fails, 0);
}

/* cpu_rmsnorm_s / cpu_rope_s on the fast path against the reference ops: RMSNorm within 1e-6
 * relative per element (only the double sum of squares is reordered), serial and split over the
 * pool, in place and not; RoPE bit-identical, with rotary halves that leave scalar tails
 * (n_rot 20 of head_dim 24) and full ones. */
static void test_norm_rope(void **state) {
    (void)state;
    if (cpu_simd_level() < CPU_SIMD_AVX2) skip();
    cpu_scratch s;
    assert_int_equal(cpu_scratch_init(&s, 2, 64, 8, 0), ST_OK);
    const int shapes[][2] = {{1, 1024}, {3, 37}, {300, 128}, {40, 1000}, {7, 8}}; /* rows, n */
    int fails = 0;
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        const int R = shapes[k][0], n = shapes[k][1];
        float *x = rand_vec((size_t)R * n, -3, 3), *w = rand_vec((size_t)n, 0.5, 1.5);
        float *a = malloc((size_t)R * n * sizeof(float)), *b = malloc((size_t)R * n * sizeof(float));
        assert_true(a && b);
        cpu_rmsnorm(a, x, w, R, n, 1e-6f);
        for (int inplace = 0; inplace < 2; inplace++) {
            if (inplace) memcpy(b, x, (size_t)R * n * sizeof(float));
            cpu_rmsnorm_s(g_pool, &s, b, inplace ? b : x, w, R, n, 1e-6f);
            for (size_t i = 0; i < (size_t)R * n; i++)
                if (!(fabs((double)a[i] - b[i]) <= 1e-6 * fabs(a[i]) + 1e-30)) {
                    print_message("rmsnorm %d x %d%s: element %zu fast %.9g reference %.9g\n", R, n, inplace ? " in place" : "", i,
                                  b[i], a[i]);
                    fails++;
                    break;
                }
        }
        free(x), free(w), free(a), free(b);
    }
    const int rope[][4] = {{5, 3, 24, 20}, {4, 16, 128, 128}, {2, 2, 64, 32}}; /* T, heads, head_dim, n_rot */
    for (size_t k = 0; k < sizeof rope / sizeof rope[0]; k++) {
        const int T = rope[k][0], H = rope[k][1], hd = rope[k][2], nr = rope[k][3];
        float *cs = rand_vec((size_t)T * nr, -1, 1), *a = rand_vec((size_t)T * H * hd, -2, 2);
        float *b = malloc((size_t)T * H * hd * sizeof(float));
        assert_non_null(b);
        memcpy(b, a, (size_t)T * H * hd * sizeof(float));
        cpu_rope(a, cs, T, H, hd, nr);
        cpu_rope_s(&s, b, cs, T, H, hd, nr);
        if (memcmp(a, b, (size_t)T * H * hd * sizeof(float))) {
            print_message("rope T=%d H=%d hd=%d n_rot=%d: fast differs from the reference\n", T, H, hd, nr);
            fails++;
        }
        free(cs), free(a), free(b);
    }
    cpu_scratch_free(&s);
    assert_int_equal(fails, 0);
}

/* Vectorised SwiGLU against the reference op, relative 1e-5 (absolute 1e-30 near 0), and
 * cpu_swiglu_s choosing between them by the scratch's exact flag. */
static void test_swiglu(void **state) {
    (void)state;
    if (cpu_simd_level() < CPU_SIMD_AVX2) skip();
    const int64_t n = 4099;
    float *g = rand_vec((size_t)n, -30, 30), *u = rand_vec((size_t)n, -3, 3);
    g[0] = 0, g[1] = -100, g[2] = 100, g[3] = -87.5f, g[4] = 1e-20f;
    float *a = malloc((size_t)n * sizeof(float)), *b = malloc((size_t)n * sizeof(float));
    assert_true(a && b);
    cpu_swiglu(a, g, u, n);
    cpu_swiglu_fast(b, g, u, n);
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= 1e-5 * fabs(a[i]) + 1e-30)) fail_msg("swiglu(%g, %g): fast %.9g, reference %.9g", g[i], u[i], b[i], a[i]);
    }
    /* the scratch-dispatched op: bit-identical to the reference when exact, to the fast one otherwise */
    float *c = malloc((size_t)n * sizeof(float));
    assert_non_null(c);
    for (int exact = 0; exact < 2; exact++) {
        cpu_scratch s;
        assert_int_equal(cpu_scratch_init(&s, 1, 64, 8, exact), ST_OK);
        cpu_swiglu_s(&s, c, g, u, n);
        assert_memory_equal(c, exact ? a : b, (size_t)n * sizeof(float));
        cpu_scratch_free(&s);
    }
    free(c);
    free(g);
    free(u);
    free(a);
    free(b);
}

/* cpu_swiglu_p / cpu_add_p (split over the pool above 32768 values): bit-identical to the
 * serial ops at sizes below, at and above the threshold (with a tail that is not a multiple
 * of 8), in place (out == gate) as forward.c calls them, on both paths. */
static void test_elementwise_pool(void **state) {
    (void)state;
    const int64_t sizes[] = {3072, 32768, 3 * 32768 + 13, 256 * 3072 + 5};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const int64_t n = sizes[si];
        float *g = rand_vec((size_t)n, -30, 30), *u = rand_vec((size_t)n, -3, 3);
        float *want = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
        assert_true(want && got);
        for (int exact = 0; exact < 2; exact++) {
            cpu_scratch s;
            assert_int_equal(cpu_scratch_init(&s, 2, 64, 8, exact), ST_OK);
            cpu_swiglu_s(&s, want, g, u, n);
            memcpy(got, g, (size_t)n * sizeof(float));
            cpu_swiglu_p(g_pool, &s, got, got, u, n);
            if (memcmp(got, want, (size_t)n * sizeof(float))) fail_msg("cpu_swiglu_p n=%lld exact=%d differs from serial", (long long)n, exact);
            cpu_scratch_free(&s);
        }
        memcpy(want, g, (size_t)n * sizeof(float));
        cpu_add(want, u, n);
        memcpy(got, g, (size_t)n * sizeof(float));
        cpu_add_p(g_pool, got, u, n);
        if (memcmp(got, want, (size_t)n * sizeof(float))) fail_msg("cpu_add_p n=%lld differs from serial", (long long)n);
        free(g), free(u), free(want), free(got);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mlx_q_get),
        cmocka_unit_test(test_linear_quant),
        cmocka_unit_test(test_linear_dense),
        cmocka_unit_test(test_linear_prefill_shape),
        cmocka_unit_test(test_q4i8_exact),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_decode),
        cmocka_unit_test(test_attention_f16),
        cmocka_unit_test(test_norm_rope),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_elementwise_pool),
    };
    printf("cpu_simd_level: %d\n", cpu_simd_level());
    return cmocka_run_group_tests(tests, setup, teardown);
}
