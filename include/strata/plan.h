/* strata/plan.h — placement: model statistics, cluster descriptions and the solver.
 *
 * Three inputs, one output, nothing loaded:
 *   plan_model    what a model needs: exact stored bytes of every layer (from the safetensors
 *                 headers, or from the descriptor alone for configs and synthetic presets),
 *                 embedding / output bytes, KV bytes per token, bytes read and FLOPs per
 *                 decoded token (MoE: the routed share of the experts), scratch.
 *   plan_cluster  what a cluster offers: devices (memory, read bandwidth, matrix throughput,
 *                 runtime overhead) and directed links (latency, bandwidth), from cluster.json
 *                 (docs/cluster-json.md).
 *   plan_request  what is asked: context per sequence, concurrent sequences (slots), objective
 *                 (latency of one stream, or throughput), KV dtype, memory reserve.
 *   plan_result   pipeline stages of contiguous layer ranges, each on one device or on a
 *                 tensor-parallel group; the per-device memory budget line by line; predicted
 *                 time per token by stage and hop; the binding constraint; the largest context
 *                 that fits. plan_result_json() is the machine form that the cluster runtime
 *                 consumes (issue #5): stage order, layer ranges, devices, context and slots.
 *
 * Memory is planned, not hoped for: every device must hold its weights, the KV cache for the
 * full target context x slots, scratch for a prefill chunk, and its runtime overhead, within
 * its memory minus the reserve. The solver is exact (dynamic programming over contiguous
 * layer ranges, all subsets and orders of devices) for up to PLAN_EXACT_DEVICES devices and
 * uses a fixed greedy device order beyond.
 */
#ifndef STRATA_PLAN_H
#define STRATA_PLAN_H

#include "strata/base.h"
#include "strata/model.h"

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PLAN_MAX_DEVICES 64
#define PLAN_MAX_TP 8            /* largest tensor-parallel group                              */
#define PLAN_EXACT_DEVICES 8     /* exhaustive search over device subsets and orders up to this */
#define PLAN_TP_SIMILAR 1.25     /* TP members: memory and bandwidth within this ratio         */

/* ------------------------------------------------------------------------------------------ */
/* model statistics                                                                           */

typedef struct plan_layer {
    uint64_t bytes;            /* stored bytes of all the layer's tensors                       */
    uint64_t shard_bytes;      /* of which split across a TP group (projections, experts)       */
    uint64_t read_bytes;       /* bytes read per decoded token (MoE: routed share of experts)   */
    uint64_t read_shard_bytes; /* of which split across a TP group                              */
    double flops;              /* per token: 2 x multiply-adds of the active weights            */
    int moe;                   /* 1 if the FFN is a mixture of experts                          */
} plan_layer;

typedef struct plan_model {
    char name[256];            /* directory or config path, for messages                        */
    char model_type[32];
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_rot, n_vocab;
    int n_ff, n_ff_expert, n_expert, n_expert_used;
    int has_dense, has_moe;    /* some layer is dense / MoE (TP must divide the matching size)  */
    int qk_norm_full;          /* full-width QK-norm: one more (tiny) all-reduce per TP layer   */
    int64_t max_pos;           /* max_position_embeddings                                       */
    int q_bits, q_group;       /* default quantization (0 = none)                               */
    int tied;                  /* lm_head is the embedding                                      */
    int from_headers;          /* bytes from safetensors headers (1) or the descriptor (0)      */
    plan_layer *layers;        /* [n_layer], owned                                              */
    uint64_t embed_bytes;      /* model.embed_tokens.*                                          */
    uint64_t out_norm_bytes;   /* model.norm.*                                                  */
    uint64_t lm_head_bytes;    /* lm_head.* (0 when tied: the output reads the embedding)       */
    uint64_t other_bytes;      /* stored tensors no stage loads (MTP heads, extra layers ...)   */
    uint64_t n_other;
    double output_flops;       /* 2 x n_vocab x n_embd per token                                */
} plan_model;

/* Statistics of a model directory: DIR/config.json plus the safetensors headers (the files are
 * opened and validated, no tensor data is read). Bytes are exactly what each tensor occupies as
 * stored, whatever its dtype, quantization or override. Errors name the directory. */
int plan_model_from_dir(plan_model *pm, const char *dir, st_err *err);

/* Statistics from a descriptor alone (config files, synthetic presets): bytes as an MLX
 * conversion or a bf16 checkpoint would store them. A linear [rows, cols] with bits b, group g
 * (override, else the default; quantized only when cols % g == 0) takes
 * b*rows*cols/8 + 2 * rows*(cols/g) * 2 bytes (packed weights + bf16 scales and biases), an
 * unquantized one rows*cols*2 (bf16); norms are bf16, e_score_correction_bias f32. `name`
 * is used in messages (may be NULL). d is borrowed. */
