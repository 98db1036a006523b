/* load.c — bind checkpoint tensors to the model descriptor (see model.h).
 *
 * Every tensor is checked for dtype and shape before use. A linear module P is MLX-quantized
 * iff config.json's "quantization" has an entry for P that says so, or (no entry) P.scales
 * exists — mlx-lm's own predicate. Bits and group come from the entry or the default and must
 * agree with the packed shapes; when config.json has no quantization block they are inferred
 * from the shapes (bits = 32 * packed_cols / cols, group = cols / scale_cols).
 */
#include "strata/model.h"

#include <stdlib.h>
#include <string.h>

typedef struct binder {
    model *m;
    const char *dir;
    st_err *err;
    uint8_t *used;         /* [total tensors] tensors consumed, for the "unknown extra" report */
    size_t *file_base;     /* [n_files] global index of each file's first tensor               */
} binder;

static void mark_used(binder *b, const sft_tensor *t) {
    const sft_file *f = &b->m->weights.files[t->file];
    b->used[b->file_base[t->file] + (size_t)(t - f->tensors)] = 1;
}

static const sft_tensor *need(binder *b, const char *name) {
    const sft_tensor *t = sft_set_find(&b->m->weights, name);
    if (!t) {
        st_err_set(b->err, ST_ERR_MISSING, "%s: missing tensor '%s'", b->dir, name);
        return NULL;
    }
    mark_used(b, t);
    return t;
}

static const char *file_of(binder *b, const sft_tensor *t) { return b->m->weights.file_names[t->file]; }

static int is_float(sft_dtype d) { return d == SFT_F32 || d == SFT_F16 || d == SFT_BF16; }

/* Copies a 1-D float tensor of n elements into a new f32 array (*out, owned by the model). */
static int bind_vec(binder *b, const char *name, int64_t n, sft_dtype want_any_float, float **out) {
    (void)want_any_float;
    const sft_tensor *t = need(b, name);
    if (!t) return b->err->code;
    if (!is_float(t->dtype) || t->ndim != 1 || t->shape[0] != n)
        return st_err_set(b->err, ST_ERR_FORMAT, "%s/%s: tensor '%s' is %s%s with %d dims [%lld...], expected a float vector [%lld]",
                          b->dir, file_of(b, t), name, sft_dtype_name(t->dtype), "", t->ndim,
                          (long long)(t->ndim ? t->shape[0] : 0), (long long)n);
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) return st_err_set(b->err, ST_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < n; i++) {
        if (t->dtype == SFT_F32) memcpy(&v[i], (const char *)t->data + 4 * i, 4);
        else {
            uint16_t h;
            memcpy(&h, (const char *)t->data + 2 * i, 2);
            v[i] = t->dtype == SFT_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
        }
    }
    *out = v;
    return ST_OK;
}

size_t wt_linear_bytes(const wt_linear *w) {
    size_t n = (size_t)w->rows * w->row_bytes;
    if (w->qbits) n += 2 * (size_t)w->rows * w->srow_elems * (size_t)(sft_dtype_bits(w->sdtype) / 8);
    return n;
}

/* Binds module `path` (tensors path.weight [+ .scales/.biases]) as a [rows, cols] linear.
 * With n_stack > 0 the tensors are stacked [n_stack, rows, ...] (MLX switch_mlp) and `out`
 * receives n_stack per-expert views. */
