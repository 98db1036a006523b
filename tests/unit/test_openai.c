/* test_openai.c — request validation and response formatting of `strata serve`
 * (src/serve/openai.c, metrics.c): every rejected field is named, defaults match OpenAI's,
 * chunks and SSE framing have the documented shapes, text with broken UTF-8 still yields valid
 * JSON, histograms render cumulatively. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#ifdef STRATA_HAVE_MHD
#include "serve/serve_internal.h"

#include <math.h>
#include <string.h>

#define V 1000

static int parse(oai_request *r, int kind, const char *body, oai_error *e) {
    memset(e, 0, sizeof *e);
    return oai_request_parse(r, kind, body, strlen(body), V, e);
}

/* Expects body to be rejected with status and param. */
static void expect_bad(int kind, const char *body, int status, const char *param) {
    oai_request r;
    oai_error e;
    int rc = parse(&r, kind, body, &e);
    if (rc != status || strcmp(e.param, param)) fail_msg("%s: got %d param '%s' (%s)", body, rc, e.param, e.message);
    assert_true(e.message[0] != 0);
}

static void test_chat_defaults(void **state) {
    (void)state;
    oai_request r;
    oai_error e;
    assert_int_equal(parse(&r, OAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &e), 0);
    assert_string_equal(r.model, "m");
    assert_int_equal(json_array_size(r.messages), 1);
    assert_int_equal(r.stream, 0);
    assert_int_equal(r.max_tokens, 0);
    assert_true(fabsf(r.sampling.temperature - 1.0f) < 1e-6f); /* OpenAI's default */
    assert_true(fabsf(r.sampling.top_p - 1.0f) < 1e-6f);
    assert_int_equal(r.sampling.top_k, 0);
    assert_int_equal(r.n_stop, 0);
    assert_int_equal(r.seed_given, 0);
    oai_request_free(&r);
}

static void test_chat_fields(void **state) {
    (void)state;
    oai_request r;
    oai_error e;
    const char *body =
        "{\"messages\":[{\"role\":\"developer\",\"content\":\"be brief\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]}],"
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"max_completion_tokens\":7,"
        "\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,\"min_p\":0.05,\"presence_penalty\":0.5,"
        "\"frequency_penalty\":-0.5,\"seed\":123,\"stop\":[\"x\",\"yy\"],\"logit_bias\":{\"5\":2.5,\"7\":-100},"
        "\"n\":1,\"logprobs\":true,\"top_logprobs\":3}";
    assert_int_equal(parse(&r, OAI_CHAT, body, &e), 0);
    assert_int_equal(r.stream, 1);
    assert_int_equal(r.include_usage, 1);
    assert_int_equal(r.max_tokens, 7);
    assert_true(fabsf(r.sampling.temperature - 0.5f) < 1e-6f);
    assert_true(fabsf(r.sampling.top_p - 0.9f) < 1e-6f);
    assert_int_equal(r.sampling.top_k, 40);
    assert_true(fabsf(r.sampling.min_p - 0.05f) < 1e-6f);
    assert_true(fabsf(r.sampling.presence_penalty - 0.5f) < 1e-6f);
    assert_true(fabsf(r.sampling.frequency_penalty + 0.5f) < 1e-6f);
    assert_int_equal(r.sampling.seed, 123);
    assert_int_equal(r.seed_given, 1);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[1], "yy");
    assert_int_equal(r.sampling.n_logit_bias, 2);
    assert_ptr_equal(r.sampling.logit_bias, r.bias);
    for (int i = 0; i < 2; i++) {
        if (r.bias[i].id == 5) assert_true(fabsf(r.bias[i].bias - 2.5f) < 1e-6f);
        else assert_true(r.bias[i].id == 7 && isinf(r.bias[i].bias) && r.bias[i].bias < 0); /* -100 bans */
    }
    assert_int_equal(r.logprobs, 1);
    assert_int_equal(r.top_logprobs, 3);
    /* content parts are flattened, developer becomes system for the template */
    json_t *m0 = json_array_get(r.messages, 0), *m1 = json_array_get(r.messages, 1);
    assert_string_equal(json_string_value(json_object_get(m0, "role")), "system");
    assert_string_equal(json_string_value(json_object_get(m1, "content")), "ab");
    oai_request_free(&r);
}

