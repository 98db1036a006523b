/* modelstats.c — what a model needs, without loading it (see plan.h).
 *
 * Two sources, one result. From a checkpoint directory the bytes come from the safetensors
 * headers (each tensor's data_offsets span: exact whatever the dtype, quantization or
 * override); from a descriptor alone they are computed the way an MLX conversion (packed
 * bits + bf16 scales and biases) or a bf16 checkpoint stores them. Tensors are sorted into
 * per-layer parts by name:
 *   experts   (".experts.", "switch_mlp.")          split by TP; read n_expert_used/n_expert
 *   router    ("<moe_prefix>.gate.", "..._bias")    replicated; read whole
 *   norms     (names containing "norm")             replicated; read whole
 *   the rest  (attention projections, dense MLP)    split by TP; read whole
 * FLOPs always come from the descriptor's shapes (2 x multiply-adds of the active weights).
 */
#include "strata/plan.h"

#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// dimensions and FLOPs from the descriptor

/* Copies the descriptor's dimensions into pm and allocates pm->layers with per-layer FLOPs and
 * MoE flags; bytes are left zero for the caller. Returns ST_ERR_NOMEM / ST_ERR_FORMAT. */
static int stats_init(plan_model *pm, const model_desc *d, const char *name, st_err *err) {
    memset(pm, 0, sizeof *pm);
    snprintf(pm->name, sizeof pm->name, "%s", name ? name : d->model_type);
    snprintf(pm->model_type, sizeof pm->model_type, "%s", d->model_type);
    if (d->n_layer < 1 || d->n_embd < 1 || d->n_head < 1 || d->n_head_kv < 1 || d->head_dim < 1 || d->n_vocab < 1)
        return st_err_set(err, ST_ERR_FORMAT, "%s: descriptor has empty dimensions", pm->name);
    pm->n_layer = d->n_layer;
    pm->n_embd = d->n_embd;
    pm->n_head = d->n_head;
    pm->n_head_kv = d->n_head_kv;
    pm->head_dim = d->head_dim;
    pm->n_rot = d->n_rot;
    pm->n_vocab = d->n_vocab;
    pm->n_ff = d->n_ff;
    pm->n_ff_expert = d->n_ff_expert;
    pm->n_expert = d->n_expert;
    pm->n_expert_used = d->n_expert_used;
    pm->qk_norm_full = d->qk_norm == QK_NORM_FULL;
    pm->max_pos = d->max_pos;
    pm->q_bits = d->q_bits;
    pm->q_group = d->q_group;
    pm->tied = d->tie_embeddings;
    pm->layers = calloc((size_t)d->n_layer, sizeof *pm->layers);
    if (!pm->layers) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    const double D = d->n_embd, qd = (double)d->n_head * d->head_dim, kvd = (double)d->n_head_kv * d->head_dim;
    const double attn = D * qd + 2.0 * D * kvd + qd * D; /* q, k, v, o multiply-adds */
    for (int l = 0; l < d->n_layer; l++) {
        plan_layer *L = &pm->layers[l];
        L->moe = d->layer_moe ? d->layer_moe[l] : 0;
        double ffn = L->moe ? D * d->n_expert + (double)d->n_expert_used * 3.0 * D * d->n_ff_expert : 3.0 * D * d->n_ff;
        L->flops = 2.0 * (attn + ffn);
        if (L->moe) pm->has_moe = 1;
        else pm->has_dense = 1;
    }
    pm->output_flops = 2.0 * D * d->n_vocab;
    return ST_OK;
}

void plan_model_free(plan_model *pm) {
    if (!pm) return;
    free(pm->layers);
    memset(pm, 0, sizeof *pm);
}

// ----------------------------------------------------------------------------
// bytes from the descriptor

/* Stored bytes of linear module `path` [rows, cols] (see plan_model_from_desc). */
static uint64_t desc_linear_bytes(const model_desc *d, const char *path, int64_t rows, int64_t cols) {
    int bits = d->q_bits, group = d->q_group, ob, og;
    if (model_desc_quant_override(d, path, &ob, &og)) {
        bits = ob;
        group = og;
    }
    uint64_t r = (uint64_t)rows, c = (uint64_t)cols;
    if (bits > 0 && group > 0 && cols % group == 0) return (uint64_t)bits * r * c / 8 + 2ull * r * (c / (uint64_t)group) * 2ull;
    return r * c * 2ull;
}

