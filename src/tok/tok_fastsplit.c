/* tok_fastsplit.c — hand-written matchers for the three pre-tokenizer regexes almost every
 * byte-level BPE uses, replacing Oniguruma's find_iter for them (onig_search costs a malloc and
 * a 5 KB stack copy per match: most of the encode time on prose).
 *
 *   GPT2    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   QWEN2   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 *           \s*[\r\n]+|\s+(?!\S)|\s+
 *   CL100K  the same with \p{N}{1,3} (Llama 3)
 *
 * Each matcher tries the alternatives in order at a position, resolving backtracking by hand,
 * exactly as a leftmost-first backtracking engine does. Every code point is matched by some
 * alternative, so the matches tile the string. The character classes come from Oniguruma's own
 * Unicode tables (the engine HF tokenizers embeds, same version), cached for the BMP, so the
 * classes cannot drift from the regex path. A matcher is used only when the pattern text is
 * exactly one of the above; tests/unit/test_tok.c checks it against Oniguruma on random text.
 */
#include "tok/tok_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum { C_L = 1, C_N = 2, C_S = 4 };

static uint8_t g_cls[0x10000];  /* class bits of every BMP code point */
static int g_ctype_l = -1, g_ctype_n = -1;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static const char k_gpt2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char k_qwen2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char k_cl100k[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Class bits of cp straight from Oniguruma's Unicode tables. */
static int onig_cls(uint32_t cp) {
    OnigEncoding enc = ONIG_ENCODING_UTF8;
    int c = 0;
    if (g_ctype_l >= 0 && ONIGENC_IS_CODE_CTYPE(enc, cp, (OnigCtype)g_ctype_l)) c |= C_L;
    if (g_ctype_n >= 0 && ONIGENC_IS_CODE_CTYPE(enc, cp, (OnigCtype)g_ctype_n)) c |= C_N;
    if (ONIGENC_IS_CODE_CTYPE(enc, cp, ONIGENC_CTYPE_SPACE)) c |= C_S;
    return c;
}

/* Fills g_cls from Oniguruma (once per process, under g_once). */
static void init_tables(void) {
    tok_onig_init();
    OnigEncoding enc = ONIG_ENCODING_UTF8;
    UChar l[] = "L", n[] = "N";
    g_ctype_l = ONIGENC_PROPERTY_NAME_TO_CTYPE(enc, l, l + 1);
    g_ctype_n = ONIGENC_PROPERTY_NAME_TO_CTYPE(enc, n, n + 1);
    if (g_ctype_l < 0 || g_ctype_n < 0) return; /* tok_fast_kind reports "no fast path" */
    /* from the range tables Oniguruma compiles \p{..} classes from (per code point otherwise) */
    const int ctypes[3] = {g_ctype_l, g_ctype_n, ONIGENC_CTYPE_SPACE};
    const uint8_t bits[3] = {C_L, C_N, C_S};
    for (int t = 0; t < 3; t++) {
        OnigCodePoint sb_out;
        const OnigCodePoint *ranges;
        if (ONIGENC_GET_CTYPE_CODE_RANGE(enc, (OnigCtype)ctypes[t], &sb_out, &ranges) != 0) {
            for (uint32_t cp = 0; cp < 0x10000; cp++)
                if (ONIGENC_IS_CODE_CTYPE(enc, cp, (OnigCtype)ctypes[t])) g_cls[cp] |= bits[t];
            continue;
        }
        for (OnigCodePoint r = 0; r < ranges[0]; r++)
            for (OnigCodePoint cp = ranges[1 + 2 * r]; cp <= ranges[2 + 2 * r] && cp < 0x10000; cp++)
                g_cls[cp] |= bits[t];
    }
}

/* See tok_internal.h (the first recognized pattern builds the class table). */
int tok_fast_kind(const char *pat, size_t len) {
    int kind = TOK_FAST_NONE;
    if (len == sizeof k_gpt2 - 1 && !memcmp(pat, k_gpt2, len)) kind = TOK_FAST_GPT2;
    else if (len == sizeof k_qwen2 - 1 && !memcmp(pat, k_qwen2, len)) kind = TOK_FAST_QWEN2;
    else if (len == sizeof k_cl100k - 1 && !memcmp(pat, k_cl100k, len)) kind = TOK_FAST_CL100K;
    if (kind == TOK_FAST_NONE) return kind;
    pthread_once(&g_once, init_tables);
    return g_ctype_l >= 0 && g_ctype_n >= 0 ? kind : TOK_FAST_NONE;
}

/* Decodes the code point at s[i] (valid UTF-8, i < n) and returns its class bits; *k gets its
 * byte length. */
static inline int cls_at(const unsigned char *s, size_t i, size_t *k, uint32_t *cpo) {
    uint32_t cp;
    if (s[i] < 0x80) {
        cp = s[i];
        *k = 1;
    } else {
        *k = (size_t)tok_utf8_next((const char *)s + i, &cp);
    }
    if (cpo) *cpo = cp;
    return cp < 0x10000 ? g_cls[cp] : onig_cls(cp);
}

/* End of the run of chars from i whose class satisfies (cls & mask) == want. */
static inline size_t run(const unsigned char *s, size_t n, size_t i, int mask, int want) {
    while (i < n) {
        size_t k;
        if ((cls_at(s, i, &k, NULL) & mask) != want) break;
        i += k;
    }
    return i;
}

/* "other": not \s, not L, not N. */
#define IS_P(c) (((c) & (C_L | C_N | C_S)) == 0)

/* The contraction alternatives at s[i] == '\''; 0 if none matches. ci: case-insensitive with
 * Unicode simple case folding (only U+017F LONG S folds onto one of these letters). */
static size_t contraction(const unsigned char *s, size_t n, size_t i, int ci) {
    if (i + 1 >= n) return 0;
    unsigned char a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
    if (ci) {
        if (a >= 'A' && a <= 'Z') a = (unsigned char)(a + 32);
        if (b >= 'A' && b <= 'Z') b = (unsigned char)(b + 32);
        if (s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return i + 3; /* 'ſ = 's */
    }
    switch (a) {
    case 's': case 't': case 'm': case 'd': return i + 2;
    case 'r': case 'v': return b == 'e' ? i + 3 : 0;
    case 'l': return b == 'l' ? i + 3 : 0;
    default: return 0;
    }
}

/* \s*[\r\n]+ | \s+(?!\S) | \s+ at i, where s[i] is \s: w is the end of the \s run. */
static size_t space_alts(const unsigned char *s, size_t n, size_t i, size_t w, int crlf) {
    if (crlf) { /* \s*[\r\n]+ : up to and including the last CR/LF of the run */
        size_t last = 0;
        int found = 0;
        for (size_t k = i; k < w; k++)
            if (s[k] == '\r' || s[k] == '\n') {
                last = k;
                found = 1;
            }
        if (found) return last + 1;
    }
    if (w == n) return w; /* \s+(?!\S) at the end of the string */
    /* \s+(?!\S): give back the last char of the run, if the run has two or more */
    size_t k = w - 1;
    while (k > i && (s[k] & 0xC0) == 0x80) k--;
    if (k > i) return k;
    return w; /* \s+ */
}

/* Length of the match at i (i < n) for the given pattern. */
static size_t match_at(int kind, const unsigned char *s, size_t n, size_t i) {
    size_t k;
    uint32_t cp;
    int c = cls_at(s, i, &k, &cp);
    if (kind == TOK_FAST_GPT2) {
        if (cp == '\'') {
            size_t e = contraction(s, n, i, 0);
            if (e) return e;
        }
        if (cp == ' ' && i + 1 < n) {
            size_t k2;
            int c2 = cls_at(s, i + 1, &k2, NULL);
            if (c2 & C_L) return run(s, n, i + 1, C_L, C_L);
            if (c2 & C_N) return run(s, n, i + 1, C_N, C_N);
            if (IS_P(c2)) return run(s, n, i + 1, C_L | C_N | C_S, 0);
        }
        if (c & C_L) return run(s, n, i, C_L, C_L);
        if (c & C_N) return run(s, n, i, C_N, C_N);
        if (IS_P(c)) return run(s, n, i, C_L | C_N | C_S, 0);
        return space_alts(s, n, i, run(s, n, i, C_S, C_S), 0);
    }
    /* QWEN2 / CL100K */
    if (cp == '\'') {
        size_t e = contraction(s, n, i, 1);
        if (e) return e;
    }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c & C_L) return run(s, n, i, C_L, C_L);
    if (!(c & C_N) && cp != '\r' && cp != '\n' && i + k < n) {
        size_t k2;
        if (cls_at(s, i + k, &k2, NULL) & C_L) return run(s, n, i + k, C_L, C_L);
    }
    /* \p{N} | \p{N}{1,3} */
    if (c & C_N) {
        size_t e = i + k;
        for (int m = 1; kind == TOK_FAST_CL100K && m < 3 && e < n; m++) {
            size_t k2;
            if (!(cls_at(s, e, &k2, NULL) & C_N)) break;
            e += k2;
        }
        return e;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t p = cp == ' ' ? i + 1 : i;
    if (p < n) {
        size_t k2;
        if (IS_P(cls_at(s, p, &k2, NULL))) {
            size_t e = run(s, n, p, C_L | C_N | C_S, 0);
            while (e < n && (s[e] == '\r' || s[e] == '\n')) e++;
            return e;
        }
    }
    return space_alts(s, n, i, run(s, n, i, C_S, C_S), 1);
}

/* See tok_internal.h: out is reused (grown as needed); ST_ERR_NOMEM on failure. */
int tok_fast_spans(int kind, const char *str, size_t len, tok_spans *out, st_err *err) {
    const unsigned char *s = (const unsigned char *)str;
    out->n = 0;
    for (size_t i = 0; i < len || (!len && !out->n);) {
        if (out->n == out->cap) {
            size_t cap = out->cap ? out->cap * 2 : 256;
            tok_span *v = realloc(out->v, cap * sizeof *v);
            if (!v) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
            out->v = v;
            out->cap = cap;
        }
        if (!len) { /* an empty string is one empty non-match, as HF's find_matches says */
            out->v[out->n++] = (tok_span){0, 0, 0};
            break;
        }
        size_t e = match_at(kind, s, len, i);
        ST_ASSERT(e > i && e <= len);
        out->v[out->n++] = (tok_span){(uint32_t)i, (uint32_t)e, 1};
        i = e;
    }
    return 0;
}
