/* tok_json.c — a small, fast JSON reader (see tok_json.h).
 *
 * One recursive-descent pass. Array items and object members are collected on two scratch
 * stacks shared by every nesting level and copied into the arena when their container closes,
 * so a 150k-member vocab object costs one copy. Strings are validated (UTF-8, escapes, control
 * characters) and, when they have no escapes, left in place.
 */
#include "tok/tok_json.h"

#include "tok/tok_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* arena                                                                                      */

typedef struct tj_block {
    struct tj_block *next;
    size_t used, cap;
    _Alignas(16) char data[];
} tj_block;

/* Returns 8-byte aligned storage for n bytes from the arena *head (a block list); NULL when out
 * of memory. The storage lives until tj_free. */
static void *arena_alloc(void **head, size_t n) {
    tj_block *b = *head;
    n = (n + 7) & ~(size_t)7;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > ((size_t)1 << 20) ? n : ((size_t)1 << 20);
        tj_block *nb = malloc(sizeof *nb + cap);
        if (!nb) return NULL;
        nb->cap = cap;
        nb->used = 0;
        nb->next = b;
        *head = nb;
        b = nb;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

/* See tok_json.h. */
void tj_free(tj_doc *doc) {
    if (!doc) return;
    tj_block *b = doc->arena;
    while (b) {
        tj_block *next = b->next;
        free(b);
        b = next;
    }
    doc->arena = NULL;
    memset(&doc->root, 0, sizeof doc->root);
}

/* ------------------------------------------------------------------------------------------ */
/* parser                                                                                     */

#define TJ_MAX_DEPTH 512

typedef struct jp {
    const unsigned char *s, *p, *end;
    const char *name;
    st_err *err;
    void *arena;
    tj_val *vs; size_t vn, vcap;   /* array item stack */
    tj_mem *ms; size_t mn, mcap;   /* object member stack */
    int depth;
} jp;

/* Records a format error at position at ("name:line:col: what") and returns ST_ERR_FORMAT. */
static int jp_fail(jp *j, const unsigned char *at, const char *what) {
    size_t line = 1, col = 1;
    if (at > j->end) at = j->end;
    for (const unsigned char *q = j->s; q < at; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else if ((*q & 0xC0) != 0x80) {
            col++;
        }
    }
    return st_err_set(j->err, ST_ERR_FORMAT, "%s:%zu:%zu: invalid JSON: %s", j->name, line, col,
                      what);
}

/* Reports an allocation failure while parsing. */
static int jp_nomem(jp *j) {
    return st_err_set(j->err, ST_ERR_NOMEM, "%s: out of memory parsing JSON", j->name);
}

/* Skips whitespace. Pretty-printed tokenizer.json files are half spaces (deep indentation of
 * every merge pair), so runs of 8 spaces are skipped a word at a time. */
static inline void jp_ws(jp *j) {
    const unsigned char *p = j->p, *end = j->end;
    for (;;) {
        while (end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (w != 0x2020202020202020ull) break;
            p += 8;
        }
        if (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) {
            p++;
            continue;
        }
        break;
    }
    j->p = p;
}

/* Value of a hex digit, or -1. */
static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Reads 4 hex digits at q (caller checked there are 4 bytes). -1 if not hex. */
static int32_t hex4(const unsigned char *q) {
    int32_t v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(q[i]);
        if (h < 0) return -1;
        v = v << 4 | h;
    }
    return v;
}

/* Parses the string whose opening quote is at j->p into (*out, *len); advances past the closing
 * quote. Escape-free strings point into the input, others are decoded into the arena. */
static int jp_string(jp *j, const char **out, uint32_t *len) {
    const unsigned char *start = j->p + 1, *q = start, *end = j->end;
    int esc = 0;
    for (;;) {
        while (q < end && *q >= 0x20 && *q < 0x80 && *q != '"' && *q != '\\') q++;
        if (q >= end) return jp_fail(j, j->p, "unterminated string");
        unsigned char c = *q;
        if (c == '"') break;
        if (c == '\\') {
            esc = 1;
            if (q + 1 >= end) return jp_fail(j, q, "unterminated string");
            switch (q[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                q += 2;
                break;
            case 'u':
                if (end - q < 6 || hex4(q + 2) < 0) return jp_fail(j, q, "invalid \\u escape");
                q += 6;
                break;
            default:
                return jp_fail(j, q, "invalid escape");
            }
            continue;
        }
        if (c < 0x20) return jp_fail(j, q, "control character in string");
        size_t adv;
        if (tok_utf8_step(q, (size_t)(end - q), &adv) != TOK_UTF8_OK)
            return jp_fail(j, q, "invalid UTF-8 in string");
        q += adv;
    }
    size_t raw = (size_t)(q - start);
    if (raw > UINT32_MAX) return jp_fail(j, j->p, "string too long");
    j->p = q + 1;
    if (!esc) {
        *out = (const char *)start;
        *len = (uint32_t)raw;
        return 0;
    }
    char *d = arena_alloc(&j->arena, raw ? raw : 1), *o = d;
    if (!d) return jp_nomem(j);
    for (const unsigned char *r = start; r < q;) {
        if (*r != '\\') {
            *o++ = (char)*r++;
            continue;
        }
        unsigned char e = r[1];
        r += 2;
        switch (e) {
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            uint32_t cp = (uint32_t)hex4(r);
            r += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (q - r < 6 || r[0] != '\\' || r[1] != 'u')
                    return jp_fail(j, r - 6, "lone leading surrogate in hex escape");
                int32_t lo = hex4(r + 2);
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return jp_fail(j, r - 6, "lone leading surrogate in hex escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
                r += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return jp_fail(j, r - 6, "unexpected end of hex escape (lone trailing surrogate)");
            }
            o += tok_utf8_put(cp, o);
            break;
        }
        default: *o++ = (char)e; break; /* " \ / */
        }
    }
    *out = d;
    *len = (uint32_t)(o - d);
    return 0;
}

