/* test_synth.c — synthetic checkpoints (synth.h).
 *
 * What is checked, and against what:
 *   - every tiny preset, at bf16 and q4g64 (plus q2/q3/q5/q6/q8 on some), written to a temp dir,
 *     loads with model_load and runs a forward with finite, non-degenerate logits; the in-memory
 *     synth_model of the same spec and seed gives bit-identical logits;
 *   - the files: metadata format "pt"/"mlx", tensor dtypes (U32 weights, BF16 scales/biases/norms,
 *     F32 e_score_correction_bias), routers at 8 bits g64 as per-module overrides, shards and
 *     their index (total_size = sum of tensor bytes, each shard within the limit);
 *   - determinism: same seed -> identical files (also with a different thread count), another
 *     seed -> different weights;
 *   - self-consistency: a q8g64 preset holds exactly mlxq's quantization of its bf16 twin's
 *     weights (byte comparison of packed rows, scales and biases), and its logits match the twin
 *     within max|dlogit| <= 5e-2 * max|logit|; q4g64 is strictly worse than q8g64;
 *   - descriptors: synth_preset_desc == model_desc_load of the written config.json for every
 *     preset, and the published shapes (numbers typed in from the model cards, not from synth.c);
 *     parameter counts within 1.5% of the published totals;
 *   - qwen3-0.6b:q4g64 written to disk and built in memory: finite, non-degenerate, identical;
 *   - the CLI: `strata synth --list` and a write that matches the library byte for byte.
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
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/cpu/cpu_ops.h"
#include "strata/base.h"
#include "strata/model.h"
#include "strata/quantize.h"
#include "strata/safetensors.h"
#include "strata/synth.h"

static const char *const k_tiny[] = {"tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-minimax"};
#define N_TINY 4

static const int32_t k_tokens[] = {1, 17, 300, 42, 511, 5, 99, 256, 3, 77};
#define N_TOK 10

// ----------------------------------------------------------------------------
// helpers

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb, (void)flag, (void)f;
    return remove(p);
}

/* A fresh temporary directory (caller removes it with rm_tree). */
static char *mk_tmp(void) {
    char *t = strdup("/tmp/strata-synth-test-XXXXXX");
    assert_non_null(t);
    assert_non_null(mkdtemp(t));
    return t;
}

static void rm_tree(char *dir) {
    nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

static char *path2(const char *dir, const char *name) {
    char *p = st_path_join(dir, name);
    assert_non_null(p);
    return p;
}

/* Runs tokens through m from position 0 and returns [T, vocab] logits (malloc'ed). */
static float *run_forward(const model *m, const int32_t *tok, int T) {
    st_err err = {0};
    model_ctx *c = NULL;
    model_ctx_opts o = {.max_ctx = 64, .n_slots = 1, .max_batch = 16, .n_threads = 2};
    if (model_ctx_init(&c, m, &o, &err)) fail_msg("model_ctx_init: %s", err.msg);
    float *lg = malloc((size_t)T * (size_t)m->desc.n_vocab * sizeof(float));
    assert_non_null(lg);
    if (model_forward_seq(c, tok, T, 0, lg, LOGITS_ALL, &err)) fail_msg("model_forward_seq: %s", err.msg);
    model_ctx_free(c);
    return lg;
}

/* Logits must be finite and carry information: per position a spread of values (std within
 * [0.05, 50]) and positions that differ from each other. */
static void check_logits(const float *lg, int T, int V, const char *what) {
    double maxdiff = 0;
    for (int t = 0; t < T; t++) {
        double s = 0, s2 = 0;
        for (int v = 0; v < V; v++) {
            float x = lg[(size_t)t * V + v];
            if (!isfinite(x)) fail_msg("%s: logit [%d, %d] is %g", what, t, v, x);
            s += x;
            s2 += (double)x * x;
            double d = fabs((double)x - lg[v]);
            if (d > maxdiff) maxdiff = d;
        }
        double mean = s / V, sd = sqrt(fmax(s2 / V - mean * mean, 0));
        if (!(sd > 0.05 && sd < 50)) fail_msg("%s: position %d logits std %g (degenerate)", what, t, sd);
    }
    if (!(maxdiff > 0.1)) fail_msg("%s: logits do not depend on the token (max diff %g)", what, maxdiff);
}

/* max |a - b| / max |b| over n values. */
static double rel_err(const float *a, const float *b, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - b[i]));
        mr = fmax(mr, fabs((double)b[i]));
    }
    return md / mr;
}