static int bind_linear_n(binder *b, const char *path, int64_t rows, int64_t cols, int n_stack, wt_linear *out) {
    char name[512];
    const model_desc *d = &b->m->desc;
    snprintf(name, sizeof name, "%s.weight", path);
    const sft_tensor *w = need(b, name);
    if (!w) return b->err->code;
    snprintf(name, sizeof name, "%s.scales", path);
    const sft_tensor *sc = sft_set_find(&b->m->weights, name);
    int obits = 0, ogroup = 0;
    int has_over = model_desc_quant_override(d, path, &obits, &ogroup);
    int quant = has_over ? obits > 0 : sc != NULL;
    int lead = n_stack > 0 ? 1 : 0;
    int nd = 2 + lead;
    if (w->ndim != nd || (lead && w->shape[0] != n_stack) || w->shape[lead] != rows)
        return st_err_set(b->err, ST_ERR_FORMAT, "%s/%s: tensor '%s.weight' has shape of %d dims, expected [%s%lld, ...]",
                          b->dir, file_of(b, w), path, w->ndim, lead ? "experts, " : "", (long long)rows);
    int n = n_stack > 0 ? n_stack : 1;
    if (!quant) {
        if (sc && has_over)
            return st_err_set(b->err, ST_ERR_FORMAT, "%s: '%s' has scales but config.json says it is not quantized", b->dir, path);
        if (!is_float(w->dtype) || w->shape[lead + 1] != cols)
            return st_err_set(b->err, ST_ERR_FORMAT, "%s/%s: tensor '%s.weight' is %s [..., %lld], expected a float matrix [..., %lld]",
                              b->dir, file_of(b, w), path, sft_dtype_name(w->dtype), (long long)w->shape[lead + 1],
                              (long long)cols);
        size_t rb = (size_t)cols * (size_t)(sft_dtype_bits(w->dtype) / 8);
        for (int e = 0; e < n; e++) {
            wt_linear *o = &out[e];
            memset(o, 0, sizeof *o);
            o->dtype = w->dtype;
            o->rows = rows;
            o->cols = cols;
            o->row_bytes = rb;
            o->w = (const char *)w->data + (size_t)e * rb * (size_t)rows;
        }
        return ST_OK;
    }
    if (!sc) return st_err_set(b->err, ST_ERR_MISSING, "%s: missing tensor '%s.scales' (module is quantized)", b->dir, path);
    mark_used(b, sc);
    snprintf(name, sizeof name, "%s.biases", path);
    const sft_tensor *bi = need(b, name);
    if (!bi) return b->err->code;
    if (w->dtype != SFT_U32)
        return st_err_set(b->err, ST_ERR_FORMAT, "%s/%s: quantized tensor '%s.weight' is %s, expected U32", b->dir,
                          file_of(b, w), path, sft_dtype_name(w->dtype));
    if (!is_float(sc->dtype) || sc->dtype != bi->dtype || sc->ndim != nd || bi->ndim != nd)
        return st_err_set(b->err, ST_ERR_FORMAT, "%s/%s: '%s.scales'/'%s.biases' must be float tensors of the same dtype and rank",
                          b->dir, file_of(b, sc), path, path);
    int64_t packed = w->shape[lead + 1], scols = sc->shape[lead + 1];
    int bits, group;
    if (has_over) {
        bits = obits;
        group = ogroup;
    } else if (d->q_bits) {
        bits = d->q_bits;
        group = d->q_group;
    } else { /* no quantization block: infer from shapes */
        bits = (int)(packed * 32 / (cols ? cols : 1));
        group = (int)(scols ? cols / scols : 0);
        /* only what config.json could declare: guards the checks below (group 0) and the kernels */
        if (!(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8) ||
            !(group == 32 || group == 64 || group == 128))
            return st_err_set(b->err, ST_ERR_FORMAT,
                              "%s/%s: '%s' shapes (weight [..., %lld], scales [..., %lld] for %lld columns) give no "
                              "supported quantization (bits %d, group %d) and config.json has no \"quantization\"",
                              b->dir, file_of(b, w), path, (long long)packed, (long long)scols, (long long)cols, bits, group);
    }
    if (cols % group || (cols * bits) % 32 || packed != cols * bits / 32 || scols != cols / group ||
        sc->shape[lead] != rows || bi->shape[lead] != rows || bi->shape[lead + 1] != scols ||
        (lead && (sc->shape[0] != n_stack || bi->shape[0] != n_stack)))
        return st_err_set(b->err, ST_ERR_FORMAT,
                          "%s/%s: '%s' shapes (weight [..., %lld, %lld], scales [..., %lld, %lld]) do not match %d-bit group-%d "
                          "quantization of a [%lld, %lld] matrix",
                          b->dir, file_of(b, w), path, (long long)w->shape[lead], (long long)packed, (long long)sc->shape[lead],
                          (long long)scols, bits, group, (long long)rows, (long long)cols);
    size_t rb = (size_t)packed * 4, sb = (size_t)scols * (size_t)(sft_dtype_bits(sc->dtype) / 8);
    for (int e = 0; e < n; e++) {
        wt_linear *o = &out[e];
        memset(o, 0, sizeof *o);
        o->qbits = bits;
        o->group = group;
        o->sdtype = sc->dtype;
        o->rows = rows;
        o->cols = cols;
        o->row_bytes = rb;
        o->srow_elems = (size_t)scols;
        o->w = (const char *)w->data + (size_t)e * rb * (size_t)rows;
        o->scales = (const char *)sc->data + (size_t)e * sb * (size_t)rows;
        o->biases = (const char *)bi->data + (size_t)e * sb * (size_t)rows;
    }
    return ST_OK;
}

