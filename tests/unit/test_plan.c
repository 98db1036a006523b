/* test_plan.c — model statistics, cluster.json and the placement solver (plan.h).
 *
 * Expected values are worked out by hand below (the arithmetic is written out in comments and
 * literal constants, not recomputed with the code under test): MLX 5-bit g64 bytes of every
 * MiniMax-M2.5 tensor, KV bytes, scratch, usable memory after the reserve, the layer capacity of
 * the 36 GB node, predicted times of pipeline and tensor-parallel layouts. The checkpoint path
 * is checked against the tiny fixtures' safetensors headers (bytes written by mlx-lm-style
 * tooling, not by this code) and against an independent hand count of one fixture.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "strata/base.h"
#include "strata/model.h"
#include "strata/plan.h"
#include "strata/synth.h"

// ----------------------------------------------------------------------------
// MiniMax-M2.5 at MLX 5-bit g64 (routers 8-bit): hand-computed sizes
//
// A 5-bit g64 row of `cols` inputs: cols*5/8 packed bytes + (cols/64) groups x 2 (scale, bias)
// x 2 bytes (bf16).
//   cols 3072: 1920 + 48*4 = 2112 B/row        cols 6144: 3840 + 96*4 = 4224 B/row
//   cols 1536:  960 + 24*4 = 1056 B/row        8-bit router, cols 3072: 3072 + 192 = 3264 B/row
// attention: q 6144 x 2112 = 12,976,128; k, v 1024 x 2112 = 2,162,688 each; o 3072 x 4224 =
//            12,976,128                                                       -> 30,277,632
// norms (bf16): input + post-attention 2 x 3072 x 2 = 12,288; q_norm 6144 x 2 = 12,288;
//            k_norm 1024 x 2 = 2,048                                          ->     26,624
// router: 256 x 3264 = 835,584; e_score_correction_bias f32 256 x 4 = 1,024   ->    836,608
// experts: gate, up 1536 x 2112 = 3,244,032 each; down 3072 x 1056 = 3,244,032
//            one expert 9,732,096; 256 experts                                -> 2,491,416,576
// layer = 30,277,632 + 26,624 + 836,608 + 2,491,416,576 = 2,522,557,440
// read per token = all but the experts + 8/256 of them: 31,140,864 + 77,856,768 = 108,997,632
// embedding, lm_head: 200064 x 2112 = 422,535,168 each; final norm 3072 x 2 = 6,144
// total = 62 x 2,522,557,440 + 2 x 422,535,168 + 6,144 = 157,243,637,760 (~157 GB)
// KV per token per layer (bf16) = 8 heads x 128 x 2 (K, V) x 2 B = 4,096; x 62 = 253,952 (248 KiB)

#define MM_LAYER 2522557440ull
#define MM_LAYER_REPL 863232ull /* norms 26,624 + router 835,584 + bias 1,024 */
#define MM_LAYER_READ 108997632ull
#define MM_EMBED 422535168ull
#define MM_OUTPUT (422535168ull + 6144ull)
#define MM_TOTAL 157243637760ull
#define MM_KV_TOK_LAYER 4096ull
#define MM_CTX 196608ll

/* config.json of MiniMax-M2.5 as mlx-community converts it to 5-bit (routers at 8 bits). */
static char *minimax_config(void) {
    size_t cap = 64 * 1024;
    char *s = malloc(cap);
    assert_non_null(s);
    int n = snprintf(s, cap,
                     "{\"model_type\": \"minimax_m2\", \"num_hidden_layers\": 62, \"hidden_size\": 3072,"
                     " \"num_attention_heads\": 48, \"num_key_value_heads\": 8, \"head_dim\": 128,"
                     " \"intermediate_size\": 1536, \"num_local_experts\": 256, \"num_experts_per_tok\": 8,"
                     " \"vocab_size\": 200064, \"max_position_embeddings\": 196608, \"rotary_dim\": 64,"
                     " \"rope_theta\": 5000000, \"rms_norm_eps\": 1e-6, \"use_qk_norm\": true,"
                     " \"qk_norm_type\": \"per_layer\", \"scoring_func\": \"sigmoid\", \"use_routing_bias\": true,"
                     " \"shared_intermediate_size\": 0, \"tie_word_embeddings\": false,"
                     " \"quantization\": {\"group_size\": 64, \"bits\": 5, \"mode\": \"affine\"");
    for (int l = 0; l < 62; l++)
        n += snprintf(s + n, cap - (size_t)n, ", \"model.layers.%d.block_sparse_moe.gate\": {\"group_size\": 64, \"bits\": 8}", l);
    snprintf(s + n, cap - (size_t)n, "}}");
    return s;
}

static void minimax_model(plan_model *pm) {
    char *cfg = minimax_config();
    model_desc d;
    st_err err = {0};
    int rc = model_desc_parse(&d, cfg, strlen(cfg), "minimax-m2.5-5bit", &err);
    if (rc) fail_msg("%s", err.msg);
    rc = plan_model_from_desc(pm, &d, "minimax-m2.5-5bit", &err);
    if (rc) fail_msg("%s", err.msg);
    model_desc_free(&d);
    free(cfg);
}

static char *repo_path(const char *rel) {
    const char *fx = getenv("STRATA_FIXTURES");
    char buf[4096];
    if (fx) snprintf(buf, sizeof buf, "%s/../../%s", fx, rel);
    else snprintf(buf, sizeof buf, "%s", rel);
    return strdup(buf);
}

static void seed_cluster(plan_cluster *c) {
    char *p = repo_path("examples/clusters/seed-m4.json");
    st_err err = {0};
    int rc = plan_cluster_load(c, p, &err);
    if (rc) fail_msg("%s", err.msg);
    free(p);
}

static void load_cluster_text(plan_cluster *c, const char *json) {
    st_err err = {0};
    int rc = plan_cluster_parse(c, json, strlen(json), "test.json", &err);
    if (rc) fail_msg("%s", err.msg);
}

static int dev_index(const plan_cluster *c, const char *node) {
    for (int i = 0; i < c->n_dev; i++)
        if (!strcmp(c->dev[i].node, node)) return i;
    fail_msg("no node %s", node);
    return -1;
}

/* Checks everything that makes a plan valid, with budgets recomputed from the hand model:
 * contiguous cover of all layers, embedding on stage 0 and output on the last only, KV for the
 * full context x slots on every member, lines summing to the total, totals within usable. */
static void check_valid(const plan_result *p, const plan_model *m, const plan_cluster *c, double reserve) {
    assert_true(p->fits);
    assert_true(p->n_stage >= 1);
    int next = 0;
    uint8_t seen[PLAN_MAX_DEVICES] = {0};
    for (int i = 0; i < p->n_stage; i++) {
        const plan_stage *s = &p->stage[i];
        assert_int_equal(s->layer_begin, next);
        assert_true(s->layer_end > s->layer_begin);
        next = s->layer_end;
        assert_int_equal(s->has_embed, i == 0);
        assert_int_equal(s->has_output, i == p->n_stage - 1);
        for (int j = 0; j < s->n_tp; j++) {
            const plan_budget *b = &s->member[j];
            assert_false(seen[b->dev]); /* a device serves one stage */
            seen[b->dev] = 1;
            uint64_t want_usable = (uint64_t)((double)c->dev[b->dev].memory * (1.0 - reserve));
            assert_int_equal(b->usable, want_usable);
            uint64_t kv = plan_model_kv_bytes(m, p->kv_elem_bytes) / (uint64_t)s->n_tp * (uint64_t)(s->layer_end - s->layer_begin) *
                          (uint64_t)p->context * (uint64_t)p->slots;
            assert_int_equal(b->kv, kv);
            assert_int_equal(b->total, b->weights + b->embed + b->output + b->kv + b->scratch + b->overhead);
            assert_true(b->total <= b->usable);
            assert_int_equal(b->embed, i == 0 ? m->embed_bytes : 0);
            assert_int_equal(b->overhead, c->dev[b->dev].overhead);
        }
    }
    assert_int_equal(next, m->n_layer);
}

