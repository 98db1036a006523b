/* safetensors.c — validated safetensors reader/writer and shard sets (see safetensors.h). */
#include "strata/safetensors.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* dtypes */

static const struct {
    const char *name;
    int bits;
} g_dtypes[SFT_DTYPE_COUNT] = {
    [SFT_BOOL] = {"BOOL", 8},        [SFT_F4] = {"F4", 4},
    [SFT_F6_E2M3] = {"F6_E2M3", 6},  [SFT_F6_E3M2] = {"F6_E3M2", 6},
    [SFT_U8] = {"U8", 8},            [SFT_I8] = {"I8", 8},
    [SFT_F8_E5M2] = {"F8_E5M2", 8},  [SFT_F8_E4M3] = {"F8_E4M3", 8},
    [SFT_F8_E8M0] = {"F8_E8M0", 8},  [SFT_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [SFT_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [SFT_I16] = {"I16", 16},         [SFT_U16] = {"U16", 16},
    [SFT_F16] = {"F16", 16},         [SFT_BF16] = {"BF16", 16},
    [SFT_I32] = {"I32", 32},         [SFT_U32] = {"U32", 32},
    [SFT_F32] = {"F32", 32},         [SFT_C64] = {"C64", 64},
    [SFT_F64] = {"F64", 64},         [SFT_I64] = {"I64", 64},
    [SFT_U64] = {"U64", 64},
};

const char *sft_dtype_name(sft_dtype dt) {
    return (unsigned)dt < SFT_DTYPE_COUNT ? g_dtypes[dt].name : "?";
}

int sft_dtype_bits(sft_dtype dt) { return (unsigned)dt < SFT_DTYPE_COUNT ? g_dtypes[dt].bits : 0; }

int sft_dtype_from_name(const char *s) {
    for (int i = 0; i < SFT_DTYPE_COUNT; i++)
        if (!strcmp(s, g_dtypes[i].name)) return i;
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* parsing */

static int cmp_by_begin(const void *a, const void *b) {
    const sft_tensor *x = *(const sft_tensor *const *)a, *y = *(const sft_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Keeps an error message on one line: names and keys come from the file and may hold control
 * characters (an escaped "\n" in a JSON key); they are shown as '?'. */
static void msg_one_line(st_err *err) {
    if (!err) return;
    for (char *c = err->msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
}

/* Parses one header entry `name: {dtype, shape, data_offsets}` into t. */
static int parse_entry(sft_tensor *t, const char *name, json_t *v, const char *what, st_err *err) {
    if (!json_is_object(v))
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': header entry is not an object", what, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo))
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': needs dtype, shape and data_offsets", what, name);
    int dt = sft_dtype_from_name(json_string_value(jd));
    if (dt < 0)
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", what, name,
                          json_string_value(jd));
    size_t nd = json_array_size(js);
    if (nd > SFT_MAX_DIMS)
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': %zu dimensions (max %d)", what, name, nd,
                          SFT_MAX_DIMS);
    t->dtype = (sft_dtype)dt;
    t->ndim = (int)nd;
    uint64_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': bad shape", what, name);
        uint64_t di = (uint64_t)json_integer_value(d);
        t->shape[i] = (int64_t)di;
        if (di && numel > (UINT64_MAX / 64) / di)
            return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': shape overflows", what, name);
        numel *= di;
    }
    t->numel = (int64_t)numel;
    if (json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)) || json_integer_value(json_array_get(jo, 0)) < 0 ||
        json_integer_value(json_array_get(jo, 1)) < 0)
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': bad data_offsets", what, name);
    t->begin = (uint64_t)json_integer_value(json_array_get(jo, 0));
    t->end = (uint64_t)json_integer_value(json_array_get(jo, 1));
    if (t->end < t->begin)
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': data_offsets end before begin", what, name);
    uint64_t bits = numel * (uint64_t)g_dtypes[dt].bits;
    if (bits % 8)
        return st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s': %s x %llu elements is not a whole number of bytes",
                          what, name, g_dtypes[dt].name, (unsigned long long)numel);
    if (t->end - t->begin != bits / 8)
        return st_err_set(err, ST_ERR_FORMAT,
                          "%s: tensor '%s': %llu bytes in data_offsets but dtype %s x shape needs %llu", what,
                          name, (unsigned long long)(t->end - t->begin), g_dtypes[dt].name,
                          (unsigned long long)(bits / 8));
    t->nbytes = (size_t)(t->end - t->begin);
    t->name = strdup(name);
    if (!t->name) return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", what);
    return ST_OK;
}