static int bind_linear(binder *b, const char *path, int64_t rows, int64_t cols, wt_linear *out) {
    return bind_linear_n(b, path, rows, cols, 0, out);
}

static int bind_layer(binder *b, int l) {
    model *m = b->m;
    const model_desc *d = &m->desc;
    layer_weights *L = &m->layers[l];
    char p[256], q[256];
    int rc;
    const int64_t D = d->n_embd, qd = (int64_t)d->n_head * d->head_dim, kvd = (int64_t)d->n_head_kv * d->head_dim;
#define PATH(...) (snprintf(p, sizeof p, __VA_ARGS__), p)
    if ((rc = bind_vec(b, PATH("model.layers.%d.input_layernorm.weight", l), D, 0, &L->attn_norm))) return rc;
    if ((rc = bind_vec(b, PATH("model.layers.%d.post_attention_layernorm.weight", l), D, 0, &L->ffn_norm))) return rc;
    if ((rc = bind_linear(b, PATH("model.layers.%d.self_attn.q_proj", l), qd, D, &L->wq))) return rc;
    if ((rc = bind_linear(b, PATH("model.layers.%d.self_attn.k_proj", l), kvd, D, &L->wk))) return rc;
    if ((rc = bind_linear(b, PATH("model.layers.%d.self_attn.v_proj", l), kvd, D, &L->wv))) return rc;
    if ((rc = bind_linear(b, PATH("model.layers.%d.self_attn.o_proj", l), D, qd, &L->wo))) return rc;
    if (d->qk_norm != QK_NORM_NONE) {
        int full = d->qk_norm == QK_NORM_FULL;
        if ((rc = bind_vec(b, PATH("model.layers.%d.self_attn.q_norm.weight", l), full ? qd : d->head_dim, 0, &L->q_norm)))
            return rc;
        if ((rc = bind_vec(b, PATH("model.layers.%d.self_attn.k_norm.weight", l), full ? kvd : d->head_dim, 0, &L->k_norm)))
            return rc;
    }
    if (!d->layer_moe[l]) {
        if ((rc = bind_linear(b, PATH("model.layers.%d.mlp.gate_proj", l), d->n_ff, D, &L->w_gate))) return rc;
        if ((rc = bind_linear(b, PATH("model.layers.%d.mlp.up_proj", l), d->n_ff, D, &L->w_up))) return rc;
        if ((rc = bind_linear(b, PATH("model.layers.%d.mlp.down_proj", l), D, d->n_ff, &L->w_down))) return rc;
        return ST_OK;
    }
    const int E = d->n_expert, F = d->n_ff_expert;
    if ((rc = bind_linear(b, PATH("model.layers.%d.%s.gate", l, d->moe_prefix), E, D, &L->router))) return rc;
    if (d->router == ROUTER_SIGMOID_BIAS) {
        snprintf(q, sizeof q, "model.layers.%d.%s.e_score_correction_bias", l, d->moe_prefix);
        if ((rc = bind_vec(b, q, E, 0, &L->router_bias))) return rc;
    }
    L->exp_gate = calloc((size_t)E, sizeof(wt_linear));
    L->exp_up = calloc((size_t)E, sizeof(wt_linear));
    L->exp_down = calloc((size_t)E, sizeof(wt_linear));
    if (!L->exp_gate || !L->exp_up || !L->exp_down) return st_err_set(b->err, ST_ERR_NOMEM, "out of memory");
    snprintf(q, sizeof q, "model.layers.%d.%s.switch_mlp.gate_proj.weight", l, d->moe_prefix);
    if (sft_set_find(&m->weights, q)) { /* MLX stacked layout */
        if ((rc = bind_linear_n(b, PATH("model.layers.%d.%s.switch_mlp.gate_proj", l, d->moe_prefix), F, D, E, L->exp_gate))) return rc;
        if ((rc = bind_linear_n(b, PATH("model.layers.%d.%s.switch_mlp.up_proj", l, d->moe_prefix), F, D, E, L->exp_up))) return rc;
        if ((rc = bind_linear_n(b, PATH("model.layers.%d.%s.switch_mlp.down_proj", l, d->moe_prefix), D, F, E, L->exp_down))) return rc;
        return ST_OK;
    }
    for (int e = 0; e < E; e++) { /* HF per-expert layout */
        if ((rc = bind_linear(b, PATH("model.layers.%d.%s.experts.%d.%s", l, d->moe_prefix, e, d->expert_names[0]), F, D, &L->exp_gate[e])))
            return rc;
        if ((rc = bind_linear(b, PATH("model.layers.%d.%s.experts.%d.%s", l, d->moe_prefix, e, d->expert_names[1]), F, D, &L->exp_up[e])))
            return rc;
        if ((rc = bind_linear(b, PATH("model.layers.%d.%s.experts.%d.%s", l, d->moe_prefix, e, d->expert_names[2]), D, F, &L->exp_down[e])))
            return rc;
    }
#undef PATH
    return ST_OK;
}

