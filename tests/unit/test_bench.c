/* test_bench.c — bench metrics on synthetic timings and on fixture models with hand-computed
 * byte counts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "strata/bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_percentile(void **state) {
    (void)state;
    double v[] = {5, 1, 4, 2, 3}; /* sorted: 1 2 3 4 5 */
    assert_float_equal(bench_percentile(v, 5, 50), 3.0, 1e-12);
    assert_float_equal(bench_percentile(v, 5, 0), 1.0, 1e-12);
    assert_float_equal(bench_percentile(v, 5, 100), 5.0, 1e-12);
    assert_float_equal(bench_percentile(v, 5, 90), 4.6, 1e-12); /* numpy: 4 + 0.6 * (5 - 4) */
    double w[100];
    for (int i = 0; i < 100; i++) w[i] = 99 - i;
    assert_float_equal(bench_percentile(w, 100, 99), 98.01, 1e-9);
    assert_float_equal(bench_percentile(NULL, 0, 50), 0.0, 0);
}

static void test_mbu_residency(void **state) {
    (void)state;
    /* 1 GB per token at 10 ms per token on a 200 GB/s machine reads 100 GB/s: MBU 0.5 */
    assert_float_equal(bench_mbu(1e9, 0.010, 200e9), 0.5, 1e-12);
    assert_float_equal(bench_mbu(0, 0.010, 200e9), 0.0, 0);
    assert_float_equal(bench_residency(3000, 2000, 2), 0.75, 1e-12);
    assert_float_equal(bench_residency(5000, 2000, 2), 1.0, 0); /* clamped */
    assert_float_equal(bench_residency(1, 0, 2), 0.0, 0);
}

static char *fixture(const char *name) {
    const char *root = getenv("STRATA_FIXTURES");
    char *models = st_path_join(root ? root : "tests/fixtures", "models");
    char *p = st_path_join(models, name);
    free(models);
    return p;
}

/* Dense bf16 llama: hidden 128, 4 heads x 32, 2 kv heads, ff 256, vocab 512, 3 layers.
 * Per layer: q 128x128 + k 64x128 + v 64x128 + o 128x128 + 3 x 256x128 = 147456 params, bf16.
 * Output 512x128 bf16, plus one embedding row (128 x 2 bytes). KV at ctx 10, f32:
 * 10 x 3 layers x 2 x 64 x 4 bytes. */
static void test_bytes_dense(void **state) {
    (void)state;
    char *dir = fixture("llama-bf16");
    st_err err = {0};
    model *m = NULL;
    assert_int_equal(model_load(&m, dir, NULL, &err), 0);
    double want = 3.0 * 147456 * 2 + 512.0 * 128 * 2 + 128 * 2 + 10.0 * 3 * 2 * 64 * 4;
    assert_float_equal(bench_bytes_per_token(m, 10, 4), want, 1e-6);
    model_free(m);
    free(dir);
}

/* qwen3_moe bf16: layer 0 dense (ff 256), layers 1-2 MoE with 8 experts of 64, top-2:
 * only 2/8 of the expert bytes count, plus the 8x128 router. Attention: q 128x128, k/v 64x128,
 * o 128x128. Untied output 512x128. */
static void test_bytes_moe(void **state) {
    (void)state;
    char *dir = fixture("qwen3_moe-bf16-sharded");
    st_err err = {0};
    model *m = NULL;
    assert_int_equal(model_load(&m, dir, NULL, &err), 0);
    double attn = (128.0 * 128 * 2 + 64.0 * 128 * 2) * 2;
    double dense = 3.0 * 256 * 128 * 2;
    double expert = 3.0 * 64 * 128 * 2;
    double want = 3 * attn + dense + 2 * (8.0 * 128 * 2 + 2 * expert) + 512.0 * 128 * 2 + 128 * 2;
    assert_float_equal(bench_bytes_per_token(m, 0, 4), want, 1e-6);
    model_free(m);
    free(dir);
}

static void test_report_roundtrip(void **state) {
    (void)state;
    bench_result r;
    memset(&r, 0, sizeof r);
    snprintf(r.model, sizeof r.model, "unit");
    r.decode_tok_s = 50;
    r.lat_p50_ms = 20;
    r.mbu = 0.61;
    char dir[] = "/tmp/strata-bench-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char *md = st_path_join(dir, "report.md"), *js = st_path_join(dir, "report.json");
    st_err err = {0};
    assert_int_equal(bench_write_md(&r, md, &err), 0);
    assert_int_equal(bench_write_json(&r, js, &err), 0);
    char *txt = NULL;
    assert_int_equal(st_file_read(md, &txt, NULL, &err), 0);
    assert_non_null(strstr(txt, "| **Tokens Per Second** | **50.0 TPS**"));
    free(txt);
    r.decode_tok_s = 100;
    char *out = NULL;
    size_t outlen = 0;
    FILE *f = open_memstream(&out, &outlen);
    assert_int_equal(bench_compare(&r, js, f, &err), 0);
    fclose(f);
    assert_non_null(strstr(out, "| decode_tok_s | 50 | 100 | 2.000 |"));
    free(out);
    unlink(md), unlink(js), rmdir(dir);
    free(md), free(js);
}

/* ---- bench_decode_steps: a fake batched decoder whose ids depend on (token, position, slot) */

typedef struct fake_dec {
    int calls, fail_at;   /* fail_at: index of the call that fails (-1: none)                   */
    int sizes[64];        /* B of each call                                                    */
    int rows[32];         /* times each slot was submitted                                     */
    int bad;              /* a call with a slot outside 0..31                                   */
} fake_dec;