int sft_file_parse(sft_file *f, const void *buf, size_t size, const char *what, st_err *err) {
    sft_file keep_map = {0};
    keep_map.map = f->map; /* sft_file_open fills the map before calling us */
    memset(f, 0, sizeof *f);
    f->map = keep_map.map;
    const unsigned char *p = buf;
    if (size < 8) return st_err_set(err, ST_ERR_FORMAT, "%s: file too short for a safetensors header (%zu bytes)", what, size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | p[i];
    if (n > SFT_MAX_HEADER)
        return st_err_set(err, ST_ERR_FORMAT, "%s: header length %llu exceeds the %llu-byte limit", what,
                          (unsigned long long)n, (unsigned long long)SFT_MAX_HEADER);
    if (n > size - 8)
        return st_err_set(err, ST_ERR_FORMAT, "%s: header length %llu runs past the end of the file (%zu bytes)",
                          what, (unsigned long long)n, size);
    f->header_len = n;
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &je);
    if (!root) {
        st_err_set(err, ST_ERR_FORMAT, "%s: header is not valid %s (%s at byte %d)", what,
                   json_error_code(&je) == json_error_invalid_utf8 ? "UTF-8" : "JSON", je.text, je.position);
        msg_one_line(err);
        return ST_ERR_FORMAT;
    }
    int rc = ST_OK;
    if (!json_is_object(root)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: header is not a JSON object", what);
        goto out;
    }
    size_t cap = json_object_size(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) {
        rc = st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", what);
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(val) && !json_is_null(val)) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: __metadata__ is not an object", what);
                goto out;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) {
                    rc = st_err_set(err, ST_ERR_FORMAT, "%s: __metadata__.%s is not a string", what, mk);
                    goto out;
                }
            }
            json_t *fmt = json_object_get(val, "format");
            if (json_is_string(fmt) && !(f->metadata_format = strdup(json_string_value(fmt)))) {
                rc = st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", what);
                goto out;
            }
            continue;
        }
        rc = parse_entry(&f->tensors[f->n_tensors], key, val, what, err);
        if (rc) goto out;
        f->n_tensors++;
    }
    /* offsets must tile the data buffer exactly */
    {
        uint64_t data_size = size - 8 - n;
        const sft_tensor **order = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof *order);
        if (!order) {
            rc = st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", what);
            goto out;
        }
        for (size_t i = 0; i < f->n_tensors; i++) order[i] = &f->tensors[i];
        qsort(order, f->n_tensors, sizeof *order, cmp_by_begin);
        uint64_t at = 0;
        for (size_t i = 0; i < f->n_tensors && !rc; i++) {
            if (order[i]->begin != at)
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s' begins at %llu but the previous data ends at %llu (%s)",
                                what, order[i]->name, (unsigned long long)order[i]->begin,
                                (unsigned long long)at, order[i]->begin > at ? "gap" : "overlap");
            at = order[i]->end;
        }
        if (!rc && at != data_size)
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: tensor data ends at %llu but the file holds %llu data bytes%s",
                            what, (unsigned long long)at, (unsigned long long)data_size,
                            at > data_size ? " (truncated file?)" : " (trailing bytes)");
        free(order);
        if (rc) goto out;
    }
    for (size_t i = 0; i < f->n_tensors; i++) f->tensors[i].data = p + 8 + n + f->tensors[i].begin;
out:
    json_decref(root);
    if (rc) {
        msg_one_line(err);
        st_mmap m = f->map;
        f->map = (st_mmap){0};
        sft_file_close(f);
        f->map = m;
    }
    return rc;
}

int sft_file_open(sft_file *f, const char *path, st_err *err) {
    memset(f, 0, sizeof *f);
    int rc = st_mmap_open(&f->map, path, err);
    if (rc) return rc;
    rc = sft_file_parse(f, f->map.data, f->map.size, path, err);
    if (rc) {
        st_mmap_close(&f->map);
        memset(f, 0, sizeof *f);
    }
    return rc;
}

void sft_file_close(sft_file *f) {
    for (size_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->metadata_format);
    free(f->owned_buf);
    if (f->map.path || f->map.data) st_mmap_close(&f->map);
    memset(f, 0, sizeof *f);
}

