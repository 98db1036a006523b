/* test_config.c — config.json -> model_desc (model.h) on good and bad input.
 *
 * Good input: the fixture checkpoints' config.json files, whose expected descriptor fields are
 * read off the JSON by hand here (hidden 128, 4 heads ...), and small configs derived from a
 * minimal llama config with one field changed. Bad input: each error case asserts the status
 * code and a one-line message that starts with the file name and names the field / problem.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strata/base.h"
#include "strata/model.h"

// ----------------------------------------------------------------------------
// helpers

#define WHAT "cfg/config.json"

/* A minimal valid llama config; cases patch it with jansson. */
static const char *BASE = "{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"hidden_size\":64,"
                          "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"intermediate_size\":128,"
                          "\"vocab_size\":100,\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"bos_token_id\":1,"
                          "\"eos_token_id\":2,\"hidden_act\":\"silu\"}";

static const char *fixtures(void) {
    const char *fx = getenv("STRATA_FIXTURES");
    return fx ? fx : "tests/fixtures";
}

/* Loads a fixture model's descriptor, failing the test on error. */
static void load_fixture(model_desc *d, const char *name) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/%s", fixtures(), name);
    st_err err = {0};
    if (model_desc_load(d, dir, &err)) fail_msg("%s: %s", name, err.msg);
}

/* BASE with `patch` (a JSON object) merged on top; keys whose value is the string "<del>" are
 * removed. Returns malloc'ed JSON text. */
static char *patched(const char *base, const char *patch) {
    json_error_t je;
    json_t *b = json_loads(base, 0, &je), *p = json_loads(patch, 0, &je);
    if (!b || !p) fail_msg("bad test JSON: %s (%s)", je.text, patch);
    const char *k;
    json_t *v;
    json_object_foreach(p, k, v) {
        if (json_is_string(v) && !strcmp(json_string_value(v), "<del>")) json_object_del(b, k);
        else json_object_set(b, k, v);
    }
    char *s = json_dumps(b, JSON_COMPACT);
    json_decref(b);
    json_decref(p);
    return s;
}

static int parse_text(model_desc *d, const char *txt, st_err *err) {
    return model_desc_parse(d, txt, strlen(txt), WHAT, err);
}

/* Asserts msg is one line starting with "<what>: " and containing needle. */
static void check_msg(const char *msg, const char *what, const char *needle, const char *label) {
    size_t wl = strlen(what);
    if (strncmp(msg, what, wl) || strncmp(msg + wl, ": ", 2))
        fail_msg("%s: message does not start with '%s: ': %s", label, what, msg);
    if (!strstr(msg, needle)) fail_msg("%s: message lacks '%s': %s", label, needle, msg);
    if (strchr(msg, '\n')) fail_msg("%s: message is not one line: %s", label, msg);
}

/* BASE+patch must fail with code and a message containing needle; d must be left zeroed. */
static void expect_bad_on(const char *base, const char *patch, int code, const char *needle) {
    char *txt = patched(base, patch);
    model_desc d;
    st_err err = {0};
    int rc = parse_text(&d, txt, &err);
    if (rc != code) fail_msg("%s: returned %d, want %d (%s)", patch, rc, code, rc ? err.msg : "accepted");
    assert_int_equal(err.code, code);
    check_msg(err.msg, WHAT, needle, patch);
    assert_null(d.layer_moe);
    assert_null(d.q_over);
    free(txt);
}

static void expect_bad(const char *patch, int code, const char *needle) { expect_bad_on(BASE, patch, code, needle); }

/* BASE+patch must parse; the descriptor goes to *d (caller frees). */
static void expect_ok_on(const char *base, const char *patch, model_desc *d) {
    char *txt = patched(base, patch);
    st_err err = {0};
    if (parse_text(d, txt, &err)) fail_msg("%s rejected: %s", patch, err.msg);
    free(txt);
}

static void expect_ok(const char *patch, model_desc *d) { expect_ok_on(BASE, patch, d); }

// ----------------------------------------------------------------------------
// syntax: JSON and UTF-8

