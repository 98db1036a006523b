/* tok_decode.c — ids -> text: HF decoders, tok_decode and the streaming detokenizer.
 *
 * tok_decode is TokenizerImpl::decode: ids -> token strings (added tokens first, unknown ids
 * skipped, special ones skipped on request) -> the decoder chain's decode_chain steps -> join
 * (no decoder: join with " "). The ByteLevel decoder turns byte-level characters back into bytes
 * and applies String::from_utf8_lossy to the whole run.
 *
 * Streaming: with a ByteLevel decoder the stream works on bytes (exactly tok_decode's lossy
 * decoding, emitted as soon as a code point is complete or definitely invalid). Any other chain
 * uses HF's DecodeStream algorithm: decode a window of recent ids and emit what grew past the
 * previously decoded prefix, holding back text that ends in U+FFFD (maybe an incomplete char).
 */
#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>

/* A list of strings in one buffer. */
typedef struct strlist {
    tok_buf buf;
    uint32_t *off, *len;
    size_t n, cap;
} strlist;

/* Appends a copy of s[0..n) as a new string. 0, ST_ERR_NOMEM or ST_ERR_LIMIT. */
static int sl_push(strlist *l, const char *s, size_t n) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        uint32_t *o = realloc(l->off, cap * sizeof *o);
        if (!o) return ST_ERR_NOMEM;
        l->off = o;
        uint32_t *ln = realloc(l->len, cap * sizeof *ln);
        if (!ln) return ST_ERR_NOMEM;
        l->len = ln;
        l->cap = cap;
    }
    if (l->buf.len + n > UINT32_MAX) return ST_ERR_LIMIT;
    l->off[l->n] = (uint32_t)l->buf.len;
    l->len[l->n] = (uint32_t)n;
    if (tok_buf_append(&l->buf, s, n)) return ST_ERR_NOMEM;
    l->n++;
    return 0;
}

/* Starts a new string at the end of the buffer (filled by appending to l->buf, closed by
 * sl_close). */
static int sl_open(strlist *l) { return sl_push(l, "", 0); }
/* Ends the string sl_open started: its length is what was appended since. */
static void sl_close(strlist *l) { l->len[l->n - 1] = (uint32_t)(l->buf.len - l->off[l->n - 1]); }

/* Frees l (empty and reusable afterwards). */
static void sl_free(strlist *l) {
    tok_buf_free(&l->buf);
    free(l->off);
    free(l->len);
    memset(l, 0, sizeof *l);
}

/* Empties l, keeping its storage. */
static void sl_clear(strlist *l) {
    l->n = 0;
    l->buf.len = 0;
}

#define SL_STR(l, i) ((l)->buf.p + (l)->off[i])

static const char k_fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* ------------------------------------------------------------------------------------------ */
/* decoders                                                                                   */

/* Appends the bytes a ByteLevel decoder makes of token s[0..n): the byte of every character if
 * all are byte-level characters, else the token's own bytes. */
static int byte_level_bytes(const char *s, size_t n, tok_buf *out) {
    if (tok_buf_reserve(out, n)) return ST_ERR_NOMEM;
    size_t start = out->len;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += (size_t)tok_utf8_next(s + i, &cp);
        int b = tok_cp_to_byte(cp);
        if (b < 0) {
            out->len = start;
            return tok_buf_append(out, s, n);
        }
        out->p[out->len++] = (char)b;
    }
    return 0;
}

