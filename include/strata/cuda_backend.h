/* strata/cuda_backend.h — the CUDA backend: the generic forward pass of forward.c on one GPU.
 *
 * cuda_model_init uploads a bound model's weights once (dense bf16/f16/f32 as stored; MLX
 * affine rows as their packed uint32 words with scales/biases in their stored dtype; MoE
 * experts of a layer packed contiguously so an expert id read from device memory selects
 * them), and preallocates the bf16 KV cache and every activation. The forward pass runs the
 * same block as model_forward (fp32 activations, fp32 accumulation; the KV cache is bf16, the
 * prefill GEMMs take bf16 inputs; the matrix-vector products of 4- and 8-bit MLX weights
 * quantise x per block of 32 values and use integer dot products: int8 x in dense models
 * (bf16-like error), two int8 planes (int16 precision, twice the integer work) in MoE models,
 * whose router choices amplify activation error. STRATA_CUDA_NO_DP4A=1 keeps them on fp32 x,
 * STRATA_CUDA_DP4A_X16=1 / STRATA_CUDA_DP4A_X8=1 force the two- / one-plane form); nothing is
 * allocated per token. A decode step of B tokens
 * (B <= 8) is captured once per B as a CUDA graph and replayed (STRATA_CUDA_NO_GRAPH=1 in the
 * environment launches eagerly instead; a failed capture falls back to that with a warning).
 *
 * Built without CUDA, or on a machine without a driver/device, cuda_model_init returns
 * ST_ERR_UNSUPPORTED with one line saying why.
 */
#ifndef STRATA_CUDA_BACKEND_H
#define STRATA_CUDA_BACKEND_H

#include "strata/base.h"
#include "strata/model.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cuda_model cuda_model;

typedef struct cuda_model_opts {
    int max_ctx;    /* KV capacity per slot; 0: min(max_pos, 4096)                    */
    int n_slots;    /* sequences; 0: 1                                                 */
    int max_batch;  /* tokens per forward chunk; 0: 256                                */
    int device;     /* CUDA device ordinal                                             */
    int no_graph;   /* 1: never capture CUDA graphs (debugging)                        */
    /* A pipeline stage of a synthetic model (cuda_model_init_synthetic): layers [layer_begin,
     * layer_end), the embedding as input and/or norm + lm_head as output. 0, 0: the whole model
     * (both ends). cuda_model_init takes the range the host model binds instead. */
    int layer_begin, layer_end;
    int with_embed, with_output;
    /* Tensor parallelism: set by cuda_tp_init for each rank (0, 0: none). */
    int tp_rank, tp_size;
} cuda_model_opts;

/* Uploads m (whole model: embedding, all layers, output) to the device. *out is NULL on
 * failure: ST_ERR_UNSUPPORTED (no CUDA / no device), ST_ERR_NOMEM (does not fit). */
int cuda_model_init(cuda_model **out, const model *m, const cuda_model_opts *o, st_err *err);
void cuda_model_free(cuda_model *cm);

/* A model of descriptor d (e.g. synth_preset_desc) whose weights are generated directly in
 * device memory by a hash of (seed, tensor, element): the layout synth_model would build (MLX
 * affine at d->q_bits/q_group with bf16 scales, routers at 8 bits group 64; or bf16), zero-mean
 * values of standard deviation 1/sqrt(fan_in), norms 1 — statistically like the host synth,
 * not bit-identical. For benchmarks of models larger than host memory. d must outlive *out. */
int cuda_model_init_synthetic(cuda_model **out, const model_desc *d, const cuda_model_opts *o, uint64_t seed,
                              st_err *err);

/* Same semantics as model_forward (rows, positions, slots, logits modes); logits_host is host
 * memory ([T, n_vocab] for LOGITS_ALL, [n_vocab] for LOGITS_LAST). */
int cuda_model_forward(cuda_model *cm, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                       float *logits_host, logits_mode mode, st_err *err);

/* A pipeline stage's forward pass (model_forward_stage's contract): T rows enter as token ids
 * (stage with the embedding: tokens[T]) or hidden states (hidden_in [T, n_embd] fp32, host);
 * a stage without the output writes hidden_out [T, n_embd] (host), the last stage logits as
 * `mode` says. Synchronous: returns when the results are in host memory. */
int cuda_model_forward_stage(cuda_model *cm, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                             const int32_t *slot, int T, float *hidden_out, float *logits, logits_mode mode,
                             st_err *err);

/* The stage's shape: layer range and ends (for node reports). */
void cuda_model_stage(const cuda_model *cm, int *layer_begin, int *layer_end, int *has_embed, int *has_output);

