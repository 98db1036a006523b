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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_percentile),   cmocka_unit_test(test_mbu_residency), cmocka_unit_test(test_bytes_dense),
        cmocka_unit_test(test_bytes_moe),    cmocka_unit_test(test_report_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