static int32_t fake_id(int32_t tok, int32_t pos, int32_t slot) { return (tok * 31 + pos * 7 + slot * 3 + 1) % 1009; }

static int fake_decode(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int B, int32_t *next,
                       st_err *err) {
    fake_dec *f = ctx;
    const int call = f->calls++;
    if (call == f->fail_at) return st_err_set(err, ST_ERR_INTERNAL, "fake decode failed at call %d", call);
    if (call < 64) f->sizes[call] = B;
    for (int b = 0; b < B; b++) {
        if (slot[b] < 0 || slot[b] >= 32) {
            f->bad = 1;
            continue;
        }
        f->rows[slot[b]]++;
        next[b] = fake_id(tokens[b], pos[b], slot[b]);
    }
    return ST_OK;
}

static void test_decode_steps(void **state) {
    (void)state;
    enum { N = 19, STEPS = 5 };
    fake_dec f;
    memset(&f, 0, sizeof f);
    f.fail_at = -1;
    int32_t cur[N], pos[N], scratch[2 * N], log0[STEPS], want_cur[N], want_pos[N], want_log0[STEPS];
    double ms[STEPS];
    for (int s = 0; s < N; s++) cur[s] = want_cur[s] = s * 13, pos[s] = want_pos[s] = 100 + s;
    for (int st = 0; st < STEPS; st++) /* sequentially, one sequence at a time */
        for (int s = 0; s < N; s++) {
            want_cur[s] = fake_id(want_cur[s], want_pos[s], s), want_pos[s]++;
            if (s == 0) want_log0[st] = want_cur[0];
        }
    st_err err = {0};
    assert_int_equal(bench_decode_steps(fake_decode, &f, N, 8, STEPS, cur, pos, scratch, ms, log0, NULL, &err), 0);
    assert_int_equal(f.calls, STEPS * 3); /* ceil(19 / 8) calls per step */
    for (int c = 0; c < f.calls; c++) assert_int_equal(f.sizes[c], c % 3 == 2 ? 3 : 8);
    assert_false(f.bad);
    for (int s = 0; s < N; s++) assert_int_equal(f.rows[s], STEPS);
    assert_memory_equal(cur, want_cur, sizeof cur);
    assert_memory_equal(pos, want_pos, sizeof pos);
    assert_memory_equal(log0, want_log0, sizeof log0);
    for (int st = 0; st < STEPS; st++) assert_true(ms[st] >= 0);

    /* n <= max_rows: one call per step */
    memset(&f, 0, sizeof f);
    f.fail_at = -1;
    assert_int_equal(bench_decode_steps(fake_decode, &f, 8, 8, 2, cur, pos, scratch, NULL, NULL, NULL, &err), 0);
    assert_int_equal(f.calls, 2);
    assert_int_equal(f.sizes[0], 8);
}

static void test_decode_steps_errors(void **state) {
    (void)state;
    enum { N = 19 };
    int32_t cur[N], pos[N], scratch[2 * N], want_cur[N], want_pos[N];
    for (int s = 0; s < N; s++) cur[s] = s, pos[s] = 10;
    for (int s = 0; s < N; s++) want_cur[s] = fake_id(s, 10, s), want_pos[s] = 11;
    fake_dec f;
    memset(&f, 0, sizeof f);
    f.fail_at = 4; /* the second call of the second step */
    st_err err = {0};
    assert_int_equal(bench_decode_steps(fake_decode, &f, N, 8, 5, cur, pos, scratch, NULL, NULL, NULL, &err),
                     ST_ERR_INTERNAL);
    assert_non_null(strstr(err.msg, "fake decode failed at call 4"));
    assert_int_equal(f.calls, 5); /* nothing submitted after the failure */
    assert_memory_equal(cur, want_cur, sizeof cur); /* the state after the one complete step */
    assert_memory_equal(pos, want_pos, sizeof pos);
    /* bad arguments: nothing called */
    memset(&f, 0, sizeof f);
    f.fail_at = -1;
    assert_int_equal(bench_decode_steps(fake_decode, &f, 0, 8, 1, cur, pos, scratch, NULL, NULL, NULL, &err), ST_ERR_ARG);
    assert_int_equal(bench_decode_steps(fake_decode, &f, N, 0, 1, cur, pos, scratch, NULL, NULL, NULL, &err), ST_ERR_ARG);
    assert_int_equal(bench_decode_steps(fake_decode, &f, N, 8, -1, cur, pos, scratch, NULL, NULL, NULL, &err), ST_ERR_ARG);
    assert_int_equal(f.calls, 0);
}

static void test_report_aggregate(void **state) {
    (void)state;
    bench_result r;
    memset(&r, 0, sizeof r);
    r.concurrency = 32, r.aggregate_tok_s = 1234.5, r.agg_step_p50_ms = 25.9;
    snprintf(r.agg_note, sizeof r.agg_note, "32 sequences: 4 replays of <= 8 rows per step");
    char *out = NULL;
    size_t outlen = 0;
    FILE *f = open_memstream(&out, &outlen);
    bench_print_table(&r, f);
    fclose(f);
    assert_non_null(strstr(out, "| **Aggregate TPS** | **1234.5 TPS** | 32 sequences decoding together, step p50 25.90 ms; "
                                "32 sequences: 4 replays of <= 8 rows per step |"));
    free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_percentile),   cmocka_unit_test(test_mbu_residency), cmocka_unit_test(test_bytes_dense),
        cmocka_unit_test(test_bytes_moe),    cmocka_unit_test(test_report_roundtrip),
        cmocka_unit_test(test_decode_steps), cmocka_unit_test(test_decode_steps_errors),
        cmocka_unit_test(test_report_aggregate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
