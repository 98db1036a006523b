/* cmd_cuda_parity.c — `strata cuda-parity`: every CUDA op against the CPU reference op
 * (src/backend/cpu/cpu_ops.c) on fresh random inputs over dtypes, MLX bit widths 2..8, group
 * sizes 32/64/128 and odd shapes. Prints the relative error max|gpu-cpu| / max|cpu| of each
 * case; fp32 paths must agree within 1e-4, paths with bf16 inputs (GEMM, KV cache) within 1e-2.
 * The matrix-vector products of 4-, 5-, 6- and 8-bit weights run on the dp4a kernels, which
 * quantise x to int8 per block of 32 values ("matvec-dp4a"): bf16 tolerance 1e-2; with x as two
 * int8 planes ("dp4a-x16", int16 precision) 1e-3; the same weights on the fp32 kernels
 * ("matvec-fp32", what STRATA_CUDA_NO_DP4A=1 selects) 1e-4. 5- and 6-bit weights are repacked
 * into the planes layout of src/backend/cuda/mv56_layout.h when cuda_op_linear uploads them (as
 * a model's upload does), so every case of those widths (dp4a, fp32, generic, GEMM dequant,
 * embedding) reads the repacked layout; with STRATA_CUDA_NO_DP4A=1 set they stay MLX.
 * Exit status 1 if any case fails (or 2 when built without CUDA / no device).
 */
#include "app.h"
#include "backend/cpu/cpu_ops.h"
#include "strata/base.h"
#include "strata/gpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_backend.h"

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint64_t rnd_u64(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return g_rng;
}

static float rnd_f(void) { return (float)((rnd_u64() >> 40) & 0xffffff) / 8388608.0f - 1.0f; } /* [-1, 1) */

static uint16_t f16_bits(float f) {
    /* float -> IEEE half (round to nearest even; inputs here are small normals) */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int e = (int)((x >> 23) & 0xff) - 127 + 15;
    uint32_t m = x & 0x7fffffu;
    if (e <= 0) return (uint16_t)sign; /* flush tiny values */
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    uint32_t r = (m >> 13) + (((m >> 12) & 1u) && ((m & 0x1fffu) || ((m >> 13) & 1u)) ? 1u : 0u);
    return (uint16_t)(sign | ((uint32_t)e << 10)) + (uint16_t)r;
}

static int g_fail, g_cases;

static void report(const char *what, double rel, double tol) {
    int ok = rel <= tol; /* NaN fails */
    g_cases++;
    if (!ok) g_fail++;
    printf("%-58s rel %.2e (tol %.0e)  %s\n", what, rel, tol, ok ? "ok" : "FAIL");
}

static double rel_err(const float *a, const float *b, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= md)) md = d;
        if (fabs(b[i]) > mr) mr = fabs(b[i]);
    }
    return mr > 0 ? md / mr : md;
}

/* A random weight: dense of dtype dt, or quantized (bits, group, scale dtype sdt). Buffers are
 * owned by the caller through *bufs[3]. */
static void make_weight(wt_linear *w, void *bufs[3], int64_t rows, int64_t cols, sft_dtype dt, int bits, int group,
                        sft_dtype sdt) {
    memset(w, 0, sizeof *w);
    w->rows = rows, w->cols = cols;
    bufs[0] = bufs[1] = bufs[2] = NULL;
    if (!bits) {
        size_t es = dt == SFT_F32 ? 4 : 2;
        w->dtype = dt;
        w->row_bytes = (size_t)cols * es;
        char *p = malloc((size_t)rows * w->row_bytes);
        for (int64_t i = 0; i < rows * cols; i++) {
            float f = rnd_f() * 0.1f;
            if (dt == SFT_F32) memcpy(p + 4 * i, &f, 4);
            else {
                uint16_t h = dt == SFT_BF16 ? st_f32_to_bf16(f) : f16_bits(f);
                memcpy(p + 2 * i, &h, 2);
            }
        }
        w->w = bufs[0] = p;
        return;
    }
    w->qbits = bits, w->group = group, w->sdtype = sdt;
    w->row_bytes = (size_t)cols * bits / 8;
    w->srow_elems = (size_t)(cols / group);
    uint32_t *q = malloc((size_t)rows * w->row_bytes);
    for (size_t i = 0; i < (size_t)rows * w->row_bytes / 4; i++) q[i] = (uint32_t)rnd_u64();
    size_t ns = (size_t)rows * w->srow_elems, es = sdt == SFT_F32 ? 4 : 2;
    char *s = malloc(ns * es), *b = malloc(ns * es);
    for (size_t i = 0; i < ns; i++) {
        float fs = rnd_f() * 0.02f, fb = rnd_f() * 0.1f; /* scales may be negative */
        if (sdt == SFT_F32) {
            memcpy(s + 4 * i, &fs, 4);
            memcpy(b + 4 * i, &fb, 4);
        } else {
            uint16_t hs = sdt == SFT_BF16 ? st_f32_to_bf16(fs) : f16_bits(fs);
            uint16_t hb = sdt == SFT_BF16 ? st_f32_to_bf16(fb) : f16_bits(fb);
            memcpy(s + 2 * i, &hs, 2);
            memcpy(b + 2 * i, &hb, 2);
        }
    }
    w->w = bufs[0] = q;
    w->scales = bufs[1] = s;
    w->biases = bufs[2] = b;
}

static const char *dt_name(sft_dtype d) { return d == SFT_F32 ? "f32" : d == SFT_F16 ? "f16" : "bf16"; }

/* Whether the matrix-vector path runs weights of `bits` x cols on the dp4a kernels (int8 x). */
static int dp4a_applies(int bits, int64_t cols) { return (bits == 4 || bits == 5 || bits == 6 || bits == 8) && cols % 32 == 0; }

#define TOL_DP4A 1e-2 /* int8 x per 32 values: the bf16 tolerance        */
#define TOL_X16 1e-3  /* x as two int8 planes (int16 precision)          */

/* Sets (val != NULL) or clears environment variable name; returns its previous value (a copy
 * the caller passes to env_restore). */
static char *env_swap(const char *name, const char *val) {
    const char *old = getenv(name);
    char *saved = old ? strdup(old) : NULL;
    if (val) setenv(name, val, 1);
    else unsetenv(name);
    return saved;
}

