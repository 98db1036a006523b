/* cluster_json.c — cluster.json -> plan_cluster (see plan.h; the format: docs/cluster-json.md).
 *
 * Quantities carry their units ("128 GiB", "546 GB/s", "80 Gbit/s", "30 us", "17 TFLOPS");
 * bare numbers are base units (bytes, bytes/s, seconds, FLOP/s). Unknown keys are errors so a
 * typo ("bandwith") cannot silently drop a figure. Links: "default_link" applies to every
 * pair of devices on different nodes, a node's "intra_link" (default 10 us, 25 GB/s) to its own
 * devices, then each entry of "links" in order ("between" sets both directions, "from"/"to"
 * one); endpoints name a node (all its devices) or "node/device".
 */
#include "strata/plan.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_OVERHEAD (1ull << 30) /* 1 GiB runtime: code, contexts, thread stacks, transport rings */
#define DEFAULT_THREADS 8
#define DEFAULT_INTRA_LATENCY 10e-6
#define DEFAULT_INTRA_BANDWIDTH 25e9

// ----------------------------------------------------------------------------
// quantities with units

typedef struct unit_def {
    const char *name;
    double scale;
} unit_def;

static const unit_def g_mem_units[] = {{"", 1},         {"B", 1},           {"KB", 1e3},        {"MB", 1e6},
                                       {"GB", 1e9},     {"TB", 1e12},       {"KiB", 1024.0},    {"MiB", 1048576.0},
                                       {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}, {NULL, 0}};
static const unit_def g_bw_units[] = {{"", 1},          {"B/s", 1},         {"KB/s", 1e3},      {"MB/s", 1e6},
                                      {"GB/s", 1e9},    {"TB/s", 1e12},     {"KiB/s", 1024.0},  {"MiB/s", 1048576.0},
                                      {"GiB/s", 1073741824.0}, {"bit/s", 0.125}, {"Kbit/s", 125.0}, {"Mbit/s", 125e3},
                                      {"Gbit/s", 125e6}, {"Tbit/s", 125e9}, {"Kb/s", 125.0},    {"Mb/s", 125e3},
                                      {"Gb/s", 125e6},  {"Tb/s", 125e9},    {NULL, 0}};
static const unit_def g_time_units[] = {{"", 1},           {"s", 1},    {"ms", 1e-3}, {"us", 1e-6},
                                        {"\xC2\xB5s", 1e-6}, {"ns", 1e-9}, {NULL, 0}};
static const unit_def g_flops_units[] = {{"", 1},          {"FLOPS", 1},       {"FLOP/s", 1},      {"GFLOPS", 1e9},
                                         {"GFLOP/s", 1e9}, {"TFLOPS", 1e12},   {"TFLOP/s", 1e12},  {"PFLOPS", 1e15},
                                         {"PFLOP/s", 1e15}, {NULL, 0}};

int plan_parse_quantity(const char *s, char kind, double *out) {
    const unit_def *u = kind == 'm' ? g_mem_units : kind == 'b' ? g_bw_units : kind == 't' ? g_time_units
                      : kind == 'f' ? g_flops_units : NULL;
    if (!u || !s) return -1;
    char *end;
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || v < 0) return -1;
    while (*end == ' ') end++;
    size_t n = strlen(end);
    while (n && end[n - 1] == ' ') n--;
    for (; u->name; u++)
        if (strlen(u->name) == n && !strncmp(u->name, end, n)) {
            *out = v * u->scale;
            return 0;
        }
    return -1;
}

// ----------------------------------------------------------------------------
// parsing

typedef struct cl_ctx {
    const char *what;
    st_err *err;
} cl_ctx;

/* Fails with the field path if obj has a key outside `allowed` (NULL-terminated). */
static int check_keys(cl_ctx *c, json_t *obj, const char *field, const char *const *allowed) {
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++) ok |= !strcmp(*a, key);
        if (!ok) return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: unknown key \"%s\"", c->what, field, key);
    }
    return ST_OK;
}

