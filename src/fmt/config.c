/* config.c — Hugging Face config.json -> model_desc (see model.h).
 *
 * Both rope styles load: `rope_theta` + `rope_scaling` (most hub checkpoints) and transformers
 * >= 5 `rope_parameters` (rope_theta, rope_type, partial_rotary_factor inside). Per-module MLX
 * quantization overrides are kept as (path, bits, group) with bits 0 for `false`.
 */
#include "strata/model.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* field helpers: every failure names the file and the field                                  */

typedef struct cfg_ctx {
    json_t *root;
    const char *what;
    st_err *err;
} cfg_ctx;

/* Keeps an error message on one line: keys and values come from the file and may hold control
 * characters (an escaped "\n" in a JSON key); they are shown as '?'. */
static void msg_one_line(st_err *err) {
    if (!err) return;
    for (char *c = err->msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
}

static int get_int(cfg_ctx *c, const char *key, int required, int64_t def, int64_t lo, int64_t hi, int64_t *out) {
    json_t *v = json_object_get(c->root, key);
    if (!v || json_is_null(v)) {
        if (required) return st_err_set(c->err, ST_ERR_MISSING, "%s: missing required field \"%s\"", c->what, key);
        *out = def;
        return ST_OK;
    }
    if (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v)) {
        double r = json_real_value(v); /* range-check before converting: a huge real would be UB */
        if (r < (double)lo || r > (double)hi)
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: field \"%s\" = %g is out of range [%lld, %lld]", c->what, key, r,
                              (long long)lo, (long long)hi);
        *out = (int64_t)r;
    } else if (!json_is_integer(v)) {
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: field \"%s\" must be an integer", c->what, key);
    } else {
        *out = json_integer_value(v);
    }
    if (*out < lo || *out > hi)
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: field \"%s\" = %lld is out of range [%lld, %lld]", c->what, key,
                          (long long)*out, (long long)lo, (long long)hi);
    return ST_OK;
}

static int get_num(json_t *obj, const char *key, double def, double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) return -1;
    *out = json_number_value(v);
    return 0;
}

static int get_bool(json_t *obj, const char *key, int def) {
    json_t *v = json_object_get(obj, key);
    if (json_is_boolean(v)) return json_is_true(v);
    return def;
}

static int parse_rope(cfg_ctx *c, model_desc *d) {
    json_t *rp = json_object_get(c->root, "rope_parameters");
    json_t *rs = json_object_get(c->root, "rope_scaling");
    json_t *src = json_is_object(rp) ? rp : (json_is_object(rs) ? rs : NULL);
    double theta = 10000.0;
    if (get_num(c->root, "rope_theta", 10000.0, &theta) < 0)
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: field \"rope_theta\" must be a number", c->what);
    if (json_is_object(rp) && json_object_get(rp, "rope_theta") &&
        get_num(rp, "rope_theta", theta, &theta) < 0)
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: field \"rope_parameters.rope_theta\" must be a number", c->what);
    if (!(theta > 0))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: rope_theta must be positive", c->what);
    d->rope_theta = theta;
    double prf = 1.0;
    if (get_num(c->root, "partial_rotary_factor", 1.0, &prf) < 0 || (src && get_num(src, "partial_rotary_factor", prf, &prf) < 0))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: partial_rotary_factor must be a number", c->what);
    if (!(prf > 0 && prf <= 1))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: partial_rotary_factor %g is not in (0, 1]", c->what, prf);
    d->n_rot = (int)(d->head_dim * prf);
    int64_t rd = 0;
    int rc = get_int(c, "rotary_dim", 0, 0, 0, d->head_dim, &rd);
    if (rc) return rc;
    if (rd > 0) d->n_rot = (int)rd;
    if (d->n_rot < 2 || d->n_rot % 2)
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: rotary dimension %d must be even and >= 2", c->what, d->n_rot);
    d->rope_scaling = ROPE_SCALING_NONE;
    if (!src) return ST_OK;
    json_t *jt = json_object_get(src, "rope_type");
    if (!jt) jt = json_object_get(src, "type");
    const char *type = json_is_string(jt) ? json_string_value(jt) : "default";
    if (!strcmp(type, "default")) return ST_OK;
    if (!strcmp(type, "llama3")) {
        d->rope_scaling = ROPE_SCALING_LLAMA3;
        double omax = 8192;
        if (get_num(src, "factor", 8.0, &d->rope_factor) < 0 || get_num(src, "low_freq_factor", 1.0, &d->rope_low_freq) < 0 ||
            get_num(src, "high_freq_factor", 4.0, &d->rope_high_freq) < 0 ||
            get_num(src, "original_max_position_embeddings", 8192, &omax) < 0)
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: llama3 rope scaling fields must be numbers", c->what);
        if (!(omax >= 1 && omax <= (double)((int64_t)1 << 32)))
            return st_err_set(c->err, ST_ERR_FORMAT,
                              "%s: llama3 rope scaling has invalid factors (original_max_position_embeddings %g)", c->what,
                              omax);
        d->rope_orig_max_pos = (int64_t)omax;
        if (!(d->rope_factor > 0) || !(d->rope_high_freq > d->rope_low_freq))
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: llama3 rope scaling has invalid factors", c->what);
        return ST_OK;
    }
    if (!strcmp(type, "linear")) {
        d->rope_scaling = ROPE_SCALING_LINEAR;
        if (get_num(src, "factor", 1.0, &d->rope_factor) < 0 || !(d->rope_factor > 0))
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: linear rope scaling factor must be a positive number", c->what);
        return ST_OK;
    }
    return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: unsupported rope type \"%s\"", c->what, type);
}

