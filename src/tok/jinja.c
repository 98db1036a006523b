/* jinja.c — a Jinja2-subset interpreter for Hugging Face chat templates.
 *
 * Goal: the exact bytes transformers' apply_chat_template(tokenize=False) produces, i.e. Jinja2
 * 3.1 in an ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
 * loopcontrols extension, transformers' {% generation %} tag, raise_exception, strftime_now and
 * its json.dumps-based tojson filter.
 *
 * Structure (one section each):
 *   arena, errors      one bump allocator per template and per render; errors unwind by longjmp
 *   strings, utf-8     (ptr, len) strings, code-point helpers, Python's notion of whitespace
 *   values             Python's value model as a chat template sees it (str, int, float, bool,
 *                      None, list, tuple, dict) plus Jinja's Undefined, Namespace, macros, loop
 *   lexer              jinja2/lexer.py rule by rule: whitespace control is decided here
 *   parser             jinja2/parser.py function by function (same precedence, same AST shape)
 *   evaluator          Python semantics of operators, attribute/item lookup, str()/repr(),
 *                      json.dumps, filters, tests, methods, globals; then statements
 *   public API         jinja_* and chat_template_*
 *
 * Anything outside the subset raises an error with the template's line:column; the rule is
 * "error, never different output". Not implemented (errors): {% include / extends / block /
 * import / from / call / autoescape %}, recursive loops, *args / **kwargs in calls, the filters
 * batch center filesizeformat forceescape groupby pprint random slice striptags truncate
 * urlencode urlize wordcount wordwrap xmlattr, the tests filter / test, sameas on non-singletons,
 * str.format specs, %-formatting of Markup, a few str methods (center, zfill, ...), integers
 * beyond 64 bits, full Unicode case mapping of the few characters whose upper/lower case is
 * several characters (except the common ß and ligatures), and printing objects whose Python
 * text is a memory address (generators). Known divergence: slicing an expression built only
 * from literals with a non-sequence / bad bound ("{{ 5[1:] }}") errors, where Jinja2's
 * compile-time constant folding prints "". Memory: everything a parse or a render allocates lives in its
 * arena, so unwinding an error with longjmp leaks nothing; the only malloc that outlives a render
 * is its result string.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, strncasecmp, localtime_r, strdup */
#endif
#include "strata/jinja.h"

#include "strata/base.h"

#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

/* ---------------------------------------------------------------------------------------------- */
/* arena and errors                                                                               */

#define J_ARENA_LIMIT ((size_t)1 << 30) /* bytes one parse or render may hold                  */
#define J_MAX_DEPTH 200                 /* nesting of parsed expressions / statements           */
#define J_MAX_CALL_DEPTH 500            /* macro recursion (Python's limit is ~1000 frames)     */
#define J_MAX_STEPS 50000000ull         /* statements + loop iterations + calls per render      */
#define J_MAX_RANGE 100000              /* the sandbox's MAX_RANGE                              */

/* Where errors unwind to: the public entry point that called setjmp(jb). */
typedef struct jfail {
    jmp_buf jb;
    st_err *err;
    const char *src; /* normalized template source, to turn byte offsets into line:column */
    size_t src_len;
} jfail;

typedef struct ar_chunk {
    struct ar_chunk *next;
    size_t cap, used;
} ar_chunk;

#define AR_HDR ((sizeof(ar_chunk) + 15) & ~(size_t)15)

/* A bump allocator: allocations live until arena_release. */
typedef struct arena {
    ar_chunk *head;
    size_t total; /* bytes held in chunks */
    jfail *fail;  /* allocation failures unwind here */
} arena;

#define NO_POS SIZE_MAX

/* Formats "chat template L:C: message" (or "chat template: message" for pos == NO_POS) into the
 * error and unwinds to f's setjmp. Never returns. */
