/* test_sampler.c — sampler (sampler.h) and stop conditions (stop.h).
 *
 * Expected values are computed here independently of the code under test: softmax and nucleus
 * sets in double precision with full sorts, penalties by hand, stop matches by brute force over
 * the whole text. Distributions are checked with a chi-square test at alpha = 0.001 on fixed
 * seeds (so the tests are deterministic, not flaky).
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
#include <unistd.h>

#include "strata/base.h"
#include "strata/sampler.h"
#include "strata/stop.h"

// ----------------------------------------------------------------------------
// helpers

#define N_DRAWS 20000

/* chi-square critical values at alpha = 0.001, indexed by degrees of freedom */
static const double chi2_crit[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59};

/* Reference softmax(logits / T) in double. */
static void ref_softmax(const float *logits, int n, double t, double *p) {
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        if (logits[i] / t > mx) mx = logits[i] / t;
    for (int i = 0; i < n; i++) sum += p[i] = exp(logits[i] / t - mx);
    for (int i = 0; i < n; i++) p[i] /= sum;
}

/* Draws N_DRAWS tokens from fresh copies of logits into counts[n]. */
static void draw_counts(smp_sampler *s, const float *logits, int n, int *counts) {
    float *buf = malloc((size_t)n * sizeof *buf);
    assert_non_null(buf);
    memset(counts, 0, (size_t)n * sizeof *counts);
    for (int d = 0; d < N_DRAWS; d++) {
        memcpy(buf, logits, (size_t)n * sizeof *buf);
        int32_t id = smp_sample(s, buf);
        assert_true(id >= 0 && id < n);
        counts[id]++;
    }
    free(buf);
}

/* Asserts counts fit the expected probabilities p (tokens with p == 0 must never appear). */
static void check_chi2(const int *counts, const double *p, int n) {
    double chi = 0.0;
    int df = -1;
    for (int i = 0; i < n; i++) {
        if (p[i] == 0.0) {
            if (counts[i] != 0) fail_msg("token %d has probability 0 but was drawn %d times", i, counts[i]);
            continue;
        }
        double e = N_DRAWS * p[i];
        chi += (counts[i] - e) * (counts[i] - e) / e;
        df++;
    }
    assert_true(df >= 0 && df < (int)(sizeof chi2_crit / sizeof chi2_crit[0]));
    if (df > 0 && chi > chi2_crit[df]) fail_msg("chi-square %.2f > %.2f (df %d)", chi, chi2_crit[df], df);
}

/* Sampler from params, asserting success. */
static smp_sampler *mk(const smp_params *p, int n_vocab, size_t hist) {
    st_err err = {0};
    smp_sampler *s = smp_init(p, n_vocab, hist, &err);
    if (!s) fail_msg("smp_init: %s", err.msg);
    return s;
}

/* Deterministic pseudo-normal logits (sum of 4 uniforms, scaled). */
static void fill_logits(float *l, int n, uint64_t seed, float scale) {
    smp_rng r;
    smp_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        double u = 0;
        for (int k = 0; k < 4; k++) u += smp_rng_uniform(&r);
        l[i] = (float)((u - 2.0) * scale);
    }
}

/* Logits shaped like a real LM head: a bulk around 0 (sd ~2.5) and a few tokens far above it. */
static void fill_logits_peaked(float *l, int n, uint64_t seed) {
    fill_logits(l, n, seed, 4.3f);
    smp_rng r;
    smp_rng_seed(&r, seed ^ 0xabcdef);
    for (int h = 0; h < 12; h++) l[smp_rng_next(&r) % (uint64_t)n] = 14.0f + (float)h * 0.9f;
}

static const float *g_sort_logits;
static int cmp_rank(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    float lx = g_sort_logits[x], ly = g_sort_logits[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : 1;
}

/* order[0, n) = token ids by descending logit, ties by lower id (full sort reference). */
static void ref_rank(const float *logits, int n, int *order) {
    for (int i = 0; i < n; i++) order[i] = i;
    g_sort_logits = logits;
    qsort(order, (size_t)n, sizeof *order, cmp_rank);
}

// ----------------------------------------------------------------------------
// rng

static void test_rng_reference(void **state) {
    (void)state;
    /* splitmix64 from state 0: first output of Vigna's reference (also Java SplittableRandom) */
    uint64_t st = 0;
    assert_true(smp_splitmix64(&st) == 0xe220a8397b1dcdafull);
    /* xoshiro256** from {1,2,3,4}: 11520, 0 (worked by hand from the reference code) */
    smp_rng r = {{1, 2, 3, 4}};
    assert_true(smp_rng_next(&r) == 11520u);
    assert_true(smp_rng_next(&r) == 0u);
    smp_rng_seed(&r, 7);
    for (int i = 0; i < 1000; i++) {
        double u = smp_rng_uniform(&r);
        assert_true(u >= 0.0 && u < 1.0);
    }
}

// ----------------------------------------------------------------------------
// greedy, temperature

static void test_greedy_argmax_ties_lowest(void **state) {
    (void)state;
    smp_params p = smp_params_default();
    p.temperature = 0.0f;
    p.top_k = 2; /* ignored by greedy */
    smp_sampler *s = mk(&p, 6, 0);
    float l1[6] = {1, 5, 3, 5, -2, 5};
    assert_int_equal(smp_sample(s, l1), 1);
    float l2[6] = {NAN, -INFINITY, -1, -1, -3, -7};
    assert_int_equal(smp_sample(s, l2), 2);
    float l3[6] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, NAN};
    assert_int_equal(smp_sample(s, l3), -1);
    smp_free(s);
}