int plan_model_from_desc(plan_model *pm, const model_desc *d, const char *name, st_err *err) {
    int rc = stats_init(pm, d, name, err);
    if (rc) {
        plan_model_free(pm);
        return rc;
    }
    const int64_t D = d->n_embd, qd = (int64_t)d->n_head * d->head_dim, kvd = (int64_t)d->n_head_kv * d->head_dim;
    char p[256];
#define PATH(...) (snprintf(p, sizeof p, __VA_ARGS__), p)
    for (int l = 0; l < d->n_layer; l++) {
        plan_layer *L = &pm->layers[l];
        uint64_t shard = desc_linear_bytes(d, PATH("model.layers.%d.self_attn.q_proj", l), qd, D) +
                         desc_linear_bytes(d, PATH("model.layers.%d.self_attn.k_proj", l), kvd, D) +
                         desc_linear_bytes(d, PATH("model.layers.%d.self_attn.v_proj", l), kvd, D) +
                         desc_linear_bytes(d, PATH("model.layers.%d.self_attn.o_proj", l), D, qd);
        uint64_t repl = 2ull * (uint64_t)D * 2ull; /* input_layernorm + post_attention_layernorm (bf16) */
        if (d->qk_norm == QK_NORM_HEAD) repl += 2ull * (uint64_t)d->head_dim * 2ull;
        if (d->qk_norm == QK_NORM_FULL) repl += (uint64_t)(qd + kvd) * 2ull;
        uint64_t experts = 0;
        if (!L->moe) {
            shard += desc_linear_bytes(d, PATH("model.layers.%d.mlp.gate_proj", l), d->n_ff, D) +
                     desc_linear_bytes(d, PATH("model.layers.%d.mlp.up_proj", l), d->n_ff, D) +
                     desc_linear_bytes(d, PATH("model.layers.%d.mlp.down_proj", l), D, d->n_ff);
        } else {
            repl += desc_linear_bytes(d, PATH("model.layers.%d.%s.gate", l, d->moe_prefix), d->n_expert, D);
            if (d->router == ROUTER_SIGMOID_BIAS) repl += (uint64_t)d->n_expert * 4ull; /* f32 bias */
            const int64_t F = d->n_ff_expert;
            uint64_t one = desc_linear_bytes(d, PATH("model.layers.%d.%s.switch_mlp.gate_proj", l, d->moe_prefix), F, D) +
                           desc_linear_bytes(d, PATH("model.layers.%d.%s.switch_mlp.up_proj", l, d->moe_prefix), F, D) +
                           desc_linear_bytes(d, PATH("model.layers.%d.%s.switch_mlp.down_proj", l, d->moe_prefix), D, F);
            experts = one * (uint64_t)d->n_expert;
        }
        uint64_t routed = L->moe ? experts / (uint64_t)d->n_expert * (uint64_t)d->n_expert_used : 0;
        L->bytes = shard + repl + experts;
        L->shard_bytes = shard + experts;
        L->read_bytes = shard + repl + routed;
        L->read_shard_bytes = shard + routed;
    }
    pm->embed_bytes = desc_linear_bytes(d, "model.embed_tokens", d->n_vocab, D);
    pm->out_norm_bytes = (uint64_t)D * 2ull;
    pm->lm_head_bytes = d->tie_embeddings ? 0 : desc_linear_bytes(d, "lm_head", d->n_vocab, D);
#undef PATH
    pm->from_headers = 0;
    return ST_OK;
}

// ----------------------------------------------------------------------------
// bytes from the safetensors headers

typedef struct hdr_ctx {
    plan_model *pm;
    const model_desc *d;
    uint64_t *experts;     /* [n_layer] stored expert bytes per layer (read share applied later) */
    char router_prefix[64];/* "<moe_prefix>.gate."                                              */
} hdr_ctx;

/* Adds one tensor's stored bytes to the part it belongs to (see the file comment). */
static int hdr_add(void *vctx, const sft_tensor *t) {
    hdr_ctx *h = vctx;
    plan_model *pm = h->pm;
    uint64_t n = t->end - t->begin;
    const char *s = t->name;
    int l = -1, off = 0;
    if (sscanf(s, "model.layers.%d.%n", &l, &off) == 1 && off > 0) {
        if (l < 0 || l >= pm->n_layer) {
            pm->other_bytes += n;
            pm->n_other++;
            return 0;
        }
        const char *rest = s + off;
        plan_layer *L = &pm->layers[l];
        L->bytes += n;
        if (strstr(rest, ".experts.") || strstr(rest, "switch_mlp.")) {
            L->shard_bytes += n;
            h->experts[l] += n;
        } else if (!strncmp(rest, h->router_prefix, strlen(h->router_prefix)) || strstr(rest, "e_score_correction_bias") ||
                   strstr(rest, "norm")) {
            L->read_bytes += n; /* replicated, read whole */
        } else {
            L->shard_bytes += n;
            L->read_bytes += n;
            L->read_shard_bytes += n;
        }
        return 0;
    }
    if (!strncmp(s, "model.embed_tokens.", 19)) pm->embed_bytes += n;
    else if (!strncmp(s, "model.norm.", 11)) pm->out_norm_bytes += n;
    else if (!strncmp(s, "lm_head.", 8) && !pm->tied) pm->lm_head_bytes += n;
    else {
        pm->other_bytes += n;
        pm->n_other++;
    }
    return 0;
}

