/* tok_pretok.c — HF pre-tokenizers over a list of splits (see tok_internal.h).
 *
 * Each step maps every split that is not already a token (added tokens are) to sub-splits,
 * dropping empty ones, exactly as PreTokenizedString::split does. Splitting follows
 * NormalizedString::split: a pattern yields spans covering the string, flagged match / no match
 * (regex: the onig crate's find_iter; char predicate: one span per matching char), and the
 * SplitDelimiterBehavior decides which spans are kept, merged or removed. New strings (prefix
 * space, byte-level mapping, Metaspace replacement) are appended to ctx->text; plain splits are
 * just (offset, length) views into it.
 */
#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>

/* Reports an allocation failure while pre-tokenizing. */
static int nomem(tok_ctx *c) { return st_err_set(c->err, ST_ERR_NOMEM, "out of memory pre-tokenizing"); }

/* Appends s[0..len) to ctx->text (s may point into it); *off gets the new offset. */
static int text_add(tok_ctx *c, const char *s, size_t len, uint32_t *off) {
    int inside = c->text.p && s >= c->text.p && s < c->text.p + c->text.len;
    size_t from = inside ? (size_t)(s - c->text.p) : 0;
    if (c->text.len + len > UINT32_MAX)
        return st_err_set(c->err, ST_ERR_LIMIT, "text too long to tokenize");
    if (tok_buf_reserve(&c->text, len)) return nomem(c);
    if (inside) s = c->text.p + from;
    *off = (uint32_t)c->text.len;
    memmove(c->text.p + c->text.len, s, len);
    c->text.len += len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* patterns and behaviours                                                                    */

typedef int (*char_pred)(uint32_t cp, uint32_t arg);

/* Char predicates for pred_spans (arg: the char for pred_eq). */
static int pred_numeric(uint32_t cp, uint32_t arg) { (void)arg; return tok_uni_is_numeric(cp); }
static int pred_ws(uint32_t cp, uint32_t arg) { (void)arg; return tok_uni_is_whitespace(cp); }
static int pred_punct(uint32_t cp, uint32_t arg) { (void)arg; return tok_uni_is_punct(cp); }
static int pred_eq(uint32_t cp, uint32_t arg) { return cp == arg; }

/* Appends span [a, b). 0 or ST_ERR_NOMEM (reported). */
static int spans_add(tok_ctx *c, tok_spans *o, size_t a, size_t b, int match) {
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        tok_span *v = realloc(o->v, cap * sizeof *v);
        if (!v) return nomem(c);
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = (tok_span){(uint32_t)a, (uint32_t)b, (uint8_t)match};
    return 0;
}

/* `impl Pattern for F: Fn(char) -> bool`: every matching char is a match span. */
static int pred_spans(tok_ctx *c, const char *s, size_t len, char_pred pred, uint32_t arg,
                      tok_spans *o) {
    o->n = 0;
    if (!len) return spans_add(c, o, 0, 0, 0);
    size_t last = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t k = (size_t)tok_utf8_next(s + i, &cp);
        if (pred(cp, arg)) {
            if (last < i && spans_add(c, o, last, i, 0)) return ST_ERR_NOMEM;
            if (spans_add(c, o, i, i + k, 1)) return ST_ERR_NOMEM;
            last = i + k;
        }
        i += k;
    }
    if (last < len && spans_add(c, o, last, len, 0)) return ST_ERR_NOMEM;
    return 0;
}

/* NormalizedString::split's behaviours: pushes the kept, non-empty pieces of `parent` (spans
 * relative to its start) onto out. */
