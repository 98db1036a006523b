/* tok_encode.c — text -> ids (HF TokenizerImpl::encode_single_sequence + post_process).
 *
 *   1. added tokens with normalized=false are cut out of the raw text (AddedVocabulary::
 *      find_matches: leftmost-longest, single_word, lstrip/rstrip)
 *   2. each remaining piece is normalized, then normalized=true added tokens are cut out of it
 *   3. each remaining piece is pre-tokenized and every split is BPE-encoded
 *   4. the post-processor adds special tokens (TemplateProcessing, Bert/Roberta)
 * Pieces are pushed through steps 2-3 one at a time: every step works split by split, so this
 * is the same as HF's breadth-first order and keeps the scratch memory to one piece.
 */
#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

typedef struct piece {
    uint32_t start, end;
    int32_t id; /* added token, or -1 */
} piece;

typedef struct pieces {
    piece *v;
    size_t n, cap;
} pieces;

/* Reports an allocation failure of an encode. */
static int nomem(tok_ctx *c) { return st_err_set(c->err, ST_ERR_NOMEM, "out of memory encoding"); }

/* Appends a piece. 0 or ST_ERR_NOMEM. */
static int pieces_push(pieces *p, size_t start, size_t end, int32_t id) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 16;
        piece *v = realloc(p->v, cap * sizeof *v);
        if (!v) return ST_ERR_NOMEM;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = (piece){(uint32_t)start, (uint32_t)end, id};
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* added tokens                                                                               */

/* The regex crate's Unicode \w (Alphabetic, M, Nd, Pc, Join_Control), by general category. */
static int is_word_char(uint32_t cp) {
    if (cp < 0x80)
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
               cp == '_';
    if (cp == 0x200C || cp == 0x200D) return 1;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
        return 1;
    default:
        return 0;
    }
}

/* Code point ending at s[end) (end > 0). */
static uint32_t cp_before(const char *s, size_t end) {
    size_t k = end - 1;
    while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
    uint32_t cp;
    tok_utf8_next(s + k, &cp);
    return cp;
}

/* AddedVocabulary::find_matches over s[0..len) with matcher m: pushes pieces covering s
 * (nothing for an empty string). */
