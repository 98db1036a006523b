/* tok_internal.h — the tokenizer module's private types and helpers (see strata/tok.h).
 *
 * Files of the module:
 *   tok_json.c       a fast arena JSON parser (jansson needs ~450 ms for an 11 MB tokenizer.json)
 *   tok_util.c       byte buffers, UTF-8 (Rust-exact lossy decoding), Unicode predicates,
 *                    open-addressing hash maps, the Oniguruma wrapper (HF's SysRegex find_iter)
 *   tok_load.c       tokenizer.json -> the component structs below; tok_free, lookups
 *   tok_normalize.c  normalizers (utf8proc for NF*)
 *   tok_pretok.c     pre-tokenizers, HF's NormalizedString::split behaviours
 *   tok_fastsplit.c  hand-written matchers for the GPT-2 / Qwen2 / Llama 3 split regexes
 *   tok_bpe.c        the BPE model (HF's merge_word + Word::merge_all)
 *   tok_encode.c     added-token extraction, the encode pipeline, post-processors, tok_encode
 *   tok_decode.c     decoders, tok_decode, the streaming detokenizer
 *
 * Conventions: functions return 0 / ST_ERR_* and fill an st_err; strings parsed from JSON are
 * (ptr, len) views; every string the tokenizer keeps lives in its `pool` and is addressed by
 * offset (the pool may grow while loading). Sequences of components are flattened at load time
 * (applying [a, [b, c]] in order is applying a, b, c), so every pipeline is a flat step array.
 */
#ifndef STRATA_TOK_INTERNAL_H
#define STRATA_TOK_INTERNAL_H

#include "strata/tok.h"

#include <oniguruma.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* growable byte buffer                                                                       */

typedef struct tok_buf {
    char *p;     /* (cap,) owned; NULL while cap == 0 */
    size_t len;  /* bytes in use */
    size_t cap;
} tok_buf;

/* Makes room for `extra` more bytes (plus a NUL). 0 or ST_ERR_NOMEM; p may move. */
int tok_buf_reserve(tok_buf *b, size_t extra);
/* Appends n bytes (s must not point into b). 0 or ST_ERR_NOMEM. */
int tok_buf_append(tok_buf *b, const void *s, size_t n);
/* Appends code point cp as UTF-8. 0 or ST_ERR_NOMEM. */
int tok_buf_append_cp(tok_buf *b, uint32_t cp);
/* Releases the storage; b is empty and reusable afterwards. */
void tok_buf_free(tok_buf *b);

/* A growable int32 array (token ids). */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;

/* Appends n ids. 0 or ST_ERR_NOMEM. */
int tok_ids_append(tok_ids *a, const int32_t *ids, size_t n);

/* ------------------------------------------------------------------------------------------ */
/* UTF-8 and Unicode                                                                          */

/* Decodes the code point at s (which must be valid UTF-8 with at least one byte); returns its
 * byte length (1..4). */
int tok_utf8_next(const char *s, uint32_t *cp);
/* Byte length of the UTF-8 sequence whose lead byte is c (1 for continuation bytes). */
static inline int tok_utf8_len(unsigned char c) {
    return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}
/* Encodes cp (<= 0x10FFFF) into out; returns the byte count. */
int tok_utf8_put(uint32_t cp, char out[4]);

/* Rust's UTF-8 validation step at s[0..n), n >= 1. Returns TOK_UTF8_OK (a valid character of
 * *adv bytes), TOK_UTF8_BAD (an invalid sequence of *adv bytes: one U+FFFD in lossy decoding),
 * or TOK_UTF8_SHORT (the n bytes are a proper prefix of a valid sequence: more input needed). */
enum { TOK_UTF8_OK = 0, TOK_UTF8_BAD = 1, TOK_UTF8_SHORT = 2 };
int tok_utf8_step(const unsigned char *s, size_t n, size_t *adv);

/* Offset of the first invalid UTF-8 byte in s[0..n), or n if s is valid. */
size_t tok_utf8_check(const char *s, size_t n);