static int split_by(tok_ctx *c, const tok_split *parent, tok_spans *sp, int behavior, int invert,
                    tok_splits *out) {
    if (invert)
        for (size_t i = 0; i < sp->n; i++) sp->v[i].match = !sp->v[i].match;
    /* reduce the spans in place to (start, end, match = "remove") */
    size_t n = 0;
    switch (behavior) {
    case TOK_SPLIT_ISOLATED:
        for (size_t i = 0; i < sp->n; i++) sp->v[i].match = 0;
        n = sp->n;
        break;
    case TOK_SPLIT_REMOVED:
        n = sp->n;
        break;
    case TOK_SPLIT_CONTIGUOUS: {
        int prev = 0;
        for (size_t i = 0; i < sp->n; i++) {
            tok_span s = sp->v[i];
            if (s.match == prev && n) sp->v[n - 1].end = s.end;
            else sp->v[n++] = (tok_span){s.start, s.end, 0};
            prev = s.match;
        }
        break;
    }
    case TOK_SPLIT_MERGED_PREV: {
        int prev = 0;
        for (size_t i = 0; i < sp->n; i++) {
            tok_span s = sp->v[i];
            if (s.match && !prev && n) sp->v[n - 1].end = s.end;
            else sp->v[n++] = (tok_span){s.start, s.end, 0};
            prev = s.match;
        }
        break;
    }
    case TOK_SPLIT_MERGED_NEXT: {
        /* right to left, building the result at the end of the array, then shifting it down */
        int prev = 0;
        size_t w = sp->n; /* result occupies v[w..sp->n) */
        for (size_t i = sp->n; i-- > 0;) {
            tok_span s = sp->v[i];
            if (s.match && !prev && w < sp->n) sp->v[w].start = s.start;
            else sp->v[--w] = (tok_span){s.start, s.end, 0};
            prev = s.match;
        }
        n = sp->n - w;
        memmove(sp->v, sp->v + w, n * sizeof *sp->v);
        break;
    }
    default:
        ST_ASSERT(0 && "unknown split behavior");
    }
    for (size_t i = 0; i < n; i++) {
        tok_span s = sp->v[i];
        if (s.match || s.end == s.start) continue;
        if (tok_splits_push(out, parent->off + s.start, s.end - s.start, -1,
                            (uint8_t)(parent->first && s.start == 0)))
            return nomem(c);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* steps                                                                                      */

/* Maps every byte of the split to its GPT-2 byte-level character (a new string). */
static int byte_level_map(tok_ctx *c, const tok_split *in, tok_splits *out) {
    if (tok_buf_reserve(&c->text, (size_t)in->len * 2)) return nomem(c);
    if (c->text.len + (size_t)in->len * 2 > UINT32_MAX)
        return st_err_set(c->err, ST_ERR_LIMIT, "text too long to tokenize");
    const unsigned char *s = (const unsigned char *)c->text.p + in->off;
    char *o = c->text.p + c->text.len;
    uint32_t off = (uint32_t)c->text.len;
    for (uint32_t i = 0; i < in->len; i++) {
        uint32_t cp = tok_byte_to_cp[s[i]];
        if (cp < 0x80) {
            *o++ = (char)cp;
        } else {
            *o++ = (char)(0xC0 | cp >> 6);
            *o++ = (char)(0x80 | (cp & 0x3F));
        }
    }
    uint32_t len = (uint32_t)(o - (c->text.p + off));
    c->text.len += len;
    return tok_splits_push(out, off, len, -1, in->first) ? nomem(c) : 0;
}

/* ByteLevel: prefix space, GPT-2 regex split (use_regex), byte -> character mapping. */
static int step_byte_level(tok_ctx *c, const tok_pre *p, const tok_split *in, tok_splits *out) {
    tok_split cur = *in;
    if (p->add_prefix_space && (cur.len == 0 || c->text.p[cur.off] != ' ')) {
        uint32_t off, dummy;
        if (text_add(c, " ", 1, &off) || text_add(c, c->text.p + cur.off, cur.len, &dummy))
            return ST_ERR_NOMEM;
        cur.off = off;
        cur.len += 1;
    }
    if (!p->re) return byte_level_map(c, &cur, out);
    int rc = p->fast ? tok_fast_spans(p->fast, c->text.p + cur.off, cur.len, &c->spans, c->err)
                     : tok_regex_spans(p->re, c->region, c->text.p + cur.off, cur.len, &c->spans,
                                       c->err);
    if (rc) return rc;
    tok_splits tmp = {0};
    rc = split_by(c, &cur, &c->spans, TOK_SPLIT_ISOLATED, 0, &tmp);
    for (size_t i = 0; !rc && i < tmp.n; i++) rc = byte_level_map(c, &tmp.v[i], out);
    free(tmp.v);
    return rc;
}

/* Metaspace: spaces -> replacement, prepend per scheme, split before each replacement. */
static int step_metaspace(tok_ctx *c, const tok_pre *p, const tok_split *in, tok_splits *out) {
    char rep[4];
    size_t rl = (size_t)tok_utf8_put(p->ch, rep);
    tok_split cur = *in;
    /* replace ' ' with the replacement (a new string when there is a space) */
    if (memchr(c->text.p + cur.off, ' ', cur.len)) {
        uint32_t off = (uint32_t)c->text.len, n = 0;
        for (uint32_t i = 0; i < cur.len; i++) {
            uint32_t dummy;
            char ch = c->text.p[cur.off + i];
            if (ch == ' ' ? text_add(c, rep, rl, &dummy) : text_add(c, &ch, 1, &dummy))
                return ST_ERR_NOMEM;
            n += ch == ' ' ? (uint32_t)rl : 1;
        }
        cur.off = off;
        cur.len = n;
    }
    int starts = cur.len >= rl && !memcmp(c->text.p + cur.off, rep, rl);
    if (!starts && (p->prepend_scheme == TOK_PREPEND_ALWAYS ||
                    (p->prepend_scheme == TOK_PREPEND_FIRST && cur.first))) {
        uint32_t off, dummy;
        if (text_add(c, rep, rl, &off) || text_add(c, c->text.p + cur.off, cur.len, &dummy))
            return ST_ERR_NOMEM;
        cur.off = off;
        cur.len += (uint32_t)rl;
    }
    if (!p->split) {
        if (!cur.len) return 0;
        return tok_splits_push(out, cur.off, cur.len, -1, cur.first) ? nomem(c) : 0;
    }
    if (pred_spans(c, c->text.p + cur.off, cur.len, pred_eq, p->ch, &c->spans)) return ST_ERR_NOMEM;
    return split_by(c, &cur, &c->spans, TOK_SPLIT_MERGED_NEXT, 0, out);
}

/* Applies pre-tokenizer step p to one split. */
static int pre_step(tok_ctx *c, const tok_pre *p, const tok_split *in, tok_splits *out) {
    const char *s = c->text.p + in->off;
    int rc;
    switch (p->type) {
    case TOK_PRE_SPLIT:
        rc = p->fast ? tok_fast_spans(p->fast, s, in->len, &c->spans, c->err)
                     : tok_regex_spans(p->re, c->region, s, in->len, &c->spans, c->err);
        if (rc) return rc;
        return split_by(c, in, &c->spans, p->behavior, p->invert, out);
    case TOK_PRE_BYTE_LEVEL:
        return step_byte_level(c, p, in, out);
    case TOK_PRE_DIGITS:
        if (pred_spans(c, s, in->len, pred_numeric, 0, &c->spans)) return ST_ERR_NOMEM;
        return split_by(c, in, &c->spans,
                        p->individual_digits ? TOK_SPLIT_ISOLATED : TOK_SPLIT_CONTIGUOUS, 0, out);
    case TOK_PRE_METASPACE:
        return step_metaspace(c, p, in, out);
    case TOK_PRE_WHITESPACE_SPLIT:
        if (pred_spans(c, s, in->len, pred_ws, 0, &c->spans)) return ST_ERR_NOMEM;
        return split_by(c, in, &c->spans, TOK_SPLIT_REMOVED, 0, out);
    case TOK_PRE_PUNCTUATION:
        if (pred_spans(c, s, in->len, pred_punct, 0, &c->spans)) return ST_ERR_NOMEM;
        return split_by(c, in, &c->spans, p->behavior, 0, out);
    case TOK_PRE_CHAR_DELIMITER:
        if (pred_spans(c, s, in->len, pred_eq, p->ch, &c->spans)) return ST_ERR_NOMEM;
        return split_by(c, in, &c->spans, TOK_SPLIT_REMOVED, 0, out);
    case TOK_PRE_BERT: {
        if (pred_spans(c, s, in->len, pred_ws, 0, &c->spans)) return ST_ERR_NOMEM;
        tok_splits tmp = {0};
        rc = split_by(c, in, &c->spans, TOK_SPLIT_REMOVED, 0, &tmp);
        for (size_t i = 0; !rc && i < tmp.n; i++) {
            if (pred_spans(c, c->text.p + tmp.v[i].off, tmp.v[i].len, pred_punct, 0, &c->spans)) {
                rc = ST_ERR_NOMEM;
                break;
            }
            rc = split_by(c, &tmp.v[i], &c->spans, TOK_SPLIT_ISOLATED, 0, out);
        }
        free(tmp.v);
        return rc;
    }
    default:
        ST_ASSERT(0 && "unknown pre-tokenizer step");
    }
}

/* See tok_internal.h. */
int tok_pretokenize(tok_ctx *c) {
    const tok_tokenizer *tok = c->tok;
    for (size_t k = 0; k < tok->n_pre; k++) {
        c->sb.n = 0;
        tok_splits out = c->sb;
        for (size_t i = 0; i < c->sa.n; i++) {
            const tok_split *in = &c->sa.v[i];
            int rc;
            if (in->id >= 0) {
                rc = tok_splits_push(&out, in->off, in->len, in->id, in->first) ? nomem(c) : 0;
            } else {
                tok_split copy = *in; /* `out` may be reallocated while we read `in` */
                rc = pre_step(c, &tok->pre[k], &copy, &out);
            }
            if (rc) {
                c->sb = out;
                return rc;
            }
        }
        c->sb = c->sa;
        c->sa = out;
    }
    return 0;
}
