/* stop.c — end-of-generation conditions: EOS ids from the model's JSON configs, a streaming
 * stop-string matcher, and the max-token limit (see stop.h).
 *
 * The matcher keeps one invariant between feeds: the held text is the longest suffix of
 * everything fed so far that is a proper prefix of some stop string, and no stop string ends
 * inside the emitted text. So any stop string that can still complete must start inside the
 * held text, and a feed only has to look at held + piece.
 */
#include "strata/stop.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* EOS ids                                                                                    */

/* Appends id to ids[0, *n) unless present. ST_ERR_FORMAT if it is not a valid token id,
 * ST_ERR_LIMIT if the list is full. */
static int eos_add(int32_t *ids, int cap, int *n, json_int_t v, const char *path, st_err *err) {
    if (v < 0 || v > INT32_MAX)
        return st_err_set(err, ST_ERR_FORMAT, "%s: eos_token_id %lld is not a valid token id", path, (long long)v);
    for (int i = 0; i < *n; i++)
        if (ids[i] == (int32_t)v) return ST_OK;
    if (*n >= cap)
        return st_err_set(err, ST_ERR_LIMIT, "%s: more than %d distinct eos_token_id values", path, cap);
    ids[(*n)++] = (int32_t)v;
    return ST_OK;
}

/* Adds the ids of one eos_token_id value (integer, list of integers, null or absent). */
static int eos_collect(const json_t *v, int32_t *ids, int cap, int *n, const char *path, st_err *err) {
    if (!v || json_is_null(v)) return ST_OK;
    if (json_is_integer(v)) return eos_add(ids, cap, n, json_integer_value(v), path, err);
    if (!json_is_array(v))
        return st_err_set(err, ST_ERR_FORMAT, "%s: eos_token_id must be an integer or a list of integers", path);
    size_t i;
    const json_t *e;
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e))
            return st_err_set(err, ST_ERR_FORMAT, "%s: eos_token_id[%zu] is not an integer", path, i);
        int rc = eos_add(ids, cap, n, json_integer_value(e), path, err);
        if (rc != ST_OK) return rc;
    }
    return ST_OK;
}

/* Reads model_dir/name and adds its eos_token_id (or text_config.eos_token_id when
 * fallback_text_config and the top-level key is absent). A missing file is ST_OK when optional. */
static int eos_from_file(const char *model_dir, const char *name, int optional, int fallback_text_config,
                         int32_t *ids, int cap, int *n, st_err *err) {
    char *path = st_path_join(model_dir, name);
    if (!path) return st_err_set(err, ST_ERR_NOMEM, "%s/%s: out of memory", model_dir, name);
    int rc = ST_OK;
    char *buf = NULL;
    size_t len = 0;
    json_t *root = NULL;
    if (optional && !st_path_exists(path)) goto done;
    rc = st_file_read(path, &buf, &len, err);
    if (rc != ST_OK) goto done;
    json_error_t jerr;
    root = json_loadb(buf, len, 0, &jerr);
    if (!root) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", path, jerr.line, jerr.column, jerr.text);
        goto done;
    }
    if (!json_is_object(root)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: top level is not a JSON object", path);
        goto done;
    }
    const json_t *v = json_object_get(root, "eos_token_id");
    if (!v && fallback_text_config) {
        const json_t *tc = json_object_get(root, "text_config");
        if (json_is_object(tc)) v = json_object_get(tc, "eos_token_id");
    }
    rc = eos_collect(v, ids, cap, n, path, err);
done:
    json_decref(root);
    free(buf);
    free(path);
    return rc;
}

int stop_load_eos(const char *model_dir, int32_t *ids, int cap, int *n, st_err *err) {
    ST_ASSERT(model_dir && n && (ids || cap == 0) && cap >= 0);
    *n = 0;
    int rc = eos_from_file(model_dir, "config.json", 0, 1, ids, cap, n, err);
    if (rc == ST_OK) rc = eos_from_file(model_dir, "generation_config.json", 1, 0, ids, cap, n, err);
    if (rc != ST_OK) *n = 0;
    return rc;
}

int stop_is_eos(const int32_t *ids, int n, int32_t id) {
    for (int i = 0; i < n; i++)
        if (ids[i] == id) return 1;
    return 0;
}