static _Noreturn void jthrow(jfail *f, int code, size_t pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static _Noreturn void jthrow(jfail *f, int code, size_t pos, const char *fmt, ...) {
    char msg[ST_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (pos == NO_POS || !f->src) {
        st_err_set(f->err, code, "chat template: %s", msg);
    } else {
        size_t line = 1, col = 1;
        for (size_t i = 0; i < pos && i < f->src_len; i++) {
            unsigned char c = (unsigned char)f->src[i];
            if (c == '\n') line++, col = 1;
            else if ((c & 0xC0) != 0x80) col++;
        }
        st_err_set(f->err, code, "chat template %zu:%zu: %s", line, col, msg);
    }
    longjmp(f->jb, 1);
}

/* Returns n bytes (16-aligned, uninitialised) that live until arena_release. Unwinds with
 * ST_ERR_NOMEM / ST_ERR_LIMIT on failure. */
static void *ar_alloc(arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (!a->head || a->head->cap - a->head->used < n) {
        size_t cap = a->head ? a->head->cap * 2 : 16384;
        if (cap > ((size_t)1 << 22)) cap = (size_t)1 << 22;
        if (cap < n) cap = n;
        if (a->total + cap > J_ARENA_LIMIT)
            jthrow(a->fail, ST_ERR_LIMIT, NO_POS, "render exceeds %zu MiB of memory",
                   J_ARENA_LIMIT >> 20);
        ar_chunk *c = malloc(AR_HDR + cap);
        if (!c) jthrow(a->fail, ST_ERR_NOMEM, NO_POS, "out of memory");
        c->next = a->head;
        c->cap = cap;
        c->used = 0;
        a->head = c;
        a->total += cap;
    }
    void *p = (char *)a->head + AR_HDR + a->head->used;
    a->head->used += n;
    return p;
}

/* ar_alloc, zeroed. */
static void *ar_zalloc(arena *a, size_t n) {
    void *p = ar_alloc(a, n);
    memset(p, 0, n);
    return p;
}

/* Allocates an array of n elements of size sz, overflow-checked. */
static void *ar_array(arena *a, size_t n, size_t sz) {
    size_t bytes;
    if (st_mul_size(n, sz, &bytes)) jthrow(a->fail, ST_ERR_LIMIT, NO_POS, "array too large");
    return ar_alloc(a, bytes ? bytes : 1);
}

/* Frees every chunk of the arena; the arena can be reused afterwards. */
static void arena_release(arena *a) {
    ar_chunk *c = a->head;
    while (c) {
        ar_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
    a->total = 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* strings and UTF-8                                                                              */

/* A byte string (UTF-8), not NUL-terminated. */
typedef struct jstr {
    const char *p;
    size_t n;
} jstr;

/* A string view of p[0, n). */
static jstr js(const char *p, size_t n) {
    jstr s = {p, n};
    return s;
}

static bool js_eq(jstr a, jstr b) { return a.n == b.n && (a.n == 0 || !memcmp(a.p, b.p, a.n)); }

static bool js_eqc(jstr a, const char *c) { return js_eq(a, js(c, strlen(c))); }

/* A growable output buffer in an arena. */
typedef struct sbuf {
    arena *ar;
    char *p;
    size_t n, cap;
} sbuf;

/* An empty buffer whose storage comes from ar. */
static void sb_init(sbuf *b, arena *ar) {
    b->ar = ar;
    b->p = NULL;
    b->n = b->cap = 0;
}

/* Makes room for k more bytes (the old block stays in the arena until release). */
static void sb_reserve(sbuf *b, size_t k) {
    if (b->cap - b->n >= k) return;
    size_t cap = b->cap ? b->cap * 2 : 64;
    while (cap - b->n < k) cap *= 2;
    char *p = ar_alloc(b->ar, cap);
    if (b->n) memcpy(p, b->p, b->n);
    b->p = p;
    b->cap = cap;
}

/* Appends s[0, n). */
static void sb_put(sbuf *b, const char *s, size_t n) {
    if (!n) return;
    sb_reserve(b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void sb_putc(sbuf *b, char c) { sb_put(b, &c, 1); }

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_putj(sbuf *b, jstr s) { sb_put(b, s.p, s.n); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Appends printf-style text. */
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k < sizeof tmp) {
        sb_put(b, tmp, (size_t)k);
        return;
    }
    sb_reserve(b, (size_t)k + 1);
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

/* Decodes the code point at s[*i] (valid UTF-8 assumed; a stray byte decodes as itself) and
 * advances *i past it. */
static int32_t u8_next(const char *s, size_t n, size_t *i) {
    const unsigned char *u = (const unsigned char *)s;
    size_t k = *i;
    int32_t c = u[k];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (k + (size_t)len > n) len = 1;
    if (len == 1) {
        *i = k + 1;
        return c;
    }
    c &= 0x3F >> (len - 1);
    for (int j = 1; j < len; j++) c = (c << 6) | (u[k + (size_t)j] & 0x3F);
    *i = k + (size_t)len;
    return c;
}

/* Start of the code point that ends at s[i-1]. */
static size_t u8_prev(const char *s, size_t i) {
    while (i > 0) {
        i--;
        if (((unsigned char)s[i] & 0xC0) != 0x80) break;
    }
    return i;
}

/* Encodes cp as UTF-8 into out (4 bytes room); returns the length. */
static size_t u8_put(int32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Number of code points in s (Python's len(str)). */
static size_t u8_len(jstr s) {
    size_t k = 0;
    for (size_t i = 0; i < s.n; i++) k += ((unsigned char)s.p[i] & 0xC0) != 0x80;
    return k;
}

/* 1 if every byte is ASCII (code point index == byte index). */
static bool is_ascii(jstr s) {
    for (size_t i = 0; i < s.n; i++)
        if ((unsigned char)s.p[i] >= 0x80) return false;
    return true;
}

/* Byte offset of code point index ci (0 <= ci <= len). */
static size_t u8_offset(jstr s, size_t ci) {
    size_t i = 0;
    while (ci > 0 && i < s.n) {
        i++;
        while (i < s.n && ((unsigned char)s.p[i] & 0xC0) == 0x80) i++;
        ci--;
    }
    return i;
}

/* Python's str.isspace() for one code point (also what re's \s matches on str). */
static bool py_isspace(int32_t c) {
    if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
           c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Python's str.splitlines() line boundaries. */
static bool py_islinebreak(int32_t c) {
    return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
           c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
}

/* Length of the whitespace code point at s[i], or 0. */
static size_t ws_at(const char *s, size_t n, size_t i) {
    size_t j = i;
    int32_t c = u8_next(s, n, &j);
    return py_isspace(c) ? j - i : 0;
}

/* New end of s[lo, hi) after stripping trailing whitespace (Python's str.rstrip()). */
static size_t rstrip_ws(const char *s, size_t lo, size_t hi) {
    while (hi > lo) {
        size_t k = u8_prev(s, hi);
        if (k < lo) break;
        size_t j = k;
        if (!py_isspace(u8_next(s, hi, &j))) break;
        hi = k;
    }
    return hi;
}

/* ---------------------------------------------------------------------------------------------- */
/* values                                                                                         */

enum {
    JT_UNDEF,  /* Jinja Undefined; u.s = the message an erroring use reports                   */
    JT_NONE,
    JT_BOOL,   /* u.i = 0 / 1                                                                   */
    JT_INT,    /* u.i                                                                           */
    JT_FLOAT,  /* u.f                                                                           */
    JT_STR,    /* u.s; sub = 1 for Markup (safe/escape results)                                 */
    JT_LIST,   /* u.l; sub = JL_* flavour                                                       */
    JT_DICT,   /* u.d                                                                           */
    JT_NS,     /* u.ns: namespace()                                                             */
    JT_MACRO,  /* u.m                                                                           */
    JT_FUNC,   /* sub = F_* global function                                                     */
    JT_METHOD, /* u.me bound method; id = M_*                                                   */
    JT_LOOP,   /* u.loop: the `loop` variable of a for                                          */
};

/* List flavours: which Python type the sequence is. They differ in printing, truthiness,
 * indexing and JSON: a generator (select, map, ...) is always true and cannot be len()ed; a
 * dict view (d.items()) can be len()ed but not indexed. */
enum { JL_LIST, JL_TUPLE, JL_GEN, JL_VIEW, JL_RANGE, JL_REVITER };

#define JU_ABSENT 1 /* JT_UNDEF sub: an optional argument that was not given (internal)       */

typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jns jns;
typedef struct jmacro jmacro;
typedef struct jmeth jmeth;
typedef struct jloop jloop;

typedef struct jv {
    uint8_t t;
    uint8_t sub;
    uint16_t id;
    union {
        int64_t i;
        double f;
        jstr s;
        jlist *l;
        jdict *d;
        jns *ns;
        jmacro *m;
        jmeth *me;
        jloop *loop;
    } u;
} jv;

struct jlist {
    size_t n;
    jv *v;
    size_t pos;              /* JL_GEN / JL_REVITER: items before pos were consumed         */
    int64_t r0, r1, r2;      /* JL_RANGE: start, stop, step (for repr); JL_VIEW: r0 = kind  */
    struct jlazy *lazy;      /* JL_GEN not yet run (see gen_force); NULL once items exist   */
};

struct jdict { /* insertion-ordered; keys unique under Python == */
    size_t n, cap;
    jv *k, *v;
};

struct jns { /* namespace(): mutable attributes */
    size_t n, cap;
    jstr *k;
    jv *v;
};

static const jv V_UNDEF = {.t = JT_UNDEF};
static const jv V_NONE = {.t = JT_NONE};

/* Value constructors (no allocation). */
static jv v_bool(bool b) {
    jv v = {.t = JT_BOOL};
    v.u.i = b;
    return v;
}

static jv v_int(int64_t i) {
    jv v = {.t = JT_INT};
    v.u.i = i;
    return v;
}

static jv v_float(double f) {
    jv v = {.t = JT_FLOAT};
    v.u.f = f;
    return v;
}

static jv v_str(jstr s) {
    jv v = {.t = JT_STR};
    v.u.s = s;
    return v;
}

static jv v_cstr(const char *s) { return v_str(js(s, strlen(s))); }

static jv v_list(jlist *l, int flavour) {
    jv v = {.t = JT_LIST, .sub = (uint8_t)flavour};
    v.u.l = l;
    return v;
}

static jv v_dict(jdict *d) {
    jv v = {.t = JT_DICT};
    v.u.d = d;
    return v;
}

/* An Undefined whose erroring uses report msg. */
static jv v_undef_msg(jstr msg) {
    jv v = {.t = JT_UNDEF};
    v.u.s = msg;
    return v;
}

static bool is_absent(jv v) { return v.t == JT_UNDEF && v.sub == JU_ABSENT; }

static bool is_num(jv v) { return v.t == JT_BOOL || v.t == JT_INT || v.t == JT_FLOAT; }

/* Python's type name of v, for error messages. */
static const char *tname(jv v) {
    switch (v.t) {
    case JT_UNDEF: return "Undefined";
    case JT_NONE: return "NoneType";
    case JT_BOOL: return "bool";
    case JT_INT: return "int";
    case JT_FLOAT: return "float";
    case JT_STR: return v.sub ? "Markup" : "str";
    case JT_LIST:
        switch (v.sub) {
        case JL_TUPLE: return "tuple";
        case JL_GEN: return "generator";
        case JL_VIEW: return "dict_view";
        case JL_RANGE: return "range";
        case JL_REVITER: return "list_reverseiterator";
        default: return "list";
        }
    case JT_DICT: return "dict";
    case JT_NS: return "Namespace";
    case JT_MACRO: return "Macro";
    case JT_FUNC: return "function";
    case JT_METHOD: return "method";
    case JT_LOOP: return "LoopContext";
    }
    return "object";
}

/* Builds a list of n items (uninitialised) in the arena. */
static jlist *list_new(arena *a, size_t n) {
    jlist *l = ar_zalloc(a, sizeof *l);
    l->n = n;
    l->v = ar_array(a, n, sizeof(jv));
    return l;
}

/* An empty dict with room for cap entries, in the arena. */
static jdict *dict_new(arena *a, size_t cap) {
    jdict *d = ar_zalloc(a, sizeof *d);
    d->cap = cap ? cap : 4;
    d->k = ar_array(a, d->cap, sizeof(jv));
    d->v = ar_array(a, d->cap, sizeof(jv));
    return d;
}

/* Appends (k, v) without checking for duplicates (caller guarantees uniqueness). */
static void dict_push(arena *a, jdict *d, jv k, jv v) {
    if (d->n == d->cap) {
        size_t cap = d->cap * 2;
        jv *nk = ar_array(a, cap, sizeof(jv)), *nv = ar_array(a, cap, sizeof(jv));
        memcpy(nk, d->k, d->n * sizeof(jv));
        memcpy(nv, d->v, d->n * sizeof(jv));
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}

/* Index of the string key `name` in d, or -1 (fast path for attribute-style lookups). */
static ptrdiff_t dict_find_str(const jdict *d, jstr name) {
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == JT_STR && js_eq(d->k[i].u.s, name)) return (ptrdiff_t)i;
    return -1;
}

/* Converts a JSON value into a template value. Strings and object keys point into the json_t,
 * which must outlive the render. */
static jv from_json(arena *a, const json_t *j) {
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        jdict *d = dict_new(a, json_object_size(j));
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)j, key, val) dict_push(a, d, v_cstr(key), from_json(a, val));
        return v_dict(d);
    }
    case JSON_ARRAY: {
        jlist *l = list_new(a, json_array_size(j));
        for (size_t i = 0; i < l->n; i++) l->v[i] = from_json(a, json_array_get(j, i));
        return v_list(l, JL_LIST);
    }
    case JSON_STRING: return v_str(js(json_string_value(j), json_string_length(j)));
    case JSON_INTEGER: return v_int((int64_t)json_integer_value(j));
    case JSON_REAL: return v_float(json_real_value(j));
    case JSON_TRUE: return v_bool(true);
    case JSON_FALSE: return v_bool(false);
    default: return V_NONE;
    }
}

/* Python's repr(float) (shortest round-tripping digits; exponent form outside 1e-4 <= |x| <
 * 1e16) into out (>= 32 bytes). */
static void py_float_repr(double x, char *out) {
    if (isnan(x)) {
        strcpy(out, "nan");
        return;
    }
    if (isinf(x)) {
        strcpy(out, x < 0 ? "-inf" : "inf");
        return;
    }
    char tmp[48];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, x);
        if (strtod(tmp, NULL) == x) break;
    }
    /* tmp = "[-]d[.ddd]e[+-]XX" */
    const char *p = tmp;
    char *o = out;
    if (*p == '-') *o++ = *p++;
    char dig[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') dig[nd++] = *p;
    int e = atoi(p + 1);
    while (nd > 1 && dig[nd - 1] == '0') nd--;
    int decpt = e + 1;
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            *o++ = '0';
            *o++ = '.';
            for (int i = 0; i < -decpt; i++) *o++ = '0';
            for (int i = 0; i < nd; i++) *o++ = dig[i];
        } else if (decpt >= nd) {
            for (int i = 0; i < nd; i++) *o++ = dig[i];
            for (int i = nd; i < decpt; i++) *o++ = '0';
            *o++ = '.';
            *o++ = '0';
        } else {
            for (int i = 0; i < decpt; i++) *o++ = dig[i];
            *o++ = '.';
            for (int i = decpt; i < nd; i++) *o++ = dig[i];
        }
        *o = 0;
    } else {
        *o++ = dig[0];
        if (nd > 1) {
            *o++ = '.';
            for (int i = 1; i < nd; i++) *o++ = dig[i];
        }
        sprintf(o, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* AST                                                                                            */

enum {
    /* expressions */
    N_CONST,   /* v                                                                          */
    N_NAME,    /* s                                                                          */
    N_LIST,    /* xs items                                                                   */
    N_TUPLE,   /* xs items                                                                   */
    N_DICT,    /* xs keys, ys values                                                         */
    N_ATTR,    /* a.s                                                                        */
    N_ITEM,    /* a[b]; b may be an N_SLICE                                                  */
    N_SLICE,   /* a:b:c, each may be NULL                                                    */
    N_NEG,     /* -a                                                                         */
    N_POS,     /* +a                                                                         */
    N_NOT,     /* not a                                                                      */
    N_BIN,     /* a op b, op = OP_ADD ... OP_POW                                             */
    N_AND,     /* a and b                                                                    */
    N_OR,      /* a or b                                                                     */
    N_CMP,     /* a then xs = N_OPERAND(op, a) ...                                           */
    N_OPERAND, /* op a (inside N_CMP)                                                        */
    N_CONCAT,  /* xs joined by ~                                                             */
    N_COND,    /* b if a else c (c may be NULL)                                              */
    N_CALL,    /* a(xs..., names[i]=ys[i]...)                                                */
    N_FILTER,  /* a | id(xs..., names=ys); a == NULL: the body of a filter block / set block */
    N_TEST,    /* a is id(xs..., names=ys)                                                   */
    N_NSREF,   /* s.s2 as an assignment target                                               */
    /* statements */
    N_DATA,        /* s: template text                                                       */
    N_OUT,         /* {{ xs }}                                                               */
    N_IF,          /* if a: xs else ys                                                       */
    N_FOR,         /* for a in b [if c]: xs else ys                                          */
    N_SET,         /* set a = b                                                              */
    N_SETBLOCK,    /* set a | b: xs endset                                                   */
    N_MACRO,       /* macro s(names[0..nn), defaults ys for the last ny): xs; op = MF_*     */
    N_BREAK,
    N_CONTINUE,
    N_WITH,        /* with ys (N_SET nodes): xs                                              */
    N_FILTERBLOCK, /* filter b: xs                                                           */
    N_SCOPE,       /* generation: xs in a new scope                                          */
};

enum { MF_VARARGS = 1, MF_KWARGS = 2, MF_CALLER = 4 };

typedef struct jnode jnode;
struct jnode {
    uint8_t k;    /* N_*                                                                      */
    uint8_t op;   /* N_BIN / N_OPERAND: OP_*; N_MACRO: MF_*                                   */
    uint16_t id;  /* N_FILTER: FL_*; N_TEST: TS_*                                              */
    uint32_t pos; /* byte offset of the node's token in the normalized source                 */
    jnode *a, *b, *c;
    jnode **xs, **ys;
    uint32_t nx, ny;
    jstr *names; /* N_CALL/N_FILTER/N_TEST: kwarg names (ny); N_MACRO: parameter names (nn)   */
    uint32_t nn;
    jstr s, s2;
    jv v;
};

/* filters (FL_*) and tests (TS_*) by name; the parser rejects any other name */
enum {
    FL_ABS, FL_ATTR, FL_CAPITALIZE, FL_DEFAULT, FL_DICTSORT, FL_ESCAPE, FL_FIRST, FL_FLOAT,
    FL_FORMAT, FL_INDENT, FL_INT, FL_ITEMS, FL_JOIN, FL_LAST, FL_LENGTH, FL_LIST, FL_LOWER,
    FL_MAP, FL_MAX, FL_MIN, FL_REJECT, FL_REJECTATTR, FL_REPLACE, FL_REVERSE, FL_ROUND, FL_SAFE,
    FL_SELECT, FL_SELECTATTR, FL_SORT, FL_STRING, FL_SUM, FL_TITLE, FL_TOJSON, FL_TRIM,
    FL_UNIQUE, FL_UPPER,
};

static const struct { const char *name; int id; } k_filters[] = {
    {"abs", FL_ABS}, {"attr", FL_ATTR}, {"capitalize", FL_CAPITALIZE}, {"count", FL_LENGTH},
    {"d", FL_DEFAULT}, {"default", FL_DEFAULT}, {"dictsort", FL_DICTSORT}, {"e", FL_ESCAPE},
    {"escape", FL_ESCAPE}, {"first", FL_FIRST}, {"float", FL_FLOAT}, {"format", FL_FORMAT},
    {"indent", FL_INDENT}, {"int", FL_INT}, {"items", FL_ITEMS}, {"join", FL_JOIN},
    {"last", FL_LAST}, {"length", FL_LENGTH}, {"list", FL_LIST}, {"lower", FL_LOWER},
    {"map", FL_MAP}, {"max", FL_MAX}, {"min", FL_MIN}, {"reject", FL_REJECT},
    {"rejectattr", FL_REJECTATTR}, {"replace", FL_REPLACE}, {"reverse", FL_REVERSE},
    {"round", FL_ROUND}, {"safe", FL_SAFE}, {"select", FL_SELECT},
    {"selectattr", FL_SELECTATTR}, {"sort", FL_SORT}, {"string", FL_STRING}, {"sum", FL_SUM},
    {"title", FL_TITLE}, {"tojson", FL_TOJSON}, {"trim", FL_TRIM}, {"unique", FL_UNIQUE},
    {"upper", FL_UPPER},
};

enum {
    TS_DEFINED, TS_UNDEFINED, TS_NONE, TS_STRING, TS_MAPPING, TS_ITERABLE, TS_SEQUENCE,
    TS_NUMBER, TS_INTEGER, TS_FLOAT, TS_BOOLEAN, TS_TRUE, TS_FALSE, TS_EQ, TS_NE, TS_LT, TS_LE,
    TS_GT, TS_GE, TS_IN, TS_SAMEAS, TS_ODD, TS_EVEN, TS_DIVISIBLEBY, TS_LOWER, TS_UPPER,
    TS_CALLABLE, TS_ESCAPED,
};

static const struct { const char *name; int id; } k_tests[] = {
    {"defined", TS_DEFINED}, {"undefined", TS_UNDEFINED}, {"none", TS_NONE},
    {"string", TS_STRING}, {"mapping", TS_MAPPING}, {"iterable", TS_ITERABLE},
    {"sequence", TS_SEQUENCE}, {"number", TS_NUMBER}, {"integer", TS_INTEGER},
    {"float", TS_FLOAT}, {"boolean", TS_BOOLEAN}, {"true", TS_TRUE}, {"false", TS_FALSE},
    {"eq", TS_EQ}, {"equalto", TS_EQ}, {"==", TS_EQ}, {"ne", TS_NE}, {"!=", TS_NE},
    {"lt", TS_LT}, {"lessthan", TS_LT}, {"<", TS_LT}, {"le", TS_LE}, {"<=", TS_LE},
    {"gt", TS_GT}, {"greaterthan", TS_GT}, {">", TS_GT}, {"ge", TS_GE}, {">=", TS_GE},
    {"in", TS_IN}, {"sameas", TS_SAMEAS}, {"odd", TS_ODD}, {"even", TS_EVEN},
    {"divisibleby", TS_DIVISIBLEBY}, {"lower", TS_LOWER}, {"upper", TS_UPPER},
    {"callable", TS_CALLABLE}, {"escaped", TS_ESCAPED},
};

#define ID_UNKNOWN 0xFFFF /* N_FILTER / N_TEST id of a name strata does not implement */

/* FL_* id of a filter name, or -1. */
static int filter_lookup(jstr name) {
    for (size_t i = 0; i < sizeof k_filters / sizeof k_filters[0]; i++)
        if (js_eqc(name, k_filters[i].name)) return k_filters[i].id;
    return -1;
}

/* TS_* id of a test name, or -1. */
static int test_lookup(jstr name) {
    for (size_t i = 0; i < sizeof k_tests / sizeof k_tests[0]; i++)
        if (js_eqc(name, k_tests[i].name)) return k_tests[i].id;
    return -1;
}

/* ---------------------------------------------------------------------------------------------- */
/* lexer (jinja2/lexer.py with trim_blocks=True, lstrip_blocks=True)                              */

enum { TK_EOF, TK_DATA, TK_VBEGIN, TK_VEND, TK_BBEGIN, TK_BEND, TK_NAME, TK_STR, TK_INT, TK_FLOAT, TK_OP };

enum {
    OP_NONE, OP_ADD, OP_SUB, OP_DIV, OP_FLOORDIV, OP_MUL, OP_MOD, OP_POW, OP_TILDE, OP_LBRACKET,
    OP_RBRACKET, OP_LPAREN, OP_RPAREN, OP_LBRACE, OP_RBRACE, OP_EQ, OP_NE, OP_GT, OP_GTEQ, OP_LT,
    OP_LTEQ, OP_ASSIGN, OP_DOT, OP_COLON, OP_PIPE, OP_COMMA, OP_SEMICOLON,
    OP_IN, OP_NOTIN, /* comparison operands only; never produced by the lexer */
};

/* longest first, as jinja2's operator_re */
static const struct { const char *s; uint8_t op; } k_ops[] = {
    {"//", OP_FLOORDIV}, {"**", OP_POW}, {"==", OP_EQ}, {"!=", OP_NE}, {">=", OP_GTEQ},
    {"<=", OP_LTEQ}, {"+", OP_ADD}, {"-", OP_SUB}, {"/", OP_DIV}, {"*", OP_MUL}, {"%", OP_MOD},
    {"~", OP_TILDE}, {"[", OP_LBRACKET}, {"]", OP_RBRACKET}, {"(", OP_LPAREN},
    {")", OP_RPAREN}, {"{", OP_LBRACE}, {"}", OP_RBRACE}, {">", OP_GT}, {"<", OP_LT},
    {"=", OP_ASSIGN}, {".", OP_DOT}, {":", OP_COLON}, {"|", OP_PIPE}, {",", OP_COMMA},
    {";", OP_SEMICOLON},
};

/* Source text of an operator (for messages). */
static const char *op_text(int op) {
    for (size_t i = 0; i < sizeof k_ops / sizeof k_ops[0]; i++)
        if (k_ops[i].op == op) return k_ops[i].s;
    return op == OP_IN ? "in" : op == OP_NOTIN ? "not in" : "?";
}

typedef struct jtok {
    uint8_t t, op;
    uint32_t pos; /* byte offset in the normalized source */
    jstr s;       /* TK_DATA / TK_NAME: slice of the source; TK_STR: the unescaped value */
    int64_t i;
    double f;
} jtok;

typedef struct jparser {
    jfail *f;
    arena *ar;
    const char *src;
    size_t len;
    jtok *toks;
    size_t ntok, cap, i;
    int depth;    /* parse recursion, bounded by J_MAX_DEPTH */
    int in_loop;  /* > 0 inside a for body: break / continue allowed */
    jnode *macro; /* innermost macro being parsed (records varargs / kwargs / caller use) */
} jparser;

/* Appends a token of type t at byte offset pos; returns it (other fields zeroed). */
static jtok *tok_push(jparser *p, int t, size_t pos) {
    if (p->ntok == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        jtok *nt = ar_array(p->ar, cap, sizeof(jtok));
        if (p->ntok) memcpy(nt, p->toks, p->ntok * sizeof(jtok));
        p->toks = nt;
        p->cap = cap;
    }
    jtok *k = &p->toks[p->ntok++];
    memset(k, 0, sizeof *k);
    k->t = (uint8_t)t;
    k->pos = (uint32_t)pos;
    return k;
}

/* Emits src[lo, hi) as template data (nothing if empty). */
static void tok_data(jparser *p, size_t lo, size_t hi) {
    if (hi <= lo) return;
    jtok *t = tok_push(p, TK_DATA, lo);
    t->s = js(p->src + lo, hi - lo);
}

/* Index after the whitespace starting at s[j]. */
static size_t skip_ws(const char *s, size_t n, size_t j) {
    size_t w;
    while (j < n && (w = ws_at(s, n, j))) j += w;
    return j;
}

/* Jinja's OptionalLStrip: trims the text src[lo, *hi) that precedes a tag. sign is the tag's
 * whitespace control ('-' strips all whitespace before it, '+' keeps it); otherwise, for {% and
 * {# tags (lstrip_ok), the spaces between the start of the line and the tag go. line_starting:
 * the previous match ended with a newline (so src[lo] starts a line). */
static void lex_strip_before(jparser *p, size_t lo, size_t *hi, char sign, bool lstrip_ok,
                             bool line_starting) {
    const char *s = p->src;
    if (sign == '-') {
        *hi = rstrip_ws(s, lo, *hi);
        return;
    }
    if (sign == '+' || !lstrip_ok) return;
    size_t l = *hi;
    while (l > lo && s[l - 1] != '\n') l--;
    if (l == lo && !line_starting) return;
    if (l == *hi) return; /* \s+ needs one character */
    for (size_t j = l; j < *hi;) {
        size_t w = ws_at(s, *hi, j);
        if (!w) return;
        j += w;
    }
    *hi = l;
}

/* If src[q...] (just after a "{%") is a raw tag — [-+]? \s* raw \s* (-%} \s* | %}) — returns
 * the end of the match, else 0. */
static size_t lex_raw_begin(const char *s, size_t n, size_t q) {
    size_t j = q;
    if (j < n && (s[j] == '-' || s[j] == '+')) j++;
    j = skip_ws(s, n, j);
    if (n - j < 3 || memcmp(s + j, "raw", 3)) return 0;
    j = skip_ws(s, n, j + 3);
    if (n - j >= 3 && !memcmp(s + j, "-%}", 3)) return skip_ws(s, n, j + 3);
    if (n - j >= 2 && !memcmp(s + j, "%}", 2)) return j + 2;
    return 0;
}

/* Finds the first {% endraw %} at or after pos: *start = its "{%", *sign its whitespace control,
 * *end the end of the match (with trim_blocks' newline). Returns false if there is none. */
static bool lex_raw_end(const char *s, size_t n, size_t pos, size_t *start, char *sign,
                        size_t *end) {
    for (size_t k = pos; k + 1 < n; k++) {
        if (s[k] != '{' || s[k + 1] != '%') continue;
        size_t j = k + 2;
        char sg = 0;
        if (j < n && (s[j] == '-' || s[j] == '+')) sg = s[j++];
        j = skip_ws(s, n, j);
        if (n - j < 6 || memcmp(s + j, "endraw", 6)) continue;
        j = skip_ws(s, n, j + 6);
        if (n - j >= 3 && !memcmp(s + j, "+%}", 3)) *end = j + 3;
        else if (n - j >= 3 && !memcmp(s + j, "-%}", 3)) *end = skip_ws(s, n, j + 3);
        else if (n - j >= 2 && !memcmp(s + j, "%}", 2)) *end = j + 2 + (j + 2 < n && s[j + 2] == '\n');
        else continue;
        *start = k;
        *sign = sg;
        return true;
    }
    return false;
}

/* Matches (\d+_)*\d+ at s[j]: returns the end, or 0 if s[j] is not a digit. */
static size_t scan_digits(const char *s, size_t n, size_t j) {
    if (j >= n || s[j] < '0' || s[j] > '9') return 0;
    j++;
    for (;;) {
        if (j < n && s[j] >= '0' && s[j] <= '9') j++;
        else if (j + 1 < n && s[j] == '_' && s[j + 1] >= '0' && s[j + 1] <= '9') j += 2;
        else return j;
    }
}

/* Value of a digit in bases up to 36; 99 for a non-digit. */
static int digit_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'z') return c - 'a' + 10;
    if (c >= 'A' && c <= 'Z') return c - 'A' + 10;
    return 99;
}

/* Unescapes a string literal's body src[lo, hi) the way jinja2 does (Python's unicode-escape
 * codec): \n \t \\ \' \" \xhh \uhhhh \Uhhhhhhhh \ooo ...; unknown escapes stay as written. */
static jstr lex_unescape(jparser *p, size_t lo, size_t hi) {
    const char *s = p->src;
    sbuf b;
    sb_init(&b, p->ar);
    for (size_t i = lo; i < hi; i++) {
        if (s[i] != '\\' || i + 1 >= hi) {
            sb_putc(&b, s[i]);
            continue;
        }
        char e = s[i + 1];
        int32_t cp = -1;
        size_t used = 2;
        switch (e) {
        case '\n': used = 2; cp = -2; break;
        case '\\': cp = '\\'; break;
        case '\'': cp = '\''; break;
        case '"': cp = '"'; break;
        case 'a': cp = 7; break;
        case 'b': cp = 8; break;
        case 'f': cp = 12; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'v': cp = 11; break;
        case 'x': case 'u': case 'U': {
            int nd = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            cp = 0;
            for (int k = 0; k < nd; k++) {
                size_t j = i + 2 + (size_t)k;
                if (j >= hi || digit_value(s[j]) > 15)
                    jthrow(p->f, ST_ERR_FORMAT, i, "truncated \\%c escape in a string literal", e);
                cp = cp * 16 + digit_value(s[j]);
            }
            used = 2 + (size_t)nd;
            if (cp > 0x10FFFF || cp < 0)
                jthrow(p->f, ST_ERR_FORMAT, i, "illegal Unicode character in a string literal");
            if (cp >= 0xD800 && cp <= 0xDFFF)
                jthrow(p->f, ST_ERR_UNSUPPORTED, i, "surrogate code point in a string literal");
            break;
        }
        case 'N': jthrow(p->f, ST_ERR_UNSUPPORTED, i, "\\N{...} escapes are not supported");
        default:
            if (e >= '0' && e <= '7') {
                cp = 0;
                used = 1;
                for (int k = 0; k < 3 && i + used < hi && s[i + used] >= '0' && s[i + used] <= '7'; k++)
                    cp = cp * 8 + (s[i + used++] - '0');
            }
            break;
        }
        if (cp == -1) { /* unknown escape: the backslash stays, the next char is read normally */
            sb_putc(&b, '\\');
            continue;
        }
        if (cp >= 0) {
            char u[4];
            sb_put(&b, u, u8_put(cp, u));
        }
        i += used - 1;
    }
    return js(b.p ? b.p : "", b.n);
}

/* If s[j] starts (first) or continues a Python identifier, returns the index after that code
 * point, else 0. Non-ASCII: letters and Nl start; marks, digits and connectors continue. */
static size_t ident_char(const char *s, size_t n, size_t j, bool first) {
    unsigned char c = (unsigned char)s[j];
    if (c < 0x80) {
        bool ok = c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (!first && c >= '0' && c <= '9');
        return ok ? j + 1 : 0;
    }
    size_t k = j;
    utf8proc_category_t cat = utf8proc_category(u8_next(s, n, &k));
    bool ok = (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) || cat == UTF8PROC_CATEGORY_NL ||
              (!first && (cat == UTF8PROC_CATEGORY_MN || cat == UTF8PROC_CATEGORY_MC ||
                          cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_PC));
    return ok ? k : 0;
}

/* Lexes one expression token at *pos inside {{ }} / {% %}; brace balance in stack/depth. */
static void lex_token(jparser *p, size_t *pos, uint8_t *stack, int *depth) {
    const char *s = p->src;
    size_t n = p->len, j = *pos;
    char c = s[j];
    /* float: (?<!\.)(\d+_)*\d+((\.(\d+_)*\d+)?e[+\-]?(\d+_)*\d+|\.(\d+_)*\d+) */
    if (c >= '0' && c <= '9' && !(j > 0 && s[j - 1] == '.')) {
        size_t a = scan_digits(s, n, j), end = 0;
        size_t fe = (a < n && s[a] == '.') ? scan_digits(s, n, a + 1) : 0;
        size_t ex = fe ? fe : a;
        if (ex < n && (s[ex] == 'e' || s[ex] == 'E')) {
            size_t k = ex + 1;
            if (k < n && (s[k] == '+' || s[k] == '-')) k++;
            size_t ee = scan_digits(s, n, k);
            if (ee) end = ee;
        }
        if (!end && fe) end = fe;
        if (end) {
            char buf[64];
            size_t m = 0;
            for (size_t k = j; k < end && m + 1 < sizeof buf; k++)
                if (s[k] != '_') buf[m++] = s[k];
            buf[m] = 0;
            jtok *t = tok_push(p, TK_FLOAT, j);
            t->f = strtod(buf, NULL);
            *pos = end;
            return;
        }
    }
    /* integer: 0b.. 0o.. 0x.. | [1-9](_?\d)* | 0(_?0)* */
    if (c >= '0' && c <= '9') {
        int base = 10;
        size_t start = j, end = 0;
        if (c == '0' && j + 1 < n && strchr("bBoOxX", s[j + 1]) && s[j + 1]) {
            base = (s[j + 1] | 32) == 'b' ? 2 : (s[j + 1] | 32) == 'o' ? 8 : 16;
            size_t k = j + 2;
            for (;;) {
                if (k < n && digit_value(s[k]) < base) k++;
                else if (k + 1 < n && s[k] == '_' && digit_value(s[k + 1]) < base) k += 2;
                else break;
            }
            if (k > j + 2) end = k, start = j + 2;
            else base = 10;
        }
        if (!end) {
            size_t k = j + 1;
            char lim = c == '0' ? '0' : '9';
            for (;;) {
                if (k < n && s[k] >= '0' && s[k] <= lim) k++;
                else if (k + 1 < n && s[k] == '_' && s[k + 1] >= '0' && s[k + 1] <= lim) k += 2;
                else break;
            }
            end = k;
        }
        uint64_t v = 0;
        for (size_t k = start; k < end; k++) {
            if (s[k] == '_') continue;
            unsigned d = (unsigned)digit_value(s[k]);
            if (v > (UINT64_C(0x7FFFFFFFFFFFFFFF) - d) / (unsigned)base)
                jthrow(p->f, ST_ERR_UNSUPPORTED, j, "integer literal out of 64-bit range");
            v = v * (unsigned)base + d;
        }
        jtok *t = tok_push(p, TK_INT, j);
        t->i = (int64_t)v;
        *pos = end;
        return;
    }
    if (ident_char(s, n, j, true)) {
        size_t k = j, e;
        while (k < n && (e = ident_char(s, n, k, k == j))) k = e;
        jtok *t = tok_push(p, TK_NAME, j);
        t->s = js(s + j, k - j);
        *pos = k;
        return;
    }
    if (c == '\'' || c == '"') {
        size_t k = j + 1;
        while (k < n && s[k] != c) k += s[k] == '\\' ? 2 : 1;
        if (k < n) {
            jstr v = lex_unescape(p, j + 1, k);
            jtok *t = tok_push(p, TK_STR, j);
            t->s = v;
            *pos = k + 1;
            return;
        }
        jthrow(p->f, ST_ERR_FORMAT, j, "unterminated string literal");
    }
    for (size_t i = 0; i < sizeof k_ops / sizeof k_ops[0]; i++) {
        size_t m = strlen(k_ops[i].s);
        if (n - j < m || memcmp(s + j, k_ops[i].s, m)) continue;
        int op = k_ops[i].op;
        if (op == OP_LPAREN || op == OP_LBRACKET || op == OP_LBRACE) {
            if (*depth >= J_MAX_DEPTH) jthrow(p->f, ST_ERR_LIMIT, j, "brackets nested too deeply");
            stack[(*depth)++] = (uint8_t)(op == OP_LPAREN ? ')' : op == OP_LBRACKET ? ']' : '}');
        } else if (op == OP_RPAREN || op == OP_RBRACKET || op == OP_RBRACE) {
            if (*depth == 0) jthrow(p->f, ST_ERR_FORMAT, j, "unexpected '%c'", c);
            char want = (char)stack[--(*depth)];
            if (want != c) jthrow(p->f, ST_ERR_FORMAT, j, "unexpected '%c', expected '%c'", c, want);
        }
        jtok *t = tok_push(p, TK_OP, j);
        t->op = (uint8_t)op;
        *pos = j + m;
        return;
    }
    if ((unsigned char)c >= 0x80) {
        size_t k = j;
        u8_next(s, n, &k);
        jthrow(p->f, ST_ERR_FORMAT, j, "unexpected char '%.*s'", (int)(k - j), s + j);
    }
    jthrow(p->f, ST_ERR_FORMAT, j, "unexpected char '%c'", c);
}

/* Splits the whole (normalized) source into tokens, ending with TK_EOF. */
static void lex(jparser *p) {
    const char *s = p->src;
    size_t n = p->len, pos = 0;
    bool line_starting = true;
    uint8_t stack[J_MAX_DEPTH];
    while (pos < n) {
        size_t i = pos;
        while (i + 1 < n && !(s[i] == '{' && (s[i + 1] == '{' || s[i + 1] == '%' || s[i + 1] == '#'))) i++;
        if (i + 1 >= n) {
            tok_data(p, pos, n);
            break;
        }
        char kind = s[i + 1];
        size_t q = i + 2;
        char sign = q < n && (s[q] == '-' || s[q] == '+') ? s[q] : 0;
        size_t raw_end = kind == '%' ? lex_raw_begin(s, n, q) : 0;
        size_t te = i;
        lex_strip_before(p, pos, &te, sign, kind != '{', line_starting);
        tok_data(p, pos, te);
        if (raw_end) {
            pos = raw_end;
            line_starting = s[raw_end - 1] == '\n';
            size_t k, end;
            char rsign;
            if (!lex_raw_end(s, n, pos, &k, &rsign, &end))
                jthrow(p->f, ST_ERR_FORMAT, i, "missing end of raw directive");
            size_t rte = k;
            lex_strip_before(p, pos, &rte, rsign, true, line_starting);
            tok_data(p, pos, rte);
            pos = end;
            line_starting = s[end - 1] == '\n';
            continue;
        }
        if (kind == '#') {
            size_t j = q + (sign ? 1 : 0), k = j;
            while (k + 1 < n && !(s[k] == '#' && s[k + 1] == '}')) k++;
            if (k + 1 >= n) jthrow(p->f, ST_ERR_FORMAT, i, "missing end of comment tag");
            size_t end = k + 2;
            if (k > j && s[k - 1] == '-') end = skip_ws(s, n, end);
            else if (!(k > j && s[k - 1] == '+') && end < n && s[end] == '\n') end++;
            pos = end;
            line_starting = s[end - 1] == '\n';
            continue;
        }
        bool var = kind == '{';
        tok_push(p, var ? TK_VBEGIN : TK_BBEGIN, i);
        pos = q + (sign ? 1 : 0);
        int depth = 0;
        for (;;) {
            if (pos >= n)
                jthrow(p->f, ST_ERR_FORMAT, i, "unexpected end of template: '%s' is not closed",
                       var ? "{{" : "{%");
            if (depth == 0) {
                size_t end = 0;
                if (var) {
                    if (n - pos >= 3 && !memcmp(s + pos, "-}}", 3)) end = skip_ws(s, n, pos + 3);
                    else if (n - pos >= 2 && !memcmp(s + pos, "}}", 2)) end = pos + 2;
                } else {
                    if (n - pos >= 3 && !memcmp(s + pos, "+%}", 3)) end = pos + 3;
                    else if (n - pos >= 3 && !memcmp(s + pos, "-%}", 3)) end = skip_ws(s, n, pos + 3);
                    else if (n - pos >= 2 && !memcmp(s + pos, "%}", 2))
                        end = pos + 2 + (pos + 2 < n && s[pos + 2] == '\n');
                }
                if (end) {
                    tok_push(p, var ? TK_VEND : TK_BEND, pos);
                    line_starting = s[end - 1] == '\n';
                    pos = end;
                    break;
                }
            }
            size_t w = skip_ws(s, n, pos);
            if (w > pos) {
                pos = w;
                continue;
            }
            lex_token(p, &pos, stack, &depth);
        }
    }
    tok_push(p, TK_EOF, n);
}

/* ---------------------------------------------------------------------------------------------- */
/* parser (jinja2/parser.py)                                                                      */

typedef struct nvec {
    jnode **v;
    uint32_t n, cap;
} nvec;

/* Appends x to a node vector (grows in the arena). */
static void nv_push(arena *a, nvec *v, jnode *x) {
    if (v->n == v->cap) {
        uint32_t cap = v->cap ? v->cap * 2 : 4;
        jnode **nv = ar_array(a, cap, sizeof(jnode *));
        if (v->n) memcpy(nv, v->v, v->n * sizeof(jnode *));
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static jtok *cur(jparser *p) { return &p->toks[p->i]; }

static jtok *look(jparser *p) { return &p->toks[p->i + 1 < p->ntok ? p->i + 1 : p->i]; }

/* Consumes and returns the current token (EOF stays current). */
static jtok *adv(jparser *p) {
    jtok *t = &p->toks[p->i];
    if (t->t != TK_EOF) p->i++;
    return t;
}

static bool tk_name(const jtok *t, const char *name) { return t->t == TK_NAME && js_eqc(t->s, name); }

static bool tk_op(const jtok *t, int op) { return t->t == TK_OP && t->op == op; }

/* A short description of a token for messages (static or thread-local-free: writes to buf). */
static const char *tok_desc(const jtok *t, char *buf, size_t cap) {
    switch (t->t) {
    case TK_EOF: return "end of template";
    case TK_DATA: return "template data";
    case TK_VBEGIN: return "'{{'";
    case TK_VEND: return "end of print statement";
    case TK_BBEGIN: return "'{%'";
    case TK_BEND: return "end of statement block";
    case TK_NAME: snprintf(buf, cap, "'%.*s'", (int)(t->s.n > 40 ? 40 : t->s.n), t->s.p); return buf;
    case TK_STR: return "string";
    case TK_INT: return "integer";
    case TK_FLOAT: return "float";
    default: snprintf(buf, cap, "'%s'", op_text(t->op)); return buf;
    }
}

/* Raises "expected X, got Y" / "unexpected Y" at token t. */
static _Noreturn void perr_unexpected(jparser *p, const jtok *t, const char *expected) {
    char buf[64];
    if (expected)
        jthrow(p->f, ST_ERR_FORMAT, t->pos, "expected %s, got %s", expected, tok_desc(t, buf, sizeof buf));
    jthrow(p->f, ST_ERR_FORMAT, t->pos, "unexpected %s", tok_desc(t, buf, sizeof buf));
}

/* Consumes an operator token op or raises. */
static jtok *expect_op(jparser *p, int op) {
    if (!tk_op(cur(p), op)) {
        char want[16];
        snprintf(want, sizeof want, "'%s'", op_text(op));
        perr_unexpected(p, cur(p), want);
    }
    return adv(p);
}

/* Consumes a token of the given type or raises ("what" names it). */
static jtok *expect_tok(jparser *p, int type, const char *what) {
    if (cur(p)->t != type) perr_unexpected(p, cur(p), what);
    return adv(p);
}

/* Consumes the keyword kw or raises. */
static void expect_kw(jparser *p, const char *kw) {
    if (!tk_name(cur(p), kw)) {
        char want[32];
        snprintf(want, sizeof want, "'%s'", kw);
        perr_unexpected(p, cur(p), want);
    }
    adv(p);
}

/* A zeroed AST node of kind k at source offset pos. */
static jnode *mknode(jparser *p, int k, size_t pos) {
    jnode *n = ar_zalloc(p->ar, sizeof *n);
    n->k = (uint8_t)k;
    n->pos = (uint32_t)pos;
    return n;
}

/* Counts one more level of parse recursion; raises past J_MAX_DEPTH (the caller
 * decrements p->depth when it returns). */
static void enter(jparser *p) {
    if (++p->depth > J_MAX_DEPTH)
        jthrow(p->f, ST_ERR_LIMIT, cur(p)->pos, "template nested too deeply");
}

static jnode *parse_expression(jparser *p, bool condexpr);
static jnode *parse_unary(jparser *p, bool with_filter);
static jnode *parse_primary(jparser *p);
static jnode *parse_postfix(jparser *p, jnode *n);
static jnode *parse_filter(jparser *p, jnode *n, bool start_inline);

/* Parses "(args, name=value, ...)" into n->xs / n->names + n->ys. */
static void parse_call_args(jparser *p, jnode *n) {
    expect_op(p, OP_LPAREN);
    nvec args = {0}, kw = {0};
    jstr names[64];
    bool need_comma = false;
    while (!tk_op(cur(p), OP_RPAREN)) {
        if (need_comma) {
            expect_op(p, OP_COMMA);
            if (tk_op(cur(p), OP_RPAREN)) break;
        }
        if (tk_op(cur(p), OP_MUL) || tk_op(cur(p), OP_POW))
            jthrow(p->f, ST_ERR_UNSUPPORTED, cur(p)->pos, "*args / **kwargs in calls are not supported");
        if (cur(p)->t == TK_NAME && tk_op(look(p), OP_ASSIGN)) {
            if (kw.n >= 64) jthrow(p->f, ST_ERR_LIMIT, cur(p)->pos, "too many keyword arguments");
            names[kw.n] = adv(p)->s;
            adv(p);
            nv_push(p->ar, &kw, parse_expression(p, true));
        } else {
            if (kw.n) jthrow(p->f, ST_ERR_FORMAT, cur(p)->pos, "positional argument follows keyword argument");
            nv_push(p->ar, &args, parse_expression(p, true));
        }
        need_comma = true;
    }
    expect_op(p, OP_RPAREN);
    n->xs = args.v;
    n->nx = args.n;
    n->ys = kw.v;
    n->ny = kw.n;
    if (kw.n) {
        n->names = ar_array(p->ar, kw.n, sizeof(jstr));
        memcpy(n->names, names, kw.n * sizeof(jstr));
    }
}

/* True at the end of a tuple: }}, %}, ')' or the given keyword. */
static bool is_tuple_end(jparser *p, const char *extra_end) {
    jtok *t = cur(p);
    if (t->t == TK_VEND || t->t == TK_BEND || tk_op(t, OP_RPAREN)) return true;
    return extra_end && tk_name(t, extra_end);
}

/* parse_tuple: one expression, or a tuple if commas follow. simplified: items are primaries
 * (assignment targets); explicit: inside parentheses, where () is the empty tuple. */
static jnode *parse_tuple(jparser *p, bool simplified, bool condexpr, const char *extra_end,
                          bool explicit) {
    size_t pos = cur(p)->pos;
    nvec items = {0};
    bool is_tuple = false;
    for (;;) {
        if (items.n) expect_op(p, OP_COMMA);
        if (is_tuple_end(p, extra_end)) break;
        nv_push(p->ar, &items, simplified ? parse_primary(p) : parse_expression(p, condexpr));
        if (tk_op(cur(p), OP_COMMA)) is_tuple = true;
        else break;
    }
    if (!is_tuple) {
        if (items.n) return items.v[0];
        if (!explicit) perr_unexpected(p, cur(p), "an expression");
    }
    jnode *n = mknode(p, N_TUPLE, pos);
    n->xs = items.v;
    n->nx = items.n;
    return n;
}

/* [a, b, ...] (a trailing comma is allowed). */
static jnode *parse_list(jparser *p) {
    jnode *n = mknode(p, N_LIST, expect_op(p, OP_LBRACKET)->pos);
    nvec items = {0};
    while (!tk_op(cur(p), OP_RBRACKET)) {
        if (items.n) expect_op(p, OP_COMMA);
        if (tk_op(cur(p), OP_RBRACKET)) break;
        nv_push(p->ar, &items, parse_expression(p, true));
    }
    expect_op(p, OP_RBRACKET);
    n->xs = items.v;
    n->nx = items.n;
    return n;
}

/* {k: v, ...} (a trailing comma is allowed). */
static jnode *parse_dict(jparser *p) {
    jnode *n = mknode(p, N_DICT, expect_op(p, OP_LBRACE)->pos);
    nvec keys = {0}, vals = {0};
    while (!tk_op(cur(p), OP_RBRACE)) {
        if (keys.n) expect_op(p, OP_COMMA);
        if (tk_op(cur(p), OP_RBRACE)) break;
        nv_push(p->ar, &keys, parse_expression(p, true));
        expect_op(p, OP_COLON);
        nv_push(p->ar, &vals, parse_expression(p, true));
    }
    expect_op(p, OP_RBRACE);
    n->xs = keys.v;
    n->nx = keys.n;
    n->ys = vals.v;
    n->ny = vals.n;
    return n;
}

/* A literal, name, (tuple), [list] or {dict}. */
static jnode *parse_primary(jparser *p) {
    enter(p);
    jtok *t = cur(p);
    jnode *n;
    if (t->t == TK_NAME) {
        adv(p);
        if (tk_name(t, "true") || tk_name(t, "True") || tk_name(t, "false") || tk_name(t, "False")) {
            n = mknode(p, N_CONST, t->pos);
            n->v = v_bool(t->s.p[0] == 't' || t->s.p[0] == 'T');
        } else if (tk_name(t, "none") || tk_name(t, "None")) {
            n = mknode(p, N_CONST, t->pos);
            n->v = V_NONE;
        } else {
            n = mknode(p, N_NAME, t->pos);
            n->s = t->s;
            if (p->macro) {
                if (js_eqc(t->s, "varargs")) p->macro->op |= MF_VARARGS;
                else if (js_eqc(t->s, "kwargs")) p->macro->op |= MF_KWARGS;
                else if (js_eqc(t->s, "caller")) p->macro->op |= MF_CALLER;
            }
        }
    } else if (t->t == TK_STR) {
        adv(p);
        n = mknode(p, N_CONST, t->pos);
        jstr s = t->s;
        if (cur(p)->t == TK_STR) { /* adjacent literals concatenate */
            sbuf b;
            sb_init(&b, p->ar);
            sb_putj(&b, s);
            while (cur(p)->t == TK_STR) sb_putj(&b, adv(p)->s);
            s = js(b.p ? b.p : "", b.n);
        }
        n->v = v_str(s);
    } else if (t->t == TK_INT || t->t == TK_FLOAT) {
        adv(p);
        n = mknode(p, N_CONST, t->pos);
        n->v = t->t == TK_INT ? v_int(t->i) : v_float(t->f);
    } else if (tk_op(t, OP_LPAREN)) {
        adv(p);
        n = parse_tuple(p, false, true, NULL, true);
        expect_op(p, OP_RPAREN);
    } else if (tk_op(t, OP_LBRACKET)) {
        n = parse_list(p);
    } else if (tk_op(t, OP_LBRACE)) {
        n = parse_dict(p);
    } else {
        perr_unexpected(p, t, NULL);
    }
    p->depth--;
    return n;
}

/* One subscript: an expression or a slice [a]:[b][:[c]]. */
static jnode *parse_subscribed(jparser *p) {
    size_t pos = cur(p)->pos;
    jnode *parts[3] = {NULL, NULL, NULL};
    if (tk_op(cur(p), OP_COLON)) {
        adv(p);
    } else {
        jnode *e = parse_expression(p, true);
        if (!tk_op(cur(p), OP_COLON)) return e;
        adv(p);
        parts[0] = e;
    }
    if (!tk_op(cur(p), OP_COLON) && !tk_op(cur(p), OP_RBRACKET) && !tk_op(cur(p), OP_COMMA))
        parts[1] = parse_expression(p, true);
    if (tk_op(cur(p), OP_COLON)) {
        adv(p);
        if (!tk_op(cur(p), OP_RBRACKET) && !tk_op(cur(p), OP_COMMA)) parts[2] = parse_expression(p, true);
    }
    jnode *n = mknode(p, N_SLICE, pos);
    n->a = parts[0];
    n->b = parts[1];
    n->c = parts[2];
    return n;
}

/* .name, .0 or [subscript] after n. */
static jnode *parse_subscript(jparser *p, jnode *n) {
    jtok *t = adv(p);
    if (t->t == TK_OP && t->op == OP_DOT) {
        jtok *a = adv(p);
        if (a->t == TK_NAME) {
            jnode *r = mknode(p, N_ATTR, a->pos);
            r->a = n;
            r->s = a->s;
            return r;
        }
        if (a->t != TK_INT) perr_unexpected(p, a, "a name or number");
        jnode *k = mknode(p, N_CONST, a->pos);
        k->v = v_int(a->i);
        jnode *r = mknode(p, N_ITEM, a->pos);
        r->a = n;
        r->b = k;
        return r;
    }
    nvec args = {0};
    while (!tk_op(cur(p), OP_RBRACKET)) {
        if (args.n) expect_op(p, OP_COMMA);
        nv_push(p->ar, &args, parse_subscribed(p));
    }
    expect_op(p, OP_RBRACKET);
    jnode *r = mknode(p, N_ITEM, t->pos);
    r->a = n;
    if (args.n == 1) {
        r->b = args.v[0];
    } else {
        jnode *tu = mknode(p, N_TUPLE, t->pos);
        tu->xs = args.v;
        tu->nx = args.n;
        r->b = tu;
    }
    return r;
}

/* n(args...). */
static jnode *parse_call(jparser *p, jnode *n) {
    jnode *c = mknode(p, N_CALL, n->pos); /* errors point at the callee */
    c->a = n;
    parse_call_args(p, c);
    return c;
}

/* Attribute, item and call suffixes after n. */
static jnode *parse_postfix(jparser *p, jnode *n) {
    for (;;) {
        if (tk_op(cur(p), OP_DOT) || tk_op(cur(p), OP_LBRACKET)) n = parse_subscript(p, n);
        else if (tk_op(cur(p), OP_LPAREN)) n = parse_call(p, n);
        else return n;
    }
}

/* Filter / test name (dotted names are plugin filters: unsupported). */
static jtok *parse_callee_name(jparser *p, const char *what) {
    jtok *t = expect_tok(p, TK_NAME, "a name");
    if (tk_op(cur(p), OP_DOT))
        jthrow(p->f, ST_ERR_UNSUPPORTED, t->pos, "unsupported %s '%.*s.'", what, (int)t->s.n, t->s.p);
    return t;
}

/* n | f(...) | g ... ; n == NULL for filter blocks. */
static jnode *parse_filter(jparser *p, jnode *n, bool start_inline) {
    while (tk_op(cur(p), OP_PIPE) || start_inline) {
        if (!start_inline) adv(p);
        jtok *t = parse_callee_name(p, "filter");
        int id = filter_lookup(t->s);
        jnode *f = mknode(p, N_FILTER, t->pos);
        f->a = n;
        f->id = id < 0 ? ID_UNKNOWN : (uint16_t)id; /* unknown: see check_names */
        f->s = t->s;
        if (tk_op(cur(p), OP_LPAREN)) parse_call_args(p, f);
        n = f;
        start_inline = false;
    }
    return n;
}

/* n is [not] test [arg | (args)] */
static jnode *parse_test(jparser *p, jnode *n) {
    jtok *is = adv(p);
    bool negated = false;
    if (tk_name(cur(p), "not")) {
        adv(p);
        negated = true;
    }
    jtok *t = parse_callee_name(p, "test");
    int id = test_lookup(t->s);
    jnode *x = mknode(p, N_TEST, t->pos);
    x->a = n;
    x->id = id < 0 ? ID_UNKNOWN : (uint16_t)id; /* unknown: see check_names */
    x->s = t->s;
    jtok *c = cur(p);
    if (tk_op(c, OP_LPAREN)) {
        parse_call_args(p, x);
    } else if ((c->t == TK_NAME || c->t == TK_STR || c->t == TK_INT || c->t == TK_FLOAT ||
                tk_op(c, OP_LBRACKET) || tk_op(c, OP_LBRACE)) &&
               !tk_name(c, "else") && !tk_name(c, "or") && !tk_name(c, "and")) {
        if (tk_name(c, "is")) jthrow(p->f, ST_ERR_FORMAT, c->pos, "you cannot chain multiple tests with is");
        jnode *arg = parse_postfix(p, parse_primary(p));
        x->xs = ar_array(p->ar, 1, sizeof(jnode *));
        x->xs[0] = arg;
        x->nx = 1;
    }
    if (!negated) return x;
    jnode *nn = mknode(p, N_NOT, is->pos);
    nn->a = x;
    return nn;
}

/* Filters, tests and calls after a unary expression. */
static jnode *parse_filter_expr(jparser *p, jnode *n) {
    for (;;) {
        if (tk_op(cur(p), OP_PIPE)) n = parse_filter(p, n, false);
        else if (tk_name(cur(p), "is")) n = parse_test(p, n);
        else if (tk_op(cur(p), OP_LPAREN)) n = parse_call(p, n);
        else return n;
    }
}

/* -x / +x / primary with postfixes; with_filter: also | filters and is tests
 * (the operand of - binds tighter than its filters: -1|abs is abs(-1)). */
static jnode *parse_unary(jparser *p, bool with_filter) {
    enter(p);
    jtok *t = cur(p);
    jnode *n;
    if (tk_op(t, OP_SUB) || tk_op(t, OP_ADD)) {
        adv(p);
        n = mknode(p, t->op == OP_SUB ? N_NEG : N_POS, t->pos);
        n->a = parse_unary(p, false);
    } else {
        n = parse_primary(p);
    }
    n = parse_postfix(p, n);
    if (with_filter) n = parse_filter_expr(p, n);
    p->depth--;
    return n;
}

/* A binary node of kind k (N_BIN with op, N_AND, N_OR). */
static jnode *mkbin(jparser *p, int k, int op, size_t pos, jnode *a, jnode *b) {
    jnode *n = mknode(p, k, pos);
    n->op = (uint8_t)op;
    n->a = a;
    n->b = b;
    return n;
}

/* a ** b (left-associative, as in Jinja). */
static jnode *parse_pow(jparser *p) {
    jnode *l = parse_unary(p, true);
    while (tk_op(cur(p), OP_POW)) {
        size_t pos = adv(p)->pos;
        l = mkbin(p, N_BIN, OP_POW, pos, l, parse_unary(p, true));
    }
    return l;
}

/* a * b, a / b, a // b, a % b. */
static jnode *parse_math2(jparser *p) {
    jnode *l = parse_pow(p);
    while (tk_op(cur(p), OP_MUL) || tk_op(cur(p), OP_DIV) || tk_op(cur(p), OP_FLOORDIV) ||
           tk_op(cur(p), OP_MOD)) {
        jtok *t = adv(p);
        l = mkbin(p, N_BIN, t->op, t->pos, l, parse_pow(p));
    }
    return l;
}

/* a ~ b ~ ... */
static jnode *parse_concat(jparser *p) {
    size_t pos = cur(p)->pos;
    jnode *first = parse_math2(p);
    if (!tk_op(cur(p), OP_TILDE)) return first;
    nvec args = {0};
    nv_push(p->ar, &args, first);
    while (tk_op(cur(p), OP_TILDE)) {
        adv(p);
        nv_push(p->ar, &args, parse_math2(p));
    }
    jnode *n = mknode(p, N_CONCAT, pos);
    n->xs = args.v;
    n->nx = args.n;
    return n;
}

/* a + b, a - b (below ~ in precedence, as in Jinja). */
static jnode *parse_math1(jparser *p) {
    jnode *l = parse_concat(p);
    while (tk_op(cur(p), OP_ADD) || tk_op(cur(p), OP_SUB)) {
        jtok *t = adv(p);
        l = mkbin(p, N_BIN, t->op, t->pos, l, parse_concat(p));
    }
    return l;
}

/* a == b < c in d not in e ... (chained). */
static jnode *parse_compare(jparser *p) {
    size_t pos = cur(p)->pos;
    jnode *e = parse_math1(p);
    nvec ops = {0};
    for (;;) {
        jtok *t = cur(p);
        int op;
        if (t->t == TK_OP && (t->op == OP_EQ || t->op == OP_NE || t->op == OP_LT ||
                              t->op == OP_LTEQ || t->op == OP_GT || t->op == OP_GTEQ)) {
            op = t->op;
            adv(p);
        } else if (tk_name(t, "in")) {
            op = OP_IN;
            adv(p);
        } else if (tk_name(t, "not") && tk_name(look(p), "in")) {
            op = OP_NOTIN;
            adv(p);
            adv(p);
        } else {
            break;
        }
        jnode *o = mknode(p, N_OPERAND, t->pos);
        o->op = (uint8_t)op;
        o->a = parse_math1(p);
        nv_push(p->ar, &ops, o);
    }
    if (!ops.n) return e;
    jnode *n = mknode(p, N_CMP, pos);
    n->a = e;
    n->xs = ops.v;
    n->nx = ops.n;
    return n;
}

/* not a. */
static jnode *parse_not(jparser *p) {
    if (tk_name(cur(p), "not")) {
        enter(p);
        jnode *n = mknode(p, N_NOT, adv(p)->pos);
        n->a = parse_not(p);
        p->depth--;
        return n;
    }
    return parse_compare(p);
}

/* a and b. */
static jnode *parse_and(jparser *p) {
    jnode *l = parse_not(p);
    while (tk_name(cur(p), "and")) {
        size_t pos = adv(p)->pos;
        l = mkbin(p, N_AND, 0, pos, l, parse_not(p));
    }
    return l;
}

/* a or b. */
static jnode *parse_or(jparser *p) {
    jnode *l = parse_and(p);
    while (tk_name(cur(p), "or")) {
        size_t pos = adv(p)->pos;
        l = mkbin(p, N_OR, 0, pos, l, parse_and(p));
    }
    return l;
}

/* a if c [else b]. */
static jnode *parse_condexpr(jparser *p) {
    jnode *e1 = parse_or(p);
    while (tk_name(cur(p), "if")) {
        enter(p);
        jnode *c = mknode(p, N_COND, adv(p)->pos);
        c->a = parse_or(p);
        c->b = e1;
        if (tk_name(cur(p), "else")) {
            adv(p);
            c->c = parse_condexpr(p);
        }
        e1 = c;
        p->depth--;
    }
    return e1;
}

/* An expression; condexpr: allow the inline if (not in for / if headers). */
static jnode *parse_expression(jparser *p, bool condexpr) {
    enter(p);
    jnode *n = condexpr ? parse_condexpr(p) : parse_or(p);
    p->depth--;
    return n;
}

/* ---- statements ---- */

static nvec subparse(jparser *p, const char *const *ends);

/* Whether token t is one of the NULL-terminated end tag names. */
static bool is_end(const jtok *t, const char *const *ends) {
    if (!ends) return false;
    for (; *ends; ends++)
        if (tk_name(t, *ends)) return true;
    return false;
}

/* Body of a block statement: "%}" ... up to one of ends (the end tag's name is consumed when
 * drop_needle). */
static nvec parse_statements(jparser *p, const char *const *ends, bool drop_needle) {
    if (tk_op(cur(p), OP_COLON)) adv(p);
    expect_tok(p, TK_BEND, "end of statement block");
    nvec body = subparse(p, ends);
    if (cur(p)->t == TK_EOF)
        jthrow(p->f, ST_ERR_FORMAT, cur(p)->pos, "unexpected end of template, expected '%s'", ends[0]);
    if (drop_needle) adv(p);
    return body;
}

/* Checks that n can be assigned to (a name or a tuple of them). */
static void check_target(jparser *p, jnode *n) {
    if (n->k == N_NAME) return;
    if (n->k == N_TUPLE) {
        for (uint32_t i = 0; i < n->nx; i++) check_target(p, n->xs[i]);
        return;
    }
    jthrow(p->f, ST_ERR_FORMAT, n->pos, "can't assign to this expression");
}

/* A plain name to bind (macro and parameter names). */
static jtok *parse_bind_name(jparser *p) {
    jtok *t = expect_tok(p, TK_NAME, "a name");
    if (tk_name(t, "true") || tk_name(t, "false") || tk_name(t, "none") || tk_name(t, "True") ||
        tk_name(t, "False") || tk_name(t, "None"))
        jthrow(p->f, ST_ERR_FORMAT, t->pos, "can't assign to '%.*s'", (int)t->s.n, t->s.p);
    return t;
}

/* Target of set / for / with: a name, a tuple of names, or (with_namespace) ns.attr. */
static jnode *parse_assign_target(jparser *p, const char *extra_end, bool with_namespace) {
    if (with_namespace && cur(p)->t == TK_NAME && tk_op(look(p), OP_DOT)) {
        jtok *t = adv(p);
        adv(p);
        jtok *a = expect_tok(p, TK_NAME, "a name");
        jnode *n = mknode(p, N_NSREF, t->pos);
        n->s = t->s;
        n->s2 = a->s;
        return n;
    }
    jnode *n = parse_tuple(p, true, true, extra_end, false);
    check_target(p, n);
    return n;
}

/* Stores a statement list as n->xs. */
static void set_body(jnode *n, nvec v) {
    n->xs = v.v;
    n->nx = v.n;
}

/* Stores a statement list as n->ys. */
static void set_else(jnode *n, nvec v) {
    n->ys = v.v;
    n->ny = v.n;
}

/* {% for target in iter [if cond] %} body [{% else %} ...] {% endfor %} */
static jnode *parse_for(jparser *p) {
    jnode *n = mknode(p, N_FOR, adv(p)->pos);
    n->a = parse_assign_target(p, "in", false);
    expect_kw(p, "in");
    n->b = parse_tuple(p, false, false, "recursive", false);
    if (tk_name(cur(p), "if")) {
        adv(p);
        n->c = parse_expression(p, true);
    }
    if (tk_name(cur(p), "recursive"))
        jthrow(p->f, ST_ERR_UNSUPPORTED, cur(p)->pos, "recursive for loops are not supported");
    static const char *const ends[] = {"endfor", "else", NULL};
    static const char *const end_for[] = {"endfor", NULL};
    p->in_loop++;
    set_body(n, parse_statements(p, ends, false));
    p->in_loop--;
    if (tk_name(adv(p), "else")) set_else(n, parse_statements(p, end_for, true));
    return n;
}

/* {% if %} ... {% elif %} ... {% else %} ... {% endif %}; elifs nest as else branches. */
static jnode *parse_if(jparser *p) {
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    static const char *const end_if[] = {"endif", NULL};
    jnode *result = mknode(p, N_IF, adv(p)->pos), *n = result;
    for (;;) {
        n->a = parse_tuple(p, false, false, NULL, false);
        set_body(n, parse_statements(p, ends, false));
        jtok *t = adv(p);
        if (tk_name(t, "elif")) {
            jnode *e = mknode(p, N_IF, t->pos);
            n->ys = ar_array(p->ar, 1, sizeof(jnode *));
            n->ys[0] = e;
            n->ny = 1;
            n = e;
            continue;
        }
        if (tk_name(t, "else")) set_else(n, parse_statements(p, end_if, true));
        return result;
    }
}

/* {% set target = value %} or {% set target [| filters] %}body{% endset %}. */
static jnode *parse_set(jparser *p) {
    size_t pos = adv(p)->pos;
    jnode *target = parse_assign_target(p, NULL, true);
    if (tk_op(cur(p), OP_ASSIGN)) {
        adv(p);
        jnode *n = mknode(p, N_SET, pos);
        n->a = target;
        n->b = parse_tuple(p, false, true, NULL, false);
        return n;
    }
    static const char *const ends[] = {"endset", NULL};
    jnode *n = mknode(p, N_SETBLOCK, pos);
    n->a = target;
    n->b = tk_op(cur(p), OP_PIPE) ? parse_filter(p, NULL, false) : NULL;
    set_body(n, parse_statements(p, ends, true));
    return n;
}

/* {% macro name(a, b=default) %}body{% endmacro %}. */
static jnode *parse_macro(jparser *p) {
    jnode *n = mknode(p, N_MACRO, adv(p)->pos);
    n->s = parse_bind_name(p)->s;
    expect_op(p, OP_LPAREN);
    jstr names[64];
    nvec defs = {0};
    uint32_t np = 0;
    while (!tk_op(cur(p), OP_RPAREN)) {
        if (np) expect_op(p, OP_COMMA);
        jtok *t = parse_bind_name(p);
        if (np >= 64) jthrow(p->f, ST_ERR_LIMIT, t->pos, "too many macro parameters");
        names[np++] = t->s;
        if (tk_op(cur(p), OP_ASSIGN)) {
            adv(p);
            nv_push(p->ar, &defs, parse_expression(p, true));
        } else if (defs.n) {
            jthrow(p->f, ST_ERR_FORMAT, t->pos, "non-default argument follows default argument");
        }
    }
    expect_op(p, OP_RPAREN);
    n->names = ar_array(p->ar, np, sizeof(jstr));
    if (np) memcpy(n->names, names, np * sizeof(jstr));
    n->nn = np;
    n->ys = defs.v;
    n->ny = defs.n;
    static const char *const ends[] = {"endmacro", NULL};
    int saved_loop = p->in_loop;
    jnode *saved_macro = p->macro;
    p->in_loop = 0;
    p->macro = n;
    set_body(n, parse_statements(p, ends, true));
    p->in_loop = saved_loop;
    p->macro = saved_macro;
    return n;
}

/* {% with a = x, b = y %}body{% endwith %}. */
static jnode *parse_with(jparser *p) {
    jnode *n = mknode(p, N_WITH, adv(p)->pos);
    nvec sets = {0};
    while (cur(p)->t != TK_BEND) {
        if (sets.n) expect_op(p, OP_COMMA);
        jnode *s = mknode(p, N_SET, cur(p)->pos);
        s->a = parse_assign_target(p, NULL, false);
        expect_op(p, OP_ASSIGN);
        s->b = parse_expression(p, true);
        nv_push(p->ar, &sets, s);
    }
    set_else(n, sets);
    static const char *const ends[] = {"endwith", NULL};
    set_body(n, parse_statements(p, ends, true));
    return n;
}

/* One {% tag %} (the cursor is on its name); the caller consumes the closing %}. */
static jnode *parse_statement(jparser *p) {
    jtok *t = cur(p);
    if (t->t != TK_NAME) perr_unexpected(p, t, "a tag name");
    enter(p);
    jnode *n;
    if (tk_name(t, "for")) {
        n = parse_for(p);
    } else if (tk_name(t, "if")) {
        n = parse_if(p);
    } else if (tk_name(t, "set")) {
        n = parse_set(p);
    } else if (tk_name(t, "macro")) {
        n = parse_macro(p);
    } else if (tk_name(t, "with")) {
        n = parse_with(p);
    } else if (tk_name(t, "filter")) {
        static const char *const ends[] = {"endfilter", NULL};
        n = mknode(p, N_FILTERBLOCK, adv(p)->pos);
        n->b = parse_filter(p, NULL, true);
        set_body(n, parse_statements(p, ends, true));
    } else if (tk_name(t, "generation")) {
        static const char *const ends[] = {"endgeneration", NULL};
        n = mknode(p, N_SCOPE, adv(p)->pos);
        set_body(n, parse_statements(p, ends, true));
    } else if (tk_name(t, "print")) {
        n = mknode(p, N_OUT, adv(p)->pos);
        nvec items = {0};
        while (cur(p)->t != TK_BEND) {
            if (items.n) expect_op(p, OP_COMMA);
            nv_push(p->ar, &items, parse_expression(p, true));
        }
        set_body(n, items);
    } else if (tk_name(t, "break") || tk_name(t, "continue")) {
        if (!p->in_loop)
            jthrow(p->f, ST_ERR_FORMAT, t->pos, "'%.*s' outside loop", (int)t->s.n, t->s.p);
        n = mknode(p, tk_name(t, "break") ? N_BREAK : N_CONTINUE, adv(p)->pos);
    } else if (tk_name(t, "block") || tk_name(t, "extends") || tk_name(t, "include") ||
               tk_name(t, "import") || tk_name(t, "from") || tk_name(t, "call") ||
               tk_name(t, "autoescape") || tk_name(t, "do")) {
        jthrow(p->f, ST_ERR_UNSUPPORTED, t->pos, "unsupported tag '%.*s'", (int)t->s.n, t->s.p);
    } else {
        jthrow(p->f, ST_ERR_FORMAT, t->pos, "unknown tag '%.*s'", (int)t->s.n, t->s.p);
    }
    p->depth--;
    return n;
}

/* Template nodes up to EOF, or up to a "{% name" with name in ends (left as the current token). */
static nvec subparse(jparser *p, const char *const *ends) {
    nvec body = {0};
    for (;;) {
        jtok *t = cur(p);
        if (t->t == TK_EOF) return body;
        if (t->t == TK_DATA) {
            adv(p);
            jnode *n = mknode(p, N_DATA, t->pos);
            n->s = t->s;
            nv_push(p->ar, &body, n);
        } else if (t->t == TK_VBEGIN) {
            adv(p);
            jnode *n = mknode(p, N_OUT, t->pos);
            jnode *e = parse_tuple(p, false, true, NULL, false);
            expect_tok(p, TK_VEND, "end of print statement");
            n->xs = ar_array(p->ar, 1, sizeof(jnode *));
            n->xs[0] = e;
            n->nx = 1;
            nv_push(p->ar, &body, n);
        } else if (t->t == TK_BBEGIN) {
            adv(p);
            if (is_end(cur(p), ends)) return body;
            nv_push(p->ar, &body, parse_statement(p));
            expect_tok(p, TK_BEND, "end of statement block");
        } else {
            perr_unexpected(p, t, NULL);
        }
    }
}

/* Jinja 3 reports an unknown filter or test when it compiles the template, except inside an
 * {% if %} (test, branches) or an inline `a if c else b` — "soft" frames, where only executing
 * it fails (so `{% if x is defined %}{{ x | exotic }}{% endif %}` works while x is undefined).
 * Loops, macros, with / filter / set / generation blocks open non-soft frames again. This walk
 * raises the compile-time errors; eval raises the others. */
static void check_names(jparser *p, const jnode *n, bool soft);

/* check_names over a statement or expression list. */
static void check_list(jparser *p, jnode *const *xs, uint32_t n, bool soft) {
    for (uint32_t i = 0; i < n; i++) check_names(p, xs[i], soft);
}

/* Jinja2's builtin filters / tests that strata does not implement: Jinja compiles them, so
 * they fail only when executed. */
static bool jinja_builtin(jstr name, bool filter) {
    static const char *const filters[] = {
        "batch", "center", "filesizeformat", "forceescape", "groupby", "pprint", "random", "slice",
        "striptags", "truncate", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr", NULL,
    };
    static const char *const tests[] = {"filter", "test", NULL};
    for (const char *const *t = filter ? filters : tests; *t; t++)
        if (js_eqc(name, *t)) return true;
    return false;
}

static void check_names(jparser *p, const jnode *n, bool soft) {
    if (!n) return;
    switch (n->k) {
    case N_FILTER: case N_TEST:
        if (n->id == ID_UNKNOWN && !soft && !jinja_builtin(n->s, n->k == N_FILTER))
            jthrow(p->f, ST_ERR_UNSUPPORTED, n->pos, "unsupported %s '%.*s'", n->k == N_FILTER ? "filter" : "test",
                   (int)n->s.n, n->s.p);
        break;
    case N_COND: case N_IF:
        soft = true;
        break;
    case N_FOR:
        check_names(p, n->a, soft);
        check_names(p, n->b, soft);
        check_names(p, n->c, false);
        check_list(p, n->xs, n->nx, false);
        check_list(p, n->ys, n->ny, false);
        return;
    case N_MACRO: case N_FILTERBLOCK: case N_SCOPE:
        check_names(p, n->b, false);
        check_list(p, n->ys, n->ny, false);
        check_list(p, n->xs, n->nx, false);
        return;
    case N_SETBLOCK:
        check_names(p, n->b, false);
        check_list(p, n->xs, n->nx, false);
        return;
    case N_WITH:
        for (uint32_t i = 0; i < n->ny; i++) check_names(p, n->ys[i]->b, soft);
        check_list(p, n->xs, n->nx, false);
        return;
    default:
        break;
    }
    check_names(p, n->a, soft);
    check_names(p, n->b, soft);
    check_names(p, n->c, soft);
    check_list(p, n->xs, n->nx, soft);
    check_list(p, n->ys, n->ny, soft);
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: state                                                                               */

struct jinja_template {
    arena ar;  /* owns src, tokens and the AST */
    char *src; /* normalized source (line ends -> \n, one trailing newline dropped) */
    size_t len;
    jnode **body;
    uint32_t n;
};

/* Variables of one scope; lookups walk up the chain. A for-loop iteration, a macro call, a
 * with / filter / generation block each get a fresh scope, as Jinja2's frames do. */
typedef struct scope scope;
struct scope {
    scope *up;
    uint32_t n, cap;
    jstr *k;
    jv *v;
};

struct jmacro {
    const jnode *def;
    scope *closure; /* the scope the macro was defined in (looked up at call time)         */
};

struct jmeth {
    jv self; /* the object a method is bound to                                          */
};

struct jloop {
    jv *items;
    size_t n, i;
    jv last_changed; /* loop.changed() state */
    bool has_changed;
};

enum { F_RANGE = 1, F_DICT, F_NAMESPACE, F_RAISE, F_STRFTIME }; /* JT_FUNC sub */

enum { CTL_NONE, CTL_BREAK, CTL_CONTINUE };

typedef struct jrender {
    jfail f;
    arena ar;
    sbuf *out;      /* where output goes now (macros and block sets redirect it)            */
    scope *sc;      /* current scope                                                         */
    int ctl;        /* CTL_BREAK / CTL_CONTINUE while leaving a loop body                    */
    int depth;      /* macro call depth                                                      */
    uint64_t steps; /* work done, bounded by J_MAX_STEPS                                     */
    time_t now;     /* strftime_now's clock                                                  */
} jrender;

/* Positional + keyword arguments of a call, evaluated. */
typedef struct jargs {
    jv *pos;
    uint32_t npos;
    jstr *kwn;
    jv *kwv;
    uint32_t nkw;
} jargs;

#define RFAIL(r, pos, ...) jthrow(&(r)->f, ST_ERR_FORMAT, (pos), __VA_ARGS__)
#define RUNSUP(r, pos, ...) jthrow(&(r)->f, ST_ERR_UNSUPPORTED, (pos), __VA_ARGS__)

/* Raises the UndefinedError an erroring use of the Undefined u reports. */
static _Noreturn void undef_fail(jrender *r, jv u, size_t pos) {
    if (u.u.s.n) RFAIL(r, pos, "%.*s", (int)u.u.s.n, u.u.s.p);
    RFAIL(r, pos, "undefined value");
}

/* Counts one unit of work; raises ST_ERR_LIMIT past J_MAX_STEPS. */
static void tick(jrender *r, size_t pos) {
    if (++r->steps > J_MAX_STEPS) jthrow(&r->f, ST_ERR_LIMIT, pos, "render does too much work");
}

/* A new empty scope whose lookups continue in up. */
static scope *scope_new(jrender *r, scope *up) {
    scope *s = ar_zalloc(&r->ar, sizeof *s);
    s->up = up;
    return s;
}

/* Binds name to v in s (replacing an existing binding in s itself). */
static void scope_set(jrender *r, scope *s, jstr name, jv v) {
    for (uint32_t i = 0; i < s->n; i++)
        if (js_eq(s->k[i], name)) {
            s->v[i] = v;
            return;
        }
    if (s->n == s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 8;
        jstr *k = ar_array(&r->ar, cap, sizeof(jstr));
        jv *v2 = ar_array(&r->ar, cap, sizeof(jv));
        if (s->n) {
            memcpy(k, s->k, s->n * sizeof(jstr));
            memcpy(v2, s->v, s->n * sizeof(jv));
        }
        s->k = k;
        s->v = v2;
        s->cap = cap;
    }
    s->k[s->n] = name;
    s->v[s->n] = v;
    s->n++;
}

/* Looks name up from s outwards; false if unbound. */
static bool scope_get(const scope *s, jstr name, jv *out) {
    for (; s; s = s->up)
        for (uint32_t i = s->n; i-- > 0;)
            if (js_eq(s->k[i], name)) {
                *out = s->v[i];
                return true;
            }
    return false;
}

/* A string from printf into the render arena. */
static jstr rfmt(jrender *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static jstr rfmt(jrender *r, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) k = 0;
    if ((size_t)k >= sizeof tmp) k = sizeof tmp - 1;
    char *p = ar_alloc(&r->ar, (size_t)k + 1);
    memcpy(p, tmp, (size_t)k + 1);
    return js(p, (size_t)k);
}

static jstr sb_jstr(sbuf *b) { return js(b->p ? b->p : "", b->n); }

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: Python semantics of values                                                          */

/* Python's bool(v). */
static bool truthy(jv v) {
    switch (v.t) {
    case JT_UNDEF: case JT_NONE: return false;
    case JT_BOOL: case JT_INT: return v.u.i != 0;
    case JT_FLOAT: return v.u.f != 0.0;
    case JT_STR: return v.u.s.n > 0;
    case JT_LIST: return v.sub == JL_GEN || v.sub == JL_REVITER || v.u.l->n > 0;
    case JT_DICT: return v.u.d->n > 0;
    default: return true;
    }
}

static double num_f(jv v) { return v.t == JT_FLOAT ? v.u.f : (double)v.u.i; }

/* Compares two numbers exactly (int vs float included): -1, 0, 1; 2 if unordered (NaN). */
static int num_cmp(jv a, jv b) {
    if (a.t != JT_FLOAT && b.t != JT_FLOAT) return (a.u.i > b.u.i) - (a.u.i < b.u.i);
    if (a.t == JT_FLOAT && b.t == JT_FLOAT) {
        if (isnan(a.u.f) || isnan(b.u.f)) return 2;
        return (a.u.f > b.u.f) - (a.u.f < b.u.f);
    }
    bool swap = a.t != JT_FLOAT; /* make a the float */
    double f = swap ? b.u.f : a.u.f;
    int64_t i = swap ? a.u.i : b.u.i;
    int c;
    if (isnan(f)) return 2;
    if (f >= 9223372036854775808.0) c = 1;
    else if (f < -9223372036854775808.0) c = -1;
    else {
        double fl = floor(f);
        int64_t fi = (int64_t)fl;
        if (fi != i) c = fi > i ? 1 : -1;
        else c = f > fl ? 1 : 0;
    }
    return swap ? -c : c;
}

static bool py_eq(jv a, jv b);

/* Python == between two sequences of the same flavour. */
static bool seq_eq(const jlist *a, const jlist *b) {
    if (a->n != b->n) return false;
    for (size_t i = 0; i < a->n; i++)
        if (!py_eq(a->v[i], b->v[i])) return false;
    return true;
}

static ptrdiff_t dict_find(const jdict *d, jv key);

/* Python's a == b. */
static bool py_eq(jv a, jv b) {
    if (is_num(a) && is_num(b)) return num_cmp(a, b) == 0;
    if (a.t != b.t) return false;
    switch (a.t) {
    case JT_UNDEF: case JT_NONE: return true;
    case JT_STR: return js_eq(a.u.s, b.u.s);
    case JT_LIST: {
        bool seq_a = a.sub == JL_LIST || a.sub == JL_TUPLE || a.sub == JL_RANGE;
        if (a.sub != b.sub || !seq_a) return a.u.l == b.u.l;
        return seq_eq(a.u.l, b.u.l);
    }
    case JT_DICT: {
        if (a.u.d->n != b.u.d->n) return false;
        for (size_t i = 0; i < a.u.d->n; i++) {
            ptrdiff_t j = dict_find(b.u.d, a.u.d->k[i]);
            if (j < 0 || !py_eq(a.u.d->v[i], b.u.d->v[j])) return false;
        }
        return true;
    }
    case JT_FUNC: return a.sub == b.sub;
    default: return a.u.l == b.u.l; /* identity */
    }
}

/* Index of key in d (Python dict lookup by ==), or -1. */
static ptrdiff_t dict_find(const jdict *d, jv key) {
    if (key.t == JT_STR) return dict_find_str(d, key.u.s);
    for (size_t i = 0; i < d->n; i++)
        if (py_eq(d->k[i], key)) return (ptrdiff_t)i;
    return -1;
}

/* Whether v can be a dict key (Python hashable). */
static bool hashable(jv v) {
    if (v.t == JT_DICT || v.t == JT_NS) return false;
    if (v.t == JT_LIST) {
        if (v.sub != JL_TUPLE) return v.sub == JL_RANGE || v.sub == JL_GEN || v.sub == JL_REVITER;
        for (size_t i = 0; i < v.u.l->n; i++)
            if (!hashable(v.u.l->v[i])) return false;
    }
    return true;
}

/* Python's ordering a < b as -1 / 0 / 1; TypeError (a render error) between unorderable types. */
static int py_cmp(jrender *r, jv a, jv b, size_t pos, const char *opname) {
    if (is_num(a) && is_num(b)) {
        int c = num_cmp(a, b);
        return c == 2 ? 3 : c; /* 3: NaN, every comparison false */
    }
    if (a.t == JT_STR && b.t == JT_STR) {
        size_t m = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int c = m ? memcmp(a.u.s.p, b.u.s.p, m) : 0; /* UTF-8 byte order == code point order */
        if (c) return c < 0 ? -1 : 1;
        return (a.u.s.n > b.u.s.n) - (a.u.s.n < b.u.s.n);
    }
    if (a.t == JT_LIST && b.t == JT_LIST && a.sub == b.sub && (a.sub == JL_LIST || a.sub == JL_TUPLE)) {
        const jlist *x = a.u.l, *y = b.u.l;
        for (size_t i = 0; i < x->n && i < y->n; i++) {
            if (py_eq(x->v[i], y->v[i])) continue;
            return py_cmp(r, x->v[i], y->v[i], pos, opname);
        }
        return (x->n > y->n) - (x->n < y->n);
    }
    if (a.t == JT_UNDEF) undef_fail(r, a, pos);
    if (b.t == JT_UNDEF) undef_fail(r, b, pos);
    RFAIL(r, pos, "'%s' not supported between instances of '%s' and '%s'", opname, tname(a), tname(b));
}

/* Python's printable test for repr(): not Cc Cf Cs Co Cn Zl Zp Zs (space excepted). */
static bool py_isprintable(int32_t c) {
    if (c == ' ') return true;
    if (c < 0x20 || c == 0x7F) return false;
    if (c < 0x7F) return true;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS:
        return false;
    default:
        return true;
    }
}

/* Python's repr(str). */
static void put_str_repr(sbuf *b, jstr s) {
    bool has_sq = memchr(s.p, '\'', s.n) != NULL, has_dq = memchr(s.p, '"', s.n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    sb_putc(b, q);
    for (size_t i = 0; i < s.n;) {
        size_t st = i;
        int32_t c = u8_next(s.p, s.n, &i);
        if (c == q || c == '\\') {
            sb_putc(b, '\\');
            sb_putc(b, (char)c);
        } else if (c == '\t') sb_puts(b, "\\t");
        else if (c == '\n') sb_puts(b, "\\n");
        else if (c == '\r') sb_puts(b, "\\r");
        else if (py_isprintable(c)) sb_put(b, s.p + st, i - st);
        else if (c <= 0xFF) sb_printf(b, "\\x%02x", (unsigned)c);
        else if (c <= 0xFFFF) sb_printf(b, "\\u%04x", (unsigned)c);
        else sb_printf(b, "\\U%08x", (unsigned)c);
    }
    sb_putc(b, q);
}

static void put_repr(jrender *r, sbuf *b, jv v, size_t pos);

/* Python's str(v) appended to b (Jinja's rendering of {{ v }}; Undefined renders as ""). */
static void put_str(jrender *r, sbuf *b, jv v, size_t pos) {
    char tmp[40];
    switch (v.t) {
    case JT_UNDEF: return;
    case JT_NONE: sb_puts(b, "None"); return;
    case JT_BOOL: sb_puts(b, v.u.i ? "True" : "False"); return;
    case JT_INT: sb_printf(b, "%lld", (long long)v.u.i); return;
    case JT_FLOAT: py_float_repr(v.u.f, tmp); sb_puts(b, tmp); return;
    case JT_STR: sb_putj(b, v.u.s); return;
    case JT_LIST: {
        const jlist *l = v.u.l;
        const char *open = "[", *close = "]";
        switch (v.sub) {
        case JL_TUPLE: open = "("; close = l->n == 1 ? ",)" : ")"; break;
        case JL_RANGE:
            if (l->r2 == 1) sb_printf(b, "range(%lld, %lld)", (long long)l->r0, (long long)l->r1);
            else sb_printf(b, "range(%lld, %lld, %lld)", (long long)l->r0, (long long)l->r1, (long long)l->r2);
            return;
        case JL_VIEW:
            open = l->r0 == 0 ? "dict_items([" : l->r0 == 1 ? "dict_keys([" : "dict_values([";
            close = "])";
            break;
        case JL_GEN: case JL_REVITER:
            RUNSUP(r, pos, "rendering a %s object (its text is a memory address)", tname(v));
        default: break;
        }
        sb_puts(b, open);
        for (size_t i = 0; i < l->n; i++) {
            if (i) sb_puts(b, ", ");
            put_repr(r, b, l->v[i], pos);
        }
        sb_puts(b, close);
        return;
    }
    case JT_DICT: {
        sb_putc(b, '{');
        for (size_t i = 0; i < v.u.d->n; i++) {
            if (i) sb_puts(b, ", ");
            put_repr(r, b, v.u.d->k[i], pos);
            sb_puts(b, ": ");
            put_repr(r, b, v.u.d->v[i], pos);
        }
        sb_putc(b, '}');
        return;
    }
    case JT_NS: {
        sb_puts(b, "<Namespace {");
        for (size_t i = 0; i < v.u.ns->n; i++) {
            if (i) sb_puts(b, ", ");
            put_str_repr(b, v.u.ns->k[i]);
            sb_puts(b, ": ");
            put_repr(r, b, v.u.ns->v[i], pos);
        }
        sb_puts(b, "}>");
        return;
    }
    default:
        RUNSUP(r, pos, "rendering a %s object (its text is a memory address)", tname(v));
    }
}

/* Python's repr(v). */
static void put_repr(jrender *r, sbuf *b, jv v, size_t pos) {
    if (v.t == JT_STR) {
        if (v.sub) sb_puts(b, "Markup(");
        put_str_repr(b, v.u.s);
        if (v.sub) sb_putc(b, ')');
    } else if (v.t == JT_UNDEF) {
        sb_puts(b, "Undefined");
    } else {
        put_str(r, b, v, pos);
    }
}

/* str(v) as a string (no copy for strings). */
static jstr str_of(jrender *r, jv v, size_t pos) {
    if (v.t == JT_STR) return v.u.s;
    if (v.t == JT_UNDEF) return js("", 0);
    sbuf b;
    sb_init(&b, &r->ar);
    put_str(r, &b, v, pos);
    return sb_jstr(&b);
}

/* json.dumps options (transformers' tojson). */
typedef struct jdump {
    bool ascii;
    bool has_indent;
    jstr indent;
    jstr item_sep, key_sep;
    bool sort_keys;
} jdump;

/* A JSON string literal as json.dumps writes it. */
static void json_put_str(sbuf *b, jstr s, bool ascii) {
    sb_putc(b, '"');
    for (size_t i = 0; i < s.n;) {
        unsigned char c = (unsigned char)s.p[i];
        if (c >= 0x80) {
            size_t st = i;
            int32_t cp = u8_next(s.p, s.n, &i);
            if (!ascii) {
                sb_put(b, s.p + st, i - st);
            } else if (cp >= 0x10000) {
                cp -= 0x10000;
                sb_printf(b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                sb_printf(b, "\\u%04x", (unsigned)cp);
            }
            continue;
        }
        i++;
        switch (c) {
        case '"': sb_puts(b, "\\\""); break;
        case '\\': sb_puts(b, "\\\\"); break;
        case '\n': sb_puts(b, "\\n"); break;
        case '\r': sb_puts(b, "\\r"); break;
        case '\t': sb_puts(b, "\\t"); break;
        case '\b': sb_puts(b, "\\b"); break;
        case '\f': sb_puts(b, "\\f"); break;
        default:
            if (c < 0x20 || (ascii && c == 0x7F)) sb_printf(b, "\\u%04x", c);
            else sb_putc(b, (char)c);
        }
    }
    sb_putc(b, '"');
}

/* A newline plus the indent for nesting level (json.dumps with indent). */
static void json_newline(sbuf *b, const jdump *o, int level) {
    sb_putc(b, '\n');
    for (int i = 0; i < level; i++) sb_putj(b, o->indent);
}

/* A JSON number / literal for a scalar; false if v is not one. */
static bool json_scalar(sbuf *b, jv v) {
    char tmp[40];
    switch (v.t) {
    case JT_NONE: sb_puts(b, "null"); return true;
    case JT_BOOL: sb_puts(b, v.u.i ? "true" : "false"); return true;
    case JT_INT: sb_printf(b, "%lld", (long long)v.u.i); return true;
    case JT_FLOAT:
        if (isnan(v.u.f)) sb_puts(b, "NaN");
        else if (isinf(v.u.f)) sb_puts(b, v.u.f < 0 ? "-Infinity" : "Infinity");
        else {
            py_float_repr(v.u.f, tmp);
            sb_puts(b, tmp);
        }
        return true;
    default: return false;
    }
}

static void sort_indices(jrender *r, const jv *keys, size_t *idx, size_t n, size_t pos);

/* json.dumps(v) into b. */
static void json_dump(jrender *r, sbuf *b, jv v, const jdump *o, int level, size_t pos) {
    tick(r, pos);
    if (level > J_MAX_DEPTH) jthrow(&r->f, ST_ERR_LIMIT, pos, "value nested too deeply for tojson");
    if (json_scalar(b, v)) return;
    if (v.t == JT_STR) {
        json_put_str(b, v.u.s, o->ascii);
        return;
    }
    if (v.t == JT_LIST && (v.sub == JL_LIST || v.sub == JL_TUPLE)) {
        const jlist *l = v.u.l;
        if (!l->n) {
            sb_puts(b, "[]");
            return;
        }
        sb_putc(b, '[');
        for (size_t i = 0; i < l->n; i++) {
            if (i) sb_putj(b, o->item_sep);
            if (o->has_indent) json_newline(b, o, level + 1);
            json_dump(r, b, l->v[i], o, level + 1, pos);
        }
        if (o->has_indent) json_newline(b, o, level);
        sb_putc(b, ']');
        return;
    }
    if (v.t == JT_DICT) {
        const jdict *d = v.u.d;
        if (!d->n) {
            sb_puts(b, "{}");
            return;
        }
        size_t *idx = ar_array(&r->ar, d->n, sizeof(size_t));
        for (size_t i = 0; i < d->n; i++) idx[i] = i;
        if (o->sort_keys) sort_indices(r, d->k, idx, d->n, pos);
        sb_putc(b, '{');
        for (size_t j = 0; j < d->n; j++) {
            size_t i = idx[j];
            if (j) sb_putj(b, o->item_sep);
            if (o->has_indent) json_newline(b, o, level + 1);
            jv k = d->k[i];
            if (k.t == JT_STR) {
                json_put_str(b, k.u.s, o->ascii);
            } else if (k.t == JT_FLOAT || k.t == JT_INT || k.t == JT_BOOL || k.t == JT_NONE) {
                sbuf t;
                sb_init(&t, &r->ar);
                json_scalar(&t, k);
                json_put_str(b, sb_jstr(&t), o->ascii);
            } else {
                RFAIL(r, pos, "tojson: keys must be str, int, float, bool or None, not %s", tname(k));
            }
            sb_putj(b, o->key_sep);
            json_dump(r, b, d->v[i], o, level + 1, pos);
        }
        if (o->has_indent) json_newline(b, o, level);
        sb_putc(b, '}');
        return;
    }
    RFAIL(r, pos, "tojson: Object of type %s is not JSON serializable", tname(v));
}

static void gen_force(jrender *r, jlist *l);

/* The items of an iterable (Python's iter()): list-likes, dict keys, a string's characters.
 * Generators are consumed. Undefined iterates as empty. */
static jv *iter_items(jrender *r, jv v, size_t *n, size_t pos) {
    switch (v.t) {
    case JT_UNDEF: *n = 0; return NULL;
    case JT_LIST: {
        jlist *l = v.u.l;
        if (v.sub == JL_GEN || v.sub == JL_REVITER) {
            gen_force(r, l);
            size_t from = l->pos;
            l->pos = l->n;
            *n = l->n - from;
            return l->v + from;
        }
        *n = l->n;
        return l->v;
    }
    case JT_DICT: *n = v.u.d->n; return v.u.d->k;
    case JT_STR: {
        jstr s = v.u.s;
        size_t k = u8_len(s);
        jv *out = ar_array(&r->ar, k, sizeof(jv));
        size_t i = 0, j = 0;
        while (i < s.n) {
            size_t st = i;
            u8_next(s.p, s.n, &i);
            out[j++] = v_str(js(s.p + st, i - st));
        }
        *n = j;
        return out;
    }
    default:
        RFAIL(r, pos, "'%s' object is not iterable", tname(v));
    }
}

/* A fresh list of the items of an iterable (list(v)). */
static jv to_list(jrender *r, jv v, size_t pos) {
    size_t n;
    jv *items = iter_items(r, v, &n, pos);
    jlist *l = list_new(&r->ar, n);
    if (n) memcpy(l->v, items, n * sizeof(jv));
    return v_list(l, JL_LIST);
}

/* Python's len(v). */
static int64_t py_len(jrender *r, jv v, size_t pos) {
    switch (v.t) {
    case JT_UNDEF: return 0;
    case JT_STR: return (int64_t)u8_len(v.u.s);
    case JT_DICT: return (int64_t)v.u.d->n;
    case JT_LIST:
        if (v.sub != JL_GEN && v.sub != JL_REVITER) return (int64_t)v.u.l->n;
        /* fall through */
    default:
        RFAIL(r, pos, "object of type '%s' has no len()", tname(v));
    }
}

/* Python's `item in container`. */
static bool py_contains(jrender *r, jv container, jv item, size_t pos) {
    switch (container.t) {
    case JT_STR: {
        if (item.t != JT_STR)
            RFAIL(r, pos, "'in <string>' requires string as left operand, not %s", tname(item));
        jstr h = container.u.s, nd = item.u.s;
        if (!nd.n) return true;
        if (nd.n > h.n) return false;
        return memmem(h.p, h.n, nd.p, nd.n) != NULL;
    }
    case JT_DICT:
        if (!hashable(item)) RFAIL(r, pos, "unhashable type: '%s'", tname(item));
        return dict_find(container.u.d, item) >= 0;
    case JT_LIST: {
        jlist *l = container.u.l;
        bool gen = container.sub == JL_GEN || container.sub == JL_REVITER;
        if (gen) gen_force(r, l);
        for (size_t i = gen ? l->pos : 0; i < l->n; i++)
            if (py_eq(l->v[i], item)) {
                if (gen) l->pos = i + 1;
                return true;
            }
        if (gen) l->pos = l->n;
        return false;
    }
    case JT_UNDEF: return false;
    default:
        RFAIL(r, pos, "argument of type '%s' is not iterable", tname(container));
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: string helpers (Python str methods)                                                 */

/* Whether code point c occurs in the string set. */
static bool cp_in(jstr set, int32_t c) {
    for (size_t i = 0; i < set.n;)
        if (u8_next(set.p, set.n, &i) == c) return true;
    return false;
}

/* str.strip / lstrip / rstrip: mode 1 = left, 2 = right, 3 = both; chars None/absent strips
 * whitespace. Returns a slice of s. */
static jstr str_strip(jrender *r, jstr s, jv chars, int mode, size_t pos) {
    bool ws = is_absent(chars) || chars.t == JT_NONE;
    if (!ws && chars.t != JT_STR) RFAIL(r, pos, "strip arg must be None or str");
    size_t lo = 0, hi = s.n;
    if (mode & 1)
        while (lo < hi) {
            size_t j = lo;
            int32_t c = u8_next(s.p, hi, &j);
            if (!(ws ? py_isspace(c) : cp_in(chars.u.s, c))) break;
            lo = j;
        }
    if (mode & 2)
        while (hi > lo) {
            size_t k = u8_prev(s.p, hi), j = k;
            int32_t c = u8_next(s.p, hi, &j);
            if (!(ws ? py_isspace(c) : cp_in(chars.u.s, c))) break;
            hi = k;
        }
    return js(s.p + lo, hi - lo);
}

/* Growable list of values in the arena. */
typedef struct vvec {
    jv *v;
    size_t n, cap;
} vvec;

/* Appends x to a value vector (grows in the arena). */
static void vv_push(arena *a, vvec *v, jv x) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        jv *nv = ar_array(a, cap, sizeof(jv));
        if (v->n) memcpy(nv, v->v, v->n * sizeof(jv));
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

/* The vector as a list value of the given flavour (no copy). */
static jv vv_list(jrender *r, vvec *v, int flavour) {
    jlist *l = ar_zalloc(&r->ar, sizeof *l);
    l->n = v->n;
    l->v = v->v;
    return v_list(l, flavour);
}

/* Last occurrence of needle in hay[0, hi), or NULL. */
static const char *mem_rfind(const char *hay, size_t hi, jstr nd) {
    if (nd.n > hi) return NULL;
    for (size_t i = hi - nd.n + 1; i-- > 0;)
        if (!memcmp(hay + i, nd.p, nd.n)) return hay + i;
    return NULL;
}

/* str.split / str.rsplit (sep None/absent: runs of whitespace). */
static jv str_split(jrender *r, jstr s, jv sep, int64_t maxsplit, bool right, size_t pos) {
    vvec out = {0};
    if (is_absent(sep) || sep.t == JT_NONE) {
        if (!right) {
            size_t i = 0;
            while (i < s.n) {
                size_t w;
                while (i < s.n && (w = ws_at(s.p, s.n, i))) i += w;
                if (i >= s.n) break;
                if (maxsplit >= 0 && (int64_t)out.n >= maxsplit) {
                    vv_push(&r->ar, &out, v_str(js(s.p + i, s.n - i)));
                    break;
                }
                size_t st = i;
                while (i < s.n && !ws_at(s.p, s.n, i)) u8_next(s.p, s.n, &i);
                vv_push(&r->ar, &out, v_str(js(s.p + st, i - st)));
            }
            return vv_list(r, &out, JL_LIST);
        }
        size_t hi = s.n;
        vvec rev = {0};
        for (;;) {
            hi = rstrip_ws(s.p, 0, hi);
            if (!hi) break;
            if (maxsplit >= 0 && (int64_t)rev.n >= maxsplit) {
                vv_push(&r->ar, &rev, v_str(js(s.p, hi)));
                break;
            }
            size_t lo = hi;
            while (lo > 0) {
                size_t k = u8_prev(s.p, lo), j = k;
                if (py_isspace(u8_next(s.p, lo, &j))) break;
                lo = k;
            }
            vv_push(&r->ar, &rev, v_str(js(s.p + lo, hi - lo)));
            hi = lo;
        }
        for (size_t i = rev.n; i-- > 0;) vv_push(&r->ar, &out, rev.v[i]);
        return vv_list(r, &out, JL_LIST);
    }
    if (sep.t != JT_STR) RFAIL(r, pos, "must be str or None, not %s", tname(sep));
    jstr d = sep.u.s;
    if (!d.n) RFAIL(r, pos, "empty separator");
    if (!right) {
        size_t i = 0;
        for (;;) {
            const char *hit = (maxsplit >= 0 && (int64_t)out.n >= maxsplit) ? NULL
                              : (s.n - i >= d.n ? memmem(s.p + i, s.n - i, d.p, d.n) : NULL);
            if (!hit) {
                vv_push(&r->ar, &out, v_str(js(s.p + i, s.n - i)));
                break;
            }
            size_t k = (size_t)(hit - s.p);
            vv_push(&r->ar, &out, v_str(js(s.p + i, k - i)));
            i = k + d.n;
        }
        return vv_list(r, &out, JL_LIST);
    }
    vvec rev = {0};
    size_t hi = s.n;
    for (;;) {
        const char *hit = (maxsplit >= 0 && (int64_t)rev.n >= maxsplit) ? NULL : mem_rfind(s.p, hi, d);
        if (!hit) {
            vv_push(&r->ar, &rev, v_str(js(s.p, hi)));
            break;
        }
        size_t k = (size_t)(hit - s.p);
        vv_push(&r->ar, &rev, v_str(js(s.p + k + d.n, hi - k - d.n)));
        hi = k;
    }
    for (size_t i = rev.n; i-- > 0;) vv_push(&r->ar, &out, rev.v[i]);
    return vv_list(r, &out, JL_LIST);
}

/* str.replace(old, new, count) (count < 0: all). */
static jstr str_replace(jrender *r, jstr s, jstr old, jstr rep, int64_t count) {
    sbuf b;
    sb_init(&b, &r->ar);
    if (!old.n) { /* inserts rep before every character and at the end */
        size_t i = 0;
        int64_t k = 0;
        while (count < 0 || k < count) {
            sb_putj(&b, rep);
            k++;
            if (i >= s.n) break;
            size_t st = i;
            u8_next(s.p, s.n, &i);
            sb_put(&b, s.p + st, i - st);
        }
        sb_put(&b, s.p + i, s.n - i);
        return sb_jstr(&b);
    }
    size_t i = 0;
    int64_t k = 0;
    while (count < 0 || k < count) {
        const char *hit = s.n - i >= old.n ? memmem(s.p + i, s.n - i, old.p, old.n) : NULL;
        if (!hit) break;
        size_t at = (size_t)(hit - s.p);
        sb_put(&b, s.p + i, at - i);
        sb_putj(&b, rep);
        i = at + old.n;
        k++;
    }
    if (k == 0) return s;
    sb_put(&b, s.p + i, s.n - i);
    return sb_jstr(&b);
}

/* Code points whose full case mapping differs from the simple one that utf8proc gives, and
 * that strata does not implement (Python would produce several characters). */
static bool case_special(int32_t c) {
    return c == 0x149 || c == 0x1F0 || c == 0x390 || c == 0x3B0 || c == 0x587 ||
           (c >= 0x1E96 && c <= 0x1E9A) || (c >= 0x1F50 && c <= 0x1F56) ||
           (c >= 0x1F80 && c <= 0x1FFC) || (c >= 0xFB13 && c <= 0xFB17) || c == 0x3A3 ||
           c == 0x130;
}

enum { CASE_UPPER, CASE_LOWER, CASE_TITLE };

/* Appends the full case mapping of c (Python's str.upper()/lower()/title char mapping). */
static void put_case(jrender *r, sbuf *b, int32_t c, int mode, size_t pos) {
    char u[4];
    if (c < 0x80) {
        if (mode == CASE_LOWER) c = (c >= 'A' && c <= 'Z') ? c + 32 : c;
        else c = (c >= 'a' && c <= 'z') ? c - 32 : c;
        sb_putc(b, (char)c);
        return;
    }
    if (mode != CASE_LOWER) {
        static const char *const lig[] = {"FF", "FI", "FL", "FFI", "FFL", "ST", "ST"};
        static const char *const lig_t[] = {"Ff", "Fi", "Fl", "Ffi", "Ffl", "St", "St"};
        if (c == 0xDF) {
            sb_puts(b, mode == CASE_UPPER ? "SS" : "Ss");
            return;
        }
        if (c >= 0xFB00 && c <= 0xFB06) {
            sb_puts(b, (mode == CASE_UPPER ? lig : lig_t)[c - 0xFB00]);
            return;
        }
    }
    if (case_special(c) && !(mode != CASE_LOWER && c == 0x130) && !(mode == CASE_UPPER && c == 0x3A3))
        RUNSUP(r, pos, "case mapping of U+%04X is not supported", (unsigned)c);
    int32_t m = mode == CASE_UPPER ? utf8proc_toupper(c) : mode == CASE_LOWER ? utf8proc_tolower(c)
                                                                               : utf8proc_totitle(c);
    sb_put(b, u, u8_put(m, u));
}

/* Whether c is a cased letter (Lu, Ll, Lt), for str.title(). */
static bool cp_cased(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT;
}

enum { SC_UPPER, SC_LOWER, SC_CAPITALIZE, SC_PYTITLE, SC_JTITLE };

/* upper / lower / capitalize / Python str.title / Jinja's title filter. */
static jstr str_case(jrender *r, jstr s, int how, size_t pos) {
    sbuf b;
    sb_init(&b, &r->ar);
    bool prev_cased = false, first = true, word_start = true;
    for (size_t i = 0; i < s.n;) {
        int32_t c = u8_next(s.p, s.n, &i);
        int mode;
        switch (how) {
        case SC_UPPER: mode = CASE_UPPER; break;
        case SC_LOWER: mode = CASE_LOWER; break;
        case SC_CAPITALIZE: mode = first ? CASE_TITLE : CASE_LOWER; break;
        case SC_PYTITLE: mode = prev_cased ? CASE_LOWER : CASE_TITLE; prev_cased = cp_cased(c); break;
        default: { /* Jinja: words split at [-\s({\[<]+; word[0].upper() + word[1:].lower() */
            bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || py_isspace(c);
            mode = sep ? CASE_LOWER : word_start ? CASE_UPPER : CASE_LOWER;
            word_start = sep;
            break;
        }
        }
        first = false;
        put_case(r, &b, c, mode, pos);
    }
    return sb_jstr(&b);
}

/* Python str predicates: isdigit isalpha isalnum isspace islower isupper. */
static bool str_is(jstr s, const char *what) {
    if (!strcmp(what, "islower") || !strcmp(what, "isupper")) {
        bool up = what[2] == 'u', any = false;
        for (size_t i = 0; i < s.n;) {
            int32_t c = u8_next(s.p, s.n, &i);
            if (utf8proc_isupper(c) || utf8proc_category(c) == UTF8PROC_CATEGORY_LT) {
                if (!up) return false;
                any = true;
            } else if (utf8proc_islower(c)) {
                if (up) return false;
                any = true;
            }
        }
        return any;
    }
    if (!s.n) return false;
    for (size_t i = 0; i < s.n;) {
        int32_t c = u8_next(s.p, s.n, &i);
        utf8proc_category_t k = utf8proc_category(c);
        bool alpha = k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO;
        bool digit = k == UTF8PROC_CATEGORY_ND;
        bool numeric = k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO;
        bool ok = !strcmp(what, "isdigit")   ? digit
                  : !strcmp(what, "isalpha") ? alpha
                  : !strcmp(what, "isalnum") ? (alpha || numeric)
                                             : py_isspace(c);
        if (!ok) return false;
    }
    return true;
}

/* Code-point index of byte offset off in s. */
static int64_t cp_index(jstr s, size_t off) { return (int64_t)u8_len(js(s.p, off)); }

/* HTML escaping as markupsafe.escape. */
static jstr html_escape(jrender *r, jstr s) {
    sbuf b;
    sb_init(&b, &r->ar);
    for (size_t i = 0; i < s.n; i++) {
        switch (s.p[i]) {
        case '&': sb_puts(&b, "&amp;"); break;
        case '<': sb_puts(&b, "&lt;"); break;
        case '>': sb_puts(&b, "&gt;"); break;
        case '"': sb_puts(&b, "&#34;"); break;
        case '\'': sb_puts(&b, "&#39;"); break;
        default: sb_putc(&b, s.p[i]);
        }
    }
    return sb_jstr(&b);
}

/* Pads / truncates per printf-style width, precision and '-' flag (counted in code points). */
static void put_padded(sbuf *b, jstr s, int width, int prec, bool left) {
    if (prec >= 0) s.n = u8_offset(s, (size_t)prec);
    size_t len = u8_len(s);
    if (!left)
        for (size_t i = len; (int)i < width; i++) sb_putc(b, ' ');
    sb_putj(b, s);
    if (left)
        for (size_t i = len; (int)i < width; i++) sb_putc(b, ' ');
}

static jv get_item(jrender *r, jv obj, jv key, size_t pos);

/* Python's printf-style formatting: fmt % args (the % operator and the format filter). */
static jstr py_percent(jrender *r, jstr fmt, jv args, size_t pos) {
    const jv *av = &args;
    size_t an = 1, ai = 0;
    /* Python treats any subscriptable non-tuple argument as a mapping: unused is no error */
    bool is_map = args.t == JT_DICT;
    bool lenient = is_map || (args.t == JT_LIST && (args.sub == JL_LIST || args.sub == JL_RANGE));
    if (args.t == JT_LIST && args.sub == JL_TUPLE) {
        av = args.u.l->v;
        an = args.u.l->n;
    }
    sbuf b;
    sb_init(&b, &r->ar);
    for (size_t i = 0; i < fmt.n;) {
        char c = fmt.p[i++];
        if (c != '%') {
            sb_putc(&b, c);
            continue;
        }
        if (i >= fmt.n) RFAIL(r, pos, "incomplete format");
        jv val;
        bool have = false;
        if (fmt.p[i] == '(') {
            size_t st = ++i;
            while (i < fmt.n && fmt.p[i] != ')') i++;
            if (i >= fmt.n) RFAIL(r, pos, "incomplete format key");
            if (!is_map) RFAIL(r, pos, "format requires a mapping");
            val = get_item(r, args, v_str(js(fmt.p + st, i - st)), pos);
            if (val.t == JT_UNDEF) RFAIL(r, pos, "KeyError: '%.*s'", (int)(i - st), fmt.p + st);
            i++;
            have = true;
        }
        char flags[8];
        int nf = 0;
        while (i < fmt.n && strchr("-+ #0", fmt.p[i]) && nf < 6) flags[nf++] = fmt.p[i++];
        flags[nf] = 0;
        int width = -1, prec = -1;
        if (i < fmt.n && fmt.p[i] == '*') RUNSUP(r, pos, "'*' widths in %% formatting are not supported");
        while (i < fmt.n && fmt.p[i] >= '0' && fmt.p[i] <= '9') width = (width < 0 ? 0 : width * 10) + (fmt.p[i++] - '0');
        if (i < fmt.n && fmt.p[i] == '.') {
            i++;
            prec = 0;
            while (i < fmt.n && fmt.p[i] >= '0' && fmt.p[i] <= '9') prec = prec * 10 + (fmt.p[i++] - '0');
        }
        if (width > 10000 || prec > 10000) RUNSUP(r, pos, "format width too large");
        while (i < fmt.n && (fmt.p[i] == 'l' || fmt.p[i] == 'h' || fmt.p[i] == 'L')) i++;
        if (i >= fmt.n) RFAIL(r, pos, "incomplete format");
        char conv = fmt.p[i++];
        if (conv == '%') {
            sb_putc(&b, '%');
            continue;
        }
        if (!have) {
            if (ai >= an) RFAIL(r, pos, "not enough arguments for format string");
            val = av[ai++];
        }
        bool left = strchr(flags, '-') != NULL;
        switch (conv) {
        case 's': case 'r': {
            sbuf t;
            sb_init(&t, &r->ar);
            if (conv == 's') put_str(r, &t, val, pos);
            else put_repr(r, &t, val, pos);
            put_padded(&b, sb_jstr(&t), width, prec, left);
            break;
        }
        case 'd': case 'i': case 'u': case 'x': case 'X': case 'o': {
            if (!is_num(val))
                RFAIL(r, pos, "%%%c format: a real number is required, not %s", conv, tname(val));
            if (val.t == JT_FLOAT && conv != 'd' && conv != 'i' && conv != 'u')
                RFAIL(r, pos, "%%%c format: an integer is required, not float", conv);
            long long x;
            if (val.t == JT_FLOAT) {
                if (!isfinite(val.u.f) || fabs(val.u.f) >= 9.2e18) RUNSUP(r, pos, "%%d of a huge float");
                x = (long long)val.u.f;
            } else {
                x = val.u.i;
            }
            char cc = conv == 'i' || conv == 'u' ? 'd' : conv;
            if (cc != 'd' && x < 0) RUNSUP(r, pos, "%%%c of a negative number is not supported", conv);
            char f2[32];
            int k = snprintf(f2, sizeof f2, "%%%s", flags);
            if (width >= 0) k += snprintf(f2 + k, sizeof f2 - (size_t)k, "%d", width);
            if (prec >= 0) k += snprintf(f2 + k, sizeof f2 - (size_t)k, ".%d", prec);
            snprintf(f2 + k, sizeof f2 - (size_t)k, "ll%c", cc);
            if (cc == 'o' && strchr(flags, '#')) RUNSUP(r, pos, "%%#o is not supported");
            sb_printf(&b, f2, x);
            break;
        }
        case 'f': case 'F': case 'e': case 'E': case 'g': case 'G': {
            if (!is_num(val))
                RFAIL(r, pos, "must be real number, not %s", tname(val));
            double x = num_f(val);
            char f2[32];
            int k = snprintf(f2, sizeof f2, "%%%s", flags);
            if (width >= 0) k += snprintf(f2 + k, sizeof f2 - (size_t)k, "%d", width);
            if (prec >= 0) k += snprintf(f2 + k, sizeof f2 - (size_t)k, ".%d", prec);
            snprintf(f2 + k, sizeof f2 - (size_t)k, "%c", conv);
            if (!isfinite(x) && (conv == 'F' || conv == 'E' || conv == 'G'))
                RUNSUP(r, pos, "upper-case formatting of inf/nan");
            sb_printf(&b, f2, x);
            break;
        }
        default:
            RUNSUP(r, pos, "unsupported format character '%c'", conv);
        }
    }
    if (!lenient && ai < an) RFAIL(r, pos, "not all arguments converted during string formatting");
    return sb_jstr(&b);
}

/* Python's str.format(*args, **kwargs) for plain fields: {} {0} {name} {!r} {!s}, {{ and }}. */
static jstr py_format(jrender *r, jstr fmt, const jargs *a, size_t pos) {
    sbuf b;
    sb_init(&b, &r->ar);
    int auto_idx = 0, mode = 0; /* 1 = automatic numbering, 2 = manual */
    for (size_t i = 0; i < fmt.n;) {
        char c = fmt.p[i];
        if (c == '}') {
            if (i + 1 < fmt.n && fmt.p[i + 1] == '}') {
                sb_putc(&b, '}');
                i += 2;
                continue;
            }
            RFAIL(r, pos, "Single '}' encountered in format string");
        }
        if (c != '{') {
            sb_putc(&b, c);
            i++;
            continue;
        }
        if (i + 1 < fmt.n && fmt.p[i + 1] == '{') {
            sb_putc(&b, '{');
            i += 2;
            continue;
        }
        size_t st = ++i;
        while (i < fmt.n && fmt.p[i] != '}' && fmt.p[i] != '!' && fmt.p[i] != ':' && fmt.p[i] != '{') i++;
        jstr field = js(fmt.p + st, i - st);
        char conv = 0;
        if (i < fmt.n && fmt.p[i] == '!') {
            if (i + 1 >= fmt.n) RFAIL(r, pos, "unmatched '{' in format string");
            conv = fmt.p[i + 1];
            i += 2;
            if (conv != 'r' && conv != 's') RUNSUP(r, pos, "format conversion '!%c' is not supported", conv);
        }
        if (i < fmt.n && fmt.p[i] == ':') {
            if (i + 1 < fmt.n && fmt.p[i + 1] != '}') RUNSUP(r, pos, "format specs in str.format are not supported");
            i++;
        }
        if (i >= fmt.n || fmt.p[i] != '}') RFAIL(r, pos, "expected '}' before end of string");
        i++;
        jv val;
        if (!field.n) {
            if (mode == 2) RFAIL(r, pos, "cannot switch from manual field specification to automatic field numbering");
            mode = 1;
            if ((uint32_t)auto_idx >= a->npos) RFAIL(r, pos, "Replacement index %d out of range for positional args tuple", auto_idx);
            val = a->pos[auto_idx++];
        } else if (field.p[0] >= '0' && field.p[0] <= '9') {
            if (mode == 1) RFAIL(r, pos, "cannot switch from automatic field numbering to manual field specification");
            mode = 2;
            size_t k = 0;
            uint32_t idx = 0;
            for (; k < field.n && field.p[k] >= '0' && field.p[k] <= '9' && idx < 100000; k++) idx = idx * 10 + (uint32_t)(field.p[k] - '0');
            if (k != field.n) RUNSUP(r, pos, "format field '%.*s' is not supported", (int)field.n, field.p);
            if (idx >= a->npos) RFAIL(r, pos, "Replacement index %u out of range for positional args tuple", idx);
            val = a->pos[idx];
        } else {
            for (size_t k = 0; k < field.n; k++)
                if (field.p[k] == '.' || field.p[k] == '[')
                    RUNSUP(r, pos, "format field '%.*s' is not supported", (int)field.n, field.p);
            uint32_t k = 0;
            while (k < a->nkw && !js_eq(a->kwn[k], field)) k++;
            if (k == a->nkw) RFAIL(r, pos, "KeyError: '%.*s'", (int)field.n, field.p);
            val = a->kwv[k];
        }
        if (conv == 'r') put_repr(r, &b, val, pos);
        else put_str(r, &b, val, pos);
    }
    return sb_jstr(&b);
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: attribute and item lookup                                                           */

enum {
    M_STARTSWITH, M_ENDSWITH, M_SPLIT, M_RSPLIT, M_STRIP, M_LSTRIP, M_RSTRIP, M_UPPER, M_LOWER,
    M_REPLACE, M_TITLE, M_CAPITALIZE, M_FIND, M_RFIND, M_INDEX_S, M_RINDEX, M_COUNT_S, M_JOIN,
    M_FORMAT, M_ISDIGIT, M_ISALPHA, M_ISALNUM, M_ISSPACE, M_ISLOWER, M_ISUPPER, M_SPLITLINES,
    M_REMOVEPREFIX, M_REMOVESUFFIX, M_PARTITION, M_RPARTITION,
    M_ITEMS, M_KEYS, M_VALUES, M_GET, M_COPY_D,
    M_COUNT_L, M_INDEX_L, M_COPY_L,
    M_CYCLE, M_CHANGED,
};

typedef struct mname {
    const char *name;
    int id;
} mname;

static const mname k_str_methods[] = {
    {"startswith", M_STARTSWITH}, {"endswith", M_ENDSWITH}, {"split", M_SPLIT},
    {"rsplit", M_RSPLIT}, {"strip", M_STRIP}, {"lstrip", M_LSTRIP}, {"rstrip", M_RSTRIP},
    {"upper", M_UPPER}, {"lower", M_LOWER}, {"replace", M_REPLACE}, {"title", M_TITLE},
    {"capitalize", M_CAPITALIZE}, {"find", M_FIND}, {"rfind", M_RFIND}, {"index", M_INDEX_S},
    {"rindex", M_RINDEX}, {"count", M_COUNT_S}, {"join", M_JOIN}, {"format", M_FORMAT},
    {"isdigit", M_ISDIGIT}, {"isalpha", M_ISALPHA}, {"isalnum", M_ISALNUM},
    {"isspace", M_ISSPACE}, {"islower", M_ISLOWER}, {"isupper", M_ISUPPER},
    {"splitlines", M_SPLITLINES}, {"removeprefix", M_REMOVEPREFIX},
    {"removesuffix", M_REMOVESUFFIX}, {"partition", M_PARTITION}, {"rpartition", M_RPARTITION},
    {NULL, 0},
};
static const char *const k_str_unsupported[] = {
    "casefold", "center", "encode", "expandtabs", "format_map", "isascii", "isdecimal",
    "isidentifier", "isnumeric", "isprintable", "istitle", "ljust", "maketrans", "rjust",
    "swapcase", "translate", "zfill", NULL,
};
static const mname k_dict_methods[] = {
    {"items", M_ITEMS}, {"keys", M_KEYS}, {"values", M_VALUES}, {"get", M_GET}, {"copy", M_COPY_D},
    {NULL, 0},
};
static const char *const k_dict_unsupported[] = {
    "clear", "fromkeys", "pop", "popitem", "setdefault", "update", NULL,
};
static const mname k_list_methods[] = {
    {"count", M_COUNT_L}, {"index", M_INDEX_L}, {"copy", M_COPY_L}, {NULL, 0},
};
static const char *const k_list_unsupported[] = {
    "append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort", NULL,
};
static const char *const k_num_unsupported[] = {
    "real", "imag", "numerator", "denominator", "conjugate", "bit_length", "bit_count",
    "to_bytes", "from_bytes", "as_integer_ratio", "is_integer", "hex", "fromhex", NULL,
};

/* The method id of name in table t, or -1. */
static int mname_find(const mname *t, jstr name) {
    for (; t->name; t++)
        if (js_eqc(name, t->name)) return t->id;
    return -1;
}

/* Whether name is in the NULL-terminated table t. */
static bool name_in(const char *const *t, jstr name) {
    for (; *t; t++)
        if (js_eqc(name, *t)) return true;
    return false;
}

/* A bound method value: self.id(...). */
static jv mk_method(jrender *r, jv self, int id) {
    jmeth *m = ar_alloc(&r->ar, sizeof *m);
    m->self = self;
    jv v = {.t = JT_METHOD, .id = (uint16_t)id};
    v.u.me = m;
    return v;
}

/* Python getattr(obj, name) as the immutable sandbox allows it: true and *out when found,
 * false on AttributeError. Attributes Python has but strata does not implement (and the
 * sandbox's blocked mutators) are errors. */
static bool py_getattr(jrender *r, jv obj, jstr name, jv *out, size_t pos) {
    int id;
    switch (obj.t) {
    case JT_UNDEF: undef_fail(r, obj, pos);
    case JT_STR:
        if ((id = mname_find(k_str_methods, name)) >= 0) {
            *out = mk_method(r, obj, id);
            return true;
        }
        if (name_in(k_str_unsupported, name))
            RUNSUP(r, pos, "unsupported str method '%.*s'", (int)name.n, name.p);
        return false;
    case JT_DICT:
        if ((id = mname_find(k_dict_methods, name)) >= 0) {
            *out = mk_method(r, obj, id);
            return true;
        }
        if (name_in(k_dict_unsupported, name))
            RUNSUP(r, pos, "dict.%.*s is not allowed (immutable sandbox)", (int)name.n, name.p);
        return false;
    case JT_LIST:
        if (obj.sub == JL_LIST || obj.sub == JL_TUPLE || obj.sub == JL_RANGE) {
            if ((id = mname_find(k_list_methods, name)) >= 0 && (obj.sub == JL_LIST || id != M_COPY_L)) {
                *out = mk_method(r, obj, id);
                return true;
            }
            if (obj.sub == JL_LIST && name_in(k_list_unsupported, name))
                RUNSUP(r, pos, "list.%.*s is not allowed (immutable sandbox)", (int)name.n, name.p);
        }
        return false;
    case JT_NS:
        for (size_t i = 0; i < obj.u.ns->n; i++)
            if (js_eq(obj.u.ns->k[i], name)) {
                *out = obj.u.ns->v[i];
                return true;
            }
        return false;
    case JT_LOOP: {
        const jloop *L = obj.u.loop;
        int64_t i = (int64_t)L->i, n = (int64_t)L->n;
        if (js_eqc(name, "index")) *out = v_int(i + 1);
        else if (js_eqc(name, "index0")) *out = v_int(i);
        else if (js_eqc(name, "revindex")) *out = v_int(n - i);
        else if (js_eqc(name, "revindex0")) *out = v_int(n - i - 1);
        else if (js_eqc(name, "first")) *out = v_bool(i == 0);
        else if (js_eqc(name, "last")) *out = v_bool(i == n - 1);
        else if (js_eqc(name, "length")) *out = v_int(n);
        else if (js_eqc(name, "depth")) *out = v_int(1);
        else if (js_eqc(name, "depth0")) *out = v_int(0);
        else if (js_eqc(name, "previtem"))
            *out = i > 0 ? L->items[i - 1] : v_undef_msg(js("there is no previous item", 25));
        else if (js_eqc(name, "nextitem"))
            *out = i + 1 < n ? L->items[i + 1] : v_undef_msg(js("there is no next item", 21));
        else if (js_eqc(name, "cycle")) *out = mk_method(r, obj, M_CYCLE);
        else if (js_eqc(name, "changed")) *out = mk_method(r, obj, M_CHANGED);
        else return false;
        return true;
    }
    case JT_BOOL: case JT_INT: case JT_FLOAT:
        if (name_in(k_num_unsupported, name))
            RUNSUP(r, pos, "unsupported attribute '%.*s' of a number", (int)name.n, name.p);
        return false;
    default:
        return false;
    }
}

/* Python obj[key]: true and *out when found, false on TypeError / LookupError. */
static bool py_getitem(jrender *r, jv obj, jv key, jv *out, size_t pos) {
    switch (obj.t) {
    case JT_UNDEF: undef_fail(r, obj, pos);
    case JT_DICT: {
        if (!hashable(key)) return false;
        ptrdiff_t i = dict_find(obj.u.d, key);
        if (i < 0) return false;
        *out = obj.u.d->v[i];
        return true;
    }
    case JT_LIST: {
        if ((obj.sub != JL_LIST && obj.sub != JL_TUPLE && obj.sub != JL_RANGE) ||
            (key.t != JT_INT && key.t != JT_BOOL))
            return false;
        int64_t n = (int64_t)obj.u.l->n, i = key.u.i;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return false;
        *out = obj.u.l->v[i];
        return true;
    }
    case JT_STR: {
        if (key.t != JT_INT && key.t != JT_BOOL) return false;
        jstr s = obj.u.s;
        int64_t n = is_ascii(s) ? (int64_t)s.n : (int64_t)u8_len(s), i = key.u.i;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return false;
        size_t off = u8_offset(s, (size_t)i), end = off;
        u8_next(s.p, s.n, &end);
        *out = v_str(js(s.p + off, end - off));
        out->sub = obj.sub;
        return true;
    }
    default:
        return false;
    }
}

/* "'dict object'" style name for undefined messages. */
static const char *obj_desc(jv v) { return v.t == JT_NONE ? "None" : tname(v); }

/* Jinja's environment.getattr: obj.name, falling back to obj['name']; Undefined if neither. */
static jv get_attr(jrender *r, jv obj, jstr name, size_t pos) {
    jv out;
    if (py_getattr(r, obj, name, &out, pos)) return out;
    if (py_getitem(r, obj, v_str(name), &out, pos)) return out;
    return v_undef_msg(rfmt(r, "'%s object' has no attribute '%.*s'", obj_desc(obj), (int)name.n, name.p));
}

/* Jinja's environment.getitem: obj[key], falling back to obj.key for string keys. */
static jv get_item(jrender *r, jv obj, jv key, size_t pos) {
    jv out;
    if (py_getitem(r, obj, key, &out, pos)) return out;
    if (key.t == JT_STR) {
        if (py_getattr(r, obj, key.u.s, &out, pos)) return out;
        return v_undef_msg(rfmt(r, "'%s object' has no attribute '%.*s'", obj_desc(obj), (int)key.u.s.n, key.u.s.p));
    }
    sbuf b;
    sb_init(&b, &r->ar);
    put_repr(r, &b, key, pos);
    return v_undef_msg(rfmt(r, "'%s object' has no element %.*s", obj_desc(obj), (int)b.n, b.p));
}

/* Python's slice.indices: normalizes start/stop for a sequence of length n. */
static void slice_indices(int64_t n, int64_t step, bool has_start, int64_t start, bool has_stop,
                          int64_t stop, int64_t *o_start, int64_t *o_stop) {
    int64_t lower = step < 0 ? -1 : 0, upper = step < 0 ? n - 1 : n;
    if (!has_start) start = step < 0 ? upper : lower;
    else if (start < 0) { start += n; if (start < lower) start = lower; }
    else if (start > upper) start = upper;
    if (!has_stop) stop = step < 0 ? lower : upper;
    else if (stop < 0) { stop += n; if (stop < lower) stop = lower; }
    else if (stop > upper) stop = upper;
    *o_start = start;
    *o_stop = stop;
}

static jv eval(jrender *r, const jnode *n);
static jv eval_str_slice(jrender *r, jstr s, int64_t step, const bool *has, const int64_t *val);
static jv eval_list_slice(jrender *r, jv obj, int64_t step, const bool *has, const int64_t *val);

/* obj[a:b:c]. Jinja compiles slices to plain Python subscripts (no environment.getitem), so
 * slicing something that is not a sequence, or with non-integer bounds, is a TypeError. */
static jv eval_slice(jrender *r, jv obj, const jnode *sl, size_t pos) {
    if (obj.t == JT_UNDEF) undef_fail(r, obj, pos);
    jv parts[3];
    bool has[3];
    int64_t val[3] = {0, 0, 1};
    const jnode *nodes[3] = {sl->a, sl->b, sl->c};
    bool ok = true;
    for (int i = 0; i < 3; i++) {
        parts[i] = nodes[i] ? eval(r, nodes[i]) : V_NONE;
        has[i] = parts[i].t != JT_NONE;
        if (has[i]) {
            if (parts[i].t == JT_INT || parts[i].t == JT_BOOL) val[i] = parts[i].u.i;
            else ok = false;
        }
    }
    bool seq = obj.t == JT_STR || (obj.t == JT_LIST && (obj.sub == JL_LIST || obj.sub == JL_TUPLE || obj.sub == JL_RANGE));
    if (obj.t == JT_DICT) RFAIL(r, pos, "unhashable type: 'slice'");
    if (!seq) RFAIL(r, pos, "'%s' object is not subscriptable", tname(obj));
    if (!ok) RFAIL(r, pos, "slice indices must be integers or None or have an __index__ method");
    int64_t step = has[2] ? val[2] : 1;
    if (step == 0) RFAIL(r, pos, "slice step cannot be zero");
    if (step == INT64_MIN) RUNSUP(r, pos, "slice step out of range");
    if (obj.t == JT_STR) {
        jv res = eval_str_slice(r, obj.u.s, step, has, val);
        res.sub = obj.sub;
        return res;
    }
    return eval_list_slice(r, obj, step, has, val);
}

/* Slices a string by code points. */
static jv eval_str_slice(jrender *r, jstr s, int64_t step, const bool *has, const int64_t *val) {
    bool ascii = is_ascii(s);
    int64_t n = ascii ? (int64_t)s.n : (int64_t)u8_len(s), a, b;
    slice_indices(n, step, has[0], val[0], has[1], val[1], &a, &b);
    if (step == 1) {
        if (b <= a) return v_str(js("", 0));
        size_t lo = ascii ? (size_t)a : u8_offset(s, (size_t)a);
        size_t hi = ascii ? (size_t)b : lo + u8_offset(js(s.p + lo, s.n - lo), (size_t)(b - a));
        return v_str(js(s.p + lo, hi - lo));
    }
    size_t *offs = ar_array(&r->ar, (size_t)n + 1, sizeof(size_t));
    for (size_t i = 0, k = 0; k <= (size_t)n; k++) {
        offs[k] = i;
        if (i < s.n) u8_next(s.p, s.n, &i);
    }
    sbuf out;
    sb_init(&out, &r->ar);
    for (int64_t i = a; step > 0 ? i < b : i > b; i += step)
        sb_put(&out, s.p + offs[i], offs[i + 1] - offs[i]);
    return v_str(sb_jstr(&out));
}

/* Slices a list, tuple or range (a range's start/stop/step follow, for its repr). */
static jv eval_list_slice(jrender *r, jv obj, int64_t step, const bool *has, const int64_t *val) {
    const jlist *l = obj.u.l;
    int64_t a, b;
    slice_indices((int64_t)l->n, step, has[0], val[0], has[1], val[1], &a, &b);
    size_t cnt = 0;
    if (step > 0 && b > a) cnt = (size_t)((b - a + step - 1) / step);
    if (step < 0 && a > b) cnt = (size_t)((a - b + (-step) - 1) / (-step));
    jlist *res = list_new(&r->ar, cnt);
    for (size_t k = 0; k < cnt; k++) res->v[k] = l->v[a + (int64_t)k * step];
    if (obj.sub == JL_RANGE) {
        res->r0 = l->r0 + a * l->r2;
        res->r1 = l->r0 + b * l->r2;
        res->r2 = l->r2 * step;
    }
    return v_list(res, obj.sub);
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: arithmetic                                                                          */

/* Python float floor division / modulo (Objects/floatobject.c float_divmod). */
static void float_divmod(double vx, double wx, double *fdiv, double *fmod_) {
    double mod = fmod(vx, wx), div = (vx - mod) / wx, floordiv;
    if (mod) {
        if ((wx < 0) != (mod < 0)) {
            mod += wx;
            div -= 1.0;
        }
    } else {
        mod = copysign(0.0, wx);
    }
    if (div) {
        floordiv = floor(div);
        if (div - floordiv > 0.5) floordiv += 1.0;
    } else {
        floordiv = copysign(0.0, vx / wx);
    }
    *fdiv = floordiv;
    *fmod_ = mod;
}

/* Python arithmetic on two numbers (bool counts as int); int overflow beyond 64 bits
 * is unsupported rather than wrapped. */
static jv num_binop(jrender *r, int op, jv a, jv b, size_t pos) {
    if (a.t != JT_FLOAT && b.t != JT_FLOAT) {
        int64_t x = a.u.i, y = b.u.i, z;
        switch (op) {
        case OP_ADD: if (__builtin_add_overflow(x, y, &z)) goto ovf; return v_int(z);
        case OP_SUB: if (__builtin_sub_overflow(x, y, &z)) goto ovf; return v_int(z);
        case OP_MUL: if (__builtin_mul_overflow(x, y, &z)) goto ovf; return v_int(z);
        case OP_DIV:
            if (!y) RFAIL(r, pos, "division by zero");
            return v_float((double)x / (double)y);
        case OP_FLOORDIV: case OP_MOD: {
            if (!y) RFAIL(r, pos, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) goto ovf;
            int64_t q = x / y, m = x % y;
            if (m && ((m < 0) != (y < 0))) {
                q--;
                m += y;
            }
            return v_int(op == OP_MOD ? m : q);
        }
        case OP_POW: {
            if (y < 0) {
                if (!x) RFAIL(r, pos, "0.0 cannot be raised to a negative power");
                return v_float(pow((double)x, (double)y));
            }
            int64_t res = 1, base = x;
            while (y) {
                if (y & 1 && __builtin_mul_overflow(res, base, &res)) goto ovf;
                y >>= 1;
                if (y && __builtin_mul_overflow(base, base, &base)) goto ovf;
            }
            return v_int(res);
        }
        }
    } else {
        double x = num_f(a), y = num_f(b), q, m;
        switch (op) {
        case OP_ADD: return v_float(x + y);
        case OP_SUB: return v_float(x - y);
        case OP_MUL: return v_float(x * y);
        case OP_DIV:
            if (y == 0) RFAIL(r, pos, "float division by zero");
            return v_float(x / y);
        case OP_FLOORDIV: case OP_MOD:
            if (y == 0) RFAIL(r, pos, "float floor division by zero");
            float_divmod(x, y, &q, &m);
            return v_float(op == OP_MOD ? m : q);
        case OP_POW:
            if (x == 0 && y < 0) RFAIL(r, pos, "0.0 cannot be raised to a negative power");
            if (x < 0 && y != floor(y)) RUNSUP(r, pos, "complex results are not supported");
            q = pow(x, y);
            if (isinf(q) && isfinite(x) && isfinite(y)) RFAIL(r, pos, "(34, 'Numerical result out of range')");
            return v_float(q);
        }
    }
    RFAIL(r, pos, "bad arithmetic operator");
ovf:
    RUNSUP(r, pos, "integer overflow (beyond 64 bits)");
}

/* Repeats the items of l k times (list * int). */
static jv list_repeat(jrender *r, jv l, int64_t k) {
    if (k < 0) k = 0;
    size_t n = l.u.l->n, total;
    if (st_mul_size(n, (size_t)k, &total)) RUNSUP(r, NO_POS, "sequence too large");
    jlist *out = list_new(&r->ar, total);
    for (int64_t i = 0; i < k; i++)
        if (n) memcpy(out->v + (size_t)i * n, l.u.l->v, n * sizeof(jv));
    return v_list(out, l.sub);
}

/* Python's a op b for + - * / // % **. */
static jv binop(jrender *r, int op, jv a, jv b, size_t pos) {
    if (a.t == JT_UNDEF) undef_fail(r, a, pos);
    if (b.t == JT_UNDEF) undef_fail(r, b, pos);
    if (is_num(a) && is_num(b)) return num_binop(r, op, a, b, pos);
    switch (op) {
    case OP_ADD:
        if (a.t == JT_STR && b.t == JT_STR) {
            /* Markup + str and str + Markup (Markup.__radd__ wins) escape the plain side */
            jstr lhs = (b.sub && !a.sub) ? html_escape(r, a.u.s) : a.u.s;
            jstr rhs = (a.sub && !b.sub) ? html_escape(r, b.u.s) : b.u.s;
            char *p = ar_alloc(&r->ar, lhs.n + rhs.n + 1);
            if (lhs.n) memcpy(p, lhs.p, lhs.n);
            if (rhs.n) memcpy(p + lhs.n, rhs.p, rhs.n);
            jv v = v_str(js(p, lhs.n + rhs.n));
            v.sub = a.sub | b.sub;
            return v;
        }
        if (a.t == JT_LIST && b.t == JT_LIST && a.sub == b.sub && (a.sub == JL_LIST || a.sub == JL_TUPLE)) {
            jlist *l = list_new(&r->ar, a.u.l->n + b.u.l->n);
            if (a.u.l->n) memcpy(l->v, a.u.l->v, a.u.l->n * sizeof(jv));
            if (b.u.l->n) memcpy(l->v + a.u.l->n, b.u.l->v, b.u.l->n * sizeof(jv));
            return v_list(l, a.sub);
        }
        break;
    case OP_MUL: {
        jv seq = a, k = b;
        if (is_num(a) && !is_num(b)) seq = b, k = a;
        if (k.t != JT_INT && k.t != JT_BOOL) break;
        if (seq.t == JT_STR) {
            int64_t times = k.u.i < 0 ? 0 : k.u.i;
            size_t total;
            if (st_mul_size(seq.u.s.n, (size_t)times, &total) || total > J_ARENA_LIMIT)
                jthrow(&r->f, ST_ERR_LIMIT, pos, "string too large");
            sbuf o;
            sb_init(&o, &r->ar);
            for (int64_t i = 0; i < times; i++) sb_putj(&o, seq.u.s);
            return v_str(sb_jstr(&o));
        }
        if (seq.t == JT_LIST && (seq.sub == JL_LIST || seq.sub == JL_TUPLE)) return list_repeat(r, seq, k.u.i);
        break;
    }
    case OP_MOD:
        if (a.t == JT_STR && a.sub) RUNSUP(r, pos, "%% formatting of a Markup (safe) string is not supported");
        if (a.t == JT_STR) return v_str(py_percent(r, a.u.s, b, pos));
        break;
    default:
        break;
    }
    RFAIL(r, pos, "unsupported operand type(s) for %s: '%s' and '%s'", op_text(op), tname(a), tname(b));
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: sorting, argument binding                                                           */

typedef struct sortctx {
    jrender *r;
    const jv *keys;
    bool reverse;
    size_t pos;
} sortctx;

/* Compares the keys of items a and b (negated when reversing). */
static int sort_cmp(const sortctx *c, size_t a, size_t b) {
    int k = py_cmp(c->r, c->keys[a], c->keys[b], c->pos, "<");
    if (k == 3) k = 0;
    return c->reverse ? -k : k;
}

/* Stable merge sort of idx[0, n) by keys[idx[i]] (Python's sorted(), reverse keeps stability). */
static void msort(const sortctx *c, size_t *idx, size_t *tmp, size_t n) {
    if (n < 2) return;
    size_t h = n / 2;
    msort(c, idx, tmp, h);
    msort(c, idx + h, tmp, n - h);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = sort_cmp(c, idx[j], idx[i]) < 0 ? idx[j++] : idx[i++];
    while (i < h) tmp[k++] = idx[i++];
    while (j < n) tmp[k++] = idx[j++];
    memcpy(idx, tmp, n * sizeof(size_t));
}

/* Sorts idx by keys[idx[i]], stable; reverse as Python's sorted(reverse=True). */
static void sort_by(jrender *r, const jv *keys, size_t *idx, size_t n, bool reverse, size_t pos) {
    sortctx c = {r, keys, reverse, pos};
    size_t *tmp = ar_array(&r->ar, n, sizeof(size_t));
    msort(&c, idx, tmp, n);
}

/* Ascending stable sort of idx by keys (json.dumps sort_keys). */
static void sort_indices(jrender *r, const jv *keys, size_t *idx, size_t n, size_t pos) {
    sort_by(r, keys, idx, n, false, pos);
}

/* Binds positional then keyword arguments to parameter names; unbound ones are absent. */
static void bind_args(jrender *r, const jargs *a, const char *const *names, int n, jv *out,
                      size_t pos, const char *fname) {
    for (int i = 0; i < n; i++) out[i] = (jv){.t = JT_UNDEF, .sub = JU_ABSENT};
    if (a->npos > (uint32_t)n)
        RFAIL(r, pos, "%s() takes at most %d argument(s) (%u given)", fname, n, a->npos);
    for (uint32_t i = 0; i < a->npos; i++) out[i] = a->pos[i];
    for (uint32_t k = 0; k < a->nkw; k++) {
        int i = 0;
        while (i < n && !js_eqc(a->kwn[k], names[i])) i++;
        if (i == n)
            RFAIL(r, pos, "%s() got an unexpected keyword argument '%.*s'", fname, (int)a->kwn[k].n, a->kwn[k].p);
        if (!is_absent(out[i])) RFAIL(r, pos, "%s() got multiple values for argument '%s'", fname, names[i]);
        out[i] = a->kwv[k];
    }
}

static bool arg_bool(jv v, bool dflt) { return is_absent(v) ? dflt : truthy(v); }

/* An optional int argument (absent or None: dflt); other types raise. */
static int64_t arg_int(jrender *r, jv v, int64_t dflt, size_t pos, const char *what) {
    if (is_absent(v) || v.t == JT_NONE) return dflt;
    if (v.t != JT_INT && v.t != JT_BOOL) RFAIL(r, pos, "%s must be an integer, not %s", what, tname(v));
    return v.u.i;
}

/* An optional str argument (absent: dflt); other types raise. */
static jstr arg_str(jrender *r, jv v, const char *dflt, size_t pos, const char *what) {
    if (is_absent(v)) return js(dflt, strlen(dflt));
    if (v.t != JT_STR) RFAIL(r, pos, "%s must be a string, not %s", what, tname(v));
    return v.u.s;
}

/* jinja's make_attrgetter: "a.b.0" looks up item a, then b, then 0. */
typedef struct attrget {
    jv parts[16];
    int n;
    jv dflt; /* JT_UNDEF/absent: none */
} attrget;

/* Splits an attribute spec ("a.b.0" or an int) into the item lookups to apply. */
static void attr_prepare(jrender *r, jv attribute, attrget *g, size_t pos) {
    g->n = 0;
    g->dflt = (jv){.t = JT_UNDEF, .sub = JU_ABSENT};
    if (is_absent(attribute) || attribute.t == JT_NONE) return;
    if (attribute.t != JT_STR) {
        g->parts[g->n++] = attribute;
        return;
    }
    jstr s = attribute.u.s;
    size_t st = 0;
    for (size_t i = 0; i <= s.n; i++) {
        if (i < s.n && s.p[i] != '.') continue;
        if (g->n == 16) RUNSUP(r, pos, "attribute path too long");
        jstr part = js(s.p + st, i - st);
        bool digits = part.n > 0;
        int64_t v = 0;
        for (size_t k = 0; k < part.n; k++) {
            if (part.p[k] < '0' || part.p[k] > '9' || v > 100000000000000LL) digits = false;
            else v = v * 10 + (part.p[k] - '0');
        }
        g->parts[g->n++] = digits ? v_int(v) : v_str(part);
        st = i + 1;
    }
}

/* Applies the lookups to item (each environment.getitem); the default replaces an
 * Undefined result. */
static jv attr_apply(jrender *r, const attrget *g, jv item, size_t pos) {
    for (int i = 0; i < g->n; i++) {
        item = get_item(r, item, g->parts[i], pos);
        if (!is_absent(g->dflt) && g->dflt.t != JT_NONE && item.t == JT_UNDEF) item = g->dflt;
    }
    return item;
}

/* jinja's ignore_case: lower-cases strings for case-insensitive comparisons. */
static jv ignore_case(jrender *r, jv v, size_t pos) {
    if (v.t != JT_STR) return v;
    return v_str(str_case(r, v.u.s, SC_LOWER, pos));
}

/* Python int(str, base): false if s is not an integer literal (or does not fit 64 bits). */
static bool parse_py_int(jstr s, int base, int64_t *out) {
    size_t i = 0, n = s.n;
    while (i < n && ws_at(s.p, n, i)) i += ws_at(s.p, n, i);
    n = rstrip_ws(s.p, i, n);
    bool neg = false;
    if (i < n && (s.p[i] == '+' || s.p[i] == '-')) neg = s.p[i++] == '-';
    if (n - i >= 2 && s.p[i] == '0') {
        char c = (char)(s.p[i + 1] | 32);
        int pb = c == 'x' ? 16 : c == 'o' ? 8 : c == 'b' ? 2 : 0;
        if (pb && (base == pb || base == 0)) {
            base = pb;
            i += 2;
            if (i < n && s.p[i] == '_') i++;
        }
    }
    if (base == 0) base = 10;
    if (i >= n) return false;
    uint64_t v = 0;
    bool prev_digit = false;
    for (; i < n; i++) {
        if (s.p[i] == '_') {
            if (!prev_digit || i + 1 >= n) return false;
            prev_digit = false;
            continue;
        }
        int d = digit_value(s.p[i]);
        if (d >= base) return false;
        if (v > (UINT64_C(0x8000000000000000) - (uint64_t)d) / (uint64_t)base) return false;
        v = v * (uint64_t)base + (uint64_t)d;
        prev_digit = true;
    }
    if (!prev_digit) return false;
    if (!neg && v > INT64_MAX) return false;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return true;
}

/* Python float(str): false if s is not a float literal. */
static bool parse_py_float(jrender *r, jstr s, double *out) {
    size_t i = 0, n = s.n;
    while (i < n && ws_at(s.p, n, i)) i += ws_at(s.p, n, i);
    n = rstrip_ws(s.p, i, n);
    if (i >= n || n - i > 400) return false;
    char *buf = ar_alloc(&r->ar, n - i + 1);
    size_t m = 0, j = i;
    if (s.p[j] == '+' || s.p[j] == '-') buf[m++] = s.p[j++];
    jstr rest = js(s.p + j, n - j);
    const char *words[] = {"inf", "infinity", "nan"};
    for (int w = 0; w < 3; w++)
        if (rest.n == strlen(words[w]) && !strncasecmp(rest.p, words[w], rest.n)) {
            double v = w == 2 ? NAN : INFINITY;
            *out = buf[0] == '-' ? -v : v;
            return true;
        }
    bool digits = false, in_exp = false, prev_digit = false, dot = false, exp_digits = false;
    for (; j < n; j++) {
        char c = s.p[j];
        if (c >= '0' && c <= '9') {
            digits = prev_digit = true;
            exp_digits |= in_exp;
            buf[m++] = c;
        } else if (c == '_' && prev_digit && j + 1 < n && s.p[j + 1] >= '0' && s.p[j + 1] <= '9') {
            prev_digit = false;
        } else if (c == '.' && !dot && !in_exp) {
            dot = true;
            prev_digit = false;
            buf[m++] = c;
        } else if ((c == 'e' || c == 'E') && digits && !in_exp) {
            in_exp = true;
            prev_digit = false;
            buf[m++] = c;
            if (j + 1 < n && (s.p[j + 1] == '+' || s.p[j + 1] == '-')) buf[m++] = s.p[++j];
            if (j + 1 >= n) return false;
        } else {
            return false;
        }
    }
    if (!digits || (in_exp && !exp_digits)) return false;
    buf[m] = 0;
    *out = strtod(buf, NULL);
    return true;
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: tests                                                                               */

static bool call_test(jrender *r, int id, jv v, const jargs *a, size_t pos) {
    static const char *const one[] = {"other"};
    jv p[1] = {{.t = JT_UNDEF, .sub = JU_ABSENT}};
    bool takes_arg = (id >= TS_EQ && id <= TS_SAMEAS) || id == TS_DIVISIBLEBY;
    if (takes_arg) {
        bind_args(r, a, one, 1, p, pos, "test");
        if (is_absent(p[0])) RFAIL(r, pos, "test is missing its argument");
    } else if (a->npos || a->nkw) {
        RFAIL(r, pos, "test takes no arguments");
    }
    switch (id) {
    case TS_DEFINED: return v.t != JT_UNDEF;
    case TS_UNDEFINED: return v.t == JT_UNDEF;
    case TS_NONE: return v.t == JT_NONE;
    case TS_STRING: return v.t == JT_STR;
    case TS_MAPPING: return v.t == JT_DICT;
    case TS_ITERABLE: return v.t == JT_STR || v.t == JT_LIST || v.t == JT_DICT || v.t == JT_UNDEF;
    case TS_SEQUENCE:
        return v.t == JT_STR || v.t == JT_DICT || v.t == JT_UNDEF ||
               (v.t == JT_LIST && (v.sub == JL_LIST || v.sub == JL_TUPLE || v.sub == JL_RANGE));
    case TS_NUMBER: return is_num(v);
    case TS_INTEGER: return v.t == JT_INT;
    case TS_FLOAT: return v.t == JT_FLOAT;
    case TS_BOOLEAN: return v.t == JT_BOOL;
    case TS_TRUE: return v.t == JT_BOOL && v.u.i;
    case TS_FALSE: return v.t == JT_BOOL && !v.u.i;
    case TS_EQ: return py_eq(v, p[0]);
    case TS_NE: return !py_eq(v, p[0]);
    case TS_LT: return py_cmp(r, v, p[0], pos, "<") == -1;
    case TS_LE: { int c = py_cmp(r, v, p[0], pos, "<="); return c == -1 || c == 0; }
    case TS_GT: return py_cmp(r, v, p[0], pos, ">") == 1;
    case TS_GE: { int c = py_cmp(r, v, p[0], pos, ">="); return c == 1 || c == 0; }
    case TS_IN: return py_contains(r, p[0], v, pos);
    case TS_SAMEAS:
        if ((v.t == JT_NONE || v.t == JT_BOOL || v.t == JT_UNDEF) || (p[0].t == JT_NONE || p[0].t == JT_BOOL))
            return v.t == p[0].t && (v.t != JT_BOOL || v.u.i == p[0].u.i) && v.t != JT_UNDEF;
        RUNSUP(r, pos, "'sameas' is only supported for none, true and false");
    case TS_ODD: case TS_EVEN: {
        jv m = binop(r, OP_MOD, v, v_int(2), pos);
        return py_eq(m, v_int(id == TS_ODD ? 1 : 0));
    }
    case TS_DIVISIBLEBY: return py_eq(binop(r, OP_MOD, v, p[0], pos), v_int(0));
    case TS_LOWER: return str_is(str_of(r, v, pos), "islower");
    case TS_UPPER: return str_is(str_of(r, v, pos), "isupper");
    case TS_CALLABLE: return v.t == JT_MACRO || v.t == JT_FUNC || v.t == JT_METHOD;
    case TS_ESCAPED: return v.t == JT_STR && v.sub;
    }
    RFAIL(r, pos, "bad test");
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: filters                                                                             */

static jv call_filter(jrender *r, int id, jv v, const jargs *a, size_t pos);

static jv gen_of(jrender *r, vvec *items) { return vv_list(r, items, JL_GEN); }

/* select / reject / selectattr / rejectattr. */
static jv filter_select(jrender *r, jv v, const jargs *a, bool attr, bool keep_if, size_t pos) {
    vvec out = {0};
    if (!truthy(v)) return gen_of(r, &out);
    uint32_t off = 0;
    attrget g = {.n = 0};
    if (attr) {
        if (!a->npos) RFAIL(r, pos, "missing parameter for attribute name");
        attr_prepare(r, a->pos[0], &g, pos);
        off = 1;
    }
    int tid = -1;
    jargs rest = {a->pos + off, 0, a->kwn, a->kwv, a->nkw};
    if (a->npos > off) {
        if (a->pos[off].t != JT_STR) RFAIL(r, pos, "test name must be a string");
        tid = test_lookup(a->pos[off].u.s);
        if (tid < 0)
            RUNSUP(r, pos, "unsupported test '%.*s'", (int)a->pos[off].u.s.n, a->pos[off].u.s.p);
        rest.pos = a->pos + off + 1;
        rest.npos = a->npos - off - 1;
    }
    size_t n;
    jv *items = iter_items(r, v, &n, pos);
    for (size_t i = 0; i < n; i++) {
        jv x = attr ? attr_apply(r, &g, items[i], pos) : items[i];
        bool t = tid < 0 ? truthy(x) : call_test(r, tid, x, &rest, pos);
        if (t == keep_if) vv_push(&r->ar, &out, items[i]);
    }
    return gen_of(r, &out);
}

/* map(attribute=..., default=...) or map('filter', args...). */
static jv filter_map(jrender *r, jv v, const jargs *a, size_t pos) {
    vvec out = {0};
    if (!truthy(v)) return gen_of(r, &out);
    size_t n;
    if (!a->npos) {
        attrget g;
        jv attribute = {.t = JT_UNDEF, .sub = JU_ABSENT}, dflt = attribute;
        for (uint32_t k = 0; k < a->nkw; k++) {
            if (js_eqc(a->kwn[k], "attribute")) attribute = a->kwv[k];
            else if (js_eqc(a->kwn[k], "default")) dflt = a->kwv[k];
            else RFAIL(r, pos, "unexpected keyword argument '%.*s'", (int)a->kwn[k].n, a->kwn[k].p);
        }
        if (is_absent(attribute)) RFAIL(r, pos, "map requires a filter argument");
        attr_prepare(r, attribute, &g, pos);
        g.dflt = dflt;
        jv *items = iter_items(r, v, &n, pos);
        for (size_t i = 0; i < n; i++) vv_push(&r->ar, &out, attr_apply(r, &g, items[i], pos));
        return gen_of(r, &out);
    }
    if (a->pos[0].t != JT_STR) RFAIL(r, pos, "map: filter name must be a string");
    int fid = filter_lookup(a->pos[0].u.s);
    if (fid < 0) RUNSUP(r, pos, "unsupported filter '%.*s'", (int)a->pos[0].u.s.n, a->pos[0].u.s.p);
    jargs rest = {a->pos + 1, a->npos - 1, a->kwn, a->kwv, a->nkw};
    jv *items = iter_items(r, v, &n, pos);
    for (size_t i = 0; i < n; i++) vv_push(&r->ar, &out, call_filter(r, fid, items[i], &rest, pos));
    return gen_of(r, &out);
}

/* Keys for sort / unique / min / max: the (possibly multi-)attribute, case-folded. */
static jv sort_key(jrender *r, jv item, const attrget *gs, int ng, bool case_sensitive, size_t pos) {
    if (ng <= 1) {
        jv k = ng ? attr_apply(r, &gs[0], item, pos) : item;
        return case_sensitive ? k : ignore_case(r, k, pos);
    }
    jlist *l = list_new(&r->ar, (size_t)ng);
    for (int i = 0; i < ng; i++) {
        jv k = attr_apply(r, &gs[i], item, pos);
        l->v[i] = case_sensitive ? k : ignore_case(r, k, pos);
    }
    return v_list(l, JL_LIST);
}

/* min / max. */
static jv filter_minmax(jrender *r, jv v, const jargs *a, bool want_max, size_t pos) {
    static const char *const names[] = {"case_sensitive", "attribute"};
    jv p[2];
    bind_args(r, a, names, 2, p, pos, want_max ? "max" : "min");
    attrget g;
    attr_prepare(r, p[1], &g, pos);
    size_t n;
    jv *items = iter_items(r, v, &n, pos);
    if (!n) return v_undef_msg(js("No aggregated item, sequence was empty.", 39));
    bool cs = arg_bool(p[0], false);
    size_t best = 0;
    jv bk = sort_key(r, items[0], &g, g.n ? 1 : 0, cs, pos);
    for (size_t i = 1; i < n; i++) {
        jv k = sort_key(r, items[i], &g, g.n ? 1 : 0, cs, pos);
        int c = py_cmp(r, k, bk, pos, want_max ? ">" : "<");
        if (c == (want_max ? 1 : -1)) {
            best = i;
            bk = k;
        }
    }
    return items[best];
}

/* sort(reverse=False, case_sensitive=False, attribute=None): a new list. */
static jv filter_sort(jrender *r, jv v, const jargs *a, size_t pos) {
    static const char *const names[] = {"reverse", "case_sensitive", "attribute"};
    jv p[3];
    bind_args(r, a, names, 3, p, pos, "sort");
    attrget gs[8];
    int ng = 0;
    if (!is_absent(p[2]) && p[2].t == JT_STR && memchr(p[2].u.s.p, ',', p[2].u.s.n)) {
        jstr s = p[2].u.s;
        size_t st = 0;
        for (size_t i = 0; i <= s.n; i++) {
            if (i < s.n && s.p[i] != ',') continue;
            if (ng == 8) RUNSUP(r, pos, "too many sort attributes");
            attr_prepare(r, v_str(js(s.p + st, i - st)), &gs[ng++], pos);
            st = i + 1;
        }
    } else if (!is_absent(p[2]) && p[2].t != JT_NONE) {
        attr_prepare(r, p[2], &gs[ng++], pos);
    }
    size_t n;
    jv *items = iter_items(r, v, &n, pos);
    jv *keys = ar_array(&r->ar, n, sizeof(jv));
    size_t *idx = ar_array(&r->ar, n, sizeof(size_t));
    bool cs = arg_bool(p[1], false);
    for (size_t i = 0; i < n; i++) {
        keys[i] = sort_key(r, items[i], gs, ng, cs, pos);
        idx[i] = i;
    }
    sort_by(r, keys, idx, n, arg_bool(p[0], false), pos);
    jlist *l = list_new(&r->ar, n);
    for (size_t i = 0; i < n; i++) l->v[i] = items[idx[i]];
    return v_list(l, JL_LIST);
}

/* transformers' tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False),
 * i.e. json.dumps with those arguments. */
static jv filter_tojson(jrender *r, jv v, const jargs *a, size_t pos) {
    static const char *const names[] = {"ensure_ascii", "indent", "separators", "sort_keys"};
    jv p[4];
    bind_args(r, a, names, 4, p, pos, "tojson");
    jdump o = {0};
    o.ascii = arg_bool(p[0], false);
    o.sort_keys = arg_bool(p[3], false);
    if (!is_absent(p[1]) && p[1].t != JT_NONE) {
        o.has_indent = true;
        if (p[1].t == JT_STR) {
            o.indent = p[1].u.s;
        } else if (p[1].t == JT_INT || p[1].t == JT_BOOL) {
            int64_t k = p[1].u.i < 0 ? 0 : p[1].u.i;
            if (k > 1000) RUNSUP(r, pos, "tojson indent too large");
            char *sp = ar_alloc(&r->ar, (size_t)k + 1);
            memset(sp, ' ', (size_t)k);
            o.indent = js(sp, (size_t)k);
        } else {
            RFAIL(r, pos, "tojson: indent must be an int or str, not %s", tname(p[1]));
        }
    }
    o.item_sep = o.has_indent ? js(",", 1) : js(", ", 2);
    o.key_sep = js(": ", 2);
    if (!is_absent(p[2]) && p[2].t != JT_NONE) {
        jv s = p[2];
        if (s.t != JT_LIST || (s.sub != JL_LIST && s.sub != JL_TUPLE) || s.u.l->n != 2 ||
            s.u.l->v[0].t != JT_STR || s.u.l->v[1].t != JT_STR)
            RFAIL(r, pos, "tojson: separators must be a pair of strings");
        o.item_sep = s.u.l->v[0].u.s;
        o.key_sep = s.u.l->v[1].u.s;
    }
    sbuf b;
    sb_init(&b, &r->ar);
    json_dump(r, &b, v, &o, 0, pos);
    return v_str(sb_jstr(&b));
}

/* indent(width=4, first=False, blank=False): s must be a str (Jinja appends "\n"). */
static jv filter_indent(jrender *r, jv v, const jargs *a, size_t pos) {
    static const char *const names[] = {"width", "first", "blank"};
    jv p[3];
    bind_args(r, a, names, 3, p, pos, "indent");
    jstr ind;
    if (p[0].t == JT_STR) {
        ind = p[0].u.s;
    } else {
        int64_t w = arg_int(r, p[0], 4, pos, "width");
        if (w < 0) w = 0;
        if (w > 1000) RUNSUP(r, pos, "indent width too large");
        char *sp = ar_alloc(&r->ar, (size_t)w + 1);
        memset(sp, ' ', (size_t)w);
        ind = js(sp, (size_t)w);
    }
    bool first = arg_bool(p[1], false), blank = arg_bool(p[2], false);
    if (v.t == JT_UNDEF) undef_fail(r, v, pos); /* s += "\n" raises unless s is a str */
    if (v.t != JT_STR) RFAIL(r, pos, "unsupported operand type(s) for +=: '%s' and 'str'", tname(v));
    jstr s = v.u.s;
    /* s + "\n", split into lines (Python splitlines on the extended set of breaks) */
    vvec lines = {0};
    size_t i = 0, st = 0;
    while (i < s.n) {
        size_t k = i;
        int32_t c = u8_next(s.p, s.n, &i);
        if (!py_islinebreak(c)) continue;
        vv_push(&r->ar, &lines, v_str(js(s.p + st, k - st)));
        if (c == '\r' && i < s.n && s.p[i] == '\n') i++;
        st = i;
    }
    vv_push(&r->ar, &lines, v_str(js(s.p + st, s.n - st))); /* the line the added "\n" ends */
    sbuf b;
    sb_init(&b, &r->ar);
    if (first) sb_putj(&b, ind);
    for (size_t k = 0; k < lines.n; k++) {
        jstr line = lines.v[k].u.s;
        if (k) {
            sb_putc(&b, '\n');
            if (blank || line.n) sb_putj(&b, ind);
        }
        sb_putj(&b, line);
    }
    jv out = v_str(sb_jstr(&b));
    out.sub = v.t == JT_STR ? v.sub : 0;
    return out;
}

/* Filters that call a str method on soft_str(v) return Markup for Markup input. */
static jv keep_markup(jv in, jv out) {
    out.sub = in.t == JT_STR ? in.sub : 0;
    return out;
}

/* Reads filter parameters, one filter per case. Jinja's signatures (non-autoescape). */
static jv filter_run(jrender *r, int id, jv v, const jargs *a, size_t pos) {
    jv p[4];
    size_t n;
    switch (id) {
    case FL_ABS:
        bind_args(r, a, NULL, 0, p, pos, "abs");
        if (v.t == JT_FLOAT) return v_float(fabs(v.u.f));
        if (v.t == JT_INT || v.t == JT_BOOL) {
            if (v.u.i == INT64_MIN) RUNSUP(r, pos, "integer overflow (beyond 64 bits)");
            return v_int(v.u.i < 0 ? -v.u.i : v.u.i);
        }
        if (v.t == JT_UNDEF) undef_fail(r, v, pos);
        RFAIL(r, pos, "bad operand type for abs(): '%s'", tname(v));
    case FL_ATTR: {
        static const char *const names[] = {"name"};
        bind_args(r, a, names, 1, p, pos, "attr");
        jstr name = str_of(r, p[0], pos);
        jv out;
        if (v.t == JT_UNDEF) undef_fail(r, v, pos);
        if (py_getattr(r, v, name, &out, pos)) return out;
        return v_undef_msg(rfmt(r, "'%s object' has no attribute '%.*s'", obj_desc(v), (int)name.n, name.p));
    }
    case FL_CAPITALIZE:
        bind_args(r, a, NULL, 0, p, pos, "capitalize");
        return keep_markup(v, v_str(str_case(r, str_of(r, v, pos), SC_CAPITALIZE, pos)));
    case FL_DEFAULT: {
        static const char *const names[] = {"default_value", "boolean"};
        bind_args(r, a, names, 2, p, pos, "default");
        bool use = v.t == JT_UNDEF || (arg_bool(p[1], false) && !truthy(v));
        if (!use) return v;
        return is_absent(p[0]) ? v_str(js("", 0)) : p[0];
    }
    case FL_DICTSORT: {
        static const char *const names[] = {"case_sensitive", "by", "reverse"};
        bind_args(r, a, names, 3, p, pos, "dictsort");
        if (v.t != JT_DICT) RFAIL(r, pos, "dictsort: value must be a mapping, not %s", tname(v));
        jstr by = arg_str(r, p[1], "key", pos, "by");
        int col = js_eqc(by, "key") ? 0 : js_eqc(by, "value") ? 1 : -1;
        if (col < 0) RFAIL(r, pos, "You can only sort by either 'key' or 'value'");
        const jdict *d = v.u.d;
        jv *keys = ar_array(&r->ar, d->n, sizeof(jv));
        size_t *idx = ar_array(&r->ar, d->n, sizeof(size_t));
        bool cs = arg_bool(p[0], false);
        for (size_t i = 0; i < d->n; i++) {
            jv k = col ? d->v[i] : d->k[i];
            keys[i] = cs ? k : ignore_case(r, k, pos);
            idx[i] = i;
        }
        sort_by(r, keys, idx, d->n, arg_bool(p[2], false), pos);
        jlist *l = list_new(&r->ar, d->n);
        for (size_t i = 0; i < d->n; i++) {
            jlist *t = list_new(&r->ar, 2);
            t->v[0] = d->k[idx[i]];
            t->v[1] = d->v[idx[i]];
            l->v[i] = v_list(t, JL_TUPLE);
        }
        return v_list(l, JL_LIST);
    }
    case FL_ESCAPE: {
        bind_args(r, a, NULL, 0, p, pos, "escape");
        if (v.t == JT_STR && v.sub) return v;
        jv out = v_str(html_escape(r, str_of(r, v, pos)));
        out.sub = 1;
        return out;
    }
    case FL_FIRST:
        bind_args(r, a, NULL, 0, p, pos, "first");
        if (v.t == JT_LIST && (v.sub == JL_GEN || v.sub == JL_REVITER)) {
            jlist *l = v.u.l;
            gen_force(r, l);
            if (l->pos < l->n) return l->v[l->pos++];
        } else if (v.t == JT_STR) {
            jv out;
            if (py_getitem(r, v, v_int(0), &out, pos)) return out;
        } else {
            jv *items = iter_items(r, v, &n, pos);
            if (n) return items[0];
        }
        return v_undef_msg(js("No first item, sequence was empty.", 34));
    case FL_LAST:
        bind_args(r, a, NULL, 0, p, pos, "last");
        if (v.t == JT_LIST && (v.sub == JL_GEN || v.sub == JL_REVITER))
            RFAIL(r, pos, "'%s' object is not reversible", tname(v));
        if (v.t == JT_STR) {
            jv out;
            if (py_getitem(r, v, v_int(-1), &out, pos)) return out;
        } else {
            jv *items = iter_items(r, v, &n, pos);
            if (n) return items[n - 1];
        }
        return v_undef_msg(js("No last item, sequence was empty.", 33));
    case FL_FLOAT: {
        static const char *const names[] = {"default"};
        bind_args(r, a, names, 1, p, pos, "float");
        double f;
        if (v.t == JT_UNDEF) undef_fail(r, v, pos); /* float(Undefined) raises */
        if (is_num(v)) return v_float(num_f(v));
        if (v.t == JT_STR && parse_py_float(r, v.u.s, &f)) return v_float(f);
        return is_absent(p[0]) ? v_float(0.0) : p[0];
    }
    case FL_INT: {
        static const char *const names[] = {"default", "base"};
        bind_args(r, a, names, 2, p, pos, "int");
        jv dflt = is_absent(p[0]) ? v_int(0) : p[0];
        int64_t base = arg_int(r, p[1], 10, pos, "base"), iv;
        double f;
        if (v.t == JT_UNDEF) undef_fail(r, v, pos); /* int(Undefined) raises */
        if (v.t == JT_STR) {
            if (base != 0 && (base < 2 || base > 36)) RFAIL(r, pos, "int() base must be >= 2 and <= 36, or 0");
            if (parse_py_int(v.u.s, (int)base, &iv)) return v_int(iv);
            if (!parse_py_float(r, v.u.s, &f)) return dflt;
        } else if (v.t == JT_INT || v.t == JT_BOOL) {
            return v_int(v.u.i);
        } else if (v.t == JT_FLOAT) {
            f = v.u.f;
        } else {
            return dflt;
        }
        if (isnan(f)) return dflt;
        if (isinf(f)) RFAIL(r, pos, "cannot convert float infinity to integer");
        if (fabs(f) >= 9.2e18) RUNSUP(r, pos, "integer overflow (beyond 64 bits)");
        return v_int((int64_t)f);
    }
    case FL_FORMAT: {
        jstr fmt = str_of(r, v, pos);
        if (a->npos && a->nkw) RFAIL(r, pos, "can't handle positional and keyword arguments at the same time");
        if (a->nkw) {
            jdict *d = dict_new(&r->ar, a->nkw);
            for (uint32_t k = 0; k < a->nkw; k++) dict_push(&r->ar, d, v_str(a->kwn[k]), a->kwv[k]);
            return v_str(py_percent(r, fmt, v_dict(d), pos));
        }
        jlist *t = list_new(&r->ar, a->npos);
        if (a->npos) memcpy(t->v, a->pos, a->npos * sizeof(jv));
        return v_str(py_percent(r, fmt, v_list(t, JL_TUPLE), pos));
    }
    case FL_INDENT: return filter_indent(r, v, a, pos);
    case FL_ITEMS: {
        bind_args(r, a, NULL, 0, p, pos, "items");
        vvec out = {0};
        if (v.t == JT_UNDEF) return gen_of(r, &out);
        if (v.t != JT_DICT) RFAIL(r, pos, "Can only get item pairs from a mapping.");
        for (size_t i = 0; i < v.u.d->n; i++) {
            jlist *t = list_new(&r->ar, 2);
            t->v[0] = v.u.d->k[i];
            t->v[1] = v.u.d->v[i];
            vv_push(&r->ar, &out, v_list(t, JL_TUPLE));
        }
        return gen_of(r, &out);
    }
    case FL_JOIN: {
        static const char *const names[] = {"d", "attribute"};
        bind_args(r, a, names, 2, p, pos, "join");
        jstr sep = is_absent(p[0]) ? js("", 0) : str_of(r, p[0], pos);
        attrget g;
        attr_prepare(r, p[1], &g, pos);
        jv *items = iter_items(r, v, &n, pos);
        sbuf b;
        sb_init(&b, &r->ar);
        for (size_t i = 0; i < n; i++) {
            if (i) sb_putj(&b, sep);
            put_str(r, &b, g.n ? attr_apply(r, &g, items[i], pos) : items[i], pos);
        }
        return v_str(sb_jstr(&b));
    }
    case FL_LENGTH:
        bind_args(r, a, NULL, 0, p, pos, "length");
        return v_int(py_len(r, v, pos));
    case FL_LIST:
        bind_args(r, a, NULL, 0, p, pos, "list");
        return to_list(r, v, pos);
    case FL_LOWER: case FL_UPPER:
        bind_args(r, a, NULL, 0, p, pos, id == FL_LOWER ? "lower" : "upper");
        return keep_markup(v, v_str(str_case(r, str_of(r, v, pos), id == FL_LOWER ? SC_LOWER : SC_UPPER, pos)));
    case FL_MAP: return filter_map(r, v, a, pos);
    case FL_MAX: case FL_MIN: return filter_minmax(r, v, a, id == FL_MAX, pos);
    case FL_SELECT: return filter_select(r, v, a, false, true, pos);
    case FL_REJECT: return filter_select(r, v, a, false, false, pos);
    case FL_SELECTATTR: return filter_select(r, v, a, true, true, pos);
    case FL_REJECTATTR: return filter_select(r, v, a, true, false, pos);
    case FL_REPLACE: {
        static const char *const names[] = {"old", "new", "count"};
        bind_args(r, a, names, 3, p, pos, "replace");
        if (is_absent(p[0]) || is_absent(p[1])) RFAIL(r, pos, "replace() missing required arguments");
        int64_t count = arg_int(r, p[2], -1, pos, "count");
        return v_str(str_replace(r, str_of(r, v, pos), str_of(r, p[0], pos), str_of(r, p[1], pos), count));
    }
    case FL_REVERSE: {
        bind_args(r, a, NULL, 0, p, pos, "reverse");
        if (v.t == JT_STR) {
            sbuf b;
            sb_init(&b, &r->ar);
            for (size_t hi = v.u.s.n; hi > 0;) {
                size_t k = u8_prev(v.u.s.p, hi);
                sb_put(&b, v.u.s.p + k, hi - k);
                hi = k;
            }
            return v_str(sb_jstr(&b));
        }
        bool gen = v.t == JT_LIST && (v.sub == JL_GEN || v.sub == JL_REVITER);
        if (v.t != JT_LIST && v.t != JT_DICT && v.t != JT_UNDEF)
            RFAIL(r, pos, "argument must be iterable");
        jv *items = iter_items(r, v, &n, pos);
        jlist *l = list_new(&r->ar, n);
        for (size_t i = 0; i < n; i++) l->v[i] = items[n - 1 - i];
        return v_list(l, gen ? JL_LIST : JL_REVITER);
    }
    case FL_ROUND: {
        static const char *const names[] = {"precision", "method"};
        bind_args(r, a, names, 2, p, pos, "round");
        int64_t prec = arg_int(r, p[0], 0, pos, "precision");
        jstr method = arg_str(r, p[1], "common", pos, "method");
        if (!js_eqc(method, "common") && !js_eqc(method, "ceil") && !js_eqc(method, "floor"))
            RFAIL(r, pos, "method must be common, ceil or floor");
        if (!is_num(v)) {
            if (v.t == JT_UNDEF) undef_fail(r, v, pos);
            RFAIL(r, pos, "type %s doesn't define __round__ method", tname(v));
        }
        if (prec < 0 || prec > 300) RUNSUP(r, pos, "round() with precision %lld", (long long)prec);
        if (js_eqc(method, "common")) {
            if (v.t != JT_FLOAT) return v_int(v.u.i);
            if (!isfinite(v.u.f)) return v;
            char *buf = ar_alloc(&r->ar, 400 + (size_t)prec);
            snprintf(buf, 400 + (size_t)prec, "%.*f", (int)prec, v.u.f);
            return v_float(strtod(buf, NULL));
        }
        double m = pow(10.0, (double)prec), x = num_f(v) * m;
        return v_float((js_eqc(method, "ceil") ? ceil(x) : floor(x)) / m);
    }
    case FL_SAFE: {
        bind_args(r, a, NULL, 0, p, pos, "safe");
        jv out = v_str(str_of(r, v, pos));
        out.sub = 1;
        return out;
    }
    case FL_SORT: return filter_sort(r, v, a, pos);
    case FL_STRING:
        bind_args(r, a, NULL, 0, p, pos, "string");
        return v.t == JT_STR ? v : v_str(str_of(r, v, pos));
    case FL_SUM: {
        static const char *const names[] = {"attribute", "start"};
        bind_args(r, a, names, 2, p, pos, "sum");
        attrget g;
        attr_prepare(r, p[0], &g, pos);
        jv acc = is_absent(p[1]) ? v_int(0) : p[1];
        if (acc.t == JT_STR) RFAIL(r, pos, "sum() can't sum strings [use ''.join(seq) instead]");
        jv *items = iter_items(r, v, &n, pos);
        for (size_t i = 0; i < n; i++) acc = binop(r, OP_ADD, acc, g.n ? attr_apply(r, &g, items[i], pos) : items[i], pos);
        return acc;
    }
    case FL_TITLE:
        bind_args(r, a, NULL, 0, p, pos, "title");
        return keep_markup(v, v_str(str_case(r, str_of(r, v, pos), SC_JTITLE, pos)));
    case FL_TOJSON: return filter_tojson(r, v, a, pos);
    case FL_TRIM: {
        static const char *const names[] = {"chars"};
        bind_args(r, a, names, 1, p, pos, "trim");
        return keep_markup(v, v_str(str_strip(r, str_of(r, v, pos), p[0], 3, pos)));
    }
    case FL_UNIQUE: {
        static const char *const names[] = {"case_sensitive", "attribute"};
        bind_args(r, a, names, 2, p, pos, "unique");
        attrget g;
        attr_prepare(r, p[1], &g, pos);
        bool cs = arg_bool(p[0], false);
        jv *items = iter_items(r, v, &n, pos);
        vvec out = {0}, seen = {0};
        for (size_t i = 0; i < n; i++) {
            jv k = sort_key(r, items[i], &g, g.n ? 1 : 0, cs, pos);
            if (!hashable(k)) RFAIL(r, pos, "unhashable type: '%s'", tname(k));
            bool dup = false;
            for (size_t j = 0; j < seen.n && !dup; j++) dup = py_eq(seen.v[j], k);
            if (dup) continue;
            vv_push(&r->ar, &seen, k);
            vv_push(&r->ar, &out, items[i]);
        }
        return gen_of(r, &out);
    }
    }
    RFAIL(r, pos, "bad filter");
}

/* A generator filter that has not run yet. */
struct jlazy {
    int id;
    jv in;
    jargs args;
    size_t pos;
};

/* map, select, reject, selectattr, rejectattr, unique and items are Python generators in Jinja:
 * nothing happens (and nothing can fail) until the result is iterated. */
static bool filter_is_generator(int id) {
    return id == FL_MAP || id == FL_SELECT || id == FL_REJECT || id == FL_SELECTATTR ||
           id == FL_REJECTATTR || id == FL_UNIQUE || id == FL_ITEMS;
}

/* Runs a pending generator filter the first time its items are needed. */
static void gen_force(jrender *r, jlist *l) {
    struct jlazy *z = l->lazy;
    if (!z) return;
    l->lazy = NULL;
    jv res = filter_run(r, z->id, z->in, &z->args, z->pos);
    l->v = res.u.l->v;
    l->n = res.u.l->n;
    l->pos = 0;
}

/* Applies filter id to v: generator filters return a pending generator. */
static jv call_filter(jrender *r, int id, jv v, const jargs *a, size_t pos) {
    if (!filter_is_generator(id)) return filter_run(r, id, v, a, pos);
    struct jlazy *z = ar_alloc(&r->ar, sizeof *z);
    z->id = id;
    z->in = v;
    z->args = *a;
    z->pos = pos;
    jlist *l = list_new(&r->ar, 0);
    l->lazy = z;
    return v_list(l, JL_GEN);
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: methods and global functions                                                        */

static jv tuple3(jrender *r, jstr a, jstr b, jstr c) {
    jlist *l = list_new(&r->ar, 3);
    l->v[0] = v_str(a);
    l->v[1] = v_str(b);
    l->v[2] = v_str(c);
    return v_list(l, JL_TUPLE);
}

/* A dict view (items / keys / values) over d. */
static jv dict_view(jrender *r, const jdict *d, int which) {
    jlist *l = list_new(&r->ar, d->n);
    l->r0 = which;
    for (size_t i = 0; i < d->n; i++) {
        if (which == 0) {
            jlist *t = list_new(&r->ar, 2);
            t->v[0] = d->k[i];
            t->v[1] = d->v[i];
            l->v[i] = v_list(t, JL_TUPLE);
        } else {
            l->v[i] = which == 1 ? d->k[i] : d->v[i];
        }
    }
    return v_list(l, JL_VIEW);
}

static jv call_method_run(jrender *r, jv m, const jargs *a, size_t pos);

/* Marks strings (and strings in a list) as Markup: Markup's methods return Markup. */
static jv as_markup(jv v) {
    if (v.t == JT_STR) v.sub = 1;
    if (v.t == JT_LIST && v.sub != JL_GEN)
        for (size_t i = 0; i < v.u.l->n; i++)
            if (v.u.l->v[i].t == JT_STR) v.u.l->v[i].sub = 1;
    return v;
}

/* Calls a bound method. On a Markup string, methods that escape their arguments are not
 * implemented; the others return Markup. */
static jv call_method(jrender *r, jv m, const jargs *a, size_t pos) {
    jv self = m.u.me->self;
    if (self.t != JT_STR || !self.sub) return call_method_run(r, m, a, pos);
    if (m.id == M_JOIN || m.id == M_REPLACE || m.id == M_FORMAT || m.id == M_PARTITION || m.id == M_RPARTITION)
        RUNSUP(r, pos, "this method of a Markup (safe) string is not supported");
    jv v = call_method_run(r, m, a, pos);
    return (m.id >= M_FIND && m.id <= M_COUNT_S) || (m.id >= M_ISDIGIT && m.id <= M_ISUPPER) ||
                   m.id == M_STARTSWITH || m.id == M_ENDSWITH
               ? v
               : as_markup(v);
}

/* Runs a bound method of a str, dict, list / tuple / range or loop. */
static jv call_method_run(jrender *r, jv m, const jargs *a, size_t pos) {
    jv self = m.u.me->self, p[3];
    jstr s = self.t == JT_STR ? self.u.s : js("", 0);
    switch (m.id) {
    case M_STARTSWITH: case M_ENDSWITH: {
        static const char *const names[] = {"prefix", "start", "end"};
        bind_args(r, a, names, 3, p, pos, m.id == M_STARTSWITH ? "startswith" : "endswith");
        if (!is_absent(p[1]) || !is_absent(p[2])) RUNSUP(r, pos, "start/end arguments are not supported");
        jv *cands = &p[0];
        size_t nc = 1;
        if (p[0].t == JT_LIST && p[0].sub == JL_TUPLE) {
            cands = p[0].u.l->v;
            nc = p[0].u.l->n;
        }
        for (size_t i = 0; i < nc; i++) {
            if (cands[i].t != JT_STR)
                RFAIL(r, pos, "%s first arg must be str or a tuple of str, not %s",
                      m.id == M_STARTSWITH ? "startswith" : "endswith", tname(cands[i]));
            jstr x = cands[i].u.s;
            if (x.n > s.n) continue;
            if (!x.n || !memcmp(m.id == M_STARTSWITH ? s.p : s.p + s.n - x.n, x.p, x.n)) return v_bool(true);
        }
        return v_bool(false);
    }
    case M_SPLIT: case M_RSPLIT: {
        static const char *const names[] = {"sep", "maxsplit"};
        bind_args(r, a, names, 2, p, pos, "split");
        return str_split(r, s, p[0], arg_int(r, p[1], -1, pos, "maxsplit"), m.id == M_RSPLIT, pos);
    }
    case M_STRIP: case M_LSTRIP: case M_RSTRIP: {
        static const char *const names[] = {"chars"};
        bind_args(r, a, names, 1, p, pos, "strip");
        return v_str(str_strip(r, s, p[0], m.id == M_STRIP ? 3 : m.id == M_LSTRIP ? 1 : 2, pos));
    }
    case M_UPPER: case M_LOWER: case M_TITLE: case M_CAPITALIZE:
        bind_args(r, a, NULL, 0, p, pos, "method");
        return v_str(str_case(r, s, m.id == M_UPPER ? SC_UPPER : m.id == M_LOWER ? SC_LOWER
                                    : m.id == M_TITLE ? SC_PYTITLE : SC_CAPITALIZE, pos));
    case M_REPLACE: {
        static const char *const names[] = {"old", "new", "count"};
        bind_args(r, a, names, 3, p, pos, "replace");
        if (p[0].t != JT_STR || p[1].t != JT_STR) RFAIL(r, pos, "replace() arguments must be str");
        return v_str(str_replace(r, s, p[0].u.s, p[1].u.s, arg_int(r, p[2], -1, pos, "count")));
    }
    case M_FIND: case M_RFIND: case M_INDEX_S: case M_RINDEX: case M_COUNT_S: {
        static const char *const names[] = {"sub", "start", "end"};
        bind_args(r, a, names, 3, p, pos, "find");
        if (!is_absent(p[1]) || !is_absent(p[2])) RUNSUP(r, pos, "start/end arguments are not supported");
        if (p[0].t != JT_STR) RFAIL(r, pos, "must be str, not %s", tname(p[0]));
        jstr x = p[0].u.s;
        if (m.id == M_COUNT_S) {
            if (!x.n) return v_int((int64_t)u8_len(s) + 1);
            int64_t k = 0;
            for (size_t i = 0; s.n - i >= x.n;) {
                const char *h = memmem(s.p + i, s.n - i, x.p, x.n);
                if (!h) break;
                k++;
                i = (size_t)(h - s.p) + x.n;
            }
            return v_int(k);
        }
        bool right = m.id == M_RFIND || m.id == M_RINDEX;
        const char *h = right ? mem_rfind(s.p, s.n, x) : (x.n <= s.n ? memmem(s.p, s.n, x.p, x.n) : NULL);
        if (!x.n) h = right ? s.p + s.n : s.p;
        if (!h) {
            if (m.id == M_INDEX_S || m.id == M_RINDEX) RFAIL(r, pos, "substring not found");
            return v_int(-1);
        }
        return v_int(cp_index(s, (size_t)(h - s.p)));
    }
    case M_JOIN: {
        static const char *const names[] = {"iterable"};
        bind_args(r, a, names, 1, p, pos, "join");
        size_t n;
        jv *items = iter_items(r, p[0], &n, pos);
        sbuf b;
        sb_init(&b, &r->ar);
        for (size_t i = 0; i < n; i++) {
            if (items[i].t != JT_STR)
                RFAIL(r, pos, "sequence item %zu: expected str instance, %s found", i, tname(items[i]));
            if (i) sb_putj(&b, s);
            sb_putj(&b, items[i].u.s);
        }
        return v_str(sb_jstr(&b));
    }
    case M_FORMAT: return v_str(py_format(r, s, a, pos));
    case M_ISDIGIT: case M_ISALPHA: case M_ISALNUM: case M_ISSPACE: case M_ISLOWER: case M_ISUPPER: {
        static const char *const what[] = {"isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper"};
        bind_args(r, a, NULL, 0, p, pos, what[m.id - M_ISDIGIT]);
        return v_bool(str_is(s, what[m.id - M_ISDIGIT]));
    }
    case M_SPLITLINES: {
        static const char *const names[] = {"keepends"};
        bind_args(r, a, names, 1, p, pos, "splitlines");
        bool keep = arg_bool(p[0], false);
        vvec out = {0};
        size_t i = 0, st = 0;
        while (i < s.n) {
            size_t k = i;
            int32_t c = u8_next(s.p, s.n, &i);
            if (!py_islinebreak(c)) continue;
            if (c == '\r' && i < s.n && s.p[i] == '\n') i++;
            vv_push(&r->ar, &out, v_str(js(s.p + st, (keep ? i : k) - st)));
            st = i;
        }
        if (st < s.n) vv_push(&r->ar, &out, v_str(js(s.p + st, s.n - st)));
        return vv_list(r, &out, JL_LIST);
    }
    case M_REMOVEPREFIX: case M_REMOVESUFFIX: {
        static const char *const names[] = {"affix"};
        bind_args(r, a, names, 1, p, pos, "removeprefix");
        if (p[0].t != JT_STR) RFAIL(r, pos, "must be str, not %s", tname(p[0]));
        jstr x = p[0].u.s;
        if (x.n && x.n <= s.n) {
            if (m.id == M_REMOVEPREFIX && !memcmp(s.p, x.p, x.n)) return v_str(js(s.p + x.n, s.n - x.n));
            if (m.id == M_REMOVESUFFIX && !memcmp(s.p + s.n - x.n, x.p, x.n)) return v_str(js(s.p, s.n - x.n));
        }
        return self;
    }
    case M_PARTITION: case M_RPARTITION: {
        static const char *const names[] = {"sep"};
        bind_args(r, a, names, 1, p, pos, "partition");
        if (p[0].t != JT_STR) RFAIL(r, pos, "must be str, not %s", tname(p[0]));
        jstr x = p[0].u.s;
        if (!x.n) RFAIL(r, pos, "empty separator");
        bool right = m.id == M_RPARTITION;
        const char *h = right ? mem_rfind(s.p, s.n, x) : (x.n <= s.n ? memmem(s.p, s.n, x.p, x.n) : NULL);
        if (!h) return right ? tuple3(r, js("", 0), js("", 0), s) : tuple3(r, s, js("", 0), js("", 0));
        size_t k = (size_t)(h - s.p);
        return tuple3(r, js(s.p, k), x, js(s.p + k + x.n, s.n - k - x.n));
    }
    case M_ITEMS: case M_KEYS: case M_VALUES:
        bind_args(r, a, NULL, 0, p, pos, "items");
        return dict_view(r, self.u.d, m.id - M_ITEMS);
    case M_GET: {
        static const char *const names[] = {"key", "default"};
        bind_args(r, a, names, 2, p, pos, "get");
        if (is_absent(p[0])) RFAIL(r, pos, "get expected at least 1 argument, got 0");
        if (a->nkw) RFAIL(r, pos, "get() takes no keyword arguments");
        if (!hashable(p[0])) RFAIL(r, pos, "unhashable type: '%s'", tname(p[0]));
        ptrdiff_t i = dict_find(self.u.d, p[0]);
        if (i >= 0) return self.u.d->v[i];
        return is_absent(p[1]) ? V_NONE : p[1];
    }
    case M_COPY_D: case M_COPY_L:
        bind_args(r, a, NULL, 0, p, pos, "copy");
        return self;
    case M_COUNT_L: case M_INDEX_L: {
        static const char *const names[] = {"value"};
        bind_args(r, a, names, 1, p, pos, m.id == M_COUNT_L ? "count" : "index");
        if (is_absent(p[0])) RFAIL(r, pos, "method expects one argument");
        int64_t k = 0;
        for (size_t i = 0; i < self.u.l->n; i++)
            if (py_eq(self.u.l->v[i], p[0])) {
                if (m.id == M_INDEX_L) return v_int((int64_t)i);
                k++;
            }
        if (m.id == M_INDEX_L) RFAIL(r, pos, "value is not in list");
        return v_int(k);
    }
    case M_CYCLE:
        if (a->nkw) RFAIL(r, pos, "cycle() takes no keyword arguments");
        if (!a->npos) RFAIL(r, pos, "no items for cycling given");
        return a->pos[self.u.loop->i % a->npos];
    case M_CHANGED: {
        if (a->nkw) RFAIL(r, pos, "changed() takes no keyword arguments");
        jlist *l = list_new(&r->ar, a->npos);
        if (a->npos) memcpy(l->v, a->pos, a->npos * sizeof(jv));
        jv cur = v_list(l, JL_LIST);
        jloop *L = self.u.loop;
        if (L->has_changed && py_eq(L->last_changed, cur)) return v_bool(false);
        L->last_changed = cur;
        L->has_changed = true;
        return v_bool(true);
    }
    }
    RFAIL(r, pos, "bad method");
}

/* strftime_now(format): datetime.now().strftime(format) for a naive local time. */
static jv fn_strftime(jrender *r, jstr fmt, size_t pos) {
    struct tm tm;
    time_t t = r->now;
    if (!localtime_r(&t, &tm)) RFAIL(r, pos, "strftime_now: cannot get the local time");
    /* Python's datetime handles %f (microseconds), %z and %Z (empty for naive) itself */
    sbuf f;
    sb_init(&f, &r->ar);
    for (size_t i = 0; i < fmt.n; i++) {
        if (fmt.p[i] == '%' && i + 1 < fmt.n) {
            char c = fmt.p[i + 1];
            if (c == 'f') sb_puts(&f, "000000");
            else if (c == 'z' || c == 'Z') {
            } else {
                sb_putc(&f, '%');
                sb_putc(&f, c);
            }
            i++;
            continue;
        }
        sb_putc(&f, fmt.p[i]);
    }
    sb_putc(&f, 0);
    if (f.n == 1) return v_str(js("", 0));
    for (size_t cap = 256; cap <= 65536; cap *= 4) {
        char *out = ar_alloc(&r->ar, cap);
        size_t k = strftime(out, cap, f.p, &tm);
        if (k) return v_str(js(out, k));
    }
    return v_str(js("", 0));
}

/* range / dict / namespace / raise_exception / strftime_now. */
static jv call_func(jrender *r, int fid, const jargs *a, size_t pos) {
    switch (fid) {
    case F_RANGE: {
        if (a->nkw) RFAIL(r, pos, "range() takes no keyword arguments");
        if (a->npos < 1 || a->npos > 3) RFAIL(r, pos, "range expected 1 to 3 arguments, got %u", a->npos);
        int64_t v[3] = {0, 0, 1};
        for (uint32_t i = 0; i < a->npos; i++) {
            if (a->pos[i].t != JT_INT && a->pos[i].t != JT_BOOL)
                RFAIL(r, pos, "'%s' object cannot be interpreted as an integer", tname(a->pos[i]));
            v[a->npos == 1 ? 1 : i] = a->pos[i].u.i;
        }
        if (!v[2]) RFAIL(r, pos, "range() arg 3 must not be zero");
        int64_t cnt = 0;
        if (v[2] > 0 && v[1] > v[0]) cnt = (v[1] - v[0] - 1) / v[2] + 1;
        if (v[2] < 0 && v[0] > v[1]) cnt = (v[0] - v[1] - 1) / (-v[2]) + 1;
        if (cnt > J_MAX_RANGE)
            RFAIL(r, pos, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).", J_MAX_RANGE);
        jlist *l = list_new(&r->ar, (size_t)cnt);
        for (int64_t i = 0; i < cnt; i++) l->v[i] = v_int(v[0] + i * v[2]);
        l->r0 = v[0];
        l->r1 = v[1];
        l->r2 = v[2];
        return v_list(l, JL_RANGE);
    }
    case F_DICT: case F_NAMESPACE: {
        if (a->npos > 1) RFAIL(r, pos, "expected at most 1 positional argument, got %u", a->npos);
        jdict *d = dict_new(&r->ar, a->nkw + 4);
        if (a->npos) {
            jv src = a->pos[0];
            if (src.t != JT_DICT) RUNSUP(r, pos, "positional argument must be a dict");
            for (size_t i = 0; i < src.u.d->n; i++) dict_push(&r->ar, d, src.u.d->k[i], src.u.d->v[i]);
        }
        for (uint32_t k = 0; k < a->nkw; k++) {
            ptrdiff_t i = dict_find_str(d, a->kwn[k]);
            if (i >= 0) d->v[i] = a->kwv[k];
            else dict_push(&r->ar, d, v_str(a->kwn[k]), a->kwv[k]);
        }
        if (fid == F_DICT) return v_dict(d);
        jns *ns = ar_zalloc(&r->ar, sizeof *ns);
        ns->cap = d->n + 4;
        ns->k = ar_array(&r->ar, ns->cap, sizeof(jstr));
        ns->v = ar_array(&r->ar, ns->cap, sizeof(jv));
        for (size_t i = 0; i < d->n; i++) {
            if (d->k[i].t != JT_STR) RUNSUP(r, pos, "namespace() keys must be strings");
            ns->k[ns->n] = d->k[i].u.s;
            ns->v[ns->n++] = d->v[i];
        }
        jv v = {.t = JT_NS};
        v.u.ns = ns;
        return v;
    }
    case F_RAISE: {
        if (a->npos != 1 || a->nkw) RFAIL(r, pos, "raise_exception() takes exactly one argument");
        jstr msg = str_of(r, a->pos[0], pos);
        jthrow(&r->f, ST_ERR_ARG, pos, "%.*s", (int)(msg.n > 400 ? 400 : msg.n), msg.p);
    }
    case F_STRFTIME:
        if (a->npos != 1 || a->nkw || a->pos[0].t != JT_STR)
            RFAIL(r, pos, "strftime_now() takes one string argument");
        return fn_strftime(r, a->pos[0].u.s, pos);
    }
    RFAIL(r, pos, "bad function");
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: expressions                                                                         */

static void exec_body(jrender *r, jnode *const *xs, uint32_t n);

/* Evaluates a call's arguments. */
static void eval_args(jrender *r, const jnode *n, jargs *a) {
    a->npos = n->nx;
    a->nkw = n->ny;
    a->pos = ar_array(&r->ar, n->nx, sizeof(jv));
    for (uint32_t i = 0; i < n->nx; i++) a->pos[i] = eval(r, n->xs[i]);
    a->kwn = n->names;
    a->kwv = ar_array(&r->ar, n->ny, sizeof(jv));
    for (uint32_t i = 0; i < n->ny; i++) a->kwv[i] = eval(r, n->ys[i]);
}

/* Calls a macro: binds arguments in a new scope under the macro's defining scope and renders
 * its body into a string. */
static jv call_macro(jrender *r, jv mv, const jargs *a, size_t pos) {
    const jnode *d = mv.u.m->def;
    if (r->depth >= J_MAX_CALL_DEPTH) jthrow(&r->f, ST_ERR_LIMIT, pos, "maximum recursion depth exceeded");
    tick(r, pos);
    int name_n = (int)d->s.n;
    uint32_t np = d->nn, first_def = d->nn - d->ny;
    if (a->npos > np && !(d->op & MF_VARARGS))
        RFAIL(r, pos, "macro '%.*s' takes not more than %u argument(s)", name_n, d->s.p, np);
    scope *s = scope_new(r, mv.u.m->closure);
    bool *bound = ar_zalloc(&r->ar, np + 1);
    for (uint32_t i = 0; i < a->npos && i < np; i++) {
        scope_set(r, s, d->names[i], a->pos[i]);
        bound[i] = true;
    }
    jdict *kw = (d->op & MF_KWARGS) ? dict_new(&r->ar, 4) : NULL;
    for (uint32_t k = 0; k < a->nkw; k++) {
        uint32_t i = 0;
        while (i < np && !js_eq(d->names[i], a->kwn[k])) i++;
        if (i < np) {
            if (bound[i])
                RFAIL(r, pos, "macro '%.*s' got multiple values for argument '%.*s'", name_n, d->s.p,
                      (int)a->kwn[k].n, a->kwn[k].p);
            scope_set(r, s, d->names[i], a->kwv[k]);
            bound[i] = true;
        } else if (kw) {
            dict_push(&r->ar, kw, v_str(a->kwn[k]), a->kwv[k]);
        } else {
            RFAIL(r, pos, "macro '%.*s' takes no keyword argument '%.*s'", name_n, d->s.p,
                  (int)a->kwn[k].n, a->kwn[k].p);
        }
    }
    scope *saved_sc = r->sc;
    sbuf *saved_out = r->out;
    r->sc = s;
    for (uint32_t i = 0; i < np; i++) {
        if (bound[i]) continue;
        jv v = i >= first_def ? eval(r, d->ys[i - first_def])
                              : v_undef_msg(rfmt(r, "parameter '%.*s' was not provided", (int)d->names[i].n, d->names[i].p));
        scope_set(r, s, d->names[i], v);
    }
    if (d->op & MF_VARARGS) {
        uint32_t extra = a->npos > np ? a->npos - np : 0;
        jlist *l = list_new(&r->ar, extra);
        for (uint32_t i = 0; i < extra; i++) l->v[i] = a->pos[np + i];
        scope_set(r, s, js("varargs", 7), v_list(l, JL_TUPLE));
    }
    if (kw) scope_set(r, s, js("kwargs", 6), v_dict(kw));
    sbuf buf;
    sb_init(&buf, &r->ar);
    r->out = &buf;
    r->depth++;
    exec_body(r, d->xs, d->nx);
    r->depth--;
    r->out = saved_out;
    r->sc = saved_sc;
    return v_str(sb_jstr(&buf));
}

/* Calls a macro, global function or bound method; anything else raises. */
static jv call_value(jrender *r, jv f, const jargs *a, size_t pos) {
    switch (f.t) {
    case JT_MACRO: return call_macro(r, f, a, pos);
    case JT_FUNC: return call_func(r, f.sub, a, pos);
    case JT_METHOD: return call_method(r, f, a, pos);
    case JT_UNDEF: undef_fail(r, f, pos);
    default: RFAIL(r, pos, "'%s' object is not callable", tname(f));
    }
}

/* Applies the filter chain n to its operand; a NULL operand at the chain's start is `hole`
 * (the rendered body of a filter block or block set). */
static jv apply_filter_node(jrender *r, const jnode *n, jv hole) {
    jv v = !n->a ? hole : n->a->k == N_FILTER ? apply_filter_node(r, n->a, hole) : eval(r, n->a);
    if (n->id == ID_UNKNOWN) RUNSUP(r, n->pos, "unsupported filter '%.*s'", (int)n->s.n, n->s.p);
    jargs a;
    eval_args(r, n, &a);
    return call_filter(r, n->id, v, &a, n->pos);
}

/* Evaluates an expression node to a value (errors unwind). */
static jv eval(jrender *r, const jnode *n) {
    switch (n->k) {
    case N_CONST: return n->v;
    case N_NAME: {
        jv v;
        if (scope_get(r->sc, n->s, &v)) return v;
        return v_undef_msg(rfmt(r, "'%.*s' is undefined", (int)n->s.n, n->s.p));
    }
    case N_LIST: case N_TUPLE: {
        jlist *l = list_new(&r->ar, n->nx);
        for (uint32_t i = 0; i < n->nx; i++) l->v[i] = eval(r, n->xs[i]);
        return v_list(l, n->k == N_LIST ? JL_LIST : JL_TUPLE);
    }
    case N_DICT: {
        jdict *d = dict_new(&r->ar, n->nx);
        for (uint32_t i = 0; i < n->nx; i++) {
            jv k = eval(r, n->xs[i]), v = eval(r, n->ys[i]);
            if (!hashable(k)) RFAIL(r, n->xs[i]->pos, "unhashable type: '%s'", tname(k));
            ptrdiff_t j = dict_find(d, k);
            if (j >= 0) d->v[j] = v;
            else dict_push(&r->ar, d, k, v);
        }
        return v_dict(d);
    }
    case N_ATTR: {
        jv obj = eval(r, n->a);
        if (obj.t == JT_UNDEF) undef_fail(r, obj, n->pos);
        return get_attr(r, obj, n->s, n->pos);
    }
    case N_ITEM: {
        jv obj = eval(r, n->a);
        if (n->b->k == N_SLICE) return eval_slice(r, obj, n->b, n->pos);
        if (obj.t == JT_UNDEF) undef_fail(r, obj, n->pos);
        return get_item(r, obj, eval(r, n->b), n->pos);
    }
    case N_NEG: case N_POS: {
        jv v = eval(r, n->a);
        if (v.t == JT_UNDEF) undef_fail(r, v, n->pos);
        if (v.t == JT_FLOAT) return n->k == N_NEG ? v_float(-v.u.f) : v;
        if (v.t == JT_INT || v.t == JT_BOOL) {
            if (n->k == N_POS) return v_int(v.u.i);
            if (v.u.i == INT64_MIN) RUNSUP(r, n->pos, "integer overflow (beyond 64 bits)");
            return v_int(-v.u.i);
        }
        RFAIL(r, n->pos, "bad operand type for unary %c: '%s'", n->k == N_NEG ? '-' : '+', tname(v));
    }
    case N_NOT: return v_bool(!truthy(eval(r, n->a)));
    case N_BIN: {
        jv a = eval(r, n->a), b = eval(r, n->b);
        return binop(r, n->op, a, b, n->pos);
    }
    case N_AND: {
        jv a = eval(r, n->a);
        return truthy(a) ? eval(r, n->b) : a;
    }
    case N_OR: {
        jv a = eval(r, n->a);
        return truthy(a) ? a : eval(r, n->b);
    }
    case N_CMP: {
        jv left = eval(r, n->a);
        for (uint32_t i = 0; i < n->nx; i++) {
            const jnode *o = n->xs[i];
            jv right = eval(r, o->a);
            bool ok;
            int c;
            switch (o->op) {
            case OP_EQ: ok = py_eq(left, right); break;
            case OP_NE: ok = !py_eq(left, right); break;
            case OP_LT: ok = py_cmp(r, left, right, o->pos, "<") == -1; break;
            case OP_LTEQ: c = py_cmp(r, left, right, o->pos, "<="); ok = c == -1 || c == 0; break;
            case OP_GT: ok = py_cmp(r, left, right, o->pos, ">") == 1; break;
            case OP_GTEQ: c = py_cmp(r, left, right, o->pos, ">="); ok = c == 1 || c == 0; break;
            case OP_IN: ok = py_contains(r, right, left, o->pos); break;
            default: ok = !py_contains(r, right, left, o->pos); break;
            }
            if (!ok) return v_bool(false);
            left = right;
        }
        return v_bool(true);
    }
    case N_CONCAT: {
        sbuf b;
        sb_init(&b, &r->ar);
        for (uint32_t i = 0; i < n->nx; i++) put_str(r, &b, eval(r, n->xs[i]), n->xs[i]->pos);
        return v_str(sb_jstr(&b));
    }
    case N_COND:
        if (truthy(eval(r, n->a))) return eval(r, n->b);
        if (n->c) return eval(r, n->c);
        return v_undef_msg(js("the inline if-expression evaluated to false and no else section was defined.", 76));
    case N_CALL: {
        jv f = eval(r, n->a);
        jargs a;
        eval_args(r, n, &a);
        return call_value(r, f, &a, n->pos);
    }
    case N_FILTER: return apply_filter_node(r, n, V_UNDEF);
    case N_TEST: {
        jv v = eval(r, n->a);
        if (n->id == ID_UNKNOWN) RUNSUP(r, n->pos, "unsupported test '%.*s'", (int)n->s.n, n->s.p);
        jargs a;
        eval_args(r, n, &a);
        return v_bool(call_test(r, n->id, v, &a, n->pos));
    }
    default:
        RFAIL(r, n->pos, "bad expression node");
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* evaluator: statements                                                                          */

/* Assigns v to a target (name, tuple of targets, or namespace attribute) in scope s. */
static void assign(jrender *r, scope *s, const jnode *t, jv v, size_t pos) {
    if (t->k == N_NAME) {
        scope_set(r, s, t->s, v);
        return;
    }
    if (t->k == N_NSREF) {
        jv ns;
        if (!scope_get(r->sc, t->s, &ns) || ns.t != JT_NS)
            RFAIL(r, t->pos, "cannot assign attribute on non-namespace object");
        jns *x = ns.u.ns;
        for (size_t i = 0; i < x->n; i++)
            if (js_eq(x->k[i], t->s2)) {
                x->v[i] = v;
                return;
            }
        if (x->n == x->cap) {
            size_t cap = x->cap ? x->cap * 2 : 8;
            jstr *k = ar_array(&r->ar, cap, sizeof(jstr));
            jv *vv = ar_array(&r->ar, cap, sizeof(jv));
            if (x->n) {
                memcpy(k, x->k, x->n * sizeof(jstr));
                memcpy(vv, x->v, x->n * sizeof(jv));
            }
            x->k = k;
            x->v = vv;
            x->cap = cap;
        }
        x->k[x->n] = t->s2;
        x->v[x->n++] = v;
        return;
    }
    size_t n;
    jv *items = iter_items(r, v, &n, pos);
    if (n < t->nx) RFAIL(r, pos, "not enough values to unpack (expected %u, got %zu)", t->nx, n);
    if (n > t->nx) RFAIL(r, pos, "too many values to unpack (expected %u)", t->nx);
    for (uint32_t i = 0; i < t->nx; i++) assign(r, s, t->xs[i], items[i], pos);
}

/* Renders body into a string in a fresh scope (block set, filter block). */
static jv capture(jrender *r, jnode *const *xs, uint32_t n) {
    scope *saved_sc = r->sc;
    sbuf *saved_out = r->out;
    sbuf buf;
    sb_init(&buf, &r->ar);
    r->out = &buf;
    r->sc = scope_new(r, saved_sc);
    exec_body(r, xs, n);
    r->sc = saved_sc;
    r->out = saved_out;
    return v_str(sb_jstr(&buf));
}

/* A for loop: a fresh scope per iteration holding the target and `loop`; the
 * optional `if` filters items first (loop.length counts the kept ones); else runs when
 * nothing was iterated. */
static void exec_for(jrender *r, const jnode *n) {
    scope *outer = r->sc;
    size_t cnt;
    jv *items = iter_items(r, eval(r, n->b), &cnt, n->b->pos);
    if (n->c) { /* for x in xs if cond: the loop sees only the items that pass */
        jv *kept = ar_array(&r->ar, cnt, sizeof(jv));
        size_t k = 0;
        for (size_t i = 0; i < cnt; i++) {
            tick(r, n->pos);
            r->sc = scope_new(r, outer);
            assign(r, r->sc, n->a, items[i], n->pos);
            if (truthy(eval(r, n->c))) kept[k++] = items[i];
            r->sc = outer;
        }
        items = kept;
        cnt = k;
    }
    if (!cnt) {
        if (n->ny) {
            r->sc = scope_new(r, outer);
            exec_body(r, n->ys, n->ny);
            r->sc = outer;
        }
        return;
    }
    jloop *L = ar_zalloc(&r->ar, sizeof *L);
    L->items = items;
    L->n = cnt;
    jv lv = {.t = JT_LOOP};
    lv.u.loop = L;
    for (size_t i = 0; i < cnt; i++) {
        tick(r, n->pos);
        L->i = i;
        scope *s = scope_new(r, outer);
        r->sc = s;
        scope_set(r, s, js("loop", 4), lv);
        assign(r, s, n->a, items[i], n->pos);
        exec_body(r, n->xs, n->nx);
        r->sc = outer;
        if (r->ctl == CTL_BREAK) {
            r->ctl = CTL_NONE;
            break;
        }
        r->ctl = CTL_NONE;
    }
}

/* Executes one statement, writing output to r->out. */
static void exec_node(jrender *r, const jnode *n) {
    tick(r, n->pos);
    switch (n->k) {
    case N_DATA: sb_putj(r->out, n->s); return;
    case N_OUT:
        for (uint32_t i = 0; i < n->nx; i++) put_str(r, r->out, eval(r, n->xs[i]), n->xs[i]->pos);
        return;
    case N_IF:
        if (truthy(eval(r, n->a))) exec_body(r, n->xs, n->nx);
        else exec_body(r, n->ys, n->ny);
        return;
    case N_FOR: exec_for(r, n); return;
    case N_SET: assign(r, r->sc, n->a, eval(r, n->b), n->pos); return;
    case N_SETBLOCK: {
        jv v = capture(r, n->xs, n->nx);
        if (n->b) v = apply_filter_node(r, n->b, v);
        assign(r, r->sc, n->a, v, n->pos);
        return;
    }
    case N_MACRO: {
        jmacro *m = ar_alloc(&r->ar, sizeof *m);
        m->def = n;
        m->closure = r->sc;
        jv v = {.t = JT_MACRO};
        v.u.m = m;
        scope_set(r, r->sc, n->s, v);
        return;
    }
    case N_BREAK: r->ctl = CTL_BREAK; return;
    case N_CONTINUE: r->ctl = CTL_CONTINUE; return;
    case N_WITH: {
        scope *outer = r->sc, *s = scope_new(r, outer);
        for (uint32_t i = 0; i < n->ny; i++) assign(r, s, n->ys[i]->a, eval(r, n->ys[i]->b), n->ys[i]->pos);
        r->sc = s;
        exec_body(r, n->xs, n->nx);
        r->sc = outer;
        return;
    }
    case N_FILTERBLOCK:
        put_str(r, r->out, apply_filter_node(r, n->b, capture(r, n->xs, n->nx)), n->pos);
        return;
    case N_SCOPE: {
        scope *outer = r->sc;
        r->sc = scope_new(r, outer);
        exec_body(r, n->xs, n->nx);
        r->sc = outer;
        return;
    }
    default:
        RFAIL(r, n->pos, "bad statement node");
    }
}

/* Executes statements until the end or a pending break / continue. */
static void exec_body(jrender *r, jnode *const *xs, uint32_t n) {
    for (uint32_t i = 0; i < n && r->ctl == CTL_NONE; i++) exec_node(r, xs[i]);
}

/* ---------------------------------------------------------------------------------------------- */
/* public API: templates                                                                          */

/* Copies src into the template's arena with jinja2's newline handling: \r\n and \r become \n,
 * and one trailing newline is dropped (keep_trailing_newline=False). Rejects invalid UTF-8. */
static void normalize_source(jinja_template *t, jfail *f, const char *src, size_t len) {
    char *out = ar_alloc(&t->ar, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            out[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            out[n++] = src[i];
        }
    }
    if (n && out[n - 1] == '\n') n--;
    out[n] = 0;
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)out + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) {
            f->src = out;
            f->src_len = i;
            jthrow(f, ST_ERR_FORMAT, i, "template is not valid UTF-8");
        }
        i += (size_t)k;
    }
    t->src = out;
    t->len = n;
    f->src = out;
    f->src_len = n;
}

/* The body of jinja_template_parse, run under its setjmp. */
static void parse_into(jinja_template *t, jfail *f, const char *src, size_t len) {
    normalize_source(t, f, src, len);
    jparser p = {.f = f, .ar = &t->ar, .src = t->src, .len = t->len};
    lex(&p);
    nvec body = subparse(&p, NULL);
    if (cur(&p)->t != TK_EOF) perr_unexpected(&p, cur(&p), NULL);
    check_list(&p, body.v, body.n, false);
    t->body = body.v;
    t->n = body.n;
}

/* Runs parse_into under setjmp: 0, or the error code it unwound with. */
static int parse_guarded(jinja_template *t, jfail *f, const char *src, size_t len) {
    if (setjmp(f->jb)) return f->err->code ? f->err->code : ST_ERR_INTERNAL;
    parse_into(t, f, src, len);
    return ST_OK;
}

/* See jinja.h. */
int jinja_template_parse(jinja_template **out, const char *src, size_t len, st_err *err) {
    st_err local;
    st_err *e = err ? err : &local;
    *out = NULL;
    if (!src && len) return st_err_set(e, ST_ERR_ARG, "chat template: NULL source");
    jinja_template *t = calloc(1, sizeof *t);
    jfail *f = calloc(1, sizeof *f);
    if (!t || !f) {
        free(t);
        free(f);
        return st_err_set(e, ST_ERR_NOMEM, "chat template: out of memory");
    }
    f->err = e;
    t->ar.fail = f;
    int rc = parse_guarded(t, f, src ? src : "", len);
    free(f);
    if (rc) {
        arena_release(&t->ar);
        free(t);
        return rc;
    }
    t->ar.fail = NULL; /* the AST is read-only from now on */
    *out = t;
    return ST_OK;
}

/* See jinja.h. */
void jinja_template_free(jinja_template *t) {
    if (!t) return;
    arena_release(&t->ar);
    free(t);
}

/* The body of jinja_render_ex, run under its setjmp: builds the global, variable and template
 * scopes, runs the template and copies the output to a malloc'ed string. */
static void render_into(jrender *r, const jinja_template *t, const json_t *vars, char **out, size_t *out_len) {
    scope *globals = scope_new(r, NULL);
    static const struct { const char *name; int fid; } k_globals[] = {
        {"range", F_RANGE}, {"dict", F_DICT}, {"namespace", F_NAMESPACE},
        {"raise_exception", F_RAISE}, {"strftime_now", F_STRFTIME},
    };
    for (size_t i = 0; i < sizeof k_globals / sizeof k_globals[0]; i++) {
        jv f = {.t = JT_FUNC, .sub = (uint8_t)k_globals[i].fid};
        scope_set(r, globals, js(k_globals[i].name, strlen(k_globals[i].name)), f);
    }
    scope *vs = scope_new(r, globals);
    if (vars) {
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)vars, key, val) scope_set(r, vs, js(key, strlen(key)), from_json(&r->ar, val));
    }
    r->sc = scope_new(r, vs);
    sbuf buf;
    sb_init(&buf, &r->ar);
    r->out = &buf;
    exec_body(r, t->body, t->n);
    char *s = malloc(buf.n + 1);
    if (!s) jthrow(&r->f, ST_ERR_NOMEM, NO_POS, "out of memory");
    if (buf.n) memcpy(s, buf.p, buf.n);
    s[buf.n] = 0;
    *out = s;
    if (out_len) *out_len = buf.n;
}

/* Runs render_into under setjmp: 0, or the error code it unwound with. */
static int render_guarded(jrender *r, const jinja_template *t, const json_t *vars, char **out,
                          size_t *out_len) {
    if (setjmp(r->f.jb)) return r->f.err->code ? r->f.err->code : ST_ERR_INTERNAL;
    render_into(r, t, vars, out, out_len);
    return ST_OK;
}

/* See jinja.h. */
int jinja_render_ex(const jinja_template *t, const json_t *vars, const jinja_render_opts *opts,
                    char **out, size_t *out_len, st_err *err) {
    st_err local;
    st_err *e = err ? err : &local;
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t) return st_err_set(e, ST_ERR_ARG, "chat template: no template");
    if (vars && !json_is_object(vars)) return st_err_set(e, ST_ERR_ARG, "chat template: variables must be a JSON object");
    jrender *r = calloc(1, sizeof *r);
    if (!r) return st_err_set(e, ST_ERR_NOMEM, "chat template: out of memory");
    r->f.err = e;
    r->f.src = t->src;
    r->f.src_len = t->len;
    r->ar.fail = &r->f;
    r->now = opts && opts->now ? (time_t)opts->now : time(NULL);
    int rc = render_guarded(r, t, vars, out, out_len);
    arena_release(&r->ar);
    free(r);
    return rc;
}

/* See jinja.h. */
int jinja_render(const jinja_template *t, const json_t *vars, char **out, size_t *out_len, st_err *err) {
    return jinja_render_ex(t, vars, NULL, out, out_len, err);
}

/* ---------------------------------------------------------------------------------------------- */
/* public API: a model's chat template                                                            */

struct chat_template {
    jinja_template *def;      /* "default" (or the only) template                          */
    jinja_template *tool_use; /* the "tool_use" template of a named list, or NULL            */
    json_t *tokens;           /* special tokens as template variables ({"bos_token": ...})   */
};

/* See jinja.h. */
void chat_template_free(chat_template *ct) {
    if (!ct) return;
    jinja_template_free(ct->def);
    jinja_template_free(ct->tool_use);
    json_decref(ct->tokens);
    free(ct);
}

/* A special token's text: a string, or an AddedToken object's "content"; NULL otherwise. */
static const char *token_text(const json_t *v) {
    if (json_is_string(v)) return json_string_value(v);
    if (json_is_object(v)) {
        const json_t *c = json_object_get(v, "content");
        if (json_is_string(c)) return json_string_value(c);
    }
    return NULL;
}

/* Parses one template source with "path: " context on errors. */
static int load_one(jinja_template **out, const char *src, size_t len, const char *what, st_err *err) {
    int rc = jinja_template_parse(out, src, len, err);
    if (rc) st_err_prefix(err, "%s", what);
    return rc;
}

/* See jinja.h. */
int chat_template_load(chat_template **out, const char *path, st_err *err) {
    st_err local;
    st_err *e = err ? err : &local;
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = st_file_read(path, &text, &len, e);
    if (rc) return rc;
    json_error_t je;
    /* integers as reals: configs hold values like model_max_length = 1e30 that overflow int64 */
    json_t *cfg = json_loadb(text, len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &je);
    free(text);
    if (!cfg || !json_is_object(cfg)) {
        rc = st_err_set(e, ST_ERR_FORMAT, "%s: not a JSON object (%s, line %d)", path, cfg ? "wrong type" : je.text, je.line);
        json_decref(cfg);
        return rc;
    }
    chat_template *ct = calloc(1, sizeof *ct);
    if (!ct) {
        json_decref(cfg);
        return st_err_set(e, ST_ERR_NOMEM, "chat template: out of memory");
    }
    ct->tokens = json_object();
    /* a chat_template.jinja next to the config overrides the config's field (transformers) */
    char *dir = strdup(path), *slash = dir ? strrchr(dir, '/') : NULL;
    char *jpath = NULL;
    if (dir) {
        if (slash) *slash = 0;
        jpath = st_path_join(slash ? dir : ".", "chat_template.jinja");
        free(dir);
    }
    if (!jpath || !ct->tokens) {
        rc = st_err_set(e, ST_ERR_NOMEM, "chat template: out of memory");
        goto done;
    }
    if (st_path_exists(jpath)) {
        if ((rc = st_file_read(jpath, &text, &len, e))) goto done;
        rc = load_one(&ct->def, text, len, jpath, e);
        free(text);
        if (rc) goto done;
    } else {
        const json_t *tpl = json_object_get(cfg, "chat_template");
        if (json_is_string(tpl)) {
            if ((rc = load_one(&ct->def, json_string_value(tpl), json_string_length(tpl), path, e))) goto done;
        } else if (json_is_array(tpl)) {
            size_t i;
            const json_t *item;
            json_array_foreach(tpl, i, item) {
                const char *name = json_string_value(json_object_get(item, "name"));
                const json_t *src = json_object_get(item, "template");
                if (!name || !json_is_string(src)) continue;
                jinja_template **slot = !strcmp(name, "default") ? &ct->def : !strcmp(name, "tool_use") ? &ct->tool_use : NULL;
                if (!slot || *slot) continue;
                if ((rc = load_one(slot, json_string_value(src), json_string_length(src), path, e))) goto done;
            }
            if (!ct->def) {
                rc = st_err_set(e, ST_ERR_MISSING, "%s: chat_template lists no \"default\" template", path);
                goto done;
            }
        } else {
            rc = st_err_set(e, ST_ERR_MISSING, "%s: no chat_template (and no chat_template.jinja)", path);
            goto done;
        }
    }
    static const char *const k_tokens[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                           "pad_token", "cls_token", "mask_token"};
    for (size_t i = 0; i < sizeof k_tokens / sizeof k_tokens[0]; i++) {
        const char *s = token_text(json_object_get(cfg, k_tokens[i]));
        if (s) json_object_set_new(ct->tokens, k_tokens[i], json_string(s));
    }
    const json_t *extra = json_object_get(cfg, "additional_special_tokens");
    if (json_is_array(extra)) {
        json_t *list = json_array();
        size_t i;
        const json_t *item;
        json_array_foreach(extra, i, item) {
            const char *s = token_text(item);
            if (s) json_array_append_new(list, json_string(s));
        }
        json_object_set_new(ct->tokens, "additional_special_tokens", list);
    }
    rc = ST_OK;
done:
    free(jpath);
    json_decref(cfg);
    if (rc) {
        chat_template_free(ct);
        return rc;
    }
    *out = ct;
    return ST_OK;
}

/* See jinja.h. */
int chat_template_render(const chat_template *ct, const json_t *messages, int add_generation_prompt,
                         const json_t *extra_kwargs, const jinja_render_opts *opts, char **out,
                         st_err *err) {
    st_err local;
    st_err *e = err ? err : &local;
    *out = NULL;
    if (!json_is_array(messages)) return st_err_set(e, ST_ERR_ARG, "chat template: messages must be a JSON array");
    if (extra_kwargs && !json_is_object(extra_kwargs))
        return st_err_set(e, ST_ERR_ARG, "chat template: extra kwargs must be a JSON object");
    if (extra_kwargs && (json_object_get(extra_kwargs, "messages") || json_object_get(extra_kwargs, "add_generation_prompt")))
        return st_err_set(e, ST_ERR_ARG, "chat template: extra kwargs may not set messages or add_generation_prompt");
    json_t *vars = json_object();
    if (!vars) return st_err_set(e, ST_ERR_NOMEM, "chat template: out of memory");
    json_object_update(vars, ct->tokens);
    json_object_set_new(vars, "tools", json_null());
    json_object_set_new(vars, "documents", json_null());
    if (extra_kwargs) json_object_update(vars, (json_t *)extra_kwargs);
    json_object_set(vars, "messages", (json_t *)messages);
    json_object_set_new(vars, "add_generation_prompt", json_boolean(add_generation_prompt));
    const json_t *tools = json_object_get(vars, "tools");
    const jinja_template *t = (ct->tool_use && tools && !json_is_null(tools)) ? ct->tool_use : ct->def;
    int rc = jinja_render_ex(t, vars, opts, out, NULL, e);
    json_decref(vars);
    return rc;
}

/* See jinja.h. */
int chat_template_render_config(const char *tokenizer_config_json_path, const json_t *messages,
                                int add_generation_prompt, const json_t *extra_kwargs, char **out,
                                st_err *err) {
    chat_template *ct;
    *out = NULL;
    int rc = chat_template_load(&ct, tokenizer_config_json_path, err);
    if (rc) return rc;
    rc = chat_template_render(ct, messages, add_generation_prompt, extra_kwargs, NULL, out, err);
    chat_template_free(ct);
    return rc;
}