static size_t layer_bytes(const model_desc *d, const layer_weights *L, int l) {
    size_t n = wt_linear_bytes(&L->wq) + wt_linear_bytes(&L->wk) + wt_linear_bytes(&L->wv) + wt_linear_bytes(&L->wo);
    if (!d->layer_moe[l]) return n + wt_linear_bytes(&L->w_gate) + wt_linear_bytes(&L->w_up) + wt_linear_bytes(&L->w_down);
    n += wt_linear_bytes(&L->router);
    for (int e = 0; e < d->n_expert; e++)
        n += wt_linear_bytes(&L->exp_gate[e]) + wt_linear_bytes(&L->exp_up[e]) + wt_linear_bytes(&L->exp_down[e]);
    return n;
}

int model_bind(model **out, model_desc *desc, sft_set *weights, const model_load_opts *opts, st_err *err) {
    *out = NULL;
    model *m = calloc(1, sizeof *m);
    if (!m) {
        model_desc_free(desc);
        sft_set_close(weights);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    m->desc = *desc;
    memset(desc, 0, sizeof *desc);
    m->weights = *weights;
    memset(weights, 0, sizeof *weights);
    const model_desc *d = &m->desc;
    m->layer_begin = 0;
    m->layer_end = d->n_layer;
    int with_embed = 1, with_output = 1;
    if (opts && (opts->layer_begin || opts->layer_end)) {
        if (opts->layer_begin < 0 || opts->layer_end > d->n_layer || opts->layer_begin >= opts->layer_end) {
            int rc = st_err_set(err, ST_ERR_ARG, "layer range [%d, %d) is not within the model's %d layers", opts->layer_begin,
                                opts->layer_end, d->n_layer);
            model_free(m);
            return rc;
        }
        m->layer_begin = opts->layer_begin;
        m->layer_end = opts->layer_end;
        with_embed = opts->with_embed;
        with_output = opts->with_output;
    }
    size_t total = 0;
    for (int i = 0; i < m->weights.n_files; i++) total += m->weights.files[i].n_tensors;
    binder b = {m, opts && opts->source ? opts->source : "model", err, calloc(total ? total : 1, 1),
                calloc((size_t)(m->weights.n_files ? m->weights.n_files : 1), sizeof(size_t))};
    int rc = ST_OK;
    if (!b.used || !b.file_base) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    for (int i = 1; i < m->weights.n_files && !rc; i++) b.file_base[i] = b.file_base[i - 1] + m->weights.files[i - 1].n_tensors;
    m->layers = calloc((size_t)d->n_layer, sizeof *m->layers);
    if (!m->layers && !rc) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (!rc && (with_embed || (with_output && d->tie_embeddings)))
        rc = bind_linear(&b, "model.embed_tokens", d->n_vocab, d->n_embd, &m->embed);
    if (!rc && with_output) {
        rc = bind_vec(&b, "model.norm.weight", d->n_embd, 0, &m->out_norm);
        if (!rc) {
            if (d->tie_embeddings) m->output = m->embed;
            else rc = bind_linear(&b, "lm_head", d->n_vocab, d->n_embd, &m->output);
        }
    }
    m->holds_embed = with_embed;
    m->holds_output = with_output;
    for (int l = m->layer_begin; l < m->layer_end && !rc; l++) rc = bind_layer(&b, l);
    if (!rc) {
        m->weight_bytes = 0;
        if (with_embed) m->weight_bytes += wt_linear_bytes(&m->embed);
        if (with_output && !d->tie_embeddings) m->weight_bytes += wt_linear_bytes(&m->output);
        for (int l = m->layer_begin; l < m->layer_end; l++) m->weight_bytes += layer_bytes(d, &m->layers[l], l);
        /* tensors nobody asked for: MTP heads, rotary caches ... (only for whole-model loads) */
        if (m->layer_begin == 0 && m->layer_end == d->n_layer && with_embed && with_output) {
            size_t k = 0, extra = 0;
            for (int i = 0; i < m->weights.n_files; i++)
                for (size_t j = 0; j < m->weights.files[i].n_tensors; j++, k++)
                    if (!b.used[k]) {
                        extra++;
                        ST_DEBUG("%s: ignoring tensor '%s' (%s)", b.dir, m->weights.files[i].tensors[j].name,
                                 m->weights.file_names[i]);
                    }
            if (extra) ST_DEBUG("%s: %zu tensors not used by the %s forward pass", b.dir, extra, d->model_type);
        }
    }
    free(b.used);
    free(b.file_base);
    if (rc) {
        model_free(m);
        return rc;
    }
    *out = m;
    return ST_OK;
}

int model_load(model **out, const char *dir, const model_load_opts *opts, st_err *err) {
    *out = NULL;
    model_desc d;
    int rc = model_desc_load(&d, dir, err);
    if (rc) return rc;
    sft_set s;
    rc = sft_set_open_dir(&s, dir, err);
    if (rc) {
        model_desc_free(&d);
        return rc;
    }
    /* bind_* messages name the directory: set it before binding */
    model *m = NULL;
    model_load_opts o = {0};
    if (opts) o = *opts;
    o.source = dir;
    char *dcopy = strdup(dir);
    if (!dcopy) {
        model_desc_free(&d);
        sft_set_close(&s);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    rc = model_bind(&m, &d, &s, &o, err);
    if (rc) {
        free(dcopy);
        return rc;
    }
    m->dir = dcopy;
    *out = m;
    return ST_OK;
}

void model_free(model *m) {
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->desc.n_layer; l++) {
            layer_weights *L = &m->layers[l];
            free(L->attn_norm);
            free(L->ffn_norm);
            free(L->q_norm);
            free(L->k_norm);
            free(L->router_bias);
            free(L->exp_gate);
            free(L->exp_up);
            free(L->exp_down);
        }
        free(m->layers);
    }
    free(m->out_norm);
    free(m->dir);
    model_desc_free(&m->desc);
    sft_set_close(&m->weights);
    free(m);
}
