/* test_load.c — binding checkpoint tensors to the descriptor (model_load) on good and bad input.
 *
 * Good input: every fixture checkpoint loads; the bound views are checked against the tensors
 * of the files themselves (pointers, rows/cols, bits/group read off config.json and the
 * safetensors headers by hand), and the byte count of bound weights against an independent sum
 * over the files' linear tensors. Bad input: a fixture is copied into a temporary directory and
 * one thing is broken (tensor dropped, reshaped, repacked, scales added, config changed); each
 * case asserts the status and that the message names the directory and the tensor/module.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strata/base.h"
#include "strata/model.h"
#include "strata/safetensors.h"

// ----------------------------------------------------------------------------
// helpers: temporary copies of fixtures

static const char *fixtures(void) {
    const char *fx = getenv("STRATA_FIXTURES");
    return fx ? fx : "tests/fixtures";
}

static char *fixture_dir(const char *name) {
    char *d = malloc(1024);
    assert_non_null(d);
    snprintf(d, 1024, "%s/models/%s", fixtures(), name);
    return d;
}

static char *g_tmpdirs[64]; /* live temporary copies; a failed test leaves its own here */

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* rm -rf of a directory made by copy_fixture, then frees the name. */
static void rm_tree(char *dir) {
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (g_tmpdirs[i] == dir) g_tmpdirs[i] = NULL;
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

/* Group teardown: removes copies of tests that failed before cleaning up. */
static int rm_leftovers(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (g_tmpdirs[i]) rm_tree(g_tmpdirs[i]);
    return 0;
}

static void copy_file(const char *from, const char *to) {
    char *buf = NULL;
    size_t len = 0;
    st_err err = {0};
    if (st_file_read(from, &buf, &len, &err)) fail_msg("%s", err.msg);
    FILE *f = fopen(to, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    free(buf);
}

/* Copies config.json and the weights (not the golden files) of fixture `name` into a fresh
 * temporary directory; returns its path (caller: rm_tree). */
static char *copy_fixture(const char *name) {
    const char *t = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/strata-load-XXXXXX", t && *t ? t : "/tmp");
    assert_non_null(mkdtemp(tmpl));
    char *src = fixture_dir(name);
    DIR *d = opendir(src);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !strncmp(e->d_name, "golden", 6)) continue;
        char *a = st_path_join(src, e->d_name), *b = st_path_join(tmpl, e->d_name);
        copy_file(a, b);
        free(a);
        free(b);
    }
    closedir(d);
    free(src);
    char *dir = strdup(tmpl);
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (!g_tmpdirs[i]) {
            g_tmpdirs[i] = dir;
            break;
        }
    return dir;
}

// ----------------------------------------------------------------------------
// helpers: rewriting a safetensors file of a copy

#define TL_CAP 1024

/* The tensors of one file as sft_write input; names/data borrow from the open file or from
 * buffers the list owns. */
typedef struct tlist {
    sft_file f;
    sft_write_tensor t[TL_CAP];
    size_t n;
    void *bufs[32];
    char *names[32];
    int n_bufs, n_names;
} tlist;

static void tl_open(tlist *l, const char *path) {
    memset(l, 0, sizeof *l);
    st_err err = {0};
    if (sft_file_open(&l->f, path, &err)) fail_msg("%s", err.msg);
    assert_true(l->f.n_tensors <= TL_CAP);
    for (size_t i = 0; i < l->f.n_tensors; i++) {
        const sft_tensor *s = &l->f.tensors[i];
        sft_write_tensor *w = &l->t[l->n++];
        w->name = s->name;
        w->dtype = s->dtype;
        w->ndim = s->ndim;
        memcpy(w->shape, s->shape, sizeof w->shape);
        w->data = s->data;
    }
}

static sft_write_tensor *tl_find(tlist *l, const char *name) {
    for (size_t i = 0; i < l->n; i++)
        if (!strcmp(l->t[i].name, name)) return &l->t[i];
    fail_msg("test bug: no tensor %s", name);
    return NULL;
}

static void tl_drop(tlist *l, const char *name) {
    sft_write_tensor *w = tl_find(l, name);
    size_t i = (size_t)(w - l->t);
    memmove(&l->t[i], &l->t[i + 1], (l->n - i - 1) * sizeof *w);
    l->n--;
}