/* Parses a number at j->p into v. */
static int jp_number(jp *j, tj_val *v) {
    const unsigned char *q = j->p, *end = j->end, *start = q;
    int neg = 0, is_int = 1;
    uint64_t acc = 0;
    int overflow = 0;
    if (*q == '-') {
        neg = 1;
        q++;
    }
    if (q >= end || *q < '0' || *q > '9') return jp_fail(j, q, "invalid number");
    if (*q == '0') {
        q++;
    } else {
        while (q < end && *q >= '0' && *q <= '9') {
            if (acc > (UINT64_MAX - 9) / 10) overflow = 1;
            acc = acc * 10 + (uint64_t)(*q - '0');
            q++;
        }
    }
    if (q < end && *q == '.') {
        is_int = 0;
        q++;
        if (q >= end || *q < '0' || *q > '9') return jp_fail(j, q, "invalid number");
        while (q < end && *q >= '0' && *q <= '9') q++;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        is_int = 0;
        q++;
        if (q < end && (*q == '+' || *q == '-')) q++;
        if (q >= end || *q < '0' || *q > '9') return jp_fail(j, q, "invalid number");
        while (q < end && *q >= '0' && *q <= '9') q++;
    }
    j->p = q;
    v->type = TJ_NUM;
    if (is_int && !overflow && acc <= (uint64_t)INT64_MAX) {
        v->is_int = 1;
        v->u.i = neg ? -(int64_t)acc : (int64_t)acc;
        return 0;
    }
    char small[64], *buf = small;
    size_t n = (size_t)(q - start);
    if (n >= sizeof small && !(buf = malloc(n + 1))) return jp_nomem(j);
    memcpy(buf, start, n);
    buf[n] = 0;
    v->is_int = 0;
    v->u.d = strtod(buf, NULL);
    if (buf != small) free(buf);
    return 0;
}

static int jp_value(jp *j, tj_val *v);

/* Parses the array at j->p ('[') into v. */
static int jp_array(jp *j, tj_val *v) {
    const unsigned char *open = j->p;
    size_t base = j->vn;
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
    } else {
        for (;;) {
            tj_val item;
            int rc = jp_value(j, &item);
            if (rc) return rc;
            if (j->vn == j->vcap) {
                size_t cap = j->vcap ? j->vcap * 2 : 256;
                tj_val *nv = realloc(j->vs, cap * sizeof *nv);
                if (!nv) return jp_nomem(j);
                j->vs = nv;
                j->vcap = cap;
            }
            j->vs[j->vn++] = item;
            jp_ws(j);
            if (j->p >= j->end) return jp_fail(j, open, "unterminated array");
            if (*j->p == ',') {
                j->p++;
                continue;
            }
            if (*j->p == ']') {
                j->p++;
                break;
            }
            return jp_fail(j, j->p, "expected ',' or ']'");
        }
    }
    size_t n = j->vn - base;
    v->type = TJ_ARR;
    v->n = (uint32_t)n;
    v->u.a = NULL;
    if (n) {
        if (!(v->u.a = arena_alloc(&j->arena, n * sizeof(tj_val)))) return jp_nomem(j);
        memcpy(v->u.a, j->vs + base, n * sizeof(tj_val));
    }
    j->vn = base;
    return 0;
}

