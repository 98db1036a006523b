/* test_forward.c — forward-pass invariants on the fixture models: pipeline stages compose to
 * the whole model, batched multi-slot decode equals separate decodes, chunked prefill equals
 * one chunk, and bad rows are refused. References: the engine's own whole-model path, which
 * eval-golden checks against transformers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backend/cpu/cpu_simd.h"
#include "strata/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static char *fixture(const char *name) {
    const char *root = getenv("STRATA_FIXTURES");
    char *models = st_path_join(root ? root : "tests/fixtures", "models");
    char *p = st_path_join(models, name);
    free(models);
    return p;
}

static const char *g_models[] = {"llama-mlx-q3g32-mixed", "qwen3-bf16", "qwen3_moe-bf16-sharded", "minimax_m2-mlx-q5g64"};

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float m = 0;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) m = d;
    }
    return m;
}

/* Two stages (embedding + layers [0, s), layers [s, n) + output) give the whole model's
 * logits bit for bit: same kernels, same order. */
static void test_stages_compose(void **state) {
    (void)state;
    for (size_t mi = 0; mi < sizeof g_models / sizeof g_models[0]; mi++) {
        char *dir = fixture(g_models[mi]);
        st_err err = {0};
        model *whole = NULL, *s0 = NULL, *s1 = NULL;
        assert_int_equal(model_load(&whole, dir, NULL, &err), 0);
        int n = whole->desc.n_layer, split = n / 2 > 0 ? n / 2 : 1;
        model_load_opts o0 = {.layer_begin = 0, .layer_end = split, .with_embed = 1, .with_output = 0};
        model_load_opts o1 = {.layer_begin = split, .layer_end = n, .with_embed = 0, .with_output = 1};
        assert_int_equal(model_load(&s0, dir, &o0, &err), 0);
        assert_int_equal(model_load(&s1, dir, &o1, &err), 0);
        assert_true(s0->weight_bytes < whole->weight_bytes);
        const int T = 9, V = whole->desc.n_vocab, D = whole->desc.n_embd;
        int32_t toks[9] = {1, 5, 9, 100, 7, 3, 250, 11, 42}, pos[9], slot[9] = {0};
        for (int i = 0; i < T; i++) pos[i] = i;
        model_ctx_opts co = {.max_ctx = 32, .n_slots = 1, .max_batch = 4, .n_threads = 2};
        model_ctx *cw, *c0, *c1;
        assert_int_equal(model_ctx_init(&cw, whole, &co, &err), 0);
        assert_int_equal(model_ctx_init(&c0, s0, &co, &err), 0);
        assert_int_equal(model_ctx_init(&c1, s1, &co, &err), 0);
        float *ref = malloc((size_t)T * V * 4), *got = malloc((size_t)T * V * 4), *h = malloc((size_t)T * D * 4);
        assert_int_equal(model_forward(cw, toks, pos, slot, T, ref, LOGITS_ALL, &err), 0);
        assert_int_equal(model_forward_stage(c0, toks, NULL, pos, slot, T, h, NULL, LOGITS_NONE, &err), 0);
        assert_int_equal(model_forward_stage(c1, NULL, h, pos, slot, T, NULL, got, LOGITS_ALL, &err), 0);
        assert_true(max_abs_diff(ref, got, (size_t)T * V) == 0.0f);
        /* a stage without the embedding refuses token ids; one without the output refuses logits */
        assert_int_equal(model_forward_stage(c1, toks, NULL, pos, slot, T, NULL, got, LOGITS_ALL, &err), ST_ERR_ARG);
        assert_int_equal(model_forward_stage(c0, toks, NULL, pos, slot, T, NULL, got, LOGITS_ALL, &err), ST_ERR_ARG);
        free(ref), free(got), free(h);
        model_ctx_free(cw), model_ctx_free(c0), model_ctx_free(c1);
        model_free(whole), model_free(s0), model_free(s1);
        free(dir);
    }
}

/* S sequences decoded together (one forward of S rows in S slots) equal each sequence decoded
 * alone: within 1e-5 of max |logit| at S = 3, 3e-4 at S = 12 (12 rows take the prefill kernels:
 * other summation orders, 3-bit weights 4.4e-5), and bit for bit at
 * S = 3 and 6 on the fast path (up to 8 rows, a batched decode step runs as fused passes of
 * <= 4 rows whose rows do not depend on each other: the pipeline's and the serve scheduler's
 * batches give the very output of one sequence per step). */