int plan_model_from_desc(plan_model *pm, const model_desc *d, const char *name, st_err *err);

void plan_model_free(plan_model *pm);

/* Total stored bytes a full placement loads: layers + embedding + final norm + lm_head. */
uint64_t plan_model_weight_bytes(const plan_model *pm);

/* Bytes read per decoded token by the whole model at an empty context (one embedding row,
 * every layer's read_bytes, the final norm and the whole output matrix). */
uint64_t plan_model_read_bytes(const plan_model *pm);

/* KV cache bytes per token per layer: 2 (K and V) x n_head_kv x head_dim x elem_bytes. */
uint64_t plan_model_kv_bytes(const plan_model *pm, int elem_bytes);

/* Scratch of one stage's run state, mirroring model_ctx_init (f32 activations): with
 * B = max(chunk, slots) rows: x, xn, tmp, xe, ye [B, n_embd]; q, att [B, n_head*hd];
 * k, v [B, n_head_kv*hd]; ff_gate, ff_up [B, max(n_ff, n_ff_expert)]; rope cs [B, n_rot];
 * router [B, E]; sel, selw [B, K]; e_rows, e_w [E, B]; e_count [E]; kp, vp [B] pointers;
 * pos, slot [B] int32; inv_freq [n_rot/2] double; plus `threads` per-thread rows of
 * round_up(max(n_embd, n_head*hd, ff, ctx), 16) floats; plus, on the last stage, one f32
 * logits row per slot. */
uint64_t plan_scratch_bytes(const plan_model *pm, int chunk, int slots, int64_t ctx, int threads, int with_output);

/* ------------------------------------------------------------------------------------------ */
/* clusters                                                                                   */

typedef struct plan_device {
    char node[64];             /* node name                                                    */
    char name[64];             /* device name within the node ("gpu", "gpu0", "cpu")          */
    char kind[16];             /* "gpu", "cpu" or "unified"                                    */
    uint64_t memory;           /* bytes                                                        */
    double bandwidth;          /* memory read bandwidth, bytes/s                               */
    double flops;              /* matrix throughput, FLOP/s (0 = unknown)                      */
    uint64_t overhead;         /* runtime overhead: code, contexts, transport buffers (bytes)  */
    int threads;               /* runtime threads (sizes the per-thread scratch rows)          */
} plan_device;

typedef struct plan_link {
    double latency;            /* seconds, one way, small message                              */
    double bandwidth;          /* bytes/s; 0 = no link                                         */
} plan_link;

typedef struct plan_cluster {
    char name[64];
    int n_dev;
    plan_device *dev;          /* [n_dev], owned                                               */
    plan_link *link;           /* [n_dev * n_dev], owned: link[i * n_dev + j] is i -> j        */
} plan_cluster;

/* Parses a cluster description (docs/cluster-json.md). Errors name the file and the field
 * ("seed.json: nodes[1].devices[0].memory: unknown unit \"GX\""). On failure c is zeroed. */
int plan_cluster_load(plan_cluster *c, const char *path, st_err *err);
int plan_cluster_parse(plan_cluster *c, const char *json, size_t len, const char *what, st_err *err);
void plan_cluster_free(plan_cluster *c);

/* The i -> j link (bandwidth 0 if none). */
static inline const plan_link *plan_cluster_link(const plan_cluster *c, int i, int j) {
    return &c->link[(size_t)i * (size_t)c->n_dev + (size_t)j];
}

/* Parses "128 GiB", "546 GB/s", "80 Gbit/s", "30 us", "17 TFLOPS" (or a bare number in bytes,
 * bytes/s, seconds, FLOP/s) for the quantity `kind`: 'm' memory, 'b' bandwidth, 't' time,
 * 'f' flops. Returns 0 and sets *out, or -1 (unknown unit, not a number, negative). */
int plan_parse_quantity(const char *s, char kind, double *out);

/* ------------------------------------------------------------------------------------------ */
/* request and result                                                                         */

typedef enum plan_objective { PLAN_LATENCY = 0, PLAN_THROUGHPUT = 1 } plan_objective;

typedef struct plan_request {
    int64_t context;           /* tokens per sequence; 0 = the model's max_position_embeddings  */
    int slots;                 /* concurrent full-length sequences (>= 1)                      */
    plan_objective objective;  /* latency: sum of stage times + hops; throughput: slowest stage */
    int kv_elem_bytes;         /* KV element size: 2 (bf16/f16) or 4 (f32)                     */
    double reserve;            /* fraction of each device's memory held back, [0, 1)           */
    int chunk;                 /* prefill chunk: tokens per forward (scratch rows)             */
    int act_bytes;             /* bytes per activation element on links (2: bf16)              */
    int max_tp;                /* largest TP group (1 = pipeline only)                         */
    int min_tp;                /* smallest unit (1 = any; N > 1: only TP groups of >= N)       */
    int64_t objective_context; /* cached positions the objective's stage times read: 0 = an
                                * empty context (default), N = N tokens, PLAN_AT_FULL = the
                                * planned context (long conversations: KV reads weigh in)      */
} plan_request;

