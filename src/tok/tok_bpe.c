/* tok_bpe.c — the BPE model: one pre-tokenized word -> ids (HF models/bpe/model.rs, word.rs).
 *
 *   ignore_merges     a word that is itself a vocab piece is one token (Llama 3)
 *   merge_word        one symbol per char (continuing_subword_prefix on all but the first,
 *                     end_of_word_suffix on the last), byte_fallback to <0xXX> tokens, unk
 *                     tokens (fused with fuse_unk), unknown chars dropped when there is no unk
 *   merge_all         repeatedly merge the adjacent pair of lowest rank (leftmost on ties),
 *                     a binary heap of candidate merges with stale entries skipped, as Word does
 *
 * A per-call cache maps words already seen in this encode to their ids (HF keeps a similar
 * cache per model; ours is per call so a tokenizer stays immutable and thread-safe).
 */
#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct sym {
    int32_t id;
    int32_t prev, next;  /* -1: none */
    uint32_t len;        /* bytes of the word covered; 0: merged away */
} sym;

typedef struct merge {
    uint32_t rank;
    uint32_t pos;
    int32_t new_id;
} merge;

typedef struct tok_cache_slot {
    uint32_t hash;       /* 0: empty */
    uint32_t key_off, key_len;  /* in ctx->cache_keys */
    uint32_t ids_off, n_ids;    /* in ctx->cache_ids */
} tok_cache_slot;

#define CACHE_MAX_WORD 256       /* HF's MAX_LENGTH for cached words */
#define CACHE_MAX_SLOTS (1u << 20)
#define CACHE_START_AFTER 64     /* words encoded before the cache is worth allocating */

static int nomem(tok_ctx *c) { return st_err_set(c->err, ST_ERR_NOMEM, "out of memory in BPE"); }

/* ------------------------------------------------------------------------------------------ */
/* heap of merges, ordered by (rank, pos)                                                     */