static void test_invalid_json(void **state) {
    (void)state;
    /* the stray '8' is on line 3, column 21 (2 spaces + 13-char key + ':' + ' ' + "12" + ' ') */
    const char *txt = "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 12 8\n}";
    model_desc d;
    st_err err = {0};
    assert_int_equal(parse_text(&d, txt, &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid JSON at line 3 column 21", "stray token");
    assert_int_equal(parse_text(&d, "", &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid JSON at line", "empty");
    assert_int_equal(parse_text(&d, "{\"model_type\":\"llama\",}", &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid JSON at line 1 column 23", "trailing comma");
    assert_int_equal(parse_text(&d, "[1]", &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "top level is not a JSON object", "array");
    /* duplicate keys are rejected, not resolved silently */
    assert_int_equal(parse_text(&d, "{\"model_type\":\"llama\",\"model_type\":\"qwen3\"}", &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "duplicate object key", "duplicate");
    /* embedded NUL inside the buffer */
    assert_int_equal(model_desc_parse(&d, "{\"a\":1}\0{}", 10, WHAT, &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid JSON", "nul");
}

static void test_non_utf8(void **state) {
    (void)state;
    model_desc d;
    st_err err = {0};
    /* 0xff never occurs in UTF-8; it sits on line 2, column 18 */
    const char *txt = "{\n  \"model_type\": \"ll\xff\x61ma\"}";
    assert_int_equal(parse_text(&d, txt, &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid UTF-8 at line 2 column", "0xff");
    /* Latin-1 e-acute in a key */
    assert_int_equal(parse_text(&d, "{\"caf\xe9\":1}", &err), ST_ERR_FORMAT);
    check_msg(err.msg, WHAT, "invalid UTF-8", "latin1");

    /* through model_desc_load the message names the real path (cleaned up before asserting) */
    const char *t = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/strata-cfg-XXXXXX", t && *t ? t : "/tmp");
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    char *p = st_path_join(dir, "config.json");
    FILE *f = fopen(p, "wb");
    int wrote = f && fputs(txt, f) >= 0;
    if (f) fclose(f);
    st_err e_bad = {0}, e_missing = {0};
    int rc_bad = model_desc_load(&d, dir, &e_bad);
    unlink(p);
    int rc_missing = model_desc_load(&d, dir, &e_missing);
    rmdir(dir);
    assert_true(wrote);
    assert_int_equal(rc_bad, ST_ERR_FORMAT);
    check_msg(e_bad.msg, p, "invalid UTF-8", "file");
    /* a missing config.json is an I/O error naming it */
    assert_int_equal(rc_missing, ST_ERR_IO);
    check_msg(e_missing.msg, p, "cannot open", "missing file");
    free(p);
}

// ----------------------------------------------------------------------------
// required fields and types

static void test_missing_fields(void **state) {
    (void)state;
    static const char *const req[] = {"num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                      "intermediate_size"};
    char patch[128], needle[128];
    for (size_t i = 0; i < sizeof req / sizeof req[0]; i++) {
        snprintf(patch, sizeof patch, "{\"%s\":\"<del>\"}", req[i]);
        snprintf(needle, sizeof needle, "missing required field \"%s\"", req[i]);
        expect_bad(patch, ST_ERR_MISSING, needle);
        snprintf(patch, sizeof patch, "{\"%s\":null}", req[i]);
        expect_bad(patch, ST_ERR_MISSING, needle);
    }
    expect_bad("{\"model_type\":\"<del>\"}", ST_ERR_MISSING, "missing required field \"model_type\"");
    expect_bad("{\"model_type\":7}", ST_ERR_MISSING, "missing required field \"model_type\"");
    /* MoE-specific requirements */
    const char *moe = "{\"model_type\":\"qwen3_moe\",\"num_experts\":4,\"num_experts_per_tok\":2,"
                      "\"moe_intermediate_size\":32}";
    char *qbase = patched(BASE, moe);
    expect_bad_on(qbase, "{\"num_experts\":\"<del>\"}", ST_ERR_MISSING, "missing required field \"num_experts\"");
    expect_bad_on(qbase, "{\"num_experts_per_tok\":\"<del>\"}", ST_ERR_MISSING,
                  "missing required field \"num_experts_per_tok\"");
    expect_bad_on(qbase, "{\"moe_intermediate_size\":\"<del>\"}", ST_ERR_MISSING,
                  "missing required field \"moe_intermediate_size\"");
    free(qbase);
    char *mbase = patched(BASE, "{\"model_type\":\"minimax_m2\",\"num_local_experts\":4,\"num_experts_per_tok\":2}");
    expect_bad_on(mbase, "{\"num_local_experts\":\"<del>\"}", ST_ERR_MISSING,
                  "missing required field \"num_local_experts\"");
    expect_bad_on(mbase, "{\"intermediate_size\":\"<del>\"}", ST_ERR_MISSING,
                  "missing required field \"intermediate_size\"");
    free(mbase);
}

static void test_wrong_types(void **state) {
    (void)state;
    expect_bad("{\"hidden_size\":\"64\"}", ST_ERR_FORMAT, "field \"hidden_size\" must be an integer");
    expect_bad("{\"hidden_size\":64.5}", ST_ERR_FORMAT, "field \"hidden_size\" must be an integer");
    expect_bad("{\"num_hidden_layers\":true}", ST_ERR_FORMAT, "field \"num_hidden_layers\" must be an integer");
    expect_bad("{\"vocab_size\":[100]}", ST_ERR_FORMAT, "field \"vocab_size\" must be an integer");
    expect_bad("{\"num_hidden_layers\":0}", ST_ERR_FORMAT, "field \"num_hidden_layers\" = 0 is out of range");
    expect_bad("{\"hidden_size\":-64}", ST_ERR_FORMAT, "field \"hidden_size\" = -64 is out of range");
    /* huge reals must be range-checked before any conversion to an integer */
    expect_bad("{\"num_hidden_layers\":1e300}", ST_ERR_FORMAT, "field \"num_hidden_layers\"");
    expect_bad("{\"vocab_size\":-1e300}", ST_ERR_FORMAT, "field \"vocab_size\"");
    expect_bad("{\"max_position_embeddings\":9223372036854775807}", ST_ERR_FORMAT,
               "field \"max_position_embeddings\"");
    expect_bad("{\"rope_theta\":\"1e4\"}", ST_ERR_FORMAT, "field \"rope_theta\" must be a number");
    expect_bad("{\"rope_theta\":0}", ST_ERR_FORMAT, "rope_theta must be positive");
    expect_bad("{\"rms_norm_eps\":\"1e-5\"}", ST_ERR_FORMAT, "rms_norm_eps must be a number in (0, 1)");
    expect_bad("{\"rms_norm_eps\":0}", ST_ERR_FORMAT, "rms_norm_eps must be a number in (0, 1)");
    /* positive as a double, 0 as the float the descriptor stores (found by fuzz_config) */
    expect_bad("{\"rms_norm_eps\":1e-46}", ST_ERR_FORMAT, "rms_norm_eps must be a number in (0, 1)");
    expect_bad("{\"eos_token_id\":\"2\"}", ST_ERR_FORMAT, "eos_token_id must be an integer or a list");
    expect_bad("{\"eos_token_id\":[2,\"x\"]}", ST_ERR_FORMAT, "eos_token_id[1] is not an integer");
    expect_bad("{\"eos_token_id\":4294967298}", ST_ERR_FORMAT, "eos_token_id");
    expect_bad("{\"quantization\":4}", ST_ERR_FORMAT, "\"quantization\" must be an object");
    expect_bad("{\"num_attention_heads\":4,\"num_key_value_heads\":3}", ST_ERR_FORMAT,
               "num_attention_heads 4 is not a multiple of num_key_value_heads 3");
    expect_bad("{\"hidden_size\":3}", ST_ERR_FORMAT, "head_dim 0 is too small");
    expect_bad("{\"hidden_act\":\"gelu\"}", ST_ERR_UNSUPPORTED, "hidden_act \"gelu\" not supported");
    expect_bad("{\"attention_bias\":true}", ST_ERR_UNSUPPORTED, "attention_bias / mlp_bias are not supported");
    /* integral reals are integers (some exporters write 64.0) */
    model_desc d;
    expect_ok("{\"hidden_size\":64.0}", &d);
    assert_int_equal(d.n_embd, 64);
    model_desc_free(&d);
}

static void test_unsupported(void **state) {
    (void)state;
    expect_bad("{\"model_type\":\"gpt2\"}", ST_ERR_UNSUPPORTED, "unsupported model_type \"gpt2\"");
    expect_bad("{\"model_type\":\"LLAMA\"}", ST_ERR_UNSUPPORTED, "unsupported model_type \"LLAMA\"");
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}}", ST_ERR_UNSUPPORTED,
               "unsupported rope type \"yarn\"");
    expect_bad("{\"rope_scaling\":{\"type\":\"dynamic\",\"factor\":2}}", ST_ERR_UNSUPPORTED,
               "unsupported rope type \"dynamic\"");
    expect_bad("{\"rope_parameters\":{\"rope_type\":\"longrope\",\"rope_theta\":1e4}}", ST_ERR_UNSUPPORTED,
               "unsupported rope type \"longrope\"");
}

// ----------------------------------------------------------------------------
// quantization block

static void test_quant_errors(void **state) {
    (void)state;
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":32,\"mode\":\"mxfp4\"}}", ST_ERR_UNSUPPORTED,
               "quantization mode \"mxfp4\" is not supported");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":32,\"mode\":\"nvfp4\"}}", ST_ERR_UNSUPPORTED,
               "quantization mode \"nvfp4\"");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":32,\"mode\":1}}", ST_ERR_UNSUPPORTED,
               "quantization mode \"?\"");
    expect_bad("{\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128}}", ST_ERR_UNSUPPORTED,
               "quantization method \"gptq\" is not supported");
    expect_bad("{\"quantization_config\":{\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}}", ST_ERR_UNSUPPORTED,
               "quantization method \"fp8\"");
    expect_bad("{\"quantization\":{\"bits\":7,\"group_size\":64}}", ST_ERR_UNSUPPORTED, "quantization bits 7 not supported");
    expect_bad("{\"quantization\":{\"bits\":1,\"group_size\":64}}", ST_ERR_UNSUPPORTED, "quantization bits 1");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":48}}", ST_ERR_UNSUPPORTED,
               "quantization group_size 48 not supported");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":0}}", ST_ERR_UNSUPPORTED, "group_size 0");
    /* 2^32 + 4 must not wrap to 4 */
    expect_bad("{\"quantization\":{\"bits\":4294967300,\"group_size\":64}}", ST_ERR_UNSUPPORTED, "bits");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":4294967360}}", ST_ERR_UNSUPPORTED, "group_size");
    expect_bad("{\"quantization\":{\"bits\":\"4\",\"group_size\":64}}", ST_ERR_FORMAT,
               "quantization needs integer \"bits\" and \"group_size\"");
    expect_bad("{\"quantization\":{\"group_size\":64}}", ST_ERR_FORMAT, "quantization needs integer");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":64,\"lm_head\":{\"bits\":4}}}", ST_ERR_FORMAT,
               "quantization override \"lm_head\" needs bits and group_size");
    /* a key with an escaped newline stays on one line */
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":64,\"x\\ny\":{\"bits\":4}}}", ST_ERR_FORMAT,
               "quantization override \"x?y\" needs bits and group_size");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":64,\"lm_head\":{\"bits\":3,\"group_size\":48}}}",
               ST_ERR_UNSUPPORTED, "quantization override \"lm_head\": bits 3 group 48 not supported");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":64,\"lm_head\":{\"bits\":4294967304,\"group_size\":64}}}",
               ST_ERR_UNSUPPORTED, "quantization override \"lm_head\"");
    expect_bad("{\"quantization\":{\"bits\":4,\"group_size\":64,\"lm_head\":{\"bits\":8,\"group_size\":64,"
               "\"mode\":\"mxfp8\"}}}",
               ST_ERR_UNSUPPORTED, "quantization override \"lm_head\": mode not supported");
}

