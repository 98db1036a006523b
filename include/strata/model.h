/* strata/model.h — model descriptor, weight binding and the generic transformer forward pass.
 *
 * A checkpoint directory (config.json + safetensors) becomes a model_desc (pure data: dims,
 * per-layer kinds, rope, qk-norm, routing) and a model (mmapped weights bound to the
 * descriptor). Architectures differ only by descriptor data: one forward pass serves llama,
 * qwen3, qwen3_moe and minimax_m2. A model_ctx owns all run state (activations, KV cache,
 * scratch), sized once: forward never allocates.
 */
#ifndef STRATA_MODEL_H
#define STRATA_MODEL_H

#include "strata/base.h"
#include "strata/pool.h"
#include "strata/safetensors.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* descriptor                                                                                 */

typedef enum model_arch { ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE, ARCH_MINIMAX_M2 } model_arch;
typedef enum qk_norm_kind { QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL } qk_norm_kind;
typedef enum rope_scaling_kind { ROPE_SCALING_NONE, ROPE_SCALING_LLAMA3, ROPE_SCALING_LINEAR } rope_scaling_kind;
typedef enum router_kind { ROUTER_NONE, ROUTER_SOFTMAX_TOPK, ROUTER_SIGMOID_BIAS } router_kind;

#define MODEL_MAX_EOS 8
#define MODEL_MAX_QOVERRIDES 4096

/* One per-module quantization override from config.json "quantization". */
typedef struct quant_override {
    char *path;      /* module path, e.g. "model.layers.3.mlp.gate" (owned)             */
    int bits;        /* 0 = `false` (module not quantized)                              */
    int group;
} quant_override;

typedef struct model_desc {
    model_arch arch;
    char model_type[32];
    int n_layer;
    int n_embd;          /* hidden size                                                  */
    int n_head;
    int n_head_kv;
    int head_dim;
    int n_ff;            /* dense MLP intermediate size                                   */
    int n_vocab;
    int64_t max_pos;     /* max_position_embeddings                                       */
    float norm_eps;
    /* rope */
    double rope_theta;
    int n_rot;           /* rotated dims per head (partial rotary < head_dim)            */
    rope_scaling_kind rope_scaling;
    double rope_factor, rope_low_freq, rope_high_freq;
    int64_t rope_orig_max_pos;
    /* attention */
    qk_norm_kind qk_norm;
    /* mixture of experts */
    router_kind router;
    int n_expert;
    int n_expert_used;
    int n_ff_expert;
    int norm_topk_prob;   /* renormalise the top-k weights (softmax router)               */
    uint8_t *layer_moe;   /* [n_layer] 1 if the layer's FFN is MoE (owned)                */
    const char *moe_prefix;          /* "mlp" or "block_sparse_moe"                        */
    const char *expert_names[3];     /* HF per-expert names for gate, up, down             */
    /* output */
    int tie_embeddings;
    int32_t bos_id;                  /* -1 if none                                         */
    int32_t eos_ids[MODEL_MAX_EOS];
    int n_eos;
    /* quantization (MLX affine) */
    int q_bits, q_group;             /* defaults; 0 if the checkpoint is not quantized      */
    quant_override *q_over;          /* owned                                              */
    int n_q_over;
} model_desc;

/* Parses DIR/config.json into d. Accepts both rope styles (rope_theta + rope_scaling, and
 * transformers >= 5 rope_parameters incl. partial_rotary_factor). Errors name the file and the
 * field; unsupported model_type / rope type / quantization mode -> ST_ERR_UNSUPPORTED. */
int model_desc_load(model_desc *d, const char *dir, st_err *err);

/* Same from a JSON text (fuzzing, tests). `what` names the source in messages. */
int model_desc_parse(model_desc *d, const char *json, size_t len, const char *what, st_err *err);

void model_desc_free(model_desc *d);

/* Looks up the quantization of module `path`: returns 1 and sets bits/group if an override
 * exists (bits 0 = not quantized), else 0. */