static int parse_quant(cfg_ctx *c, model_desc *d) {
    json_t *q = json_object_get(c->root, "quantization");
    if (!q) q = json_object_get(c->root, "quantization_config");
    if (!q || json_is_null(q)) return ST_OK;
    if (!json_is_object(q)) return st_err_set(c->err, ST_ERR_FORMAT, "%s: \"quantization\" must be an object", c->what);
    json_t *qm = json_object_get(q, "quant_method");
    if (json_is_string(qm))
        return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: quantization method \"%s\" is not supported (MLX affine only)",
                          c->what, json_string_value(qm));
    json_t *mode = json_object_get(q, "mode");
    if (mode && (!json_is_string(mode) || strcmp(json_string_value(mode), "affine")))
        return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: quantization mode \"%s\" is not supported (affine only)",
                          c->what, json_is_string(mode) ? json_string_value(mode) : "?");
    json_t *jb = json_object_get(q, "bits"), *jg = json_object_get(q, "group_size");
    if (!json_is_integer(jb) || !json_is_integer(jg))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: quantization needs integer \"bits\" and \"group_size\"", c->what);
    json_int_t b = json_integer_value(jb), g = json_integer_value(jg); /* checked before narrowing */
    if (!(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8))
        return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: quantization bits %lld not supported (2,3,4,5,6,8)", c->what,
                          (long long)b);
    if (!(g == 32 || g == 64 || g == 128))
        return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: quantization group_size %lld not supported (32,64,128)", c->what,
                          (long long)g);
    d->q_bits = (int)b;
    d->q_group = (int)g;
    size_t n = json_object_size(q);
    d->q_over = calloc(n ? n : 1, sizeof *d->q_over);
    if (!d->q_over) return st_err_set(c->err, ST_ERR_NOMEM, "out of memory");
    const char *key;
    json_t *v;
    json_object_foreach(q, key, v) {
        if (!strcmp(key, "bits") || !strcmp(key, "group_size") || !strcmp(key, "mode")) continue;
        quant_override *o = &d->q_over[d->n_q_over];
        if (json_is_false(v)) {
            o->bits = 0;
        } else if (json_is_object(v)) {
            json_t *ob = json_object_get(v, "bits"), *og = json_object_get(v, "group_size"),
                   *om = json_object_get(v, "mode");
            if (!json_is_integer(ob) || !json_is_integer(og))
                return st_err_set(c->err, ST_ERR_FORMAT, "%s: quantization override \"%s\" needs bits and group_size",
                                  c->what, key);
            if (om && (!json_is_string(om) || strcmp(json_string_value(om), "affine")))
                return st_err_set(c->err, ST_ERR_UNSUPPORTED, "%s: quantization override \"%s\": mode not supported",
                                  c->what, key);
            json_int_t obits = json_integer_value(ob), ogroup = json_integer_value(og);
            if (!(obits == 2 || obits == 3 || obits == 4 || obits == 5 || obits == 6 || obits == 8) ||
                !(ogroup == 32 || ogroup == 64 || ogroup == 128))
                return st_err_set(c->err, ST_ERR_UNSUPPORTED,
                                  "%s: quantization override \"%s\": bits %lld group %lld not supported", c->what, key,
                                  (long long)obits, (long long)ogroup);
            o->bits = (int)obits;
            o->group = (int)ogroup;
        } else if (json_is_true(v)) {
            continue; /* `true` means "use the default": nothing to record */
        } else {
            continue; /* unrelated scalar keys (e.g. quant tool metadata) */
        }
        o->path = strdup(key);
        if (!o->path) return st_err_set(c->err, ST_ERR_NOMEM, "out of memory");
        d->n_q_over++;
    }
    return ST_OK;
}