// ----------------------------------------------------------------------------
// model statistics

static void test_minimax_stats(void **state) {
    (void)state;
    plan_model pm;
    minimax_model(&pm);
    assert_int_equal(pm.n_layer, 62);
    for (int l = 0; l < 62; l++) {
        assert_int_equal(pm.layers[l].bytes, MM_LAYER);
        assert_int_equal(pm.layers[l].bytes - pm.layers[l].shard_bytes, MM_LAYER_REPL);
        assert_int_equal(pm.layers[l].read_bytes, MM_LAYER_READ);
        assert_int_equal(pm.layers[l].read_bytes - pm.layers[l].read_shard_bytes, MM_LAYER_REPL);
        assert_true(pm.layers[l].moe);
    }
    assert_int_equal(pm.embed_bytes, MM_EMBED);
    assert_int_equal(pm.out_norm_bytes + pm.lm_head_bytes, MM_OUTPUT);
    assert_int_equal(plan_model_weight_bytes(&pm), MM_TOTAL);
    assert_int_equal(plan_model_kv_bytes(&pm, 2), MM_KV_TOK_LAYER);
    assert_int_equal(plan_model_kv_bytes(&pm, 2) * 62, 248 * 1024);
    assert_int_equal(plan_model_kv_bytes(&pm, 4), 2 * MM_KV_TOK_LAYER);
    /* read per token: embedding row 2112 + 62 layers + norm + lm_head */
    assert_int_equal(plan_model_read_bytes(&pm), 2112ull + 62ull * MM_LAYER_READ + MM_OUTPUT);
    /* flops per layer: 2 x (q 3072x6144 + k,v 2x3072x1024 + o 6144x3072 + router 3072x256
     * + 8 experts x 3 x 3072x1536) = 2 x 158,072,832 */
    assert_true(fabs(pm.layers[0].flops - 316145664.0) < 1e-3);
    /* scratch (chunk 256, 1 slot, 196,608 tokens, 14 threads): f32 rows
     * 4 x 256 x (5x3072 + 2x6144 + 2x1024 + 2x1536 + 64 + 256 + 2x8 + 2x256 + 2) = 34,424,832;
     * e_count 1,024; kp/vp 2x256x8 = 4,096; inv_freq 32x8 = 256; per-thread rows
     * 14 x 196,608 x 4 = 11,010,048; logits 200,064 x 4 = 800,256 on the last stage */
    assert_int_equal(plan_scratch_bytes(&pm, 256, 1, MM_CTX, 14, 0), 34424832ull + 1024 + 4096 + 256 + 11010048ull);
    assert_int_equal(plan_scratch_bytes(&pm, 256, 1, MM_CTX, 14, 1), 34424832ull + 1024 + 4096 + 256 + 11010048ull + 800256ull);
    plan_model_free(&pm);
}

/* A synthetic preset's descriptor gives the same figures, and they match the byte count the
 * synthesiser itself reports for the checkpoint it writes (independent code). */