/* Asynchronous stage steps (the GPU-resident pipeline's hand-off, strata/cluster.h): submit
 * copies the rows (and hidden_in [T, n_embd] of a stage without the embedding) into pinned
 * staging, launches the step (one CUDA graph per (kind, T) for T <= 8, captured on first use)
 * and returns without waiting. The stream ends the step by writing a flag into mapped host
 * memory (cuStreamWriteValue32; STRATA_CUDA_FLAG_KERNEL=1: a one-thread kernel instead), so the
 * host learns of completion by reading memory: cuda_stage_done polls it, cuda_stage_finish
 * waits (spin = 1: on the flag; spin = 0: cudaStreamSynchronize, the host-synchronous
 * baseline). One step in flight at a time (ST_ERR_STATE otherwise).
 * kind 0: hidden states out (a stage without the output) -> cuda_stage_output [T, n_embd];
 * kind 1: logits of the last row -> cuda_stage_output [n_vocab];
 * kind 2: greedy id of every row (T <= 8) -> cuda_stage_tokens [T]. */
int cuda_stage_submit(cuda_model *cm, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                      const int32_t *slot, int T, int kind, int io, st_err *err);

/* NCCL data links between GPU stages (src/cluster/ncclink.h). cuda_stage_set_nccl attaches the
 * communicators of the hop in (this stage is rank 1, the previous stage rank 0) and the hop out
 * (rank 0; the next stage rank 1), borrowed until detached with NULLs; only with no step in
 * flight; ST_ERR_ARG for an input link on the first stage or an output link on the last.
 * A submit with io & CUDA_STAGE_IN_NCCL (hidden_in NULL) enqueues ncclRecv of the T x n_embd
 * fp32 rows into the layer input before the layers; io & CUDA_STAGE_OUT_NCCL (kind 0) enqueues
 * ncclSend of the output rows after them instead of the copy to cuda_stage_output. Both stay
 * outside the captured graph, on the same stream (STRATA_NCCL_GRAPH=1 at cuda_stage_set_nccl:
 * captured into it, graphs rebuilt when the communicators change; the step is then timed as a
 * whole); the flag comes after the send. A step whose
 * peer never posts the matching call never raises its flag: the caller bounds its wait and
 * aborts the communicator (cuda_nccl_abort), after which the stream completes. */
typedef struct cuda_nccl_comm cuda_nccl_comm;
enum { CUDA_STAGE_IN_NCCL = 1, CUDA_STAGE_OUT_NCCL = 2 };
int cuda_stage_set_nccl(cuda_model *cm, cuda_nccl_comm *in, cuda_nccl_comm *out, st_err *err);
/* After a finished step with io != 0: GPU time (events) of the wait for the received rows, the
 * layers, and the send, in us. Returns 0 when not available (no NCCL step, events not ready). */
int cuda_stage_nccl_times(const cuda_model *cm, double *recv_us, double *compute_us, double *send_us);
/* For a step in flight with io != 0: which NCCL call it is stuck in (CUDA_STAGE_IN_NCCL: the
 * receive started and has not finished; CUDA_STAGE_OUT_NCCL: the send), 0 if neither / unknown. */
int cuda_stage_nccl_stalled(const cuda_model *cm);
int cuda_stage_done(const cuda_model *cm);
int cuda_stage_finish(cuda_model *cm, int spin, st_err *err);
const float *cuda_stage_output(const cuda_model *cm);
/* With STRATA_STAGE_DIAG=1 in the environment: mean GPU time of the steps finished since the
 * last call (events around the launch) and mean time the stream ran on after the flag was
 * seen; returns the number of steps (0: none / not enabled). */
int cuda_stage_diag(cuda_model *cm, double *gpu_ms, double *tail_us);
const int32_t *cuda_stage_tokens(const cuda_model *cm);

/* One greedy decode step of B rows (B <= 8): runs tokens[b] at pos[b] of slot[b] and writes
 * the argmax of each row's logits to next[b]. Everything stays on the GPU (a replayed graph);
 * only the B token ids come back. */
int cuda_model_decode_greedy(cuda_model *cm, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int B,
                             int32_t *next, st_err *err);

/* n greedy steps of one sequence in `slot` starting from `token` at position `pos0`, all on the
 * device (each step's argmax feeds the next step; one synchronisation at the end). out[n]
 * receives the generated ids; step_ms[n] (may be NULL) the time of each step measured with
 * CUDA events. */
int cuda_model_generate_greedy(cuda_model *cm, int32_t token, int pos0, int slot, int n, int32_t *out,
                               float *step_ms, st_err *err);