static void test_distribution_matches_softmax(void **state) {
    (void)state;
    const float logits[8] = {0.5f, 1.0f, -0.3f, 2.0f, 0.0f, 1.5f, -1.0f, 0.7f};
    const float temps[3] = {1.0f, 0.7f, 1.8f};
    for (int t = 0; t < 3; t++) {
        smp_params p = smp_params_default();
        p.temperature = temps[t];
        p.seed = 1000 + (uint64_t)t;
        smp_sampler *s = mk(&p, 8, 0);
        int counts[8];
        double prob[8];
        draw_counts(s, logits, 8, counts);
        ref_softmax(logits, 8, temps[t], prob);
        check_chi2(counts, prob, 8);
        smp_free(s);
    }
}

// ----------------------------------------------------------------------------
// truncation

static void test_top_k(void **state) {
    (void)state;
    /* small vocab: exact renormalised top-3 distribution */
    const float logits[7] = {0.1f, 2.0f, 1.0f, 1.9f, -0.5f, 1.2f, 1.2f};
    smp_params p = smp_params_default();
    p.top_k = 3;
    p.seed = 5;
    smp_sampler *s = mk(&p, 7, 0);
    int counts[7];
    draw_counts(s, logits, 7, counts);
    /* top 3: ids 1 (2.0), 3 (1.9), 5 (1.2, ties with 6 -> lower id) */
    double prob[7] = {0};
    double z = exp(2.0) + exp(1.9) + exp(1.2);
    prob[1] = exp(2.0) / z;
    prob[3] = exp(1.9) / z;
    prob[5] = exp(1.2) / z;
    check_chi2(counts, prob, 7);
    smp_free(s);

    /* large vocab: never outside the reference top k */
    enum { V = 151936, K = 40 };
    float *big = malloc(V * sizeof *big), *buf = malloc(V * sizeof *buf);
    int *order = malloc(V * sizeof *order);
    char *in_top = calloc(V, 1);
    assert_true(big && buf && order && in_top);
    char *seen = calloc(V, 1);
    for (int shape = 0; shape < 3; shape++) {
        /* wide normal logits, LM-like peaked logits, and all-equal logits (ties: lowest ids) */
        if (shape == 0) fill_logits(big, V, 99, 6.0f);
        else if (shape == 1) fill_logits_peaked(big, V, 98);
        else for (int i = 0; i < V; i++) big[i] = 0.25f;
        ref_rank(big, V, order);
        memset(in_top, 0, V);
        memset(seen, 0, V);
        for (int i = 0; i < K; i++) in_top[order[i]] = 1;
        p = smp_params_default();
        p.top_k = K;
        p.temperature = shape == 1 ? 30.0f : 3.0f; /* flatten so the tail of the top k gets drawn */
        p.seed = 11;
        s = mk(&p, V, 0);
        int distinct = 0;
        for (int d = 0; d < (shape == 2 ? 200 : 600); d++) { /* ties are the slow case */
            memcpy(buf, big, V * sizeof *buf);
            int32_t id = smp_sample(s, buf);
            assert_true(id >= 0 && id < V);
            if (!in_top[id]) fail_msg("shape %d: token %d outside the top %d", shape, id, K);
            if (!seen[id]++) distinct++;
        }
        if (distinct <= K / 2) fail_msg("shape %d: only %d distinct tokens drawn", shape, distinct);
        smp_free(s);
    }
    free(seen);
    free(in_top);
    free(order);
    free(buf);
    free(big);
}

static void test_top_p_minimal_nucleus(void **state) {
    (void)state;
    /* probabilities 0.1 0.5 0.15 0.25 (shuffled ids): ranked 0.5, 0.25, 0.15, 0.1 */
    const double pr[4] = {0.1, 0.5, 0.15, 0.25};
    float logits[4];
    for (int i = 0; i < 4; i++) logits[i] = (float)log(pr[i]);
    struct {
        float top_p;
        double expect[4];
    } cases[] = {
        {0.4f, {0, 1, 0, 0}},                       /* 0.5 >= 0.4: the top token alone  */
        {0.7f, {0, 0.5 / 0.75, 0, 0.25 / 0.75}},     /* 0.5 < 0.7 <= 0.75                */
        {0.8f, {0, 0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9}}, /* 0.75 < 0.8 <= 0.9             */
        {0.95f, {0.1, 0.5, 0.15, 0.25}},             /* needs all four                   */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        smp_params p = smp_params_default();
        p.top_p = cases[c].top_p;
        p.seed = 77 + c;
        smp_sampler *s = mk(&p, 4, 0);
        int counts[4];
        draw_counts(s, logits, 4, counts);
        check_chi2(counts, cases[c].expect, 4);
        smp_free(s);
    }
}

