/* tok_load.c — tokenizer.json -> tok_tokenizer (see strata/tok.h, tok_internal.h).
 *
 * Mirrors HF tokenizers' deserialization: the BPE model (vocab, merges in both forms -> ranks),
 * added tokens (ids assigned the way AddedVocabulary::add_tokens assigns them), and the
 * normalizer / pre-tokenizer / post-processor / decoder trees, flattened into step arrays.
 * Every component type or option strata does not implement is an ST_ERR_UNSUPPORTED error
 * naming the type and its JSON path, never a silent difference.
 */
#include "tok/tok_internal.h"
#include "tok/tok_json.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define TOK_MAX_IDS (1 << 26)

typedef struct loader {
    tok_tokenizer *tok;
    st_err *err;
    const char *name;
} loader;

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                              */

int tok_pool_add(tok_tokenizer *tok, const char *s, size_t len, uint32_t *off) {
    if (tok->pool.len + len + 1 > UINT32_MAX) return ST_ERR_LIMIT;
    *off = (uint32_t)tok->pool.len;
    if (tok_buf_reserve(&tok->pool, len + 1)) return ST_ERR_NOMEM;
    memcpy(tok->pool.p + tok->pool.len, s, len);
    tok->pool.len += len;
    tok->pool.p[tok->pool.len++] = 0;
    return 0;
}

/* Formats a format/unsupported error "name: path: message". */
__attribute__((format(printf, 4, 5))) static int lfail(loader *L, int code, const char *path,
                                                       const char *fmt, ...) {
    char msg[ST_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return st_err_set(L->err, code, "%s: %s: %s", L->name, path, msg);
}

/* Reports an allocation failure while loading. */
static int lnomem(loader *L) {
    return st_err_set(L->err, ST_ERR_NOMEM, "%s: out of memory loading the tokenizer", L->name);
}

/* Appends ".key" or "[i]" to a JSON path (child = parent + suffix). */
static void path_key(char *out, size_t cap, const char *parent, const char *key) {
    snprintf(out, cap, "%s.%s", parent, key);
}
/* Child path "parent.key[i]". */
static void path_idx(char *out, size_t cap, const char *parent, const char *key, size_t i) {
    snprintf(out, cap, "%s.%s[%zu]", parent, key, i);
}

/* Reads optional boolean member key of obj into *out (default def). Error if not boolean. */
static int get_bool(loader *L, const tj_val *obj, const char *key, int def, const char *path,
                    uint8_t *out) {
    const tj_val *v = tj_get(obj, key);
    if (tj_is_null(v)) {
        *out = (uint8_t)def;
        return 0;
    }
    if (v->type != TJ_TRUE && v->type != TJ_FALSE)
        return lfail(L, ST_ERR_FORMAT, path, "'%s' must be a boolean, not %s", key, tj_type_name(v));
    *out = v->type == TJ_TRUE;
    return 0;
}

/* Reads required string member key (a view into the document). */
static int get_str(loader *L, const tj_val *obj, const char *key, const char *path,
                   const char **s, uint32_t *len) {
    const tj_val *v = tj_get(obj, key);
    if (!v || v->type != TJ_STR)
        return lfail(L, ST_ERR_FORMAT, path, "'%s' must be a string, not %s", key, tj_type_name(v));
    *s = v->u.s;
    *len = v->n;
    return 0;
}

/* Reads a member that must be a single character (Rust `char`), e.g. Metaspace's replacement. */
static int get_char(loader *L, const tj_val *obj, const char *key, const char *path,
                    uint32_t *cp) {
    const char *s;
    uint32_t n;
    int rc = get_str(L, obj, key, path, &s, &n);
    if (rc) return rc;
    if (!n || (uint32_t)tok_utf8_len((unsigned char)s[0]) != n)
        return lfail(L, ST_ERR_FORMAT, path, "'%s' must be exactly one character", key);
    tok_utf8_next(s, cp);
    return 0;
}

/* Reads an optional non-negative integer member (default def). */
static int get_uint(loader *L, const tj_val *obj, const char *key, int64_t def, const char *path,
                    int64_t *out) {
    const tj_val *v = tj_get(obj, key);
    if (tj_is_null(v)) {
        *out = def;
        return 0;
    }
    if (tj_int(v, out) || *out < 0)
        return lfail(L, ST_ERR_FORMAT, path, "'%s' must be a non-negative integer", key);
    return 0;
}

/* The component's "type" string (for messages, NUL-terminated copy in buf). */
static int get_type(loader *L, const tj_val *v, const char *path, char *buf, size_t cap) {
    if (!v || v->type != TJ_OBJ)
        return lfail(L, ST_ERR_FORMAT, path, "expected an object, found %s", tj_type_name(v));
    const tj_val *t = tj_get(v, "type");
    if (!t || t->type != TJ_STR)
        return lfail(L, ST_ERR_FORMAT, path, "missing \"type\"");
    snprintf(buf, cap, "%.*s", (int)t->n, t->u.s);
    return 0;
}

/* 1 unless STRATA_TOK_SLOW_REGEX is set (forces Oniguruma for every pattern, for testing). */
static int fast_allowed(void) {
    const char *e = getenv("STRATA_TOK_SLOW_REGEX");
    return !e || !*e || !strcmp(e, "0");
}

/* Compiles a {"String": s} / {"Regex": r} pattern member; *fast (may be NULL) gets the
 * hand-written matcher for it, if any. */
static int get_pattern(loader *L, const tj_val *obj, const char *key, const char *path,
                       regex_t **re, uint8_t *fast) {
    char where[512];
    path_key(where, sizeof where, path, key);
    const tj_val *p = tj_get(obj, key);
    if (!p || p->type != TJ_OBJ || p->n != 1 || p->u.o[0].val.type != TJ_STR)
        return lfail(L, ST_ERR_FORMAT, where, "expected {\"String\": ...} or {\"Regex\": ...}");
    const tj_mem *m = &p->u.o[0];
    char full[600];
    snprintf(full, sizeof full, "%s: %s", L->name, where);
    if (m->key_len == 6 && !memcmp(m->key, "String", 6))
        return tok_regex_new_literal(re, m->val.u.s, m->val.n, full, L->err);
    if (m->key_len == 5 && !memcmp(m->key, "Regex", 5)) {
        if (fast && fast_allowed()) *fast = (uint8_t)tok_fast_kind(m->val.u.s, m->val.n);
        return tok_regex_new(re, m->val.u.s, m->val.n, full, L->err);
    }
    return lfail(L, ST_ERR_UNSUPPORTED, where, "pattern kind \"%.*s\" is not supported",
                 (int)m->key_len, m->key);
}

/* Reads a SplitDelimiterBehavior name ("behavior", default def). ST_ERR_UNSUPPORTED for an
 * unknown one. */
static int get_behavior(loader *L, const tj_val *obj, const char *path, int def, uint8_t *out) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    const tj_val *v = tj_get(obj, "behavior");
    if (tj_is_null(v)) {
        *out = (uint8_t)def;
        return 0;
    }
    for (int i = 0; i < 5; i++)
        if (tj_str_is(v, names[i])) {
            *out = (uint8_t)i;
            return 0;
        }
    return lfail(L, ST_ERR_UNSUPPORTED, path, "split behavior %s%.*s%s is not supported",
                 v->type == TJ_STR ? "\"" : "", v->type == TJ_STR ? (int)v->n : 0,
                 v->type == TJ_STR ? v->u.s : "", v->type == TJ_STR ? "\"" : tj_type_name(v));
}