/* Adds (or replaces) tensor name with a zero-filled [d0, d1] (d1 < 0: 1-D) tensor. */
static void tl_put(tlist *l, const char *name, sft_dtype dt, int64_t d0, int64_t d1) {
    sft_write_tensor *w = NULL;
    for (size_t i = 0; i < l->n; i++)
        if (!strcmp(l->t[i].name, name)) w = &l->t[i];
    if (!w) {
        assert_true(l->n < TL_CAP && l->n_names < 32);
        w = &l->t[l->n++];
        w->name = l->names[l->n_names++] = strdup(name);
    }
    memset(w->shape, 0, sizeof w->shape);
    w->dtype = dt;
    w->ndim = d1 < 0 ? 1 : 2;
    w->shape[0] = d0;
    w->shape[1] = d1 < 0 ? 0 : d1;
    size_t nb = (size_t)d0 * (size_t)(d1 < 0 ? 1 : d1) * (size_t)sft_dtype_bits(dt) / 8;
    assert_true(l->n_bufs < 32);
    w->data = l->bufs[l->n_bufs++] = calloc(nb ? nb : 1, 1);
}

/* Writes the list over path (via a temporary file + rename) and releases everything. */
static void tl_save(tlist *l, const char *path) {
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    st_err err = {0};
    if (sft_write(tmp, l->t, l->n, l->f.metadata_format, &err)) fail_msg("%s", err.msg);
    sft_file_close(&l->f);
    assert_int_equal(rename(tmp, path), 0);
    for (int i = 0; i < l->n_bufs; i++) free(l->bufs[i]);
    for (int i = 0; i < l->n_names; i++) free(l->names[i]);
}

static char *weights_path(const char *dir) { return st_path_join(dir, "model.safetensors"); }

/* config.json of dir, parsed (caller: json_decref after save_config). */
static json_t *load_config(const char *dir) {
    char *p = st_path_join(dir, "config.json");
    json_error_t je;
    json_t *root = json_load_file(p, 0, &je);
    if (!root) fail_msg("%s: %s", p, je.text);
    free(p);
    return root;
}

static void save_config(const char *dir, json_t *root) {
    char *p = st_path_join(dir, "config.json");
    assert_int_equal(json_dump_file(root, p, JSON_INDENT(2)), 0);
    free(p);
    json_decref(root);
}

/* Asserts msg is one line, starts with `prefix` and contains every needle (NULL-terminated). */
static void check_msg(const char *msg, const char *prefix, ...) {
    if (strncmp(msg, prefix, strlen(prefix))) fail_msg("message does not start with '%s': %s", prefix, msg);
    if (strchr(msg, '\n')) fail_msg("message is not one line: %s", msg);
    va_list ap;
    va_start(ap, prefix);
    for (const char *n; (n = va_arg(ap, const char *));)
        if (!strstr(msg, n)) fail_msg("message lacks '%s': %s", n, msg);
    va_end(ap);
}

/* model_load(dir) must fail with code; returns the message (static storage). */
static const char *expect_load_fail(const char *dir, int code) {
    static st_err err;
    memset(&err, 0, sizeof err);
    static model sentinel;
    model *m = &sentinel; /* must be reset to NULL */
    int rc = model_load(&m, dir, NULL, &err);
    if (rc != code) fail_msg("%s: model_load returned %d, want %d (%s)", dir, rc, code, rc ? err.msg : "loaded");
    assert_int_equal(err.code, code);
    assert_null(m);
    return err.msg;
}

static model *expect_load_ok(const char *dir) {
    st_err err = {0};
    model *m = NULL;
    if (model_load(&m, dir, NULL, &err)) fail_msg("%s: %s", dir, err.msg);
    assert_non_null(m);
    return m;
}

static const sft_tensor *tensor(const model *m, const char *name) {
    const sft_tensor *t = sft_set_find(&m->weights, name);
    if (!t) fail_msg("fixture lacks %s", name);
    return t;
}

// ----------------------------------------------------------------------------
// good input: every fixture binds, views point at the right bytes

typedef struct sum_ctx {
    size_t bytes;
    const model *m;
} sum_ctx;

/* Sums stored bytes of linear tensors: everything but norms and the routing bias. */
static int sum_linear(void *ctx, const sft_tensor *t) {
    sum_ctx *s = ctx;
    if (strstr(t->name, "norm") || strstr(t->name, "e_score_correction_bias")) return 0;
    s->bytes += t->nbytes;
    return 0;
}