static void env_restore(const char *name, char *saved) {
    if (saved) setenv(name, saved, 1);
    else unsetenv(name);
    free(saved);
}

static void check_linear(cpu_scratch *cs, int64_t rows, int64_t cols, sft_dtype dt, int bits, int group, sft_dtype sdt,
                         int T) {
    wt_linear w;
    void *bufs[3];
    make_weight(&w, bufs, rows, cols, dt, bits, group, sdt);
    float *x = malloc((size_t)T * cols * 4), *ref = malloc((size_t)T * rows * 4), *got = malloc((size_t)T * rows * 4);
    for (int64_t i = 0; i < T * cols; i++) x[i] = rnd_f();
    cpu_linear(NULL, cs, ref, x, &w, T);
    char what[160];
    st_err err = {0};
    const char *kind = bits ? "" : dt_name(dt);
    char q[32] = "";
    if (bits) snprintf(q, sizeof q, "q%dg%d/%s", bits, group, dt_name(sdt));
    /* auto path: matrix-vector for T <= 8 (fp32 x, or int8 x on the dp4a kernels), GEMM above
     * (bf16 inputs) */
    const int dp = dp4a_applies(bits, cols);
    const char *mv = dp ? "matvec-dp4a" : "matvec";
    const double mv_tol = dp ? TOL_DP4A : 1e-4;
    if (cuda_op_linear(&w, x, T, got, 0, &err)) {
        printf("linear: %s\n", err.msg);
        g_fail++;
    } else {
        snprintf(what, sizeof what, "linear %s%s %lldx%lld T=%d %s", kind, q, (long long)rows, (long long)cols, T,
                 T <= 8 ? mv : "gemm");
        report(what, rel_err(got, ref, (size_t)T * rows), T <= 8 ? mv_tol : 1e-2);
    }
    if (T <= 8 && cuda_op_linear(&w, x, T, got, 3, &err) == 0) {
        snprintf(what, sizeof what, "linear %s%s %lldx%lld T=%d generic", kind, q, (long long)rows, (long long)cols, T);
        report(what, rel_err(got, ref, (size_t)T * rows), 1e-4);
    }
    if (T > 8 && cuda_op_linear(&w, x, T, got, 1, &err) == 0) {
        snprintf(what, sizeof what, "linear %s%s %lldx%lld T=%d %s", kind, q, (long long)rows, (long long)cols, T, mv);
        report(what, rel_err(got, ref, (size_t)T * rows), mv_tol);
    }
    if (dp) { /* the same weights on the fp32 kernels (path 4) and on two int8 planes of x (path 5) */
        if (cuda_op_linear(&w, x, T, got, 4, &err) == 0) {
            snprintf(what, sizeof what, "linear %s %lldx%lld T=%d matvec-fp32", q, (long long)rows, (long long)cols, T);
            report(what, rel_err(got, ref, (size_t)T * rows), 1e-4);
        }
        if (cuda_op_linear(&w, x, T, got, 5, &err) == 0) {
            snprintf(what, sizeof what, "linear %s %lldx%lld T=%d matvec-dp4a-x16", q, (long long)rows, (long long)cols, T);
            report(what, rel_err(got, ref, (size_t)T * rows), TOL_X16);
        }
    }
    /* embedding from the same table */
    if (T <= 8) {
        int32_t toks[8];
        for (int t = 0; t < T; t++) toks[t] = (int32_t)(rnd_u64() % (uint64_t)rows);
        float *e_ref = malloc((size_t)T * cols * 4), *e_got = malloc((size_t)T * cols * 4);
        cpu_embed(e_ref, toks, T, &w);
        if (!cuda_op_embed(&w, toks, T, e_got, &err)) {
            snprintf(what, sizeof what, "embed %s%s %lldx%lld T=%d", kind, q, (long long)rows, (long long)cols, T);
            report(what, rel_err(e_got, e_ref, (size_t)T * cols), 1e-6);
        }
        free(e_ref);
        free(e_got);
    }
    free(x), free(ref), free(got);
    for (int i = 0; i < 3; i++) free(bufs[i]);
}

static float bf16_round(float f) { return st_bf16_to_f32(st_f32_to_bf16(f)); }

static void check_attention(cpu_scratch *cs, int n_ctx, int T, int H, int Hkv, int hd) {
    size_t kvn = (size_t)n_ctx * Hkv * hd;
    float *k = malloc(kvn * 4), *v = malloc(kvn * 4), *q = malloc((size_t)T * H * hd * 4);
    float *ref = malloc((size_t)T * H * hd * 4), *got = malloc((size_t)T * H * hd * 4);
    for (size_t i = 0; i < kvn; i++) k[i] = bf16_round(rnd_f() * 2), v[i] = bf16_round(rnd_f());
    for (int i = 0; i < T * H * hd; i++) q[i] = rnd_f() * 2;
    int32_t *pos = malloc((size_t)T * 4);
    const float **kp = malloc((size_t)T * sizeof *kp), **vp = malloc((size_t)T * sizeof *vp);
    for (int t = 0; t < T; t++) {
        pos[t] = T == 1 ? n_ctx - 1 : (int)(n_ctx - T + t); /* causal prefill rows / a decode row */
        kp[t] = k, vp[t] = v;
    }
    float scale = 1.0f / sqrtf((float)hd);
    cpu_attention(NULL, cs, ref, q, kp, vp, pos, T, H, Hkv, hd, scale);
    st_err err = {0};
    char what[160];
    if (cuda_op_attention(q, k, v, n_ctx, pos, T, H, Hkv, hd, scale, got, &err)) {
        printf("attention: %s\n", err.msg);
        g_fail++;
    } else {
        /* decode rows (T <= 8) of head_dim 64/128 with <= 16 query heads per kv head run the
         * tensor-core kernel: q and the softmax weights enter its mma in bf16 (tolerance 1e-2, as
         * every bf16 input); the per-head kernel keeps q and p in fp32 (1e-4) */
        const int mma = (T <= 8 && (hd == 64 || hd == 128) && H % Hkv == 0 && H / Hkv <= 16) ||
                        (T >= 16 && (hd == 64 || hd == 128) && H % Hkv == 0 && H / Hkv <= 64); /* prefill kernel */
        snprintf(what, sizeof what, "attention ctx=%d T=%d H=%d Hkv=%d hd=%d%s", n_ctx, T, H, Hkv, hd,
                 mma ? " (tensor cores)" : "");
        report(what, rel_err(got, ref, (size_t)T * H * hd), mma ? 1e-2 : 1e-4);
    }
    free(k), free(v), free(q), free(ref), free(got), free(pos), free(kp), free(vp);
}