static int find_added(tok_ctx *c, const tok_match *m, const char *s, size_t len, pieces *out) {
    const tok_tokenizer *tok = c->tok;
    out->n = 0;
    if (!len) return 0;
    size_t start_offset = 0;
    if (m->n) {
        for (size_t pos = 0; pos < len;) {
            unsigned char b = (unsigned char)s[pos];
            uint32_t k = m->first[b], e = m->first[b + 1];
            const tok_added *hit = NULL;
            for (; k < e; k++) { /* longest first */
                const tok_added *a = &tok->added[m->idx[k]];
                uint32_t off = m->use_norm ? a->norm_off : a->off;
                uint32_t n = m->use_norm ? a->norm_len : a->len;
                if (n <= len - pos && !memcmp(s + pos, tok->pool.p + off, n)) {
                    hit = a;
                    break;
                }
            }
            if (!hit) {
                pos++;
                continue;
            }
            size_t mstart = pos, mend = pos + (m->use_norm ? hit->norm_len : hit->len);
            pos = mend; /* the automaton resumes after the match, kept or not */
            size_t start = mstart, stop = mend;
            if (hit->single_word) {
                uint32_t cp;
                int start_space = mstart == 0 || !is_word_char(cp_before(s, mstart));
                int stop_space = mend == len || (tok_utf8_next(s + mend, &cp), !is_word_char(cp));
                if (!start_space || !stop_space) continue;
            }
            if (hit->lstrip) {
                size_t ns = mstart;
                while (ns > 0 && tok_uni_is_whitespace(cp_before(s, ns))) {
                    ns--;
                    while (ns > 0 && ((unsigned char)s[ns] & 0xC0) == 0x80) ns--;
                }
                start = ns > start_offset ? ns : start_offset;
            }
            if (hit->rstrip) {
                while (stop < len) {
                    uint32_t cp;
                    int k2 = tok_utf8_next(s + stop, &cp);
                    if (!tok_uni_is_whitespace(cp)) break;
                    stop += (size_t)k2;
                }
            }
            if (start_offset < start && pieces_push(out, start_offset, start, -1)) return nomem(c);
            if (pieces_push(out, start, stop, hit->id)) return nomem(c);
            start_offset = stop;
        }
    }
    if (start_offset != len && pieces_push(out, start_offset, len, -1)) return nomem(c);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* pipeline                                                                                   */

/* Pre-tokenizes s[0..len) (a normalized piece) and BPE-encodes its splits. */
static int encode_words(tok_ctx *c, const char *s, size_t len, int first) {
    if (!len) return 0;
    c->text.len = 0;
    uint32_t off = 0;
    if (tok_buf_append(&c->text, s, len)) return nomem(c);
    c->sa.n = 0;
    if (tok_splits_push(&c->sa, off, (uint32_t)len, -1, (uint8_t)first)) return nomem(c);
    int rc = tok_pretokenize(c);
    if (rc) return rc;
    for (size_t i = 0; i < c->sa.n; i++) {
        const tok_split *sp = &c->sa.v[i];
        if (sp->id >= 0) {
            if (tok_ids_append(&c->out, &sp->id, 1)) return nomem(c);
        } else if ((rc = tok_bpe_word(c, c->text.p + sp->off, sp->len))) {
            return rc;
        }
    }
    return 0;
}

/* Steps 1-3 for the whole text. */
static int encode_text(tok_ctx *c, const char *text, size_t len) {
    const tok_tokenizer *tok = c->tok;
    pieces raw = {0}, norm = {0};
    int rc = find_added(c, &tok->match_raw, text, len, &raw);
    for (size_t i = 0; !rc && i < raw.n; i++) {
        const piece *p = &raw.v[i];
        if (p->id >= 0) {
            rc = tok_ids_append(&c->out, &p->id, 1) ? nomem(c) : 0;
            continue;
        }
        const char *s = text + p->start;
        size_t n = p->end - p->start;
        if (tok->has_normalizer && (rc = tok_normalize(c, s, n, &s, &n))) break;
        if (!tok->match_norm.n) {
            rc = encode_words(c, s, n, p->start == 0);
            continue;
        }
        if ((rc = find_added(c, &tok->match_norm, s, n, &norm))) break;
        for (size_t k = 0; !rc && k < norm.n; k++) {
            const piece *q = &norm.v[k];
            if (q->id >= 0)
                rc = tok_ids_append(&c->out, &q->id, 1) ? nomem(c) : 0;
            else
                rc = encode_words(c, s + q->start, q->end - q->start, p->start == 0 && q->start == 0);
        }
    }
    free(raw.v);
    free(norm.v);
    return rc;
}

/* Step 4: the post-processor steps on c->out. */
static int post_process(tok_ctx *c, int add_special) {
    const tok_tokenizer *tok = c->tok;
    for (size_t i = 0; i < tok->n_post; i++) {
        const tok_post *p = &tok->post[i];
        tok_ids next = {0};
        int rc = 0;
        if (p->type == TOK_POST_TEMPLATE) {
            for (size_t k = 0; !rc && k < p->n_tmpl; k++) {
                if (p->tmpl[k] == TOK_TMPL_SEQ) rc = tok_ids_append(&next, c->out.v, c->out.n);
                else if (add_special) rc = tok_ids_append(&next, &p->tmpl[k], 1);
            }
        } else {
            if (!add_special) continue;
            rc = tok_ids_append(&next, &p->cls, 1) || tok_ids_append(&next, c->out.v, c->out.n) ||
                 tok_ids_append(&next, &p->sep, 1);
        }
        if (rc) {
            free(next.v);
            return nomem(c);
        }
        free(c->out.v);
        c->out = next;
    }
    return 0;
}

/* Frees every scratch buffer of c, including the output ids still owned by c. */
static void ctx_free(tok_ctx *c) {
    tok_buf_free(&c->text);
    tok_buf_free(&c->nbuf[0]);
    tok_buf_free(&c->nbuf[1]);
    free(c->sa.v);
    free(c->sb.v);
    free(c->spans.v);
    if (c->region) onig_region_free(c->region, 1);
    free(c->out.v);
    tok_bpe_ctx_free(c);
}

/* See strata/tok.h: *ids is malloc'ed and owned by the caller; tok is only read. */
int tok_encode(const tok_tokenizer *tok, const char *text, size_t len, int add_special,
               int32_t **ids, size_t *n_ids, st_err *err) {
    *ids = NULL;
    *n_ids = 0;
    size_t bad = tok_utf8_check(text, len);
    if (bad != len)
        return st_err_set(err, ST_ERR_ARG, "text to encode is not valid UTF-8 (byte offset %zu)",
                          bad);
    tok_ctx c = {0};
    c.tok = tok;
    c.err = err;
    if (!(c.region = onig_region_new())) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int rc = encode_text(&c, text, len);
    if (!rc) rc = post_process(&c, add_special);
    if (!rc) {
        *ids = c.out.v;
        *n_ids = c.out.n;
        c.out.v = NULL;
    }
    ctx_free(&c);
    return rc;
}
