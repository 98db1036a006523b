/* strata/tok.h — Hugging Face `tokenizer.json` tokenizers: BPE (byte-level or not), exact
 * against HF tokenizers.
 *
 * A tok_tokenizer reproduces HF's TokenizerImpl for one sequence: added tokens are cut out of
 * the raw text first (leftmost-longest, normalized=false ones before normalization, the others
 * after), then normalizer -> pre-tokenizer -> BPE model -> post-processor. Decoding runs the
 * decoder chain HF runs, including its U+FFFD replacement of invalid UTF-8
 * (String::from_utf8_lossy). Every component type the loader does not implement is a load
 * error naming the type and its JSON path: strata never tokenizes differently in silence.
 *
 * Supported: model BPE (vocab, merges as "a b" strings or ["a","b"] pairs, ignore_merges,
 * byte_fallback, unk_token/fuse_unk, continuing_subword_prefix, end_of_word_suffix);
 * normalizers NFC NFD NFKC NFKD Lowercase Replace Prepend Strip StripAccents ByteLevel
 * Sequence; pre-tokenizers Split ByteLevel Digits Metaspace Whitespace WhitespaceSplit
 * Punctuation CharDelimiterSplit BertPreTokenizer Sequence; post-processors ByteLevel
 * TemplateProcessing BertProcessing RobertaProcessing Sequence; decoders ByteLevel Replace
 * ByteFallback Fuse Strip Metaspace Sequence.
 *
 * A loaded tokenizer is immutable: any number of threads may encode/decode with it at once.
 *
 *   tok_tokenizer *tok;
 *   st_err err = {0};
 *   if (tok_load(&tok, "tokenizer.json", &err)) { fprintf(stderr, "%s\n", err.msg); ... }
 *   int32_t *ids; size_t n;
 *   if (tok_encode(tok, "Hello", 5, 1, &ids, &n, &err) == 0) { ...; free(ids); }
 *   tok_free(tok);
 */
#ifndef STRATA_TOK_H
#define STRATA_TOK_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tok_tokenizer tok_tokenizer;

/* Loads a tokenizer.json file. On success *out owns the tokenizer (release with tok_free).
 * Fails with ST_ERR_IO (missing/unreadable file), ST_ERR_FORMAT (invalid JSON: the message
 * has "path:line:col"; merges naming pieces not in the vocab), ST_ERR_UNSUPPORTED (a component
 * type or option strata does not implement: the message names it and its JSON path, e.g.
 * "normalizer.normalizers[1]"), ST_ERR_NOMEM. *out is NULL on failure. */
int tok_load(tok_tokenizer **out, const char *tokenizer_json_path, st_err *err);

/* Same as tok_load for a tokenizer.json already in memory (borrowed: json[0..len) is only read
 * during the call). name is used in messages. */
int tok_load_buffer(tok_tokenizer **out, const char *json, size_t len, const char *name,
                    st_err *err);

/* Releases everything the tokenizer owns. NULL is a no-op. */
void tok_free(tok_tokenizer *tok);

/* Encodes text[0..len) (must be valid UTF-8, may contain NUL bytes). add_special != 0 applies
 * the post-processor's special tokens (e.g. a TemplateProcessing BOS), as HF's
 * encode(add_special_tokens=True). On success *ids is a malloc'ed array of *n_ids ids owned by
 * the caller (free()); it may be NULL when *n_ids is 0. Fails with ST_ERR_ARG (invalid UTF-8:
 * the byte offset is named), ST_ERR_MISSING (the model needs unk_token and it is not in the
 * vocab), ST_ERR_INTERNAL (regex engine failure), ST_ERR_LIMIT (text over 4 GiB after
 * normalization), ST_ERR_NOMEM; then *ids is NULL. */
int tok_encode(const tok_tokenizer *tok, const char *text, size_t len, int add_special,
               int32_t **ids, size_t *n_ids, st_err *err);

/* Decodes ids into text as HF's decode(ids, skip_special_tokens). Ids the tokenizer does not
 * know are skipped (as HF does). On success *text is a malloc'ed NUL-terminated string owned by
 * the caller and *len (may be NULL) its length. Fails only with ST_ERR_NOMEM / ST_ERR_INTERNAL. */
int tok_decode(const tok_tokenizer *tok, const int32_t *ids, size_t n_ids, int skip_special,
               char **text, size_t *len, st_err *err);

/* Id of a token given its vocabulary string (added tokens first, then the model vocab), e.g.
 * tok_token_id(tok, "<|im_end|>") for an EOS lookup; -1 if there is no such token. */
int32_t tok_token_id(const tok_tokenizer *tok, const char *piece);

/* The vocabulary string of id (byte-level form, e.g. "Ġworld"), borrowed from the tokenizer and
 * NUL-terminated; *len (may be NULL) gets its length. NULL if id is not a token. */
const char *tok_piece(const tok_tokenizer *tok, int32_t id, size_t *len);

/* One past the largest token id (model vocab and added tokens). */
int32_t tok_vocab_size(const tok_tokenizer *tok);

/* 1 if id is an added token marked "special" (skipped by skip_special decoding), else 0. */
int tok_is_special(const tok_tokenizer *tok, int32_t id);

/* ------------------------------------------------------------------------------------------ */
/* streaming detokenizer: push ids one at a time, get the newly completed text back           */

/* Emits text as soon as it is complete UTF-8, never splits a code point (a byte-level token may
 * carry half of a multi-byte character: its bytes wait for the rest), and replaces invalid byte
 * sequences with U+FFFD exactly where tok_decode would. The concatenation of every push and the
 * final flush equals tok_decode of all ids pushed. Not thread-safe (one stream per sequence).
 *
 * With a ByteLevel decoder (GPT-2, Llama 3, Qwen) the stream works on bytes: a character is
 * emitted with the token that completes it, an invalid sequence as soon as it is known to be
 * invalid. Other decoder chains run HF's DecodeStream scheme (decode a window of recent ids,
 * emit what grew); there a run of ByteFallback <0xXX> tokens is held until a non-byte token or
 * the flush ends it, because HF decodes such a run as a whole (one more invalid byte turns the
 * entire run into U+FFFDs). */
typedef struct tok_stream tok_stream;

/* Creates a stream over tok (borrowed: must outlive the stream). ST_ERR_NOMEM on failure. */
int tok_stream_init(tok_stream **out, const tok_tokenizer *tok, int skip_special, st_err *err);

/* Pushes one id. *text and *len receive the newly completed text (possibly empty, never NULL),
 * owned by the stream and valid until the next push/flush/free. Fails with ST_ERR_NOMEM, or
 * ST_ERR_INTERNAL if a non-byte-level decoder rewrote already emitted text. */
int tok_stream_push(tok_stream *s, int32_t id, const char **text, size_t *len, st_err *err);

/* Ends the sequence: returns the text still held back (an incomplete trailing UTF-8 sequence
 * becomes U+FFFD, as HF's lossy decoding does) and resets the stream for reuse. */
int tok_stream_flush(tok_stream *s, const char **text, size_t *len, st_err *err);

/* Releases the stream. NULL is a no-op. */
void tok_stream_free(tok_stream *s);

#ifdef __cplusplus
}
#endif
#endif