/* u8::from_str_radix(s[0..2], 16) (a leading '+' is accepted, as Rust does). -1 if invalid. */
static int hex_byte(const char *s) {
    int v = 0;
    for (int i = 0; i < 2; i++) {
        char ch = s[i];
        int h = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
              : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
        if (i == 0 && ch == '+') continue;
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

/* Scratch for one decode. */
typedef struct dec_env {
    const tok_tokenizer *tok;
    OnigRegion *region;
    tok_spans spans;
    tok_buf tmp;
    st_err *err;
} dec_env;

/* Runs decoder step d: in -> out (out cleared first). */
static int dec_step(dec_env *e, const tok_dec *d, strlist *in, strlist *out) {
    const tok_tokenizer *tok = e->tok;
    sl_clear(out);
    switch (d->type) {
    case TOK_DEC_BYTE_LEVEL: {
        e->tmp.len = 0;
        for (size_t i = 0; i < in->n; i++)
            if (byte_level_bytes(SL_STR(in, i), in->len[i], &e->tmp)) return ST_ERR_NOMEM;
        if (sl_open(out)) return ST_ERR_NOMEM;
        if (tok_utf8_lossy(&out->buf, e->tmp.p ? e->tmp.p : "", e->tmp.len, 1) == (size_t)-1)
            return ST_ERR_NOMEM;
        sl_close(out);
        return 0;
    }
    case TOK_DEC_REPLACE:
        for (size_t i = 0; i < in->n; i++) {
            const char *s = SL_STR(in, i);
            int rc = tok_regex_spans(d->re, e->region, s, in->len[i], &e->spans, e->err);
            if (rc) return rc;
            if (sl_open(out)) return ST_ERR_NOMEM;
            for (size_t k = 0; k < e->spans.n; k++) {
                const tok_span *sp = &e->spans.v[k];
                s = SL_STR(in, i);
                if (sp->match ? tok_buf_append(&out->buf, tok->pool.p + d->str_off, d->str_len)
                              : tok_buf_append(&out->buf, s + sp->start, sp->end - sp->start))
                    return ST_ERR_NOMEM;
            }
            sl_close(out);
        }
        return 0;
    case TOK_DEC_BYTE_FALLBACK: {
        e->tmp.len = 0; /* pending <0xXX> bytes */
        for (size_t i = 0; i <= in->n; i++) {
            const char *s = i < in->n ? SL_STR(in, i) : NULL;
            size_t n = i < in->n ? in->len[i] : 0;
            int byte = -1;
            if (s && n == 6 && !memcmp(s, "<0x", 3) && s[5] == '>') byte = hex_byte(s + 3);
            if (byte >= 0) {
                char b = (char)byte;
                if (tok_buf_append(&e->tmp, &b, 1)) return ST_ERR_NOMEM;
                continue;
            }
            if (e->tmp.len) {
                if (tok_utf8_check(e->tmp.p, e->tmp.len) == e->tmp.len) {
                    if (sl_push(out, e->tmp.p, e->tmp.len)) return ST_ERR_NOMEM;
                } else {
                    for (size_t k = 0; k < e->tmp.len; k++)
                        if (sl_push(out, k_fffd, 3)) return ST_ERR_NOMEM;
                }
                e->tmp.len = 0;
            }
            if (s && sl_push(out, s, n)) return ST_ERR_NOMEM;
        }
        return 0;
    }
    case TOK_DEC_FUSE:
        if (sl_open(out)) return ST_ERR_NOMEM;
        for (size_t i = 0; i < in->n; i++)
            if (tok_buf_append(&out->buf, SL_STR(in, i), in->len[i])) return ST_ERR_NOMEM;
        sl_close(out);
        return 0;
    case TOK_DEC_STRIP:
        for (size_t i = 0; i < in->n; i++) {
            const char *s = SL_STR(in, i);
            size_t n = in->len[i];
            /* char boundaries */
            size_t a = 0, nch = 0, b = n;
            for (size_t k = 0; k < n; k += (size_t)tok_utf8_len((unsigned char)s[k])) nch++;
            for (uint32_t k = 0; k < d->start && k < nch && a < n; k++) {
                uint32_t cp;
                int l = tok_utf8_next(s + a, &cp);
                if (cp != d->ch) break;
                a += (size_t)l;
            }
            for (uint32_t k = 0; k < d->stop && k < nch && b > 0; k++) {
                size_t p = b - 1;
                while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                uint32_t cp;
                tok_utf8_next(s + p, &cp);
                if (cp != d->ch) break;
                b = p;
            }
            if (b < a) b = a; /* HF would panic on this overlap */
            if (sl_push(out, s + a, b - a)) return ST_ERR_NOMEM;
        }
        return 0;
    case TOK_DEC_METASPACE:
        for (size_t i = 0; i < in->n; i++) {
            const char *s = SL_STR(in, i);
            size_t n = in->len[i];
            if (sl_open(out)) return ST_ERR_NOMEM;
            for (size_t k = 0; k < n;) {
                uint32_t cp;
                int l = tok_utf8_next(s + k, &cp);
                int rc = 0;
                if (cp != d->ch) rc = tok_buf_append(&out->buf, s + k, (size_t)l);
                else if (!(i == 0 && d->prepend_scheme != TOK_PREPEND_NEVER))
                    rc = tok_buf_append(&out->buf, " ", 1);
                if (rc) return ST_ERR_NOMEM;
                s = SL_STR(in, i);
                k += (size_t)l;
            }
            sl_close(out);
        }
        return 0;
    default:
        ST_ASSERT(0 && "unknown decoder step");
    }
}

/* Decodes ids into out (appended). 0, ST_ERR_NOMEM or ST_ERR_INTERNAL. */
static int decode_into(const tok_tokenizer *tok, const int32_t *ids, size_t n, int skip_special,
                       tok_buf *out, st_err *err) {
    strlist a = {0}, b = {0};
    dec_env e = {tok, NULL, {0}, {0}, err};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= tok->n_ids || tok->piece_off[id] == UINT32_MAX) continue;
        if (skip_special && (tok->id_flags[id] & TOK_ID_SPECIAL)) continue;
        rc = sl_push(&a, tok->pool.p + tok->piece_off[id], tok->piece_len[id]);
    }
    if (!rc && !tok->has_decoder) {
        for (size_t i = 0; i < a.n && !rc; i++)
            rc = (i && tok_buf_append(out, " ", 1)) || tok_buf_append(out, SL_STR(&a, i), a.len[i]);
        goto done;
    }
    for (size_t k = 0; k < tok->n_dec && !rc; k++) {
        if (tok->dec[k].re && !e.region && !(e.region = onig_region_new())) rc = ST_ERR_NOMEM;
        if (!rc) rc = dec_step(&e, &tok->dec[k], &a, &b);
        strlist t = a;
        a = b;
        b = t;
    }
    for (size_t i = 0; i < a.n && !rc; i++) rc = tok_buf_append(out, SL_STR(&a, i), a.len[i]);
done:
    sl_free(&a);
    sl_free(&b);
    tok_buf_free(&e.tmp);
    free(e.spans.v);
    if (e.region) onig_region_free(e.region, 1);
    if (rc == ST_ERR_NOMEM || rc == 1 || rc == ST_ERR_LIMIT)
        return st_err_set(err, ST_ERR_NOMEM, "out of memory decoding");
    return rc;
}