static void test_stop_string_form(void **state) {
    (void)state;
    oai_request r;
    oai_error e;
    assert_int_equal(parse(&r, OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stop\":\"END\"}", &e), 0);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "END");
    oai_request_free(&r);
}

static void test_chat_errors(void **state) {
    (void)state;
    const char *msg = "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]";
    char b[512];
    expect_bad(OAI_CHAT, "{", 400, "");
    expect_bad(OAI_CHAT, "[]", 400, "");
    expect_bad(OAI_CHAT, "{\"a\":1,\"a\":2}", 400, ""); /* duplicate keys */
    expect_bad(OAI_CHAT, "{}", 400, "messages");
    expect_bad(OAI_CHAT, "{\"messages\":[]}", 400, "messages");
    expect_bad(OAI_CHAT, "{\"messages\":[1]}", 400, "messages[0]");
    expect_bad(OAI_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", 400, "messages[0].role");
    expect_bad(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages[0].content");
    expect_bad(OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", 400,
               "messages[0].content");
    struct {
        const char *field, *param;
    } cases[] = {
        {"\"model\":5", "model"},
        {"\"temperature\":2.5", "temperature"},
        {"\"temperature\":\"hot\"", "temperature"},
        {"\"top_p\":0", "top_p"},
        {"\"top_p\":1.5", "top_p"},
        {"\"min_p\":-0.1", "min_p"},
        {"\"top_k\":1.5", "top_k"},
        {"\"presence_penalty\":3", "presence_penalty"},
        {"\"frequency_penalty\":-3", "frequency_penalty"},
        {"\"max_tokens\":0", "max_tokens"},
        {"\"max_tokens\":\"5\"", "max_tokens"},
        {"\"max_completion_tokens\":-1", "max_completion_tokens"},
        {"\"n\":2", "n"},
        {"\"seed\":\"x\"", "seed"},
        {"\"stream\":1", "stream"},
        {"\"stream_options\":{\"include_usage\":1}", "stream_options.include_usage"},
        {"\"stop\":5", "stop"},
        {"\"stop\":[\"\"]", "stop"},
        {"\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"j\",\"k\",\"l\",\"m\",\"n\",\"o\",\"p\",\"q\"]",
         "stop"},
        {"\"logit_bias\":[1]", "logit_bias"},
        {"\"logit_bias\":{\"abc\":1}", "logit_bias"},
        {"\"logit_bias\":{\"1000\":1}", "logit_bias"}, /* = n_vocab */
        {"\"logit_bias\":{\"1\":101}", "logit_bias"},
        {"\"logprobs\":\"yes\"", "logprobs"},
        {"\"top_logprobs\":21,\"logprobs\":true", "top_logprobs"},
        {"\"top_logprobs\":2", "top_logprobs"},
        {"\"tools\":[{\"type\":\"function\"}]", "tools"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(b, sizeof b, "{%s,%s}", msg, cases[i].field);
        expect_bad(OAI_CHAT, b, 400, cases[i].param);
    }
}

static void test_completion(void **state) {
    (void)state;
    oai_request r;
    oai_error e;
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":\"Once\",\"logprobs\":2,\"max_tokens\":3}", &e), 0);
    assert_string_equal(r.prompt, "Once");
    assert_int_equal(r.logprobs, 1);
    assert_int_equal(r.top_logprobs, 2);
    oai_request_free(&r);
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":[\"one\"]}", &e), 0);
    assert_string_equal(r.prompt, "one");
    oai_request_free(&r);
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":[1,2,999]}", &e), 0);
    assert_null(r.prompt);
    assert_int_equal(r.n_prompt_ids, 3);
    assert_int_equal(r.prompt_ids[2], 999);
    oai_request_free(&r);
    expect_bad(OAI_COMPLETION, "{}", 400, "prompt");
    expect_bad(OAI_COMPLETION, "{\"prompt\":[1,1000]}", 400, "prompt");
    expect_bad(OAI_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}", 400, "prompt");
    expect_bad(OAI_COMPLETION, "{\"prompt\":\"x\",\"logprobs\":6}", 400, "logprobs");
    expect_bad(OAI_COMPLETION, "{\"prompt\":\"x\",\"echo\":true}", 400, "echo");
    expect_bad(OAI_COMPLETION, "{\"prompt\":\"x\",\"best_of\":2}", 400, "best_of");
}