static void test_synthetic_preset(void **state) {
    (void)state;
    model_desc d;
    st_err err = {0};
    int rc = synth_preset_desc("minimax-m2.5:q5g64", &d, &err);
    if (rc) fail_msg("%s", err.msg);
    plan_model pm;
    rc = plan_model_from_desc(&pm, &d, "minimax-m2.5:q5g64", &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(plan_model_weight_bytes(&pm), MM_TOTAL);
    uint64_t n_params = 0, n_bytes = 0;
    rc = synth_preset_size("minimax-m2.5:q5g64", &n_params, &n_bytes, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(n_bytes, MM_TOTAL);
    plan_model_free(&pm);
    model_desc_free(&d);
}

/* The fixture minimax_m2-mlx-q5g64 by hand: hidden 128, 4 heads x 32, 2 KV heads, 8 experts
 * (top 2) of 64, vocab 512, 3 layers, 5-bit g64 (router 8-bit).
 *   row of 128 inputs: 80 + 2 groups x 4 = 88 B; of 64 inputs: 40 + 4 = 44 B; router 128 + 8
 *   attention: q 128x88 + k 64x88 + v 64x88 + o 128x88 = 33,792
 *   norms: 2x128x2 + q_norm 128x2 + k_norm 64x2 = 896; router 8x136 = 1,088; bias 32
 *   experts: (64x88 + 64x88 + 128x44) x 8 = 135,168
 *   layer 170,976; read 33,792 + 896 + 1,088 + 32 + 135,168 x 2/8 = 69,600
 *   embedding, lm_head 512 x 88 = 45,056 each; norm 256 */
static void test_fixture_headers(void **state) {
    (void)state;
    char *dir = repo_path("tests/fixtures/models/minimax_m2-mlx-q5g64");
    plan_model pm;
    st_err err = {0};
    int rc = plan_model_from_dir(&pm, dir, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_true(pm.from_headers);
    for (int l = 0; l < 3; l++) {
        assert_int_equal(pm.layers[l].bytes, 170976);
        assert_int_equal(pm.layers[l].read_bytes, 69600);
        assert_int_equal(pm.layers[l].bytes - pm.layers[l].shard_bytes, 896 + 1088 + 32);
    }
    assert_int_equal(pm.embed_bytes, 45056);
    assert_int_equal(pm.lm_head_bytes, 45056);
    assert_int_equal(pm.out_norm_bytes, 256);
    assert_int_equal(pm.other_bytes, 0);
    plan_model_free(&pm);
    free(dir);
}

/* Every fixture: the bytes the headers say equal the bytes the descriptor predicts, part by
 * part (dense and MLX, overrides incl. `false`, tied embeddings, sharded files, HF per-expert
 * and MLX stacked experts). */
static void test_headers_match_descriptor(void **state) {
    (void)state;
    static const char *names[] = {"llama-bf16", "llama-f16-t5style", "llama-mlx-q3g32-mixed", "minimax_m2-bf16",
                                  "minimax_m2-mlx-q5g64", "qwen3-bf16", "qwen3-mlx-q4g64", "qwen3_moe-bf16-sharded",
                                  "qwen3_moe-mlx-q4g64"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "tests/fixtures/models/%s", names[i]);
        char *dir = repo_path(rel);
        plan_model a, b;
        model_desc d;
        st_err err = {0};
        int rc = plan_model_from_dir(&a, dir, &err);
        if (rc) fail_msg("%s", err.msg);
        rc = model_desc_load(&d, dir, &err);
        if (rc) fail_msg("%s", err.msg);
        rc = plan_model_from_desc(&b, &d, dir, &err);
        if (rc) fail_msg("%s", err.msg);
        for (int l = 0; l < a.n_layer; l++) {
            if (a.layers[l].bytes != b.layers[l].bytes || a.layers[l].read_bytes != b.layers[l].read_bytes ||
                a.layers[l].shard_bytes != b.layers[l].shard_bytes)
                fail_msg("%s layer %d: headers %llu/%llu/%llu, descriptor %llu/%llu/%llu", names[i], l,
                         (unsigned long long)a.layers[l].bytes, (unsigned long long)a.layers[l].read_bytes,
                         (unsigned long long)a.layers[l].shard_bytes, (unsigned long long)b.layers[l].bytes,
                         (unsigned long long)b.layers[l].read_bytes, (unsigned long long)b.layers[l].shard_bytes);
        }
        if (a.embed_bytes != b.embed_bytes || a.lm_head_bytes != b.lm_head_bytes || a.out_norm_bytes != b.out_norm_bytes)
            fail_msg("%s: embed/lm_head/norm headers %llu/%llu/%llu, descriptor %llu/%llu/%llu", names[i],
                     (unsigned long long)a.embed_bytes, (unsigned long long)a.lm_head_bytes, (unsigned long long)a.out_norm_bytes,
                     (unsigned long long)b.embed_bytes, (unsigned long long)b.lm_head_bytes, (unsigned long long)b.out_norm_bytes);
        /* and what model_load binds (projections and experts, not norms) is the split part */
        model *m = NULL;
        rc = model_load(&m, dir, NULL, &err);
        if (rc) fail_msg("%s", err.msg);
        uint64_t bound = a.embed_bytes + a.lm_head_bytes;
        for (int l = 0; l < a.n_layer; l++) {
            const plan_layer *L = &a.layers[l];
            /* vectors model_load copies instead of binding: norms (bf16) and the f32 router bias */
            uint64_t vec = 2ull * (uint64_t)d.n_embd * 2;
            if (d.qk_norm == QK_NORM_HEAD) vec += 2ull * (uint64_t)d.head_dim * 2;
            if (d.qk_norm == QK_NORM_FULL) vec += (uint64_t)(d.n_head + d.n_head_kv) * (uint64_t)d.head_dim * 2;
            if (L->moe && d.router == ROUTER_SIGMOID_BIAS) vec += (uint64_t)d.n_expert * 4;
            bound += L->bytes - vec; /* projections, dense MLP or router + experts */
        }
        assert_int_equal(m->weight_bytes, bound);
        model_free(m);
        model_desc_free(&d);
        plan_model_free(&a);
        plan_model_free(&b);
        free(dir);
    }
}

// ----------------------------------------------------------------------------
// cluster.json

static void test_quantities(void **state) {
    (void)state;
    double v;
    assert_int_equal(plan_parse_quantity("128 GiB", 'm', &v), 0);
    assert_true(v == 137438953472.0);
    assert_int_equal(plan_parse_quantity("36GB", 'm', &v), 0);
    assert_true(v == 36e9);
    assert_int_equal(plan_parse_quantity("546 GB/s", 'b', &v), 0);
    assert_true(v == 546e9);
    assert_int_equal(plan_parse_quantity("80 Gbit/s", 'b', &v), 0);
    assert_true(v == 1e10);
    assert_int_equal(plan_parse_quantity("80 Gb/s", 'b', &v), 0);
    assert_true(v == 1e10);
    assert_int_equal(plan_parse_quantity("30 us", 't', &v), 0);
    assert_true(fabs(v - 30e-6) < 1e-18);
    assert_int_equal(plan_parse_quantity("1.5 ms", 't', &v), 0);
    assert_true(fabs(v - 1.5e-3) < 1e-15);
    assert_int_equal(plan_parse_quantity("17 TFLOPS", 'f', &v), 0);
    assert_true(v == 17e12);
    assert_int_equal(plan_parse_quantity("128 GX", 'm', &v), -1);
    assert_int_equal(plan_parse_quantity("GiB", 'm', &v), -1);
    assert_int_equal(plan_parse_quantity("-3 GiB", 'm', &v), -1);
    assert_int_equal(plan_parse_quantity("30 us", 'm', &v), -1);
}

static void test_seed_cluster_file(void **state) {
    (void)state;
    plan_cluster c;
    seed_cluster(&c);
    assert_int_equal(c.n_dev, 3);
    int a = dev_index(&c, "studio-a"), b = dev_index(&c, "studio-b"), m = dev_index(&c, "mbp");
    assert_int_equal(c.dev[a].memory, 128ull << 30);
    assert_int_equal(c.dev[m].memory, 36ull << 30);
    assert_true(c.dev[a].bandwidth == 546e9 && c.dev[b].bandwidth == 546e9);
    assert_true(c.dev[m].bandwidth == 410e9);
    assert_int_equal(c.dev[a].overhead, 1ull << 30);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            const plan_link *l = plan_cluster_link(&c, i, j);
            if (i == j) continue;
            assert_true(l->bandwidth == 1e10);
            assert_true(fabs(l->latency - 30e-6) < 1e-15);
        }
    plan_cluster_free(&c);
}

static void test_cluster_errors(void **state) {
    (void)state;
    static const struct {
        const char *json, *want;
    } cases[] = {
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"8 GX\", \"bandwidth\": 1}]}]}",
         "nodes[0].devices[0].memory"},
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwith\": 1}]}]}", "unknown key \"bandwith\""},
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1}]}]}", "missing \"bandwidth\""},
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]},"
         " {\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]}]}",
         "used twice"},
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]}],"
         " \"links\": [{\"between\": [\"a\", \"b\"], \"latency\": 1, \"bandwidth\": 1}]}",
         "no node or device named \"b\""},
        {"{\"nodes\": []}", "\"nodes\" must be a non-empty list"},
        {"{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1, \"kind\": \"tpu\"}]}]}", "kind"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        plan_cluster c;
        st_err err = {0};
        int rc = plan_cluster_parse(&c, cases[i].json, strlen(cases[i].json), "bad.json", &err);
        assert_true(rc < 0);
        if (!strstr(err.msg, cases[i].want) || strncmp(err.msg, "bad.json", 8)) fail_msg("case %zu: '%s'", i, err.msg);
        assert_null(c.dev);
    }
    /* directions: "from"/"to" sets one way only; intra-node defaults */
    plan_cluster c;
    load_cluster_text(&c, "{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"name\": \"g0\", \"memory\": 1, \"bandwidth\": 1},"
                          " {\"name\": \"g1\", \"memory\": 1, \"bandwidth\": 1}]}, {\"name\": \"b\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]}],"
                          " \"links\": [{\"from\": \"a/g1\", \"to\": \"b\", \"latency\": \"2 ms\", \"bandwidth\": \"1 GB/s\"}]}");
    assert_int_equal(c.n_dev, 3);
    assert_true(plan_cluster_link(&c, 1, 2)->bandwidth == 1e9);
    assert_true(plan_cluster_link(&c, 2, 1)->bandwidth == 0);
    assert_true(plan_cluster_link(&c, 0, 2)->bandwidth == 0);
    assert_true(plan_cluster_link(&c, 0, 1)->bandwidth == 25e9); /* intra-node default */
    plan_cluster_free(&c);
    /* "between" sets both directions (no default link to hide a missing one) */
    load_cluster_text(&c, "{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": 1, \"bandwidth\": 1}]}],"
                          " \"links\": [{\"between\": [\"a\", \"b\"], \"latency\": \"7 us\", \"bandwidth\": \"3 GB/s\"}]}");
    assert_true(plan_cluster_link(&c, 0, 1)->bandwidth == 3e9 && plan_cluster_link(&c, 1, 0)->bandwidth == 3e9);
    assert_true(fabs(plan_cluster_link(&c, 1, 0)->latency - 7e-6) < 1e-18);
    plan_cluster_free(&c);
}