/* Reads quantity `key` of obj (a number in base units or a string with units). */
static int get_qty(cl_ctx *c, json_t *obj, const char *field, const char *key, char kind, int required, double def,
                   double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (required) return st_err_set(c->err, ST_ERR_MISSING, "%s: %s: missing \"%s\"", c->what, field, key);
        *out = def;
        return ST_OK;
    }
    if (json_is_number(v)) {
        *out = json_number_value(v);
        if (*out < 0 || !isfinite(*out))
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.%s: must not be negative", c->what, field, key);
        return ST_OK;
    }
    if (!json_is_string(v) || plan_parse_quantity(json_string_value(v), kind, out))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.%s: \"%s\" is not a %s (e.g. %s)", c->what, field, key,
                          json_is_string(v) ? json_string_value(v) : "?",
                          kind == 'm' ? "memory size" : kind == 'b' ? "bandwidth" : kind == 't' ? "time" : "throughput",
                          kind == 'm'   ? "\"128 GiB\""
                          : kind == 'b' ? "\"546 GB/s\" or \"80 Gbit/s\""
                          : kind == 't' ? "\"30 us\""
                                        : "\"17 TFLOPS\"");
    return ST_OK;
}

/* Reads string `key` of obj into out (a name: non-empty, shorter than cap, no '/'); `def` when
 * absent and not required. */
static int get_name(cl_ctx *c, json_t *obj, const char *field, const char *key, int required, const char *def, char *out,
                    size_t cap) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (required) return st_err_set(c->err, ST_ERR_MISSING, "%s: %s: missing \"%s\"", c->what, field, key);
        snprintf(out, cap, "%s", def);
        return ST_OK;
    }
    if (!json_is_string(v) || !json_string_length(v) || json_string_length(v) >= cap || strchr(json_string_value(v), '/'))
        return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.%s: must be a non-empty string of < %zu characters without '/'",
                          c->what, field, key, cap);
    snprintf(out, cap, "%s", json_string_value(v));
    return ST_OK;
}

/* Parses a {"latency", "bandwidth"} object. */
static int get_link(cl_ctx *c, json_t *obj, const char *field, plan_link *l) {
    static const char *const keys[] = {"latency", "bandwidth", "between", "from", "to", "description", "notes", NULL};
    if (!json_is_object(obj)) return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: must be an object", c->what, field);
    int rc = check_keys(c, obj, field, keys);
    if (!rc) rc = get_qty(c, obj, field, "latency", 't', 1, 0, &l->latency);
    if (!rc) rc = get_qty(c, obj, field, "bandwidth", 'b', 1, 0, &l->bandwidth);
    if (!rc && !(l->bandwidth > 0))
        rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.bandwidth: must be positive", c->what, field);
    return rc;
}

/* Marks in sel[] the devices an endpoint names ("node" or "node/device"); 0 if none match. */
static int select_endpoint(const plan_cluster *cl, const char *ep, uint8_t *sel) {
    const char *slash = strchr(ep, '/');
    size_t nl = slash ? (size_t)(slash - ep) : strlen(ep);
    int n = 0;
    for (int i = 0; i < cl->n_dev; i++) {
        sel[i] = strlen(cl->dev[i].node) == nl && !strncmp(cl->dev[i].node, ep, nl) &&
                 (!slash || !strcmp(cl->dev[i].name, slash + 1));
        n += sel[i];
    }
    return n;
}

/* Sets link l from every device marked in a to every device marked in b (not to itself). */
static void set_links(plan_cluster *cl, const uint8_t *a, const uint8_t *b, const plan_link *l) {
    for (int i = 0; i < cl->n_dev; i++)
        for (int j = 0; j < cl->n_dev; j++)
            if (a[i] && b[j] && i != j) cl->link[(size_t)i * (size_t)cl->n_dev + (size_t)j] = *l;
}

/* Parses nodes[].devices[index] of node `node` into d; defaults: name "devN", kind gpu,
 * flops 0 (unknown), overhead 1 GiB, threads 8. */