const sft_tensor *sft_file_find(const sft_file *f, const char *name) {
    for (size_t i = 0; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* sets */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ull;
    return h;
}

static int set_index(sft_set *s, st_err *err) {
    size_t total = 0;
    for (int i = 0; i < s->n_files; i++) total += s->files[i].n_tensors;
    size_t ns = 16;
    while (ns < total * 2) ns <<= 1;
    s->slots = calloc(ns, sizeof *s->slots);
    if (!s->slots) return st_err_set(err, ST_ERR_NOMEM, "out of memory indexing tensors");
    s->n_slots = ns;
    for (int i = 0; i < s->n_files; i++) {
        for (size_t j = 0; j < s->files[i].n_tensors; j++) {
            sft_tensor *t = &s->files[i].tensors[j];
            t->file = i;
            size_t k = hash_str(t->name) & (ns - 1);
            while (s->slots[k]) {
                if (!strcmp(s->slots[k]->name, t->name))
                    return st_err_set(err, ST_ERR_FORMAT, "tensor '%s' appears in both %s and %s", t->name,
                                      s->file_names[s->slots[k]->file], s->file_names[i]);
                k = (k + 1) & (ns - 1);
            }
            s->slots[k] = t;
            s->n_tensors++;
        }
    }
    return ST_OK;
}

const sft_tensor *sft_set_find(const sft_set *s, const char *name) {
    if (!s->n_slots) return NULL;
    size_t k = hash_str(name) & (s->n_slots - 1);
    while (s->slots[k]) {
        if (!strcmp(s->slots[k]->name, name)) return s->slots[k];
        k = (k + 1) & (s->n_slots - 1);
    }
    return NULL;
}

void sft_set_each(const sft_set *s, int (*fn)(void *ctx, const sft_tensor *t), void *ctx) {
    for (int i = 0; i < s->n_files; i++)
        for (size_t j = 0; j < s->files[i].n_tensors; j++)
            if (fn(ctx, &s->files[i].tensors[j])) return;
}

void sft_set_close(sft_set *s) {
    for (int i = 0; i < s->n_files; i++) {
        sft_file_close(&s->files[i]);
        if (s->file_names) free(s->file_names[i]);
    }
    free(s->files);
    free(s->file_names);
    free(s->slots);
    memset(s, 0, sizeof *s);
}

static int set_alloc(sft_set *s, int n, st_err *err) {
    s->files = calloc((size_t)n, sizeof *s->files);
    s->file_names = calloc((size_t)n, sizeof *s->file_names);
    if (!s->files || !s->file_names) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    return ST_OK;
}

int sft_set_open_file(sft_set *s, const char *path, st_err *err) {
    memset(s, 0, sizeof *s);
    int rc = set_alloc(s, 1, err);
    if (!rc) rc = sft_file_open(&s->files[0], path, err);
    if (!rc) {
        s->n_files = 1;
        const char *b = strrchr(path, '/');
        s->file_names[0] = strdup(b ? b + 1 : path);
        if (!s->file_names[0]) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    if (!rc) rc = set_index(s, err);
    if (rc) sft_set_close(s);
    return rc;
}

int sft_set_from_memory(sft_set *s, sft_tensor *tensors, size_t n, void *buf, const char *label, st_err *err) {
    memset(s, 0, sizeof *s);
    int rc = set_alloc(s, 1, err);
    if (rc) {
        for (size_t i = 0; i < n; i++) free(tensors[i].name);
        free(tensors);
        free(buf);
        sft_set_close(s);
        return rc;
    }
    s->n_files = 1;
    s->files[0].tensors = tensors;
    s->files[0].n_tensors = n;
    s->files[0].owned_buf = buf;
    s->file_names[0] = strdup(label ? label : "memory");
    if (!s->file_names[0]) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (!rc) rc = set_index(s, err);
    if (rc) sft_set_close(s);
    return rc;
}

int sft_set_open_dir(sft_set *s, const char *dir, st_err *err) {
    memset(s, 0, sizeof *s);
    char *ipath = st_path_join(dir, "model.safetensors.index.json");
    if (!ipath) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (!st_path_exists(ipath)) {
        free(ipath);
        char *single = st_path_join(dir, "model.safetensors");
        if (!single) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
        if (!st_path_exists(single)) {
            st_err_set(err, ST_ERR_MISSING, "%s: no model.safetensors or model.safetensors.index.json", dir);
            free(single);
            return ST_ERR_MISSING;
        }
        int rc = sft_set_open_file(s, single, err);
        free(single);
        return rc;
    }
    json_error_t je;
    json_t *root = json_load_file(ipath, JSON_REJECT_DUPLICATES, &je);
    int rc = ST_OK;
    if (!root) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: invalid JSON at line %d column %d: %s", ipath, je.line, je.column,
                        je.text);
        msg_one_line(err);
        free(ipath);
        return rc;
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: no \"weight_map\" object", ipath);
        goto out;
    }
    /* distinct shard names, in first-seen order */
    size_t nw = json_object_size(wm);
    const char **names = calloc(nw ? nw : 1, sizeof *names);
    if (!names) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    int nf = 0;
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val) {
        if (!json_is_string(val)) {
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: weight_map[\"%s\"] is not a file name", ipath, key);
            break;
        }
        const char *fn = json_string_value(val);
        if (strchr(fn, '/') || !strcmp(fn, "..")) {
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: weight_map[\"%s\"] names a path outside the directory", ipath, key);
            break;
        }
        int seen = 0;
        for (int i = 0; i < nf && !seen; i++) seen = !strcmp(names[i], fn);
        if (!seen) names[nf++] = fn;
    }
    if (!rc) rc = set_alloc(s, nf ? nf : 1, err);
    for (int i = 0; i < nf && !rc; i++) {
        char *p = st_path_join(dir, names[i]);
        if (!p) {
            rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            break;
        }
        rc = sft_file_open(&s->files[i], p, err);
        free(p);
        if (rc) break;
        s->file_names[i] = strdup(names[i]);
        s->n_files = i + 1;
        if (!s->file_names[i]) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    free(names);
    if (!rc && (rc = set_index(s, err))) st_err_prefix(err, "%s", dir);
    if (!rc) { /* every mapped tensor must be in the file the index names */
        json_object_foreach(wm, key, val) {
            const sft_tensor *t = sft_set_find(s, key);
            if (!t) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s' is listed in the index but not in %s", ipath,
                                key, json_string_value(val));
                break;
            }
            if (strcmp(s->file_names[t->file], json_string_value(val))) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: tensor '%s' is in %s, the index says %s", ipath, key,
                                s->file_names[t->file], json_string_value(val));
                break;
            }
        }
    }