static void test_fixtures_load(void **state) {
    (void)state;
    static const char *const names[] = {"llama-bf16", "llama-f16-t5style", "llama-mlx-q3g32-mixed",
                                        "qwen3-bf16", "qwen3-mlx-q4g64", "qwen3_moe-bf16-sharded",
                                        "qwen3_moe-mlx-q4g64", "minimax_m2-bf16", "minimax_m2-mlx-q5g64"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *dir = fixture_dir(names[i]);
        model *m = expect_load_ok(dir);
        assert_string_equal(m->dir, dir);
        assert_int_equal(m->layer_begin, 0);
        assert_int_equal(m->layer_end, m->desc.n_layer);
        /* every linear tensor in the files is bound exactly once (tied embeddings counted once) */
        sum_ctx s = {0, m};
        sft_set_each(&m->weights, sum_linear, &s);
        if (m->weight_bytes != s.bytes)
            fail_msg("%s: weight_bytes %zu but the files hold %zu bytes of linear tensors", names[i], m->weight_bytes,
                     s.bytes);
        /* norms are f32 copies of the stored values */
        const sft_tensor *nt = tensor(m, "model.norm.weight");
        for (int k = 0; k < m->desc.n_embd; k++) {
            uint16_t h;
            memcpy(&h, (const char *)nt->data + 2 * k, 2);
            float want = nt->dtype == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
            if (m->out_norm[k] != want) fail_msg("%s: out_norm[%d] %g != %g", names[i], k, m->out_norm[k], want);
        }
        model_free(m);
        free(dir);
    }
}

static void test_dense_and_tied(void **state) {
    (void)state;
    char *dir = fixture_dir("qwen3-bf16");
    model *m = expect_load_ok(dir);
    const model_desc *d = &m->desc;
    assert_int_equal(d->tie_embeddings, 1);
    assert_ptr_equal(m->output.w, m->embed.w); /* tied: the same bytes */
    assert_ptr_equal(m->embed.w, tensor(m, "model.embed_tokens.weight")->data);
    const layer_weights *L = &m->layers[2];
    /* q_proj: [n_head * head_dim, hidden] = [192, 128] BF16 */
    assert_ptr_equal(L->wq.w, tensor(m, "model.layers.2.self_attn.q_proj.weight")->data);
    assert_int_equal(L->wq.rows, 192);
    assert_int_equal(L->wq.cols, 128);
    assert_int_equal(L->wq.qbits, 0);
    assert_int_equal(L->wq.dtype, SFT_BF16);
    assert_int_equal(L->wq.row_bytes, 256);
    assert_int_equal(L->wo.rows, 128);
    assert_int_equal(L->wo.cols, 192);
    assert_int_equal(L->w_down.rows, 128);
    assert_int_equal(L->w_down.cols, 256);
    assert_non_null(L->q_norm);
    assert_null(L->exp_gate);
    model_free(m);
    free(dir);
}

static void test_quant_overrides_bound(void **state) {
    (void)state;
    char *dir = fixture_dir("llama-mlx-q3g32-mixed");
    model *m = expect_load_ok(dir);
    /* from config.json: default 3-bit g32; lm_head 8/64; layer 0 up_proj false; 1 down 6/64; 2 v 8/32 */
    assert_int_equal(m->output.qbits, 8);
    assert_int_equal(m->output.group, 64);
    assert_int_equal(m->output.row_bytes, 32 * 4); /* U32 [512, 32] */
    assert_int_equal(m->embed.qbits, 3);
    assert_int_equal(m->embed.group, 32);
    assert_int_equal(m->embed.srow_elems, 4);
    assert_int_equal(m->layers[0].w_up.qbits, 0);
    assert_int_equal(m->layers[0].w_up.dtype, SFT_BF16);
    assert_ptr_equal(m->layers[0].w_up.w, tensor(m, "model.layers.0.mlp.up_proj.weight")->data);
    assert_int_equal(m->layers[0].w_gate.qbits, 3);
    assert_int_equal(m->layers[1].w_down.qbits, 6);
    assert_int_equal(m->layers[1].w_down.group, 64);
    assert_int_equal(m->layers[1].w_down.cols, 256);
    assert_int_equal(m->layers[2].wv.qbits, 8);
    assert_int_equal(m->layers[2].wv.group, 32);
    assert_int_equal(m->layers[2].wk.qbits, 3);
    assert_ptr_equal(m->layers[1].w_down.scales, tensor(m, "model.layers.1.mlp.down_proj.scales")->data);
    assert_ptr_equal(m->layers[1].w_down.biases, tensor(m, "model.layers.1.mlp.down_proj.biases")->data);
    assert_int_equal(m->layers[1].w_down.sdtype, SFT_BF16);
    model_free(m);
    free(dir);
}