static int parse_device(cl_ctx *c, json_t *jd, const char *field, const char *node, int index, plan_device *d) {
    static const char *const keys[] = {"name",    "kind",    "memory",      "bandwidth", "flops",
                                       "overhead", "threads", "description", "notes",     NULL};
    if (!json_is_object(jd)) return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: must be an object", c->what, field);
    int rc = check_keys(c, jd, field, keys);
    char def[16];
    snprintf(def, sizeof def, "dev%d", index);
    snprintf(d->node, sizeof d->node, "%s", node);
    if (!rc) rc = get_name(c, jd, field, "name", 0, def, d->name, sizeof d->name);
    if (!rc) rc = get_name(c, jd, field, "kind", 0, "gpu", d->kind, sizeof d->kind);
    if (!rc && strcmp(d->kind, "gpu") && strcmp(d->kind, "cpu") && strcmp(d->kind, "unified"))
        rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.kind: \"%s\" is not gpu, cpu or unified", c->what, field, d->kind);
    double mem = 0, ovh = 0;
    if (!rc) rc = get_qty(c, jd, field, "memory", 'm', 1, 0, &mem);
    if (!rc) rc = get_qty(c, jd, field, "bandwidth", 'b', 1, 0, &d->bandwidth);
    if (!rc) rc = get_qty(c, jd, field, "flops", 'f', 0, 0, &d->flops);
    if (!rc) rc = get_qty(c, jd, field, "overhead", 'm', 0, (double)DEFAULT_OVERHEAD, &ovh);
    if (rc) return rc;
    if (!(mem >= 1) || mem > 1e18) return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.memory: must be positive", c->what, field);
    if (!(d->bandwidth > 0)) return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.bandwidth: must be positive", c->what, field);
    d->memory = (uint64_t)mem;
    d->overhead = (uint64_t)ovh;
    d->threads = DEFAULT_THREADS;
    json_t *th = json_object_get(jd, "threads");
    if (th) {
        if (!json_is_integer(th) || json_integer_value(th) < 1 || json_integer_value(th) > 4096)
            return st_err_set(c->err, ST_ERR_FORMAT, "%s: %s.threads: must be an integer in [1, 4096]", c->what, field);
        d->threads = (int)json_integer_value(th);
    }
    return ST_OK;
}

/* Parses the whole description into cl: nodes and devices, then the links in the documented
 * order (default_link, intra_link, links[] in order). On failure cl may be partly filled; the
 * caller frees it. */