static void test_quant_overrides(void **state) {
    (void)state;
    model_desc d;
    load_fixture(&d, "llama-mlx-q3g32-mixed");
    assert_int_equal(d.q_bits, 3);
    assert_int_equal(d.q_group, 32);
    assert_int_equal(d.n_q_over, 4);
    int bits = -1, group = -1;
    assert_int_equal(model_desc_quant_override(&d, "lm_head", &bits, &group), 1);
    assert_int_equal(bits, 8);
    assert_int_equal(group, 64);
    bits = -1;
    assert_int_equal(model_desc_quant_override(&d, "model.layers.0.mlp.up_proj", &bits, &group), 1);
    assert_int_equal(bits, 0); /* `false`: not quantized */
    assert_int_equal(model_desc_quant_override(&d, "model.layers.1.mlp.down_proj", &bits, &group), 1);
    assert_int_equal(bits, 6);
    assert_int_equal(group, 64);
    assert_int_equal(model_desc_quant_override(&d, "model.layers.2.self_attn.v_proj", &bits, &group), 1);
    assert_int_equal(bits, 8);
    assert_int_equal(group, 32);
    bits = group = -7;
    assert_int_equal(model_desc_quant_override(&d, "model.layers.0.mlp.gate_proj", &bits, &group), 0);
    assert_int_equal(bits, -7); /* untouched */
    assert_int_equal(model_desc_quant_override(&d, "model.layers.0.mlp.up", &bits, &group), 0); /* no prefix match */
    assert_int_equal(model_desc_quant_override(&d, "bits", &bits, &group), 0);
    assert_int_equal(model_desc_quant_override(&d, "mode", &bits, &group), 0);
    model_desc_free(&d);

    /* `true` and unrelated scalars record nothing; `false` alone is an override */
    expect_ok("{\"quantization\":{\"bits\":4,\"group_size\":64,\"a\":true,\"b\":false,\"c\":\"x\",\"d\":3}}", &d);
    assert_int_equal(d.n_q_over, 1);
    assert_string_equal(d.q_over[0].path, "b");
    assert_int_equal(d.q_over[0].bits, 0);
    model_desc_free(&d);

    /* no quantization block: not quantized */
    load_fixture(&d, "qwen3-bf16");
    assert_int_equal(d.q_bits, 0);
    assert_int_equal(d.n_q_over, 0);
    model_desc_free(&d);
    /* "quantization_config" alone is read when "quantization" is absent */
    expect_ok("{\"quantization_config\":{\"bits\":8,\"group_size\":128}}", &d);
    assert_int_equal(d.q_bits, 8);
    assert_int_equal(d.q_group, 128);
    model_desc_free(&d);
    expect_ok("{\"quantization\":null}", &d);
    assert_int_equal(d.q_bits, 0);
    model_desc_free(&d);
}

