/* tok_normalize.c — HF normalizers on plain strings (see tok_internal.h).
 *
 * strata only needs ids, so a NormalizedString's alignments are not tracked: each step maps a
 * string to a new string. Unicode normalization forms come from utf8proc (same algorithm as the
 * unicode-normalization crate HF uses); lowercasing is Rust's char::to_lowercase, i.e. the
 * simple mapping plus U+0130 -> "i\u0307".
 */
#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* Scratch a step needs besides its input and output. */
typedef struct norm_env {
    const tok_tokenizer *tok;
    OnigRegion *region;
    tok_spans *spans;
    st_err *err;
} norm_env;

/* 1 if s[0..len) is all ASCII. */
static int is_ascii(const char *s, size_t len) {
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ull) return 0;
    }
    for (; i < len; i++)
        if ((unsigned char)s[i] >= 0x80) return 0;
    return 1;
}

/* Reports an allocation failure while normalizing. */
static int nomem(norm_env *e) { return st_err_set(e->err, ST_ERR_NOMEM, "out of memory normalizing"); }

/* Applies step n to s[0..len) into o (emptied first). Returns 0, 1 when the string is unchanged
 * (o untouched), or an error. */
static int norm_step(norm_env *e, const tok_norm *n, const char *s, size_t len, tok_buf *o) {
    o->len = 0;
    switch (n->type) {
    case TOK_NORM_NFC:
    case TOK_NORM_NFD:
    case TOK_NORM_NFKC:
    case TOK_NORM_NFKD: {
        if (is_ascii(s, len)) return 1; /* every NF* form of ASCII is itself */
        int opt = UTF8PROC_STABLE;
        opt |= (n->type == TOK_NORM_NFC || n->type == TOK_NORM_NFKC) ? UTF8PROC_COMPOSE
                                                                     : UTF8PROC_DECOMPOSE;
        if (n->type == TOK_NORM_NFKC || n->type == TOK_NORM_NFKD) opt |= UTF8PROC_COMPAT;
        if (tok_buf_reserve(o, len)) return nomem(e);
        /* An ASCII character is a starter that nothing composes into from the left, so the
         * string can be cut before every ASCII byte and normalized piecewise: only the
         * stretches from the ASCII char before a non-ASCII run to the next ASCII char go
         * through utf8proc (prose is mostly ASCII). */
        size_t i = 0;
        while (i < len) {
            size_t j = i;
            while (j < len && (unsigned char)s[j] < 0x80) j++;
            if (j == len) {
                if (tok_buf_append(o, s + i, len - i)) return nomem(e);
                break;
            }
            size_t a = j > i ? j - 1 : j, b = j;
            while (b < len && (unsigned char)s[b] >= 0x80) b++;
            if (tok_buf_append(o, s + i, a - i)) return nomem(e);
            utf8proc_uint8_t *dst = NULL;
            utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s + a,
                                              (utf8proc_ssize_t)(b - a), &dst,
                                              (utf8proc_option_t)opt);
            if (r < 0) {
                free(dst);
                if (r == UTF8PROC_ERROR_NOMEM) return nomem(e);
                return st_err_set(e->err, ST_ERR_INTERNAL, "utf8proc: %s", utf8proc_errmsg(r));
            }
            int rc = tok_buf_append(o, dst, (size_t)r);
            free(dst);
            if (rc) return nomem(e);
            i = b;
        }
        return 0;
    }
    case TOK_NORM_LOWERCASE: {
        if (tok_buf_reserve(o, len)) return nomem(e);
        for (size_t i = 0; i < len;) {
            unsigned char c = (unsigned char)s[i];
            if (c < 0x80) {
                o->p[o->len++] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
                i++;
                continue;
            }
            uint32_t cp;
            i += (size_t)tok_utf8_next(s + i, &cp);
            int rc;
            if (cp == 0x130) /* the one multi-char lowercase mapping */
                rc = tok_buf_append(o, "i\xCC\x87", 3);
            else
                rc = tok_buf_append_cp(o, (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp));
            if (rc) return nomem(e);
        }
        o->p[o->len] = 0;
        return 0;
    }
    case TOK_NORM_REPLACE: {
        int rc = tok_regex_spans(n->re, e->region, s, len, e->spans, e->err);
        if (rc) return rc;
        const char *content = e->tok->pool.p + n->str_off;
        for (size_t i = 0; i < e->spans->n; i++) {
            const tok_span *sp = &e->spans->v[i];
            if (sp->match ? tok_buf_append(o, content, n->str_len)
                          : tok_buf_append(o, s + sp->start, sp->end - sp->start))
                return nomem(e);
        }
        return 0;
    }
    case TOK_NORM_PREPEND:
        if (!len) return 1;
        if (tok_buf_append(o, e->tok->pool.p + n->str_off, n->str_len) ||
            tok_buf_append(o, s, len))
            return nomem(e);
        return 0;
    case TOK_NORM_STRIP: {
        size_t a = 0, b = len;
        if (n->left)
            while (a < b) {
                uint32_t cp;
                int k = tok_utf8_next(s + a, &cp);
                if (!tok_uni_is_whitespace(cp)) break;
                a += (size_t)k;
            }
        if (n->right)
            while (b > a) {
                size_t k = b - 1;
                while (k > a && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
                uint32_t cp;
                tok_utf8_next(s + k, &cp);
                if (!tok_uni_is_whitespace(cp)) break;
                b = k;
            }
        if (a == 0 && b == len) return 1;
        return tok_buf_append(o, s + a, b - a) ? nomem(e) : 0;
    }
    case TOK_NORM_STRIP_ACCENTS:
        if (is_ascii(s, len)) return 1;
        for (size_t i = 0; i < len;) {
            uint32_t cp;
            int k = tok_utf8_next(s + i, &cp);
            if (!tok_uni_is_mark(cp) && tok_buf_append(o, s + i, (size_t)k)) return nomem(e);
            i += (size_t)k;
        }
        return 0;
    case TOK_NORM_BYTE_LEVEL:
        if (tok_buf_reserve(o, len * 2)) return nomem(e);
        for (size_t i = 0; i < len; i++)
            o->len += (size_t)tok_utf8_put(tok_byte_to_cp[(unsigned char)s[i]], o->p + o->len);
        o->p[o->len] = 0;
        return 0;
    default:
        ST_ASSERT(0 && "unknown normalizer step");
    }
}