/* Parses the object at j->p ('{') into v. */
static int jp_object(jp *j, tj_val *v) {
    const unsigned char *open = j->p;
    size_t base = j->mn;
    j->p++;
    jp_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
    } else {
        for (;;) {
            tj_mem m;
            jp_ws(j);
            if (j->p >= j->end) return jp_fail(j, open, "unterminated object");
            if (*j->p != '"') return jp_fail(j, j->p, "expected a string key");
            int rc = jp_string(j, &m.key, &m.key_len);
            if (rc) return rc;
            jp_ws(j);
            if (j->p >= j->end || *j->p != ':') return jp_fail(j, j->p, "expected ':'");
            j->p++;
            if ((rc = jp_value(j, &m.val))) return rc;
            if (j->mn == j->mcap) {
                size_t cap = j->mcap ? j->mcap * 2 : 256;
                tj_mem *nm = realloc(j->ms, cap * sizeof *nm);
                if (!nm) return jp_nomem(j);
                j->ms = nm;
                j->mcap = cap;
            }
            j->ms[j->mn++] = m;
            jp_ws(j);
            if (j->p >= j->end) return jp_fail(j, open, "unterminated object");
            if (*j->p == ',') {
                j->p++;
                continue;
            }
            if (*j->p == '}') {
                j->p++;
                break;
            }
            return jp_fail(j, j->p, "expected ',' or '}'");
        }
    }
    size_t n = j->mn - base;
    v->type = TJ_OBJ;
    v->n = (uint32_t)n;
    v->u.o = NULL;
    if (n) {
        if (!(v->u.o = arena_alloc(&j->arena, n * sizeof(tj_mem)))) return jp_nomem(j);
        memcpy(v->u.o, j->ms + base, n * sizeof(tj_mem));
    }
    j->mn = base;
    return 0;
}

/* Parses any value at j->p (after optional whitespace) into v. */
static int jp_value(jp *j, tj_val *v) {
    jp_ws(j);
    memset(v, 0, sizeof *v);
    if (j->p >= j->end) return jp_fail(j, j->p, "EOF while parsing a value");
    int rc;
    switch (*j->p) {
    case '{':
    case '[':
        if (++j->depth > TJ_MAX_DEPTH) return jp_fail(j, j->p, "nesting too deep");
        rc = *j->p == '{' ? jp_object(j, v) : jp_array(j, v);
        j->depth--;
        return rc;
    case '"':
        v->type = TJ_STR;
        return jp_string(j, &v->u.s, &v->n);
    case 't':
        if (j->end - j->p >= 4 && !memcmp(j->p, "true", 4)) {
            v->type = TJ_TRUE;
            j->p += 4;
            return 0;
        }
        break;
    case 'f':
        if (j->end - j->p >= 5 && !memcmp(j->p, "false", 5)) {
            v->type = TJ_FALSE;
            j->p += 5;
            return 0;
        }
        break;
    case 'n':
        if (j->end - j->p >= 4 && !memcmp(j->p, "null", 4)) {
            v->type = TJ_NULL;
            j->p += 4;
            return 0;
        }
        break;
    default:
        if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9')) return jp_number(j, v);
        break;
    }
    return jp_fail(j, j->p, "expected value");
}

/* See tok_json.h: doc borrows json and owns its arena. */
int tj_parse(tj_doc *doc, const char *json, size_t len, const char *name, st_err *err) {
    jp j = {0};
    j.s = j.p = (const unsigned char *)json;
    j.end = j.s + len;
    j.name = name ? name : "<json>";
    j.err = err;
    memset(doc, 0, sizeof *doc);
    int rc = jp_value(&j, &doc->root);
    if (!rc) {
        jp_ws(&j);
        if (j.p != j.end) rc = jp_fail(&j, j.p, "trailing characters");
    }
    free(j.vs);
    free(j.ms);
    doc->arena = j.arena;
    if (rc) tj_free(doc);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* access                                                                                     */

const tj_val *tj_get(const tj_val *v, const char *key) {
    if (!v || v->type != TJ_OBJ) return NULL;
    size_t kl = strlen(key);
    for (uint32_t i = 0; i < v->n; i++)
        if (v->u.o[i].key_len == kl && !memcmp(v->u.o[i].key, key, kl)) return &v->u.o[i].val;
    return NULL;
}

/* See tok_json.h. */
int tj_str_is(const tj_val *v, const char *s) {
    if (!v || v->type != TJ_STR) return 0;
    size_t n = strlen(s);
    return v->n == n && !memcmp(v->u.s, s, n);
}

/* See tok_json.h: accepts integral floats (1.0) as HF's serde does not, harmlessly. */
int tj_int(const tj_val *v, int64_t *out) {
    if (!v || v->type != TJ_NUM) return -1;
    if (v->is_int) {
        *out = v->u.i;
        return 0;
    }
    double d = v->u.d;
    if (d != d || d < -9.2e18 || d > 9.2e18 || (double)(int64_t)d != d) return -1;
    *out = (int64_t)d;
    return 0;
}

/* See tok_json.h: a static string. */
const char *tj_type_name(const tj_val *v) {
    if (!v) return "missing";
    switch (v->type) {
    case TJ_NULL: return "null";
    case TJ_FALSE:
    case TJ_TRUE: return "boolean";
    case TJ_NUM: return "number";
    case TJ_STR: return "string";
    case TJ_ARR: return "array";
    case TJ_OBJ: return "object";
    default: return "?";
    }
}