// ----------------------------------------------------------------------------
// rope

/* Field-by-field equality of two descriptors (pointers compared by content). */
static void assert_desc_equal(const model_desc *a, const model_desc *b, int skip_layers) {
    assert_int_equal(a->arch, b->arch);
    assert_string_equal(a->model_type, b->model_type);
    if (!skip_layers) {
        assert_int_equal(a->n_layer, b->n_layer);
        assert_memory_equal(a->layer_moe, b->layer_moe, (size_t)a->n_layer);
    }
    assert_int_equal(a->n_embd, b->n_embd);
    assert_int_equal(a->n_head, b->n_head);
    assert_int_equal(a->n_head_kv, b->n_head_kv);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->n_ff, b->n_ff);
    assert_int_equal(a->n_vocab, b->n_vocab);
    assert_int_equal(a->max_pos, b->max_pos);
    assert_true(a->norm_eps == b->norm_eps);
    assert_true(a->rope_theta == b->rope_theta);
    assert_int_equal(a->n_rot, b->n_rot);
    assert_int_equal(a->rope_scaling, b->rope_scaling);
    assert_true(a->rope_factor == b->rope_factor);
    assert_true(a->rope_low_freq == b->rope_low_freq);
    assert_true(a->rope_high_freq == b->rope_high_freq);
    assert_int_equal(a->rope_orig_max_pos, b->rope_orig_max_pos);
    assert_int_equal(a->qk_norm, b->qk_norm);
    assert_int_equal(a->router, b->router);
    assert_int_equal(a->n_expert, b->n_expert);
    assert_int_equal(a->n_expert_used, b->n_expert_used);
    assert_int_equal(a->n_ff_expert, b->n_ff_expert);
    assert_int_equal(a->norm_topk_prob, b->norm_topk_prob);
    assert_string_equal(a->moe_prefix, b->moe_prefix);
    for (int i = 0; i < 3; i++) assert_string_equal(a->expert_names[i], b->expert_names[i]);
    assert_int_equal(a->tie_embeddings, b->tie_embeddings);
    assert_int_equal(a->bos_id, b->bos_id);
    assert_int_equal(a->n_eos, b->n_eos);
    assert_memory_equal(a->eos_ids, b->eos_ids, (size_t)a->n_eos * sizeof(int32_t));
    assert_int_equal(a->q_bits, b->q_bits);
    assert_int_equal(a->q_group, b->q_group);
    assert_int_equal(a->n_q_over, b->n_q_over);
}

