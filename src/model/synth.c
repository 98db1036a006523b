/* synth.c — synthetic checkpoints of real published shapes (see strata/synth.h).
 *
 * Three layers:
 *   presets  the published hyper-parameters, turned into config.json text; the descriptor is
 *            always parsed back from that text, so synth_preset_desc and model_desc_load agree.
 *   plan     the checkpoint's tensor list (names, dtypes, shapes, byte offsets, shards) and the
 *            "units" that fill it: one [rows, cols] matrix (one expert of a stack) or a vector.
 *   jobs     a unit's row range; jobs run on an st_pool and write bf16 values or MLX-quantized
 *            rows straight into their destination (the model buffer, or a staging buffer that is
 *            then pwritten at the tensor's place in its shard).
 * Every row's values come from an RNG keyed by (seed, logical module path, expert, row), so the
 * bytes do not depend on threads, job sizes, shard sizes or whether the target is memory or disk.
 */
#include "strata/synth.h"
#include "strata/quantize.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// presets: the published shapes

typedef struct syn_preset {
    const char *name;
    const char *family;      /* tokenizer directory under tokenizers/, or NULL            */
    model_arch arch;
    int n_layer, n_embd, n_head, n_head_kv, head_dim;
    int n_ff;                /* dense intermediate_size (minimax: per expert)             */
    int n_vocab;
    int64_t max_pos;
    double eps, rope_theta;
    int tied;
    int rotary_dim;          /* minimax partial rotary; 0 = full head_dim                 */
    double rs_factor, rs_low, rs_high; /* llama3 rope scaling; factor 0 = none            */
    int64_t rs_orig;
    int n_expert, n_expert_used, n_ff_expert;
    int32_t bos;
    int32_t eos[3];
    int n_eos;
    double gen_temp, gen_top_p;
    int gen_top_k;           /* 0 = not written                                           */
} syn_preset;

/* Published config.json values (Hugging Face model cards / config files; MiniMax-M2.5 per
 * formats.md §3.1). tiny-* keep each architecture's features at hidden 128 and vocab 512. */
static const syn_preset g_presets[] = {
    {"qwen3-0.6b", "qwen3", ARCH_QWEN3, 28, 1024, 16, 8, 128, 3072, 151936, 40960, 1e-6, 1e6, 1, 0, 0, 0, 0, 0, 0, 0, 0,
     151643, {151645}, 1, 0.6, 0.95, 20},
    {"qwen3-8b", "qwen3", ARCH_QWEN3, 36, 4096, 32, 8, 128, 12288, 151936, 40960, 1e-6, 1e6, 0, 0, 0, 0, 0, 0, 0, 0, 0,
     151643, {151645}, 1, 0.6, 0.95, 20},
    {"qwen3-30b-a3b", "qwen3", ARCH_QWEN3_MOE, 48, 2048, 32, 4, 128, 6144, 151936, 40960, 1e-6, 1e6, 0, 0, 0, 0, 0, 0,
     128, 8, 768, 151643, {151645}, 1, 0.6, 0.95, 20},
    {"llama3.1-8b", "llama3", ARCH_LLAMA, 32, 4096, 32, 8, 128, 14336, 128256, 131072, 1e-5, 5e5, 0, 0, 8, 1, 4, 8192, 0,
     0, 0, 128000, {128001, 128008, 128009}, 3, 0.6, 0.9, 0},
    {"llama3.1-70b", "llama3", ARCH_LLAMA, 80, 8192, 64, 8, 128, 28672, 128256, 131072, 1e-5, 5e5, 0, 0, 8, 1, 4, 8192,
     0, 0, 0, 128000, {128001, 128008, 128009}, 3, 0.6, 0.9, 0},
    {"minimax-m2.5", NULL, ARCH_MINIMAX_M2, 62, 3072, 48, 8, 128, 1536, 200064, 196608, 1e-6, 5e6, 0, 64, 0, 0, 0, 0, 256,
     8, 1536, 200034, {200020}, 1, 1.0, 0.95, 40},
    {"tiny-llama", "llama3", ARCH_LLAMA, 3, 128, 4, 2, 32, 256, 512, 4096, 1e-5, 5e5, 0, 0, 8, 1, 4, 256, 0, 0, 0, 1, {2},
     1, 0.6, 0.9, 0},
    {"tiny-qwen3", "qwen3", ARCH_QWEN3, 3, 128, 4, 2, 64, 384, 512, 4096, 1e-6, 1e6, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, {2}, 1,
     0.6, 0.95, 20},
    {"tiny-qwen3-moe", "qwen3", ARCH_QWEN3_MOE, 3, 128, 4, 2, 32, 256, 512, 4096, 1e-6, 1e6, 0, 0, 0, 0, 0, 0, 8, 2, 64,
     1, {2}, 1, 0.6, 0.95, 20},
    {"tiny-minimax", NULL, ARCH_MINIMAX_M2, 3, 128, 4, 2, 64, 64, 512, 4096, 1e-6, 5e6, 0, 32, 0, 0, 0, 0, 8, 2, 64, 1,
     {2}, 1, 1.0, 0.95, 40},
};
#define N_PRESETS ((int)(sizeof g_presets / sizeof g_presets[0]))

#define SYN_DEFAULT_SHARD ((uint64_t)5 << 30) /* mlx-lm: max_file_size_gb=5 -> 5 << 30 bytes */

const char *synth_preset_name(int i) { return i >= 0 && i < N_PRESETS ? g_presets[i].name : NULL; }

static int is_tiny(const syn_preset *p) { return !strncmp(p->name, "tiny-", 5); }

/* A parsed spec: preset + quantization (bits 0 = bf16). */
typedef struct syn_spec {
    const syn_preset *p;
    int bits, group;
    char quant[16];          /* "bf16" or "q4g64"                                         */
    char label[96];          /* "qwen3-0.6b:q4g64"                                        */
} syn_spec;

/* Parses "NAME" or "NAME:QUANT". ST_ERR_ARG listing the choices on an unknown name/quant. */
static int spec_parse(const char *spec, syn_spec *s, st_err *err) {
    memset(s, 0, sizeof *s);
    if (!spec || !*spec) return st_err_set(err, ST_ERR_ARG, "empty synthetic model spec (want PRESET[:QUANT])");
    const char *colon = strchr(spec, ':');
    size_t nl = colon ? (size_t)(colon - spec) : strlen(spec);
    for (int i = 0; i < N_PRESETS; i++)
        if (strlen(g_presets[i].name) == nl && !strncmp(g_presets[i].name, spec, nl)) s->p = &g_presets[i];
    if (!s->p) {
        char names[512] = "";
        for (int i = 0; i < N_PRESETS; i++)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", i ? ", " : "", g_presets[i].name);
        return st_err_set(err, ST_ERR_ARG, "unknown synthetic preset \"%.*s\" (presets: %s)", (int)nl, spec, names);
    }
    const char *q = colon ? colon + 1 : "bf16";
    if (!strcmp(q, "bf16")) {
        snprintf(s->quant, sizeof s->quant, "bf16");
    } else {
        int b = 0, g = 0, n = 0;
        char re[16];
        if (sscanf(q, "q%dg%d%n", &b, &g, &n) != 2 || q[n] || !mlxq_supported(b, g) ||
            (snprintf(re, sizeof re, "q%dg%d", b, g), strcmp(re, q)))
            return st_err_set(err, ST_ERR_ARG,
                              "unknown quantization \"%s\" (want bf16 or qBgG with B in 2,3,4,5,6,8 and G in 32,64,128, "
                              "e.g. q4g64)",
                              q);
        s->bits = b;
        s->group = g;
        snprintf(s->quant, sizeof s->quant, "%s", q);
    }
    const syn_preset *p = s->p;
    if (s->bits) { /* every quantized matrix dimension must hold whole groups */
        int64_t dims[] = {p->n_embd, (int64_t)p->n_head * p->head_dim, p->n_ff, p->n_ff_expert};
        for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
            if (dims[i] && (dims[i] % s->group || dims[i] % 64))
                return st_err_set(err, ST_ERR_ARG, "%s: dimension %lld is not a multiple of group size %d", p->name,
                                  (long long)dims[i], s->group);
    }
    snprintf(s->label, sizeof s->label, "%s:%s", p->name, s->quant);
    return ST_OK;
}