/* Metaspace's prepend_scheme with the legacy add_prefix_space (false means never). */
static int get_prepend_scheme(loader *L, const tj_val *obj, const char *path, uint8_t *out) {
    const tj_val *ps = tj_get(obj, "prepend_scheme");
    uint8_t scheme = TOK_PREPEND_ALWAYS;
    if (!tj_is_null(ps)) {
        if (tj_str_is(ps, "always")) scheme = TOK_PREPEND_ALWAYS;
        else if (tj_str_is(ps, "never")) scheme = TOK_PREPEND_NEVER;
        else if (tj_str_is(ps, "first")) scheme = TOK_PREPEND_FIRST;
        else return lfail(L, ST_ERR_UNSUPPORTED, path, "unknown prepend_scheme");
    }
    const tj_val *aps = tj_get(obj, "add_prefix_space");
    if (aps && aps->type == TJ_FALSE) {
        if (scheme != TOK_PREPEND_NEVER && !tj_is_null(ps))
            return lfail(L, ST_ERR_FORMAT, path,
                         "add_prefix_space does not match declared prepend_scheme");
        scheme = TOK_PREPEND_NEVER;
    }
    *out = scheme;
    return 0;
}

/* Checks that obj has no member outside the NULL-terminated list `known` (options strata would
 * otherwise ignore silently). */
static int check_keys(loader *L, const tj_val *obj, const char *path, const char *const *known) {
    for (uint32_t i = 0; i < obj->n; i++) {
        const tj_mem *m = &obj->u.o[i];
        int ok = 0;
        for (const char *const *k = known; *k && !ok; k++)
            ok = strlen(*k) == m->key_len && !memcmp(*k, m->key, m->key_len);
        if (!ok)
            return lfail(L, ST_ERR_UNSUPPORTED, path, "option \"%.*s\" is not supported",
                         (int)m->key_len, m->key);
    }
    return 0;
}

/* Grows a step array by one zeroed element; returns it or NULL. */
static void *push_step(void **arr, size_t *n, size_t size) {
    void *v = realloc(*arr, (*n + 1) * size);
    if (!v) return NULL;
    *arr = v;
    void *e = (char *)v + *n * size;
    memset(e, 0, size);
    (*n)++;
    return e;
}

/* ------------------------------------------------------------------------------------------ */
/* model                                                                                      */

/* Looks up a vocab piece; -1 if absent. */
static int32_t vocab_id(const tok_tokenizer *tok, const char *s, size_t n) {
    return tok_smap_get(&tok->vocab, tok->pool.p, s, n);
}

/* Grows the id tables to cover id (new entries: no piece, no flags). */
static int ensure_ids(loader *L, int64_t id) {
    tok_tokenizer *tok = L->tok;
    if (id < tok->n_ids) return 0;
    if (id >= TOK_MAX_IDS)
        return st_err_set(L->err, ST_ERR_LIMIT, "%s: token id %lld is too large", L->name,
                          (long long)id);
    size_t want = (size_t)id + 1, cap = (size_t)tok->ids_cap;
    if (want > cap) {
        size_t ncap = cap ? cap : 1024;
        while (ncap < want) ncap *= 2;
        uint32_t *po = realloc(tok->piece_off, ncap * sizeof *po);
        if (po) tok->piece_off = po;
        uint32_t *pl = po ? realloc(tok->piece_len, ncap * sizeof *pl) : NULL;
        if (pl) tok->piece_len = pl;
        uint8_t *fl = pl ? realloc(tok->id_flags, ncap) : NULL;
        if (!fl) return lnomem(L);
        tok->id_flags = fl;
        for (size_t i = cap; i < ncap; i++) {
            po[i] = UINT32_MAX;
            pl[i] = 0;
            fl[i] = 0;
        }
        tok->ids_cap = (int32_t)ncap;
    }
    tok->n_ids = (int32_t)want;
    return 0;
}

/* Splits one merge entry into its two pieces. */
static int merge_parts(loader *L, const tj_val *m, size_t i, const char **a, size_t *al,
                       const char **b, size_t *bl) {
    if (m->type == TJ_STR) {
        const char *sp = memchr(m->u.s, ' ', m->n);
        if (!sp || memchr(sp + 1, ' ', m->n - (size_t)(sp + 1 - m->u.s))) {
            char where[64];
            snprintf(where, sizeof where, "model.merges[%zu]", i);
            return lfail(L, ST_ERR_FORMAT, where, "expected \"left right\" (one space)");
        }
        *a = m->u.s;
        *al = (size_t)(sp - m->u.s);
        *b = sp + 1;
        *bl = m->n - *al - 1;
        return 0;
    }
    if (m->type == TJ_ARR && m->n == 2 && m->u.a[0].type == TJ_STR && m->u.a[1].type == TJ_STR) {
        *a = m->u.a[0].u.s;
        *al = m->u.a[0].n;
        *b = m->u.a[1].u.s;
        *bl = m->u.a[1].n;
        return 0;
    }
    char where[64];
    snprintf(where, sizeof where, "model.merges[%zu]", i);
    return lfail(L, ST_ERR_FORMAT, where, "expected a \"left right\" string or a [left, right] pair");
}

