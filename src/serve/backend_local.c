/* backend_local.c — serve_backend over a local engine (one process, one model_ctx).
 *
 * The engine owns the model, the KV cache and the chat template; this file adds what the
 * batching scheduler needs that engine.h does not expose: the tokenizer for streaming
 * detokenisation and the EOS ids (both resolved exactly as engine_open resolves them), and the
 * single-node /v1/cluster description.
 */
#include "serve_internal.h"

#include "strata/engine.h"
#include "strata/hub.h"
#include "strata/stop.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct local_backend {
    serve_backend b;
    engine *e;
    tok_tokenizer *tok;        /* own copy of the engine's tokenizer (see the file comment) */
    pthread_mutex_t render_mu; /* chat templates are rendered one at a time                  */
    char host[128];
} local_backend;

static int lb_render(serve_backend *b, const json_t *messages, const json_t *extra, char **out, st_err *err) {
    local_backend *lb = b->self;
    pthread_mutex_lock(&lb->render_mu);
    int rc = engine_render_chat(lb->e, messages, 1, extra, out, err);
    pthread_mutex_unlock(&lb->render_mu);
    return rc;
}

static int lb_tokenize(serve_backend *b, const char *text, int add_special, int32_t **ids, size_t *n, st_err *err) {
    local_backend *lb = b->self;
    return engine_tokenize(lb->e, text, add_special, ids, n, err);
}

static int lb_forward(serve_backend *b, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                      float *logits, logits_mode mode, st_err *err) {
    local_backend *lb = b->self;
    return model_forward(engine_ctx(lb->e), tokens, pos, slot, T, logits, mode, err);
}

/* MemTotal / MemAvailable from /proc/meminfo, bytes (0 if unknown). */
static void meminfo(int64_t *total, int64_t *avail) {
    *total = *avail = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return;
    char line[256];
    long long kb;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemTotal: %lld kB", &kb) == 1) *total = kb * 1024;
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) *avail = kb * 1024;
    }
    fclose(f);
}

static void cpu_name(char *out, size_t cap) {
    snprintf(out, cap, "CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "model name", 10)) {
            char *c = strchr(line, ':');
            if (c) {
                c++;
                while (*c == ' ') c++;
                c[strcspn(c, "\n")] = 0;
                snprintf(out, cap, "%s", c);
            }
            break;
        }
    }
    fclose(f);
}

static json_t *lb_cluster(serve_backend *b) {
    local_backend *lb = b->self;
    const model *m = engine_model(lb->e);
    model_ctx *c = engine_ctx(lb->e);
    int64_t total, avail;
    meminfo(&total, &avail);
    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    size_t kv = model_ctx_kv_bytes(c);
    uint64_t fwd_ns = 0, n_fwd = 0;
    model_ctx_timers(c, &fwd_ns, &n_fwd);
    json_t *dev = json_pack("{s:s, s:s, s:i, s:I, s:I, s:I, s:I, s:I}", "kind", "cpu", "name", cpu, "threads",
                            st_pool_threads(model_ctx_pool(c)), "memory_total", (json_int_t)total, "memory_available",
                            (json_int_t)avail, "memory_used", (json_int_t)(total - avail), "weights_bytes",
                            (json_int_t)m->weight_bytes, "kv_bytes", (json_int_t)kv);
    json_t *node = json_pack("{s:s, s:s, s:s, s:s, s:[o], s:{s:i, s:i}, s:b, s:b, s:{s:I, s:f}}", "id", "local",
                             "name", "local", "host",
                             lb->host, "role", "coordinator", "devices", dev, "layers", "begin", 0, "end",
                             m->desc.n_layer, "embed", 1, "output", 1, "forward", "calls", (json_int_t)n_fwd,
                             "seconds", fwd_ns / 1e9);
    json_t *plan = json_pack("{s:s, s:s, s:i, s:i, s:[{s:s, s:i, s:i, s:i}]}", "model", b->info.model_id, "arch",
                             m->desc.model_type, "n_layer", m->desc.n_layer, "tp", 1, "stages", "node", "local",
                             "layer_begin", 0, "layer_end", m->desc.n_layer, "tp", 1);
    json_t *mem = json_pack("{s:I, s:I, s:I, s:i, s:i}", "weights_bytes", (json_int_t)m->weight_bytes, "kv_bytes",
                            (json_int_t)kv, "kv_bytes_per_token",
                            (json_int_t)(model_desc_kv_bytes_per_token(&m->desc, model_ctx_kv_elem_bytes(c)) * (size_t)m->desc.n_layer),
                            "kv_slots", b->info.n_slots, "ctx_per_slot", b->info.max_ctx);
    return json_pack("{s:s, s:[o], s:[], s:o, s:o}", "mode", "single-node", "nodes", node, "links", "plan", plan,
                     "memory", mem);
}

