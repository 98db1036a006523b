/* strata/engine.h — a loaded model ready for text: weights, tokenizer, chat template, EOS ids,
 * and a generation loop with sampling, stop strings and streaming detokenisation.
 *
 * `strata run` and `strata serve` both sit on this. One engine owns one model_ctx; each
 * sequence uses a KV slot, and the engine remembers the tokens cached in each slot so a chat
 * turn only prefills what is new (prefix reuse).
 */
#ifndef STRATA_ENGINE_H
#define STRATA_ENGINE_H

#include "strata/base.h"
#include "strata/model.h"
#include "strata/sampler.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct engine engine;

typedef struct engine_opts {
    const char *tokenizer_dir;  /* borrow a tokenizer from here (NULL: the model directory)     */
    const char *synthetic;      /* "PRESET[:QUANT]": build random weights in memory instead     */
    int max_ctx;                /* KV capacity per slot (0: min(max_position_embeddings, 4096)) */
    int n_slots;                /* concurrent sequences (0: 1)                                  */
    int n_threads;              /* 0: all cores                                                 */
    int offline;                /* never touch the network for hub ids                          */
    int exact;                  /* float32 reference kernels                                    */
} engine_opts;

/* Opens MODEL (a local directory or a hub id org/name[@rev], downloaded into the HF cache, or
 * opts->synthetic). A model without a tokenizer opens (token-level use only); text functions
 * then fail with ST_ERR_MISSING naming what is absent. */
int engine_open(engine **out, const char *model_spec, const engine_opts *opts, st_err *err);
void engine_free(engine *e);

const model *engine_model(const engine *e);
model_ctx *engine_ctx(engine *e);
int engine_has_tokenizer(const engine *e);
int engine_has_template(const engine *e);
int engine_max_ctx(const engine *e);

/* Renders messages (JSON array) through the chat template. *out is malloc'ed. extra may be
 * NULL (template keyword arguments such as enable_thinking). */
int engine_render_chat(const engine *e, const json_t *messages, int add_generation_prompt, const json_t *extra,
                       char **out, st_err *err);

/* Tokenises text (special tokens in the text are recognised; add_special adds BOS as the
 * tokenizer's post-processor does). *ids is malloc'ed. */
int engine_tokenize(const engine *e, const char *text, int add_special, int32_t **ids, size_t *n, st_err *err);

typedef struct gen_request {
    const int32_t *prompt;      /* [n_prompt] borrowed                                          */
    size_t n_prompt;
    int slot;
    int max_tokens;             /* <= 0: until the context is full                              */
    smp_params sampling;
    const char *const *stop;    /* stop strings (borrowed)                                      */
    int n_stop;
    /* called with each piece of text that is safe to show; return non-zero to cancel */
    int (*on_text)(void *user, const char *text, size_t len);
    void *user;
} gen_request;

typedef struct gen_result {
    int n_prompt;               /* prompt tokens                                                */
    int n_cached;               /* of which reused from the slot's cache                        */
    int n_generated;
    const char *finish;         /* "stop" (EOS or stop string), "length", "cancelled"           */
    double prefill_s, decode_s; /* wall times                                                   */
    double ttft_s;
} gen_result;

/* Generates for one sequence in req->slot: prefills the prompt (reusing the slot's cached
 * prefix), samples until EOS / a stop string / max_tokens / the context end / cancellation,
 * streaming text through req->on_text. Fails with ST_ERR_ARG if the prompt does not fit the
 * context (both numbers in the message). */
int engine_generate(engine *e, const gen_request *req, gen_result *res, st_err *err);

/* Forgets what slot holds (the next request prefills from scratch). */
void engine_slot_reset(engine *e, int slot);

#ifdef __cplusplus
}
#endif
#endif