// ----------------------------------------------------------------------------
// the seed scenario: MiniMax-M2.5 5-bit on 2 x 128 GB + 1 x 36 GB, context 196,608

/* Latency objective: the two Mac Studios form a TP=2 group holding every layer; the MacBook
 * is left out (it is slower and would add a hop). Time per token by hand:
 *   per member: replicated 62 x 863,232 = 53,520,384; split (108,997,632 - 863,232)/2 x 62 =
 *   3,352,166,400; embedding row 2,112; norm + lm_head 422,541,312 -> 3,828,230,208 B / 546 GB/s
 *   all-reduces: 62 layers x 3 (o_proj, MoE, full-width QK-norm) x (30 us + 6,144 B / 10 GB/s)
 * versus the pipeline A -> B: 7,180,396,608 B / 546 GB/s + one hop, which is 0.47 ms slower. */
static void test_seed_latency(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    seed_cluster(&c);
    plan_request r;
    plan_request_init(&r);
    r.context = MM_CTX;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    assert_int_equal(p->stage[0].n_tp, 2);
    int a = dev_index(&c, "studio-a"), b = dev_index(&c, "studio-b");
    assert_true((p->stage[0].member[0].dev == a && p->stage[0].member[1].dev == b) ||
                (p->stage[0].member[0].dev == b && p->stage[0].member[1].dev == a));
    double t_tp = 3828230208.0 / 546e9 + 62 * 3 * (30e-6 + 6144.0 / 1e10);
    double t_pp = 7180396608.0 / 546e9 + 30e-6 + 6144.0 / 1e10;
    assert_true(t_tp < t_pp);
    assert_true(fabs(p->t_token - t_tp) < 1e-9 * t_tp);
    /* every member holds KV for the whole context: 62 layers x 2,048 B (its 4 KV heads) x 196,608 */
    assert_int_equal(p->stage[0].member[0].kv, 62ull * 2048ull * 196608ull);
    /* weights per member: 62 x (863,232 + 2,521,694,208 / 2) */
    assert_int_equal(p->stage[0].member[0].weights, 62ull * (863232ull + 1260847104ull));
    assert_int_equal(p->stage[0].member[0].output, MM_OUTPUT);
    assert_int_equal(p->max_context, MM_CTX);
    assert_true(p->max_context_is_model_limit);
    /* pipeline only (--max-tp 1): the two studios, 7,180,396,608 B / 546 GB/s + one hop + the
     * token id back (30 us + 4 B / 10 GB/s) */
    r.max_tp = 1;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    for (int i = 0; i < 2; i++) assert_true(!strncmp(c.dev[p->stage[i].member[0].dev].node, "studio", 6));
    double t_ret = 30e-6 + 4.0 / 1e10;
    assert_true(fabs(p->t_token - (t_pp + t_ret)) < 1e-9 * t_pp);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* The objective at the full context (--optimize-at full): on two H200s the short-context
 * optimum is a pipeline (no all-reduces), but at 196,608 cached tokens every step reads 46.5
 * GiB of KV, which a pipeline reads stage after stage and a TP=2 group half per GPU at once:
 * the full-context objective picks TP and is faster there; the short-context figure of its
 * plan is no better than the pipeline's (that one is optimal for it). */
static void test_optimize_at_full(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    char *path = repo_path("examples/clusters/h200-x2.json");
    st_err err = {0};
    if (plan_cluster_load(&c, path, &err)) fail_msg("%s", err.msg);
    free(path);
    plan_request r;
    plan_request_init(&r);
    r.context = MM_CTX;
    plan_result *p0 = calloc(1, sizeof *p0), *pf = calloc(1, sizeof *pf);
    if (plan_solve(&pm, &c, &r, p0, &err)) fail_msg("%s", err.msg);
    check_valid(p0, &pm, &c, 0.05);
    assert_int_equal(p0->objective_context, 0);
    assert_int_equal(p0->n_stage, 2);
    r.objective_context = PLAN_AT_FULL;
    if (plan_solve(&pm, &c, &r, pf, &err)) fail_msg("%s", err.msg);
    check_valid(pf, &pm, &c, 0.05);
    assert_int_equal(pf->objective_context, MM_CTX);
    assert_int_equal(pf->n_stage, 1);
    assert_int_equal(pf->stage[0].n_tp, 2);
    assert_true(pf->t_token_full < 0.8 * p0->t_token_full);
    assert_true(pf->t_token >= p0->t_token);
    /* a count above the context is clamped to it; below PLAN_AT_FULL is refused */
    r.objective_context = 10 * MM_CTX;
    if (plan_solve(&pm, &c, &r, pf, &err)) fail_msg("%s", err.msg);
    assert_int_equal(pf->objective_context, MM_CTX);
    r.objective_context = -2;
    assert_int_equal(plan_solve(&pm, &c, &r, pf, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "objective context"));
    free(p0), free(pf);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Throughput objective: all three devices in a pipeline. The 36 GB MacBook holds what fits:
 *   usable floor(36 GiB x 0.95) = 36,721,970,380; minus runtime 1,073,741,824 and scratch
 *   (14 threads) 45,440,256 (+ 800,256 logits if last) leaves ~35.6e9 for layers at
 *   2,522,557,440 + 805,306,368 (KV, 196,608 x 4,096) = 3,327,863,808 each -> 10 layers
 *   (11 would need 36.6e9). Its layers cost 108,997,632 / 410e9 = 0.266 ms each, a studio's
 *   0.1996 ms, so balancing wants ~17 on the MacBook: memory caps it at 10, and the best
 *   arrangement puts it last (its lm_head read still leaves it below the studios' 26 layers)
 *   with the studios splitting 52 as 26 + 26. */
static void test_seed_throughput(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    seed_cluster(&c);
    plan_request r;
    plan_request_init(&r);
    r.context = MM_CTX;
    r.objective = PLAN_THROUGHPUT;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 3);
    int mbp = dev_index(&c, "mbp");
    const plan_stage *last = &p->stage[2];
    assert_int_equal(last->n_tp, 1);
    assert_int_equal(last->member[0].dev, mbp);
    assert_int_equal(last->layer_end - last->layer_begin, 10);
    assert_int_equal(p->stage[0].layer_end - p->stage[0].layer_begin, 26);
    assert_int_equal(p->stage[1].layer_end - p->stage[1].layer_begin, 26);
    /* the MacBook's budget, line by line */
    const plan_budget *b = &last->member[0];
    assert_int_equal(b->usable, 36721970380ull);
    assert_int_equal(b->weights, 10ull * MM_LAYER);
    assert_int_equal(b->output, MM_OUTPUT);
    assert_int_equal(b->kv, 10ull * 4096ull * 196608ull);
    assert_int_equal(b->scratch, 45440256ull + 800256ull);
    assert_int_equal(b->overhead, 1ull << 30);
    assert_int_equal(b->total, 10ull * MM_LAYER + MM_OUTPUT + 10ull * 4096ull * 196608ull + 45440256ull + 800256ull + (1ull << 30));
    /* one more layer would not fit */
    assert_true(b->total + MM_LAYER + 4096ull * 196608ull > b->usable);
    /* the bottleneck is a studio stage: 26 x 108,997,632 (+ the embedding row on stage 0) / 546e9 */
    double t26 = (26.0 * 108997632.0 + 2112.0) / 546e9;
    assert_true(fabs(p->t_bottleneck - t26) < 1e-9 * t26);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* --slots 4: four full-length sequences need 4 x 62 x 4,096 x 196,608 = 199.7e9 B of KV on top
 * of 157.2e9 B of weights: more than the 297.9e9 B the three devices can use. Refused, naming
 * the device that overflows; the largest context for 4 slots is at most
 * (297,855,981,976 - 3 GiB - 157,243,637,760) / (4 x 253,952) = 135,253 tokens. */
static void test_seed_four_slots(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    seed_cluster(&c);
    plan_request r;
    plan_request_init(&r);
    r.context = MM_CTX;
    r.slots = 4;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    assert_int_equal(rc, ST_ERR_LIMIT);
    assert_false(p->fits);
    assert_true(p->binding_dev >= 0);
    if (!strstr(p->binding, "node ") || !strstr(p->binding, "usable, needs") || !strstr(p->binding, "at 196,608 tokens x 4 slots"))
        fail_msg("binding: %s", p->binding);
    assert_non_null(strstr(err.msg, "max context"));
    int64_t mx = p->max_context;
    assert_true(mx > 100000 && mx <= 135253);
    /* max context is exact: it fits, one more token does not */
    r.context = mx;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("at max context %lld: %s", (long long)mx, err.msg);
    check_valid(p, &pm, &c, 0.05);
    r.context = mx + 1;
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_LIMIT);
    assert_int_equal(p->max_context, mx);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* A plan that fits reports the largest context it could take: 3 slots at 65,536 tokens fit, but
 * not at full length: 3 x 62 x 4,096 x 196,608 = 149.8e9 B of KV + 157.2e9 B of weights exceed
 * the 297.9e9 B usable. Bound: (297,855,981,976 - 3 GiB - 157,243,637,760) / (3 x 253,952)
 * = 180,337 tokens (memory as one pool, before per-device rounding); the reported maximum is
 * exact: it fits, one token more does not. */
static void test_max_context_when_it_fits(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    seed_cluster(&c);
    plan_request r;
    plan_request_init(&r);
    r.context = 65536;
    r.slots = 3;
    r.objective = PLAN_THROUGHPUT;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    int64_t mx = p->max_context;
    assert_false(p->max_context_is_model_limit);
    assert_true(mx > 65536 && mx <= 180337);
    r.context = mx;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("at %lld: %s", (long long)mx, err.msg);
    r.context = mx + 1;
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_LIMIT);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

static void test_context_above_model_max(void **state) {
    (void)state;
    plan_model pm;
    plan_cluster c;
    minimax_model(&pm);
    seed_cluster(&c);
    plan_request r;
    plan_request_init(&r);
    r.context = MM_CTX + 1;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_ARG);
    if (!strstr(err.msg, "max_position_embeddings") || !strstr(err.msg, "196,609")) fail_msg("%s", err.msg);
    /* the default context is the model's maximum */
    r.context = 0;
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_OK);
    assert_int_equal(p->context, MM_CTX);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* The command line: refusal with exit status 1, the binding device and a "max context" line. */
static int run_cli(const char *args, char *out, size_t cap) {
    const char *bin = getenv("STRATA_BIN");
    if (!bin) return -1;
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s plan %s 2>&1", bin, args);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = 0;
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli(void **state) {
    (void)state;
    if (!getenv("STRATA_BIN")) skip();
    char cfg[] = "/tmp/strata-plan-XXXXXX";
    int fd = mkstemp(cfg);
    assert_true(fd >= 0);
    char *txt = minimax_config();
    assert_int_equal(write(fd, txt, strlen(txt)), (ssize_t)strlen(txt));
    close(fd);
    free(txt);
    char *cl = repo_path("examples/clusters/seed-m4.json");
    char args[4096], *out = malloc(1 << 16);
    snprintf(args, sizeof args, "--config %s --cluster %s --context 196608", cfg, cl);
    int st = run_cli(args, out, 1 << 16);
    if (st != 0 || !strstr(out, "max context: 196,608 tokens x 1 slot") || !strstr(out, "kv cache")) fail_msg("exit %d:\n%s", st, out);
    snprintf(args, sizeof args, "--config %s --cluster %s --context 196,608 --slots 4", cfg, cl);
    st = run_cli(args, out, 1 << 16);
    if (st != 1 || !strstr(out, "DOES NOT FIT: node ") || !strstr(out, "max context: ")) fail_msg("exit %d:\n%s", st, out);
    snprintf(args, sizeof args, "--config %s --cluster %s --context 200000", cfg, cl);
    st = run_cli(args, out, 1 << 16);
    if (st != 1 || !strstr(out, "max_position_embeddings")) fail_msg("exit %d:\n%s", st, out);
    /* --json: parses, and carries the stages the cluster will load */
    snprintf(args, sizeof args, "--config %s --cluster %s --objective throughput --json", cfg, cl);
    st = run_cli(args, out, 1 << 16);
    assert_int_equal(st, 0);
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    if (!j) fail_msg("not JSON (%s):\n%s", je.text, out);
    assert_true(json_is_true(json_object_get(j, "fits")));
    json_t *stages = json_object_get(j, "stages");
    assert_int_equal(json_array_size(stages), 3);
    json_t *s2 = json_array_get(stages, 2);
    assert_int_equal(json_integer_value(json_object_get(s2, "layer_begin")), 52);
    assert_int_equal(json_integer_value(json_object_get(s2, "layer_end")), 62);
    json_t *m0 = json_array_get(json_object_get(s2, "members"), 0);
    assert_string_equal(json_string_value(json_object_get(m0, "node")), "mbp");
    assert_int_equal(json_integer_value(json_object_get(m0, "kv")), 10ll * 4096 * 196608);
    json_decref(j);
    /* the two-H200 machine: the short-context plan is a pipeline, and one line names the
     * layout that is faster at the full context; --optimize-at full plans that one */
    char *h2 = repo_path("examples/clusters/h200-x2.json");
    snprintf(args, sizeof args, "--config %s --cluster %s --context 196608", cfg, h2);
    st = run_cli(args, out, 1 << 16);
    if (st != 0 || !strstr(out, "hint: at the full context (196,608 tokens) 62 layers on TP=2")) fail_msg("exit %d:\n%s", st, out);
    snprintf(args, sizeof args, "--config %s --cluster %s --context 196608 --optimize-at full", cfg, h2);
    st = run_cli(args, out, 1 << 16);
    if (st != 0 || strstr(out, "hint:") || !strstr(out, "objective latency at 196,608 cached tokens") || !strstr(out, "0/2"))
        fail_msg("exit %d:\n%s", st, out);
    snprintf(args, sizeof args, "--config %s --cluster %s --optimize-at soon", cfg, h2);
    st = run_cli(args, out, 1 << 16);
    if (st != 2 || !strstr(out, "--optimize-at is a token count or 'full', got 'soon'")) fail_msg("exit %d:\n%s", st, out);
    free(h2);
    unlink(cfg);
    free(cl);
    free(out);
}

// ----------------------------------------------------------------------------
// small described clusters

/* A dense bf16 llama-shaped model: 32 layers, hidden 4096, 32 heads / 8 KV heads of 128,
 * FFN 14336, vocab 32000, untied. Per layer: q, o 4096x4096x2 = 33,554,432 each; k, v
 * 1024x4096x2 = 8,388,608 each; gate, up, down 14336x4096x2 = 117,440,512 each; norms
 * 2x4096x2 = 16,384 -> 436,224,000 B (all read per token). Embedding and lm_head
 * 32000x4096x2 = 262,144,000 each; norm 8,192. KV (bf16) 2x8x128x2 = 4,096 B/token/layer. */
#define LL_LAYER 436224000ull
#define LL_HEAD 262144000ull
static void llama_model(plan_model *pm, int n_kv) {
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\": \"llama\", \"num_hidden_layers\": 32, \"hidden_size\": 4096, \"num_attention_heads\": 32,"
             " \"num_key_value_heads\": %d, \"intermediate_size\": 14336, \"vocab_size\": 32000,"
             " \"max_position_embeddings\": 8192, \"rope_theta\": 500000, \"tie_word_embeddings\": false}",
             n_kv);
    model_desc d;
    st_err err = {0};
    int rc = model_desc_parse(&d, cfg, strlen(cfg), "llama-test", &err);
    if (rc) fail_msg("%s", err.msg);
    rc = plan_model_from_desc(pm, &d, "llama-test", &err);
    if (rc) fail_msg("%s", err.msg);
    model_desc_free(&d);
}

/* Two identical 10 GB nodes cannot hold the 14.5 GB model alone; throughput balances 16 + 16
 * (the last stage's lm_head read, 262 MB, is less than a layer, so 16/16 beats 17/15). With
 * 20 GB each the latency objective keeps everything on one node (a hop only adds time). */
static void test_equal_nodes(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    assert_int_equal(pm.layers[0].bytes, LL_LAYER);
    assert_int_equal(plan_model_weight_bytes(&pm), 32ull * LL_LAYER + 2 * LL_HEAD + 8192);
    plan_cluster c;
    load_cluster_text(&c, "{\"name\": \"eq\", \"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"},"
                          " \"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 4096;
    r.objective = PLAN_THROUGHPUT;
    r.max_tp = 1;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    assert_int_equal(p->stage[0].layer_end, 16);
    /* hand: stage 1 = (16 x 436,224,000 + 8,192 + 262,144,000) / 100 GB/s */
    double t1 = (16.0 * 436224000.0 + 8192.0 + 262144000.0) / 100e9;
    assert_true(fabs(p->t_bottleneck - t1) < 1e-9 * t1);
    /* latency, same nodes: still two stages (it does not fit on one); every split has the same
     * sum, and the tie goes to the smaller bottleneck: 16 + 16 again */
    r.objective = PLAN_LATENCY;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    assert_int_equal(p->stage[0].layer_end, 16);
    plan_cluster_free(&c);
    load_cluster_text(&c, "{\"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"},"
                          " \"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"20 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": \"20 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    /* one stage: every byte read once at 100 GB/s, no hop */
    double t = (32.0 * 436224000.0 + 8192.0 + 8192.0 + 262144000.0) / 100e9;
    assert_true(fabs(p->t_token - t) < 1e-9 * t);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Tied embeddings: the lm_head is the embedding. On one stage it is stored once (output = the
 * norm, 8,192 B); split over two stages the last one holds a copy (8,192 + 262,144,000 B) and
 * reads it whole every token. */
static void test_tied_embeddings(void **state) {
    (void)state;
    const char *cfg = "{\"model_type\": \"llama\", \"num_hidden_layers\": 32, \"hidden_size\": 4096,"
                      " \"num_attention_heads\": 32, \"num_key_value_heads\": 8, \"intermediate_size\": 14336,"
                      " \"vocab_size\": 32000, \"max_position_embeddings\": 8192, \"tie_word_embeddings\": true}";
    model_desc d;
    st_err err = {0};
    plan_model pm;
    assert_int_equal(model_desc_parse(&d, cfg, strlen(cfg), "tied", &err), 0);
    assert_int_equal(plan_model_from_desc(&pm, &d, "tied", &err), 0);
    model_desc_free(&d);
    assert_int_equal(pm.lm_head_bytes, 0);
    assert_int_equal(plan_model_weight_bytes(&pm), 32ull * LL_LAYER + LL_HEAD + 8192);
    plan_cluster c;
    load_cluster_text(&c, "{\"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"},"
                          " \"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 4096;
    r.max_tp = 1;
    plan_result *p = calloc(1, sizeof *p);
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    assert_int_equal(p->stage[0].member[0].embed, LL_HEAD);
    assert_int_equal(p->stage[1].member[0].output, 8192 + LL_HEAD);
    plan_cluster_free(&c);
    load_cluster_text(&c, "{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"20 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    assert_int_equal(p->stage[0].member[0].embed, LL_HEAD);
    assert_int_equal(p->stage[0].member[0].output, 8192);
    /* read per token: one embedding row, the layers, the norm and the whole (tied) table */
    double t = (8192.0 + 32.0 * 436224000.0 + 8192.0 + 262144000.0) / 100e9;
    assert_true(fabs(p->t_token - t) < 1e-9 * t);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* A fast (400 GB/s, 10 GB) and a slow (100 GB/s, 16 GB) node: under the latency objective every
 * layer on the fast node saves time, so it gets as many as it can hold. Capacity of the fast
 * node at 8,192 tokens: usable 9,500,000,000 - runtime 1,073,741,824 - scratch ~61.4e6 -
 * (embedding or output) 262.1e6 = ~8.10e9, over 436,224,000 + 8,192 x 4,096 = 469,778,432 per
 * layer -> 17 layers (17.25); the slow node takes the other 15. */
static void test_fast_and_slow(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    plan_cluster c;
    load_cluster_text(&c, "{\"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"},"
                          " \"nodes\": [{\"name\": \"slow\", \"devices\": [{\"memory\": \"16 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"fast\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"400 GB/s\"}]}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 8192;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    int fast = dev_index(&c, "fast");
    int fi = p->stage[0].member[0].dev == fast ? 0 : 1;
    const plan_stage *fs = &p->stage[fi];
    int nf = fs->layer_end - fs->layer_begin, ns = 32 - nf;
    assert_true(nf > ns);
    /* hand capacity for its role: scratch (8 threads, chunk 256, ctx 8,192):
     * 4 x 256 x (5x4096 + 2x4096 + 2x1024 + 2x14336 + 128 + 1 + 2 + 2 + 2) = 4 x 256 x 59,527
     * = 60,955,648; + 4 (e_count) + 4,096 (kp, vp) + 512 (inv_freq) + 8 x 14,336 x 4 (rows)
     * = 61,419,012 (+ 128,000 logits if last) */
    uint64_t scratch = 60955648ull + 4 + 4096 + 512 + 8ull * 14336 * 4 + (fs->has_output ? 128000ull : 0);
    assert_int_equal(fs->member[0].scratch, scratch);
    uint64_t fixed = 9500000000ull - (1ull << 30) - scratch - (fs->has_embed ? LL_HEAD : LL_HEAD + 8192);
    uint64_t per_layer = LL_LAYER + 8192ull * 4096;
    assert_int_equal((uint64_t)nf, fixed / per_layer);
    assert_int_equal(nf, 17);
    /* the predicted time: each stage's bytes at its bandwidth, plus one hop (50 us + 8 KiB at
     * 10 GB/s) and the token id back (50 us + 4 B at 10 GB/s) */
    double fast_b = 17.0 * 436224000.0 + (fs->has_embed ? 8192.0 : 8192.0 + 262144000.0);
    double slow_b = 15.0 * 436224000.0 + (fs->has_embed ? 8192.0 + 262144000.0 : 8192.0);
    double t = fast_b / 400e9 + slow_b / 100e9 + 50e-6 + 8192.0 / 10e9 + 50e-6 + 4.0 / 10e9;
    assert_true(fabs(p->t_token - t) < 1e-9 * t);
    /* and the fast node takes the output (the lm_head read is cheaper there) */
    assert_true(fs->has_output);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Throughput where a link fixes the bottleneck, so the tie among plans goes to latency. The
 * links force the order x -> y -> z (nothing enters x, nothing leaves z) and the last hop is
 * 100 KB/s: 8,192 B take 81.92 ms, more than any stage. Capacities at 4,096 tokens (layer
 * 436,224,000 + KV 16,777,216 = 453,001,216 B; runtime 1 GiB; scratch ~61.4e6; embedding or
 * output 262.1e6): x (5.06 GB) 7 layers, y (10.95 GB) 20, z (5.06 GB) 7 - all three are
 * needed for 32. Per layer: x 100 GB/s 4.36 ms, y 300 GB/s 1.45 ms, z 200 GB/s 2.18 ms.
 * Least latency with the bottleneck at the link: y full (20), z full (7), x the rest (5):
 * 21.8 + 29.1 + 15.3 ms. (Balancing x and y instead, e.g. 6 + 19 or 6 + 20, costs 2-3 ms.) */
static void test_throughput_ties_to_latency(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    plan_cluster c;
    load_cluster_text(&c, "{\"nodes\": ["
                          "{\"name\": \"x\", \"devices\": [{\"memory\": \"5.06 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          "{\"name\": \"y\", \"devices\": [{\"memory\": \"10.95 GB\", \"bandwidth\": \"300 GB/s\"}]},"
                          "{\"name\": \"z\", \"devices\": [{\"memory\": \"5.06 GB\", \"bandwidth\": \"200 GB/s\"}]}],"
                          " \"links\": [{\"from\": \"x\", \"to\": \"y\", \"latency\": \"10 us\", \"bandwidth\": \"10 GB/s\"},"
                          " {\"from\": \"y\", \"to\": \"z\", \"latency\": \"1 us\", \"bandwidth\": \"100 KB/s\"}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 4096;
    r.objective = PLAN_THROUGHPUT;
    r.max_tp = 1;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 3);
    static const char *order[] = {"x", "y", "z"};
    static const int layers[] = {5, 20, 7};
    for (int i = 0; i < 3; i++) {
        assert_string_equal(c.dev[p->stage[i].member[0].dev].node, order[i]);
        assert_int_equal(p->stage[i].layer_end - p->stage[i].layer_begin, layers[i]);
    }
    assert_true(fabs(p->t_bottleneck - 8192.0 / 1e5) < 1e-12);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Link latency versus link bandwidth: a must come first (nothing enters it) and continue to b
 * over a link with no latency but 819.2 KB/s (8,192 B take 10 ms) or to c over a 10 GB/s link
 * with 20 ms latency; b and c are equal and not linked to each other, and no device holds the
 * model alone (16 + 16 layers of 436 MB at 1 TB/s: 7 ms per stage). The latency objective goes
 * through b (10 ms < 20 ms of hop); the throughput objective through c, since the b link
 * could carry only one token per 10 ms, while c's link and stages carry one per 7 ms. */
static void test_link_latency_vs_bandwidth(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    plan_cluster c;
    load_cluster_text(&c, "{\"nodes\": ["
                          "{\"name\": \"a\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"1 TB/s\"}]},"
                          "{\"name\": \"b\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"1 TB/s\"}]},"
                          "{\"name\": \"c\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"1 TB/s\"}]}],"
                          " \"links\": [{\"from\": \"a\", \"to\": \"b\", \"latency\": 0, \"bandwidth\": \"819.2 KB/s\"},"
                          " {\"from\": \"a\", \"to\": \"c\", \"latency\": \"20 ms\", \"bandwidth\": \"10 GB/s\"}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 4096;
    r.max_tp = 1;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    assert_string_equal(c.dev[p->stage[0].member[0].dev].node, "a");
    assert_string_equal(c.dev[p->stage[1].member[0].dev].node, "b");
    assert_true(fabs(p->stage[0].t_hop - 0.01) < 1e-12);
    r.objective = PLAN_THROUGHPUT;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 2);
    assert_string_equal(c.dev[p->stage[1].member[0].dev].node, "c");
    assert_true(p->t_bottleneck < 0.0075);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Two nodes that could hold the model together but have no link: refused, not planned. */
static void test_unlinked_nodes(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    plan_cluster c;
    load_cluster_text(&c, "{\"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": \"10 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    plan_request r;
    plan_request_init(&r);
    r.context = 4096;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_LIMIT);
    assert_false(p->fits);
    assert_int_equal(p->max_context, 0);
    if (!strstr(p->binding, "linked")) fail_msg("%s", p->binding);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* A model bigger than the cluster: refused at any context, saying the weights do not fit. */
static void test_impossible(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    plan_cluster c;
    load_cluster_text(&c, "{\"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"},"
                          " \"nodes\": [{\"name\": \"a\", \"devices\": [{\"memory\": \"6 GB\", \"bandwidth\": \"100 GB/s\"}]},"
                          " {\"name\": \"b\", \"devices\": [{\"memory\": \"6 GB\", \"bandwidth\": \"100 GB/s\"}]}]}");
    plan_request r;
    plan_request_init(&r);
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_LIMIT);
    assert_false(p->fits);
    assert_int_equal(p->max_context, 0);
    assert_int_equal(p->n_stage, 0);
    if (strncmp(p->binding, "weights:", 8)) fail_msg("%s", p->binding);
    assert_non_null(strstr(err.msg, "max context for 1 slot: 0 tokens"));
    /* devices too small for any single layer (1.71e9 B: q, o 8192x8192x2; k, v 1024x8192x2;
     * gate, up, down 28672x8192x2), though together they could hold all 3.44e9 B */
    plan_cluster_free(&c);
    load_cluster_text(&c, "{\"default_link\": {\"latency\": \"50 us\", \"bandwidth\": \"10 GB/s\"}, \"nodes\": ["
                          "{\"name\": \"a\", \"devices\": [{\"memory\": \"1.5 GB\", \"bandwidth\": \"100 GB/s\", \"overhead\": 0}]},"
                          "{\"name\": \"b\", \"devices\": [{\"memory\": \"1.5 GB\", \"bandwidth\": \"100 GB/s\", \"overhead\": 0}]},"
                          "{\"name\": \"c\", \"devices\": [{\"memory\": \"1.5 GB\", \"bandwidth\": \"100 GB/s\", \"overhead\": 0}]}]}");
    plan_model_free(&pm);
    char cfg[512];
    snprintf(cfg, sizeof cfg, "{\"model_type\": \"llama\", \"num_hidden_layers\": 2, \"hidden_size\": 8192,"
                              " \"num_attention_heads\": 64, \"num_key_value_heads\": 8, \"intermediate_size\": 28672,"
                              " \"vocab_size\": 1000, \"max_position_embeddings\": 4096}");
    model_desc d;
    assert_int_equal(model_desc_parse(&d, cfg, strlen(cfg), "big-layers", &err), 0);
    assert_int_equal(plan_model_from_desc(&pm, &d, "big-layers", &err), 0);
    model_desc_free(&d);
    r.max_tp = 1;
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_LIMIT);
    assert_int_equal(p->max_context, 0);
    if (strncmp(p->binding, "layers:", 7)) fail_msg("%s", p->binding);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* Two equal devices, a model that fits on one. TP=2 halves the split bytes per member and adds
 * 2 all-reduces per layer; it wins only when the link is fast:
 *   one device: (32 x 436,224,000 + 8,192 + 8,192 + 262,144,000) / 1 TB/s = 14.2 ms
 *   TP=2, 2 us: (32 x (16,384 + 436,207,616/2) + 8,192 + 8,192 + 262,144,000) / 1 TB/s
 *               + 64 x (2 us + 8,192 B / 100 GB/s) = 7.4 ms + 0.133 ms
 *   TP=2, 200 us: + 64 x 200 us = 12.8 ms more -> slower than one device. */
static void test_tp_only_when_faster(void **state) {
    (void)state;
    plan_model pm;
    llama_model(&pm, 8);
    const char *fmt = "{\"nodes\": [{\"name\": \"n\", \"intra_link\": {\"latency\": \"%s\", \"bandwidth\": \"100 GB/s\"},"
                      " \"devices\": [{\"name\": \"g0\", \"memory\": \"80 GB\", \"bandwidth\": \"1 TB/s\"},"
                      " {\"name\": \"g1\", \"memory\": \"80 GB\", \"bandwidth\": \"1 TB/s\"}]}]}";
    char js[1024];
    plan_cluster c;
    snprintf(js, sizeof js, fmt, "2 us");
    load_cluster_text(&c, js);
    plan_request r;
    plan_request_init(&r);
    r.context = 8192;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    assert_int_equal(p->stage[0].n_tp, 2);
    double t_tp = (32.0 * (16384.0 + 436207616.0 / 2) + 8192.0 + 8192.0 + 262144000.0) / 1e12 + 64 * (2e-6 + 8192.0 / 100e9);
    assert_true(fabs(p->t_token - t_tp) < 1e-9 * t_tp);
    assert_int_equal(p->stage[0].member[1].kv, 32ull * 2048ull * 8192ull); /* 4 of 8 KV heads each */
    plan_cluster_free(&c);

    snprintf(js, sizeof js, fmt, "200 us");
    load_cluster_text(&c, js);
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    assert_int_equal(p->stage[0].n_tp, 1);
    double t_one = (32.0 * 436224000.0 + 8192.0 + 8192.0 + 262144000.0) / 1e12;
    assert_true(fabs(p->t_token - t_one) < 1e-9 * t_one);
    /* min_tp = 2 (`plan --tp 2`): the TP layout even where it loses, with its own prediction */
    r.min_tp = 2;
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    check_valid(p, &pm, &c, 0.05);
    assert_int_equal(p->n_stage, 1);
    assert_int_equal(p->stage[0].n_tp, 2);
    double t_tp200 = (32.0 * (16384.0 + 436207616.0 / 2) + 8192.0 + 8192.0 + 262144000.0) / 1e12 + 64 * (200e-6 + 8192.0 / 100e9);
    assert_true(fabs(p->t_token - t_tp200) < 1e-9 * t_tp200);
    assert_true(p->t_token > t_one);
    r.max_tp = 1; /* smallest group above the largest: refused */
    assert_int_equal(plan_solve(&pm, &c, &r, p, &err), ST_ERR_ARG);
    r.min_tp = 1, r.max_tp = PLAN_MAX_TP;
    plan_cluster_free(&c);
    plan_model_free(&pm);

    /* a fast link but one KV head, which 2 does not divide: no TP */
    llama_model(&pm, 1);
    snprintf(js, sizeof js, fmt, "2 us");
    load_cluster_text(&c, js);
    rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(p->stage[0].n_tp, 1);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

/* More than PLAN_EXACT_DEVICES devices: the heuristic order still produces a valid plan. */
static void test_many_devices(void **state) {
    (void)state;
    plan_model pm;
    minimax_model(&pm);
    char js[8192];
    int n = snprintf(js, sizeof js, "{\"default_link\": {\"latency\": \"20 us\", \"bandwidth\": \"50 GB/s\"}, \"nodes\": [");
    for (int i = 0; i < 10; i++)
        n += snprintf(js + n, sizeof js - (size_t)n, "%s{\"name\": \"n%d\", \"devices\": [{\"memory\": \"%d GB\", \"bandwidth\": \"%d GB/s\"}]}",
                      i ? ", " : "", i, 30 + 4 * i, 300 + 20 * i);
    snprintf(js + n, sizeof js - (size_t)n, "]}");
    plan_cluster c;
    load_cluster_text(&c, js);
    plan_request r;
    plan_request_init(&r);
    r.context = 32768;
    r.objective = PLAN_THROUGHPUT;
    plan_result *p = calloc(1, sizeof *p);
    st_err err = {0};
    int rc = plan_solve(&pm, &c, &r, p, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_false(p->exact);
    check_valid(p, &pm, &c, 0.05);
    free(p);
    plan_cluster_free(&c);
    plan_model_free(&pm);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_minimax_stats),
        cmocka_unit_test(test_synthetic_preset),
        cmocka_unit_test(test_fixture_headers),
        cmocka_unit_test(test_headers_match_descriptor),
        cmocka_unit_test(test_quantities),
        cmocka_unit_test(test_seed_cluster_file),
        cmocka_unit_test(test_cluster_errors),
        cmocka_unit_test(test_seed_latency),
        cmocka_unit_test(test_seed_throughput),
        cmocka_unit_test(test_seed_four_slots),
        cmocka_unit_test(test_max_context_when_it_fits),
        cmocka_unit_test(test_context_above_model_max),
        cmocka_unit_test(test_cli),
        cmocka_unit_test(test_equal_nodes),
        cmocka_unit_test(test_tied_embeddings),
        cmocka_unit_test(test_fast_and_slow),
        cmocka_unit_test(test_throughput_ties_to_latency),
        cmocka_unit_test(test_link_latency_vs_bandwidth),
        cmocka_unit_test(test_unlinked_nodes),
        cmocka_unit_test(test_impossible),
        cmocka_unit_test(test_tp_only_when_faster),
        cmocka_unit_test(test_many_devices),
        cmocka_unit_test(test_optimize_at_full),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