/* String::from_utf8_lossy of s[0..n) appended to out. If !final, stops before a trailing
 * incomplete sequence and returns how many bytes were consumed (final: always n).
 * ST_ERR_NOMEM is reported as (size_t)-1. */
size_t tok_utf8_lossy(tok_buf *out, const char *s, size_t n, int final);

/* Rust char predicates. */
int tok_uni_is_whitespace(uint32_t cp);  /* char::is_whitespace (White_Space)            */
int tok_uni_is_numeric(uint32_t cp);     /* char::is_numeric (Nd, Nl, No)                */
int tok_uni_is_punct(uint32_t cp);       /* is_ascii_punctuation || Unicode P*           */
int tok_uni_is_mark(uint32_t cp);        /* Mn, Mc, Me (StripAccents)                    */

/* The GPT-2 byte <-> unicode table: bytes printable in Latin-1 map to themselves, the other 68
 * to U+0100.. in byte order. */
extern const uint16_t tok_byte_to_cp[256];
/* Byte of a byte-level code point, or -1 if cp is not one. */
int tok_cp_to_byte(uint32_t cp);

/* ------------------------------------------------------------------------------------------ */
/* hash maps                                                                                  */

/* String -> int32 map, open addressing; keys are (off, len) in an external pool. */
typedef struct tok_smap_slot {
    uint32_t hash;  /* 0 = empty (hashes are forced non-zero) */
    int32_t val;
    uint32_t off;   /* key bytes at pool + off */
    uint32_t len;
} tok_smap_slot;

typedef struct tok_smap {
    tok_smap_slot *slots;  /* (mask + 1,) */
    uint32_t mask;
    uint32_t n;
} tok_smap;

uint32_t tok_hash(const char *s, size_t len);
/* Sizes the map for n keys. 0 or ST_ERR_NOMEM. */
int tok_smap_init(tok_smap *m, size_t n);
void tok_smap_free(tok_smap *m);
/* Inserts or overwrites key pool[off..off+len) -> val (the key is read through pool). Grows as
 * needed. 0 or ST_ERR_NOMEM. */
int tok_smap_put(tok_smap *m, const char *pool, uint32_t off, uint32_t len, int32_t val);
/* Value of key s[0..len), or -1. */
int32_t tok_smap_get(const tok_smap *m, const char *pool, const char *s, size_t len);

/* Looks up n keys at once, software-pipelined so their cache misses overlap (loading a 150k
 * entry vocab is memory-latency bound otherwise): out[i] = value of keys[i] or -1.
 * hashes is (n,) scratch. */
void tok_smap_get_batch(const tok_smap *m, const char *pool, const char *const *keys,
                        const uint32_t *lens, size_t n, uint32_t *hashes, int32_t *out);
/* Inserts n keys (pool offsets offs[i], lengths lens[i]) with values vals[i], pipelined the
 * same way. 0 or ST_ERR_NOMEM. */
int tok_smap_put_batch(tok_smap *m, const char *pool, const uint32_t *offs, const uint32_t *lens,
                       const int32_t *vals, size_t n);

/* (id, id) -> (rank, new id) map for BPE merges. */
typedef struct tok_pmap_slot {
    uint64_t key;   /* a << 32 | b; UINT64_MAX = empty */
    uint32_t rank;
    int32_t new_id;
} tok_pmap_slot;

typedef struct tok_pmap {
    tok_pmap_slot *slots;
    uint32_t mask;
    uint32_t n;
} tok_pmap;

int tok_pmap_init(tok_pmap *m, size_t n);
void tok_pmap_free(tok_pmap *m);
/* Inserts or overwrites (a, b). 0 or ST_ERR_NOMEM. */
int tok_pmap_put(tok_pmap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id);
/* tok_pmap_put for n entries, pipelined (see tok_smap_get_batch). 0 or ST_ERR_NOMEM. */
int tok_pmap_put_batch(tok_pmap *m, const int32_t *a, const int32_t *b, const uint32_t *rank,
                       const int32_t *new_id, size_t n);