/* HF per-expert tensors (qwen3_moe, sharded) and MLX stacked switch_mlp both bind. */
static void test_moe_layouts(void **state) {
    (void)state;
    char *dir = fixture_dir("qwen3_moe-bf16-sharded");
    model *m = expect_load_ok(dir);
    assert_int_equal(m->weights.n_files, 2);
    assert_non_null(m->layers[0].w_gate.w); /* mlp_only_layers [0]: dense */
    assert_null(m->layers[0].exp_gate);
    for (int l = 1; l < 3; l++) {
        const layer_weights *L = &m->layers[l];
        assert_int_equal(L->router.rows, 8);
        assert_int_equal(L->router.cols, 128);
        for (int e = 0; e < 8; e++) {
            char n[128];
            snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.gate_proj.weight", l, e);
            assert_ptr_equal(L->exp_gate[e].w, tensor(m, n)->data);
            snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.up_proj.weight", l, e);
            assert_ptr_equal(L->exp_up[e].w, tensor(m, n)->data);
            snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.down_proj.weight", l, e);
            assert_ptr_equal(L->exp_down[e].w, tensor(m, n)->data);
            assert_int_equal(L->exp_gate[e].rows, 64);
            assert_int_equal(L->exp_gate[e].cols, 128);
            assert_int_equal(L->exp_down[e].rows, 128);
            assert_int_equal(L->exp_down[e].cols, 64);
        }
    }
    model_free(m);
    free(dir);

    dir = fixture_dir("qwen3_moe-mlx-q4g64");
    m = expect_load_ok(dir);
    const sft_tensor *gw = tensor(m, "model.layers.1.mlp.switch_mlp.gate_proj.weight"),
                     *gs = tensor(m, "model.layers.1.mlp.switch_mlp.gate_proj.scales"),
                     *dw = tensor(m, "model.layers.1.mlp.switch_mlp.down_proj.weight");
    const layer_weights *L = &m->layers[1];
    assert_int_equal(L->router.qbits, 8); /* override */
    assert_int_equal(L->router.group, 64);
    for (int e = 0; e < 8; e++) {
        /* gate: U32 [8, 64, 16] -> expert e starts e * 64 rows * 64 bytes in; scales BF16 [8, 64, 2] */
        assert_ptr_equal(L->exp_gate[e].w, (const char *)gw->data + (size_t)e * 64 * 16 * 4);
        assert_ptr_equal(L->exp_gate[e].scales, (const char *)gs->data + (size_t)e * 64 * 2 * 2);
        assert_int_equal(L->exp_gate[e].qbits, 4);
        assert_int_equal(L->exp_gate[e].group, 64);
        assert_int_equal(L->exp_gate[e].rows, 64);
        assert_int_equal(L->exp_gate[e].cols, 128);
        /* down: U32 [8, 128, 8] */
        assert_ptr_equal(L->exp_down[e].w, (const char *)dw->data + (size_t)e * 128 * 8 * 4);
        assert_int_equal(L->exp_down[e].cols, 64);
        assert_int_equal(L->exp_down[e].srow_elems, 1);
    }
    model_free(m);
    free(dir);

    dir = fixture_dir("minimax_m2-mlx-q5g64");
    m = expect_load_ok(dir);
    L = &m->layers[0];
    const sft_tensor *uw = tensor(m, "model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight");
    assert_ptr_equal(L->exp_up[7].w, (const char *)uw->data + (size_t)7 * 64 * 20 * 4); /* U32 [8, 64, 20] */
    assert_int_equal(L->exp_up[7].qbits, 5);
    assert_non_null(L->router_bias);
    float b0;
    memcpy(&b0, tensor(m, "model.layers.0.block_sparse_moe.e_score_correction_bias")->data, 4);
    assert_true(L->router_bias[0] == b0);
    assert_int_equal(L->router.qbits, 8);
    model_free(m);
    free(dir);
}