/* Writes n_tokens positions of pseudo-random K/V into `slot` (benchmarks only). */
int cuda_model_kv_fill_synthetic(cuda_model *cm, int slot, int n_tokens, st_err *err);

/* Device facts for reports. */
typedef struct cuda_model_info {
    char device[128];
    size_t weight_bytes;   /* device bytes of the uploaded weights                          */
    size_t kv_bytes;       /* device bytes of the KV cache                                  */
    size_t act_bytes;      /* activations and scratch                                       */
    size_t active_bytes;   /* weight bytes one decode step (B = 1) reads: every non-expert
                              weight, n_expert_used experts per MoE layer, the output layer  */
    size_t mem_total, mem_free;
} cuda_model_info;
void cuda_model_get_info(const cuda_model *cm, cuda_model_info *info);

/* Device-to-device copy bandwidth (bytes moved = 2 x bytes per copy, read + write) over a
 * buffer of `bytes`, best of reps; 0 on failure. */
double cuda_measure_copy_bandwidth(int device, size_t bytes, int reps);

/* bf16 matrix rate in TFLOP/s (2*m*n*k per GEMM) of one GEMM shape as the prefill linears
 * run it: cuBLAS GemmEx, y[n, m] (fp32) = x[n, k] (bf16) W[m, k]^T (bf16), fp32 accumulation;
 * best of reps timed runs after one warm-up. Allocates and frees the three operands on the
 * device. 0 on failure (no device, out of memory, cuBLAS error). */
double cuda_measure_gemm_tflops_shape(int device, int64_t m, int64_t n, int64_t k, int reps);
/* The device's bf16 matrix rate: the 8192^3 shape above, best of 5. */
double cuda_measure_gemm_tflops(int device);

/* Per-kernel breakdown of one decode step (B = 1, position pos of slot 0), timed with CUDA
 * events around each launch outside the graph. Prints "kernel  calls  us  share" lines to f
 * (a FILE *), largest first. */
int cuda_model_profile_step(cuda_model *cm, int pos, void *f, st_err *err);
/* The same for one prefill chunk: T rows (T <= max_batch) of token 1 at positions 0..T-1 of
 * slot 0 (overwrites that slot's K/V there), logits of the last row. Every kernel group of the
 * forward pass, summed over the layers, largest first. */
