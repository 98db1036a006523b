/* strata/sampler.h — next-token sampling from a logits vector.
 *
 * One smp_sampler per generation stream. smp_init sizes every scratch buffer from the vocabulary
 * once; smp_sample / smp_accept allocate nothing. Per token the caller does
 *
 *     int32_t id = smp_sample(s, logits);      // logits: (n_vocab,) f32, scratch, clobbered
 *     smp_accept(s, id);                       // feeds the penalties
 *
 * after seeding the penalty history with the prompt once: smp_accept_prompt(s, ids, n).
 *
 * The chain, in llama.cpp's default order (with temperature placed where HF/vLLM put it):
 *
 *   1. logit bias        logit[id] += bias                       (-INFINITY bans the token)
 *   2. penalties         repetition (HF/CTRL semantics) over prompt + generated tokens:
 *                            logit > 0 ? logit / r : logit * r
 *                        then presence / frequency (OpenAI semantics) over generated tokens:
 *                            logit -= presence * (count > 0) + frequency * count
 *   3. temperature == 0  greedy: the argmax, ties going to the lowest id; steps 4-9 are skipped
 *   4. temperature       logit /= T
 *   5. top-k             keep the k largest (ties: lower id ranks first); partial selection, O(V)
 *   6. softmax           over what is left
 *   7. top-p             keep the shortest prefix of the ranked tokens whose probability sum
 *                        reaches p (the minimal nucleus; the crossing token is kept)
 *   8. min-p             keep tokens with prob >= min_p * max prob (relative to step 6)
 *   9. sample            renormalise and draw one token from the rng (xoshiro256**)
 *
 * Tokens whose logit is -inf or NaN (after steps 1-2) are never chosen. Nothing sorts the
 * vocabulary: top-k finds a threshold with counting passes and ranks the few tokens above it;
 * top-p histograms the probabilities and ranks only the bucket where the nucleus ends. Both are
 * O(V) per token for real logits (a few hundred microseconds at V = 152k, mostly exp).
 *
 * Probabilities use a built-in vectorised exp (relative error < 3e-7), not libm's, so for fixed
 * params (seed included), n_vocab, history and logits the sequence of chosen ids is identical
 * across runs, machines and instruction sets (AVX2 or not).
 */
#ifndef STRATA_SAMPLER_H
#define STRATA_SAMPLER_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* random numbers: xoshiro256** seeded through splitmix64 (Vigna's reference algorithms)      */

typedef struct smp_rng {
    uint64_t s[4];
} smp_rng;

/* One step of splitmix64: advances *state and returns the next output. */
uint64_t smp_splitmix64(uint64_t *state);

/* Seeds r from a 64-bit seed: the four words are four consecutive splitmix64 outputs of seed
 * (never all zero, so every seed, 0 included, gives a valid xoshiro state). */
void smp_rng_seed(smp_rng *r, uint64_t seed);

/* Next 64 random bits (xoshiro256**). */
uint64_t smp_rng_next(smp_rng *r);

/* Uniform double in [0, 1): the top 53 bits of smp_rng_next. */
double smp_rng_uniform(smp_rng *r);

/* ------------------------------------------------------------------------------------------ */
/* parameters                                                                                 */

/* One entry of a sparse logit bias list. */
typedef struct smp_bias {
    int32_t id;    /* token id in [0, n_vocab)                             */
    float bias;    /* added to the logit; -INFINITY bans the token          */
} smp_bias;

typedef struct smp_params {
    float temperature;         /* 0 = greedy; > 0 divides the logits                    */
    int32_t top_k;             /* 0 = off; else keep the k most likely tokens          */
    float top_p;               /* 1 = off; in (0, 1]                                    */
    float min_p;               /* 0 = off; in [0, 1]                                    */
    float repetition_penalty;  /* 1 = off; > 0; prompt + generated tokens (HF)          */
    float presence_penalty;    /* 0 = off; generated tokens (OpenAI), may be negative   */
    float frequency_penalty;   /* 0 = off; generated tokens (OpenAI), may be negative   */
    const smp_bias *logit_bias;/* (n_logit_bias,) borrowed; smp_init copies it         */
    int32_t n_logit_bias;      /* duplicates of an id add up                            */
    uint64_t seed;             /* the rng seed; same seed => same sequence              */
    int32_t n_vocab;           /* 0, or must equal smp_init's n_vocab (cross-check)     */
} smp_params;