// ----------------------------------------------------------------------------
// config.json / generation_config.json

static const char *arch_class(model_arch a) {
    switch (a) {
    case ARCH_LLAMA: return "LlamaForCausalLM";
    case ARCH_QWEN3: return "Qwen3ForCausalLM";
    case ARCH_QWEN3_MOE: return "Qwen3MoeForCausalLM";
    case ARCH_MINIMAX_M2: return "MiniMaxM2ForCausalLM";
    }
    return "?";
}

static const char *arch_type(model_arch a) {
    switch (a) {
    case ARCH_LLAMA: return "llama";
    case ARCH_QWEN3: return "qwen3";
    case ARCH_QWEN3_MOE: return "qwen3_moe";
    case ARCH_MINIMAX_M2: return "minimax_m2";
    }
    return "?";
}

/* The MoE block's module name (config.c's moe_prefix). */
static const char *moe_prefix(model_arch a) { return a == ARCH_MINIMAX_M2 ? "block_sparse_moe" : "mlp"; }

static json_t *eos_json(const syn_preset *p) {
    if (p->n_eos == 1) return json_integer(p->eos[0]);
    json_t *a = json_array();
    for (int i = 0; i < p->n_eos; i++) json_array_append_new(a, json_integer(p->eos[i]));
    return a;
}

/* The "quantization" block mlx-lm writes: defaults + an 8-bit g64 override per MoE router. */
static json_t *quant_json(const syn_spec *s) {
    json_t *q = json_object();
    json_object_set_new(q, "group_size", json_integer(s->group));
    json_object_set_new(q, "bits", json_integer(s->bits));
    json_object_set_new(q, "mode", json_string("affine"));
    if (s->p->n_expert > 0) {
        char path[128];
        for (int l = 0; l < s->p->n_layer; l++) {
            snprintf(path, sizeof path, "model.layers.%d.%s.gate", l, moe_prefix(s->p->arch));
            json_object_set_new(q, path, json_pack("{s:i, s:i, s:s}", "group_size", 64, "bits", 8, "mode", "affine"));
        }
    }
    return q;
}

/* config.json as a JSON object (owned by the caller). seed < 0 leaves it out. */
static json_t *config_json(const syn_spec *s, int64_t seed) {
    const syn_preset *p = s->p;
    json_t *c = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", arch_class(p->arch)));
    json_object_set_new(c, "model_type", json_string(arch_type(p->arch)));
    json_object_set_new(c, "hidden_size", json_integer(p->n_embd));
    json_object_set_new(c, "intermediate_size", json_integer(p->n_ff));
    json_object_set_new(c, "num_hidden_layers", json_integer(p->n_layer));
    json_object_set_new(c, "num_attention_heads", json_integer(p->n_head));
    json_object_set_new(c, "num_key_value_heads", json_integer(p->n_head_kv));
    json_object_set_new(c, "head_dim", json_integer(p->head_dim));
    json_object_set_new(c, "vocab_size", json_integer(p->n_vocab));
    json_object_set_new(c, "max_position_embeddings", json_integer(p->max_pos));
    json_object_set_new(c, "rms_norm_eps", json_real(p->eps));
    json_object_set_new(c, "rope_theta", json_real(p->rope_theta));
    json_object_set_new(c, "tie_word_embeddings", json_boolean(p->tied));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "attention_bias", json_false());
    json_object_set_new(c, "torch_dtype", json_string("bfloat16"));
    json_object_set_new(c, "bos_token_id", json_integer(p->bos));
    json_object_set_new(c, "eos_token_id", eos_json(p));
    json_object_set_new(c, "use_cache", json_true());
    if (p->arch == ARCH_LLAMA) json_object_set_new(c, "mlp_bias", json_false());
    if (p->rs_factor > 0)
        json_object_set_new(c, "rope_scaling",
                            json_pack("{s:f, s:f, s:f, s:I, s:s}", "factor", p->rs_factor, "low_freq_factor", p->rs_low,
                                      "high_freq_factor", p->rs_high, "original_max_position_embeddings",
                                      (json_int_t)p->rs_orig, "rope_type", "llama3"));
    if (p->arch == ARCH_QWEN3_MOE) {
        json_object_set_new(c, "num_experts", json_integer(p->n_expert));
        json_object_set_new(c, "num_experts_per_tok", json_integer(p->n_expert_used));
        json_object_set_new(c, "moe_intermediate_size", json_integer(p->n_ff_expert));
        json_object_set_new(c, "norm_topk_prob", json_true());
        json_object_set_new(c, "decoder_sparse_step", json_integer(1));
        json_object_set_new(c, "mlp_only_layers", json_array());
    }
    if (p->arch == ARCH_MINIMAX_M2) {
        json_object_set_new(c, "num_local_experts", json_integer(p->n_expert));
        json_object_set_new(c, "num_experts_per_tok", json_integer(p->n_expert_used));
        json_object_set_new(c, "rotary_dim", json_integer(p->rotary_dim));
        json_object_set_new(c, "use_qk_norm", json_true());
        json_object_set_new(c, "qk_norm_type", json_string("per_layer"));
        json_object_set_new(c, "scoring_func", json_string("sigmoid"));
        json_object_set_new(c, "use_routing_bias", json_true());
        json_object_set_new(c, "shared_intermediate_size", json_integer(0));
        json_t *atl = json_array();
        for (int l = 0; l < p->n_layer; l++) json_array_append_new(atl, json_integer(1));
        json_object_set_new(c, "attn_type_list", atl);
    }
    if (s->bits) {
        json_object_set_new(c, "quantization", quant_json(s));
        json_object_set_new(c, "quantization_config", quant_json(s));
    }
    json_t *mark = json_pack("{s:s, s:s, s:s}", "preset", p->name, "quant", s->quant, "note",
                             "random weights generated by strata synth: the output is gibberish by construction");
    if (seed >= 0) json_object_set_new(mark, "seed", json_integer(seed));
    json_object_set_new(c, "strata_synthetic", mark);
    return c;
}