/* The tiled tensor-core prefill kernel (cuda_op_attention_path 2): T rows at consecutive
 * positions pos0..pos0+T-1 over a cache of pos0 + T rows (pos0 > 0: a later chunk of a prompt,
 * the earlier K/V already cached); bf16 tolerance (q and the softmax weights enter the mma in
 * bf16). path 0 checks that the forward pass's automatic choice gives the same answer. */
static void check_attention_prefill(cpu_scratch *cs, int T, int H, int Hkv, int hd, int pos0, int path) {
    const int n_ctx = pos0 + T;
    size_t kvn = (size_t)n_ctx * Hkv * hd;
    float *k = malloc(kvn * 4), *v = malloc(kvn * 4), *q = malloc((size_t)T * H * hd * 4);
    float *ref = malloc((size_t)T * H * hd * 4), *got = malloc((size_t)T * H * hd * 4);
    int32_t *pos = malloc((size_t)T * 4);
    const float **kp = malloc((size_t)T * sizeof *kp), **vp = malloc((size_t)T * sizeof *vp);
    if (!k || !v || !q || !ref || !got || !pos || !kp || !vp) {
        printf("attention prefill: out of memory\n");
        g_fail++;
        goto out;
    }
    for (size_t i = 0; i < kvn; i++) k[i] = bf16_round(rnd_f() * 2), v[i] = bf16_round(rnd_f());
    for (int i = 0; i < T * H * hd; i++) q[i] = rnd_f() * 2;
    for (int t = 0; t < T; t++) pos[t] = pos0 + t, kp[t] = k, vp[t] = v;
    float scale = 1.0f / sqrtf((float)hd);
    cpu_attention(NULL, cs, ref, q, kp, vp, pos, T, H, Hkv, hd, scale);
    st_err err = {0};
    char what[160];
    snprintf(what, sizeof what, "attention prefill%s T=%d pos0=%d H=%d Hkv=%d hd=%d", path == 0 ? " (auto)" : "", T, pos0,
             H, Hkv, hd);
    if (cuda_op_attention_path(q, k, v, n_ctx, pos, T, H, Hkv, hd, scale, path, got, &err)) {
        printf("%s: %s\n", what, err.msg);
        g_fail++;
    } else report(what, rel_err(got, ref, (size_t)T * H * hd), 1e-2);
out:
    free(k), free(v), free(q), free(ref), free(got), free(pos), free(kp), free(vp);
}

static void check_rows_ops(void) {
    st_err err = {0};
    char what[160];
    /* rmsnorm: full rows, per-head rows */
    int shapes[][2] = {{3, 4096}, {7, 1000}, {64, 128}, {33, 48}, {5, 2560}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int r = shapes[i][0], n = shapes[i][1];
        float *x = malloc((size_t)r * n * 4), *w = malloc((size_t)n * 4), *ref = malloc((size_t)r * n * 4),
              *got = malloc((size_t)r * n * 4);
        for (int j = 0; j < r * n; j++) x[j] = rnd_f() * 3;
        for (int j = 0; j < n; j++) w[j] = 1 + rnd_f() * 0.5f;
        cpu_rmsnorm(ref, x, w, r, n, 1e-6f);
        if (!cuda_op_rmsnorm(x, w, r, n, 1e-6f, got, &err)) {
            snprintf(what, sizeof what, "rmsnorm %dx%d", r, n);
            report(what, rel_err(got, ref, (size_t)r * n), 1e-5);
        }
        free(x), free(w), free(ref), free(got);
    }
    /* rope: full and partial rotary, large positions */
    int rp[][4] = {{5, 8, 128, 128}, {3, 4, 64, 16}, {2, 6, 48, 48}, {4, 2, 128, 64}};
    for (size_t i = 0; i < sizeof rp / sizeof rp[0]; i++) {
        int T = rp[i][0], nh = rp[i][1], hd = rp[i][2], nr = rp[i][3];
        size_t n = (size_t)T * nh * hd;
        float *x = malloc(n * 4), *got = malloc(n * 4), *cs = malloc((size_t)T * nr * 4);
        double inv[256];
        int32_t pos[8];
        for (int j = 0; j < nr / 2; j++) inv[j] = 1.0 / pow(1e6, 2.0 * j / nr);
        for (int t = 0; t < T; t++) pos[t] = (int32_t)(rnd_u64() % 40000);
        for (size_t j = 0; j < n; j++) x[j] = rnd_f();
        memcpy(got, x, n * 4);
        cpu_rope_table(cs, pos, T, inv, nr);
        cpu_rope(x, cs, T, nh, hd, nr);
        if (!cuda_op_rope(got, pos, T, nh, hd, nr, inv, &err)) {
            snprintf(what, sizeof what, "rope T=%d heads=%d hd=%d n_rot=%d", T, nh, hd, nr);
            report(what, rel_err(got, x, n), 1e-5);
        }
        free(x), free(got), free(cs);
    }
    /* swiglu */
    {
        int64_t n = 100003;
        float *g = malloc((size_t)n * 4), *u = malloc((size_t)n * 4), *ref = malloc((size_t)n * 4),
              *got = malloc((size_t)n * 4);
        for (int64_t j = 0; j < n; j++) g[j] = rnd_f() * 8, u[j] = rnd_f() * 2;
        cpu_swiglu(ref, g, u, n);
        if (!cuda_op_swiglu(g, u, n, got, &err)) report("swiglu n=100003", rel_err(got, ref, (size_t)n), 1e-5);
        free(g), free(u), free(ref), free(got);
    }
    /* kernels that quantise their own output for the next dp4a launch (k_swiglu_q, k_attn_combine
     * with planes) against the separate k_quant_x: bitwise the same output, codes, statistics */
    {
        const int shapes[][3] = {{0, 3, 12288}, {0, 8, 768}, {1, 32, 128}, {1, 48, 64}, {1, 7, 256},
                                 {2, 1, 4096}, {2, 5, 3072}, {2, 8, 2048}, {2, 2, 96}};
        static const char *names[] = {"swiglu", "attn combine", "add + rmsnorm"};
        for (int si = 0; si < 9; si++)
            for (int planes = 1; planes <= 2; planes++) {
                int64_t diff = -1;
                char what[96];
                snprintf(what, sizeof what, "%s + quantise x %dx%d planes=%d (bytes differing)", names[shapes[si][0]],
                         shapes[si][1], shapes[si][2], planes);
                if (cuda_op_fused_quant_check(shapes[si][0], shapes[si][1], shapes[si][2], planes, 0x5eed + si, &diff, &err)) {
                    printf("%s: %s\n", what, err.msg);
                    g_fail++;
                } else report(what, (double)diff, 0);
            }
    }
    /* argmax */
    {
        int rows = 4, n = 151936;
        float *x = malloc((size_t)rows * n * 4);
        int32_t got[4];
        for (int j = 0; j < rows * n; j++) x[j] = rnd_f();
        x[77777] = 5, x[n + 3] = 5, x[2 * n + n - 1] = 5, x[3 * n + 10] = 5, x[3 * n + 11] = 5; /* tie -> lower */
        int32_t want[4] = {77777, 3, n - 1, 10};
        if (!cuda_op_argmax(x, rows, n, got, &err)) {
            int bad = 0;
            for (int r = 0; r < rows; r++) bad += got[r] != want[r];
            report("argmax 4x151936 (ties -> lowest index)", bad, 0);
        }
        free(x);
    }
}