/* The neutral parameters: temperature 1, every filter and penalty off, no bias, seed 0. */
smp_params smp_params_default(void);

/* ------------------------------------------------------------------------------------------ */
/* sampler                                                                                    */

typedef struct smp_sampler smp_sampler;

/* Validates p and allocates a sampler with all its per-token scratch (O(n_vocab) memory).
 *   n_vocab      length of the logits vectors smp_sample will get (> 0).
 *   max_history  penalty window in tokens: penalties see only the last max_history accepted
 *                tokens (prompt and generated alike, like llama.cpp's penalty_last_n); a ring
 *                of that size is allocated here. 0 = unbounded (every token since the last
 *                smp_reset counts; no ring).
 * The logit bias list is copied, so p and its pointers may be released after the call. The rng
 * is seeded from p->seed. Returns NULL on failure with err filled: ST_ERR_ARG for out-of-range
 * parameters or bias ids, ST_ERR_NOMEM. Free with smp_free. */
smp_sampler *smp_init(const smp_params *p, int32_t n_vocab, size_t max_history, st_err *err);

/* Releases s and everything it owns. s may be NULL. */
void smp_free(smp_sampler *s);

/* Returns the sampler to its state right after smp_init: history and counts cleared, rng
 * re-seeded from params.seed (so a reset sampler replays the same sequence). O(distinct tokens
 * seen), not O(n_vocab). */
void smp_reset(smp_sampler *s);

/* Records prompt tokens: they count for the repetition penalty only (not for presence or
 * frequency). ids must be in [0, n_vocab) (asserted). */
void smp_accept_prompt(smp_sampler *s, const int32_t *ids, size_t n);

/* Records a generated token: it counts for all three penalties. id in [0, n_vocab) (asserted).
 * Call it for every token the stream emits, whether or not smp_sample chose it. */
void smp_accept(smp_sampler *s, int32_t id);

/* Runs the chain above on logits (n_vocab floats) and returns the chosen id, or -1 when no
 * token has a finite logit after bias and penalties (everything banned). Does not call
 * smp_accept. Allocates nothing. A +inf logit (e.g. a +inf bias) forces that token (lowest
 * such id). logits is scratch: on return it holds the values after steps 1-2 and, when
 * temperature > 0, divided by the temperature (tests rely on this). */
int32_t smp_sample(smp_sampler *s, float *logits);

/* One (id, logprob) pair of the logprobs report. */
typedef struct smp_logprob {
    int32_t id;
    float logprob;   /* natural log */
} smp_logprob;

/* smp_sample, also reporting log-probabilities for the API's `logprobs`.
 *
 * The reported distribution is log_softmax over the whole vocabulary after logit bias,
 * penalties and temperature, before top-k / top-p / min-p truncation (what OpenAI reports:
 * a truncated token still has its model probability). With temperature 0 (greedy) the
 * temperature step is skipped, i.e. the distribution at T = 1 is reported.
 *   n_top           how many alternatives to report (0 = none).
 *   top             (n_top,) filled with the n_top most likely tokens, most likely first,
 *                   ties by lower id; may be NULL when n_top == 0.
 *   n_top_out       set to the number written: min(n_top, tokens with a finite logit).
 *   chosen_logprob  set to the chosen token's logprob (-INFINITY when -1 is returned).
 * Costs one extra O(n_vocab) pass plus a partial selection of n_top; allocates nothing. */
int32_t smp_sample_logprobs(smp_sampler *s, float *logits, int32_t n_top, smp_logprob *top,
                            int32_t *n_top_out, float *chosen_logprob);

/* The parameters s was created with (logit_bias points into s's own copy). */
const smp_params *smp_get_params(const smp_sampler *s);

#ifdef __cplusplus
}
#endif
#endif