int cuda_model_profile_prefill(cuda_model *cm, int T, void *f, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* single ops on host buffers, for the parity harness (each allocates, runs, copies back)      */

/* out[T, rows] = x[T, cols] W^T; path 0: auto, 1: matrix-vector kernel (T <= 8), 2: GEMM,
 * 3: the generic (element-wise) matrix-vector kernel, 4: matrix-vector on fp32 x only (no int8
 * dp4a kernels), 5: matrix-vector with the dp4a kernels on two int8 planes of x. */
int cuda_op_linear(const wt_linear *w, const float *x, int T, float *out, int path, st_err *err);
int cuda_op_embed(const wt_linear *table, const int32_t *tokens, int T, float *out, st_err *err);
int cuda_op_rmsnorm(const float *x, const float *w, int64_t n_rows, int n, float eps, float *out, st_err *err);
/* x[T, n_heads, hd] rotated in place at positions pos[T] with inv_freq[n_rot/2]. */
int cuda_op_rope(float *x, const int32_t *pos, int T, int n_heads, int hd, int n_rot, const double *inv_freq,
                 st_err *err);
/* Causal attention of q[T, H, hd] over a bf16 cache given as f32 k/v[n_ctx, Hkv, hd] (rounded
 * to bf16 on upload); token t sees rows 0..pos[t]. */
int cuda_op_attention(const float *q, const float *k, const float *v, int n_ctx, const int32_t *pos, int T, int H,
                      int Hkv, int hd, float scale, float *out, st_err *err);
/* The same with the kernel chosen: path 0 as the forward pass chooses (the tiled tensor-core
 * prefill kernel for >= 16 rows at consecutive positions, head_dim 64/128, <= 64 q heads per kv
 * head; q and the softmax weights in bf16, error within 1e-2), 1 the decode kernels, 2 the
 * prefill kernel for any T (ST_ERR_UNSUPPORTED if the shape or the positions do not fit it). */
int cuda_op_attention_path(const float *q, const float *k, const float *v, int n_ctx, const int32_t *pos, int T, int H,
                           int Hkv, int hd, float scale, int path, float *out, st_err *err);
int cuda_op_swiglu(const float *gate, const float *up, int64_t n, float *out, st_err *err);
/* The kernels that quantise their own output for the next dp4a matrix-vector launch against the
 * separate k_quant_x: which 0 = SwiGLU (rows x cols), 1 = the attention split combine (rows
 * heads of hd = cols), 2 = add + RMSNorm (rows of cols); *diff = differing bytes of output,
 * codes and statistics (0 expected). */
int cuda_op_fused_quant_check(int which, int rows, int cols, int planes, uint64_t seed, int64_t *diff, st_err *err);
/* Router: logits[T, E] -> sel[T, K], w[T, K] exactly as forward.c's moe_route. */
int cuda_op_moe_route(const float *logits, const float *bias, int T, int E, int K, int sigmoid, int norm_topk,
                      int32_t *sel, float *w, st_err *err);
/* Router linear + routing fused (the model's k_moe_router): x[T, D] -> logits[T, E] (fp32 x),
 * sel[T, K], w[T, K] as cuda_op_moe_route would route those logits. */
int cuda_op_moe_router(const wt_linear *router, const float *router_bias, int E, int K, int sigmoid, int norm_topk,
                       const float *x, int T, float *logits, int32_t *sel, float *w, st_err *err);
/* The whole MoE feed-forward of forward.c's moe_forward on x[T, D]: router logits (fp32 for
 * every T), routing as cuda_op_moe_route, experts exp_*[E] (identical shapes), weighted sum into
 * out[T, D]; sel_out[T, K] (may be NULL) receives the chosen experts. */
int cuda_op_moe_ffn(const wt_linear *router, const float *router_bias, const wt_linear *exp_gate,
                    const wt_linear *exp_up, const wt_linear *exp_down, int E, int K, int sigmoid, int norm_topk,
                    const float *x, int T, float *out, int32_t *sel_out, st_err *err);
int cuda_op_argmax(const float *x, int rows, int n, int32_t *out, st_err *err);

/* ---- tensor parallelism over the GPUs of this process ----------------------------------------
 * Each of n GPUs holds 1/n of every layer's attention heads, KV heads (and KV cache), FFN and
 * expert widths (q/k/v and gate/up split by rows, o and down by columns; routers, norms, the
 * embedding and the output layer whole). After the attention output projection and after the
 * FFN the ranks' partial sums are all-reduced over CUDA peer access (one-shot: each GPU pushes
 * its part to the others over NVLink and sums in rank order, so every GPU holds bitwise the same
 * residual stream), fused with the residual add and the next RMSNorm; a full-width QK-norm
 * (minimax-m2) all-reduces its sums of squares. Every all-reduce is inside each GPU's decode
 * graph; a stalled peer is reported (bounded wait), never a hung GPU. Needs n to divide the
 * heads, KV heads and widths (quantized: whole groups). */
typedef struct cuda_tp cuda_tp;
int cuda_tp_init(cuda_tp **out, const model *m, const cuda_model_opts *o, const int *devices, int n, st_err *err);
int cuda_tp_init_synthetic(cuda_tp **out, const model_desc *d, const cuda_model_opts *o, const int *devices, int n,
                           uint64_t seed, st_err *err);
void cuda_tp_free(cuda_tp *tp);
int cuda_tp_size(const cuda_tp *tp);
/* As cuda_model_forward / cuda_model_generate_greedy / cuda_model_kv_fill_synthetic, over all
 * ranks (rank 0's logits and tokens; generation checks that every rank produced the same). */
int cuda_tp_forward(cuda_tp *tp, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                    float *logits_host, logits_mode mode, st_err *err);
int cuda_tp_generate_greedy(cuda_tp *tp, int32_t token, int pos0, int slot, int n, int32_t *out, float *step_ms,
                            st_err *err);
int cuda_tp_kv_fill_synthetic(cuda_tp *tp, int slot, int n_tokens, st_err *err);
/* As cuda_model_decode_greedy over all ranks: B rows (1..8, at most max_batch) at their own
 * slots and positions, one graph replay per rank (a graph per B, captured on first use); next[B]
 * receives the ids, which every rank must agree on (ST_ERR_INTERNAL naming the GPUs and the row
 * otherwise). Synchronous: returns when the ids are on the host. */
int cuda_tp_decode_greedy(cuda_tp *tp, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int B,
                          int32_t *next, st_err *err);
void cuda_tp_get_info(const cuda_tp *tp, int rank, cuda_model_info *info);
/* cuda_model_profile_step for rank 0 of the group (the all-reduces appear in "add + rmsnorm"). */
int cuda_tp_profile_step(cuda_tp *tp, int pos, void *f, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