static json_t *generation_json(const syn_preset *p) {
    json_t *g = json_object();
    json_object_set_new(g, "bos_token_id", json_integer(p->bos));
    json_object_set_new(g, "eos_token_id", eos_json(p));
    json_object_set_new(g, "do_sample", json_true());
    json_object_set_new(g, "temperature", json_real(p->gen_temp));
    json_object_set_new(g, "top_p", json_real(p->gen_top_p));
    if (p->gen_top_k) json_object_set_new(g, "top_k", json_integer(p->gen_top_k));
    return g;
}

#define SYN_JSON_FLAGS (JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(15))

/* Parses the config text of s into d (the loader's own parser). */
static int spec_desc(const syn_spec *s, model_desc *d, st_err *err) {
    json_t *c = config_json(s, -1);
    char *txt = c ? json_dumps(c, SYN_JSON_FLAGS) : NULL;
    json_decref(c);
    if (!txt) {
        memset(d, 0, sizeof *d);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    char what[128];
    snprintf(what, sizeof what, "synthetic %s config", s->label);
    int rc = model_desc_parse(d, txt, strlen(txt), what, err);
    free(txt);
    return rc;
}

int synth_preset_desc(const char *spec, model_desc *out, st_err *err) {
    memset(out, 0, sizeof *out);
    syn_spec s;
    int rc = spec_parse(spec, &s, err);
    return rc ? rc : spec_desc(&s, out, err);
}

// ----------------------------------------------------------------------------
// random numbers: splitmix64 for keys and seeding, xoshiro256** for the stream

static inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ull;
    return h;
}

/* The RNG key of (seed, logical module path, expert). */
static uint64_t unit_key(uint64_t seed, const char *path, int expert) {
    return mix64(mix64(seed ^ 0x73796e7468ull) ^ fnv1a(path) ^ mix64(0x1000000ull + (uint64_t)expert));
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* Fills out[n] with bf16-representable draws of N(0, sigma^2) for row `row` of the unit `key`.
 * Normal approximation: the sum of four 16-bit uniforms of one 64-bit draw (Irwin-Hall, n=4),
 * centred and scaled to unit variance: var = 4 * (65536^2 - 1) / 12. */
static void gen_row(uint64_t key, int64_t row, int64_t n, float sigma, float *out) {
    uint64_t st = key ^ mix64((uint64_t)row * 0xd1342543de82ef95ull + 7);
    uint64_t s0 = mix64(st), s1 = mix64(st + 1), s2 = mix64(st + 2), s3 = mix64(st + 3);
    const float k = sigma * (float)(1.7320508075688772 / 65536.0);
    for (int64_t i = 0; i < n; i++) {
        const uint64_t x = rotl64(s1 * 5, 7) * 9; /* xoshiro256** */
        const uint64_t t = s1 << 17;
        s2 ^= s0;
        s3 ^= s1;
        s1 ^= s2;
        s0 ^= s3;
        s2 ^= t;
        s3 = rotl64(s3, 45);
        const int32_t sum = (int32_t)((x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48)) - 131070;
        union { float f; uint32_t u; } v = {.f = (float)sum * k};
        v.u += 0x7fffu + ((v.u >> 16) & 1u); /* round to nearest even bf16 (values are finite) */
        v.u &= 0xffff0000u;
        out[i] = v.f;
    }
}

// ----------------------------------------------------------------------------
// plan: tensors and the units that fill them

typedef enum unit_kind { UNIT_MATRIX, UNIT_ONES, UNIT_VEC_F32 } unit_kind;

typedef struct syn_tensor {
    char *name;              /* owned                                                     */
    sft_dtype dtype;
    int ndim;
    int64_t shape[3];
    uint64_t nbytes;
    int shard;               /* writing: shard index                                      */
    uint64_t off;            /* offset in the shard's data buffer / the memory buffer      */
} syn_tensor;

typedef struct syn_unit {
    unit_kind kind;
    uint64_t key;            /* RNG key                                                   */
    int64_t rows, cols;      /* vectors: 1 x n                                            */
    float sigma;
    int bits, group;         /* matrix: 0 = stored as bf16                                */
    int t[3];                /* tensors: weight, scales, biases (-1 when dense)          */
    uint64_t sub[3];         /* byte offset of this unit (expert slab) inside each tensor */
} syn_unit;

typedef struct syn_plan {
    syn_tensor *t;
    size_t n_t, cap_t;
    syn_unit *u;
    size_t n_u, cap_u;
    uint64_t seed;
    uint64_t n_params, n_bytes;
    int64_t max_cols;
    int oom;
} syn_plan;

static void plan_free(syn_plan *p) {
    for (size_t i = 0; i < p->n_t; i++) free(p->t[i].name);
    free(p->t);
    free(p->u);
    memset(p, 0, sizeof *p);
}

/* Appends a tensor; returns its index or -1 (p->oom set). */
static int plan_tensor(syn_plan *p, const char *name, sft_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2) {
    if (p->oom) return -1;
    if (p->n_t == p->cap_t) {
        size_t nc = p->cap_t ? 2 * p->cap_t : 256;
        syn_tensor *nt = realloc(p->t, nc * sizeof *nt);
        if (!nt) return p->oom = 1, -1;
        p->t = nt;
        p->cap_t = nc;
    }
    syn_tensor *t = &p->t[p->n_t];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name) return p->oom = 1, -1;
    t->dtype = dt;
    t->ndim = ndim;
    int64_t d[3] = {d0, d1, d2};
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= (uint64_t)(t->shape[i] = d[i]);
    t->nbytes = numel * (uint64_t)sft_dtype_bits(dt) / 8;
    /* every tensor a multiple of 4 bytes keeps all U32/F32 data 4-aligned in the file */
    ST_ASSERT(t->nbytes % 4 == 0);
    p->n_bytes += t->nbytes;
    return (int)p->n_t++;
}

static syn_unit *plan_unit(syn_plan *p, unit_kind kind, uint64_t key, int64_t rows, int64_t cols, float sigma) {
    if (p->oom) return NULL;
    if (p->n_u == p->cap_u) {
        size_t nc = p->cap_u ? 2 * p->cap_u : 256;
        syn_unit *nu = realloc(p->u, nc * sizeof *nu);
        if (!nu) return p->oom = 1, NULL;
        p->u = nu;
        p->cap_u = nc;
    }
    syn_unit *u = &p->u[p->n_u++];
    memset(u, 0, sizeof *u);
    u->kind = kind;
    u->key = key;
    u->rows = rows;
    u->cols = cols;
    u->sigma = sigma;
    u->t[0] = u->t[1] = u->t[2] = -1;
    p->n_params += (uint64_t)rows * (uint64_t)cols;
    if (cols > p->max_cols) p->max_cols = cols;
    return u;
}

/* A bf16 vector of ones (RMSNorm weight). */
static void plan_ones(syn_plan *p, const char *name, int64_t n) {
    int ti = plan_tensor(p, name, SFT_BF16, 1, n, 0, 0);
    syn_unit *u = plan_unit(p, UNIT_ONES, 0, 1, n, 0);
    if (u) u->t[0] = ti;
}