static void test_top_p_large_vocab(void **state) {
    (void)state;
    enum { V = 151936 };
    float *big = malloc(V * sizeof *big), *buf = malloc(V * sizeof *buf);
    int *order = malloc(V * sizeof *order);
    char *in_set = calloc(V, 1);
    assert_true(big && buf && order && in_set);
    const float top_ps[4] = {0.5f, 0.9f, 0.99f, 0.99999f};
    for (int shape = 0; shape < 3; shape++)
    for (int c = 0; c < 4; c++) {
        if (shape == 0) fill_logits(big, V, 1234, 12.0f);
        else if (shape == 1) fill_logits_peaked(big, V, 1235);
        else for (int i = 0; i < V; i++) big[i] = -1.5f;
        ref_rank(big, V, order);
        /* reference nucleus: shortest ranked prefix with mass >= top_p */
        double mx = big[order[0]], z = 0.0, cum = 0.0;
        for (int i = 0; i < V; i++) z += exp(big[i] - mx);
        int m = 0;
        while (m < V && cum < top_ps[c] * z) cum += exp(big[order[m++]] - mx);
        memset(in_set, 0, V);
        for (int i = 0; i < m; i++) in_set[order[i]] = 1;
        smp_params p = smp_params_default();
        p.top_p = top_ps[c];
        p.seed = 3 + (uint64_t)c;
        smp_sampler *s = mk(&p, V, 0);
        int top_seen = 0;
        for (int d = 0; d < (shape == 2 ? 5 : 120); d++) { /* all ties: ranks half the vocabulary */
            memcpy(buf, big, V * sizeof *buf);
            int32_t id = smp_sample(s, buf);
            if (id < 0 || !in_set[id])
                fail_msg("shape %d top_p %.5f: token %d outside the %d-token nucleus", shape, top_ps[c], id, m);
            top_seen += id == order[0];
        }
        if (shape == 1) assert_true(top_seen > 0);
        if (shape == 2 && c == 0) assert_int_equal(m, V / 2); /* ties: exactly the lower half */
        smp_free(s);
    }
    free(in_set);
    free(order);
    free(buf);
    free(big);
}

static void test_min_p(void **state) {
    (void)state;
    /* probabilities 0.06 0.5 0.1 0.04 0.3; min_p 0.15 -> threshold 0.075 keeps 0.5 0.3 0.1 */
    const double pr[5] = {0.06, 0.5, 0.1, 0.04, 0.3};
    float logits[5];
    for (int i = 0; i < 5; i++) logits[i] = (float)log(pr[i]);
    smp_params p = smp_params_default();
    p.min_p = 0.15f;
    p.seed = 9;
    smp_sampler *s = mk(&p, 5, 0);
    int counts[5];
    draw_counts(s, logits, 5, counts);
    double expect[5] = {0, 0.5 / 0.9, 0.1 / 0.9, 0, 0.3 / 0.9};
    check_chi2(counts, expect, 5);
    smp_free(s);

    /* with top-p 0.7 (nucleus 0.5 + 0.3) and min_p 0.7 (threshold 0.35): only the top token */
    p.top_p = 0.7f;
    p.min_p = 0.7f;
    s = mk(&p, 5, 0);
    draw_counts(s, logits, 5, counts);
    assert_int_equal(counts[1], N_DRAWS);
    smp_free(s);

    /* top-p 0.95 (all but 0.04) then min_p 0.15: min-p decides, same as the first case */
    p.top_p = 0.95f;
    p.min_p = 0.15f;
    p.seed = 10;
    s = mk(&p, 5, 0);
    draw_counts(s, logits, 5, counts);
    check_chi2(counts, expect, 5);
    smp_free(s);

    /* top-k 2 then min-p 0.15: both survivors pass min-p (normaliser is over the top 2) */
    p = smp_params_default();
    p.top_k = 2;
    p.min_p = 0.15f;
    p.seed = 12;
    s = mk(&p, 5, 0);
    draw_counts(s, logits, 5, counts);
    double expect2[5] = {0, 0.5 / 0.8, 0, 0, 0.3 / 0.8};
    check_chi2(counts, expect2, 5);
    smp_free(s);
}