/* A partial (pipeline stage) load binds only its layers. */
static void test_layer_range(void **state) {
    (void)state;
    char *dir = fixture_dir("qwen3-bf16");
    model_load_opts o = {.layer_begin = 1, .layer_end = 2, .with_embed = 0, .with_output = 1};
    model *m = NULL;
    st_err err = {0};
    if (model_load(&m, dir, &o, &err)) fail_msg("%s", err.msg);
    assert_null(m->layers[0].wq.w);
    assert_non_null(m->layers[1].wq.w);
    assert_null(m->layers[2].wq.w);
    assert_non_null(m->out_norm);
    assert_non_null(m->output.w); /* tied: the embedding is bound for the output */
    model_free(m);
    o = (model_load_opts){.layer_begin = 2, .layer_end = 4};
    assert_int_equal(model_load(&m, dir, &o, &err), ST_ERR_ARG);
    assert_null(m);
    assert_non_null(strstr(err.msg, "layer range [2, 4) is not within the model's 3 layers"));
    free(dir);
}

// ----------------------------------------------------------------------------
// bad input

static void test_missing_tensor(void **state) {
    (void)state;
    char *dir = copy_fixture("qwen3-bf16");
    char *w = weights_path(dir);
    tlist l;
    tl_open(&l, w);
    tl_drop(&l, "model.layers.1.self_attn.k_proj.weight");
    tl_save(&l, w);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s: ", dir);
    check_msg(expect_load_fail(dir, ST_ERR_MISSING), pre, "missing tensor 'model.layers.1.self_attn.k_proj.weight'",
              NULL);
    tl_open(&l, w);
    tl_drop(&l, "model.norm.weight");
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_MISSING), pre, "missing tensor 'model.norm.weight'", NULL);
    free(w);
    rm_tree(dir);

    /* sharded: an expert dropped from its shard and from the index */
    dir = copy_fixture("qwen3_moe-bf16-sharded");
    const char *gone = "model.layers.2.mlp.experts.5.down_proj.weight";
    json_t *idx;
    {
        char *ip = st_path_join(dir, "model.safetensors.index.json");
        json_error_t je;
        idx = json_load_file(ip, 0, &je);
        assert_non_null(idx);
        json_t *wm = json_object_get(idx, "weight_map");
        char *shard = st_path_join(dir, json_string_value(json_object_get(wm, gone)));
        tl_open(&l, shard);
        tl_drop(&l, gone);
        tl_save(&l, shard);
        free(shard);
        assert_int_equal(json_object_del(wm, gone), 0);
        assert_int_equal(json_dump_file(idx, ip, 0), 0);
        json_decref(idx);
        free(ip);
    }
    snprintf(pre, sizeof pre, "%s: ", dir);
    check_msg(expect_load_fail(dir, ST_ERR_MISSING), pre, "missing tensor 'model.layers.2.mlp.experts.5.down_proj.weight'",
              NULL);
    rm_tree(dir);
}

static void test_wrong_shape(void **state) {
    (void)state;
    char *dir = copy_fixture("qwen3-bf16");
    char *w = weights_path(dir);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tlist l;
    /* [256, 128] stored as [128, 256]: same bytes, wrong rows */
    tl_open(&l, w);
    sft_write_tensor *t = tl_find(&l, "model.layers.0.mlp.up_proj.weight");
    t->shape[0] = 128;
    t->shape[1] = 256;
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.0.mlp.up_proj.weight'", "expected [256", NULL);
    rm_tree(dir);

    /* [192, 128] as [192, 64] F32: right byte count, wrong columns */
    dir = copy_fixture("qwen3-bf16");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    t = tl_find(&l, "model.layers.1.self_attn.q_proj.weight");
    t->dtype = SFT_F32;
    t->shape[1] = 64;
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.1.self_attn.q_proj.weight' is F32 [..., 64]",
              "expected a float matrix [..., 128]", NULL);
    rm_tree(dir);

    /* integer dtype for a dense matrix */
    dir = copy_fixture("qwen3-bf16");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    tl_find(&l, "model.layers.2.mlp.down_proj.weight")->dtype = SFT_I16;
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.2.mlp.down_proj.weight' is I16", NULL);
    rm_tree(dir);

    /* a norm vector [128] stored as [2, 64] */
    dir = copy_fixture("qwen3-bf16");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    t = tl_find(&l, "model.layers.0.input_layernorm.weight");
    t->ndim = 2;
    t->shape[0] = 2;
    t->shape[1] = 64;
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.0.input_layernorm.weight'",
              "expected a float vector [128]", NULL);
    rm_tree(dir);

    /* stacked experts: [8, 64, 16] as [4, 128, 16] */
    dir = copy_fixture("qwen3_moe-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    t = tl_find(&l, "model.layers.2.mlp.switch_mlp.up_proj.weight");
    t->shape[0] = 4;
    t->shape[1] = 128;
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.2.mlp.switch_mlp.up_proj.weight'",
              "expected [experts, 64", NULL);
    free(w);
    rm_tree(dir);
}