/* An F32 vector of small random values (e_score_correction_bias; unquantized, as mlx-lm keeps it). */
static void plan_vec_f32(syn_plan *p, const char *name, int64_t n, float sigma) {
    int ti = plan_tensor(p, name, SFT_F32, 1, n, 0, 0);
    syn_unit *u = plan_unit(p, UNIT_VEC_F32, unit_key(p->seed, name, 0), 1, n, sigma);
    if (u) u->t[0] = ti;
}

/* Module `path` as one [rows, cols] linear, or a stack of n_stack experts [n_stack, rows, cols]
 * under one name (MLX switch_mlp). bits 0 = bf16. Keys come from `path` and the expert index. */
static void plan_linear(syn_plan *p, const char *path, int64_t rows, int64_t cols, int n_stack, float sigma, int bits,
                        int group) {
    char name[256];
    const int st = n_stack > 0;
    const int n = st ? n_stack : 1;
    int tw, ts = -1, tb = -1;
    uint64_t wrow, srow = 0;
    if (bits) {
        wrow = (uint64_t)cols * (uint64_t)bits / 8;
        srow = (uint64_t)(cols / group) * 2;
        snprintf(name, sizeof name, "%s.weight", path);
        tw = st ? plan_tensor(p, name, SFT_U32, 3, n, rows, cols * bits / 32)
                : plan_tensor(p, name, SFT_U32, 2, rows, cols * bits / 32, 0);
        snprintf(name, sizeof name, "%s.scales", path);
        ts = st ? plan_tensor(p, name, SFT_BF16, 3, n, rows, cols / group)
                : plan_tensor(p, name, SFT_BF16, 2, rows, cols / group, 0);
        snprintf(name, sizeof name, "%s.biases", path);
        tb = st ? plan_tensor(p, name, SFT_BF16, 3, n, rows, cols / group)
                : plan_tensor(p, name, SFT_BF16, 2, rows, cols / group, 0);
    } else {
        wrow = (uint64_t)cols * 2;
        snprintf(name, sizeof name, "%s.weight", path);
        tw = st ? plan_tensor(p, name, SFT_BF16, 3, n, rows, cols) : plan_tensor(p, name, SFT_BF16, 2, rows, cols, 0);
    }
    for (int e = 0; e < n; e++) {
        syn_unit *u = plan_unit(p, UNIT_MATRIX, unit_key(p->seed, path, st ? e : -1), rows, cols, sigma);
        if (!u) return;
        u->bits = bits;
        u->group = group;
        u->t[0] = tw;
        u->t[1] = ts;
        u->t[2] = tb;
        u->sub[0] = (uint64_t)e * (uint64_t)rows * wrow;
        u->sub[1] = u->sub[2] = (uint64_t)e * (uint64_t)rows * srow;
    }
}

/* Which parts of the model to generate (model_bind's rule for a stage). */
typedef struct syn_sel {
    int layer_begin, layer_end;
    int embed, output;
} syn_sel;

static void sel_from_opts(const model_desc *d, const model_load_opts *o, syn_sel *s) {
    s->layer_begin = 0;
    s->layer_end = d->n_layer;
    s->embed = s->output = 1;
    if (o && (o->layer_begin || o->layer_end)) {
        s->layer_begin = o->layer_begin < 0 ? 0 : o->layer_begin;
        s->layer_end = o->layer_end > d->n_layer ? d->n_layer : o->layer_end;
        s->embed = o->with_embed;
        s->output = o->with_output;
    }
}

/* Builds the tensor list of spec s (descriptor d) for the selected parts. */
static int plan_build(syn_plan *p, const syn_spec *s, const model_desc *d, const syn_sel *sel, uint64_t seed,
                      st_err *err) {
    memset(p, 0, sizeof *p);
    p->seed = seed;
    const int B = s->bits, G = s->group;
    const int64_t D = d->n_embd, qd = (int64_t)d->n_head * d->head_dim, kvd = (int64_t)d->n_head_kv * d->head_dim;
    const float sD = 1.0f / sqrtf((float)D);
    char path[256], key[256];
    if (sel->embed || (sel->output && d->tie_embeddings)) plan_linear(p, "model.embed_tokens", d->n_vocab, D, 0, sD, B, G);
    for (int l = sel->layer_begin; l < sel->layer_end; l++) {
#define P(...) (snprintf(path, sizeof path, __VA_ARGS__), path)
        plan_ones(p, P("model.layers.%d.input_layernorm.weight", l), D);
        plan_linear(p, P("model.layers.%d.self_attn.q_proj", l), qd, D, 0, sD, B, G);
        plan_linear(p, P("model.layers.%d.self_attn.k_proj", l), kvd, D, 0, sD, B, G);
        plan_linear(p, P("model.layers.%d.self_attn.v_proj", l), kvd, D, 0, sD, B, G);
        plan_linear(p, P("model.layers.%d.self_attn.o_proj", l), D, qd, 0, 1.0f / sqrtf((float)qd), B, G);
        if (d->qk_norm != QK_NORM_NONE) {
            int full = d->qk_norm == QK_NORM_FULL;
            plan_ones(p, P("model.layers.%d.self_attn.q_norm.weight", l), full ? qd : d->head_dim);
            plan_ones(p, P("model.layers.%d.self_attn.k_norm.weight", l), full ? kvd : d->head_dim);
        }
        plan_ones(p, P("model.layers.%d.post_attention_layernorm.weight", l), D);
        if (!d->layer_moe[l]) {
            const float sF = 1.0f / sqrtf((float)d->n_ff);
            plan_linear(p, P("model.layers.%d.mlp.gate_proj", l), d->n_ff, D, 0, sD, B, G);
            plan_linear(p, P("model.layers.%d.mlp.up_proj", l), d->n_ff, D, 0, sD, B, G);
            plan_linear(p, P("model.layers.%d.mlp.down_proj", l), D, d->n_ff, 0, sF, B, G);
            continue;
        }
        const int E = d->n_expert;
        const int64_t F = d->n_ff_expert;
        const float sF = 1.0f / sqrtf((float)F);
        const char *mp = d->moe_prefix;
        /* router: mlx-community keeps it at 8 bits, group 64 */
        plan_linear(p, P("model.layers.%d.%s.gate", l, mp), E, D, 0, sD, B ? 8 : 0, 64);
        if (d->router == ROUTER_SIGMOID_BIAS) plan_vec_f32(p, P("model.layers.%d.%s.e_score_correction_bias", l, mp), E, 0.05f);
        static const char *const sw[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int k = 0; k < 3; k++) {
            const int64_t rows = k == 2 ? D : F, cols = k == 2 ? F : D;
            const float sg = k == 2 ? sF : sD;
            if (B) {
                plan_linear(p, P("model.layers.%d.%s.switch_mlp.%s", l, mp, sw[k]), rows, cols, E, sg, B, G);
                continue;
            }
            /* bf16: Hugging Face per-expert tensors, keyed like the stacked module */
            snprintf(key, sizeof key, "model.layers.%d.%s.switch_mlp.%s", l, mp, sw[k]);
            for (int e = 0; e < E; e++) {
                int ti = plan_tensor(p, P("model.layers.%d.%s.experts.%d.%s.weight", l, mp, e, d->expert_names[k]),
                                     SFT_BF16, 2, rows, cols, 0);
                syn_unit *u = plan_unit(p, UNIT_MATRIX, unit_key(seed, key, e), rows, cols, sg);
                if (u) u->t[0] = ti;
            }
        }
#undef P
    }
    if (sel->output) {
        plan_ones(p, "model.norm.weight", D);
        if (!d->tie_embeddings) plan_linear(p, "lm_head", d->n_vocab, D, 0, sD, B, G);
    }
    if (p->oom) {
        plan_free(p);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory planning %s", s->label);
    }
    return ST_OK;
}