static int parse_root(cl_ctx *c, json_t *root, plan_cluster *cl) {
    static const char *const keys[] = {"name", "description", "notes", "nodes", "links", "default_link", NULL};
    static const char *const nkeys[] = {"name", "description", "notes", "devices", "intra_link", NULL};
    if (!json_is_object(root)) return st_err_set(c->err, ST_ERR_FORMAT, "%s: top level is not a JSON object", c->what);
    int rc = check_keys(c, root, "cluster", keys);
    if (!rc) rc = get_name(c, root, "cluster", "name", 0, "cluster", cl->name, sizeof cl->name);
    if (rc) return rc;
    json_t *nodes = json_object_get(root, "nodes");
    if (!json_is_array(nodes) || !json_array_size(nodes))
        return st_err_set(c->err, ST_ERR_MISSING, "%s: \"nodes\" must be a non-empty list", c->what);
    size_t ni;
    json_t *jn;
    int n_dev = 0;
    json_array_foreach(nodes, ni, jn) {
        json_t *devs = json_is_object(jn) ? json_object_get(jn, "devices") : NULL;
        if (!json_is_array(devs) || !json_array_size(devs))
            return st_err_set(c->err, ST_ERR_MISSING, "%s: nodes[%zu]: \"devices\" must be a non-empty list", c->what, ni);
        n_dev += (int)json_array_size(devs);
    }
    if (n_dev > PLAN_MAX_DEVICES)
        return st_err_set(c->err, ST_ERR_LIMIT, "%s: %d devices, at most %d are supported", c->what, n_dev, PLAN_MAX_DEVICES);
    cl->dev = calloc((size_t)n_dev, sizeof *cl->dev);
    cl->link = calloc((size_t)n_dev * (size_t)n_dev, sizeof *cl->link);
    if (!cl->dev || !cl->link) return st_err_set(c->err, ST_ERR_NOMEM, "out of memory");
    plan_link *intra = calloc(json_array_size(nodes), sizeof *intra);
    if (!intra) return st_err_set(c->err, ST_ERR_NOMEM, "out of memory");
    int *node_of = calloc((size_t)n_dev, sizeof *node_of);
    if (!node_of) {
        free(intra);
        return st_err_set(c->err, ST_ERR_NOMEM, "out of memory");
    }
    char field[96];
    json_array_foreach(nodes, ni, jn) {
        snprintf(field, sizeof field, "nodes[%zu]", ni);
        char nname[64];
        if ((rc = check_keys(c, jn, field, nkeys)) || (rc = get_name(c, jn, field, "name", 1, "", nname, sizeof nname))) break;
        for (int i = 0; i < cl->n_dev && !rc; i++)
            if (!strcmp(cl->dev[i].node, nname))
                rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: node name \"%s\" is used twice", c->what, field, nname);
        if (rc) break;
        intra[ni].latency = DEFAULT_INTRA_LATENCY;
        intra[ni].bandwidth = DEFAULT_INTRA_BANDWIDTH;
        json_t *il = json_object_get(jn, "intra_link");
        if (il) {
            snprintf(field, sizeof field, "nodes[%zu].intra_link", ni);
            if ((rc = get_link(c, il, field, &intra[ni]))) break;
        }
        size_t di;
        json_t *jd;
        int first = cl->n_dev;
        json_array_foreach(json_object_get(jn, "devices"), di, jd) {
            snprintf(field, sizeof field, "nodes[%zu].devices[%zu]", ni, di);
            plan_device *d = &cl->dev[cl->n_dev];
            if ((rc = parse_device(c, jd, field, nname, (int)di, d))) break;
            for (int i = first; i < cl->n_dev && !rc; i++)
                if (!strcmp(cl->dev[i].name, d->name))
                    rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: device name \"%s\" is used twice in node \"%s\"", c->what,
                                    field, d->name, nname);
            if (rc) break;
            node_of[cl->n_dev++] = (int)ni;
        }
        if (rc) break;
    }
    /* links: default, intra-node, then explicit entries in order */
    json_t *dl = json_object_get(root, "default_link");
    if (!rc && dl) {
        plan_link l;
        if (!(rc = get_link(c, dl, "default_link", &l)))
            for (int i = 0; i < cl->n_dev; i++)
                for (int j = 0; j < cl->n_dev; j++)
                    if (node_of[i] != node_of[j]) cl->link[(size_t)i * (size_t)cl->n_dev + (size_t)j] = l;
    }
    for (int i = 0; i < cl->n_dev && !rc; i++)
        for (int j = 0; j < cl->n_dev; j++)
            if (i != j && node_of[i] == node_of[j]) cl->link[(size_t)i * (size_t)cl->n_dev + (size_t)j] = intra[node_of[i]];
    free(intra);
    free(node_of);
    json_t *links = json_object_get(root, "links");
    if (!rc && links && !json_is_array(links)) rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: \"links\" must be a list", c->what);
    uint8_t a[PLAN_MAX_DEVICES], b[PLAN_MAX_DEVICES];
    size_t li;
    json_t *jl;
    if (!rc && links) json_array_foreach(links, li, jl) {
        snprintf(field, sizeof field, "links[%zu]", li);
        plan_link l;
        if ((rc = get_link(c, jl, field, &l))) break;
        json_t *bt = json_object_get(jl, "between"), *fr = json_object_get(jl, "from"), *to = json_object_get(jl, "to");
        const char *e0, *e1;
        int both;
        if (bt && !fr && !to && json_is_array(bt) && json_array_size(bt) == 2 && json_is_string(json_array_get(bt, 0)) &&
            json_is_string(json_array_get(bt, 1))) {
            e0 = json_string_value(json_array_get(bt, 0));
            e1 = json_string_value(json_array_get(bt, 1));
            both = 1;
        } else if (!bt && json_is_string(fr) && json_is_string(to)) {
            e0 = json_string_value(fr);
            e1 = json_string_value(to);
            both = 0;
        } else {
            rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: needs \"between\": [A, B] or \"from\": A, \"to\": B", c->what, field);
            break;
        }
        if (!select_endpoint(cl, e0, a) || !select_endpoint(cl, e1, b)) {
            rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: no node or device named \"%s\"", c->what, field,
                            select_endpoint(cl, e0, a) ? e1 : e0);
            break;
        }
        if (!strcmp(e0, e1)) {
            rc = st_err_set(c->err, ST_ERR_FORMAT, "%s: %s: a link needs two different endpoints", c->what, field);
            break;
        }
        set_links(cl, a, b, &l);
        if (both) set_links(cl, b, a, &l);
    }
    return rc;
}

int plan_cluster_parse(plan_cluster *c, const char *json, size_t len, const char *what, st_err *err) {
    memset(c, 0, sizeof *c);
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return st_err_set(err, ST_ERR_FORMAT, "%s: invalid JSON at line %d column %d: %s", what, je.line, je.column, je.text);
    cl_ctx cx = {what, err};
    int rc = parse_root(&cx, root, c);
    json_decref(root);
    if (rc) plan_cluster_free(c);
    return rc;
}

int plan_cluster_load(plan_cluster *c, const char *path, st_err *err) {
    memset(c, 0, sizeof *c);
    char *txt = NULL;
    size_t len = 0;
    int rc = st_file_read(path, &txt, &len, err);
    if (!rc) rc = plan_cluster_parse(c, txt, len, path, err);
    free(txt);
    return rc;
}

void plan_cluster_free(plan_cluster *c) {
    if (!c) return;
    free(c->dev);
    free(c->link);
    memset(c, 0, sizeof *c);
}