/* 1 if v is an integer that fits a token id (0 .. INT32_MAX). */
static int is_token_id(json_t *v) {
    return json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) <= INT32_MAX;
}

static int parse_eos(cfg_ctx *c, model_desc *d) {
    json_t *b = json_object_get(c->root, "bos_token_id");
    if (json_is_integer(b) && !is_token_id(b))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: bos_token_id %lld is not a token id", c->what,
                          (long long)json_integer_value(b));
    d->bos_id = json_is_integer(b) ? (int32_t)json_integer_value(b) : -1;
    json_t *e = json_object_get(c->root, "eos_token_id");
    d->n_eos = 0;
    if (json_is_integer(e) && !is_token_id(e))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: eos_token_id %lld is not a token id", c->what,
                          (long long)json_integer_value(e));
    if (json_is_integer(e)) {
        d->eos_ids[d->n_eos++] = (int32_t)json_integer_value(e);
    } else if (json_is_array(e)) {
        size_t i;
        json_t *x;
        json_array_foreach(e, i, x) {
            if (!is_token_id(x))
                return st_err_set(c->err, ST_ERR_FORMAT, "%s: eos_token_id[%zu] is not an integer token id", c->what, i);
            if (d->n_eos < MODEL_MAX_EOS) d->eos_ids[d->n_eos++] = (int32_t)json_integer_value(x);
        }
    } else if (e && !json_is_null(e)) {
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: eos_token_id must be an integer or a list", c->what);
    }
    return ST_OK;
}

