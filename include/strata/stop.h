/* strata/stop.h — when generation ends: EOS token ids, stop strings, a max-token limit.
 *
 * Stop strings are matched on the detokenised byte stream, so a stop string may span any
 * number of tokens ("</s" + "top>"). The matcher is fed text pieces as they stream; it holds
 * back the longest tail that could still grow into a stop string and returns only text that is
 * safe to show the user. On a match it returns the text before the stop string (the stop
 * string itself is never emitted, as in OpenAI's API). The result does not depend on how the
 * stream is cut into pieces.
 *
 * Per generated token the caller typically does:
 *
 *     int r = stop_check_token(eos, n_eos, id, n_generated, max_tokens);
 *     if (r == STOP_EOS) { stop_matcher_flush(m, ...); finish("stop"); }      // EOS text not shown
 *     stop_matcher_feed(m, piece, len, out, cap, &k); send(out, k);
 *     if (fed returned STOP_STRING) finish("stop");
 *     else if (r == STOP_LENGTH) { stop_matcher_flush(m, ...); finish("length"); }
 */
#ifndef STRATA_STOP_H
#define STRATA_STOP_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum stop_reason {
    STOP_NONE = 0,    /* keep generating                                 */
    STOP_EOS = 1,     /* an end-of-sequence token was generated          */
    STOP_STRING = 2,  /* a stop string appeared in the text              */
    STOP_LENGTH = 3,  /* the max-token limit was reached                 */
};

/* ------------------------------------------------------------------------------------------ */
/* EOS ids                                                                                    */

/* Collects the model's end-of-sequence ids: the union of `eos_token_id` from
 * model_dir/config.json (falling back to config.json's text_config.eos_token_id) and from
 * model_dir/generation_config.json, each an integer, a list of integers, or null/absent.
 * Duplicates are dropped; config.json's ids come first. A missing generation_config.json is
 * fine; a missing config.json is ST_ERR_IO. Writes up to cap ids to ids and their count to *n
 * (0 when neither file names one). Errors (message names the file): ST_ERR_IO, ST_ERR_FORMAT
 * for invalid JSON or a wrongly typed / negative / out-of-range id, ST_ERR_LIMIT when more
 * than cap distinct ids are found. On error *n is 0. */
int stop_load_eos(const char *model_dir, int32_t *ids, int cap, int *n, st_err *err);

/* 1 if id is one of ids[0, n). */
int stop_is_eos(const int32_t *ids, int n, int32_t id);

/* Token-level stop check for a just-generated token id: STOP_EOS when id is in eos[0, n_eos),
 * else STOP_LENGTH when max_tokens > 0 and n_generated (tokens generated so far, id
 * included) >= max_tokens, else STOP_NONE. The text of an EOS token is not shown; the text of
 * the token that hits the limit is (feed it, then flush). */
int stop_check_token(const int32_t *eos, int n_eos, int32_t id, int64_t n_generated, int64_t max_tokens);

/* ------------------------------------------------------------------------------------------ */
/* stop strings                                                                               */

typedef struct stop_matcher stop_matcher;

/* Creates a matcher for the n NUL-terminated stop strings (copied; the caller keeps its
 * own). n == 0 is allowed (everything passes through). Returns NULL with err filled on
 * ST_ERR_ARG (an empty stop string, n < 0) or ST_ERR_NOMEM. Free with stop_matcher_free. */
stop_matcher *stop_matcher_init(const char *const *strings, int n, st_err *err);

/* Releases m. m may be NULL. */
void stop_matcher_free(stop_matcher *m);

/* Forgets held text and any match, for a new stream. */
void stop_matcher_reset(stop_matcher *m);

/* Most bytes the matcher ever holds back: the longest stop string's length minus one (0 when
 * there are none). An output buffer of len + stop_matcher_hold_max(m) bytes always suffices
 * for stop_matcher_feed, and of stop_matcher_hold_max(m) bytes for stop_matcher_flush. */
size_t stop_matcher_hold_max(const stop_matcher *m);

/* Feeds the next piece (len bytes, need not be NUL-terminated, may be empty) of the stream.
 * Writes the text now safe to emit into out (not NUL-terminated) and its length to *emit_len.
 * Returns STOP_NONE, or STOP_STRING when a stop string completed: then out holds the text up
 * to the start of the stop string, everything from the stop string on is dropped, and the
 * matcher is finished (later feeds and flushes emit nothing and return STOP_STRING until
 * stop_matcher_reset). When several stop strings could match, the one that completes first in
 * the stream wins (on a tie, the one that starts first).
 * out_cap must be >= len + stop_matcher_hold_max(m) (asserted: a too-small buffer is a bug). */
int stop_matcher_feed(stop_matcher *m, const char *piece, size_t len, char *out, size_t out_cap,
                      size_t *emit_len);

/* End of stream (EOS, length limit, cancellation): releases the held-back text into out (at
 * most stop_matcher_hold_max(m) bytes; out_cap must allow that, asserted). Returns STOP_NONE,
 * or STOP_STRING with nothing emitted if a stop string had already matched. */
int stop_matcher_flush(stop_matcher *m, char *out, size_t out_cap, size_t *emit_len);

/* Index (into the strings given to stop_matcher_init) of the stop string that matched, or -1. */
int stop_matcher_matched(const stop_matcher *m);

#ifdef __cplusplus
}
#endif
#endif