int synth_preset_size(const char *spec, uint64_t *n_params, uint64_t *n_bytes, st_err *err) {
    syn_spec s;
    model_desc d;
    int rc = spec_parse(spec, &s, err);
    if (rc) return rc;
    if ((rc = spec_desc(&s, &d, err))) return rc;
    syn_sel sel;
    sel_from_opts(&d, NULL, &sel);
    syn_plan p;
    rc = plan_build(&p, &s, &d, &sel, 0, err);
    if (!rc) {
        *n_params = p.n_params;
        *n_bytes = p.n_bytes;
        plan_free(&p);
    }
    model_desc_free(&d);
    return rc;
}

// ----------------------------------------------------------------------------
// jobs: a unit's rows [r0, r1) written to dst[] (row r0 of the weight / scales / biases)

typedef struct syn_job {
    const syn_unit *u;
    int64_t r0, r1;
    uint8_t *dst[3];
    uint64_t bytes;          /* output bytes (progress)                                   */
} syn_job;

/* Bytes per row of part k (0 weight, 1 scales, 2 biases) of a unit. */
static uint64_t unit_row_bytes(const syn_unit *u, int k) {
    if (k) return (uint64_t)(u->cols / u->group) * 2;
    if (u->kind == UNIT_VEC_F32) return (uint64_t)u->cols * 4;
    if (u->kind == UNIT_MATRIX && u->bits) return (uint64_t)u->cols * (uint64_t)u->bits / 8;
    return (uint64_t)u->cols * 2;
}

static int unit_parts(const syn_unit *u) { return u->kind == UNIT_MATRIX && u->bits ? 3 : 1; }

/* Rows per job: about a million generated values, so jobs are a few milliseconds each. */
static int64_t unit_rows_per_job(const syn_unit *u) {
    int64_t r = ((int64_t)1 << 20) / (u->cols > 0 ? u->cols : 1);
    return r < 1 ? 1 : r;
}

typedef struct job_run {
    syn_job *jobs;
    float **wf;              /* [threads][max_cols] generated row                          */
    uint8_t **codes;         /* [threads][max_cols] quantization codes                     */
    atomic_uint_fast64_t done;
    st_progress *prog;       /* updated by thread 0 only (NULL: none)                      */
    uint64_t prog_base;
} job_run;

/* Fills one job's destination rows. */
static void job_exec(const syn_job *j, float *wf, uint8_t *codes) {
    const syn_unit *u = j->u;
    const int64_t n = u->cols;
    if (u->kind == UNIT_ONES) {
        uint16_t one = 0x3f80; /* bf16 1.0 */
        for (int64_t i = 0; i < n; i++) memcpy(j->dst[0] + 2 * i, &one, 2);
        return;
    }
    if (u->kind == UNIT_VEC_F32) {
        gen_row(u->key, 0, n, u->sigma, wf);
        memcpy(j->dst[0], wf, (size_t)n * 4);
        return;
    }
    const uint64_t rb = unit_row_bytes(u, 0), sb = u->bits ? unit_row_bytes(u, 1) : 0;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const uint64_t i = (uint64_t)(r - j->r0);
        gen_row(u->key, r, n, u->sigma, wf);
        if (!u->bits) {
            uint16_t *o = (uint16_t *)(void *)(j->dst[0] + i * rb);
            for (int64_t c = 0; c < n; c++) {
                uint32_t b;
                memcpy(&b, &wf[c], 4);
                o[c] = (uint16_t)(b >> 16); /* exact: gen_row's values are bf16 */
            }
        } else {
            mlxq_quantize_row_bf16(wf, n, u->bits, u->group, (uint32_t *)(void *)(j->dst[0] + i * rb),
                                   (uint16_t *)(void *)(j->dst[1] + i * sb), (uint16_t *)(void *)(j->dst[2] + i * sb),
                                   codes);
        }
    }
}

static void job_task(void *ctx, int task, int n_tasks, int thread) {
    (void)n_tasks;
    job_run *r = ctx;
    job_exec(&r->jobs[task], r->wf[thread], r->codes[thread]);
    uint64_t d = atomic_fetch_add(&r->done, r->jobs[task].bytes) + r->jobs[task].bytes;
    if (thread == 0 && r->prog) st_progress_update(r->prog, (double)(r->prog_base + d));
}

/* Per-thread scratch for nt threads and rows up to max_cols values. */
static int run_scratch_init(job_run *r, int nt, int64_t max_cols) {
    memset(r, 0, sizeof *r);
    r->wf = calloc((size_t)nt, sizeof *r->wf);
    r->codes = calloc((size_t)nt, sizeof *r->codes);
    if (!r->wf || !r->codes) return -1;
    for (int i = 0; i < nt; i++) {
        r->wf[i] = malloc((size_t)(max_cols > 0 ? max_cols : 1) * sizeof(float));
        r->codes[i] = malloc((size_t)(max_cols > 0 ? max_cols : 1));
        if (!r->wf[i] || !r->codes[i]) return -1;
    }
    return 0;
}

static void run_scratch_free(job_run *r, int nt) {
    for (int i = 0; r->wf && i < nt; i++) free(r->wf[i]);
    for (int i = 0; r->codes && i < nt; i++) free(r->codes[i]);
    free(r->wf);
    free(r->codes);
}

/* Counts the jobs of a plan. */
static size_t plan_n_jobs(const syn_plan *p) {
    size_t n = 0;
    for (size_t i = 0; i < p->n_u; i++) {
        int64_t per = unit_rows_per_job(&p->u[i]);
        n += (size_t)((p->u[i].rows + per - 1) / per);
    }
    return n;
}

// ----------------------------------------------------------------------------
// in memory

