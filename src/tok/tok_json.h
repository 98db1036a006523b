/* tok_json.h — a small, fast JSON reader for tokenizer.json (RFC 8259, UTF-8 only).
 *
 * Why not jansson: parsing Qwen3's 11 MB tokenizer.json with json_loadb takes ~450 ms and
 * freeing it another ~100 ms (measured on the dev box), above the 300 ms load budget. This
 * reader builds an immutable tree in one arena (one free), keeps strings without escapes as
 * views into the input, and reports errors as "name:line:col: what".
 *
 * Lifetime: a tj_doc borrows the input buffer (string values may point into it) and owns the
 * arena; both must outlive every tj_val taken from it.
 */
#ifndef STRATA_TOK_JSON_H
#define STRATA_TOK_JSON_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

enum tj_type { TJ_NULL, TJ_FALSE, TJ_TRUE, TJ_NUM, TJ_STR, TJ_ARR, TJ_OBJ };

typedef struct tj_val tj_val;
typedef struct tj_mem tj_mem;

struct tj_val {
    uint8_t type;     /* enum tj_type */
    uint8_t is_int;   /* TJ_NUM: an integer literal that fits int64 (u.i), else u.d */
    uint32_t n;       /* TJ_STR: byte length; TJ_ARR: items; TJ_OBJ: members */
    union {
        const char *s;    /* TJ_STR: UTF-8, not NUL-terminated, may contain NUL */
        tj_val *a;        /* TJ_ARR: (n,) */
        tj_mem *o;        /* TJ_OBJ: (n,) in document order */
        int64_t i;
        double d;
    } u;
};

struct tj_mem {
    const char *key;  /* not NUL-terminated */
    uint32_t key_len;
    tj_val val;
};

typedef struct tj_doc {
    tj_val root;
    void *arena;      /* owned block list */
} tj_doc;

/* Parses json[0..len). name is used in messages. On failure ST_ERR_FORMAT with
 * "name:line:col: reason" (or ST_ERR_NOMEM) and doc holds nothing to free. */
int tj_parse(tj_doc *doc, const char *json, size_t len, const char *name, st_err *err);
/* Releases the arena (NULL-safe, idempotent). */
void tj_free(tj_doc *doc);

/* Member `key` of object v; NULL if v is not an object or has no such member. */
const tj_val *tj_get(const tj_val *v, const char *key);
/* 1 if v is a string equal to the NUL-terminated s. */
int tj_str_is(const tj_val *v, const char *s);
/* 1 if v is absent (NULL) or JSON null. */
static inline int tj_is_null(const tj_val *v) { return !v || v->type == TJ_NULL; }
/* Integer value of v (an integral number). 0 on success, -1 if v is not one. */
int tj_int(const tj_val *v, int64_t *out);
/* Name of v's type for messages ("string", "object", ...). */
const char *tj_type_name(const tj_val *v);

#endif