static inline int merge_less(const merge *a, const merge *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

/* Pushes m onto the min-heap h[0..*n) (room is guaranteed by scratch()). */
static void heap_push(merge *h, size_t *n, merge m) {
    size_t i = (*n)++;
    while (i) {
        size_t p = (i - 1) / 2;
        if (!merge_less(&m, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

/* Removes and returns the smallest entry of the non-empty heap h[0..*n). */
static merge heap_pop(merge *h, size_t *n) {
    merge top = h[0], last = h[--(*n)];
    size_t i = 0, len = *n;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const merge *best = &last;
        if (l < len && merge_less(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < len && merge_less(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (len) h[i] = last;
    return top;
}

/* ------------------------------------------------------------------------------------------ */
/* merge_word                                                                                 */

/* Ensures room for n symbols and the heap that goes with them. */
static int scratch(tok_ctx *c, size_t n) {
    if (n > c->syms_cap) {
        size_t cap = c->syms_cap ? c->syms_cap : 64;
        while (cap < n) cap *= 2;
        void *s = realloc(c->syms, cap * sizeof(sym));
        if (!s) return nomem(c);
        c->syms = s;
        c->syms_cap = cap;
    }
    /* every merge pushes at most 2 entries, plus the initial n - 1 */
    size_t hn = 3 * n + 4;
    if (hn > c->heap_cap) {
        size_t cap = c->heap_cap ? c->heap_cap : 256;
        while (cap < hn) cap *= 2;
        void *h = realloc(c->heap, cap * sizeof(merge));
        if (!h) return nomem(c);
        c->heap = h;
        c->heap_cap = cap;
    }
    return 0;
}

/* Vocab id of (prefix?) + s[0..n) + (suffix?); -1 if absent. */
static int32_t piece_id(tok_ctx *c, const char *s, size_t n, int add_prefix, int add_suffix,
                        tok_buf *tmp, int *oom) {
    const tok_tokenizer *tok = c->tok;
    if (!add_prefix && !add_suffix) {
        if (n <= 2 && (unsigned char)s[0] < 0xE0) {
            uint32_t cp;
            tok_utf8_next(s, &cp);
            if (cp < 0x800) return tok->char_id[cp];
        }
        return tok_smap_get(&tok->vocab, tok->pool.p, s, n);
    }
    tmp->len = 0;
    if ((add_prefix && tok_buf_append(tmp, tok->pool.p + tok->prefix_off, tok->prefix_len)) ||
        tok_buf_append(tmp, s, n) ||
        (add_suffix && tok_buf_append(tmp, tok->pool.p + tok->suffix_off, tok->suffix_len))) {
        *oom = 1;
        return -1;
    }
    return tok_smap_get(&tok->vocab, tok->pool.p, tmp->p, tmp->len);
}

/* Appends a symbol (id covering len bytes). */
static inline void sym_add(sym *v, size_t *n, int32_t id, uint32_t len) {
    size_t i = (*n)++;
    v[i] = (sym){id, (int32_t)i - 1, (int32_t)i + 1, len};
}

/* HF's BPE::merge_word followed by Word::merge_all; appends the ids to c->out. */
static int merge_word(tok_ctx *c, const char *w, size_t len) {
    const tok_tokenizer *tok = c->tok;
    /* a char may expand to up to 4 byte-fallback symbols (+prefix/suffix bytes) */
    size_t max_syms = len * 4 + (tok->has_prefix ? tok->prefix_len * len : 0) + tok->suffix_len + 4;
    int rc = scratch(c, max_syms);
    if (rc) return rc;
    sym *sy = c->syms;
    size_t n = 0;
    int32_t unk_id = -1;
    uint32_t unk_len = 0;
    tok_buf tmp = {0};
    int oom = 0;
    for (size_t i = 0; i < len;) {
        size_t k = (size_t)tok_utf8_len((unsigned char)w[i]);
        if (k > len - i) k = len - i;
        int first = i == 0, last = i + k == len;
        int add_prefix = !first && tok->has_prefix && tok->prefix_len;
        int add_suffix = last && tok->has_suffix && tok->suffix_len;
        int32_t id = piece_id(c, w + i, k, add_prefix, add_suffix, &tmp, &oom);
        if (oom) goto oom;
        if (id >= 0) {
            if (unk_id >= 0) {
                sym_add(sy, &n, unk_id, unk_len);
                unk_id = -1;
            }
            sym_add(sy, &n, id, (uint32_t)k);
            i += k;
            continue;
        }
        if (tok->byte_fallback) {
            /* the bytes of the full piece string (prefix/suffix included), all or nothing */
            const char *ps = w + i;
            size_t pn = k;
            if (add_prefix || add_suffix) {
                ps = tmp.p;
                pn = tmp.len;
            }
            size_t b = 0;
            while (b < pn && tok->byte_tok[(unsigned char)ps[b]] >= 0) b++;
            if (b == pn) {
                for (b = 0; b < pn; b++) sym_add(sy, &n, tok->byte_tok[(unsigned char)ps[b]], 1);
                i += k;
                continue;
            }
        }
        if (tok->unk_id >= 0 || tok->unk_missing) {
            if (tok->unk_missing) {
                tok_buf_free(&tmp);
                return st_err_set(c->err, ST_ERR_MISSING,
                                  "%s: the model's unk_token is not in the vocab", tok->name);
            }
            if (unk_id >= 0 && tok->fuse_unk) {
                unk_len += (uint32_t)k;
            } else {
                if (unk_id >= 0) sym_add(sy, &n, unk_id, unk_len);
                unk_id = tok->unk_id;
                unk_len = (uint32_t)k;
            }
        }
        /* no unk token: the char is dropped, as HF does */
        i += k;
    }
    tok_buf_free(&tmp);
    if (unk_id >= 0) sym_add(sy, &n, unk_id, unk_len);
    if (!n) return 0;
    sy[n - 1].next = -1;

    /* Word::merge_all */
    merge *heap = c->heap;
    size_t hn = 0;
    /* the first lookups miss the cache (a 4 MB table): start them all before using any */
    for (size_t i = 0; i + 1 < n; i++) tok_pmap_prefetch(&tok->merges, sy[i].id, sy[i + 1].id);
    for (size_t i = 0; i + 1 < n; i++) {
        const tok_pmap_slot *m = tok_pmap_get(&tok->merges, sy[i].id, sy[i + 1].id);
        if (m) heap_push(heap, &hn, (merge){m->rank, (uint32_t)i, m->new_id});
    }
    while (hn) {
        merge top = heap_pop(heap, &hn);
        sym *cur = &sy[top.pos];
        if (!cur->len || cur->next < 0) continue;
        int32_t next_pos = cur->next;
        sym right = sy[next_pos];
        const tok_pmap_slot *m = tok_pmap_get(&tok->merges, cur->id, right.id);
        if (!m || m->new_id != top.new_id) continue; /* stale entry */
        cur->id = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        sy[next_pos].len = 0;
        if (right.next >= 0) sy[right.next].prev = (int32_t)top.pos;
        if (cur->prev >= 0) tok_pmap_prefetch(&tok->merges, sy[cur->prev].id, cur->id);
        if (cur->next >= 0) tok_pmap_prefetch(&tok->merges, cur->id, sy[cur->next].id);
        if (cur->prev >= 0) {
            const tok_pmap_slot *pm = tok_pmap_get(&tok->merges, sy[cur->prev].id, cur->id);
            if (pm) heap_push(heap, &hn, (merge){pm->rank, (uint32_t)cur->prev, pm->new_id});
        }
        if (cur->next >= 0) {
            const tok_pmap_slot *nm = tok_pmap_get(&tok->merges, cur->id, sy[cur->next].id);
            if (nm) heap_push(heap, &hn, (merge){nm->rank, top.pos, nm->new_id});
        }
    }
    for (int32_t i = 0; i >= 0; i = sy[i].next)
        if (tok_ids_append(&c->out, &sy[i].id, 1)) return nomem(c);
    return 0;
oom:
    tok_buf_free(&tmp);
    return nomem(c);
}

/* ------------------------------------------------------------------------------------------ */
/* word cache                                                                                 */

static tok_cache_slot *cache_find(tok_ctx *c, const char *w, size_t len, uint32_t h) {
    uint32_t i = h & c->cache_mask;
    for (;;) {
        tok_cache_slot *s = &c->cache[i];
        if (!s->hash) return s;
        if (s->hash == h && s->key_len == len && !memcmp(c->cache_keys.p + s->key_off, w, len))
            return s;
        i = (i + 1) & c->cache_mask;
    }
}

/* Doubles the cache table (or allocates it). 0 or ST_ERR_NOMEM. */
static int cache_grow(tok_ctx *c) {
    uint32_t cap = c->cache ? (c->cache_mask + 1) * 2 : 4096;
    tok_cache_slot *ns = calloc(cap, sizeof *ns);
    if (!ns) return ST_ERR_NOMEM;
    for (uint32_t i = 0; c->cache && i <= c->cache_mask; i++) {
        tok_cache_slot *s = &c->cache[i];
        if (!s->hash) continue;
        uint32_t j = s->hash & (cap - 1);
        while (ns[j].hash) j = (j + 1) & (cap - 1);
        ns[j] = *s;
    }
    free(c->cache);
    c->cache = ns;
    c->cache_mask = cap - 1;
    return 0;
}

/* See tok_internal.h. Fails with ST_ERR_NOMEM or ST_ERR_MISSING (unk_token not in the vocab). */
int tok_bpe_word(tok_ctx *c, const char *w, size_t len) {
    const tok_tokenizer *tok = c->tok;
    if (!len) return 0;
    if (tok->ignore_merges) {
        int32_t id = tok_smap_get(&tok->vocab, tok->pool.p, w, len);
        if (id >= 0) return tok_ids_append(&c->out, &id, 1) ? nomem(c) : 0;
    }
    if (len > CACHE_MAX_WORD) return merge_word(c, w, len);
    uint32_t h = 0;
    tok_cache_slot *slot = NULL;
    if (c->cache) {
        h = tok_hash(w, len);
        slot = cache_find(c, w, len, h);
        if (slot->hash)
            return tok_ids_append(&c->out, c->cache_ids.v + slot->ids_off, slot->n_ids) ? nomem(c)
                                                                                      : 0;
    } else if (++c->cache_n >= CACHE_START_AFTER) {
        c->cache_n = 0;
        if (cache_grow(c)) return nomem(c);
        h = tok_hash(w, len);
        slot = cache_find(c, w, len, h);
    }
    size_t before = c->out.n;
    int rc = merge_word(c, w, len);
    if (rc || !slot) return rc;
    /* remember the word (the table stays at most ~70% full and below CACHE_MAX_SLOTS) */
    if ((size_t)(c->cache_n + 1) * 10 > (size_t)(c->cache_mask + 1) * 7) {
        if (c->cache_mask + 1 >= CACHE_MAX_SLOTS) return 0;
        if (cache_grow(c)) return 0; /* a cache is optional */
        slot = cache_find(c, w, len, h);
    }
    size_t n_ids = c->out.n - before;
    if (c->cache_keys.len + len > UINT32_MAX || c->cache_ids.n + n_ids > UINT32_MAX) return 0;
    uint32_t key_off = (uint32_t)c->cache_keys.len, ids_off = (uint32_t)c->cache_ids.n;
    if (tok_buf_append(&c->cache_keys, w, len)) return 0;
    if (tok_ids_append(&c->cache_ids, c->out.v + before, n_ids)) return 0;
    *slot = (tok_cache_slot){h, key_off, (uint32_t)len, ids_off, (uint32_t)n_ids};
    c->cache_n++;
    return 0;
}

/* Frees the BPE scratch and the word cache of c (c stays reusable). */
void tok_bpe_ctx_free(tok_ctx *c) {
    free(c->syms);
    free(c->heap);
    free(c->cache);
    tok_buf_free(&c->cache_keys);
    free(c->cache_ids.v);
    c->syms = c->heap = NULL;
    c->cache = NULL;
    c->syms_cap = c->heap_cap = 0;
    memset(&c->cache_ids, 0, sizeof c->cache_ids);
}