/* Huge magnitudes, -inf and NaN mixed in: selection must neither overflow nor admit them. */
static void test_extreme_values(void **state) {
    (void)state;
    enum { V = 1000 };
    float base[V], buf[V];
    fill_logits(base, V, 31, 3.0f);
    for (int i = 0; i < V; i += 7) base[i] = -INFINITY;
    for (int i = 3; i < V; i += 11) base[i] = NAN;
    base[500] = 3e38f;
    base[501] = 3e38f;
    base[502] = 2.9e38f;
    base[10] = -3e38f;
    for (int cfg = 0; cfg < 4; cfg++) {
        smp_params p = smp_params_default();
        p.seed = 8;
        if (cfg == 0) p.top_k = 2;
        if (cfg == 1) p.top_k = 5, p.temperature = 1e30f; /* flattened: the 5 largest, evenly */
        if (cfg == 2) p.top_p = 0.3f;
        if (cfg == 3) p.min_p = 0.5f;
        smp_sampler *s = mk(&p, V, 0);
        int hits[3] = {0};
        for (int d = 0; d < 400; d++) {
            memcpy(buf, base, sizeof buf);
            int32_t id = smp_sample(s, buf);
            if (cfg == 1) {
                if (id < 500 || id > 502) {
                    /* T = 1e30 maps the top three to 0.3 / 0.3 / 0.29, the rest to ~0: the top
                     * 5 are those three and the two next-largest ordinary logits */
                    assert_true(id >= 0 && id < V && !isnan(base[id]) && base[id] > -INFINITY);
                }
            } else {
                if (id != 500 && id != 501) fail_msg("cfg %d drew %d", cfg, id);
                hits[id - 500]++;
            }
        }
        if (cfg == 0 || cfg == 3) assert_true(hits[0] > 100 && hits[1] > 100); /* the tie splits evenly */
        if (cfg == 2) assert_int_equal(hits[0], 400); /* mass 1 of 2 >= 0.3: the first-ranked alone */
        smp_free(s);
    }
    /* greedy on the same: the lowest of the tied maxima */
    smp_params p = smp_params_default();
    p.temperature = 0.0f;
    smp_sampler *s = mk(&p, V, 0);
    memcpy(buf, base, sizeof buf);
    assert_int_equal(smp_sample(s, buf), 500);
    smp_free(s);

    /* top_k larger than the number of live tokens: no truncation */
    float few[6] = {-INFINITY, 0.0f, NAN, 0.0f, -INFINITY, -INFINITY};
    p = smp_params_default();
    p.top_k = 4;
    p.seed = 2;
    s = mk(&p, 6, 0);
    int counts[6];
    draw_counts(s, few, 6, counts);
    check_chi2(counts, (double[]){0, 0.5, 0, 0.5, 0, 0}, 6);
    smp_free(s);
}

// ----------------------------------------------------------------------------
// penalties and bias

static void test_penalties_exact(void **state) {
    (void)state;
    smp_params p = smp_params_default();
    p.temperature = 0.0f; /* greedy: logits are left exactly as the penalties made them */
    p.repetition_penalty = 2.0f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    smp_sampler *s = mk(&p, 6, 0);
    const int32_t prompt[2] = {2, 5};
    smp_accept_prompt(s, prompt, 2);
    smp_accept(s, 3);
    smp_accept(s, 3);
    smp_accept(s, 4);
    float l[6] = {1.0f, 2.0f, 3.0f, -1.0f, 4.0f, -0.5f};
    smp_sample(s, l);
    assert_true(l[0] == 1.0f);                           /* unseen                                */
    assert_true(l[1] == 2.0f);                           /* unseen                                */
    assert_true(l[2] == 1.5f);                           /* prompt: 3 / 2                         */
    assert_true(l[3] == -3.0f);                          /* gen x2: -1 * 2 - (0.5 + 0.25 * 2)     */
    assert_true(l[4] == 1.25f);                          /* gen x1: 4 / 2 - (0.5 + 0.25)          */
    assert_true(l[5] == -1.0f);                          /* prompt: -0.5 * 2                      */

    /* reset clears every count */
    smp_reset(s);
    const float orig[6] = {1.0f, 2.0f, 3.0f, -1.0f, 4.0f, -0.5f};
    float l2[6];
    memcpy(l2, orig, sizeof l2);
    smp_sample(s, l2);
    assert_memory_equal(l2, orig, sizeof l2);
    smp_free(s);

    /* a window of 3 tokens: the oldest accepted tokens fall out */
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 1.0f;
    p.frequency_penalty = 0.0f;
    s = mk(&p, 6, 3);
    smp_accept(s, 0);
    smp_accept(s, 1);
    smp_accept(s, 1);
    smp_accept(s, 2); /* window now 1 1 2 */
    float l3[6] = {0, 0, 0, 0, 0, 0};
    assert_int_equal(smp_sample(s, l3), 0); /* 0 left the window: unpenalised again, lowest id */
    assert_true(l3[0] == 0.0f && l3[1] == -1.0f && l3[2] == -1.0f);
    smp_accept(s, 2);
    smp_accept(s, 2); /* window 2 2 2 */
    float l4[6] = {0, 0, 0, 0, 0, 0};
    smp_sample(s, l4);
    assert_true(l4[1] == 0.0f && l4[2] == -1.0f);
    smp_free(s);

    /* negative presence penalty rewards repeats (OpenAI allows [-2, 2]) */
    p = smp_params_default();
    p.temperature = 0.0f;
    p.presence_penalty = -1.0f;
    s = mk(&p, 3, 0);
    smp_accept(s, 2);
    float l5[3] = {1.0f, 0.5f, 0.25f};
    assert_int_equal(smp_sample(s, l5), 2);
    assert_true(l5[2] == 1.25f);
    smp_free(s);
}