/* Loads the BPE model: vocab (-> pool, id tables, piece map), options, merges (-> ranks),
 * byte-fallback ids and the single-code-point table. Errors name model.* paths. */
static int load_model(loader *L, const tj_val *model) {
    tok_tokenizer *tok = L->tok;
    char type[64];
    if (!model || model->type != TJ_OBJ)
        return lfail(L, ST_ERR_FORMAT, "model", "expected an object, found %s", tj_type_name(model));
    const tj_val *t = tj_get(model, "type");
    if (t) {
        int rc = get_type(L, model, "model", type, sizeof type);
        if (rc) return rc;
        if (strcmp(type, "BPE"))
            return lfail(L, ST_ERR_UNSUPPORTED, "model.type",
                         "model type \"%s\" is not supported (only BPE)", type);
    } else if (!tj_get(model, "merges")) {
        return lfail(L, ST_ERR_UNSUPPORTED, "model", "model without \"type\" is not a BPE model");
    }
    static const char *const known[] = {"type", "dropout", "unk_token", "continuing_subword_prefix",
                                        "end_of_word_suffix", "fuse_unk", "byte_fallback",
                                        "ignore_merges", "vocab", "merges", NULL};
    int rc = check_keys(L, model, "model", known);
    if (rc) return rc;
    const tj_val *dropout = tj_get(model, "dropout");
    if (!tj_is_null(dropout) && !(dropout->type == TJ_NUM &&
                                  (dropout->is_int ? dropout->u.i == 0 : dropout->u.d == 0.0)))
        return lfail(L, ST_ERR_UNSUPPORTED, "model.dropout",
                     "BPE dropout is random; only null/0 is supported");
    if ((rc = get_bool(L, model, "fuse_unk", 0, "model", &tok->fuse_unk)) ||
        (rc = get_bool(L, model, "byte_fallback", 0, "model", &tok->byte_fallback)) ||
        (rc = get_bool(L, model, "ignore_merges", 0, "model", &tok->ignore_merges)))
        return rc;

    /* vocab */
    const tj_val *vocab = tj_get(model, "vocab");
    if (!vocab || vocab->type != TJ_OBJ)
        return lfail(L, ST_ERR_FORMAT, "model.vocab", "expected an object, found %s",
                     tj_type_name(vocab));
    if (tok_smap_init(&tok->vocab, vocab->n) || tok_buf_reserve(&tok->pool, (size_t)vocab->n * 8))
        return lnomem(L);
    int64_t max_id = -1;
    for (uint32_t i = 0; i < vocab->n; i++) {
        int64_t id;
        if (tj_int(&vocab->u.o[i].val, &id) || id < 0) {
            char where[64];
            snprintf(where, sizeof where, "model.vocab[%u]", i);
            return lfail(L, ST_ERR_FORMAT, where, "id of \"%.*s\" must be a non-negative integer",
                         (int)vocab->u.o[i].key_len, vocab->u.o[i].key);
        }
        if (id > max_id) max_id = id;
    }
    if (max_id >= 0 && (rc = ensure_ids(L, max_id))) return rc;
    uint32_t *offs = malloc(((size_t)vocab->n + 1) * sizeof *offs);
    uint32_t *lens = malloc(((size_t)vocab->n + 1) * sizeof *lens);
    int32_t *vals = malloc(((size_t)vocab->n + 1) * sizeof *vals);
    if (!offs || !lens || !vals) rc = lnomem(L);
    for (uint32_t i = 0; !rc && i < vocab->n; i++) {
        const tj_mem *m = &vocab->u.o[i];
        int64_t id;
        tj_int(&m->val, &id);
        if ((rc = tok_pool_add(tok, m->key, m->key_len, &offs[i])))
            rc = rc == ST_ERR_NOMEM ? lnomem(L) : lfail(L, rc, "model.vocab", "too large");
        lens[i] = m->key_len;
        vals[i] = (int32_t)id;
        tok->piece_off[id] = offs[i];
        tok->piece_len[id] = m->key_len;
    }
    if (!rc && tok_smap_put_batch(&tok->vocab, tok->pool.p, offs, lens, vals, vocab->n))
        rc = lnomem(L);
    free(offs);
    free(lens);
    free(vals);
    if (rc) return rc;

    /* unk, prefix, suffix */
    tok->unk_id = -1;
    const tj_val *unk = tj_get(model, "unk_token");
    if (!tj_is_null(unk)) {
        if (unk->type != TJ_STR)
            return lfail(L, ST_ERR_FORMAT, "model.unk_token", "must be a string or null");
        tok->unk_id = vocab_id(tok, unk->u.s, unk->n);
        if (tok->unk_id < 0) tok->unk_missing = 1;
    }
    const tj_val *pre = tj_get(model, "continuing_subword_prefix");
    if (!tj_is_null(pre)) {
        if (pre->type != TJ_STR)
            return lfail(L, ST_ERR_FORMAT, "model.continuing_subword_prefix", "must be a string");
        tok->has_prefix = 1;
        if (tok_pool_add(tok, pre->u.s, pre->n, &tok->prefix_off)) return lnomem(L);
        tok->prefix_len = pre->n;
    }
    const tj_val *suf = tj_get(model, "end_of_word_suffix");
    if (!tj_is_null(suf)) {
        if (suf->type != TJ_STR)
            return lfail(L, ST_ERR_FORMAT, "model.end_of_word_suffix", "must be a string");
        tok->has_suffix = 1;
        if (tok_pool_add(tok, suf->u.s, suf->n, &tok->suffix_off)) return lnomem(L);
        tok->suffix_len = suf->n;
    }

    double t_vocab = st_time_s();
    /* merges -> (left id, right id) -> (rank, merged id) */
    const tj_val *merges = tj_get(model, "merges");
    if (tj_is_null(merges)) merges = NULL;
    else if (merges->type != TJ_ARR)
        return lfail(L, ST_ERR_FORMAT, "model.merges", "expected an array, found %s",
                     tj_type_name(merges));
    if (tok_pmap_init(&tok->merges, merges ? merges->n : 0)) return lnomem(L);
    /* in batches of MB merges, so the hash-table cache misses of a batch overlap */
    enum { MB = 64 };
    tok_buf cat = {0};
    uint32_t rank = 0, nm = merges ? merges->n : 0;
    size_t skip = tok->has_prefix ? tok->prefix_len : 0;
    for (uint32_t i0 = 0; i0 < nm && !rc; i0 += MB) {
        const char *a[MB], *b[MB], *keys[3 * MB];
        size_t al[MB], bl[MB], catoff[MB];
        uint32_t at[MB], klen[3 * MB], hashes[3 * MB], rk[MB];
        int32_t res[3 * MB], ia[MB], ib[MB], in[MB];
        size_t k = 0;
        cat.len = 0;
        for (uint32_t i = i0; i < nm && i < i0 + MB; i++) {
            const tj_val *m = &merges->u.a[i];
            if (m->type == TJ_STR && m->n >= 8 && !memcmp(m->u.s, "#version", 8)) continue;
            if ((rc = merge_parts(L, m, i, &a[k], &al[k], &b[k], &bl[k]))) break;
            if (bl[k] < skip) {
                char where[64];
                snprintf(where, sizeof where, "model.merges[%u]", i);
                rc = lfail(L, ST_ERR_FORMAT, where, "right piece shorter than the subword prefix");
                break;
            }
            catoff[k] = cat.len;
            if (tok_buf_append(&cat, a[k], al[k]) || tok_buf_append(&cat, b[k] + skip, bl[k] - skip)) {
                rc = lnomem(L);
                break;
            }
            at[k++] = i;
        }
        if (rc) break;
        for (size_t j = 0; j < k; j++) {
            keys[3 * j] = a[j];
            klen[3 * j] = (uint32_t)al[j];
            keys[3 * j + 1] = b[j];
            klen[3 * j + 1] = (uint32_t)bl[j];
            keys[3 * j + 2] = cat.p + catoff[j];
            klen[3 * j + 2] = (uint32_t)(al[j] + bl[j] - skip);
        }
        tok_smap_get_batch(&tok->vocab, tok->pool.p, keys, klen, 3 * k, hashes, res);
        for (size_t j = 0; j < k; j++) {
            int32_t *r = &res[3 * j];
            if (r[0] < 0 || r[1] < 0 || r[2] < 0) {
                int w = r[0] < 0 ? 0 : r[1] < 0 ? 1 : 2;
                char where[64];
                snprintf(where, sizeof where, "model.merges[%u]", at[j]);
                rc = lfail(L, ST_ERR_FORMAT, where, "%s\"%.*s\" is not in the vocab",
                           w == 2 ? "merged piece " : "", (int)klen[3 * j + w], keys[3 * j + w]);
                break;
            }
            ia[j] = r[0];
            ib[j] = r[1];
            in[j] = r[2];
            rk[j] = rank++;
        }
        if (!rc && tok_pmap_put_batch(&tok->merges, ia, ib, rk, in, k)) rc = lnomem(L);
    }
    tok_buf_free(&cat);
    if (rc) return rc;
    ST_DEBUG("%s: merges loaded in %.1f ms", L->name, (st_time_s() - t_vocab) * 1e3);

    /* byte fallback tokens <0x00>..<0xFF> and the single-code-point fast table */
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        tok->byte_tok[b] = vocab_id(tok, name, 6);
    }
    if (!(tok->char_id = malloc(0x800 * sizeof *tok->char_id))) return lnomem(L);
    for (uint32_t cp = 0; cp < 0x800; cp++) {
        char u[4];
        int n = tok_utf8_put(cp, u);
        tok->char_id[cp] = vocab_id(tok, u, (size_t)n);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* added tokens                                                                               */

static int load_added(loader *L, const tj_val *arr) {
    tok_tokenizer *tok = L->tok;
    if (tj_is_null(arr)) return 0;
    if (arr->type != TJ_ARR)
        return lfail(L, ST_ERR_FORMAT, "added_tokens", "expected an array, found %s",
                     tj_type_name(arr));
    if (!(tok->added = calloc(arr->n ? arr->n : 1, sizeof *tok->added))) return lnomem(L);
    if (tok_smap_init(&tok->added_map, arr->n)) return lnomem(L);
    /* HF: next id = vocab size (entries), or max added id + 1 once added ids pass it */
    int64_t vsize = tok->vocab.n, max_added = -1;
    int rc;
    for (uint32_t i = 0; i < arr->n; i++) {
        const tj_val *t = &arr->u.a[i];
        char path[64];
        snprintf(path, sizeof path, "added_tokens[%u]", i);
        if (t->type != TJ_OBJ) return lfail(L, ST_ERR_FORMAT, path, "expected an object");
        const char *content;
        uint32_t clen;
        int64_t jid;
        tok_added a = {0};
        if ((rc = get_str(L, t, "content", path, &content, &clen)) ||
            (rc = get_uint(L, t, "id", -1, path, &jid)) ||
            (rc = get_bool(L, t, "special", 0, path, &a.special)) ||
            (rc = get_bool(L, t, "lstrip", 0, path, &a.lstrip)) ||
            (rc = get_bool(L, t, "rstrip", 0, path, &a.rstrip)) ||
            (rc = get_bool(L, t, "normalized", !a.special, path, &a.normalized)) ||
            (rc = get_bool(L, t, "single_word", 0, path, &a.single_word)))
            return rc;
        if (!clen) continue; /* HF ignores empty added tokens */
        int32_t id = tok_smap_get(&tok->added_map, tok->pool.p, content, clen);
        int existing = id >= 0;
        if (id < 0) id = vocab_id(tok, content, clen);
        if (id < 0) {
            int64_t next = max_added < 0 ? vsize : (max_added >= vsize || vsize == 0) ? max_added + 1
                                                                                     : vsize;
            id = (int32_t)next;
        }
        if (jid >= 0 && jid != id)
            ST_WARN("%s: added token '%.*s' was expected to have id %lld but was given id %d (as HF "
                    "tokenizers does)",
                    L->name, (int)clen, content, (long long)jid, id);
        if ((rc = ensure_ids(L, id))) return rc;
        if (id > max_added) max_added = id;
        if (tok_pool_add(tok, content, clen, &a.off)) return lnomem(L);
        a.len = clen;
        a.norm_off = a.off;
        a.norm_len = a.len;
        a.id = id;
        if (existing) { /* same content again: the later flags win */
            for (size_t k = 0; k < tok->n_added; k++)
                if (tok->added[k].id == id) {
                    uint8_t was_special = tok->added[k].special;
                    tok->added[k] = a;
                    tok->added[k].special |= was_special; /* special set only grows */
                }
        } else {
            tok->added[tok->n_added++] = a;
            if (tok_smap_put(&tok->added_map, tok->pool.p, a.off, a.len, id)) return lnomem(L);
        }
        tok->piece_off[id] = a.off;
        tok->piece_len[id] = a.len;
        tok->id_flags[id] |= TOK_ID_ADDED;
    }
    return 0;
}

/* Normalizes normalized=true added tokens, builds both matchers and the special flags. */
static int match_build(loader *L, tok_match *m, int use_norm);

/* Completes the added tokens once the normalizer is known: normalized forms (for matching and
 * decoding), special flags, both matchers. */
static int finish_added(loader *L) {
    tok_tokenizer *tok = L->tok;
    int rc;
    if (tok->has_normalizer) {
        tok_buf b = {0};
        for (size_t i = 0; i < tok->n_added; i++) {
            tok_added *a = &tok->added[i];
            if (!a->normalized) continue;
            b.len = 0;
            if ((rc = tok_normalize_string(tok, tok->pool.p + a->off, a->len, &b, L->err))) {
                tok_buf_free(&b);
                return rc;
            }
            if (b.len == a->len && !memcmp(b.p, tok->pool.p + a->off, b.len)) continue;
            if (tok_pool_add(tok, b.p ? b.p : "", b.len, &a->norm_off)) {
                tok_buf_free(&b);
                return lnomem(L);
            }
            a->norm_len = (uint32_t)b.len;
            /* decoding uses the normalized form (AddedVocabulary::simple_id_to_token) */
            tok->piece_off[a->id] = a->norm_off;
            tok->piece_len[a->id] = a->norm_len;
        }
        tok_buf_free(&b);
    }
    /* special: the decode string equals a special token's content (is_special_token) */
    tok_smap special = {0};
    if (tok_smap_init(&special, tok->n_added)) return lnomem(L);
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].special &&
            tok_smap_put(&special, tok->pool.p, tok->added[i].off, tok->added[i].len, 1)) {
            tok_smap_free(&special);
            return lnomem(L);
        }
    for (size_t i = 0; i < tok->n_added; i++) {
        int32_t id = tok->added[i].id;
        if (tok_smap_get(&special, tok->pool.p, tok->pool.p + tok->piece_off[id],
                         tok->piece_len[id]) > 0)
            tok->id_flags[id] |= TOK_ID_SPECIAL;
        if (tok->added[i].special) {
            int32_t vid = vocab_id(tok, tok->pool.p + tok->added[i].off, tok->added[i].len);
            if (vid >= 0 && tok->piece_len[vid] == tok->added[i].len &&
                !memcmp(tok->pool.p + tok->piece_off[vid], tok->pool.p + tok->added[i].off,
                        tok->added[i].len))
                tok->id_flags[vid] |= TOK_ID_SPECIAL;
        }
    }
    tok_smap_free(&special);
    if ((rc = match_build(L, &tok->match_raw, 0)) || (rc = match_build(L, &tok->match_norm, 1)))
        return rc;
    return 0;
}