int synth_model(model **out, const char *spec, uint64_t seed, const model_load_opts *opts, st_err *err) {
    *out = NULL;
    syn_spec s;
    model_desc d;
    int rc = spec_parse(spec, &s, err);
    if (rc) return rc;
    if ((rc = spec_desc(&s, &d, err))) return rc;
    syn_sel sel;
    sel_from_opts(&d, opts, &sel);
    syn_plan p;
    if ((rc = plan_build(&p, &s, &d, &sel, seed, err))) {
        model_desc_free(&d);
        return rc;
    }
    /* one buffer, every tensor 64-byte aligned */
    uint64_t total = 0;
    for (size_t i = 0; i < p.n_t; i++) {
        p.t[i].off = total;
        total += (p.t[i].nbytes + 63) & ~(uint64_t)63;
    }
    void *buf = NULL;
    sft_tensor *ts = calloc(p.n_t ? p.n_t : 1, sizeof *ts);
    syn_job *jobs = calloc(plan_n_jobs(&p) + 1, sizeof *jobs);
    st_pool *pool = st_pool_init(0);
    int nt = st_pool_threads(pool);
    job_run run;
    int scr = run_scratch_init(&run, nt, p.max_cols);
    char b1[32];
    if (!ts || !jobs || !pool || scr || posix_memalign(&buf, 64, total ? (size_t)total : 64) != 0) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory: synthetic %s needs %s", s.label,
                        st_fmt_bytes((double)total, b1, sizeof b1));
        buf = NULL;
        goto fail;
    }
    size_t nj = 0;
    for (size_t i = 0; i < p.n_u; i++) {
        const syn_unit *u = &p.u[i];
        const int64_t per = unit_rows_per_job(u);
        for (int64_t r0 = 0; r0 < u->rows; r0 += per) {
            syn_job *j = &jobs[nj++];
            j->u = u;
            j->r0 = r0;
            j->r1 = r0 + per < u->rows ? r0 + per : u->rows;
            for (int k = 0; k < unit_parts(u); k++) {
                j->dst[k] = (uint8_t *)buf + p.t[u->t[k]].off + u->sub[k] + (uint64_t)r0 * unit_row_bytes(u, k);
                j->bytes += (uint64_t)(j->r1 - r0) * unit_row_bytes(u, k);
            }
        }
    }
    char label[128];
    snprintf(label, sizeof label, "synthesising %s in memory", s.label);
    st_progress prog;
    st_progress_begin(&prog, label, (double)p.n_bytes, "B");
    run.jobs = jobs;
    run.prog = &prog;
    atomic_init(&run.done, 0);
    st_pool_run(pool, job_task, &run, (int)nj);
    st_progress_update(&prog, (double)p.n_bytes);
    st_progress_end(&prog);
    for (size_t i = 0; i < p.n_t; i++) {
        const syn_tensor *t = &p.t[i];
        sft_tensor *o = &ts[i];
        o->name = t->name; /* moved */
        o->dtype = t->dtype;
        o->ndim = t->ndim;
        o->numel = 1;
        for (int k = 0; k < t->ndim; k++) o->numel *= (o->shape[k] = t->shape[k]);
        o->begin = t->off;
        o->end = t->off + t->nbytes;
        o->data = (const uint8_t *)buf + t->off;
        o->nbytes = (size_t)t->nbytes;
        p.t[i].name = NULL;
    }
    run_scratch_free(&run, nt);
    st_pool_free(pool);
    free(jobs);
    size_t n_t = p.n_t;
    plan_free(&p);
    sft_set set;
    snprintf(label, sizeof label, "synthetic %s", s.label);
    if ((rc = sft_set_from_memory(&set, ts, n_t, buf, label, err))) {
        model_desc_free(&d);
        return rc;
    }
    model_load_opts o = {0};
    if (opts) o = *opts;
    o.source = label;
    return model_bind(out, &d, &set, &o, err);
fail:
    if (scr == 0 || run.wf) run_scratch_free(&run, nt);
    st_pool_free(pool);
    free(jobs);
    free(ts);
    free(buf);
    plan_free(&p);
    model_desc_free(&d);
    return rc;
}

// ----------------------------------------------------------------------------
// on disk

/* Writes all of buf[n] at offset off of fd. */
static int pwrite_all(int fd, const void *buf, size_t n, uint64_t off, const char *path, st_err *err) {
    const uint8_t *b = buf;
    while (n) {
        ssize_t w = pwrite(fd, b, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return st_err_set(err, ST_ERR_IO, "%s: write failed: %s", path, w < 0 ? strerror(errno) : "no progress");
        b += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return ST_OK;
}

/* Writes json (consumed) to dir/name with HF formatting. */
static int write_json(const char *dir, const char *name, json_t *j, st_err *err) {
    char *path = st_path_join(dir, name);
    char *txt = j ? json_dumps(j, SYN_JSON_FLAGS) : NULL;
    json_decref(j);
    int rc = ST_OK;
    if (!path || !txt) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    } else {
        FILE *f = fopen(path, "wb");
        if (!f) {
            rc = st_err_set(err, ST_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
        } else {
            int ok = fputs(txt, f) >= 0 && fputc('\n', f) != EOF;
            if (fclose(f) != 0) ok = 0;
            if (!ok) rc = st_err_set(err, ST_ERR_IO, "%s: write failed", path);
        }
    }
    free(path);
    free(txt);
    return rc;
}

/* Copies src to dst (small files). */
static int copy_file(const char *src, const char *dst, st_err *err) {
    char *data = NULL;
    size_t len = 0;
    int rc = st_file_read(src, &data, &len, err);
    if (rc) return rc;
    FILE *f = fopen(dst, "wb");
    if (!f) {
        free(data);
        return st_err_set(err, ST_ERR_IO, "%s: cannot create: %s", dst, strerror(errno));
    }
    int ok = fwrite(data, 1, len, f) == len;
    if (fclose(f) != 0) ok = 0;
    free(data);
    return ok ? ST_OK : st_err_set(err, ST_ERR_IO, "%s: write failed", dst);
}

/* Copies the family's tokenizer into out_dir when there is one; says what it did in a line. */
static int copy_tokenizer(const syn_spec *s, const char *out_dir, const char *tok_dir_opt, st_err *err) {
    const syn_preset *p = s->p;
    if (!p->family) {
        ST_INFO("%s: no tokenizer copied: none is available for the minimax family (the directory holds weights and "
                "config only)", s->label);
        return ST_OK;
    }
    if (is_tiny(p)) {
        ST_INFO("%s: no tokenizer copied (vocab %d does not match the real %s tokenizer)", s->label, p->n_vocab, p->family);
        return ST_OK;
    }
    char dir[1024];
    if (tok_dir_opt) {
        snprintf(dir, sizeof dir, "%s", tok_dir_opt);
    } else {
        const char *cache = getenv("STRATA_CACHE");
        snprintf(dir, sizeof dir, "%s/tokenizers/%s", cache && *cache ? cache : ".cache", p->family);
    }
    static const char *const files[2] = {"tokenizer.json", "tokenizer_config.json"};
    char src[1200], dst[1200];
    for (int i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/%s", dir, files[i]);
        if (!st_path_exists(src)) {
            ST_INFO("%s: no tokenizer copied (%s not found; tools/fetch-test-assets.sh fetches it)", s->label, src);
            return ST_OK;
        }
    }
    for (int i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/%s", dir, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", out_dir, files[i]);
        int rc = copy_file(src, dst, err);
        if (rc) return rc;
    }
    ST_INFO("%s: copied the real %s tokenizer from %s", s->label, p->family, dir);
    return ST_OK;
}

int synth_write_config(const char *spec, const char *out_dir, st_err *err) {
    syn_spec s;
    int rc = spec_parse(spec, &s, err);
    if (!rc) rc = st_mkdir_p(out_dir, err);
    if (!rc) rc = write_json(out_dir, "generation_config.json", generation_json(s.p), err);
    if (!rc) rc = write_json(out_dir, "config.json", config_json(&s, -1), err);
    return rc;
}

/* Shard file name: model.safetensors, or model-0000K-of-0000N.safetensors. */
static void shard_name(char *buf, size_t cap, int k, int n) {
    if (n == 1) snprintf(buf, cap, "model.safetensors");
    else snprintf(buf, cap, "model-%05d-of-%05d.safetensors", k + 1, n);
}

/* The safetensors header of shard k (tensors of that shard, in plan order), space-padded to a
 * multiple of 8 as the reference writer does. Returns a malloc'ed buffer of *len bytes that
 * includes the 8-byte length prefix. */
static uint8_t *shard_header(const syn_plan *p, int k, const char *fmt, size_t *len) {
    json_t *root = json_object();
    json_object_set_new(root, "__metadata__", json_pack("{s:s}", "format", fmt));
    for (size_t i = 0; i < p->n_t; i++) {
        const syn_tensor *t = &p->t[i];
        if (t->shard != k) continue;
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_object_set_new(root, t->name,
                            json_pack("{s:s, s:o, s:[I,I]}", "dtype", sft_dtype_name(t->dtype), "shape", shape,
                                      "data_offsets", (json_int_t)t->off, (json_int_t)(t->off + t->nbytes)));
    }
    char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!hdr) return NULL;
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    uint8_t *out = malloc(8 + padded);
    if (out) {
        for (int i = 0; i < 8; i++) out[i] = (uint8_t)((uint64_t)padded >> (8 * i));
        memcpy(out + 8, hdr, hl);
        memset(out + 8 + hl, ' ', padded - hl);
        *len = 8 + padded;
    }
    free(hdr);
    return out;
}