out:
    json_decref(root);
    free(ipath);
    if (rc) {
        msg_one_line(err);
        sft_set_close(s);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* writer */

int sft_write(const char *path, const sft_write_tensor *t, size_t n, const char *metadata_format, st_err *err) {
    json_t *root = json_object();
    if (!root) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (metadata_format) {
        json_t *m = json_object();
        json_object_set_new(m, "format", json_string(metadata_format));
        json_object_set_new(root, "__metadata__", m);
    }
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t numel = 1;
        json_t *shape = json_array();
        for (int d = 0; d < t[i].ndim; d++) {
            numel *= (uint64_t)t[i].shape[d];
            json_array_append_new(shape, json_integer(t[i].shape[d]));
        }
        uint64_t nb = numel * (uint64_t)sft_dtype_bits(t[i].dtype) / 8;
        json_t *e = json_object();
        json_object_set_new(e, "dtype", json_string(sft_dtype_name(t[i].dtype)));
        json_object_set_new(e, "shape", shape);
        json_object_set_new(e, "data_offsets", json_pack("[II]", (json_int_t)at, (json_int_t)(at + nb)));
        json_object_set_new(root, t[i].name, e);
        at += nb;
    }
    char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!hdr) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(hdr);
        return st_err_set(err, ST_ERR_IO, "%s: cannot create file", path);
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(hdr, 1, hl, f) == hl;
    for (size_t i = hl; i < padded && ok; i++) ok = fputc(' ', f) != EOF;
    free(hdr);
    for (size_t i = 0; i < n && ok; i++) {
        uint64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++) numel *= (uint64_t)t[i].shape[d];
        size_t nb = (size_t)(numel * (uint64_t)sft_dtype_bits(t[i].dtype) / 8);
        ok = nb == 0 || fwrite(t[i].data, 1, nb, f) == nb;
    }
    if (fclose(f) != 0) ok = 0;
    if (!ok) return st_err_set(err, ST_ERR_IO, "%s: write failed (disk full?)", path);
    return ST_OK;
}