/* forward.c's moe_route, restated for one token (the CPU reference is static there). */
static void route_ref(const float *lg, const float *bias, int E, int K, int sigmoid, int norm, int32_t *sel, float *w) {
    float score[512], key[512];
    if (!sigmoid) {
        float mx = -INFINITY;
        for (int e = 0; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += (score[e] = expf(lg[e] - mx));
        for (int e = 0; e < E; e++) key[e] = score[e] = (float)(score[e] / sum);
    } else {
        for (int e = 0; e < E; e++) {
            score[e] = 1.0f / (1.0f + expf(-lg[e]));
            key[e] = score[e] + (bias ? bias[e] : 0.0f);
        }
    }
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k && !taken; j++) taken = sel[j] == e;
            if (!taken && (best < 0 || key[e] > key[best])) best = e;
        }
        sel[k] = best;
        w[k] = score[best];
    }
    if (norm) {
        double s = 0;
        for (int k = 0; k < K; k++) s += w[k];
        for (int k = 0; k < K; k++) w[k] = (float)(w[k] / (s + (sigmoid ? 1e-20 : 0)));
    }
}

static void check_route(int T, int E, int K, int sigmoid, int norm) {
    float *lg = malloc((size_t)T * E * 4), *bias = malloc((size_t)E * 4);
    float *w_ref = malloc((size_t)T * K * 4), *w_got = malloc((size_t)T * K * 4);
    int32_t *s_ref = malloc((size_t)T * K * 4), *s_got = malloc((size_t)T * K * 4);
    for (int i = 0; i < T * E; i++) lg[i] = rnd_f() * 4;
    for (int e = 0; e < E; e++) bias[e] = rnd_f() * 0.1f;
    for (int t = 0; t < T; t++)
        route_ref(lg + (size_t)t * E, sigmoid ? bias : NULL, E, K, sigmoid, norm, s_ref + (size_t)t * K, w_ref + (size_t)t * K);
    st_err err = {0};
    char what[160];
    if (!cuda_op_moe_route(lg, sigmoid ? bias : NULL, T, E, K, sigmoid, norm, s_got, w_got, &err)) {
        int bad = 0;
        for (int i = 0; i < T * K; i++) bad += s_got[i] != s_ref[i];
        snprintf(what, sizeof what, "moe route %s T=%d E=%d K=%d norm=%d (selection)", sigmoid ? "sigmoid+bias" : "softmax",
                 T, E, K, norm);
        report(what, bad, 0);
        snprintf(what, sizeof what, "moe route %s T=%d E=%d K=%d norm=%d (weights)", sigmoid ? "sigmoid+bias" : "softmax",
                 T, E, K, norm);
        report(what, rel_err(w_got, w_ref, (size_t)T * K), 1e-5);
    } else {
        printf("moe route: %s\n", err.msg);
        g_fail++;
    }
    free(lg), free(bias), free(w_ref), free(w_got), free(s_ref), free(s_got);
}

/* The router alone (cuda_op_moe_router: k_moe_router, router linear + routing in one launch)
 * for T token rows of x[T, D]: the logits against cpu_linear within 1e-4 (fp32 x on both), the
 * selection and weights against route_ref applied to the GPU's own logits (exact / 1e-5, so a
 * near-tie cannot flip the comparison). rbits 0: a bf16 router (the element-wise path). */
static void check_router(cpu_scratch *cs, int D, int E, int K, int sigmoid, int rbits, int T) {
    wt_linear router;
    void *rb[3];
    make_weight(&router, rb, E, D, SFT_BF16, rbits, 64, SFT_BF16);
    float *x = malloc((size_t)T * D * 4), *bias = malloc((size_t)E * 4);
    float *lg_ref = malloc((size_t)T * E * 4), *lg_got = malloc((size_t)T * E * 4);
    float *w_ref = malloc((size_t)T * K * 4), *w_got = malloc((size_t)T * K * 4);
    int32_t *s_ref = malloc((size_t)T * K * 4), *s_got = malloc((size_t)T * K * 4);
    for (int i = 0; i < T * D; i++) x[i] = rnd_f();
    for (int e = 0; e < E; e++) bias[e] = rnd_f() * 0.1f;
    cpu_linear(NULL, cs, lg_ref, x, &router, T);
    st_err err = {0};
    char what[160], q[24];
    if (rbits) snprintf(q, sizeof q, "q%dg64", rbits);
    else snprintf(q, sizeof q, "bf16");
    if (cuda_op_moe_router(&router, sigmoid ? bias : NULL, E, K, sigmoid, 1, x, T, lg_got, s_got, w_got, &err)) {
        printf("moe router: %s\n", err.msg);
        g_fail++;
    } else {
        for (int t = 0; t < T; t++)
            route_ref(lg_got + (size_t)t * E, sigmoid ? bias : NULL, E, K, sigmoid, 1, s_ref + (size_t)t * K,
                      w_ref + (size_t)t * K);
        int bad = 0;
        for (int i = 0; i < T * K; i++) bad += s_got[i] != s_ref[i];
        const char *rn = sigmoid ? "sigmoid+bias" : "softmax";
        snprintf(what, sizeof what, "moe router %s %s D=%d E=%d K=%d T=%d (logits)", rn, q, D, E, K, T);
        report(what, rel_err(lg_got, lg_ref, (size_t)T * E), 1e-4);
        snprintf(what, sizeof what, "moe router %s %s D=%d E=%d K=%d T=%d (selection)", rn, q, D, E, K, T);
        report(what, bad, 0);
        snprintf(what, sizeof what, "moe router %s %s D=%d E=%d K=%d T=%d (weights)", rn, q, D, E, K, T);
        report(what, rel_err(w_got, w_ref, (size_t)T * K), 1e-5);
    }
    free(x), free(bias), free(lg_ref), free(lg_got), free(w_ref), free(w_got), free(s_ref), free(s_got);
    for (int i = 0; i < 3; i++) free(rb[i]);
}