int plan_model_from_dir(plan_model *pm, const char *dir, st_err *err) {
    memset(pm, 0, sizeof *pm);
    model_desc d;
    int rc = model_desc_load(&d, dir, err);
    if (rc) return rc;
    sft_set s;
    rc = sft_set_open_dir(&s, dir, err);
    if (rc) {
        model_desc_free(&d);
        return rc;
    }
    rc = stats_init(pm, &d, dir, err);
    hdr_ctx h = {pm, &d, NULL, ""};
    if (!rc) {
        h.experts = calloc((size_t)d.n_layer, sizeof *h.experts);
        if (!h.experts) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    if (!rc) {
        snprintf(h.router_prefix, sizeof h.router_prefix, "%s.gate.", d.moe_prefix ? d.moe_prefix : "mlp");
        sft_set_each(&s, hdr_add, &h);
        for (int l = 0; l < d.n_layer && !rc; l++) {
            plan_layer *L = &pm->layers[l];
            if (L->bytes == 0) {
                rc = st_err_set(err, ST_ERR_MISSING, "%s: no tensors for layer %d in the safetensors files", dir, l);
                break;
            }
            if (h.experts[l] && !L->moe) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: layer %d has expert tensors but config.json makes it dense", dir, l);
                break;
            }
            if (L->moe) {
                /* experts of one layer are equal in size: the routed share is exact */
                uint64_t routed = h.experts[l] / (uint64_t)d.n_expert * (uint64_t)d.n_expert_used;
                L->read_bytes += routed;
                L->read_shard_bytes += routed;
            }
        }
        if (!rc && pm->embed_bytes == 0)
            rc = st_err_set(err, ST_ERR_MISSING, "%s: no model.embed_tokens tensors in the safetensors files", dir);
        if (!rc && !pm->tied && pm->lm_head_bytes == 0)
            rc = st_err_set(err, ST_ERR_MISSING, "%s: no lm_head tensors in the safetensors files (and embeddings are not tied)",
                            dir);
    }
    free(h.experts);
    sft_set_close(&s);
    model_desc_free(&d);
    if (rc) {
        plan_model_free(pm);
        return rc;
    }
    pm->from_headers = 1;
    return ST_OK;
}

// ----------------------------------------------------------------------------
// derived figures

uint64_t plan_model_weight_bytes(const plan_model *pm) {
    uint64_t n = pm->embed_bytes + pm->out_norm_bytes + pm->lm_head_bytes;
    for (int l = 0; l < pm->n_layer; l++) n += pm->layers[l].bytes;
    return n;
}

uint64_t plan_model_read_bytes(const plan_model *pm) {
    uint64_t n = pm->embed_bytes / (uint64_t)pm->n_vocab + pm->out_norm_bytes + (pm->tied ? pm->embed_bytes : pm->lm_head_bytes);
    for (int l = 0; l < pm->n_layer; l++) n += pm->layers[l].read_bytes;
    return n;
}

uint64_t plan_model_kv_bytes(const plan_model *pm, int elem_bytes) {
    return 2ull * (uint64_t)pm->n_head_kv * (uint64_t)pm->head_dim * (uint64_t)elem_bytes;
}

uint64_t plan_scratch_bytes(const plan_model *pm, int chunk, int slots, int64_t ctx, int threads, int with_output) {
    const uint64_t B = (uint64_t)(chunk > slots ? chunk : slots), D = (uint64_t)pm->n_embd, hd = (uint64_t)pm->head_dim;
    const uint64_t qd = (uint64_t)pm->n_head * hd, kvd = (uint64_t)pm->n_head_kv * hd;
    uint64_t ff = (uint64_t)(pm->n_ff > pm->n_ff_expert ? pm->n_ff : pm->n_ff_expert);
    if (ff < 1) ff = 1;
    const uint64_t E = (uint64_t)(pm->n_expert > 0 ? pm->n_expert : 1), K = (uint64_t)(pm->n_expert_used > 0 ? pm->n_expert_used : 1);
    uint64_t n = 4 * B * (5 * D + 2 * qd + 2 * kvd + 2 * ff + (uint64_t)pm->n_rot + E + 2 * K + 2 * E + 2); /* f32/int32 */
    n += 4 * E + 2 * B * sizeof(void *) + 8 * (uint64_t)(pm->n_rot / 2);
    uint64_t row = D;
    if (qd > row) row = qd;
    if (ff > row) row = ff;
    if ((uint64_t)ctx > row) row = (uint64_t)ctx;
    row = (row + 15) & ~(uint64_t)15;
    n += (uint64_t)(threads > 0 ? threads : 1) * row * 4;
    if (with_output) n += (uint64_t)(slots > 0 ? slots : 1) * (uint64_t)pm->n_vocab * 4;
    return n;
}