int model_desc_parse(model_desc *d, const char *json, size_t len, const char *what, st_err *err) {
    memset(d, 0, sizeof *d);
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        st_err_set(err, ST_ERR_FORMAT, "%s: invalid %s at line %d column %d: %s", what,
                   json_error_code(&je) == json_error_invalid_utf8 ? "UTF-8" : "JSON", je.line, je.column, je.text);
        msg_one_line(err);
        return ST_ERR_FORMAT;
    }
    cfg_ctx c = {root, what, err};
    int rc = ST_OK;
    int64_t v;
    if (!json_is_object(root)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: top level is not a JSON object", what);
        goto out;
    }
    json_t *mt = json_object_get(root, "model_type");
    if (!json_is_string(mt)) {
        rc = st_err_set(err, ST_ERR_MISSING, "%s: missing required field \"model_type\"", what);
        goto out;
    }
    const char *type = json_string_value(mt);
    snprintf(d->model_type, sizeof d->model_type, "%s", type);
    if (!strcmp(type, "llama")) d->arch = ARCH_LLAMA;
    else if (!strcmp(type, "qwen3")) d->arch = ARCH_QWEN3;
    else if (!strcmp(type, "qwen3_moe")) d->arch = ARCH_QWEN3_MOE;
    else if (!strcmp(type, "minimax_m2") || !strcmp(type, "minimax")) d->arch = ARCH_MINIMAX_M2;
    else {
        rc = st_err_set(err, ST_ERR_UNSUPPORTED,
                        "%s: unsupported model_type \"%s\" (supported: llama, qwen3, qwen3_moe, minimax_m2)", what, type);
        goto out;
    }
    const int64_t BIG = 1 << 24;
    if ((rc = get_int(&c, "num_hidden_layers", 1, 0, 1, 4096, &v))) goto out;
    d->n_layer = (int)v;
    if ((rc = get_int(&c, "hidden_size", 1, 0, 1, BIG, &v))) goto out;
    d->n_embd = (int)v;
    if ((rc = get_int(&c, "num_attention_heads", 1, 0, 1, 4096, &v))) goto out;
    d->n_head = (int)v;
    if ((rc = get_int(&c, "num_key_value_heads", 0, d->n_head, 1, 4096, &v))) goto out;
    d->n_head_kv = (int)v;
    if (d->n_head % d->n_head_kv) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                        what, d->n_head, d->n_head_kv);
        goto out;
    }
    if ((rc = get_int(&c, "head_dim", 0, d->n_embd / d->n_head, 1, 65536, &v))) goto out;
    d->head_dim = (int)v;
    if (d->head_dim < 2) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: head_dim %d is too small", what, d->head_dim);
        goto out;
    }
    if ((rc = get_int(&c, "intermediate_size", d->arch != ARCH_MINIMAX_M2, 0, 0, BIG, &v))) goto out;
    d->n_ff = (int)v;
    if ((rc = get_int(&c, "vocab_size", 1, 0, 1, 1 << 26, &v))) goto out;
    d->n_vocab = (int)v;
    if ((rc = get_int(&c, "max_position_embeddings", 0, 4096, 1, (int64_t)1 << 32, &v))) goto out;
    d->max_pos = v;
    double eps;
    /* checked after the float conversion too: 1e-46 is positive as a double but 0 as a float */
    if (get_num(root, "rms_norm_eps", 1e-6, &eps) < 0 || !(eps > 0 && eps < 1) || !((float)eps > 0)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: rms_norm_eps must be a number in (0, 1)", what);
        goto out;
    }
    d->norm_eps = (float)eps;
    json_t *act = json_object_get(root, "hidden_act");
    if (json_is_string(act) && strcmp(json_string_value(act), "silu")) {
        rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: hidden_act \"%s\" not supported (silu only)", what,
                        json_string_value(act));
        goto out;
    }
    if (get_bool(root, "attention_bias", 0) || get_bool(root, "mlp_bias", 0)) {
        rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: attention_bias / mlp_bias are not supported", what);
        goto out;
    }
    if ((rc = parse_rope(&c, d))) goto out;
    d->tie_embeddings = get_bool(root, "tie_word_embeddings", d->arch == ARCH_QWEN3 ? 0 : 0);
    if ((rc = parse_eos(&c, d))) goto out;

    d->layer_moe = calloc((size_t)d->n_layer, 1);
    if (!d->layer_moe) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    d->expert_names[0] = "gate_proj";
    d->expert_names[1] = "up_proj";
    d->expert_names[2] = "down_proj";
    d->moe_prefix = "mlp";
    switch (d->arch) {
    case ARCH_LLAMA:
        d->qk_norm = QK_NORM_NONE;
        break;
    case ARCH_QWEN3:
        d->qk_norm = QK_NORM_HEAD;
        break;
    case ARCH_QWEN3_MOE: {
        d->qk_norm = QK_NORM_HEAD;
        d->router = ROUTER_SOFTMAX_TOPK;
        if ((rc = get_int(&c, "num_experts", 1, 0, 0, 1 << 16, &v))) goto out;
        d->n_expert = (int)v;
        if ((rc = get_int(&c, "num_experts_per_tok", 1, 0, 1, 1 << 16, &v))) goto out;
        d->n_expert_used = (int)v;
        if ((rc = get_int(&c, "moe_intermediate_size", 1, 0, 1, BIG, &v))) goto out;
        d->n_ff_expert = (int)v;
        d->norm_topk_prob = get_bool(root, "norm_topk_prob", 0);
        int64_t step;
        if ((rc = get_int(&c, "decoder_sparse_step", 0, 1, 1, 4096, &step))) goto out;
        json_t *mlp_only = json_object_get(root, "mlp_only_layers");
        for (int l = 0; l < d->n_layer; l++) d->layer_moe[l] = d->n_expert > 0 && (l + 1) % step == 0;
        if (mlp_only && !json_is_null(mlp_only)) {
            if (!json_is_array(mlp_only)) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: mlp_only_layers must be a list", what);
                goto out;
            }
            size_t i;
            json_t *x;
            json_array_foreach(mlp_only, i, x) {
                if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= d->n_layer) {
                    rc = st_err_set(err, ST_ERR_FORMAT, "%s: mlp_only_layers[%zu] is not a layer index", what, i);
                    goto out;
                }
                d->layer_moe[json_integer_value(x)] = 0;
            }
        }
        break;
    }
    case ARCH_MINIMAX_M2: {
        json_t *qkt = json_object_get(root, "qk_norm_type");
        if (!get_bool(root, "use_qk_norm", 1)) d->qk_norm = QK_NORM_NONE;
        else if (!qkt || (json_is_string(qkt) && !strcmp(json_string_value(qkt), "per_layer"))) d->qk_norm = QK_NORM_FULL;
        else if (json_is_string(qkt) && !strcmp(json_string_value(qkt), "per_head")) d->qk_norm = QK_NORM_HEAD;
        else {
            rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: qk_norm_type not supported", what);
            goto out;
        }
        json_t *sf = json_object_get(root, "scoring_func");
        if (json_is_string(sf) && strcmp(json_string_value(sf), "sigmoid")) {
            rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: scoring_func \"%s\" not supported (sigmoid)", what,
                            json_string_value(sf));
            goto out;
        }
        d->router = ROUTER_SIGMOID_BIAS;
        if ((rc = get_int(&c, "num_local_experts", 1, 0, 1, 1 << 16, &v))) goto out;
        d->n_expert = (int)v;
        if ((rc = get_int(&c, "num_experts_per_tok", 1, 0, 1, 1 << 16, &v))) goto out;
        d->n_expert_used = (int)v;
        d->n_ff_expert = d->n_ff;
        if (d->n_ff_expert <= 0) {
            rc = st_err_set(err, ST_ERR_MISSING, "%s: missing required field \"intermediate_size\"", what);
            goto out;
        }
        int64_t shared;
        if ((rc = get_int(&c, "shared_intermediate_size", 0, 0, 0, BIG, &shared))) goto out;
        if (shared > 0) {
            rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: shared experts (shared_intermediate_size %lld) not supported",
                            what, (long long)shared);
            goto out;
        }
        json_t *atl = json_object_get(root, "attn_type_list");
        if (json_is_array(atl)) {
            size_t i;
            json_t *x;
            json_array_foreach(atl, i, x) {
                if (!json_is_integer(x) || json_integer_value(x) != 1) {
                    rc = st_err_set(err, ST_ERR_UNSUPPORTED, "%s: attn_type_list[%zu]: only full attention (1) is supported",
                                    what, i);
                    goto out;
                }
            }
        }
        d->norm_topk_prob = 1;
        d->moe_prefix = "block_sparse_moe";
        d->expert_names[0] = "w1";
        d->expert_names[1] = "w3";
        d->expert_names[2] = "w2";
        for (int l = 0; l < d->n_layer; l++) d->layer_moe[l] = 1;
        break;
    }
    }
    if (d->router != ROUTER_NONE && (d->n_expert_used > d->n_expert || d->n_expert < 1)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: num_experts_per_tok %d exceeds the %d experts", what, d->n_expert_used,
                        d->n_expert);
        goto out;
    }
    for (int l = 0; l < d->n_layer; l++)
        if (!d->layer_moe[l] && d->n_ff <= 0) {
            rc = st_err_set(err, ST_ERR_MISSING, "%s: layer %d is dense but intermediate_size is missing", what, l);
            goto out;
        }
    rc = parse_quant(&c, d);