/* The whole MoE feed-forward (router linear + routing + experts + weighted sum) against
 * forward.c's moe_forward restated on the host with cpu_linear / cpu_swiglu / route_ref, for
 * the nT token counts Ts (default: 1 (decode), 7, 9 (just past the matrix-vector limit of 8),
 * 33 and 200). Expert scales / biases in sdt. The selection must agree exactly (the router runs
 * in fp32 on both), the output within 1e-4 on fp32 kernels and 1e-3 with x as two int8 planes.
 * 4/5/6/8-bit experts run three ways: the fused kernels (k_moe_gateup / k_moe_down, the default;
 * 5/6-bit experts on planes), STRATA_CUDA_MOE_UNFUSED=1 and STRATA_CUDA_NO_DP4A=1; the default
 * must really take the fused kernels (STRATA_CUDA_MOE_EXPECT_FUSED=1 makes the op fail
 * otherwise) and, twice more for T <= 8, give the same bits (no float atomics). */
static void check_moe_ffn_t(cpu_scratch *cs, int D, int F, int E, int K, int sigmoid, int norm, int bits, int rbits,
                            sft_dtype sdt, const int *Ts, int nT) {
    wt_linear router, *eg = calloc((size_t)E, sizeof *eg), *eu = calloc((size_t)E, sizeof *eu),
                      *ed = calloc((size_t)E, sizeof *ed);
    void *rb[3], **eb = calloc((size_t)E * 9, sizeof *eb);
    make_weight(&router, rb, E, D, SFT_BF16, rbits, 64, SFT_BF16);
    for (int e = 0; e < E; e++) {
        make_weight(&eg[e], eb + 9 * e, F, D, SFT_BF16, bits, 64, sdt);
        make_weight(&eu[e], eb + 9 * e + 3, F, D, SFT_BF16, bits, 64, sdt);
        make_weight(&ed[e], eb + 9 * e + 6, D, F, SFT_BF16, bits, 64, sdt);
    }
    float *bias = malloc((size_t)E * 4);
    for (int e = 0; e < E; e++) bias[e] = rnd_f() * 0.1f;
    for (int ti = 0; ti < nT; ti++) {
        const int T = Ts[ti];
        float *x = malloc((size_t)T * D * 4), *ref = calloc((size_t)T * D, 4), *got = malloc((size_t)T * D * 4);
        float *lg = malloc((size_t)T * E * 4), *selw = malloc((size_t)T * K * 4);
        float *g = malloc((size_t)F * 4), *u = malloc((size_t)F * 4), *y = malloc((size_t)D * 4);
        int32_t *sel = malloc((size_t)T * K * 4), *sel_got = malloc((size_t)T * K * 4);
        for (int i = 0; i < T * D; i++) x[i] = rnd_f();
        cpu_linear(NULL, cs, lg, x, &router, T);
        for (int t = 0; t < T; t++)
            route_ref(lg + (size_t)t * E, sigmoid ? bias : NULL, E, K, sigmoid, norm, sel + (size_t)t * K,
                      selw + (size_t)t * K);
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) {
                const int e = sel[(size_t)t * K + k];
                cpu_linear(NULL, cs, g, x + (size_t)t * D, &eg[e], 1);
                cpu_linear(NULL, cs, u, x + (size_t)t * D, &eu[e], 1);
                cpu_swiglu(g, g, u, F);
                cpu_linear(NULL, cs, y, g, &ed[e], 1);
                for (int i = 0; i < D; i++) ref[(size_t)t * D + i] += selw[(size_t)t * K + k] * y[i];
            }
        st_err err = {0};
        char what[160], q[32];
        if (bits) snprintf(q, sizeof q, "q%dg64%s", bits, sdt == SFT_BF16 ? "" : sdt == SFT_F16 ? "/f16" : "/f32");
        else snprintf(q, sizeof q, "bf16");
        /* 4/8-bit experts: the dp4a kernels with x as two int8 planes (the MoE default: int8 x
         * failed the golden test of qwen3_moe-mlx-q4g64 through flipped router choices), fused
         * and unfused, then the fp32 kernels; the router always runs on fp32 x (selection exact) */
        const int dp = dp4a_applies(bits, D) && dp4a_applies(bits, F);
        for (int v = 0; v < (dp ? 3 : 1); v++) {
            static const char *vname[3] = {"", " unfused", " fp32"};
            const double tol = !dp ? 1e-4 : v < 2 ? TOL_X16 : 1e-4;
            /* v 0 with dp4a experts: the fused kernels, required (K <= 64, F and D whole blocks) */
            const char *ename = v == 1 ? "STRATA_CUDA_MOE_UNFUSED" : v == 2 ? "STRATA_CUDA_NO_DP4A"
                                                                          : "STRATA_CUDA_MOE_EXPECT_FUSED";
            const int swap = v || (dp && K <= 64);
            char *sno = swap ? env_swap(ename, "1") : NULL;
            const int rc = cuda_op_moe_ffn(&router, sigmoid ? bias : NULL, eg, eu, ed, E, K, sigmoid, norm, x, T, got,
                                           sel_got, &err);
            if (swap) env_restore(ename, sno);
            if (rc) {
                printf("moe ffn: %s\n", err.msg);
                g_fail++;
                continue;
            }
            if (v == 0 && dp && T <= 8) { /* the same inputs twice more: the same bits */
                float *again = malloc((size_t)T * D * 4);
                int differ = 0;
                for (int rep = 0; rep < 2; rep++) {
                    if (cuda_op_moe_ffn(&router, sigmoid ? bias : NULL, eg, eu, ed, E, K, sigmoid, norm, x, T, again,
                                        NULL, &err)) {
                        printf("moe ffn: %s\n", err.msg);
                        differ++;
                    } else differ += memcmp(again, got, (size_t)T * D * 4) != 0;
                }
                snprintf(what, sizeof what, "moe ffn %s %s D=%d F=%d E=%d K=%d T=%d (bitwise repeat)",
                         sigmoid ? "sigmoid" : "softmax", q, D, F, E, K, T);
                report(what, differ, 0);
                free(again);
            }
            int bad = 0;
            for (int i = 0; i < T * K; i++) bad += sel_got[i] != sel[i];
            snprintf(what, sizeof what, "moe ffn %s %s D=%d F=%d E=%d K=%d T=%d (selection)", sigmoid ? "sigmoid" : "softmax",
                     q, D, F, E, K, T);
            report(what, bad, 0);
            snprintf(what, sizeof what, "moe ffn %s %s%s%s D=%d F=%d E=%d K=%d T=%d (output)", sigmoid ? "sigmoid" : "softmax", q,
                     dp && v == 0 ? " dp4a-x16" : "", vname[v], D, F, E, K, T);
            report(what, rel_err(got, ref, (size_t)T * D), tol);
        }
        free(x), free(ref), free(got), free(lg), free(selw), free(g), free(u), free(y), free(sel), free(sel_got);
    }
    for (int i = 0; i < 3; i++) free(rb[i]);
    for (int i = 0; i < E * 9; i++) free(eb[i]);
    free(eb), free(eg), free(eu), free(ed), free(bias);
}