static void batched_slots(int S, int exact_bits) {
    for (size_t mi = 0; mi < sizeof g_models / sizeof g_models[0]; mi++) {
        char *dir = fixture(g_models[mi]);
        st_err err = {0};
        model *m = NULL;
        assert_int_equal(model_load(&m, dir, NULL, &err), 0);
        const int V = m->desc.n_vocab, P = 5, G = 4;
        model_ctx_opts co = {.max_ctx = 16, .n_slots = S, .max_batch = 16, .n_threads = 2};
        model_ctx *cb, *c1;
        assert_int_equal(model_ctx_init(&cb, m, &co, &err), 0);
        co.n_slots = 1;
        assert_int_equal(model_ctx_init(&c1, m, &co, &err), 0);
        float *ref = malloc((size_t)S * G * V * 4), *got = malloc((size_t)S * V * 4);
        int32_t prompts[12][5], next[12];
        assert_true(S <= 12);
        for (int s = 0; s < S; s++)
            for (int i = 0; i < P; i++) prompts[s][i] = (int32_t)((s * 97 + i * 13 + 1) % V);
        /* reference: each sequence alone, greedy-free fixed continuation tokens */
        for (int s = 0; s < S; s++) {
            assert_int_equal(model_forward_seq(c1, prompts[s], P, 0, got, LOGITS_LAST, &err), 0);
            for (int g = 0; g < G; g++) {
                int32_t tk = (int32_t)((s * 31 + g * 17) % V);
                assert_int_equal(model_forward_seq(c1, &tk, 1, P + g, ref + ((size_t)s * G + g) * V, LOGITS_LAST, &err), 0);
            }
        }
        /* batched: prefill each slot, then G steps of S rows */
        for (int s = 0; s < S; s++) {
            int32_t pos[5], slot[5];
            for (int i = 0; i < P; i++) pos[i] = i, slot[i] = s;
            assert_int_equal(model_forward(cb, prompts[s], pos, slot, P, got, LOGITS_LAST, &err), 0);
        }
        for (int g = 0; g < G; g++) {
            int32_t pos[12], slot[12];
            for (int s = 0; s < S; s++) next[s] = (int32_t)((s * 31 + g * 17) % V), pos[s] = P + g, slot[s] = s;
            assert_int_equal(model_forward(cb, next, pos, slot, S, got, LOGITS_ALL, &err), 0);
            for (int s = 0; s < S; s++) {
                const float *r = ref + ((size_t)s * G + g) * V;
                float mx = 0;
                for (int i = 0; i < V; i++) mx = fabsf(r[i]) > mx ? fabsf(r[i]) : mx;
                const float d = max_abs_diff(got + (size_t)s * V, r, (size_t)V), tol = exact_bits ? 0.0f : (S > 8 ? 3e-4f : 1e-5f) * (1 + mx);
                if (!(d <= tol))
                    fprintf(stderr, "model %s, %d rows, step %d seq %d: max diff %g (max |logit| %g)\n", g_models[mi], S, g,
                            s, d, mx);
                assert_true(d <= tol);
            }
        }
        free(ref), free(got);
        model_ctx_free(cb), model_ctx_free(c1);
        model_free(m);
        free(dir);
    }
}

static void test_batched_slots(void **state) {
    (void)state;
    batched_slots(3, 0);
    batched_slots(12, 0);
    if (cpu_simd_level() >= CPU_SIMD_AVX2) batched_slots(3, 1), batched_slots(6, 1);
}

/* Rows outside the vocabulary / context / slots are refused with ST_ERR_ARG, not run. */
static void test_bad_rows(void **state) {
    (void)state;
    char *dir = fixture("qwen3-bf16");
    st_err err = {0};
    model *m = NULL;
    assert_int_equal(model_load(&m, dir, NULL, &err), 0);
    model_ctx_opts co = {.max_ctx = 8, .n_slots = 1, .max_batch = 4, .n_threads = 1};
    model_ctx *c;
    assert_int_equal(model_ctx_init(&c, m, &co, &err), 0);
    float *lg = malloc((size_t)m->desc.n_vocab * 4);
    int32_t tk = 1, bad = 100000, pos = 8, slot = 0, p0 = 0, badslot = 1;
    assert_int_equal(model_forward(c, &bad, &p0, &slot, 1, lg, LOGITS_LAST, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "vocabulary"));
    assert_int_equal(model_forward(c, &tk, &pos, &slot, 1, lg, LOGITS_LAST, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "context"));
    assert_int_equal(model_forward(c, &tk, &p0, &badslot, 1, lg, LOGITS_LAST, &err), ST_ERR_ARG);
    /* a context longer than max_position_embeddings is refused at init */
    model_ctx *c2 = NULL;
    model_ctx_opts big = {.max_ctx = (int)m->desc.max_pos + 1, .n_slots = 1};
    assert_int_equal(model_ctx_init(&c2, m, &big, &err), ST_ERR_ARG);
    assert_null(c2);
    free(lg);
    model_ctx_free(c);
    model_free(m);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stages_compose),
        cmocka_unit_test(test_batched_slots),
        cmocka_unit_test(test_bad_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