static void test_logit_bias(void **state) {
    (void)state;
    smp_bias bias[3] = {{1, -INFINITY}, {2, 3.0f}, {2, 0.5f}};
    smp_params p = smp_params_default();
    p.temperature = 0.0f;
    p.logit_bias = bias;
    p.n_logit_bias = 3;
    smp_sampler *s = mk(&p, 4, 0);
    bias[0].bias = 0.0f; /* the sampler holds its own copy */
    float l[4] = {1.0f, 10.0f, 0.0f, 3.0f};
    assert_int_equal(smp_sample(s, l), 2); /* 1 banned; 0 + 3 + 0.5 = 3.5 beats 3 */
    assert_true(l[2] == 3.5f && l[1] == -INFINITY);
    smp_free(s);

    /* sampling never draws a banned token, even the most likely one */
    bias[0].bias = -INFINITY;
    p.temperature = 1.0f;
    p.n_logit_bias = 1;
    p.seed = 4;
    s = mk(&p, 4, 0);
    const float base[4] = {1.0f, 10.0f, 0.0f, 3.0f};
    int counts[4];
    draw_counts(s, base, 4, counts);
    assert_int_equal(counts[1], 0);
    smp_free(s);

    /* everything banned: -1, with and without sampling */
    smp_bias all[2] = {{0, -INFINITY}, {1, -INFINITY}};
    p.logit_bias = all;
    p.n_logit_bias = 2;
    s = mk(&p, 2, 0);
    float l2[2] = {1, 2};
    assert_int_equal(smp_sample(s, l2), -1);
    smp_free(s);

    /* a bias id outside the vocabulary is an argument error */
    smp_bias bad = {4, 1.0f};
    p.logit_bias = &bad;
    p.n_logit_bias = 1;
    st_err err = {0};
    assert_null(smp_init(&p, 4, 0, &err));
    assert_int_equal(err.code, ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "logit_bias"));
}

// ----------------------------------------------------------------------------
// seeds, logprobs, parameter checks

static void run_seq(smp_sampler *s, const float *logits, int n, int32_t *out, int len) {
    float *buf = malloc((size_t)n * sizeof *buf);
    for (int i = 0; i < len; i++) {
        memcpy(buf, logits, (size_t)n * sizeof *buf);
        out[i] = smp_sample(s, buf);
        smp_accept(s, out[i]);
    }
    free(buf);
}

static void test_seed_reproducible(void **state) {
    (void)state;
    enum { V = 64, L = 200 };
    float logits[V];
    fill_logits(logits, V, 5, 2.0f);
    smp_params p = smp_params_default();
    p.top_k = 30;
    p.top_p = 0.9f;
    p.frequency_penalty = 0.1f;
    p.seed = 123;
    int32_t a[L], b[L], c[L], d[L];
    smp_sampler *s1 = mk(&p, V, 0), *s2 = mk(&p, V, 0);
    run_seq(s1, logits, V, a, L);
    run_seq(s2, logits, V, b, L);
    assert_memory_equal(a, b, sizeof a);
    smp_reset(s1); /* a reset sampler replays its sequence */
    run_seq(s1, logits, V, d, L);
    assert_memory_equal(a, d, sizeof a);
    p.seed = 124;
    smp_sampler *s3 = mk(&p, V, 0);
    run_seq(s3, logits, V, c, L);
    assert_true(memcmp(a, c, sizeof a) != 0);
    smp_free(s1);
    smp_free(s2);
    smp_free(s3);
}

static void test_logprobs(void **state) {
    (void)state;
    const float base[5] = {1.0f, 2.0f, 3.0f, 0.5f, 3.0f};
    smp_params p = smp_params_default();
    p.temperature = 0.5f;
    p.top_k = 1; /* truncation must not affect the reported distribution */
    smp_sampler *s = mk(&p, 5, 0);
    float l[5];
    memcpy(l, base, sizeof l);
    smp_logprob top[8];
    int32_t n_top = -1;
    float chosen = 0;
    int32_t id = smp_sample_logprobs(s, l, 8, top, &n_top, &chosen);
    assert_int_equal(id, 2); /* top-1 with a tie: lower id */
    double ref[5];
    ref_softmax(base, 5, 0.5, ref);
    assert_int_equal(n_top, 5);
    const int32_t want[5] = {2, 4, 1, 0, 3};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(top[i].id, want[i]);
        assert_true(fabs(top[i].logprob - log(ref[want[i]])) < 1e-5);
    }
    assert_true(fabs(chosen - log(ref[2])) < 1e-5);
    smp_free(s);

    /* greedy reports the T = 1 distribution; n_top smaller than the vocabulary */
    p = smp_params_default();
    p.temperature = 0.0f;
    s = mk(&p, 5, 0);
    memcpy(l, base, sizeof l);
    id = smp_sample_logprobs(s, l, 2, top, &n_top, &chosen);
    ref_softmax(base, 5, 1.0, ref);
    assert_int_equal(id, 2);
    assert_int_equal(n_top, 2);
    assert_int_equal(top[0].id, 2);
    assert_int_equal(top[1].id, 4);
    assert_true(fabs(chosen - log(ref[2])) < 1e-5);
    assert_true(fabs(top[1].logprob - log(ref[4])) < 1e-5);
    smp_free(s);
}

static void test_params_rejected(void **state) {
    (void)state;
    const char *field[5] = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty"};
    for (int i = 0; i < 5; i++) {
        smp_params p = smp_params_default();
        switch (i) {
        case 0: p.temperature = -0.1f; break;
        case 1: p.top_k = -1; break;
        case 2: p.top_p = 0.0f; break;
        case 3: p.min_p = 1.5f; break;
        case 4: p.repetition_penalty = 0.0f; break;
        }
        st_err err = {0};
        assert_null(smp_init(&p, 10, 0, &err));
        assert_int_equal(err.code, ST_ERR_ARG);
        if (!strstr(err.msg, field[i])) fail_msg("message '%s' does not name %s", err.msg, field[i]);
    }
    smp_params p = smp_params_default();
    p.n_vocab = 11;
    st_err err = {0};
    assert_null(smp_init(&p, 10, 0, &err));
    assert_int_equal(err.code, ST_ERR_ARG);
    assert_null(smp_init(&p, 0, 0, &err));
}