static void test_rope_styles(void **state) {
    (void)state;
    model_desc a, b;
    load_fixture(&a, "llama-bf16");
    load_fixture(&b, "llama-f16-t5style");
    /* values read off llama-bf16/config.json */
    assert_int_equal(a.arch, ARCH_LLAMA);
    assert_true(a.rope_theta == 500000.0);
    assert_int_equal(a.rope_scaling, ROPE_SCALING_LLAMA3);
    assert_true(a.rope_factor == 8.0);
    assert_true(a.rope_low_freq == 1.0);
    assert_true(a.rope_high_freq == 4.0);
    assert_int_equal(a.rope_orig_max_pos, 64);
    assert_int_equal(a.n_rot, 32);
    assert_int_equal(a.head_dim, 32);
    assert_int_equal(a.n_layer, 3);
    assert_int_equal(b.n_layer, 2); /* the only real difference between the two configs */
    assert_desc_equal(&a, &b, 1);
    model_desc_free(&b);

    /* the same config rewritten in transformers >= 5 style must give an identical descriptor */
    char path[1024];
    snprintf(path, sizeof path, "%s/models/llama-bf16/config.json", fixtures());
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    assert_non_null(root);
    json_t *rp = json_deep_copy(json_object_get(root, "rope_scaling"));
    json_object_set(rp, "rope_theta", json_object_get(root, "rope_theta"));
    json_object_del(root, "rope_scaling");
    json_object_del(root, "rope_theta");
    json_object_set_new(root, "rope_parameters", rp);
    char *txt = json_dumps(root, 0);
    json_decref(root);
    st_err err = {0};
    if (parse_text(&b, txt, &err)) fail_msg("%s", err.msg);
    free(txt);
    assert_desc_equal(&a, &b, 0);
    model_desc_free(&a);
    model_desc_free(&b);

    /* rope_parameters.rope_theta wins over a top-level rope_theta */
    expect_ok("{\"rope_theta\":1.0,\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":250.0}}", &a);
    assert_true(a.rope_theta == 250.0);
    assert_int_equal(a.rope_scaling, ROPE_SCALING_NONE);
    model_desc_free(&a);
    /* no rope_theta anywhere: 10000 */
    expect_ok("{\"rope_theta\":\"<del>\"}", &a);
    assert_true(a.rope_theta == 10000.0);
    model_desc_free(&a);
    /* linear scaling */
    expect_ok("{\"rope_scaling\":{\"type\":\"linear\",\"factor\":2.5}}", &a);
    assert_int_equal(a.rope_scaling, ROPE_SCALING_LINEAR);
    assert_true(a.rope_factor == 2.5);
    model_desc_free(&a);
    expect_bad("{\"rope_scaling\":{\"type\":\"linear\",\"factor\":0}}", ST_ERR_FORMAT,
               "linear rope scaling factor must be a positive number");
}

