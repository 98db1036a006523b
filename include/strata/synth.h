/* strata/synth.h — synthetic checkpoints of real published shapes with random weights.
 *
 * A spec names a preset and optionally a quantization: "qwen3-0.6b" (bf16) or
 * "qwen3-0.6b:q4g64". Presets: qwen3-0.6b, qwen3-8b, qwen3-30b-a3b, llama3.1-8b, llama3.1-70b,
 * minimax-m2.5 (the published config.json shapes), and tiny-llama, tiny-qwen3, tiny-qwen3-moe,
 * tiny-minimax (a few layers, hidden 128, vocab 512: for tests). Quantizations: bf16 and
 * q{2,3,4,5,6,8}g{32,64,128} (the CLI advertises the g64 ones).
 *
 * Layouts:
 *   bf16       Hugging Face layout, safetensors metadata format "pt"; MoE experts as separate
 *              per-expert tensors (experts.E.gate_proj / experts.E.w1 ...).
 *   quantized  mlx-community layout, metadata format "mlx": every Linear and the embedding as
 *              U32 weight + bf16 scales + bf16 biases; MoE experts stacked [E, ...] under
 *              switch_mlp; routers ("gate") at 8 bits group 64, written as per-module overrides
 *              in config.json "quantization" and "quantization_config"; norms bf16 and
 *              e_score_correction_bias F32, unquantized.
 *
 * Weights: every value depends only on (seed, module path, expert, row, column), never on the
 * layout or quantization, so a quantized preset holds exactly the MLX quantization
 * (mlxq_quantize_row_bf16) of its bf16 twin's weights for the same seed, and the same seed always
 * gives identical bytes. Linears are bf16(N(0, 1/fan_in)) (embedding and lm_head N(0, 1/hidden),
 * so logits have unit scale), norms 1, e_score_correction_bias N(0, 0.05^2); the normal is an
 * Irwin-Hall sum of four 16-bit uniforms (bounded at +-3.46 sigma).
 */
#ifndef STRATA_SYNTH_H
#define STRATA_SYNTH_H

#include "strata/base.h"
#include "strata/model.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Name of preset i (0-based), NULL past the end: enumerates the presets for --list. */
const char *synth_preset_name(int i);

/* The descriptor a model directory written for `spec` loads as (it is parsed from the very
 * config.json text synth_write writes). Needs no weights: the placement solver and bench use it
 * for byte counts. Unknown preset / quantization -> ST_ERR_ARG naming the choices. The caller
 * frees *out with model_desc_free. */
int synth_preset_desc(const char *spec, model_desc *out, st_err *err);

/* Parameter count (every weight element, norms included) and checkpoint bytes (sum of tensor
 * data, as in the index's metadata.total_size) of `spec`. */
int synth_preset_size(const char *spec, uint64_t *n_params, uint64_t *n_bytes, st_err *err);

/* Builds the weights of `spec` in memory (one buffer, no disk) and binds them: the same tensors,
 * bit for bit, that synth_write writes for this seed. opts as for model_load (NULL: whole model);
 * with a layer range only the tensors that stage binds are generated. Generation runs on all
 * CPUs and shows progress on stderr. On failure *out is NULL. m->dir is NULL. */
int synth_model(model **out, const char *spec, uint64_t seed, const model_load_opts *opts, st_err *err);

typedef struct synth_write_opts {
    uint64_t max_shard_bytes;  /* 0: 5 GiB (mlx-lm's 5 << 30); a tensor never spans shards      */
    int n_threads;             /* 0: all CPUs                                                  */
    const char *tokenizer_dir; /* NULL: $STRATA_CACHE/tokenizers/<family> (or ./.cache/...)    */
} synth_write_opts;

/* Writes a complete model directory for `spec` into out_dir (created if needed): config.json,
 * generation_config.json, model.safetensors or model-0000K-of-0000N.safetensors shards of at
 * most max_shard_bytes plus model.safetensors.index.json (metadata.total_size, weight_map), and
 * the family's real tokenizer.json + tokenizer_config.json when available (qwen3 for qwen3*,
 * llama3 for llama*; none for minimax and the tiny presets, whose vocab is 512 — said in a log
 * line). Streams tensor by tensor (headers first, then each tensor's bytes generated in
 * parallel and written in place), showing progress and MB/s. Checks free disk space first
 * (ST_ERR_LIMIT). config.json is written last, so an interrupted write leaves no loadable
 * directory. opts may be NULL. */
int synth_write_ex(const char *spec, const char *out_dir, uint64_t seed, const synth_write_opts *opts, st_err *err);

/* synth_write_ex with default options. */
int synth_write(const char *spec, const char *out_dir, uint64_t seed, st_err *err);

/* Writes only config.json and generation_config.json of `spec` into out_dir (no weights). */
int synth_write_config(const char *spec, const char *out_dir, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
