/* tok_util.c — byte buffers, UTF-8, Unicode predicates, hash maps and the regex wrapper of the
 * tokenizer module (see tok_internal.h). */
#include "tok/tok_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* The contracts of this file's exported functions are in tok_internal.h. */

/* ------------------------------------------------------------------------------------------ */
/* buffers                                                                                    */

int tok_buf_reserve(tok_buf *b, size_t extra) {
    if (b->cap - b->len > extra) return 0; /* keeps room for a NUL */
    size_t need = b->len + extra + 1, cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return ST_ERR_NOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int tok_buf_append(tok_buf *b, const void *s, size_t n) {
    if (tok_buf_reserve(b, n)) return ST_ERR_NOMEM;
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int tok_buf_append_cp(tok_buf *b, uint32_t cp) {
    char u[4];
    return tok_buf_append(b, u, (size_t)tok_utf8_put(cp, u));
}

void tok_buf_free(tok_buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

int tok_ids_append(tok_ids *a, const int32_t *ids, size_t n) {
    if (a->cap - a->n < n) {
        size_t cap = a->cap ? a->cap : 64;
        while (cap - a->n < n) cap *= 2;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return ST_ERR_NOMEM;
        a->v = v;
        a->cap = cap;
    }
    if (n) memcpy(a->v + a->n, ids, n * sizeof *ids);
    a->n += n;
    return 0;
}

int tok_splits_push(tok_splits *s, uint32_t off, uint32_t len, int32_t id, uint8_t first) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        tok_split *v = realloc(s->v, cap * sizeof *v);
        if (!v) return ST_ERR_NOMEM;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = (tok_split){off, len, id, first};
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                      */

int tok_utf8_next(const char *s, uint32_t *cp) {
    const unsigned char *u = (const unsigned char *)s;
    if (u[0] < 0x80) {
        *cp = u[0];
        return 1;
    }
    if (u[0] < 0xE0) {
        *cp = (uint32_t)(u[0] & 0x1F) << 6 | (u[1] & 0x3F);
        return 2;
    }
    if (u[0] < 0xF0) {
        *cp = (uint32_t)(u[0] & 0x0F) << 12 | (uint32_t)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
        return 3;
    }
    *cp = (uint32_t)(u[0] & 0x07) << 18 | (uint32_t)(u[1] & 0x3F) << 12 |
          (uint32_t)(u[2] & 0x3F) << 6 | (u[3] & 0x3F);
    return 4;
}

int tok_utf8_put(uint32_t cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Follows core::str::validations (run_utf8_validation) and Utf8Chunks' error lengths. */
int tok_utf8_step(const unsigned char *s, size_t n, size_t *adv) {
    unsigned char b0 = s[0];
    if (b0 < 0x80) {
        *adv = 1;
        return TOK_UTF8_OK;
    }
    int w = (b0 >= 0xC2 && b0 <= 0xDF) ? 2 : (b0 >= 0xE0 && b0 <= 0xEF) ? 3
          : (b0 >= 0xF0 && b0 <= 0xF4) ? 4 : 0;
    *adv = 1;
    if (!w) return TOK_UTF8_BAD;
    if (n < 2) return TOK_UTF8_SHORT;
    unsigned char b1 = s[1];
    if (w == 2) {
        if ((b1 & 0xC0) != 0x80) return TOK_UTF8_BAD;
        *adv = 2;
        return TOK_UTF8_OK;
    }
    int ok1;
    if (w == 3)
        ok1 = (b0 == 0xE0 && b1 >= 0xA0 && b1 <= 0xBF) ||
              (b0 >= 0xE1 && b0 <= 0xEC && b1 >= 0x80 && b1 <= 0xBF) ||
              (b0 == 0xED && b1 >= 0x80 && b1 <= 0x9F) ||
              (b0 >= 0xEE && b0 <= 0xEF && b1 >= 0x80 && b1 <= 0xBF);
    else
        ok1 = (b0 == 0xF0 && b1 >= 0x90 && b1 <= 0xBF) ||
              (b0 >= 0xF1 && b0 <= 0xF3 && b1 >= 0x80 && b1 <= 0xBF) ||
              (b0 == 0xF4 && b1 >= 0x80 && b1 <= 0x8F);
    if (!ok1) return TOK_UTF8_BAD;
    if (n < 3) return TOK_UTF8_SHORT;
    if ((s[2] & 0xC0) != 0x80) {
        *adv = 2;
        return TOK_UTF8_BAD;
    }
    if (w == 3) {
        *adv = 3;
        return TOK_UTF8_OK;
    }
    if (n < 4) return TOK_UTF8_SHORT;
    if ((s[3] & 0xC0) != 0x80) {
        *adv = 3;
        return TOK_UTF8_BAD;
    }
    *adv = 4;
    return TOK_UTF8_OK;
}

size_t tok_utf8_check(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, u + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t adv;
        if (tok_utf8_step(u + i, n - i, &adv) != TOK_UTF8_OK) return i;
        i += adv;
    }
    return n;
}

size_t tok_utf8_lossy(tok_buf *out, const char *s, size_t n, int final) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0; /* valid bytes u[run..i) not yet copied */
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    while (i < n) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t adv;
        int r = tok_utf8_step(u + i, n - i, &adv);
        if (r == TOK_UTF8_OK) {
            i += adv;
            continue;
        }
        if (tok_buf_append(out, s + run, i - run)) return (size_t)-1;
        if (r == TOK_UTF8_SHORT) {
            if (!final) return i;
            if (tok_buf_append(out, repl, 3)) return (size_t)-1;
            return n;
        }
        if (tok_buf_append(out, repl, 3)) return (size_t)-1;
        i += adv;
        run = i;
    }
    if (tok_buf_append(out, s + run, n - run)) return (size_t)-1;
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Unicode predicates                                                                         */

int tok_uni_is_whitespace(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

int tok_uni_is_numeric(uint32_t c) {
    if (c < 0x80) return c >= '0' && c <= '9';
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

int tok_uni_is_punct(uint32_t c) {
    if (c < 0x80)
        return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
               (c >= 0x7B && c <= 0x7E);
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_PC || k == UTF8PROC_CATEGORY_PD || k == UTF8PROC_CATEGORY_PS ||
           k == UTF8PROC_CATEGORY_PE || k == UTF8PROC_CATEGORY_PI || k == UTF8PROC_CATEGORY_PF ||
           k == UTF8PROC_CATEGORY_PO;
}

int tok_uni_is_mark(uint32_t c) {
    if (c < 0x300) return 0;
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_MC || k == UTF8PROC_CATEGORY_ME;
}

/* GPT-2's bytes_to_unicode(). */
const uint16_t tok_byte_to_cp[256] = {
    0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10A, 0x10B,
    0x10C, 0x10D, 0x10E, 0x10F, 0x110, 0x111, 0x112, 0x113, 0x114, 0x115, 0x116, 0x117,
    0x118, 0x119, 0x11A, 0x11B, 0x11C, 0x11D, 0x11E, 0x11F, 0x120, 0x021, 0x022, 0x023,
    0x024, 0x025, 0x026, 0x027, 0x028, 0x029, 0x02A, 0x02B, 0x02C, 0x02D, 0x02E, 0x02F,
    0x030, 0x031, 0x032, 0x033, 0x034, 0x035, 0x036, 0x037, 0x038, 0x039, 0x03A, 0x03B,
    0x03C, 0x03D, 0x03E, 0x03F, 0x040, 0x041, 0x042, 0x043, 0x044, 0x045, 0x046, 0x047,
    0x048, 0x049, 0x04A, 0x04B, 0x04C, 0x04D, 0x04E, 0x04F, 0x050, 0x051, 0x052, 0x053,
    0x054, 0x055, 0x056, 0x057, 0x058, 0x059, 0x05A, 0x05B, 0x05C, 0x05D, 0x05E, 0x05F,
    0x060, 0x061, 0x062, 0x063, 0x064, 0x065, 0x066, 0x067, 0x068, 0x069, 0x06A, 0x06B,
    0x06C, 0x06D, 0x06E, 0x06F, 0x070, 0x071, 0x072, 0x073, 0x074, 0x075, 0x076, 0x077,
    0x078, 0x079, 0x07A, 0x07B, 0x07C, 0x07D, 0x07E, 0x121, 0x122, 0x123, 0x124, 0x125,
    0x126, 0x127, 0x128, 0x129, 0x12A, 0x12B, 0x12C, 0x12D, 0x12E, 0x12F, 0x130, 0x131,
    0x132, 0x133, 0x134, 0x135, 0x136, 0x137, 0x138, 0x139, 0x13A, 0x13B, 0x13C, 0x13D,
    0x13E, 0x13F, 0x140, 0x141, 0x142, 0x0A1, 0x0A2, 0x0A3, 0x0A4, 0x0A5, 0x0A6, 0x0A7,
    0x0A8, 0x0A9, 0x0AA, 0x0AB, 0x0AC, 0x143, 0x0AE, 0x0AF, 0x0B0, 0x0B1, 0x0B2, 0x0B3,
    0x0B4, 0x0B5, 0x0B6, 0x0B7, 0x0B8, 0x0B9, 0x0BA, 0x0BB, 0x0BC, 0x0BD, 0x0BE, 0x0BF,
    0x0C0, 0x0C1, 0x0C2, 0x0C3, 0x0C4, 0x0C5, 0x0C6, 0x0C7, 0x0C8, 0x0C9, 0x0CA, 0x0CB,
    0x0CC, 0x0CD, 0x0CE, 0x0CF, 0x0D0, 0x0D1, 0x0D2, 0x0D3, 0x0D4, 0x0D5, 0x0D6, 0x0D7,
    0x0D8, 0x0D9, 0x0DA, 0x0DB, 0x0DC, 0x0DD, 0x0DE, 0x0DF, 0x0E0, 0x0E1, 0x0E2, 0x0E3,
    0x0E4, 0x0E5, 0x0E6, 0x0E7, 0x0E8, 0x0E9, 0x0EA, 0x0EB, 0x0EC, 0x0ED, 0x0EE, 0x0EF,
    0x0F0, 0x0F1, 0x0F2, 0x0F3, 0x0F4, 0x0F5, 0x0F6, 0x0F7, 0x0F8, 0x0F9, 0x0FA, 0x0FB,
    0x0FC, 0x0FD, 0x0FE, 0x0FF,
};

int tok_cp_to_byte(uint32_t cp) {
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    if (cp >= 0x100 && cp <= 0x120) return (int)(cp - 0x100);       /* 0x00..0x20 */
    if (cp >= 0x121 && cp <= 0x142) return (int)(cp - 0x121 + 0x7F); /* 0x7F..0xA0 */
    if (cp == 0x143) return 0xAD;
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* hash maps                                                                                  */

uint32_t tok_hash(const char *s, size_t len) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (len * 0xFF51AFD7ED558CCDull);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        s += 8;
        len -= 8;
    }
    if (len) {
        uint64_t w = 0;
        memcpy(&w, s, len);
        h = (h ^ w) * 0x94D049BB133111EBull;
    }
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    uint32_t r = (uint32_t)h;
    return r ? r : 1;
}

/* Power-of-two table size keeping n keys under 70% load. */
static uint32_t pow2_for(size_t n) {
    size_t cap = 64;
    while (cap * 7 < n * 10 + 10) cap *= 2;
    return (uint32_t)cap;
}

int tok_smap_init(tok_smap *m, size_t n) {
    uint32_t cap = pow2_for(n);
    m->slots = calloc(cap, sizeof *m->slots);
    if (!m->slots) return ST_ERR_NOMEM;
    m->mask = cap - 1;
    m->n = 0;
    return 0;
}

void tok_smap_free(tok_smap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* Doubles the table (keys are re-placed by their stored hash). */
static int smap_grow(tok_smap *m) {
    uint32_t cap = (m->mask + 1) * 2;
    tok_smap_slot *ns = calloc(cap, sizeof *ns);
    if (!ns) return ST_ERR_NOMEM;
    for (uint32_t i = 0; i <= m->mask; i++) {
        tok_smap_slot *s = &m->slots[i];
        if (!s->hash) continue;
        uint32_t j = s->hash & (cap - 1);
        while (ns[j].hash) j = (j + 1) & (cap - 1);
        ns[j] = *s;
    }
    free(m->slots);
    m->slots = ns;
    m->mask = cap - 1;
    return 0;
}

int tok_smap_put(tok_smap *m, const char *pool, uint32_t off, uint32_t len, int32_t val) {
    if (!m->slots && tok_smap_init(m, 16)) return ST_ERR_NOMEM;
    if ((size_t)(m->n + 1) * 10 > (size_t)(m->mask + 1) * 7 && smap_grow(m)) return ST_ERR_NOMEM;
    const char *key = pool + off;
    uint32_t h = tok_hash(key, len), i = h & m->mask;
    for (;;) {
        tok_smap_slot *s = &m->slots[i];
        if (!s->hash) {
            *s = (tok_smap_slot){h, val, off, len};
            m->n++;
            return 0;
        }
        if (s->hash == h && s->len == len && !memcmp(pool + s->off, key, len)) {
            s->val = val;
            s->off = off;
            return 0;
        }
        i = (i + 1) & m->mask;
    }
}

int32_t tok_smap_get(const tok_smap *m, const char *pool, const char *s, size_t len) {
    if (!m->slots) return -1;
    uint32_t h = tok_hash(s, len), i = h & m->mask;
    for (;;) {
        const tok_smap_slot *e = &m->slots[i];
        if (!e->hash) return -1;
        if (e->hash == h && e->len == len && !memcmp(pool + e->off, s, len)) return e->val;
        i = (i + 1) & m->mask;
    }
}

void tok_smap_get_batch(const tok_smap *m, const char *pool, const char *const *keys,
                        const uint32_t *lens, size_t n, uint32_t *hashes, int32_t *out) {
    if (!m->slots) {
        for (size_t i = 0; i < n; i++) out[i] = -1;
        return;
    }
    /* stage 1: hash, prefetch the home slot */
    for (size_t i = 0; i < n; i++) {
        hashes[i] = tok_hash(keys[i], lens[i]);
        __builtin_prefetch(&m->slots[hashes[i] & m->mask]);
    }
    /* stage 2: find the first slot with the same hash, prefetch its key bytes */
    for (size_t i = 0; i < n; i++) {
        uint32_t h = hashes[i], j = h & m->mask;
        out[i] = -1;
        for (;;) {
            const tok_smap_slot *e = &m->slots[j];
            if (!e->hash) break;
            if (e->hash == h && e->len == lens[i]) {
                out[i] = (int32_t)j;
                __builtin_prefetch(pool + e->off);
                break;
            }
            j = (j + 1) & m->mask;
        }
    }
    /* stage 3: verify (a mismatch after an equal hash is rare: fall back to a full probe) */
    for (size_t i = 0; i < n; i++) {
        if (out[i] < 0) continue;
        const tok_smap_slot *e = &m->slots[out[i]];
        out[i] = !memcmp(pool + e->off, keys[i], lens[i]) ? e->val
                                                         : tok_smap_get(m, pool, keys[i], lens[i]);
    }
}

int tok_smap_put_batch(tok_smap *m, const char *pool, const uint32_t *offs, const uint32_t *lens,
                       const int32_t *vals, size_t n) {
    if (!m->slots && tok_smap_init(m, n)) return ST_ERR_NOMEM;
    while ((size_t)(m->n + n) * 10 > (size_t)(m->mask + 1) * 7)
        if (smap_grow(m)) return ST_ERR_NOMEM;
    uint32_t hs[64];
    for (size_t base = 0; base < n; base += 64) {
        size_t k = n - base < 64 ? n - base : 64;
        for (size_t i = 0; i < k; i++) {
            hs[i] = tok_hash(pool + offs[base + i], lens[base + i]);
            __builtin_prefetch(&m->slots[hs[i] & m->mask], 1);
        }
        for (size_t i = 0; i < k; i++) {
            uint32_t h = hs[i], j = h & m->mask, off = offs[base + i], len = lens[base + i];
            for (;;) {
                tok_smap_slot *s = &m->slots[j];
                if (!s->hash) {
                    *s = (tok_smap_slot){h, vals[base + i], off, len};
                    m->n++;
                    break;
                }
                if (s->hash == h && s->len == len && !memcmp(pool + s->off, pool + off, len)) {
                    s->val = vals[base + i];
                    s->off = off;
                    break;
                }
                j = (j + 1) & m->mask;
            }
        }
    }
    return 0;
}

int tok_pmap_init(tok_pmap *m, size_t n) {
    uint32_t cap = pow2_for(n);
    m->slots = malloc((size_t)cap * sizeof *m->slots);
    if (!m->slots) return ST_ERR_NOMEM;
    memset(m->slots, 0xFF, (size_t)cap * sizeof *m->slots);
    m->mask = cap - 1;
    m->n = 0;
    return 0;
}

void tok_pmap_free(tok_pmap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

int tok_pmap_put(tok_pmap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id) {
    if (!m->slots && tok_pmap_init(m, 16)) return ST_ERR_NOMEM;
    if ((size_t)(m->n + 1) * 10 > (size_t)(m->mask + 1) * 7) {
        tok_pmap old = *m;
        if (tok_pmap_init(m, (size_t)(old.mask + 1))) {
            *m = old;
            return ST_ERR_NOMEM;
        }
        for (uint32_t i = 0; i <= old.mask; i++)
            if (old.slots[i].key != UINT64_MAX)
                tok_pmap_put(m, (int32_t)(old.slots[i].key >> 32), (int32_t)old.slots[i].key,
                             old.slots[i].rank, old.slots[i].new_id);
        free(old.slots);
    }
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & m->mask;
    for (;;) {
        tok_pmap_slot *s = &m->slots[i];
        if (s->key == UINT64_MAX) {
            *s = (tok_pmap_slot){key, rank, new_id};
            m->n++;
            return 0;
        }
        if (s->key == key) { /* a later duplicate merge wins, as in HF's HashMap collect */
            s->rank = rank;
            s->new_id = new_id;
            return 0;
        }
        i = (i + 1) & m->mask;
    }
}

/* Home slot of a pair key (same hash as tok_pmap_get). */
static inline uint32_t pmap_home(const tok_pmap *m, uint64_t key) {
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & m->mask;
}

int tok_pmap_put_batch(tok_pmap *m, const int32_t *a, const int32_t *b, const uint32_t *rank,
                       const int32_t *new_id, size_t n) {
    if (!m->slots && tok_pmap_init(m, n)) return ST_ERR_NOMEM;
    if ((size_t)(m->n + n) * 10 > (size_t)(m->mask + 1) * 7) {
        for (size_t i = 0; i < n; i++)
            if (tok_pmap_put(m, a[i], b[i], rank[i], new_id[i])) return ST_ERR_NOMEM;
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        __builtin_prefetch(&m->slots[pmap_home(m, (uint64_t)(uint32_t)a[i] << 32 | (uint32_t)b[i])], 1);
    for (size_t i = 0; i < n; i++) {
        uint64_t key = (uint64_t)(uint32_t)a[i] << 32 | (uint32_t)b[i];
        uint32_t j = pmap_home(m, key);
        for (;;) {
            tok_pmap_slot *s = &m->slots[j];
            if (s->key == UINT64_MAX) {
                *s = (tok_pmap_slot){key, rank[i], new_id[i]};
                m->n++;
                break;
            }
            if (s->key == key) {
                s->rank = rank[i];
                s->new_id = new_id[i];
                break;
            }
            j = (j + 1) & m->mask;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* regular expressions                                                                        */

static pthread_once_t g_onig_once = PTHREAD_ONCE_INIT;

/* Oniguruma with the UTF-8 encoding only. */
static void onig_init_once(void) {
    OnigEncoding encs[1] = {ONIG_ENCODING_UTF8};
    onig_initialize(encs, 1);
}

void tok_onig_init(void) { pthread_once(&g_onig_once, onig_init_once); }

int tok_regex_new(regex_t **out, const char *pat, size_t len, const char *where, st_err *err) {
    tok_onig_init();
    OnigErrorInfo einfo;
    const UChar *p = (const UChar *)pat;
    int r = onig_new(out, p, p + len, ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT,
                     &einfo);
    if (r != ONIG_NORMAL) {
        *out = NULL;
        if (r == ONIGERR_MEMORY) return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", where);
        UChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
        onig_error_code_to_str(msg, r, &einfo);
        return st_err_set(err, ST_ERR_FORMAT, "%s: invalid regex /%.*s/: %s", where,
                          (int)(len > 200 ? 200 : len), pat, (const char *)msg);
    }
    return 0;
}

int tok_regex_new_literal(regex_t **out, const char *s, size_t len, const char *where,
                          st_err *err) {
    /* regex::escape escapes exactly these; escaped punctuation is literal in Oniguruma too */
    static const char meta[] = "\\.+*?()|[]{}^$#&-~";
    tok_buf b = {0};
    for (size_t i = 0; i < len; i++) {
        if (s[i] && strchr(meta, s[i]) && tok_buf_append(&b, "\\", 1)) goto nomem;
        if (tok_buf_append(&b, s + i, 1)) goto nomem;
    }
    int rc = tok_regex_new(out, b.p ? b.p : "", b.len, where, err);
    tok_buf_free(&b);
    return rc;
nomem:
    tok_buf_free(&b);
    return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", where);
}

/* Appends span [start, end). 0 or ST_ERR_NOMEM. */
static int spans_push(tok_spans *o, size_t start, size_t end, int match) {
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        tok_span *v = realloc(o->v, cap * sizeof *v);
        if (!v) return ST_ERR_NOMEM;
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = (tok_span){(uint32_t)start, (uint32_t)end, (uint8_t)match};
    return 0;
}

int tok_regex_spans(regex_t *re, OnigRegion *region, const char *s, size_t len,
                    tok_spans *out, st_err *err) {
    out->n = 0;
    if (!len) return spans_push(out, 0, 0, 0) ? st_err_set(err, ST_ERR_NOMEM, "out of memory") : 0;
    const UChar *str = (const UChar *)s, *end = str + len;
    size_t last_end = 0, prev = 0, last_match_end = 0;
    int have_last = 0;
    /* the onig crate's FindMatches::next */
    while (last_end <= len) {
        int r = onig_search(re, str, end, str + last_end, end, region, ONIG_OPTION_NONE);
        if (r == ONIG_MISMATCH) break;
        if (r < 0) {
            UChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
            onig_error_code_to_str(msg, (int)r);
            return st_err_set(err, ST_ERR_INTERNAL, "regex search failed: %s", (const char *)msg);
        }
        size_t ms = (size_t)region->beg[0], me = (size_t)region->end[0];
        if (ms == me && have_last && last_match_end == me) {
            last_end += last_end < len ? (size_t)tok_utf8_len((unsigned char)s[last_end]) : 1;
            continue;
        }
        last_end = me;
        last_match_end = me;
        have_last = 1;
        if (prev != ms && spans_push(out, prev, ms, 0)) goto nomem;
        if (spans_push(out, ms, me, 1)) goto nomem;
        prev = me;
    }
    if (prev != len && spans_push(out, prev, len, 0)) goto nomem;
    return 0;
nomem:
    return st_err_set(err, ST_ERR_NOMEM, "out of memory");
}