static void test_rope_llama3(void **state) {
    (void)state;
    model_desc d;
    expect_ok("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":32.0,\"low_freq_factor\":1.0,"
              "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}",
              &d);
    assert_int_equal(d.rope_scaling, ROPE_SCALING_LLAMA3);
    assert_true(d.rope_factor == 32.0);
    assert_true(d.rope_low_freq == 1.0);
    assert_true(d.rope_high_freq == 4.0);
    assert_int_equal(d.rope_orig_max_pos, 8192);
    model_desc_free(&d);
    /* defaults of the llama3 fields (transformers' _compute_llama3_parameters has none; ours: 8/1/4/8192) */
    expect_ok("{\"rope_scaling\":{\"rope_type\":\"llama3\"}}", &d);
    assert_true(d.rope_factor == 8.0);
    assert_int_equal(d.rope_orig_max_pos, 8192);
    model_desc_free(&d);
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":\"8\"}}", ST_ERR_FORMAT,
               "llama3 rope scaling fields must be numbers");
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"low_freq_factor\":4,\"high_freq_factor\":4}}",
               ST_ERR_FORMAT, "llama3 rope scaling has invalid factors");
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":-1}}", ST_ERR_FORMAT,
               "llama3 rope scaling has invalid factors");
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"original_max_position_embeddings\":0}}", ST_ERR_FORMAT,
               "llama3 rope scaling has invalid factors");
    /* a huge original_max_position_embeddings must be rejected, not converted */
    expect_bad("{\"rope_scaling\":{\"rope_type\":\"llama3\",\"original_max_position_embeddings\":1e300}}",
               ST_ERR_FORMAT, "original_max_position_embeddings");
}

static void test_partial_rotary(void **state) {
    (void)state;
    model_desc d;
    /* head_dim = 64 / 4 = 16 */
    expect_ok("{\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":1e4,\"partial_rotary_factor\":0.5}}", &d);
    assert_int_equal(d.head_dim, 16);
    assert_int_equal(d.n_rot, 8);
    model_desc_free(&d);
    expect_ok("{\"partial_rotary_factor\":0.25}", &d);
    assert_int_equal(d.n_rot, 4);
    model_desc_free(&d);
    /* rope_parameters' value wins over the top-level one */
    expect_ok("{\"partial_rotary_factor\":0.25,\"rope_parameters\":{\"rope_type\":\"default\","
              "\"partial_rotary_factor\":0.5}}",
              &d);
    assert_int_equal(d.n_rot, 8);
    model_desc_free(&d);
    expect_ok("{\"partial_rotary_factor\":1}", &d);
    assert_int_equal(d.n_rot, 16);
    model_desc_free(&d);
    expect_bad("{\"partial_rotary_factor\":1.5}", ST_ERR_FORMAT, "partial_rotary_factor 1.5 is not in (0, 1]");
    expect_bad("{\"partial_rotary_factor\":0}", ST_ERR_FORMAT, "partial_rotary_factor 0 is not in (0, 1]");
    expect_bad("{\"partial_rotary_factor\":\"half\"}", ST_ERR_FORMAT, "partial_rotary_factor must be a number");
    /* 16 * 0.0625 = 1 rotated dim: odd */
    expect_bad("{\"partial_rotary_factor\":0.0625}", ST_ERR_FORMAT, "rotary dimension 1 must be even and >= 2");

    /* rotary_dim (minimax): fixture rotary_dim 16 of head_dim 32 */
    load_fixture(&d, "minimax_m2-bf16");
    assert_int_equal(d.head_dim, 32);
    assert_int_equal(d.n_rot, 16);
    model_desc_free(&d);
    expect_ok("{\"rotary_dim\":6}", &d);
    assert_int_equal(d.n_rot, 6);
    model_desc_free(&d);
    expect_bad("{\"rotary_dim\":18}", ST_ERR_FORMAT, "field \"rotary_dim\" = 18 is out of range [0, 16]");
    expect_bad("{\"rotary_dim\":5}", ST_ERR_FORMAT, "rotary dimension 5 must be even");
}

// ----------------------------------------------------------------------------
// tokens, MoE layout, fixtures