int stop_check_token(const int32_t *eos, int n_eos, int32_t id, int64_t n_generated, int64_t max_tokens) {
    if (stop_is_eos(eos, n_eos, id)) return STOP_EOS;
    if (max_tokens > 0 && n_generated >= max_tokens) return STOP_LENGTH;
    return STOP_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* stop strings                                                                               */

struct stop_matcher {
    int n;            /* number of stop strings                                   */
    char **str;       /* (n,) copies, NUL-terminated, inside the same allocation   */
    size_t *len;      /* (n,) byte lengths, each >= 1                              */
    size_t max_len;   /* longest stop string                                       */
    char *hold;       /* (max_len,) held-back tail of the stream                   */
    size_t hold_len;  /* < max_len                                                 */
    int matched;      /* index of the matched string, -1 while none               */
};

stop_matcher *stop_matcher_init(const char *const *strings, int n, st_err *err) {
    if (n < 0 || (n > 0 && !strings)) {
        st_err_set(err, ST_ERR_ARG, "stop strings: bad list (n=%d)", n);
        return NULL;
    }
    size_t total = 0, max_len = 0;
    for (int i = 0; i < n; i++) {
        if (!strings[i] || !strings[i][0]) {
            st_err_set(err, ST_ERR_ARG, "stop strings: entry %d is empty", i);
            return NULL;
        }
        size_t l = strlen(strings[i]);
        total += l + 1;
        if (l > max_len) max_len = l;
    }
    /* one block: the struct, str[], len[], the string bytes, the hold buffer */
    size_t off_str = sizeof(stop_matcher);
    size_t off_len = off_str + (size_t)n * sizeof(char *);
    size_t off_bytes = off_len + (size_t)n * sizeof(size_t);
    size_t off_hold = off_bytes + total;
    stop_matcher *m = calloc(1, off_hold + max_len + 1);
    if (!m) {
        st_err_set(err, ST_ERR_NOMEM, "stop strings: out of memory");
        return NULL;
    }
    char *base = (char *)m;
    m->n = n;
    m->str = (char **)(base + off_str);
    m->len = (size_t *)(base + off_len);
    m->hold = base + off_hold;
    m->max_len = max_len;
    char *p = base + off_bytes;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(strings[i]);
        memcpy(p, strings[i], l + 1);
        m->str[i] = p;
        m->len[i] = l;
        p += l + 1;
    }
    m->matched = -1;
    return m;
}

void stop_matcher_free(stop_matcher *m) { free(m); }

void stop_matcher_reset(stop_matcher *m) {
    m->hold_len = 0;
    m->matched = -1;
}

size_t stop_matcher_hold_max(const stop_matcher *m) { return m->max_len ? m->max_len - 1 : 0; }

int stop_matcher_matched(const stop_matcher *m) { return m->matched; }

/* Length of the longest suffix of t[0, n) that is a proper prefix of some stop string. */
static size_t held_suffix(const stop_matcher *m, const char *t, size_t n) {
    size_t k = stop_matcher_hold_max(m);
    if (k > n) k = n;
    for (; k > 0; k--) {
        const char *suf = t + n - k;
        for (int i = 0; i < m->n; i++)
            if (m->len[i] > k && m->str[i][0] == suf[0] && memcmp(m->str[i], suf, k) == 0) return k;
    }
    return 0;
}

int stop_matcher_feed(stop_matcher *m, const char *piece, size_t len, char *out, size_t out_cap,
                      size_t *emit_len) {
    ST_ASSERT(m && emit_len && (piece || len == 0));
    *emit_len = 0;
    if (m->matched >= 0) return STOP_STRING;
    const size_t h = m->hold_len, t = h + len;
    ST_ASSERT(out && out_cap >= t);
    memcpy(out, m->hold, h);
    if (len) memcpy(out + h, piece, len);
    m->hold_len = 0;

    /* The earliest-completing stop string among those ending past the held text (anything
     * ending inside it was ruled out by earlier feeds); ties go to the earlier start. */
    int best = -1;
    size_t best_end = SIZE_MAX, best_start = 0;
    for (int i = 0; i < m->n; i++) {
        size_t L = m->len[i];
        if (L > t) continue;
        size_t from = h + 1 > L ? h + 1 - L : 0; /* first start whose end lies past h */
        const char *hit = memmem(out + from, t - from, m->str[i], L);
        if (!hit) continue;
        size_t start = (size_t)(hit - out), end = start + L;
        if (end < best_end || (end == best_end && start < best_start)) {
            best = i;
            best_end = end;
            best_start = start;
        }
    }
    if (best >= 0) {
        m->matched = best;
        *emit_len = best_start;
        return STOP_STRING;
    }

    size_t k = held_suffix(m, out, t);
    memcpy(m->hold, out + t - k, k);
    m->hold_len = k;
    *emit_len = t - k;
    return STOP_NONE;
}

int stop_matcher_flush(stop_matcher *m, char *out, size_t out_cap, size_t *emit_len) {
    ST_ASSERT(m && emit_len);
    *emit_len = 0;
    if (m->matched >= 0) return STOP_STRING;
    ST_ASSERT(out_cap >= m->hold_len && (out || m->hold_len == 0));
    if (m->hold_len) memcpy(out, m->hold, m->hold_len);
    *emit_len = m->hold_len;
    m->hold_len = 0;
    return STOP_NONE;
}