/* Not a correctness test: per-token cost on a Qwen-sized vocabulary, printed for the record. */
static void test_speed_large_vocab(void **state) {
    (void)state;
    enum { V = 151936, T = 50 };
    float *big = malloc(V * sizeof *big), *buf = malloc(V * sizeof *buf);
    assert_true(big && buf);
    struct {
        const char *name;
        float temp, top_p, min_p;
        int32_t top_k;
    } cfg[] = {
        {"greedy", 0.0f, 1.0f, 0.0f, 0},          {"full softmax", 1.0f, 1.0f, 0.0f, 0},
        {"top_k 40 + top_p 0.95", 0.8f, 0.95f, 0.0f, 40}, {"top_p 0.95", 0.8f, 0.95f, 0.0f, 0},
        {"min_p 0.05", 0.8f, 1.0f, 0.05f, 0},     {"top_p 0.9 + min_p 0.05", 0.8f, 0.9f, 0.05f, 0},
    };
    for (int shape = 0; shape < 2; shape++)
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        if (shape == 0) fill_logits_peaked(big, V, 42);
        else fill_logits(big, V, 42, 8.0f);
        smp_params p = smp_params_default();
        p.temperature = cfg[c].temp;
        p.top_p = cfg[c].top_p;
        p.min_p = cfg[c].min_p;
        p.top_k = cfg[c].top_k;
        p.repetition_penalty = 1.1f;
        smp_sampler *s = mk(&p, V, 0);
        double t0 = st_time_s(), t_copy = 0;
        for (int i = 0; i < T; i++) {
            double a = st_time_s();
            memcpy(buf, big, V * sizeof *buf);
            t_copy += st_time_s() - a;
            smp_accept(s, smp_sample(s, buf));
        }
        double us = (st_time_s() - t0 - t_copy) / T * 1e6;
        print_message("[ sampler  ] %-24s %8.1f us/token (V=%d, %s logits)\n", cfg[c].name, us, V,
                      shape == 0 ? "LM-like" : "wide normal");
        smp_free(s);
    }
    free(buf);
    free(big);
}

// ----------------------------------------------------------------------------
// stop strings

/* Feeds pieces (NULL-terminated list) and a flush; collects emitted text into got. Returns the
 * final status (STOP_STRING if any feed matched). */
static int feed_all(stop_matcher *m, const char *const *pieces, char *got, size_t *got_len) {
    char out[256];
    *got_len = 0;
    int r = STOP_NONE;
    for (int i = 0; pieces[i]; i++) {
        size_t k;
        size_t len = strlen(pieces[i]);
        assert_true(len + stop_matcher_hold_max(m) <= sizeof out);
        int rc = stop_matcher_feed(m, pieces[i], len, out, sizeof out, &k);
        memcpy(got + *got_len, out, k);
        *got_len += k;
        if (rc == STOP_STRING) r = STOP_STRING;
    }
    size_t k;
    int rc = stop_matcher_flush(m, out, sizeof out, &k);
    memcpy(got + *got_len, out, k);
    *got_len += k;
    got[*got_len] = 0;
    if (rc == STOP_STRING) r = STOP_STRING;
    return r;
}

/* One scenario: stop strings, pieces, expected emitted text and matched index (-1 none). */
static void expect_stream(const char *const *stops, int n, const char *const *pieces, const char *want, int want_idx) {
    st_err err = {0};
    stop_matcher *m = stop_matcher_init(stops, n, &err);
    if (!m) fail_msg("stop_matcher_init: %s", err.msg);
    char got[1024];
    size_t len;
    int r = feed_all(m, pieces, got, &len);
    if (strcmp(got, want) != 0) fail_msg("emitted '%s', want '%s'", got, want);
    assert_int_equal(stop_matcher_matched(m), want_idx);
    assert_int_equal(r, want_idx >= 0 ? STOP_STRING : STOP_NONE);
    stop_matcher_free(m);
}

static void test_stop_split_across_pieces(void **state) {
    (void)state;
    const char *stops[] = {"</stop>"};
    expect_stream(stops, 1, (const char *[]){"Hello </s", "top> more", NULL}, "Hello ", 0);
    expect_stream(stops, 1, (const char *[]){"<", "/", "s", "t", "o", "p", ">", "x", NULL}, "", 0);
    expect_stream(stops, 1, (const char *[]){"</stop>", NULL}, "", 0);
    expect_stream(stops, 1, (const char *[]){"a", "", "b</st", "", "op>c", NULL}, "ab", 0);

    /* the held text is released only once it can no longer start the stop string */
    st_err err = {0};
    stop_matcher *m = stop_matcher_init(stops, 1, &err);
    assert_non_null(m);
    char out[64];
    size_t k;
    assert_int_equal(stop_matcher_feed(m, "a </s", 5, out, sizeof out, &k), STOP_NONE);
    assert_int_equal(k, 2);
    assert_memory_equal(out, "a ", 2);
    assert_int_equal(stop_matcher_feed(m, "to", 2, out, sizeof out, &k), STOP_NONE);
    assert_int_equal(k, 0);
    assert_int_equal(stop_matcher_feed(m, "x", 1, out, sizeof out, &k), STOP_NONE);
    assert_int_equal(k, 6);
    assert_memory_equal(out, "</stox", 6);
    /* after a match the matcher is finished */
    assert_int_equal(stop_matcher_feed(m, "</stop>", 7, out, sizeof out, &k), STOP_STRING);
    assert_int_equal(k, 0);
    assert_int_equal(stop_matcher_feed(m, "more", 4, out, sizeof out, &k), STOP_STRING);
    assert_int_equal(k, 0);
    assert_int_equal(stop_matcher_flush(m, out, sizeof out, &k), STOP_STRING);
    assert_int_equal(k, 0);
    stop_matcher_reset(m);
    assert_int_equal(stop_matcher_matched(m), -1);
    assert_int_equal(stop_matcher_feed(m, "ok", 2, out, sizeof out, &k), STOP_NONE);
    assert_int_equal(k, 2);
    stop_matcher_free(m);
}