static void test_eos(void **state) {
    (void)state;
    model_desc d;
    expect_ok("{\"eos_token_id\":[2,7,9],\"bos_token_id\":\"<del>\"}", &d);
    assert_int_equal(d.n_eos, 3);
    assert_int_equal(d.eos_ids[0], 2);
    assert_int_equal(d.eos_ids[1], 7);
    assert_int_equal(d.eos_ids[2], 9);
    assert_int_equal(d.bos_id, -1);
    model_desc_free(&d);
    expect_ok("{\"eos_token_id\":5}", &d);
    assert_int_equal(d.n_eos, 1);
    assert_int_equal(d.eos_ids[0], 5);
    assert_int_equal(d.bos_id, 1);
    model_desc_free(&d);
    expect_ok("{\"eos_token_id\":null}", &d);
    assert_int_equal(d.n_eos, 0);
    model_desc_free(&d);
    expect_ok("{\"eos_token_id\":[]}", &d);
    assert_int_equal(d.n_eos, 0);
    model_desc_free(&d);
    /* more than MODEL_MAX_EOS: the first MODEL_MAX_EOS are kept */
    expect_ok("{\"eos_token_id\":[1,2,3,4,5,6,7,8,9,10]}", &d);
    assert_int_equal(d.n_eos, MODEL_MAX_EOS);
    assert_int_equal(d.eos_ids[MODEL_MAX_EOS - 1], MODEL_MAX_EOS);
    model_desc_free(&d);
}

static void test_moe_layout(void **state) {
    (void)state;
    model_desc d;
    const char *q = "{\"model_type\":\"qwen3_moe\",\"num_hidden_layers\":4,\"num_experts\":4,\"num_experts_per_tok\":2,"
                    "\"moe_intermediate_size\":32}";
    char *qbase = patched(BASE, q);
    /* transformers: layer l is sparse iff l not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0 */
    expect_ok_on(qbase, "{}", &d);
    static const uint8_t all[4] = {1, 1, 1, 1}, step2[4] = {0, 1, 0, 1}, step2_only3[4] = {0, 1, 0, 0},
                         only02[4] = {0, 1, 0, 1};
    assert_memory_equal(d.layer_moe, all, 4);
    assert_int_equal(d.router, ROUTER_SOFTMAX_TOPK);
    assert_int_equal(d.qk_norm, QK_NORM_HEAD);
    assert_string_equal(d.moe_prefix, "mlp");
    assert_string_equal(d.expert_names[0], "gate_proj");
    assert_string_equal(d.expert_names[2], "down_proj");
    assert_int_equal(d.norm_topk_prob, 0);
    model_desc_free(&d);
    expect_ok_on(qbase, "{\"decoder_sparse_step\":2}", &d);
    assert_memory_equal(d.layer_moe, step2, 4);
    model_desc_free(&d);
    expect_ok_on(qbase, "{\"decoder_sparse_step\":2,\"mlp_only_layers\":[3]}", &d);
    assert_memory_equal(d.layer_moe, step2_only3, 4);
    model_desc_free(&d);
    expect_ok_on(qbase, "{\"mlp_only_layers\":[0,2],\"norm_topk_prob\":true}", &d);
    assert_memory_equal(d.layer_moe, only02, 4);
    assert_int_equal(d.norm_topk_prob, 1);
    model_desc_free(&d);
    expect_bad_on(qbase, "{\"mlp_only_layers\":[4]}", ST_ERR_FORMAT, "mlp_only_layers[0] is not a layer index");
    expect_bad_on(qbase, "{\"mlp_only_layers\":[1,-1]}", ST_ERR_FORMAT, "mlp_only_layers[1] is not a layer index");
    expect_bad_on(qbase, "{\"mlp_only_layers\":3}", ST_ERR_FORMAT, "mlp_only_layers must be a list");
    expect_bad_on(qbase, "{\"decoder_sparse_step\":0}", ST_ERR_FORMAT, "field \"decoder_sparse_step\" = 0 is out of range");
    expect_bad_on(qbase, "{\"num_experts_per_tok\":5}", ST_ERR_FORMAT, "num_experts_per_tok 5 exceeds the 4 experts");
    /* a dense layer needs intermediate_size */
    expect_bad_on(qbase, "{\"mlp_only_layers\":[1],\"intermediate_size\":\"<del>\"}", ST_ERR_MISSING,
                  "missing required field \"intermediate_size\"");
    free(qbase);

    /* the fixture: 3 layers, layer 0 dense */
    load_fixture(&d, "qwen3_moe-bf16-sharded");
    static const uint8_t fx[3] = {0, 1, 1};
    assert_int_equal(d.n_layer, 3);
    assert_memory_equal(d.layer_moe, fx, 3);
    assert_int_equal(d.n_expert, 8);
    assert_int_equal(d.n_expert_used, 2);
    assert_int_equal(d.n_ff_expert, 64);
    assert_int_equal(d.n_ff, 256);
    assert_int_equal(d.norm_topk_prob, 1);
    model_desc_free(&d);

    /* minimax_m2: every layer MoE, sigmoid router, full-width QK norm, w1/w3/w2 */
    load_fixture(&d, "minimax_m2-mlx-q5g64");
    static const uint8_t mm[3] = {1, 1, 1};
    assert_int_equal(d.arch, ARCH_MINIMAX_M2);
    assert_memory_equal(d.layer_moe, mm, 3);
    assert_int_equal(d.router, ROUTER_SIGMOID_BIAS);
    assert_int_equal(d.qk_norm, QK_NORM_FULL);
    assert_int_equal(d.n_expert, 8);
    assert_int_equal(d.n_ff_expert, 64);
    assert_string_equal(d.moe_prefix, "block_sparse_moe");
    assert_string_equal(d.expert_names[0], "w1");
    assert_string_equal(d.expert_names[1], "w3");
    assert_string_equal(d.expert_names[2], "w2");
    assert_int_equal(d.q_bits, 5);
    assert_int_equal(d.q_group, 64);
    assert_int_equal(d.n_q_over, 3);
    model_desc_free(&d);
    char *mbase = patched(BASE, "{\"model_type\":\"minimax_m2\",\"num_local_experts\":4,\"num_experts_per_tok\":2}");
    expect_bad_on(mbase, "{\"shared_intermediate_size\":64}", ST_ERR_UNSUPPORTED,
                  "shared experts (shared_intermediate_size 64) not supported");
    expect_bad_on(mbase, "{\"scoring_func\":\"softmax\"}", ST_ERR_UNSUPPORTED, "scoring_func \"softmax\" not supported");
    expect_bad_on(mbase, "{\"attn_type_list\":[1,0]}", ST_ERR_UNSUPPORTED,
                  "attn_type_list[1]: only full attention (1) is supported");
    expect_bad_on(mbase, "{\"qk_norm_type\":\"rms\"}", ST_ERR_UNSUPPORTED, "qk_norm_type not supported");
    expect_ok_on(mbase, "{\"qk_norm_type\":\"per_head\"}", &d);
    assert_int_equal(d.qk_norm, QK_NORM_HEAD);
    model_desc_free(&d);
    expect_ok_on(mbase, "{\"use_qk_norm\":false}", &d);
    assert_int_equal(d.qk_norm, QK_NORM_NONE);
    model_desc_free(&d);
    free(mbase);
}