/* Starts loading the home slot of (a, b) into the cache. */
static inline void tok_pmap_prefetch(const tok_pmap *m, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    __builtin_prefetch(&m->slots[(uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & m->mask]);
}

static inline const tok_pmap_slot *tok_pmap_get(const tok_pmap *m, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & m->mask;
    for (;;) {
        const tok_pmap_slot *s = &m->slots[i];
        if (s->key == key) return s;
        if (s->key == UINT64_MAX) return NULL;
        i = (i + 1) & m->mask;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* regular expressions (HF's SysRegex = Oniguruma, ONIG_SYNTAX_DEFAULT, ONIG_OPTION_NONE)      */

/* Initializes Oniguruma for UTF-8 once per process (thread-safe). */
void tok_onig_init(void);
/* Compiles pat[0..len) (UTF-8). On failure ST_ERR_FORMAT naming `where`. */
int tok_regex_new(regex_t **out, const char *pat, size_t len, const char *where, st_err *err);
/* Compiles a literal string as HF's Split/Replace `{"String": s}` does (regex::escape(s)). */
int tok_regex_new_literal(regex_t **out, const char *s, size_t len, const char *where,
                          st_err *err);

/* One piece of a pattern's find_matches: [start, end) and whether it is a match. */
typedef struct tok_span {
    uint32_t start, end;
    uint8_t match;
} tok_span;

typedef struct tok_spans {
    tok_span *v;
    size_t n, cap;
} tok_spans;

/* HF's `impl Pattern for &SysRegex`: the onig crate's find_iter over s[0..len), as spans that
 * cover the whole string (an empty string gives one empty non-match). region is scratch.
 * 0, ST_ERR_NOMEM or ST_ERR_INTERNAL (search failure). */
int tok_regex_spans(regex_t *re, OnigRegion *region, const char *s, size_t len,
                    tok_spans *out, st_err *err);

/* Hand-written matchers for the standard pre-tokenizer regexes (tok_fastsplit.c). */
enum { TOK_FAST_NONE = 0, TOK_FAST_GPT2, TOK_FAST_QWEN2, TOK_FAST_CL100K };
/* Which matcher implements the regex pat[0..len) exactly; TOK_FAST_NONE if none. */
int tok_fast_kind(const char *pat, size_t len);
/* Same contract as tok_regex_spans, for a pattern tok_fast_kind recognized. */
int tok_fast_spans(int kind, const char *s, size_t len, tok_spans *out, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* components                                                                                  */

enum tok_norm_type {
    TOK_NORM_NFC, TOK_NORM_NFD, TOK_NORM_NFKC, TOK_NORM_NFKD, TOK_NORM_LOWERCASE,
    TOK_NORM_REPLACE, TOK_NORM_PREPEND, TOK_NORM_STRIP, TOK_NORM_STRIP_ACCENTS,
    TOK_NORM_BYTE_LEVEL,
};

typedef struct tok_norm {
    int type;            /* enum tok_norm_type */
    regex_t *re;         /* Replace: the pattern (owned) */
    uint32_t str_off;    /* Replace: content / Prepend: prefix, in the pool */
    uint32_t str_len;
    uint8_t left, right; /* Strip */
} tok_norm;

enum tok_behavior {
    TOK_SPLIT_REMOVED, TOK_SPLIT_ISOLATED, TOK_SPLIT_MERGED_PREV, TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS,
};

enum tok_pre_type {
    TOK_PRE_SPLIT, TOK_PRE_BYTE_LEVEL, TOK_PRE_DIGITS, TOK_PRE_METASPACE,
    TOK_PRE_WHITESPACE_SPLIT, TOK_PRE_PUNCTUATION, TOK_PRE_CHAR_DELIMITER,
    TOK_PRE_BERT,
};
/* (Whitespace is loaded as Split(\w+|[^\w\s]+, Removed, invert).) */

enum tok_prepend { TOK_PREPEND_ALWAYS, TOK_PREPEND_NEVER, TOK_PREPEND_FIRST };

typedef struct tok_pre {
    int type;               /* enum tok_pre_type */
    regex_t *re;            /* Split, ByteLevel with use_regex (owned) */
    uint8_t fast;           /* TOK_FAST_*: a hand-written matcher for re */
    uint8_t behavior;       /* Split, Punctuation: enum tok_behavior */
    uint8_t invert;         /* Split */
    uint8_t add_prefix_space; /* ByteLevel */
    uint8_t individual_digits; /* Digits */
    uint8_t prepend_scheme; /* Metaspace: enum tok_prepend */
    uint8_t split;          /* Metaspace */
    uint32_t ch;            /* Metaspace replacement, CharDelimiterSplit delimiter */
} tok_pre;

enum tok_post_type { TOK_POST_TEMPLATE, TOK_POST_PAIR_SPECIAL };

/* A post-processor reduced to what it does to one sequence's ids: TemplateProcessing's single
 * template (tmpl[i] >= 0: a special token id, TOK_TMPL_SEQ: the sequence; specials only with
 * add_special), or Bert/Roberta's cls + A + sep (only with add_special). ByteLevel post-
 * processing changes offsets only and is dropped at load time. */
#define TOK_TMPL_SEQ (-1)
typedef struct tok_post {
    int type;          /* enum tok_post_type */
    int32_t *tmpl;     /* (n_tmpl,) owned */
    size_t n_tmpl;
    int32_t cls, sep;  /* TOK_POST_PAIR_SPECIAL */
} tok_post;

enum tok_dec_type {
    TOK_DEC_BYTE_LEVEL, TOK_DEC_REPLACE, TOK_DEC_BYTE_FALLBACK, TOK_DEC_FUSE, TOK_DEC_STRIP,
    TOK_DEC_METASPACE,
};

typedef struct tok_dec {
    int type;           /* enum tok_dec_type */
    regex_t *re;        /* Replace (owned) */
    uint32_t str_off;   /* Replace content in the pool */
    uint32_t str_len;
    uint32_t ch;        /* Strip content, Metaspace replacement */
    uint32_t start, stop; /* Strip */
    uint8_t prepend_scheme; /* Metaspace */
} tok_dec;

/* An added token (added_tokens[] in tokenizer.json). */
typedef struct tok_added {
    uint32_t off, len;        /* content in the pool */
    uint32_t norm_off, norm_len; /* normalized content (normalized=true and a normalizer) */
    int32_t id;
    uint8_t special, lstrip, rstrip, normalized, single_word;
} tok_added;

/* Leftmost-longest matcher over a set of added tokens (aho-corasick MatchKind::LeftmostLongest
 * semantics): candidates bucketed by first byte, longest first. */
typedef struct tok_match {
    uint32_t *idx;          /* (n,) indices into tok->added, sorted by (first byte, -len, order) */
    uint32_t n;
    uint32_t first[257];    /* idx[first[b] .. first[b+1]) start with byte b */
    uint8_t use_norm;       /* match the normalized contents */
} tok_match;

#define TOK_ID_ADDED 1u
#define TOK_ID_SPECIAL 2u

struct tok_tokenizer {
    char name[256];          /* file name for messages */
    tok_buf pool;            /* every string the tokenizer keeps (NUL-terminated pieces) */

    /* ids */
    int32_t n_ids;           /* one past the largest id */
    int32_t ids_cap;         /* allocated entries of the three arrays below */
    uint32_t *piece_off;     /* (n_ids,) pool offset of the id's decode string; UINT32_MAX: none */
    uint32_t *piece_len;     /* (n_ids,) */
    uint8_t *id_flags;       /* (n_ids,) TOK_ID_* */

    /* BPE model */
    tok_smap vocab;          /* model vocab piece -> id */
    tok_pmap merges;         /* (left id, right id) -> (rank, merged id) */
    uint8_t ignore_merges, byte_fallback, fuse_unk;
    uint8_t has_prefix, has_suffix;
    int32_t unk_id;          /* -1: no unk_token (unknown characters are dropped, as HF does) */
    uint8_t unk_missing;     /* unk_token named but not in the vocab: encode fails when needed */
    uint32_t prefix_off, prefix_len;  /* continuing_subword_prefix */
    uint32_t suffix_off, suffix_len;  /* end_of_word_suffix */
    int32_t byte_tok[256];   /* id of "<0xXX>" (byte_fallback), -1 if absent */
    int32_t *char_id;        /* (0x800,) id of the vocab piece that is exactly code point cp (no
                                prefix/suffix); -1 none: the merge_word fast path */

    /* added tokens */
    tok_added *added;        /* (n_added,) */
    size_t n_added;
    tok_smap added_map;      /* content -> id */
    tok_match match_raw;     /* normalized=false tokens, matched in the raw text */
    tok_match match_norm;    /* normalized=true tokens, matched in the normalized text */

    /* pipeline (flattened) */
    uint8_t has_normalizer;
    tok_norm *norm; size_t n_norm;
    tok_pre *pre; size_t n_pre;
    tok_post *post; size_t n_post;
    uint8_t has_decoder;
    tok_dec *dec; size_t n_dec;
    uint8_t bytelevel_only_decoder; /* decoder is exactly ByteLevel: streaming by bytes */
};

/* ------------------------------------------------------------------------------------------ */
/* encode pipeline                                                                             */

/* A piece of text on its way through the pipeline (HF's Split of a PreTokenizedString). */
typedef struct tok_split {
    uint32_t off, len;  /* bytes in ctx->text */
    int32_t id;         /* an added token's id (already tokenized), or -1 */
    uint8_t first;      /* starts at original offset 0 (Metaspace prepend_scheme "first") */
} tok_split;

typedef struct tok_splits {
    tok_split *v;
    size_t n, cap;
} tok_splits;

int tok_splits_push(tok_splits *s, uint32_t off, uint32_t len, int32_t id, uint8_t first);

/* Per-call scratch of one encode (a tokenizer is shared between threads; this is not). */
typedef struct tok_ctx {
    const tok_tokenizer *tok;
    st_err *err;
    tok_buf text;          /* append-only storage of every split string of the current piece */
    tok_buf nbuf[2];       /* normalizer ping-pong */
    tok_splits sa, sb;     /* pre-tokenizer ping-pong */
    tok_spans spans;       /* pattern matches */
    OnigRegion *region;
    tok_ids out;           /* the encoding's ids */
    /* BPE scratch */
    void *syms; size_t syms_cap;
    void *heap; size_t heap_cap;
    /* word cache: word bytes -> ids, for this call */
    tok_buf cache_keys;
    tok_ids cache_ids;
    struct tok_cache_slot *cache; uint32_t cache_mask; uint32_t cache_n;
} tok_ctx;

/* Runs the normalizer steps on s[0..len) (s must not point into c->nbuf); *out and *out_len get the
 * result (pointing into c->nbuf or at s when there is nothing to do). */
int tok_normalize(tok_ctx *c, const char *s, size_t len, const char **out, size_t *out_len);
/* Normalizes with an explicit step array into out (used at load time for added tokens). */
int tok_normalize_string(const tok_tokenizer *tok, const char *s, size_t len, tok_buf *out,
                         st_err *err);

/* Applies every pre-tokenizer step to the splits in c->sa (result in c->sa). */
int tok_pretokenize(tok_ctx *c);

/* BPE-encodes word[0..len) (a pre-tokenized split) and appends its ids to c->out. */
int tok_bpe_word(tok_ctx *c, const char *word, size_t len);
void tok_bpe_ctx_free(tok_ctx *c);

/* ------------------------------------------------------------------------------------------ */
/* load helpers shared between files                                                          */

/* Appends s[0..len) + NUL to the pool; *off gets its offset. 0 or ST_ERR_NOMEM. */
int tok_pool_add(tok_tokenizer *tok, const char *s, size_t len, uint32_t *off);

/* Frees the step arrays (regexes included). */
void tok_norms_free(tok_norm *v, size_t n);
void tok_pres_free(tok_pre *v, size_t n);
void tok_decs_free(tok_dec *v, size_t n);

#endif