/* See strata/tok.h: *text is malloc'ed and owned by the caller. */
int tok_decode(const tok_tokenizer *tok, const int32_t *ids, size_t n_ids, int skip_special,
               char **text, size_t *len, st_err *err) {
    tok_buf out = {0};
    *text = NULL;
    if (len) *len = 0;
    int rc = decode_into(tok, ids, n_ids, skip_special, &out, err);
    if (!rc && !out.p && tok_buf_reserve(&out, 0)) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (rc) {
        tok_buf_free(&out);
        return rc;
    }
    out.p[out.len] = 0;
    *text = out.p;
    if (len) *len = out.len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* streaming                                                                                  */

struct tok_stream {
    const tok_tokenizer *tok;
    int skip_special;
    tok_buf out;            /* the text returned by the last push/flush */
    /* byte-level mode */
    tok_buf pend;           /* bytes of an incomplete trailing character (< 4) */
    /* window mode (HF DecodeStream) */
    tok_ids ids;            /* ids since the previous emission group */
    size_t prefix_index;    /* how many of them formed the previous group */
    tok_buf prefix;         /* decode(ids) as of the last emission */
    tok_buf cur;
};

/* See strata/tok.h: the stream borrows tok. */
int tok_stream_init(tok_stream **out, const tok_tokenizer *tok, int skip_special, st_err *err) {
    tok_stream *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    s->tok = tok;
    s->skip_special = skip_special;
    if (tok_buf_reserve(&s->out, 64)) {
        free(s);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    *out = s;
    return 0;
}

/* Frees s and the text it last returned. NULL is a no-op. */
void tok_stream_free(tok_stream *s) {
    if (!s) return;
    tok_buf_free(&s->out);
    tok_buf_free(&s->pend);
    free(s->ids.v);
    tok_buf_free(&s->prefix);
    tok_buf_free(&s->cur);
    free(s);
}

/* Reports an allocation failure of the stream. */
static int stream_nomem(st_err *err) { return st_err_set(err, ST_ERR_NOMEM, "out of memory"); }

/* Byte-level mode: append the id's bytes to the pending ones and emit every complete (or
 * definitely invalid) character. */
static int push_bytes(tok_stream *s, int32_t id, st_err *err) {
    const tok_tokenizer *tok = s->tok;
    if (id < 0 || id >= tok->n_ids || tok->piece_off[id] == UINT32_MAX) return 0;
    if (s->skip_special && (tok->id_flags[id] & TOK_ID_SPECIAL)) return 0;
    if (byte_level_bytes(tok->pool.p + tok->piece_off[id], tok->piece_len[id], &s->pend))
        return stream_nomem(err);
    size_t used = tok_utf8_lossy(&s->out, s->pend.p, s->pend.len, 0);
    if (used == (size_t)-1) return stream_nomem(err);
    memmove(s->pend.p, s->pend.p + used, s->pend.len - used);
    s->pend.len -= used;
    return 0;
}

/* 1 if text ends with U+FFFD. */
static int ends_fffd(const tok_buf *b) {
    return b->len >= 3 && !memcmp(b->p + b->len - 3, k_fffd, 3);
}

/* 1 if the chain has a ByteFallback step and the piece is a token it turns into a byte. */
static int is_fallback_byte(const tok_tokenizer *tok, const char *p, size_t n) {
    if (n != 6 || memcmp(p, "<0x", 3) || p[5] != '>' || hex_byte(p + 3) < 0) return 0;
    for (size_t i = 0; i < tok->n_dec; i++)
        if (tok->dec[i].type == TOK_DEC_BYTE_FALLBACK) return 1;
    return 0;
}

/* Window mode: HF's DecodeStream::step, with two refinements that make it exact for the
 * chains tokenizer.json files use: ids that decode to nothing (unknown, skipped specials) are
 * ignored, and nothing is emitted while the last id is a ByteFallback byte (a later byte can
 * turn the whole run into U+FFFDs). With flush, emit whatever grew. */
static int push_window(tok_stream *s, int32_t id, int flush, st_err *err) {
    const tok_tokenizer *tok = s->tok;
    if (!flush) {
        if (id < 0 || id >= tok->n_ids || tok->piece_off[id] == UINT32_MAX) return 0;
        if (s->skip_special && (tok->id_flags[id] & TOK_ID_SPECIAL)) return 0;
        if (tok_ids_append(&s->ids, &id, 1)) return stream_nomem(err);
        if (is_fallback_byte(tok, tok->pool.p + tok->piece_off[id], tok->piece_len[id])) return 0;
    }
    s->cur.len = 0;
    int rc = decode_into(tok, s->ids.v, s->ids.n, s->skip_special, &s->cur, err);
    if (rc) return rc;
    if (s->cur.len <= s->prefix.len || (!flush && ends_fffd(&s->cur))) return 0;
    if (s->prefix.len && memcmp(s->cur.p, s->prefix.p, s->prefix.len))
        return st_err_set(err, ST_ERR_INTERNAL,
                          "%s: streaming decode: the decoder rewrote text already emitted",
                          tok->name);
    if (tok_buf_append(&s->out, s->cur.p + s->prefix.len, s->cur.len - s->prefix.len))
        return stream_nomem(err);
    if (flush) return 0;
    size_t keep = s->ids.n - s->prefix_index;
    memmove(s->ids.v, s->ids.v + s->prefix_index, keep * sizeof *s->ids.v);
    s->ids.n = keep;
    s->prefix.len = 0;
    if ((rc = decode_into(tok, s->ids.v, s->ids.n, s->skip_special, &s->prefix, err))) return rc;
    s->prefix_index = keep;
    return 0;
}

/* See strata/tok.h: *text is owned by s until the next call. */
int tok_stream_push(tok_stream *s, int32_t id, const char **text, size_t *len, st_err *err) {
    s->out.len = 0;
    int rc = s->tok->bytelevel_only_decoder ? push_bytes(s, id, err) : push_window(s, id, 0, err);
    s->out.p[s->out.len] = 0;
    *text = s->out.p;
    *len = rc ? 0 : s->out.len;
    return rc;
}

/* See strata/tok.h: emits the held-back text and resets s. */
int tok_stream_flush(tok_stream *s, const char **text, size_t *len, st_err *err) {
    s->out.len = 0;
    int rc = 0;
    if (s->tok->bytelevel_only_decoder) {
        if (s->pend.len && tok_utf8_lossy(&s->out, s->pend.p, s->pend.len, 1) == (size_t)-1)
            rc = stream_nomem(err);
    } else if (s->ids.n) {
        rc = push_window(s, 0, 1, err);
    }
    s->pend.len = 0;
    s->ids.n = 0;
    s->prefix_index = 0;
    s->prefix.len = 0;
    s->out.p[s->out.len] = 0;
    *text = s->out.p;
    *len = rc ? 0 : s->out.len;
    return rc;
}