#define SYN_STAGE_BYTES ((uint64_t)64 << 20) /* staging per batch of jobs (two buffers) */

/* The background writer: pwrites batch [b0, b1) of jobs from its staging buffer while the pool
 * generates the next batch into the other buffer. One batch at a time; the first failure sticks
 * (rc, err) and later batches are skipped. */
typedef struct syn_writer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int busy;                    /* a batch is pending or being written                   */
    int quit;
    size_t b0, b1;
    const syn_job *jobs;
    const uint64_t *file_off;    /* [jobs * 3] file offset of each job's parts            */
    const syn_plan *p;
    const int *fds;
    char *const *paths;
    atomic_uint_fast64_t written;
    int rc;                      /* written by the writer thread only                     */
    st_err err;
} syn_writer;

static void *writer_main(void *arg) {
    syn_writer *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->busy && !w->quit) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->busy) break;
        const size_t b0 = w->b0, b1 = w->b1;
        pthread_mutex_unlock(&w->mu);
        int rc = w->rc;
        for (size_t i = b0; i < b1 && !rc; i++) {
            const syn_job *j = &w->jobs[i];
            for (int k = 0; k < unit_parts(j->u) && !rc; k++) {
                const int sh = w->p->t[j->u->t[k]].shard;
                const uint64_t n = (uint64_t)(j->r1 - j->r0) * unit_row_bytes(j->u, k);
                rc = pwrite_all(w->fds[sh], j->dst[k], (size_t)n, w->file_off[3 * i + k], w->paths[sh], &w->err);
                atomic_fetch_add(&w->written, n);
            }
        }
        pthread_mutex_lock(&w->mu);
        w->rc = rc;
        w->busy = 0;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Waits until the writer has finished its batch; returns its sticky status. */
static int writer_wait(syn_writer *w) {
    pthread_mutex_lock(&w->mu);
    while (w->busy) pthread_cond_wait(&w->cv, &w->mu);
    int rc = w->rc;
    pthread_mutex_unlock(&w->mu);
    return rc;
}