static void test_quant_mismatch(void **state) {
    (void)state;
    /* gate_proj is 4-bit g64 over 128 columns: U32 [256, 16]; store [256, 12] instead */
    char *dir = copy_fixture("qwen3-mlx-q4g64");
    char *w = weights_path(dir);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tlist l;
    tl_open(&l, w);
    tl_put(&l, "model.layers.0.mlp.gate_proj.weight", SFT_U32, 256, 12);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.0.mlp.gate_proj' shapes (weight [..., 256, 12]",
              "do not match 4-bit group-64 quantization of a [256, 128] matrix", NULL);
    rm_tree(dir);

    /* config says 3-bit, the tensors are 4-bit */
    dir = copy_fixture("qwen3-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    json_t *cfg = load_config(dir);
    json_object_set_new(json_object_get(cfg, "quantization"), "bits", json_integer(3));
    save_config(dir, cfg);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.embed_tokens' shapes", "do not match 3-bit group-64", NULL);
    rm_tree(dir);

    /* scales with the wrong number of groups: [256, 4] for g64 over 128 columns */
    dir = copy_fixture("qwen3-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    tl_put(&l, "model.layers.1.mlp.up_proj.scales", SFT_BF16, 256, 4);
    tl_put(&l, "model.layers.1.mlp.up_proj.biases", SFT_BF16, 256, 4);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.1.mlp.up_proj' shapes", "scales [..., 256, 4]",
              NULL);
    rm_tree(dir);

    /* quantized weight stored as BF16 */
    dir = copy_fixture("qwen3-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    tl_put(&l, "model.layers.0.self_attn.q_proj.weight", SFT_BF16, 192, 32);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "quantized tensor 'model.layers.0.self_attn.q_proj.weight' is BF16",
              "expected U32", NULL);
    rm_tree(dir);

    /* biases missing */
    dir = copy_fixture("qwen3-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s: ", dir);
    tl_open(&l, w);
    tl_drop(&l, "model.layers.2.mlp.down_proj.biases");
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_MISSING), pre, "missing tensor 'model.layers.2.mlp.down_proj.biases'", NULL);
    rm_tree(dir);

    /* scales and biases of different dtypes */
    dir = copy_fixture("qwen3-mlx-q4g64");
    free(w);
    w = weights_path(dir);
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tl_open(&l, w);
    tl_put(&l, "model.layers.2.mlp.down_proj.biases", SFT_F32, 128, 4);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre,
              "'model.layers.2.mlp.down_proj.scales'/'model.layers.2.mlp.down_proj.biases' must be float tensors", NULL);
    free(w);
    rm_tree(dir);
}

/* config.json says `false` (not quantized) but the file has scales for the module. */
static void test_scales_for_unquantized(void **state) {
    (void)state;
    char *dir = copy_fixture("llama-mlx-q3g32-mixed");
    char *w = weights_path(dir);
    tlist l;
    tl_open(&l, w);
    tl_put(&l, "model.layers.0.mlp.up_proj.scales", SFT_BF16, 256, 4);
    tl_put(&l, "model.layers.0.mlp.up_proj.biases", SFT_BF16, 256, 4);
    tl_save(&l, w);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s: ", dir);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre,
              "'model.layers.0.mlp.up_proj' has scales but config.json says it is not quantized", NULL);
    free(w);
    rm_tree(dir);
}

/* Unknown extra tensors (MTP heads, rotary caches) are ignored. */
static void test_extra_tensors(void **state) {
    (void)state;
    char *dir = copy_fixture("qwen3-bf16");
    char *w = weights_path(dir);
    tlist l;
    tl_open(&l, w);
    size_t n0 = l.n;
    tl_put(&l, "mtp.0.weight", SFT_BF16, 128, 128);
    tl_put(&l, "model.layers.0.self_attn.rotary_emb.inv_freq", SFT_F32, 24, -1);
    tl_save(&l, w);
    model *m = expect_load_ok(dir);
    assert_int_equal(m->weights.n_tensors, n0 + 2);
    assert_non_null(sft_set_find(&m->weights, "mtp.0.weight"));
    /* not counted as bound weights: the same as the unmodified fixture */
    char *fx = fixture_dir("qwen3-bf16");
    model *ref = expect_load_ok(fx);
    assert_int_equal(m->weight_bytes, ref->weight_bytes);
    model_free(ref);
    model_free(m);
    free(fx);
    free(w);
    rm_tree(dir);
}