out:
    json_decref(root);
    if (rc) {
        msg_one_line(err);
        model_desc_free(d);
    }
    return rc;
}

int model_desc_load(model_desc *d, const char *dir, st_err *err) {
    memset(d, 0, sizeof *d);
    char *p = st_path_join(dir, "config.json");
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    char *txt = NULL;
    size_t len = 0;
    int rc = st_file_read(p, &txt, &len, err);
    if (!rc) rc = model_desc_parse(d, txt, len, p, err);
    free(txt);
    free(p);
    return rc;
}

void model_desc_free(model_desc *d) {
    for (int i = 0; i < d->n_q_over; i++) free(d->q_over[i].path);
    free(d->q_over);
    free(d->layer_moe);
    memset(d, 0, sizeof *d);
}

int model_desc_quant_override(const model_desc *d, const char *path, int *bits, int *group) {
    for (int i = 0; i < d->n_q_over; i++)
        if (!strcmp(d->q_over[i].path, path)) {
            *bits = d->q_over[i].bits;
            *group = d->q_over[i].group;
            return 1;
        }
    return 0;
}

size_t model_desc_kv_bytes_per_token(const model_desc *d, size_t elem_size) {
    return (size_t)2 * (size_t)d->n_head_kv * (size_t)d->head_dim * elem_size;
}