static void test_error_json(void **state) {
    (void)state;
    oai_error e;
    assert_int_equal(oai_error_set(&e, 404, "invalid_request_error", "model", "model_not_found", "no %s", "x"), 404);
    char *s = oai_error_json(&e);
    assert_string_equal(s, "{\"error\":{\"message\":\"no x\",\"type\":\"invalid_request_error\",\"param\":\"model\","
                           "\"code\":\"model_not_found\"}}");
    free(s);
    oai_error_set(&e, 500, "server_error", NULL, NULL, "boom");
    s = oai_error_json(&e);
    assert_string_equal(s, "{\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,\"code\":null}}");
    free(s);
}

static void test_chunks(void **state) {
    (void)state;
    json_t *c = oai_chunk_json(OAI_CHAT, "id1", "m", 7, "", 0, 1, NULL, NULL);
    char *s = json_dumps(c, JSON_COMPACT);
    assert_string_equal(s, "{\"id\":\"id1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\","
                           "\"system_fingerprint\":\"strata\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
                           "\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}");
    free(s);
    json_decref(c);
    c = oai_chunk_json(OAI_CHAT, "id1", "m", 7, "", 0, 0, "length", NULL);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(c, "choices"), 0), "finish_reason")),
                        "length");
    assert_int_equal(json_object_size(json_object_get(json_array_get(json_object_get(c, "choices"), 0), "delta")), 0);
    sbuf b = {0};
    assert_int_equal(oai_sse_event(&b, c), 0);
    assert_true(!strncmp(b.p, "data: {", 7));
    assert_true(b.len > 2 && !strcmp(b.p + b.len - 2, "\n\n"));
    assert_ptr_equal(strchr(b.p, '\n'), b.p + b.len - 2); /* one line per event */
    sbuf_free(&b);
    json_decref(c);
    /* broken UTF-8 from a byte-level token still gives a valid JSON string (U+FFFD) */
    c = oai_chunk_json(OAI_COMPLETION, "id2", "m", 7, "a\xE4\xBD", 3, 0, NULL, NULL);
    const char *t = json_string_value(json_object_get(json_array_get(json_object_get(c, "choices"), 0), "text"));
    assert_string_equal(t, "a\xEF\xBF\xBD\xEF\xBF\xBD");
    json_decref(c);
    oai_usage u = {.prompt_tokens = 5, .cached_tokens = 2, .completion_tokens = 3, .decode_s = 0.5, .prefill_s = 0.1};
    c = oai_response_json(OAI_CHAT, "id3", "m", 1, "hey", 3, "stop", NULL, &u);
    json_t *us = json_object_get(c, "usage");
    assert_int_equal(json_integer_value(json_object_get(us, "total_tokens")), 8);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(us, "prompt_tokens_details"), "cached_tokens")), 2);
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_array_get(json_object_get(c, "choices"), 0), "message"), "content")),
                        "hey");
    assert_true(fabs(json_real_value(json_object_get(json_object_get(c, "timings"), "predicted_per_second")) - 4.0) < 1e-9);
    json_decref(c);
}