static void test_stop_divergence_and_overlap(void **state) {
    (void)state;
    /* diverging continuation releases the held prefix */
    const char *one[] = {"</s>"};
    expect_stream(one, 1, (const char *[]){"x </", "s", "x", " y", NULL}, "x </sx y", -1);
    expect_stream(one, 1, (const char *[]){"end </s", NULL}, "end </s", -1); /* flushed at the end */

    /* overlapping prefixes: "</s>" and "</stop>" */
    const char *two[] = {"</s>", "</stop>"};
    expect_stream(two, 2, (const char *[]){"a</st", "x", NULL}, "a</stx", -1);
    expect_stream(two, 2, (const char *[]){"a</s", ">b", NULL}, "a", 0);
    expect_stream(two, 2, (const char *[]){"a</sto", "p>b", NULL}, "a", 1);
    expect_stream(two, 2, (const char *[]){"</s</st", "op>", NULL}, "</s", 1);

    /* self-overlapping stop string (the KMP case) */
    const char *aab[] = {"aab"};
    expect_stream(aab, 1, (const char *[]){"aa", "a", "b", NULL}, "a", 0);
    expect_stream(aab, 1, (const char *[]){"aaaa", "aab", NULL}, "aaaa", 0);

    /* multiple stop strings: the first to complete wins; same end -> earlier start */
    const char *multi[] = {"\n\nUser:", "###", "bc", "abcd"};
    expect_stream(multi, 4, (const char *[]){"foo #", "#", "# bar", NULL}, "foo ", 1);
    expect_stream(multi, 4, (const char *[]){"hi\n", "\nUs", "er: x", NULL}, "hi", 0);
    expect_stream(multi, 4, (const char *[]){"xabcd", NULL}, "xa", 2);
    const char *tie[] = {"bc", "abc"};
    expect_stream(tie, 2, (const char *[]){"xab", "c", NULL}, "x", 1);

    /* no stop strings: everything passes straight through */
    expect_stream(NULL, 0, (const char *[]){"a", "bc", NULL}, "abc", -1);

    /* empty stop strings are rejected */
    st_err err = {0};
    const char *empty[] = {"ok", ""};
    assert_null(stop_matcher_init(empty, 2, &err));
    assert_int_equal(err.code, ST_ERR_ARG);
}

/* Brute-force reference: the stop string whose first occurrence ends earliest in text (ties:
 * earlier start). Returns the emitted length and the index (-1 when none matches). */
static size_t ref_stop(const char *const *stops, int n, const char *text, int *idx) {
    size_t tl = strlen(text);
    for (size_t e = 1; e <= tl; e++) {
        int best = -1;
        size_t bl = 0;
        for (int i = 0; i < n; i++) {
            size_t L = strlen(stops[i]);
            if (L <= e && memcmp(text + e - L, stops[i], L) == 0 && L > bl) {
                best = i;
                bl = L;
            }
        }
        if (best >= 0) {
            *idx = best;
            return e - bl;
        }
    }
    *idx = -1;
    return tl;
}