static model *mem_model(const char *spec, uint64_t seed) {
    st_err err = {0};
    model *m = NULL;
    if (synth_model(&m, spec, seed, NULL, &err)) fail_msg("synth_model(%s): %s", spec, err.msg);
    return m;
}

static model *write_and_load(const char *spec, uint64_t seed, const char *dir, const synth_write_opts *o) {
    st_err err = {0};
    if (synth_write_ex(spec, dir, seed, o, &err)) fail_msg("synth_write(%s): %s", spec, err.msg);
    model *m = NULL;
    if (model_load(&m, dir, NULL, &err)) fail_msg("model_load(%s): %s", spec, err.msg);
    return m;
}

/* Field-by-field descriptor equality. */
static void assert_desc_equal(const model_desc *a, const model_desc *b, const char *what) {
#define EQ(f)                                                                                                      \
    do {                                                                                                           \
        if (a->f != b->f) fail_msg("%s: descriptor field " #f " differs", what);                                   \
    } while (0)
    EQ(arch); EQ(n_layer); EQ(n_embd); EQ(n_head); EQ(n_head_kv); EQ(head_dim); EQ(n_ff); EQ(n_vocab); EQ(max_pos);
    EQ(norm_eps); EQ(rope_theta); EQ(n_rot); EQ(rope_scaling); EQ(rope_factor); EQ(rope_low_freq); EQ(rope_high_freq);
    EQ(rope_orig_max_pos); EQ(qk_norm); EQ(router); EQ(n_expert); EQ(n_expert_used); EQ(n_ff_expert); EQ(norm_topk_prob);
    EQ(tie_embeddings); EQ(bos_id); EQ(n_eos); EQ(q_bits); EQ(q_group); EQ(n_q_over);
#undef EQ
    assert_string_equal(a->model_type, b->model_type);
    assert_string_equal(a->moe_prefix, b->moe_prefix);
    for (int i = 0; i < 3; i++) assert_string_equal(a->expert_names[i], b->expert_names[i]);
    for (int i = 0; i < a->n_eos; i++) assert_int_equal(a->eos_ids[i], b->eos_ids[i]);
    assert_memory_equal(a->layer_moe, b->layer_moe, (size_t)a->n_layer);
    for (int i = 0; i < a->n_q_over; i++) {
        int bits, group;
        assert_true(model_desc_quant_override(b, a->q_over[i].path, &bits, &group));
        assert_int_equal(bits, a->q_over[i].bits);
        assert_int_equal(group, a->q_over[i].group);
    }
}

static int files_equal(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    st_err err = {0};
    if (st_file_read(a, &x, &nx, &err) || st_file_read(b, &y, &ny, &err)) fail_msg("%s", err.msg);
    int eq = nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

// ----------------------------------------------------------------------------
// tiny presets: write, load, run; memory == disk

static void check_written_layout(const char *dir, const char *spec, int bits) {
    char *p = path2(dir, "model.safetensors");
    sft_file f;
    st_err err = {0};
    if (sft_file_open(&f, p, &err)) fail_msg("%s", err.msg);
    assert_non_null(f.metadata_format);
    assert_string_equal(f.metadata_format, bits ? "mlx" : "pt");
    const sft_tensor *t = sft_file_find(&f, "model.embed_tokens.weight");
    assert_non_null(t);
    assert_int_equal(t->dtype, bits ? SFT_U32 : SFT_BF16);
    t = sft_file_find(&f, "model.layers.0.input_layernorm.weight");
    assert_non_null(t);
    assert_int_equal(t->dtype, SFT_BF16);
    for (int64_t i = 0; i < t->numel; i++) assert_int_equal(((const uint16_t *)t->data)[i], 0x3f80); /* norms = 1 */
    if (bits) {
        t = sft_file_find(&f, "model.embed_tokens.scales");
        assert_non_null(t);
        assert_int_equal(t->dtype, SFT_BF16);
        assert_non_null(sft_file_find(&f, "model.embed_tokens.biases"));
    }
    if (strstr(spec, "minimax")) {
        t = sft_file_find(&f, "model.layers.1.block_sparse_moe.e_score_correction_bias");
        assert_non_null(t);
        assert_int_equal(t->dtype, SFT_F32);
        const char *e = bits ? "model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"
                             : "model.layers.1.block_sparse_moe.experts.7.w2.weight";
        t = sft_file_find(&f, e);
        if (!t) fail_msg("%s: missing %s", spec, e);
        assert_int_equal(t->ndim, bits ? 3 : 2);
    }
    if (strstr(spec, "qwen3-moe")) {
        const char *e = bits ? "model.layers.2.mlp.switch_mlp.gate_proj.scales" : "model.layers.2.mlp.experts.3.up_proj.weight";
        if (!sft_file_find(&f, e)) fail_msg("%s: missing %s", spec, e);
    }
    sft_file_close(&f);
    free(p);
    char *cfg = path2(dir, "config.json"), *gen = path2(dir, "generation_config.json");
    assert_true(st_path_exists(cfg));
    assert_true(st_path_exists(gen));
    if (bits) { /* "quantization" and "quantization_config" both carry the router overrides */
        json_t *root = json_load_file(cfg, 0, NULL);
        assert_non_null(root);
        const char *keys[2] = {"quantization", "quantization_config"};
        for (int k = 0; k < 2; k++) {
            json_t *q = json_object_get(root, keys[k]);
            assert_non_null(q);
            assert_int_equal(json_integer_value(json_object_get(q, "bits")), bits);
            assert_int_equal(json_integer_value(json_object_get(q, "group_size")), 64);
            if (strstr(spec, "moe") || strstr(spec, "minimax")) {
                json_t *o = json_object_get(q, strstr(spec, "minimax") ? "model.layers.2.block_sparse_moe.gate"
                                                                       : "model.layers.2.mlp.gate");
                assert_non_null(o);
                assert_int_equal(json_integer_value(json_object_get(o, "bits")), 8);
                assert_int_equal(json_integer_value(json_object_get(o, "group_size")), 64);
            }
        }
        json_decref(root);
    }
    free(cfg);
    free(gen);
}

static void one_tiny(const char *spec, int bits) {
    char *dir = mk_tmp();
    model *disk = write_and_load(spec, 11, dir, NULL);
    check_written_layout(dir, spec, bits);
    /* bound layout: quantized everywhere, routers at 8 bits */
    assert_int_equal(disk->embed.qbits, bits);
    assert_int_equal(disk->layers[0].wq.qbits, bits);
    assert_int_equal(disk->output.qbits, bits);
    if (disk->desc.n_expert) {
        assert_int_equal(disk->layers[0].router.qbits, bits ? 8 : 0);
        assert_int_equal(disk->layers[0].exp_down[1].qbits, bits);
    }
    const int V = disk->desc.n_vocab;
    float *a = run_forward(disk, k_tokens, N_TOK);
    check_logits(a, N_TOK, V, spec);
    model *mem = mem_model(spec, 11);
    assert_int_equal(mem->weight_bytes, disk->weight_bytes);
    float *b = run_forward(mem, k_tokens, N_TOK);
    if (memcmp(a, b, (size_t)N_TOK * V * sizeof(float))) fail_msg("%s: in-memory logits differ from the written model's", spec);
    free(a);
    free(b);
    model_free(mem);
    model_free(disk);
    rm_tree(dir);
}

static void test_tiny_presets_bf16_q4(void **state) {
    (void)state;
    char spec[64];
    for (int i = 0; i < N_TINY; i++) {
        one_tiny(k_tiny[i], 0);
        snprintf(spec, sizeof spec, "%s:q4g64", k_tiny[i]);
        one_tiny(spec, 4);
    }
}

static void test_tiny_other_widths(void **state) {
    (void)state;
    one_tiny("tiny-llama:q3g64", 3);
    one_tiny("tiny-qwen3-moe:q5g64", 5);
    one_tiny("tiny-minimax:q2g64", 2);
    one_tiny("tiny-qwen3:q6g64", 6);
    one_tiny("tiny-minimax:q8g64", 8);
}

// ----------------------------------------------------------------------------
// determinism and shards

static void test_same_seed_same_bytes(void **state) {
    (void)state;
    char *d1 = mk_tmp(), *d2 = mk_tmp(), *d3 = mk_tmp();
    st_err err = {0};
    synth_write_opts one = {.n_threads = 1};
    if (synth_write_ex("tiny-qwen3-moe:q4g64", d1, 7, NULL, &err)) fail_msg("%s", err.msg);
    if (synth_write_ex("tiny-qwen3-moe:q4g64", d2, 7, &one, &err)) fail_msg("%s", err.msg);
    if (synth_write_ex("tiny-qwen3-moe:q4g64", d3, 8, NULL, &err)) fail_msg("%s", err.msg);
    const char *files[] = {"model.safetensors", "config.json", "generation_config.json"};
    for (int i = 0; i < 3; i++) {
        char *a = path2(d1, files[i]), *b = path2(d2, files[i]);
        if (!files_equal(a, b)) fail_msg("%s differs between two writes with seed 7", files[i]);
        free(a);
        free(b);
    }
    char *a = path2(d1, "model.safetensors"), *c = path2(d3, "model.safetensors");
    assert_false(files_equal(a, c));
    free(a);
    free(c);
    rm_tree(d1);
    rm_tree(d2);
    rm_tree(d3);
}

static void test_sharded_write(void **state) {
    (void)state;
    char *one = mk_tmp(), *many = mk_tmp();
    const uint64_t limit = 256 << 10;
    synth_write_opts o = {.max_shard_bytes = limit};
    model *m1 = write_and_load("tiny-minimax:q4g64", 5, one, NULL);
    model *m2 = write_and_load("tiny-minimax:q4g64", 5, many, &o);
    assert_true(m2->weights.n_files > 1);
    char *ip = path2(many, "model.safetensors.index.json");
    json_t *idx = json_load_file(ip, 0, NULL);
    assert_non_null(idx);
    json_t *wm = json_object_get(idx, "weight_map");
    assert_int_equal(json_object_size(wm), m2->weights.n_tensors);
    uint64_t sum = 0;
    uint32_t seen = 0;
    assert_true(m2->weights.n_files < 31);
    for (int f = 0; f < m2->weights.n_files; f++) {
        uint64_t fs = 0;
        for (size_t t = 0; t < m2->weights.files[f].n_tensors; t++) {
            const sft_tensor *x = &m2->weights.files[f].tensors[t];
            fs += x->nbytes;
            json_t *v = json_object_get(wm, x->name);
            assert_non_null(v);
            assert_string_equal(json_string_value(v), m2->weights.file_names[f]);
        }
        /* the loader opens shards in weight_map order: find which one this is by name */
        int k = 0, nf = 0, len = 0;
        if (sscanf(m2->weights.file_names[f], "model-%5d-of-%5d.safetensors%n", &k, &nf, &len) != 2 ||
            m2->weights.file_names[f][len] || nf != m2->weights.n_files || k < 1 || k > nf)
            fail_msg("bad shard name %s", m2->weights.file_names[f]);
        char want[64];
        snprintf(want, sizeof want, "model-%05d-of-%05d.safetensors", k, nf);
        assert_string_equal(m2->weights.file_names[f], want);
        assert_true((seen & (1u << k)) == 0);
        seen |= 1u << k;
        if (m2->weights.files[f].n_tensors > 1) assert_true(fs <= limit);
        sum += fs;
    }
    assert_int_equal(seen, ((1u << (m2->weights.n_files + 1)) - 2)); /* shards 1..N, each once */
    assert_int_equal(json_integer_value(json_object_get(json_object_get(idx, "metadata"), "total_size")), sum);
    json_decref(idx);
    free(ip);
    char *single_idx = path2(one, "model.safetensors.index.json");
    assert_false(st_path_exists(single_idx));
    free(single_idx);
    float *a = run_forward(m1, k_tokens, N_TOK), *b = run_forward(m2, k_tokens, N_TOK);
    assert_memory_equal(a, b, (size_t)N_TOK * m1->desc.n_vocab * sizeof(float));
    free(a);
    free(b);
    model_free(m1);
    model_free(m2);
    rm_tree(one);
    rm_tree(many);
}

// ----------------------------------------------------------------------------
// self-consistency: MLX layout vs its bf16 twin

/* Rows of q must be exactly mlxq's quantization of the same rows of the bf16 twin bf. */
static void check_is_quantization(const wt_linear *bf, const wt_linear *q, const char *what) {
    assert_int_equal(bf->qbits, 0);
    assert_true(q->qbits > 0);
    assert_int_equal(bf->rows, q->rows);
    assert_int_equal(bf->cols, q->cols);
    const int64_t n = bf->cols, ng = n / q->group;
    float *row = malloc((size_t)n * sizeof(float));
    uint32_t *packed = malloc((size_t)n * sizeof(uint32_t));
    uint16_t *sc = malloc((size_t)ng * 2), *bs = malloc((size_t)ng * 2);
    uint8_t *codes = malloc((size_t)n);
    int64_t step = bf->rows > 40 ? bf->rows / 37 : 1;
    for (int64_t r = 0; r < bf->rows; r += step) {
        cpu_weight_row(bf, r, row);
        mlxq_quantize_row_bf16(row, n, q->qbits, q->group, packed, sc, bs, codes);
        if (memcmp(packed, (const char *)q->w + (size_t)r * q->row_bytes, q->row_bytes) ||
            memcmp(sc, (const uint16_t *)q->scales + (size_t)r * q->srow_elems, (size_t)ng * 2) ||
            memcmp(bs, (const uint16_t *)q->biases + (size_t)r * q->srow_elems, (size_t)ng * 2))
            fail_msg("%s: row %lld is not the MLX quantization of the bf16 twin's row", what, (long long)r);
    }
    free(row);
    free(packed);
    free(sc);
    free(bs);
    free(codes);
}

static void test_self_consistency(void **state) {
    (void)state;
    char spec[64];
    for (int i = 0; i < N_TINY; i++) {
        model *bf = mem_model(k_tiny[i], 3);
        snprintf(spec, sizeof spec, "%s:q8g64", k_tiny[i]);
        model *q8 = mem_model(spec, 3);
        snprintf(spec, sizeof spec, "%s:q4g64", k_tiny[i]);
        model *q4 = mem_model(spec, 3);
        check_is_quantization(&bf->embed, &q8->embed, "embed");
        check_is_quantization(&bf->output, &q8->output, "output");
        for (int l = 0; l < bf->desc.n_layer; l++) {
            const layer_weights *A = &bf->layers[l], *B = &q8->layers[l], *C = &q4->layers[l];
            check_is_quantization(&A->wq, &B->wq, "wq");
            check_is_quantization(&A->wo, &C->wo, "wo (q4)");
            if (bf->desc.layer_moe[l]) {
                check_is_quantization(&A->router, &B->router, "router");
                check_is_quantization(&A->router, &C->router, "router (q4 model: 8 bits)");
                for (int e = 0; e < bf->desc.n_expert; e += 3) {
                    check_is_quantization(&A->exp_gate[e], &B->exp_gate[e], "expert gate");
                    check_is_quantization(&A->exp_down[e], &C->exp_down[e], "expert down (q4)");
                }
                if (A->router_bias) assert_memory_equal(A->router_bias, B->router_bias, bf->desc.n_expert * sizeof(float));
            } else {
                check_is_quantization(&A->w_down, &B->w_down, "w_down");
                check_is_quantization(&A->w_up, &C->w_up, "w_up (q4)");
            }
        }
        const size_t n = (size_t)N_TOK * bf->desc.n_vocab;
        float *lb = run_forward(bf, k_tokens, N_TOK), *l8 = run_forward(q8, k_tokens, N_TOK),
              *l4 = run_forward(q4, k_tokens, N_TOK);
        double e8 = rel_err(l8, lb, n), e4 = rel_err(l4, lb, n);
        print_message("  %-16s max|dlogit|/max|logit|: q8g64 %.4f  q4g64 %.4f\n", k_tiny[i], e8, e4);
        if (!(e8 <= 5e-2)) fail_msg("%s: q8g64 deviates from bf16 by %.4f of max|logit| (> 5e-2)", k_tiny[i], e8);
        if (!(e4 > e8)) fail_msg("%s: q4g64 (%.4f) is not worse than q8g64 (%.4f)", k_tiny[i], e4, e8);
        if (!(e8 > 0)) fail_msg("%s: q8g64 logits equal bf16 exactly: quantization not applied?", k_tiny[i]);
        free(lb);
        free(l8);
        free(l4);
        model_free(bf);
        model_free(q8);
        model_free(q4);
    }
}

/* A pipeline stage built in memory holds the same weights as the whole model. */
static void test_stage_subset(void **state) {
    (void)state;
    st_err err = {0};
    model *whole = mem_model("tiny-qwen3:q4g64", 9), *stage = NULL;
    model_load_opts o = {.layer_begin = 1, .layer_end = 2, .with_embed = 0, .with_output = 0};
    if (synth_model(&stage, "tiny-qwen3:q4g64", 9, &o, &err)) fail_msg("%s", err.msg);
    assert_int_equal(stage->layer_begin, 1);
    assert_int_equal(stage->layer_end, 2);
    assert_null(sft_set_find(&stage->weights, "model.embed_tokens.weight"));
    assert_null(sft_set_find(&stage->weights, "model.layers.0.self_attn.q_proj.weight"));
    const wt_linear *a = &whole->layers[1].w_down, *b = &stage->layers[1].w_down;
    assert_memory_equal(a->w, b->w, (size_t)a->rows * a->row_bytes);
    assert_memory_equal(a->scales, b->scales, (size_t)a->rows * a->srow_elems * 2);
    assert_true(stage->weight_bytes < whole->weight_bytes);
    model_free(stage);
    model_free(whole);
}

// ----------------------------------------------------------------------------
// descriptors and published shapes

static const char *const k_all_quants[] = {"bf16", "q4g64", "q8g64"};

static void test_desc_matches_written_config(void **state) {
    (void)state;
    st_err err = {0};
    char spec[96];
    for (int i = 0; synth_preset_name(i); i++)
        for (int q = 0; q < 3; q++) {
            snprintf(spec, sizeof spec, "%s:%s", synth_preset_name(i), k_all_quants[q]);
            model_desc a, b;
            if (synth_preset_desc(spec, &a, &err)) fail_msg("%s", err.msg);
            char *dir = mk_tmp();
            if (synth_write_config(spec, dir, &err)) fail_msg("%s", err.msg);
            if (model_desc_load(&b, dir, &err)) fail_msg("%s", err.msg);
            assert_desc_equal(&a, &b, spec);
            if (q) {
                assert_int_equal(a.q_bits, q == 1 ? 4 : 8);
                assert_int_equal(a.n_q_over, a.n_expert ? a.n_layer : 0); /* one router override per MoE layer */
            }
            model_desc_free(&a);
            model_desc_free(&b);
            rm_tree(dir);
        }
    /* and for a fully written tiny model (config.json written by synth_write itself) */
    for (int i = 0; i < N_TINY; i++) {
        snprintf(spec, sizeof spec, "%s:q4g64", k_tiny[i]);
        char *dir = mk_tmp();
        if (synth_write(spec, dir, 1, &err)) fail_msg("%s", err.msg);
        model_desc a, b;
        if (synth_preset_desc(spec, &a, &err) || model_desc_load(&b, dir, &err)) fail_msg("%s", err.msg);
        assert_desc_equal(&a, &b, spec);
        model_desc_free(&a);
        model_desc_free(&b);
        rm_tree(dir);
    }
}

typedef struct published {
    const char *name;
    model_arch arch;
    int layers, hidden, heads, kv, head_dim, ff, vocab;
    int64_t max_pos;
    int tied, experts, used, ff_expert, n_rot;
    double theta;
    double params; /* published total parameter count */
} published;

static void test_published_shapes(void **state) {
    (void)state;
    static const published P[] = {
        {"qwen3-0.6b", ARCH_QWEN3, 28, 1024, 16, 8, 128, 3072, 151936, 40960, 1, 0, 0, 0, 128, 1e6, 0.596e9},
        {"qwen3-8b", ARCH_QWEN3, 36, 4096, 32, 8, 128, 12288, 151936, 40960, 0, 0, 0, 0, 128, 1e6, 8.19e9},
        {"qwen3-30b-a3b", ARCH_QWEN3_MOE, 48, 2048, 32, 4, 128, 6144, 151936, 40960, 0, 128, 8, 768, 128, 1e6, 30.5e9},
        {"llama3.1-8b", ARCH_LLAMA, 32, 4096, 32, 8, 128, 14336, 128256, 131072, 0, 0, 0, 0, 128, 5e5, 8.03e9},
        {"llama3.1-70b", ARCH_LLAMA, 80, 8192, 64, 8, 128, 28672, 128256, 131072, 0, 0, 0, 0, 128, 5e5, 70.6e9},
        {"minimax-m2.5", ARCH_MINIMAX_M2, 62, 3072, 48, 8, 128, 1536, 200064, 196608, 0, 256, 8, 1536, 64, 5e6, 228.7e9},
    };
    st_err err = {0};
    for (size_t i = 0; i < sizeof P / sizeof P[0]; i++) {
        const published *p = &P[i];
        model_desc d;
        if (synth_preset_desc(p->name, &d, &err)) fail_msg("%s", err.msg);
        assert_int_equal(d.arch, p->arch);
        assert_int_equal(d.n_layer, p->layers);
        assert_int_equal(d.n_embd, p->hidden);
        assert_int_equal(d.n_head, p->heads);
        assert_int_equal(d.n_head_kv, p->kv);
        assert_int_equal(d.head_dim, p->head_dim);
        assert_int_equal(d.n_vocab, p->vocab);
        assert_int_equal(d.max_pos, p->max_pos);
        assert_int_equal(d.tie_embeddings, p->tied);
        assert_int_equal(d.n_expert, p->experts);
        assert_int_equal(d.n_expert_used, p->used);
        assert_int_equal(d.n_rot, p->n_rot);
        assert_true(d.rope_theta == p->theta);
        assert_int_equal(d.q_bits, 0);
        if (p->experts) assert_int_equal(d.n_ff_expert, p->ff_expert);
        else assert_int_equal(d.n_ff, p->ff);
        if (p->arch == ARCH_QWEN3_MOE) assert_true(d.norm_topk_prob && d.router == ROUTER_SOFTMAX_TOPK);
        if (p->arch == ARCH_MINIMAX_M2) {
            assert_int_equal(d.router, ROUTER_SIGMOID_BIAS);
            assert_int_equal(d.qk_norm, QK_NORM_FULL);
        }
        if (p->arch == ARCH_LLAMA) {
            assert_int_equal(d.rope_scaling, ROPE_SCALING_LLAMA3);
            assert_true(d.rope_factor == 8 && d.rope_low_freq == 1 && d.rope_high_freq == 4);
            assert_int_equal(d.rope_orig_max_pos, 8192);
            assert_int_equal(d.bos_id, 128000);
            assert_int_equal(d.n_eos, 3);
            assert_int_equal(d.eos_ids[0], 128001);
            assert_int_equal(d.eos_ids[1], 128008);
            assert_int_equal(d.eos_ids[2], 128009);
            assert_true(fabsf(d.norm_eps - 1e-5f) < 1e-12f);
        }
        model_desc_free(&d);
        /* parameters vs the published totals; bytes per quantization */
        uint64_t np = 0, nb = 0, np4 = 0, nb4 = 0;
        if (synth_preset_size(p->name, &np, &nb, &err)) fail_msg("%s", err.msg);
        char spec[64];
        snprintf(spec, sizeof spec, "%s:q4g64", p->name);
        if (synth_preset_size(spec, &np4, &nb4, &err)) fail_msg("%s", err.msg);
        double rel = fabs((double)np - p->params) / p->params;
        if (rel > 0.015) fail_msg("%s: %.4g parameters, published %.4g", p->name, (double)np, p->params);
        assert_int_equal(np, np4);
        if (p->arch != ARCH_MINIMAX_M2) assert_int_equal(nb, 2 * np); /* all bf16 */
        /* q4g64: 4 bits + bf16 scale and bias per 64 = 4.5 bits; norms stay bf16, routers 8.5 */
        double bpw = 8.0 * (double)nb4 / (double)np;
        if (!(bpw > 4.49 && bpw < 4.6)) fail_msg("%s:q4g64: %.3f bits per weight", p->name, bpw);
    }
}

static void test_bad_specs(void **state) {
    (void)state;
    const char *bad[] = {"", "nope", "qwen3-0.6b:q7g64", "qwen3-0.6b:q4g64x", "qwen3-0.6b:", "qwen3-0.6b:q4g48",
                         "tiny-qwen3-moe:q4g128", "qwen3-0.6b:fp8", ":q4g64"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        st_err err = {0};
        model_desc d;
        int rc = synth_preset_desc(bad[i], &d, &err);
        if (rc != ST_ERR_ARG) fail_msg("spec \"%s\": expected ST_ERR_ARG, got %d", bad[i], rc);
        assert_true(strlen(err.msg) > 0);
        model *m = (model *)1;
        assert_int_equal(synth_model(&m, bad[i], 1, NULL, &err), ST_ERR_ARG);
        assert_null(m);
    }
    st_err err = {0};
    model_desc d;
    assert_int_equal(synth_preset_desc("qwen3-0.6b:q3g32", &d, &err), ST_OK); /* any supported pair parses */
    assert_int_equal(d.q_bits, 3);
    assert_int_equal(d.q_group, 32);
    model_desc_free(&d);
}

// ----------------------------------------------------------------------------
// a real shape: qwen3-0.6b at q4g64, on disk and in memory

static void test_qwen3_0_6b(void **state) {
    (void)state;
    char *dir = mk_tmp();
    const char *tokdir = getenv("STRATA_CACHE");
    model *disk = write_and_load("qwen3-0.6b:q4g64", 1, dir, NULL);
    assert_int_equal(disk->desc.n_vocab, 151936);
    char *tj = path2(dir, "tokenizer.json");
    if (tokdir) {
        char src[1024];
        snprintf(src, sizeof src, "%s/tokenizers/qwen3/tokenizer.json", tokdir);
        if (st_path_exists(src)) {
            assert_true(st_path_exists(tj));
            assert_true(files_equal(src, tj));
        }
    }
    free(tj);
    const int32_t tok[] = {151643, 9707, 11, 1879, 0, 151644, 872, 198};
    float *a = run_forward(disk, tok, 8);
    check_logits(a, 8, 151936, "qwen3-0.6b:q4g64");
    model *mem = mem_model("qwen3-0.6b:q4g64", 1);
    float *b = run_forward(mem, tok, 8);
    assert_memory_equal(a, b, (size_t)8 * 151936 * sizeof(float));
    free(a);
    free(b);
    model_free(mem);
    model_free(disk);
    rm_tree(dir);
}

// ----------------------------------------------------------------------------
// the command line

/* Runs argv with stdout to out_path; returns the exit status. */
static int run_cmd(char *const argv[], const char *out_path) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (out_path && !freopen(out_path, "w", stdout)) _exit(127);
        execv(argv[0], argv);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli(void **state) {
    (void)state;
    const char *bin = getenv("STRATA_BIN");
    if (!bin || access(bin, X_OK)) skip();
    char *dir = mk_tmp(), *lib = mk_tmp();
    char *list = path2(dir, "list.txt");
    char *argv_list[] = {(char *)bin, "synth", "--list", NULL};
    assert_int_equal(run_cmd(argv_list, list), 0);
    char *txt = NULL;
    size_t n = 0;
    st_err err = {0};
    if (st_file_read(list, &txt, &n, &err)) fail_msg("%s", err.msg);
    for (int i = 0; synth_preset_name(i); i++) assert_non_null(strstr(txt, synth_preset_name(i)));
    assert_non_null(strstr(txt, "q4g64"));
    free(txt);
    char *out = path2(dir, "m");
    char *argv_w[] = {(char *)bin, "synth", "--preset", "tiny-minimax", "--quant", "q4g64", out, "--seed", "42", NULL};
    assert_int_equal(run_cmd(argv_w, NULL), 0);
    if (synth_write("tiny-minimax:q4g64", lib, 42, &err)) fail_msg("%s", err.msg);
    char *a = path2(out, "model.safetensors"), *b = path2(lib, "model.safetensors");
    assert_true(files_equal(a, b));
    free(a);
    free(b);
    char *argv_bad[] = {(char *)bin, "synth", "--preset", "nope", out, NULL};
    assert_int_equal(run_cmd(argv_bad, NULL), 2);
    char *argv_badq[] = {(char *)bin, "synth", "--preset", "tiny-llama", "--quant", "q7g64", out, NULL};
    assert_int_equal(run_cmd(argv_badq, NULL), 2);
    free(out);
    free(list);
    rm_tree(dir);
    rm_tree(lib);
}

int main(void) {
    st_log_set_level(ST_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_specs),
        cmocka_unit_test(test_published_shapes),
        cmocka_unit_test(test_desc_matches_written_config),
        cmocka_unit_test(test_tiny_presets_bf16_q4),
        cmocka_unit_test(test_tiny_other_widths),
        cmocka_unit_test(test_same_seed_same_bytes),
        cmocka_unit_test(test_sharded_write),
        cmocka_unit_test(test_self_consistency),
        cmocka_unit_test(test_stage_subset),
        cmocka_unit_test(test_qwen3_0_6b),
        cmocka_unit_test(test_cli),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