#define PLAN_AT_FULL (-1)

/* Defaults: context 0 (model max), 1 slot, latency, bf16 KV, reserve 0.05, chunk 256,
 * bf16 activations, TP up to PLAN_MAX_TP. */
void plan_request_init(plan_request *r);

/* One device's planned memory, line by line. total = the sum of the lines. It is a promise:
 * the cluster runtime (issue #5) allocates the KV cache for context x slots up front, and its
 * test checks that each node's actual allocation stays <= total after a real load. */
typedef struct plan_budget {
    int dev;                   /* device index in the cluster                                  */
    uint64_t usable;           /* memory x (1 - reserve), rounded down                         */
    uint64_t weights;          /* its share of the stage's layers                              */
    uint64_t embed;            /* embedding table (stage 0; every member of a TP group)        */
    uint64_t output;           /* final norm + lm_head (last stage; tied: a copy of the
                                * embedding unless stage 0 is also the last)                   */
    uint64_t kv;               /* KV cache: its layers x its KV heads x context x slots        */
    uint64_t scratch;          /* plan_scratch_bytes                                           */
    uint64_t overhead;         /* the device's runtime overhead                                */
    uint64_t total;
} plan_budget;

typedef struct plan_stage {
    int layer_begin, layer_end;      /* [begin, end)                                          */
    int n_tp;                        /* TP group size (1 = one device)                        */
    plan_budget member[PLAN_MAX_TP]; /* [n_tp]                                                */
    int has_embed, has_output;
    double t_compute;          /* s per decoded token at an empty context (slowest member)     */
    double t_comm;             /* s per token in TP all-reduces                                */
    double t_hop;              /* s: activation to the next stage (last: token id to stage 0)   */
    double t_full;             /* t_compute + t_comm at the full context (KV reads included)   */
    double t_prefill;          /* s per prefill chunk (0 if a member has no flops figure)      */
} plan_stage;

typedef struct plan_result {
    int fits;                  /* 1: stages below are a valid plan                            */
    int64_t context;           /* the request, resolved                                       */
    int slots;
    plan_objective objective;
    int64_t objective_context; /* resolved: the positions the objective was evaluated at        */
    int kv_elem_bytes;
    double reserve;
    int chunk;
    int n_stage;
    plan_stage stage[PLAN_MAX_DEVICES];
    double t_token;            /* decode s/token of one stream, empty context: stages + hops   */
    double tok_s;              /* 1 / t_token                                                  */
    double t_token_full;       /* the same at the full context (every KV row read)             */
    double tok_s_full;
    double t_bottleneck;       /* slowest stage or link transfer                              */
    double tok_s_aggregate;    /* min(slots / t_token, 1 / t_bottleneck)                       */
    double prefill_tok_s;      /* chunk / slowest stage's chunk time (0 = unknown)             */
    int64_t max_context;       /* largest context that fits with `slots` sequences (0: none)   */
    int max_context_is_model_limit; /* max_context is max_position_embeddings                  */
    char binding[ST_ERR_MSG_MAX];   /* what binds: the fullest device, or why nothing fits    */
    int binding_dev;           /* device index, or -1                                         */
    int exact;                 /* 1: exhaustive search (<= PLAN_EXACT_DEVICES devices)        */
} plan_result;

/* Solves placement. Returns ST_OK with a valid plan (out->fits = 1); ST_ERR_LIMIT when nothing
 * fits — out->binding says what binds (e.g. "node mbp/gpu: 34.20 GiB usable, needs 41.20 GiB
 * for 10 layers at 196,608 tokens x 4 slots") and out->max_context is the largest context that
 * fits for the requested slots (0 when even the weights do not fit); err gets the same line
 * plus the max context. ST_ERR_ARG for a context above max_position_embeddings or a bad
 * request field. m and c are borrowed. */
int plan_solve(const plan_model *m, const plan_cluster *c, const plan_request *r, plan_result *out, st_err *err);

/* The plan as JSON (malloc'ed, NUL-terminated; the caller frees), or NULL when out of memory.
 * Format: docs/cluster-json.md, "Plan output". */
char *plan_result_json(const plan_result *p, const plan_model *m, const plan_cluster *c);

/* Formats n with thousands separators ("196,608") into buf; returns buf. */
const char *plan_fmt_count(int64_t n, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