static void writer_submit(syn_writer *w, size_t b0, size_t b1) {
    pthread_mutex_lock(&w->mu);
    w->b0 = b0;
    w->b1 = b1;
    w->busy = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int synth_write_ex(const char *spec, const char *out_dir, uint64_t seed, const synth_write_opts *opts, st_err *err) {
    syn_spec s;
    model_desc d;
    int rc = spec_parse(spec, &s, err);
    if (rc) return rc;
    if ((rc = spec_desc(&s, &d, err))) return rc;
    const uint64_t max_shard = opts && opts->max_shard_bytes ? opts->max_shard_bytes : SYN_DEFAULT_SHARD;
    syn_sel sel;
    sel_from_opts(&d, NULL, &sel);
    syn_plan p;
    rc = plan_build(&p, &s, &d, &sel, seed, err);
    model_desc_free(&d);
    if (rc) return rc;

    /* shards: tensors in plan order, a new shard when the next tensor would overflow */
    int n_shards = 1;
    uint64_t cur = 0;
    for (size_t i = 0; i < p.n_t; i++) {
        if (cur > 0 && cur + p.t[i].nbytes > max_shard) {
            n_shards++;
            cur = 0;
        }
        p.t[i].shard = n_shards - 1;
        p.t[i].off = cur;
        cur += p.t[i].nbytes;
    }
    int *fds = malloc((size_t)n_shards * sizeof *fds);
    uint64_t *data_start = calloc((size_t)n_shards, sizeof *data_start);
    char **paths = calloc((size_t)n_shards, sizeof *paths);
    syn_job *jobs = NULL;
    uint8_t *stage = NULL;
    st_pool *pool = NULL;
    job_run run;
    int nt = 0, scr = -1;
    memset(&run, 0, sizeof run);
    char b1[32], b2[32], label[160];
    if (!fds || !data_start || !paths) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int k = 0; k < n_shards; k++) fds[k] = -1;
    if ((rc = st_mkdir_p(out_dir, err))) goto out;
    struct statvfs vfs;
    if (statvfs(out_dir, &vfs) == 0) {
        uint64_t avail = (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize;
        if (avail < p.n_bytes) {
            rc = st_err_set(err, ST_ERR_LIMIT, "%s: %s needs %s but only %s is free there (use --synthetic to run it from memory)",
                            out_dir, s.label, st_fmt_bytes((double)p.n_bytes, b1, sizeof b1),
                            st_fmt_bytes((double)avail, b2, sizeof b2));
            goto out;
        }
    }
    /* a stale config.json would make a half-written directory look loadable */
    char *cfg = st_path_join(out_dir, "config.json");
    if (cfg) unlink(cfg);
    free(cfg);

    const char *fmt = s.bits ? "mlx" : "pt";
    for (int k = 0; k < n_shards; k++) {
        char name[64];
        shard_name(name, sizeof name, k, n_shards);
        paths[k] = st_path_join(out_dir, name);
        size_t hlen = 0;
        uint8_t *hdr = paths[k] ? shard_header(&p, k, fmt, &hlen) : NULL;
        if (!hdr) {
            rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            goto out;
        }
        fds[k] = open(paths[k], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fds[k] < 0) {
            free(hdr);
            rc = st_err_set(err, ST_ERR_IO, "%s: cannot create: %s", paths[k], strerror(errno));
            goto out;
        }
        data_start[k] = hlen;
        rc = pwrite_all(fds[k], hdr, hlen, 0, paths[k], err);
        free(hdr);
        if (rc) goto out;
    }

    /* jobs, in plan order; batches of at most SYN_STAGE_BYTES (or one job) of output */
    const size_t n_jobs = plan_n_jobs(&p);
    jobs = calloc(n_jobs + 1, sizeof *jobs);
    uint64_t *job_file_off = calloc((n_jobs + 1) * 3, sizeof *job_file_off);
    pool = st_pool_init(opts ? opts->n_threads : 0);
    nt = st_pool_threads(pool);
    scr = run_scratch_init(&run, nt, p.max_cols);
    if (!jobs || !job_file_off || !pool || scr) {
        free(job_file_off);
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t nj = 0;
    uint64_t max_job = 0;
    for (size_t i = 0; i < p.n_u; i++) {
        const syn_unit *u = &p.u[i];
        const int64_t per = unit_rows_per_job(u);
        for (int64_t r0 = 0; r0 < u->rows; r0 += per) {
            syn_job *j = &jobs[nj];
            j->u = u;
            j->r0 = r0;
            j->r1 = r0 + per < u->rows ? r0 + per : u->rows;
            uint64_t b = 0;
            for (int k = 0; k < unit_parts(u); k++) {
                const syn_tensor *t = &p.t[u->t[k]];
                job_file_off[3 * nj + k] = data_start[t->shard] + t->off + u->sub[k] + (uint64_t)r0 * unit_row_bytes(u, k);
                b += ((uint64_t)(j->r1 - r0) * unit_row_bytes(u, k) + 63) & ~(uint64_t)63;
            }
            j->bytes = b;
            if (b > max_job) max_job = b;
            nj++;
        }
    }
    const uint64_t stage_cap = max_job > SYN_STAGE_BYTES ? max_job : SYN_STAGE_BYTES;
    if (posix_memalign((void **)&stage, 64, (size_t)(2 * stage_cap)) != 0) {
        stage = NULL;
        free(job_file_off);
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    syn_writer w;
    memset(&w, 0, sizeof w);
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    w.jobs = jobs;
    w.file_off = job_file_off;
    w.p = &p;
    w.fds = fds;
    w.paths = paths;
    atomic_init(&w.written, 0);
    pthread_t wth;
    if (pthread_create(&wth, NULL, writer_main, &w) != 0) {
        pthread_cond_destroy(&w.cv);
        pthread_mutex_destroy(&w.mu);
        free(job_file_off);
        rc = st_err_set(err, ST_ERR_INTERNAL, "cannot start the writer thread");
        goto out;
    }
    snprintf(label, sizeof label, "writing %s", s.label);
    st_progress prog;
    st_progress_begin(&prog, label, (double)p.n_bytes, "B");
    run.prog = NULL;
    for (size_t b0 = 0, batch = 0; b0 < nj && !rc; batch++) {
        /* lay out a batch in staging buffer batch % 2 (the writer may still hold the other) */
        uint8_t *buf = stage + (batch & 1) * stage_cap;
        size_t b1j = b0;
        uint64_t at = 0;
        while (b1j < nj && (b1j == b0 || at + jobs[b1j].bytes <= stage_cap)) {
            syn_job *j = &jobs[b1j];
            for (int k = 0; k < unit_parts(j->u); k++) {
                j->dst[k] = buf + at;
                at += ((uint64_t)(j->r1 - j->r0) * unit_row_bytes(j->u, k) + 63) & ~(uint64_t)63;
            }
            b1j++;
        }
        run.jobs = jobs + b0;
        atomic_init(&run.done, 0);
        st_pool_run(pool, job_task, &run, (int)(b1j - b0));
        rc = writer_wait(&w); /* the previous batch is on disk: its buffer is free again */
        st_progress_update(&prog, (double)atomic_load(&w.written));
        if (!rc) writer_submit(&w, b0, b1j);
        b0 = b1j;
    }
    rc = writer_wait(&w);
    pthread_mutex_lock(&w.mu);
    w.quit = 1;
    pthread_cond_broadcast(&w.cv);
    pthread_mutex_unlock(&w.mu);
    pthread_join(wth, NULL);
    pthread_cond_destroy(&w.cv);
    pthread_mutex_destroy(&w.mu);
    if (rc && err) *err = w.err;
    st_progress_update(&prog, (double)atomic_load(&w.written));
    free(job_file_off);
    if (!rc) st_progress_end(&prog);
    for (int k = 0; k < n_shards && !rc; k++) {
        if (close(fds[k]) != 0) rc = st_err_set(err, ST_ERR_IO, "%s: close failed: %s", paths[k], strerror(errno));
        fds[k] = -1;
    }
    if (rc) goto out;

    if (n_shards > 1) {
        json_t *idx = json_object(), *wm = json_object();
        json_object_set_new(idx, "metadata", json_pack("{s:I}", "total_size", (json_int_t)p.n_bytes));
        for (size_t i = 0; i < p.n_t; i++) {
            char name[64];
            shard_name(name, sizeof name, p.t[i].shard, n_shards);
            json_object_set_new(wm, p.t[i].name, json_string(name));
        }
        json_object_set_new(idx, "weight_map", wm);
        if ((rc = write_json(out_dir, "model.safetensors.index.json", idx, err))) goto out;
    } else {
        char *ip = st_path_join(out_dir, "model.safetensors.index.json");
        if (ip) unlink(ip); /* a stale index from an earlier sharded write would win */
        free(ip);
    }
    if ((rc = copy_tokenizer(&s, out_dir, opts ? opts->tokenizer_dir : NULL, err))) goto out;
    if ((rc = write_json(out_dir, "generation_config.json", generation_json(s.p), err))) goto out;
    if ((rc = write_json(out_dir, "config.json", config_json(&s, (int64_t)(seed & INT64_MAX)), err))) goto out;
    if (p.n_params >= 1000000000ull) snprintf(b2, sizeof b2, "%.2fB", (double)p.n_params / 1e9);
    else snprintf(b2, sizeof b2, "%.2fM", (double)p.n_params / 1e6);
    ST_INFO("%s: wrote %s in %d shard%s to %s (%s parameters, random weights, seed %llu)", s.label,
            st_fmt_bytes((double)p.n_bytes, b1, sizeof b1), n_shards, n_shards > 1 ? "s" : "", out_dir, b2,
            (unsigned long long)seed);
out:
    for (int k = 0; fds && k < n_shards; k++)
        if (fds[k] >= 0) close(fds[k]);
    for (int k = 0; paths && k < n_shards; k++) free(paths[k]);
    free(paths);
    free(fds);
    free(data_start);
    if (scr == 0 || run.wf) run_scratch_free(&run, nt);
    st_pool_free(pool);
    free(stage);
    free(jobs);
    plan_free(&p);
    return rc;
}

int synth_write(const char *spec, const char *out_dir, uint64_t seed, st_err *err) {
    return synth_write_ex(spec, out_dir, seed, NULL, err);
}
