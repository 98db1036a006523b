/* test_cuda_host.c — the CUDA backend's host side (strata/cuda_backend.h).
 *
 * What is checked, and against what:
 *   - without a usable GPU (CI, this build machine): cuda_model_init on a synthetic tiny model
 *     fails with ST_ERR_UNSUPPORTED, a one-line message and *out == NULL; the single-op entry
 *     points fail the same way; the copy bandwidth probe returns 0; st_gpu_count agrees;
 *   - with a GPU (the device machine): every tiny preset (bf16 and q4g64) runs a 20-token prefill
 *     (two chunks of max_batch 16: GEMM / chunked fp32 matvec paths) and 3 decode steps on the GPU whose logits match the CPU reference forward within the bf16
 *     criterion (max|dlogit| <= 3e-2 max|logit|), and the graph-replayed greedy step returns
 *     the argmax of the eager decode logits.
 * Built only when CUDA was found at configure time (otherwise the test is a skip).
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

#include "strata/base.h"
#include "strata/gpu.h"
#include "strata/model.h"
#include "strata/synth.h"

#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_backend.h"

static int have_gpu(void) {
    char why[256];
    return st_gpu_count(why, sizeof why) > 0;
}

static void test_no_gpu_unsupported(void **state) {
    (void)state;
    if (have_gpu()) skip();
    model *m = NULL;
    st_err err = {0};
    assert_int_equal(synth_model(&m, "tiny-qwen3", 1, NULL, &err), ST_OK);
    cuda_model *cm = (cuda_model *)(uintptr_t)1;
    cuda_model_opts o = {.max_ctx = 64};
    int rc = cuda_model_init(&cm, m, &o, &err);
    assert_int_equal(rc, ST_ERR_UNSUPPORTED);
    assert_null(cm);
    assert_non_null(strstr(err.msg, "CUDA"));
    assert_null(strchr(err.msg, '\n'));
    float x[64] = {0}, y[4];
    assert_int_equal(cuda_op_linear(&m->layers[0].wq, x, 1, y, 0, &err), ST_ERR_UNSUPPORTED);
    assert_true(cuda_measure_copy_bandwidth(0, 1 << 20, 1) == 0.0);
    model_free(m);
}

static double rel_diff(const float *a, const float *b, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= md)) md = d;
        if (fabs(b[i]) > mr) mr = fabs(b[i]);
    }
    return mr > 0 ? md / mr : md;
}

static void run_preset(const char *spec) {
    model *m = NULL;
    model_ctx *ctx = NULL;
    cuda_model *cm = NULL;
    st_err err = {0};
    assert_int_equal(synth_model(&m, spec, 3, NULL, &err), ST_OK);
    const int V = m->desc.n_vocab, T = 20;
    model_ctx_opts co = {.max_ctx = 32, .n_slots = 2, .max_batch = 16, .n_threads = 2, .exact = 1};
    assert_int_equal(model_ctx_init(&ctx, m, &co, &err), ST_OK);
    cuda_model_opts go = {.max_ctx = 32, .n_slots = 2, .max_batch = 16};
    int rc = cuda_model_init(&cm, m, &go, &err);
    if (rc) fprintf(stderr, "%s: %s\n", spec, err.msg);
    assert_int_equal(rc, ST_OK);
    int32_t tok[23], pos[23], slot[23];
    for (int i = 0; i < 23; i++) tok[i] = (i * 37 + 5) % V, pos[i] = i, slot[i] = 1;
    float *a = malloc((size_t)T * V * 4), *b = malloc((size_t)T * V * 4);
    assert_int_equal(model_forward(ctx, tok, pos, slot, T, a, LOGITS_ALL, &err), ST_OK);
    assert_int_equal(cuda_model_forward(cm, tok, pos, slot, T, b, LOGITS_ALL, &err), ST_OK);
    double r = rel_diff(b, a, (size_t)T * V);
    printf("%s prefill: rel %.2e\n", spec, r);
    assert_true(r <= 3e-2);
    for (int t = T; t < 23; t++) {
        assert_int_equal(model_forward(ctx, &tok[t], &pos[t], &slot[t], 1, a, LOGITS_LAST, &err), ST_OK);
        assert_int_equal(cuda_model_forward(cm, &tok[t], &pos[t], &slot[t], 1, b, LOGITS_LAST, &err), ST_OK);
        r = rel_diff(b, a, (size_t)V);
        printf("%s decode %d: rel %.2e\n", spec, t, r);
        assert_true(r <= 3e-2);
    }
    /* the greedy graph step repeats the last decode row: same K/V, argmax of b */
    int32_t best = 0, next = -1;
    for (int i = 1; i < V; i++)
        if (b[i] > b[best]) best = i;
    assert_int_equal(cuda_model_decode_greedy(cm, &tok[22], &pos[22], &slot[22], 1, &next, &err), ST_OK);
    assert_int_equal(next, best);
    free(a);
    free(b);
    cuda_model_free(cm);
    model_ctx_free(ctx);
    model_free(m);
}

static void test_gpu_matches_cpu(void **state) {
    (void)state;
    if (!have_gpu()) skip();
    const char *specs[] = {"tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-minimax", "tiny-qwen3:q4g64",
                           "tiny-minimax:q4g64", "tiny-llama:q3g32"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) run_preset(specs[i]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_gpu_unsupported),
        cmocka_unit_test(test_gpu_matches_cpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
#else
static void test_skip(void **state) {
    (void)state;
    skip();
}
int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_skip)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
#endif