int model_desc_quant_override(const model_desc *d, const char *path, int *bits, int *group);

/* RoPE inverse frequencies inv[n_rot/2] as transformers computes them (base frequencies in
 * float32, then llama3 / linear scaling in double). Every backend uses this one function. */
void model_desc_rope_inv_freq(const model_desc *d, double *inv);

/* KV cache bytes per token per layer for a given element size. */
size_t model_desc_kv_bytes_per_token(const model_desc *d, size_t elem_size);

/* ------------------------------------------------------------------------------------------ */
/* weights                                                                                    */

/* A linear weight: y = x W^T with W [rows=out, cols=in]; dense (F32/F16/BF16) or MLX affine
 * quantized (bits in 2..8, group 32/64/128): w[o,i] = scales[o,i/g] * q[o,i] + biases[o,i/g],
 * q read LSB-first from the row's uint32 stream. All pointers borrow from the mmapped file. */
typedef struct wt_linear {
    int qbits;                /* 0 = dense                                                  */
    int group;                /* quantized: group size                                      */
    sft_dtype dtype;          /* dense: F32/F16/BF16                                        */
    sft_dtype sdtype;         /* quantized: dtype of scales/biases                          */
    int64_t rows, cols;
    const void *w;            /* dense: [rows, cols]; quantized: u32 [rows, cols*bits/32]  */
    const void *scales;       /* [rows, cols/group]                                         */
    const void *biases;       /* [rows, cols/group]                                         */
    size_t row_bytes;         /* bytes per row of w                                         */
    size_t srow_elems;        /* scale elements per row (cols/group)                        */
} wt_linear;

/* Bytes this weight occupies as stored (w + scales + biases). */
size_t wt_linear_bytes(const wt_linear *w);

typedef struct layer_weights {
    float *attn_norm;         /* [n_embd] f32 (owned copy)                                   */
    float *ffn_norm;          /* [n_embd]                                                    */
    float *q_norm;            /* [head_dim] (per head) or [n_head*head_dim] (full); or NULL  */
    float *k_norm;            /* [head_dim] or [n_head_kv*head_dim]; or NULL                 */
    wt_linear wq, wk, wv, wo;
    /* dense FFN */
    wt_linear w_gate, w_up, w_down;
    /* MoE FFN */
    wt_linear router;         /* [n_expert, n_embd]                                          */
    float *router_bias;       /* [n_expert] e_score_correction_bias (selection only), or NULL */
    wt_linear *exp_gate, *exp_up, *exp_down; /* [n_expert] each (owned arrays of views)       */
} layer_weights;

typedef struct model {
    model_desc desc;
    sft_set weights;          /* owned mmaps                                                 */
    char *dir;
    wt_linear embed;          /* [n_vocab, n_embd]                                           */
    wt_linear output;         /* [n_vocab, n_embd] (= embed when tied)                       */
    float *out_norm;          /* [n_embd]                                                    */
    layer_weights *layers;    /* [n_layer]                                                   */
    int layer_begin, layer_end; /* the layer range this process holds [begin, end)           */
    int holds_embed;          /* 1 if this stage takes token ids (embedding bound as input)   */
    int holds_output;         /* 1 if this stage ends with norm + lm_head                     */
    size_t weight_bytes;      /* bytes of bound weights (as stored)                          */
} model;

typedef struct model_load_opts {
    int layer_begin, layer_end;  /* 0,0 = all layers; a pipeline stage binds a range          */
    int with_embed;              /* bind the embedding (stage 0); default 1 when range is all  */
    int with_output;             /* bind norm + lm_head (last stage)                          */
    const char *source;          /* names the checkpoint in error messages (NULL: "model")    */
} model_load_opts;

/* Loads DIR: config, safetensors (validated, mmapped) and binds every tensor the descriptor
 * needs, checking dtype and shape. A missing tensor is an error naming the tensor and the
 * directory; unknown extra tensors (MTP heads ...) are ignored with a debug line. opts may be
 * NULL (whole model). On failure *out is NULL. */