static void test_stop_chunking_invariant(void **state) {
    (void)state;
    const char *stops[] = {"<|im_end|>", "<|im", "END", "ENDING", "ababc", "\n\n\n"};
    const char *texts[] = {
        "plain text without any stop",
        "some <|im_start|> then <|im_end|> after",
        "the ENDING is near",
        "abababababc tail",
        "two\n\nnewlines then three\n\n\n.",
        "<|i<|i<|",
        "ENDEND",
    };
    const int n_stops_per_case[] = {1, 2, 6};
    smp_rng r;
    smp_rng_seed(&r, 2024);
    for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
        for (int sc = 0; sc < 3; sc++) {
            const char *const *st = sc == 0 ? stops : sc == 1 ? stops + 2 : stops;
            int ns = n_stops_per_case[sc];
            int want_idx;
            size_t want_len = ref_stop(st, ns, texts[t], &want_idx);
            for (int trial = 0; trial < 20; trial++) {
                /* random cut points; trial 0 feeds the whole text, trial 1 byte by byte */
                char pieces_buf[64][64];
                const char *pieces[65];
                size_t tl = strlen(texts[t]), pos = 0;
                int np = 0;
                while (pos < tl) {
                    size_t len = trial == 0 ? tl : trial == 1 ? 1 : 1 + (size_t)(smp_rng_next(&r) % 6);
                    if (len > tl - pos) len = tl - pos;
                    memcpy(pieces_buf[np], texts[t] + pos, len);
                    pieces_buf[np][len] = 0;
                    pieces[np] = pieces_buf[np];
                    np++;
                    pos += len;
                }
                pieces[np] = NULL;
                char want[128];
                memcpy(want, texts[t], want_len);
                want[want_len] = 0;
                expect_stream(st, ns, pieces, want, want_idx);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// EOS ids and token-level checks

static char g_tmp[64];

static void write_file(const char *name, const char *content) {
    char *path = st_path_join(g_tmp, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
    free(path);
}

static void remove_file(const char *name) {
    char *path = st_path_join(g_tmp, name);
    unlink(path);
    free(path);
}

static int setup_tmp(void **state) {
    (void)state;
    snprintf(g_tmp, sizeof g_tmp, "/tmp/strata_test_stop_XXXXXX");
    return mkdtemp(g_tmp) ? 0 : -1;
}

static int teardown_tmp(void **state) {
    (void)state;
    remove_file("config.json");
    remove_file("generation_config.json");
    return rmdir(g_tmp);
}

static void test_eos_load(void **state) {
    (void)state;
    int32_t ids[8];
    int n = -1;
    st_err err = {0};

    /* config.json alone, an int */
    write_file("config.json", "{\"model_type\": \"llama\", \"eos_token_id\": 2}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_OK);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 2);

    /* plus generation_config.json with a list: union, no duplicates, config.json first */
    write_file("generation_config.json", "{\"eos_token_id\": [2, 7], \"do_sample\": true}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 7);

    /* config.json list, generation_config.json int; text_config fallback */
    write_file("config.json", "{\"eos_token_id\": [151645, 151643]}");
    write_file("generation_config.json", "{\"eos_token_id\": 151643}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 151645);
    assert_int_equal(ids[1], 151643);
    write_file("config.json", "{\"text_config\": {\"eos_token_id\": 1}}");
    write_file("generation_config.json", "{\"eos_token_id\": null}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_OK);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 1);

    /* too many ids for the caller's array */
    write_file("config.json", "{\"eos_token_id\": [1, 2, 3]}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 2, &n, &err), ST_ERR_LIMIT);
    assert_int_equal(n, 0);

    /* bad JSON names the file and the position */
    write_file("config.json", "{\"eos_token_id\": 2}");
    write_file("generation_config.json", "{\"eos_token_id\": [2, 7,}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_ERR_FORMAT);
    assert_int_equal(n, 0);
    if (!strstr(err.msg, "generation_config.json") || !strstr(err.msg, "invalid JSON"))
        fail_msg("unclear error: %s", err.msg);

    /* wrong types */
    write_file("generation_config.json", "{\"eos_token_id\": \"</s>\"}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "eos_token_id"));
    write_file("generation_config.json", "{\"eos_token_id\": [1, -3]}");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_ERR_FORMAT);
    write_file("generation_config.json", "[1, 2]");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_ERR_FORMAT);

    /* missing config.json */
    remove_file("generation_config.json");
    remove_file("config.json");
    assert_int_equal(stop_load_eos(g_tmp, ids, 8, &n, &err), ST_ERR_IO);
    assert_non_null(strstr(err.msg, "config.json"));

    /* a real fixture, when the test runs under ctest */
    const char *fx = getenv("STRATA_FIXTURES");
    if (fx) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/models/llama-bf16", fx);
        assert_int_equal(stop_load_eos(dir, ids, 8, &n, &err), ST_OK);
        assert_int_equal(n, 1);
        assert_int_equal(ids[0], 2);
    }
}

static void test_stop_check_token(void **state) {
    (void)state;
    const int32_t eos[2] = {2, 7};
    assert_int_equal(stop_check_token(eos, 2, 7, 1, 10), STOP_EOS);
    assert_int_equal(stop_check_token(eos, 2, 5, 9, 10), STOP_NONE);
    assert_int_equal(stop_check_token(eos, 2, 5, 10, 10), STOP_LENGTH);
    assert_int_equal(stop_check_token(eos, 2, 2, 10, 10), STOP_EOS); /* EOS beats the limit */
    assert_int_equal(stop_check_token(eos, 2, 5, 1000000, 0), STOP_NONE); /* 0 = no limit */
    assert_int_equal(stop_check_token(NULL, 0, 2, 1, 0), STOP_NONE);
    assert_true(stop_is_eos(eos, 2, 2));
    assert_false(stop_is_eos(eos, 2, 3));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_reference),
        cmocka_unit_test(test_greedy_argmax_ties_lowest),
        cmocka_unit_test(test_distribution_matches_softmax),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p_minimal_nucleus),
        cmocka_unit_test(test_top_p_large_vocab),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_extreme_values),
        cmocka_unit_test(test_penalties_exact),
        cmocka_unit_test(test_logit_bias),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_params_rejected),
        cmocka_unit_test(test_speed_large_vocab),
        cmocka_unit_test(test_stop_split_across_pieces),
        cmocka_unit_test(test_stop_divergence_and_overlap),
        cmocka_unit_test(test_stop_chunking_invariant),
        cmocka_unit_test_setup_teardown(test_eos_load, setup_tmp, teardown_tmp),
        cmocka_unit_test(test_stop_check_token),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