static void test_fixtures_basic(void **state) {
    (void)state;
    model_desc d;
    load_fixture(&d, "qwen3-bf16");
    assert_int_equal(d.arch, ARCH_QWEN3);
    assert_string_equal(d.model_type, "qwen3");
    assert_int_equal(d.n_layer, 3);
    assert_int_equal(d.n_embd, 128);
    assert_int_equal(d.n_head, 4);
    assert_int_equal(d.n_head_kv, 2);
    assert_int_equal(d.head_dim, 48); /* explicit, != 128 / 4 */
    assert_int_equal(d.n_ff, 256);
    assert_int_equal(d.n_vocab, 512);
    assert_int_equal(d.max_pos, 4096);
    assert_true(fabsf(d.norm_eps - 1e-6f) < 1e-12f);
    assert_true(d.rope_theta == 1000000.0);
    assert_int_equal(d.n_rot, 48);
    assert_int_equal(d.rope_scaling, ROPE_SCALING_NONE);
    assert_int_equal(d.qk_norm, QK_NORM_HEAD);
    assert_int_equal(d.router, ROUTER_NONE);
    assert_int_equal(d.tie_embeddings, 1);
    assert_int_equal(d.bos_id, 1);
    assert_int_equal(d.n_eos, 1);
    assert_int_equal(d.eos_ids[0], 2);
    /* K and V, 2 kv heads x 48 dims x 2 bytes */
    assert_int_equal(model_desc_kv_bytes_per_token(&d, 2), 2 * 2 * 48 * 2);
    model_desc_free(&d);
    assert_null(d.layer_moe); /* free zeroes */
    model_desc_free(&d);      /* and is idempotent */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invalid_json),   cmocka_unit_test(test_non_utf8),
        cmocka_unit_test(test_missing_fields), cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_unsupported),    cmocka_unit_test(test_quant_errors),
        cmocka_unit_test(test_quant_overrides), cmocka_unit_test(test_rope_styles),
        cmocka_unit_test(test_rope_llama3),    cmocka_unit_test(test_partial_rotary),
        cmocka_unit_test(test_eos),            cmocka_unit_test(test_moe_layout),
        cmocka_unit_test(test_fixtures_basic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