static void check_moe_ffn(cpu_scratch *cs, int D, int F, int E, int K, int sigmoid, int norm, int bits, int rbits) {
    static const int Ts[] = {1, 7, 9, 33, 200};
    check_moe_ffn_t(cs, D, F, E, K, sigmoid, norm, bits, rbits, SFT_BF16, Ts, 5);
}

int cmd_cuda_parity(int argc, char **argv) {
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: strata cuda-parity [--quick]\n  Checks every CUDA op against the CPU reference.\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    char why[256] = "";
    if (st_gpu_count(why, sizeof why) < 1) {
        fprintf(stderr, "strata cuda-parity: no CUDA device: %s\n", why);
        return 2;
    }
    printf("cuda-parity: fp32 paths tol 1e-4; bf16 inputs (GEMM, KV cache) 1e-2; 4/5/6/8-bit matrix-vector on the dp4a\n"
           "  kernels (x as int8 per 32 values, STRATA_CUDA_NO_DP4A=%s) with the bf16 tolerance 1e-2, on two int8\n"
           "  planes of x (dp4a-x16) 1e-3, on the fp32 kernels (matvec-fp32) 1e-4\n",
           getenv("STRATA_CUDA_NO_DP4A") ? getenv("STRATA_CUDA_NO_DP4A") : "unset");
    cpu_scratch cs;
    if (cpu_scratch_init(&cs, 1, 16384, 64, 1)) {
        fprintf(stderr, "strata: out of memory\n");
        return 1;
    }
    /* dense linears: dtypes x shapes (odd columns take the generic kernel) x token rows */
    const sft_dtype dts[] = {SFT_BF16, SFT_F16, SFT_F32};
    const int64_t dshapes[][2] = {{37, 96}, {300, 2048}, {129, 93}, {64, 4104}};
    const int Ts[] = {1, 3, 8, 20};
    for (int di = 0; di < 3; di++)
        for (int si = 0; si < 4; si++)
            for (int ti = 0; ti < 4; ti++) check_linear(&cs, dshapes[si][0], dshapes[si][1], dts[di], 0, 0, SFT_BF16, Ts[ti]);
    /* MLX affine: bits x groups x shapes x rows; scale dtypes bf16 (checkpoints), f16, f32 */
    const int bits[] = {2, 3, 4, 5, 6, 8}, groups[] = {32, 64, 128};
    const int64_t qshapes[][2] = {{67, 384}, {300, 2048}};
    for (int bi = 0; bi < 6; bi++)
        for (int gi = 0; gi < 3; gi++)
            for (int si = 0; si < 2; si++)
                for (int ti = 0; ti < 3; ti++) {
                    if (quick && ti == 1) continue;
                    int T = ti == 0 ? 1 : ti == 1 ? 5 : 20;
                    sft_dtype sdt = (bi + gi + si) % 5 == 3 ? SFT_F16 : (bi + gi + si) % 5 == 4 ? SFT_F32 : SFT_BF16;
                    check_linear(&cs, qshapes[si][0], qshapes[si][1], SFT_BF16, bits[bi], groups[gi], sdt, T);
                }
    /* wide weights: >= 132 blocks of 16 rows take the 4-rows-per-warp kernels (the shapes above
     * are small enough to take the 1-row variants); 2118 rows leave a partial last block */
    for (int bi = 0; bi < 6; bi++)
        for (int ti = 0; ti < 2; ti++)
            check_linear(&cs, 2118, 1024, SFT_BF16, bits[bi], bi % 2 ? 32 : 64, bi == 3 ? SFT_F16 : SFT_BF16, ti ? 3 : 1);
    /* split-K matrix-vector (T = 1, cols >= 1024, fewer than 1056 blocks): 4 and 1 rows per warp */
    for (int bi = 0; bi < 6; bi++) {
        check_linear(&cs, 2118, 4096, SFT_BF16, bits[bi], bi % 2 ? 32 : 64, bi == 3 ? SFT_F16 : SFT_BF16, 1);
        check_linear(&cs, 600, 2048, SFT_BF16, bits[bi], 64, SFT_BF16, 1);
    }
    check_linear(&cs, 600, 2048, SFT_BF16, 0, 0, SFT_BF16, 1);
    check_linear(&cs, 600, 2048, SFT_F16, 0, 0, SFT_BF16, 1);
    /* dp4a kernels (4/8-bit): every token count 1..8, groups 32/64/128, scale dtypes, odd row
     * counts with 1 row per warp (131 rows) and 4 rows per warp (2118: a partial last block;
     * T = 1 splits K); 8-bit rows of 96 values (3 blocks of 32) */
    for (int bi = 0; bi < 2; bi++)
        for (int T = 1; T <= 8; T++) {
            const int b = bi ? 8 : 4, g = groups[(T + bi) % 3];
            const sft_dtype sdt = T % 3 == 1 ? SFT_F16 : T % 3 == 2 ? SFT_F32 : SFT_BF16;
            check_linear(&cs, 131, 1024, SFT_BF16, b, g, sdt, T);
            check_linear(&cs, 2118, 1024, SFT_BF16, b, g, T % 2 ? SFT_BF16 : sdt, T);
        }
    check_linear(&cs, 77, 96, SFT_BF16, 8, 32, SFT_BF16, 3);
    check_linear(&cs, 77, 96, SFT_BF16, 4, 32, SFT_BF16, 1);
    /* the streaming single-row kernel (k_mv_s, T = 1, 4 and 8 bits): 4 / 2 rows per warp from
     * 132 / 200 blocks (4100 rows: a partial last block), 1 row from ~800 (900, 2118); rows of 1
     * unit per lane (1024 4-bit columns), of a partial last round (1056: lane 0 takes 2 units),
     * and long enough to refill the register ring (12288 columns: 12 units per lane against a
     * ring of 1-8); every scale dtype. The same widths in bf16 / f16: k_mv_dense16 at T = 1, or
     * k_mv_s with STRATA_CUDA_MVS_DENSE=1 (12288 columns: exactly 48 KiB of fp32 x) */
    for (int bi = 0; bi < 2; bi++) {
        const int b = bi ? 8 : 4;
        check_linear(&cs, 4100, 1024, SFT_BF16, b, 64, SFT_BF16, 1);
        check_linear(&cs, 4100, 1056, SFT_BF16, b, 32, SFT_F16, 1);
        check_linear(&cs, 4100, 4096, SFT_BF16, b, 128, SFT_F32, 1);
        check_linear(&cs, 900, 12288, SFT_BF16, b, 64, SFT_BF16, 1);
        check_linear(&cs, 4100, 12288, SFT_BF16, b, 64, bi ? SFT_F16 : SFT_BF16, 1);
    }
    check_linear(&cs, 4100, 1000, SFT_BF16, 0, 0, SFT_BF16, 1);
    check_linear(&cs, 3300, 12288, SFT_BF16, 0, 0, SFT_BF16, 1);
    check_linear(&cs, 900, 4096, SFT_F16, 0, 0, SFT_BF16, 1);
    /* dp4a kernels on 5/6-bit planes (k_mv_qp): every token count 1..8 with 1 row per warp (131)
     * and 4 (2118), groups 32/64/128, scale dtypes; T = 1 in all launch shapes: 1 / 4 rows per
     * warp without split-K (512 columns) and with it (600x2048, 2118x4096); 3 blocks per row; the
     * minimax-m2.5 expert shapes (gate/up 1536x3072, down 3072x1536) */
    for (int b = 5; b <= 6; b++) {
        for (int T = 1; T <= 8; T++) {
            const int g = groups[(T + b) % 3];
            const sft_dtype sdt = T % 3 == 1 ? SFT_F16 : T % 3 == 2 ? SFT_F32 : SFT_BF16;
            check_linear(&cs, 131, 1024, SFT_BF16, b, g, sdt, T);
            check_linear(&cs, 2118, 1024, SFT_BF16, b, g, T % 2 ? SFT_BF16 : sdt, T);
        }
        check_linear(&cs, 131, 512, SFT_BF16, b, 64, SFT_BF16, 1);
        check_linear(&cs, 2118, 512, SFT_BF16, b, 128, SFT_BF16, 1);
        check_linear(&cs, 600, 2048, SFT_BF16, b, 32, SFT_BF16, 1);
        check_linear(&cs, 2118, 4096, SFT_BF16, b, 64, SFT_F16, 1);
        check_linear(&cs, 77, 96, SFT_BF16, b, 32, SFT_BF16, 3);
        check_linear(&cs, 1536, 3072, SFT_BF16, b, 64, SFT_BF16, 1);
        check_linear(&cs, 3072, 1536, SFT_BF16, b, 64, SFT_BF16, 1);
    }
    for (int ti = 0; ti < 2; ti++) {
        check_linear(&cs, 2118, 1024, SFT_BF16, 0, 0, SFT_BF16, ti ? 3 : 1);
        check_linear(&cs, 2118, 1024, SFT_F16, 0, 0, SFT_BF16, ti ? 3 : 1);
    }
    check_rows_ops();
    /* attention: decode rows and causal prefill rows, GQA, head dims 32..256 incl. 48 */
    int at[][5] = {{1, 1, 4, 2, 32}, {300, 1, 32, 8, 128}, {4097, 1, 16, 4, 128}, {77, 5, 4, 2, 48},
                   {64, 64, 8, 1, 64}, {513, 3, 8, 8, 256}, {1000, 1, 40, 8, 128},
                   /* minimax-shaped (6 q heads per kv head), 16 per kv head, and 32 (the per-head kernel) */
                   {4000, 1, 48, 8, 128}, {200, 2, 64, 4, 128}, {100, 1, 64, 2, 64},
                   /* tensor-core decode kernel: 5 positions, T = 4 / 8 causal rows, G = 1 and 16 */
                   {5, 1, 8, 8, 64}, {70, 4, 16, 8, 128}, {2047, 8, 24, 8, 64}, {17, 1, 16, 1, 128},
                   {65, 1, 6, 1, 128}};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) check_attention(&cs, at[i][0], at[i][1], at[i][2], at[i][3], at[i][4]);
    /* prefill attention (tiled, tensor cores): T x heads x head_dim, from position 0 and as a
     * second chunk of a prompt (positions from an offset); plus the automatic choice */
    {
        const int pts[] = {16, 33, 128, 300}, phs[][2] = {{4, 4}, {32, 8}, {48, 8}, {16, 2}}, phd[] = {64, 128};
        for (int ti = 0; ti < 4; ti++)
            for (int hi = 0; hi < 4; hi++)
                for (int di = 0; di < 2; di++)
                    for (int oi = 0; oi < 2; oi++) {
                        if (quick && (ti + hi + di + oi) % 2) continue;
                        const int pos0 = oi ? 37 + 64 * ti : 0; /* offsets inside a key tile and across tiles */
                        check_attention_prefill(&cs, pts[ti], phs[hi][0], phs[hi][1], phd[di], pos0, 2);
                    }
        check_attention_prefill(&cs, 64, 32, 8, 128, 0, 0);
        check_attention_prefill(&cs, 200, 16, 2, 64, 1000, 0);
        check_attention_prefill(&cs, 20, 64, 1, 128, 5, 2); /* G = 64: one token per CTA */
    }
    check_route(5, 8, 2, 0, 1);
    check_route(9, 128, 8, 0, 1);
    check_route(3, 64, 4, 0, 0);
    check_route(7, 256, 8, 1, 1);
    check_route(4, 8, 2, 1, 1);
    check_route(64, 128, 8, 0, 1);
    check_route(33, 256, 8, 1, 1);
    check_moe_ffn(&cs, 256, 128, 16, 4, 0, 1, 0, 0);  /* qwen3_moe-like: softmax top-k, bf16          */
    check_moe_ffn(&cs, 256, 128, 32, 8, 1, 1, 4, 8);  /* minimax-like: sigmoid + bias, q4 experts, q8 router */
    check_moe_ffn(&cs, 128, 64, 128, 8, 0, 1, 5, 0);  /* 128 experts, q5 experts, bf16 router         */
    check_moe_ffn(&cs, 256, 128, 16, 4, 0, 1, 4, 8);  /* qwen3_moe-mlx-like: q4 experts, q8 router     */
    check_moe_ffn(&cs, 128, 192, 16, 2, 1, 1, 8, 8);  /* q8 experts (dp4a on 8-bit), F = 6 blocks of 32 */
    check_moe_ffn(&cs, 256, 192, 16, 4, 1, 1, 6, 8);  /* q6 experts on planes, q8 router, F = 6 blocks of 32 */
    /* k_moe_router alone: minimax (D 3072: 4 warps per row; E 256, sigmoid + bias) and
     * qwen3-30b-a3b (D 2048: 2 warps per row; E 128, softmax) shapes, 1..8 rows and past the 8
     * rows of a block (T = 9) and the 32 rows of a parity launch (T = 40); q4 / bf16 routers, odd
     * D (element-wise path), E = 512 and E not a multiple of 32 */
    {
        static const int rts[] = {1, 2, 8, 9, 40};
        for (int i = 0; i < 5; i++) {
            check_router(&cs, 3072, 256, 8, 1, 8, rts[i]);
            check_router(&cs, 2048, 128, 8, 0, 8, rts[i]);
        }
        check_router(&cs, 2048, 128, 8, 0, 4, 3);
        check_router(&cs, 1024, 64, 4, 0, 0, 5);
        check_router(&cs, 200, 60, 4, 1, 0, 3);
        check_router(&cs, 4096, 512, 8, 1, 8, 2);
        check_router(&cs, 512, 100, 6, 0, 8, 8);
        check_router(&cs, 3072, 256, 8, 1, 5, 2); /* 5/6-bit routers: planes, the element-wise path */
        check_router(&cs, 1024, 64, 4, 0, 6, 1);
    }
    /* decode batches T = 1..8 (and 9, 33, 200) of the two production MoE shapes at small D:
     * minimax (E 256, K 8, sigmoid + bias) and qwen3-30b-a3b (E 128, K 8, softmax), q4 experts,
     * q8 router; their widths (D 2048 / 3072: several chunks per lane in every kernel) at T = 1, 8;
     * f16 scales (the generic-scale kernels) */
    {
        static const int all[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 200}, few[] = {1, 8};
        check_moe_ffn_t(&cs, 256, 128, 256, 8, 1, 1, 4, 8, SFT_BF16, all, 11);
        check_moe_ffn_t(&cs, 256, 128, 128, 8, 0, 1, 4, 8, SFT_BF16, all, 11);
        check_moe_ffn_t(&cs, 3072, 256, 64, 8, 1, 1, 4, 8, SFT_BF16, few, 2);
        check_moe_ffn_t(&cs, 2048, 192, 96, 8, 0, 1, 4, 8, SFT_BF16, few, 2);
        /* F is the down projection's input width: a whole number of 64-groups (96 was not, and
         * CPU and GPU then disagree about the partial group, rel ~0.97) */
        check_moe_ffn_t(&cs, 256, 128, 32, 8, 0, 1, 8, 8, SFT_F16, few, 2);
        check_moe_ffn_t(&cs, 256, 128, 32, 3, 1, 1, 4, 0, SFT_F32, few, 2);
    }
    /* 5/6-bit experts on the fused kernels (planes layout, two planes of x; issue #10: minimax-m2.5
     * at MLX 5-bit): minimax-shaped (E 64, K 8, sigmoid + bias, q8 router) and softmax E 32 / K 4
     * (2 column slices per expert in k_moe_down) at T = 1..8 and 33; the minimax width D 3072
     * (96 chunks of gate/up rows: 3 per lane; down F 256) at T = 1, 8; f16 and f32 scales (the
     * generic-scale kernels) with K = 3 (odd slices) and E not a power of two */
    {
        static const int t56[] = {1, 2, 3, 4, 5, 6, 7, 8, 33}, few[] = {1, 8};
        for (int bits = 5; bits <= 6; bits++) {
            check_moe_ffn_t(&cs, 512, 256, 64, 8, 1, 1, bits, 8, SFT_BF16, t56, 9);
            check_moe_ffn_t(&cs, 512, 256, 32, 4, 0, 1, bits, 8, SFT_BF16, t56, 9);
            check_moe_ffn_t(&cs, 3072, 256, 64, 8, 1, 1, bits, 8, SFT_BF16, few, 2);
            check_moe_ffn_t(&cs, 256, 192, 24, 3, 1, 1, bits, 0, bits == 5 ? SFT_F16 : SFT_F32, few, 2);
        }
    }
    cpu_scratch_free(&cs);
    printf("cuda-parity: %d cases, %d failed\n", g_cases, g_fail);
    return g_fail ? 1 : 0;
}
#else
int cmd_cuda_parity(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "strata cuda-parity: built without CUDA (nvcc was not found at configure time)\n");
    return 2;
}
#endif