typedef struct match_sort {
    const tok_tokenizer *tok;
    int use_norm;
} match_sort;

/* qsort_r order of a matcher: first byte, longer first, then file order. */
static int match_cmp(const void *pa, const void *pb, void *ctx) {
    const match_sort *ms = ctx;
    uint32_t ia = *(const uint32_t *)pa, ib = *(const uint32_t *)pb;
    const tok_added *a = &ms->tok->added[ia], *b = &ms->tok->added[ib];
    uint32_t ao = ms->use_norm ? a->norm_off : a->off, al = ms->use_norm ? a->norm_len : a->len;
    uint32_t bo = ms->use_norm ? b->norm_off : b->off, bl = ms->use_norm ? b->norm_len : b->len;
    unsigned char fa = (unsigned char)ms->tok->pool.p[ao], fb = (unsigned char)ms->tok->pool.p[bo];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (al != bl) return al > bl ? -1 : 1;
    return ia < ib ? -1 : ia > ib;
}

/* Builds the matcher over the added tokens whose `normalized` flag equals use_norm. */
static int match_build(loader *L, tok_match *m, int use_norm) {
    tok_tokenizer *tok = L->tok;
    m->use_norm = (uint8_t)use_norm;
    if (!(m->idx = malloc((tok->n_added ? tok->n_added : 1) * sizeof *m->idx))) return lnomem(L);
    m->n = 0;
    for (size_t i = 0; i < tok->n_added; i++) {
        const tok_added *a = &tok->added[i];
        if (a->normalized != use_norm || !(use_norm ? a->norm_len : a->len)) continue;
        m->idx[m->n++] = (uint32_t)i;
    }
    match_sort ms = {tok, use_norm};
    qsort_r(m->idx, m->n, sizeof *m->idx, match_cmp, &ms);
    uint32_t k = 0;
    for (int b = 0; b < 256; b++) {
        m->first[b] = k;
        while (k < m->n) {
            const tok_added *a = &tok->added[m->idx[k]];
            if ((unsigned char)tok->pool.p[use_norm ? a->norm_off : a->off] != b) break;
            k++;
        }
    }
    m->first[256] = k;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* normalizers                                                                                */

static int load_normalizer(loader *L, const tj_val *v, const char *path) {
    tok_tokenizer *tok = L->tok;
    char type[64];
    int rc = get_type(L, v, path, type, sizeof type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const tj_val *items = tj_get(v, "normalizers");
        if (!items || items->type != TJ_ARR)
            return lfail(L, ST_ERR_FORMAT, path, "Sequence needs a \"normalizers\" array");
        for (uint32_t i = 0; i < items->n; i++) {
            char sub[512];
            path_idx(sub, sizeof sub, path, "normalizers", i);
            if ((rc = load_normalizer(L, &items->u.a[i], sub))) return rc;
        }
        return 0;
    }
    static const struct { const char *name; int type; } simple[] = {
        {"NFC", TOK_NORM_NFC}, {"NFD", TOK_NORM_NFD}, {"NFKC", TOK_NORM_NFKC},
        {"NFKD", TOK_NORM_NFKD}, {"Lowercase", TOK_NORM_LOWERCASE},
        {"StripAccents", TOK_NORM_STRIP_ACCENTS}, {"ByteLevel", TOK_NORM_BYTE_LEVEL},
        {"Replace", TOK_NORM_REPLACE}, {"Prepend", TOK_NORM_PREPEND}, {"Strip", TOK_NORM_STRIP},
    };
    int t = -1;
    for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++)
        if (!strcmp(type, simple[i].name)) t = simple[i].type;
    if (t < 0)
        return lfail(L, ST_ERR_UNSUPPORTED, path, "normalizer type \"%s\" is not supported", type);
    tok_norm *n = push_step((void **)&tok->norm, &tok->n_norm, sizeof *n);
    if (!n) return lnomem(L);
    n->type = t;
    if (t == TOK_NORM_REPLACE) {
        const char *s;
        uint32_t len;
        if ((rc = get_pattern(L, v, "pattern", path, &n->re, NULL)) ||
            (rc = get_str(L, v, "content", path, &s, &len)))
            return rc;
        if (tok_pool_add(tok, s, len, &n->str_off)) return lnomem(L);
        n->str_len = len;
    } else if (t == TOK_NORM_PREPEND) {
        const char *s;
        uint32_t len;
        if ((rc = get_str(L, v, "prepend", path, &s, &len))) return rc;
        if (tok_pool_add(tok, s, len, &n->str_off)) return lnomem(L);
        n->str_len = len;
    } else if (t == TOK_NORM_STRIP) {
        if ((rc = get_bool(L, v, "strip_left", 1, path, &n->left)) ||
            (rc = get_bool(L, v, "strip_right", 1, path, &n->right)))
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* pre-tokenizers                                                                             */

/* GPT-2's pattern, used by ByteLevel with use_regex (pre_tokenizers/byte_level.rs). */
static const char k_gpt2_re[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
/* Whitespace's \w+|[^\w\s]+ with the regex crate's Unicode classes spelled out. */
static const char k_ws_re[] =
    "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]+"
    "|[^\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}\\p{White_Space}]+";

/* Appends the pre-tokenizer at v (Sequences flattened) to tok->pre; errors name path. */
static int load_pretok(loader *L, const tj_val *v, const char *path) {
    tok_tokenizer *tok = L->tok;
    char type[64];
    int rc = get_type(L, v, path, type, sizeof type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const tj_val *items = tj_get(v, "pretokenizers");
        if (!items || items->type != TJ_ARR)
            return lfail(L, ST_ERR_FORMAT, path, "Sequence needs a \"pretokenizers\" array");
        for (uint32_t i = 0; i < items->n; i++) {
            char sub[512];
            path_idx(sub, sizeof sub, path, "pretokenizers", i);
            if ((rc = load_pretok(L, &items->u.a[i], sub))) return rc;
        }
        return 0;
    }
    static const struct { const char *name; int type; } types[] = {
        {"Split", TOK_PRE_SPLIT}, {"ByteLevel", TOK_PRE_BYTE_LEVEL}, {"Digits", TOK_PRE_DIGITS},
        {"Metaspace", TOK_PRE_METASPACE}, {"Whitespace", TOK_PRE_SPLIT},
        {"WhitespaceSplit", TOK_PRE_WHITESPACE_SPLIT}, {"Punctuation", TOK_PRE_PUNCTUATION},
        {"CharDelimiterSplit", TOK_PRE_CHAR_DELIMITER}, {"BertPreTokenizer", TOK_PRE_BERT},
    };
    int t = -1;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (!strcmp(type, types[i].name)) t = types[i].type;
    if (t < 0)
        return lfail(L, ST_ERR_UNSUPPORTED, path, "pre-tokenizer type \"%s\" is not supported",
                     type);
    tok_pre *p = push_step((void **)&tok->pre, &tok->n_pre, sizeof *p);
    if (!p) return lnomem(L);
    p->type = t;
    char full[600];
    snprintf(full, sizeof full, "%s: %s", L->name, path);
    switch (t) {
    case TOK_PRE_SPLIT:
        if (!strcmp(type, "Whitespace")) {
            p->behavior = TOK_SPLIT_REMOVED;
            p->invert = 1;
            return tok_regex_new(&p->re, k_ws_re, sizeof k_ws_re - 1, full, L->err);
        }
        if ((rc = get_pattern(L, v, "pattern", path, &p->re, &p->fast)) ||
            (rc = get_behavior(L, v, path, -1, &p->behavior)) ||
            (rc = get_bool(L, v, "invert", 0, path, &p->invert)))
            return rc;
        if (p->behavior == (uint8_t)-1)
            return lfail(L, ST_ERR_FORMAT, path, "Split needs a \"behavior\"");
        return 0;
    case TOK_PRE_BYTE_LEVEL: {
        uint8_t use_regex;
        if ((rc = get_bool(L, v, "add_prefix_space", 1, path, &p->add_prefix_space)) ||
            (rc = get_bool(L, v, "use_regex", 1, path, &use_regex)))
            return rc;
        if (!use_regex) return 0;
        if (fast_allowed()) p->fast = (uint8_t)tok_fast_kind(k_gpt2_re, sizeof k_gpt2_re - 1);
        return tok_regex_new(&p->re, k_gpt2_re, sizeof k_gpt2_re - 1, full, L->err);
        return 0;
    }
    case TOK_PRE_DIGITS:
        return get_bool(L, v, "individual_digits", 0, path, &p->individual_digits);
    case TOK_PRE_METASPACE:
        if ((rc = get_char(L, v, "replacement", path, &p->ch)) ||
            (rc = get_prepend_scheme(L, v, path, &p->prepend_scheme)) ||
            (rc = get_bool(L, v, "split", 1, path, &p->split)))
            return rc;
        return 0;
    case TOK_PRE_PUNCTUATION:
        return get_behavior(L, v, path, TOK_SPLIT_ISOLATED, &p->behavior);
    case TOK_PRE_CHAR_DELIMITER:
        return get_char(L, v, "delimiter", path, &p->ch);
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* post-processors                                                                            */

/* Id of a special token named by a post-processor ([name, id] pair of Bert/Roberta). */
static int get_pair_id(loader *L, const tj_val *v, const char *key, const char *path,
                       int32_t *id) {
    const tj_val *p = tj_get(v, key);
    int64_t x;
    if (!p || p->type != TJ_ARR || p->n != 2 || p->u.a[0].type != TJ_STR || tj_int(&p->u.a[1], &x) ||
        x < 0 || x >= TOK_MAX_IDS)
        return lfail(L, ST_ERR_FORMAT, path, "'%s' must be a [token, id] pair", key);
    *id = (int32_t)x;
    return 0;
}

/* Appends the post-processor at v (Sequences flattened, ByteLevel dropped) to tok->post. */
static int load_post(loader *L, const tj_val *v, const char *path) {
    tok_tokenizer *tok = L->tok;
    char type[64];
    int rc = get_type(L, v, path, type, sizeof type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const tj_val *items = tj_get(v, "processors");
        if (!items || items->type != TJ_ARR)
            return lfail(L, ST_ERR_FORMAT, path, "Sequence needs a \"processors\" array");
        for (uint32_t i = 0; i < items->n; i++) {
            char sub[512];
            path_idx(sub, sizeof sub, path, "processors", i);
            if ((rc = load_post(L, &items->u.a[i], sub))) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0; /* only trims offsets: ids are unchanged */
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        tok_post *p = push_step((void **)&tok->post, &tok->n_post, sizeof *p);
        if (!p) return lnomem(L);
        p->type = TOK_POST_PAIR_SPECIAL;
        return (rc = get_pair_id(L, v, "cls", path, &p->cls)) ? rc
                                                             : get_pair_id(L, v, "sep", path, &p->sep);
    }
    if (strcmp(type, "TemplateProcessing"))
        return lfail(L, ST_ERR_UNSUPPORTED, path, "post-processor type \"%s\" is not supported",
                     type);
    const tj_val *single = tj_get(v, "single"), *specials = tj_get(v, "special_tokens");
    char spath[512];
    path_key(spath, sizeof spath, path, "single");
    if (!single || single->type != TJ_ARR)
        return lfail(L, ST_ERR_FORMAT, spath, "expected an array of template pieces");
    tok_post *p = push_step((void **)&tok->post, &tok->n_post, sizeof *p);
    if (!p) return lnomem(L);
    p->type = TOK_POST_TEMPLATE;
    for (uint32_t i = 0; i < single->n; i++) {
        const tj_val *piece = &single->u.a[i];
        char ppath[600];
        snprintf(ppath, sizeof ppath, "%s[%u]", spath, i);
        const tj_val *seq = tj_get(piece, "Sequence"), *sp = tj_get(piece, "SpecialToken");
        if (seq) {
            const tj_val *id = tj_get(seq, "id");
            if (!tj_str_is(id, "A"))
                return lfail(L, ST_ERR_UNSUPPORTED, ppath,
                             "a single-sequence template can only use sequence A");
            int32_t *nt = realloc(p->tmpl, (p->n_tmpl + 1) * sizeof *nt);
            if (!nt) return lnomem(L);
            p->tmpl = nt;
            p->tmpl[p->n_tmpl++] = TOK_TMPL_SEQ;
            continue;
        }
        const tj_val *name = tj_get(sp, "id");
        if (!name || name->type != TJ_STR)
            return lfail(L, ST_ERR_FORMAT, ppath, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
        const tj_val *st = NULL;
        for (uint32_t k = 0; specials && specials->type == TJ_OBJ && k < specials->n; k++)
            if (specials->u.o[k].key_len == name->n &&
                !memcmp(specials->u.o[k].key, name->u.s, name->n))
                st = &specials->u.o[k].val;
        const tj_val *ids = tj_get(st, "ids");
        if (!ids || ids->type != TJ_ARR)
            return lfail(L, ST_ERR_FORMAT, ppath, "special token \"%.*s\" is not in special_tokens",
                         (int)name->n, name->u.s);
        int32_t *nt = realloc(p->tmpl, (p->n_tmpl + ids->n + 1) * sizeof *nt);
        if (!nt) return lnomem(L);
        p->tmpl = nt;
        for (uint32_t k = 0; k < ids->n; k++) {
            int64_t x;
            if (tj_int(&ids->u.a[k], &x) || x < 0 || x >= TOK_MAX_IDS)
                return lfail(L, ST_ERR_FORMAT, ppath, "bad id in special token \"%.*s\"",
                             (int)name->n, name->u.s);
            p->tmpl[p->n_tmpl++] = (int32_t)x;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* decoders                                                                                   */

static int load_decoder(loader *L, const tj_val *v, const char *path) {
    tok_tokenizer *tok = L->tok;
    char type[64];
    int rc = get_type(L, v, path, type, sizeof type);
    if (rc) return rc;
    if (!strcmp(type, "Sequence")) {
        const tj_val *items = tj_get(v, "decoders");
        if (!items || items->type != TJ_ARR)
            return lfail(L, ST_ERR_FORMAT, path, "Sequence needs a \"decoders\" array");
        for (uint32_t i = 0; i < items->n; i++) {
            char sub[512];
            path_idx(sub, sizeof sub, path, "decoders", i);
            if ((rc = load_decoder(L, &items->u.a[i], sub))) return rc;
        }
        return 0;
    }
    static const struct { const char *name; int type; } types[] = {
        {"ByteLevel", TOK_DEC_BYTE_LEVEL}, {"Replace", TOK_DEC_REPLACE},
        {"ByteFallback", TOK_DEC_BYTE_FALLBACK}, {"Fuse", TOK_DEC_FUSE},
        {"Strip", TOK_DEC_STRIP}, {"Metaspace", TOK_DEC_METASPACE},
    };
    int t = -1;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (!strcmp(type, types[i].name)) t = types[i].type;
    if (t < 0)
        return lfail(L, ST_ERR_UNSUPPORTED, path, "decoder type \"%s\" is not supported", type);
    tok_dec *d = push_step((void **)&tok->dec, &tok->n_dec, sizeof *d);
    if (!d) return lnomem(L);
    d->type = t;
    if (t == TOK_DEC_REPLACE) {
        const char *s;
        uint32_t len;
        if ((rc = get_pattern(L, v, "pattern", path, &d->re, NULL)) ||
            (rc = get_str(L, v, "content", path, &s, &len)))
            return rc;
        if (tok_pool_add(tok, s, len, &d->str_off)) return lnomem(L);
        d->str_len = len;
    } else if (t == TOK_DEC_STRIP) {
        int64_t start, stop;
        if ((rc = get_char(L, v, "content", path, &d->ch)) ||
            (rc = get_uint(L, v, "start", 0, path, &start)) ||
            (rc = get_uint(L, v, "stop", 0, path, &stop)))
            return rc;
        d->start = start > UINT32_MAX ? UINT32_MAX : (uint32_t)start;
        d->stop = stop > UINT32_MAX ? UINT32_MAX : (uint32_t)stop;
    } else if (t == TOK_DEC_METASPACE) {
        if ((rc = get_char(L, v, "replacement", path, &d->ch)) ||
            (rc = get_prepend_scheme(L, v, path, &d->prepend_scheme)))
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                               */

int tok_load_buffer(tok_tokenizer **out, const char *json, size_t len, const char *name,
                    st_err *err) {
    *out = NULL;
    if (!name) name = "tokenizer.json";
    tj_doc doc;
    double t0 = st_time_s();
    int rc = tj_parse(&doc, json, len, name, err);
    if (rc) return rc;
    double t_parse = st_time_s();
    tok_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        tj_free(&doc);
        return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", name);
    }
    snprintf(tok->name, sizeof tok->name, "%s", name);
    tok->unk_id = -1;
    loader L = {tok, err, name};
    const tj_val *root = &doc.root;
    if (root->type != TJ_OBJ) {
        rc = lfail(&L, ST_ERR_FORMAT, "(root)", "expected an object, found %s", tj_type_name(root));
        goto done;
    }
    if ((rc = load_model(&L, tj_get(root, "model")))) goto done;
    double t_model = st_time_s();
    if ((rc = load_added(&L, tj_get(root, "added_tokens")))) goto done;
    const tj_val *v;
    if (!tj_is_null(v = tj_get(root, "normalizer"))) {
        tok->has_normalizer = 1;
        if ((rc = load_normalizer(&L, v, "normalizer"))) goto done;
    }
    if (!tj_is_null(v = tj_get(root, "pre_tokenizer")) && (rc = load_pretok(&L, v, "pre_tokenizer")))
        goto done;
    if (!tj_is_null(v = tj_get(root, "post_processor")) &&
        (rc = load_post(&L, v, "post_processor")))
        goto done;
    if (!tj_is_null(v = tj_get(root, "decoder"))) {
        tok->has_decoder = 1;
        if ((rc = load_decoder(&L, v, "decoder"))) goto done;
    }
    tok->bytelevel_only_decoder = tok->n_dec == 1 && tok->dec[0].type == TOK_DEC_BYTE_LEVEL;
    if (!tj_is_null(tj_get(root, "truncation")) || !tj_is_null(tj_get(root, "padding")))
        ST_WARN("%s: truncation/padding settings are ignored (strata encodes whole sequences, as "
                "transformers does unless asked)",
                name);
    for (size_t i = 0; i < tok->n_post; i++)
        for (size_t k = 0; k < tok->post[i].n_tmpl; k++)
            if (tok->post[i].tmpl[k] >= 0 && (rc = ensure_ids(&L, tok->post[i].tmpl[k])))
                goto done;
    rc = finish_added(&L);
    ST_DEBUG("%s: JSON parsed in %.1f ms, model built in %.1f ms, rest %.1f ms", name,
             (t_parse - t0) * 1e3, (t_model - t_parse) * 1e3, (st_time_s() - t_model) * 1e3);
done:
    tj_free(&doc);
    if (rc) {
        tok_free(tok);
        return rc;
    }
    *out = tok;
    return 0;
}

/* See strata/tok.h: the file is mapped only for the duration of the call. */
int tok_load(tok_tokenizer **out, const char *path, st_err *err) {
    st_mmap m;
    *out = NULL;
    /* mapped, not read: reading 11 MB through stdio costs more than parsing it */
    int rc = st_mmap_open(&m, path, err);
    if (rc) return rc;
    if (m.data) madvise(m.data, m.size, MADV_SEQUENTIAL | MADV_WILLNEED);
    rc = tok_load_buffer(out, m.data ? m.data : "", m.size, path, err);
    st_mmap_close(&m);
    return rc;
}

/* See tok_internal.h. */
void tok_norms_free(tok_norm *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (v[i].re) onig_free(v[i].re);
    free(v);
}

/* See tok_internal.h. */
void tok_pres_free(tok_pre *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (v[i].re) onig_free(v[i].re);
    free(v);
}

/* See tok_internal.h. */
void tok_decs_free(tok_dec *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (v[i].re) onig_free(v[i].re);
    free(v);
}

/* See strata/tok.h (also frees partially loaded tokenizers). */
void tok_free(tok_tokenizer *tok) {
    if (!tok) return;
    tok_buf_free(&tok->pool);
    free(tok->piece_off);
    free(tok->piece_len);
    free(tok->id_flags);
    tok_smap_free(&tok->vocab);
    tok_pmap_free(&tok->merges);
    free(tok->char_id);
    free(tok->added);
    tok_smap_free(&tok->added_map);
    free(tok->match_raw.idx);
    free(tok->match_norm.idx);
    tok_norms_free(tok->norm, tok->n_norm);
    tok_pres_free(tok->pre, tok->n_pre);
    for (size_t i = 0; i < tok->n_post; i++) free(tok->post[i].tmpl);
    free(tok->post);
    tok_decs_free(tok->dec, tok->n_dec);
    free(tok);
}

/* ------------------------------------------------------------------------------------------ */
/* lookups                                                                                    */

int32_t tok_token_id(const tok_tokenizer *tok, const char *piece) {
    size_t n = strlen(piece);
    int32_t id = tok_smap_get(&tok->added_map, tok->pool.p, piece, n);
    return id >= 0 ? id : tok_smap_get(&tok->vocab, tok->pool.p, piece, n);
}

/* See strata/tok.h: the string is borrowed from tok. */
const char *tok_piece(const tok_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_ids || tok->piece_off[id] == UINT32_MAX) return NULL;
    if (len) *len = tok->piece_len[id];
    return tok->pool.p + tok->piece_off[id];
}

/* See strata/tok.h. */
int32_t tok_vocab_size(const tok_tokenizer *tok) { return tok->n_ids; }

/* See strata/tok.h. */
int tok_is_special(const tok_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_ids && (tok->id_flags[id] & TOK_ID_SPECIAL) != 0;
}