int model_load(model **out, const char *dir, const model_load_opts *opts, st_err *err);

/* Binds a model from a descriptor and an already-open tensor set (synthetic models). Takes
 * ownership of both on success and on failure. */
int model_bind(model **out, model_desc *desc, sft_set *weights, const model_load_opts *opts, st_err *err);

void model_free(model *m);

/* ------------------------------------------------------------------------------------------ */
/* run state and forward                                                                       */

typedef struct model_ctx model_ctx;

typedef struct model_ctx_opts {
    int max_ctx;          /* KV capacity per slot (tokens); <= desc.max_pos               */
    int n_slots;          /* concurrent sequences                                          */
    int max_batch;        /* tokens per forward chunk (prefill chunk); default 256          */
    int n_threads;        /* CPU threads; 0 = all                                          */
    int exact;            /* 1: float32 reference kernels; 0: SIMD fast path (default)     */
} model_ctx_opts;

/* Allocates activations, scratch and the KV cache for opts. ST_ERR_NOMEM with the byte count
 * if the cache does not fit. The model is borrowed and must outlive the context. */
int model_ctx_init(model_ctx **out, const model *m, const model_ctx_opts *opts, st_err *err);
void model_ctx_free(model_ctx *c);

typedef enum logits_mode { LOGITS_NONE, LOGITS_LAST, LOGITS_ALL } logits_mode;

/* Runs tokens[0..T) (token t at position pos[t] of sequence slot[t]) through the model,
 * writing K/V into the cache. T may exceed max_batch (processed in chunks). Tokens of one
 * slot must come in increasing position order; attention of token t sees positions
 * 0..pos[t] of its slot. logits: LOGITS_ALL writes [T, n_vocab], LOGITS_LAST writes the last
 * token's [n_vocab] row. Fails with ST_ERR_ARG on a position beyond max_ctx or a bad token id.
 * No allocation. */
int model_forward(model_ctx *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                  float *logits, logits_mode mode, st_err *err);

/* A pipeline stage's forward: runs the context's layer range on T rows whose input is token
 * ids (a stage holding the embedding) or hidden states hidden_in[T, n_embd] (later stages).
 * hidden_out[T, n_embd] (may be NULL) receives the residual stream after the last layer; a
 * stage holding the output layer may also produce logits per mode. Same row rules as
 * model_forward. No allocation. */
int model_forward_stage(model_ctx *c, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                        const int32_t *slot, int T, float *hidden_out, float *logits, logits_mode mode, st_err *err);

/* Convenience: one sequence in slot 0, positions start..start+T-1. */
int model_forward_seq(model_ctx *c, const int32_t *tokens, int T, int start, float *logits, logits_mode mode,
                      st_err *err);

/* The context's thread pool (for residency figures) and its timers. */
st_pool *model_ctx_pool(model_ctx *c);
const model *model_ctx_model(const model_ctx *c);
const model_ctx_opts *model_ctx_get_opts(const model_ctx *c);

/* Wall nanoseconds spent inside forward chunks (every kernel of the pass) and the number of
 * chunks since the last reset; reset also clears the pool's busy counters. */
void model_ctx_timers(const model_ctx *c, uint64_t *compute_ns, uint64_t *n_forward);
void model_ctx_timers_reset(model_ctx *c);

/* Bytes of the KV cache allocation. */
size_t model_ctx_kv_bytes(const model_ctx *c);

/* Bytes per KV cache element: 4 (float32: the exact path) or 2 (float16: the fast CPU path). */
size_t model_ctx_kv_elem_bytes(const model_ctx *c);

/* Writes n_tokens positions of pseudo-random K/V into `slot` without running the model (to
 * measure decode at the end of a full context in seconds instead of hours). The cache then
 * holds no real history: use only for benchmarks. */
int model_ctx_kv_fill_synthetic(model_ctx *c, int slot, int n_tokens, uint64_t seed, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