/* Runs every step; the result is in bufs[k] or is the input itself. */
static int norm_run(norm_env *e, tok_buf bufs[2], const char *s, size_t len, const char **out,
                    size_t *out_len) {
    const tok_tokenizer *tok = e->tok;
    int cur = -1; /* which buffer holds the current string (-1: the input) */
    for (size_t i = 0; i < tok->n_norm; i++) {
        int next = cur == 0 ? 1 : 0;
        int rc = norm_step(e, &tok->norm[i], s, len, &bufs[next]);
        if (rc < 0) return rc;
        if (rc == 1) continue;
        cur = next;
        s = bufs[cur].p ? bufs[cur].p : "";
        len = bufs[cur].len;
    }
    *out = s;
    *out_len = len;
    return 0;
}

/* See tok_internal.h: *out borrows c->nbuf (valid until the next call) or s. */
int tok_normalize(tok_ctx *c, const char *s, size_t len, const char **out, size_t *out_len) {
    norm_env e = {c->tok, c->region, &c->spans, c->err};
    return norm_run(&e, c->nbuf, s, len, out, out_len);
}

/* See tok_internal.h: the result replaces out's content. */
int tok_normalize_string(const tok_tokenizer *tok, const char *s, size_t len, tok_buf *out,
                         st_err *err) {
    tok_buf bufs[2] = {{0}, {0}};
    tok_spans spans = {0};
    OnigRegion *region = onig_region_new();
    if (!region) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    norm_env e = {tok, region, &spans, err};
    const char *r;
    size_t rlen;
    int rc = norm_run(&e, bufs, s, len, &r, &rlen);
    if (!rc) {
        out->len = 0;
        if (tok_buf_append(out, r, rlen)) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    onig_region_free(region, 1);
    free(spans.v);
    tok_buf_free(&bufs[0]);
    tok_buf_free(&bufs[1]);
    return rc;
}