static void lb_metrics(serve_backend *b, char **buf, size_t *len, size_t *cap) {
    local_backend *lb = b->self;
    uint64_t ns = 0, n = 0;
    model_ctx_timers(engine_ctx(lb->e), &ns, &n);
    sbuf o = {*buf, *len, *cap};
    sbuf_printf(&o,
                "# HELP strata_node_forward_seconds_total Wall time in forward chunks per node.\n"
                "# TYPE strata_node_forward_seconds_total counter\n"
                "strata_node_forward_seconds_total{node=\"local\"} %.6f\n"
                "# HELP strata_node_forward_calls_total Forward chunks per node.\n"
                "# TYPE strata_node_forward_calls_total counter\n"
                "strata_node_forward_calls_total{node=\"local\"} %llu\n",
                ns / 1e9, (unsigned long long)n);
    *buf = o.p;
    *len = o.len;
    *cap = o.cap;
}

static void lb_free(serve_backend *b) {
    if (!b) return;
    local_backend *lb = b->self;
    engine_free(lb->e);
    tok_free(lb->tok);
    pthread_mutex_destroy(&lb->render_mu);
    free(lb);
}

static void add_eos(serve_backend_info *in, int32_t id) {
    if (id < 0 || id >= in->n_vocab) return;
    for (int i = 0; i < in->n_eos; i++)
        if (in->eos[i] == id) return;
    if (in->n_eos < SERVE_MAX_EOS) in->eos[in->n_eos++] = id;
}

int serve_backend_local_open(serve_backend **out, const char *spec, const serve_local_opts *opts, st_err *err) {
    *out = NULL;
    serve_local_opts o = {0};
    if (opts) o = *opts;
    local_backend *lb = calloc(1, sizeof *lb);
    if (!lb) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    pthread_mutex_init(&lb->render_mu, NULL);
    gethostname(lb->host, sizeof lb->host - 1);
    serve_backend *b = &lb->b;
    b->self = lb;
    b->render_chat = lb_render;
    b->tokenize = lb_tokenize;
    b->forward = lb_forward;
    b->cluster_json = lb_cluster;
    b->metrics_text = lb_metrics;
    b->free = lb_free;
    char *dir = NULL;
    int rc = ST_OK;
    engine_opts eo = {.tokenizer_dir = o.tokenizer_dir, .synthetic = o.synthetic, .max_ctx = o.max_ctx,
                      .n_slots = o.n_slots, .n_threads = o.n_threads, .offline = o.offline};
    if ((rc = engine_open(&lb->e, spec, &eo, err))) goto fail;
    if (!o.synthetic) {
        hub_opts ho = {.offline = 1, .no_progress = 1}; /* engine_open already fetched it */
        if ((rc = hub_resolve(spec, &ho, &dir, err))) goto fail;
    }
    const char *tdir = o.tokenizer_dir ? o.tokenizer_dir : dir;
    if (!engine_has_tokenizer(lb->e) || !tdir) {
        rc = st_err_set(err, ST_ERR_MISSING,
                        "%s has no tokenizer.json: serving needs text (use --tokenizer DIR with a tokenizer.json)",
                        spec ? spec : o.synthetic);
        goto fail;
    }
    char *tj = st_path_join(tdir, "tokenizer.json");
    rc = tj ? tok_load(&lb->tok, tj, err) : st_err_set(err, ST_ERR_NOMEM, "out of memory");
    free(tj);
    if (rc) goto fail;
    b->tok = lb->tok;
    const model *m = engine_model(lb->e);
    serve_backend_info *in = &b->info;
    in->n_vocab = m->desc.n_vocab;
    in->max_ctx = engine_max_ctx(lb->e);
    in->n_slots = model_ctx_get_opts(engine_ctx(lb->e))->n_slots;
    in->max_batch = 256;
    in->has_template = engine_has_template(lb->e);
    /* EOS ids, as engine_open collects them */
    for (int i = 0; i < m->desc.n_eos; i++) add_eos(in, m->desc.eos_ids[i]);
    if (dir) {
        int32_t ids[16];
        int n = 0;
        st_err e2 = {0};
        if (!stop_load_eos(dir, ids, 16, &n, &e2))
            for (int i = 0; i < n; i++) add_eos(in, ids[i]);
    }
    if (in->has_template) {
        const char *turn_ends[] = {"<|im_end|>", "<|eot_id|>", "[e~[", NULL};
        for (int i = 0; turn_ends[i]; i++) add_eos(in, tok_token_id(lb->tok, turn_ends[i]));
    }
    if (tok_vocab_size(lb->tok) > in->n_vocab)
        ST_WARN("serve: the tokenizer has %d ids but the model only %d: prompts with ids beyond the model's vocabulary "
                "are rejected",
                tok_vocab_size(lb->tok), in->n_vocab);
    /* model name: --model-name, else the directory's (or preset's) base name */
    const char *name = o.model_name;
    if (!name) {
        name = o.synthetic ? o.synthetic : spec;
        /* hub ids keep their org/name; local paths become their last component */
        if (!o.synthetic && st_path_exists(spec)) {
            size_t L = strlen(spec);
            while (L > 1 && spec[L - 1] == '/') L--;
            const char *p = spec + L;
            while (p > spec && p[-1] != '/') p--;
            snprintf(in->model_id, sizeof in->model_id, "%.*s", (int)(spec + L - p), p);
            name = NULL;
        }
    }
    if (name) snprintf(in->model_id, sizeof in->model_id, "%s", name);
    free(dir);
    *out = b;
    return ST_OK;
fail:
    free(dir);
    lb_free(b);
    return rc;
}