/* Without a quantization block bits/group come from the shapes; impossible shapes are errors. */
static void test_inferred_quant(void **state) {
    (void)state;
    char *dir = copy_fixture("qwen3-mlx-q4g64");
    json_t *cfg = load_config(dir);
    json_object_del(cfg, "quantization");
    json_object_del(cfg, "quantization_config");
    save_config(dir, cfg);
    model *m = expect_load_ok(dir);
    /* embed U32 [512, 16] over 128 columns: 16 * 32 / 128 = 4 bits; scales [512, 2]: 128 / 2 = 64 */
    assert_int_equal(m->embed.qbits, 4);
    assert_int_equal(m->embed.group, 64);
    assert_int_equal(m->layers[0].wo.qbits, 4); /* [128, 24] over 192 columns */
    assert_int_equal(m->layers[0].wo.group, 64);
    model_free(m);

    char *w = weights_path(dir);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s/model.safetensors: ", dir);
    tlist l;
    /* zero-width scales: group would be 0 */
    tl_open(&l, w);
    tl_put(&l, "model.layers.1.mlp.gate_proj.scales", SFT_BF16, 256, 0);
    tl_put(&l, "model.layers.1.mlp.gate_proj.biases", SFT_BF16, 256, 0);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.1.mlp.gate_proj' shapes",
              "give no supported quantization", NULL);
    /* 28 packed words over 128 columns: 7 bits, which MLX does not have */
    tl_open(&l, w);
    tl_put(&l, "model.layers.1.mlp.gate_proj.weight", SFT_U32, 256, 28);
    tl_put(&l, "model.layers.1.mlp.gate_proj.scales", SFT_BF16, 256, 2);
    tl_put(&l, "model.layers.1.mlp.gate_proj.biases", SFT_BF16, 256, 2);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "'model.layers.1.mlp.gate_proj' shapes",
              "(bits 7, group 64)", NULL);
    /* 128 scale columns: group 1 */
    tl_open(&l, w);
    tl_put(&l, "model.layers.1.mlp.gate_proj.weight", SFT_U32, 256, 16);
    tl_put(&l, "model.layers.1.mlp.gate_proj.scales", SFT_BF16, 256, 128);
    tl_put(&l, "model.layers.1.mlp.gate_proj.biases", SFT_BF16, 256, 128);
    tl_save(&l, w);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "(bits 4, group 1)", NULL);
    free(w);
    rm_tree(dir);
}

/* Errors from the layers below keep naming their file. */
static void test_bad_files(void **state) {
    (void)state;
    char *dir = copy_fixture("qwen3-bf16");
    char *p = st_path_join(dir, "config.json");
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs("{\"model_type\": \"qwen3\",", f);
    fclose(f);
    char pre[1100];
    snprintf(pre, sizeof pre, "%s: ", p);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "invalid JSON at line 1", NULL);
    free(p);
    rm_tree(dir);

    dir = copy_fixture("qwen3-bf16");
    p = weights_path(dir);
    assert_int_equal(truncate(p, 1000000), 0);
    snprintf(pre, sizeof pre, "%s: ", p);
    check_msg(expect_load_fail(dir, ST_ERR_FORMAT), pre, "(truncated file?)", NULL);
    free(p);
    rm_tree(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixtures_load),        cmocka_unit_test(test_dense_and_tied),
        cmocka_unit_test(test_quant_overrides_bound), cmocka_unit_test(test_moe_layouts),
        cmocka_unit_test(test_layer_range),          cmocka_unit_test(test_missing_tensor),
        cmocka_unit_test(test_wrong_shape),          cmocka_unit_test(test_quant_mismatch),
        cmocka_unit_test(test_scales_for_unquantized), cmocka_unit_test(test_extra_tensors),
        cmocka_unit_test(test_inferred_quant),       cmocka_unit_test(test_bad_files),
    };
    return cmocka_run_group_tests(tests, NULL, rm_leftovers);
}