static void test_legacy_logprobs(void **state) {
    (void)state;
    json_t *content = json_loads("[{\"token\":\"He\",\"logprob\":-1.0,\"top_logprobs\":[{\"token\":\"He\",\"logprob\":-1.0},"
                                 "{\"token\":\"I\",\"logprob\":-2.0}]},{\"token\":\"llo\",\"logprob\":-0.5,\"top_logprobs\":[]}]",
                                 0, NULL);
    json_t *l = oai_logprobs_legacy(content, 10);
    char *s = json_dumps(l, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(s, "{\"text_offset\":[10,12],\"token_logprobs\":[-1.0,-0.5],\"tokens\":[\"He\",\"llo\"],"
                           "\"top_logprobs\":[{\"He\":-1.0,\"I\":-2.0},{}]}");
    free(s);
    json_decref(l);
    json_decref(content);
}

static void test_json_escape(void **state) {
    (void)state;
    sbuf b = {0};
    assert_int_equal(oai_json_escape(&b, "a\"b\\c\n\t\x01\xC3\xA9\xFF", 11), 0);
    assert_string_equal(b.p, "a\\\"b\\\\c\\n\\t\\u0001\xC3\xA9\xEF\xBF\xBD");
    sbuf_free(&b);
    /* overlong and surrogate encodings are replaced byte by byte */
    assert_int_equal(oai_json_escape(&b, "\xC0\xAF\xED\xA0\x80", 5), 0);
    assert_string_equal(b.p, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    sbuf_free(&b);
}

static void test_metrics(void **state) {
    (void)state;
    serve_metrics m;
    metrics_init(&m);
    metrics_count_status(&m, MET_EP_CHAT, 200);
    metrics_count_status(&m, MET_EP_CHAT, 200);
    metrics_count_status(&m, MET_EP_COMPLETIONS, 429);
    metrics_observe(&m, &m.ttft, 0.003);
    metrics_observe(&m, &m.ttft, 0.2);
    metrics_observe(&m, &m.ttft, 1000);
    serve_gauges g = {.slots_used = 1, .slots_total = 4, .queue_depth = 2, .queue_max = 8, .kv_tokens_used = 10,
                      .kv_tokens_total = 400};
    sbuf o = {0};
    metrics_render(&m, &g, &o);
    assert_non_null(strstr(o.p, "strata_requests_total{endpoint=\"chat\",code=\"200\"} 2\n"));
    assert_non_null(strstr(o.p, "strata_requests_total{endpoint=\"completions\",code=\"429\"} 1\n"));
    assert_non_null(strstr(o.p, "strata_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
    assert_non_null(strstr(o.p, "strata_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
    assert_non_null(strstr(o.p, "strata_time_to_first_token_seconds_bucket{le=\"60\"} 2\n"));
    assert_non_null(strstr(o.p, "strata_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
    assert_non_null(strstr(o.p, "strata_time_to_first_token_seconds_count 3\n"));
    assert_non_null(strstr(o.p, "strata_kv_slots_used 1\n"));
    assert_non_null(strstr(o.p, "strata_queue_depth 2\n"));
    assert_non_null(strstr(o.p, "# TYPE strata_inter_token_seconds histogram\n"));
    sbuf_free(&o);
    metrics_destroy(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_defaults), cmocka_unit_test(test_chat_fields),
        cmocka_unit_test(test_stop_string_form), cmocka_unit_test(test_chat_errors),
        cmocka_unit_test(test_completion),    cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_chunks),        cmocka_unit_test(test_legacy_logprobs),
        cmocka_unit_test(test_json_escape),   cmocka_unit_test(test_metrics),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
#else
static void test_skipped(void **state) {
    (void)state;
    skip(); /* built without libmicrohttpd: no src/serve/ */
}
int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_skipped)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
#endif
