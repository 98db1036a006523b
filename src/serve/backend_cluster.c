/* backend_cluster.c — a sequence-level serve_backend over the cluster coordinator.
 *
 * The nodes hold the weights; this process holds only the tokenizer and the chat template
 * (read from the model directory, which has the same path on every node) and the
 * coordinator. The scheduler thread submits whole requests and polls for token ids
 * (coord_submit / coord_poll, see strata/cluster.h); the last stage samples with the
 * request's parameters. What the stage cannot do is refused with 400 by the scheduler:
 * logit_bias and logprobs (only token ids come back). Penalties see the generated tokens
 * only (the stage's sampler has no prompt history), so repetition_penalty differs from the
 * local backend, which also counts the prompt.
 *
 * /v1/cluster and /metrics are answered on HTTP threads from snapshots that the scheduler
 * thread refreshes after every poll (the coordinator itself is not locked).
 */
#include "serve_internal.h"

#include "strata/cluster.h"
#include "strata/jinja.h"
#include "strata/stop.h"

#include <stdlib.h>
#include <string.h>

typedef struct cluster_backend {
    serve_backend b;
    coord *c;
    tok_tokenizer *tok;
    chat_template *tmpl;       /* NULL: the model has no chat template                       */
    pthread_mutex_t render_mu; /* chat templates are rendered one at a time                  */
    /* snapshots for the HTTP threads (snap_mu) */
    pthread_mutex_t snap_mu;
    coord_info info;
    coord_totals tot;
    coord_plan_info plan;
    int n_active, n_queued;
    /* the poll in progress (scheduler thread) */
    serve_seq_fn fn;
    void *ud;
} cluster_backend;

// ---------------------------------------------------------------------------------------------
// text

static int cb_render(serve_backend *b, const json_t *messages, const json_t *extra, char **out, st_err *err) {
    cluster_backend *cb = b->self;
    *out = NULL;
    if (!cb->tmpl) return st_err_set(err, ST_ERR_MISSING, "the model has no chat template");
    pthread_mutex_lock(&cb->render_mu);
    int rc = chat_template_render(cb->tmpl, messages, 1, extra, NULL, out, err);
    pthread_mutex_unlock(&cb->render_mu);
    return rc;
}

static int cb_tokenize(serve_backend *b, const char *text, int add_special, int32_t **ids, size_t *n, st_err *err) {
    cluster_backend *cb = b->self;
    return tok_encode(cb->tok, text, strlen(text), add_special, ids, n, err);
}

// ---------------------------------------------------------------------------------------------
// sequences (scheduler thread)

/* Copies what the HTTP threads may ask for (after coord_init and after every poll). */
static void snapshot(cluster_backend *cb) {
    pthread_mutex_lock(&cb->snap_mu);
    coord_get_info(cb->c, &cb->info);
    coord_get_totals(cb->c, &cb->tot);
    coord_get_plan(cb->c, &cb->plan);
    cb->n_active = coord_n_active(cb->c);
    cb->n_queued = coord_n_queued(cb->c);
    pthread_mutex_unlock(&cb->snap_mu);
}

static int cb_submit(serve_backend *b, const serve_seq_req *r, uint64_t *id, st_err *err) {
    cluster_backend *cb = b->self;
    coord_seq_req q = {.prompt = r->prompt, .n_prompt = r->n_prompt, .params = *r->sampling,
                       .max_tokens = r->max_tokens, .eos = r->eos, .n_eos = r->n_eos};
    return coord_submit(cb->c, &q, id, err);
}

static void cb_cancel(serve_backend *b, uint64_t id) {
    cluster_backend *cb = b->self;
    coord_cancel(cb->c, id);
}

/* coord_poll's events -> the scheduler's serve_seq_fn (a TOKEN that ends the sequence carries
 * done = 1; the DONE that follows it is then ignored by the scheduler). */
static void on_event(void *ud, const coord_event *ev) {
    cluster_backend *cb = ud;
    if (ev->kind == COORD_EV_TOKEN) cb->fn(cb->ud, ev->id, ev->token, ev->last, NULL);
    else
        cb->fn(cb->ud, ev->id, -1, 1,
               ev->finish == COORD_FINISH_ERROR ? (ev->msg ? ev->msg : "the cluster failed") : NULL);
}

static int cb_poll(serve_backend *b, int timeout_ms, serve_seq_fn fn, void *ud, st_err *err) {
    cluster_backend *cb = b->self;
    cb->fn = fn, cb->ud = ud;
    int rc = coord_poll(cb->c, timeout_ms, on_event, cb, err);
    cb->fn = NULL, cb->ud = NULL;
    snapshot(cb);
    return rc;
}

static void cb_wake(serve_backend *b) {
    cluster_backend *cb = b->self;
    coord_wake(cb->c);
}

// ---------------------------------------------------------------------------------------------
// GET /v1/cluster and /metrics

/* GET /v1/cluster (HTTP thread, from the snapshot): one node per stage with its device,
 * memory and layer range, the plan, the data links between stages with their mean hop time,
 * and the coordinator's counters. New reference. */
static json_t *cb_cluster(serve_backend *b) {
    cluster_backend *cb = b->self;
    pthread_mutex_lock(&cb->snap_mu);
    const coord_info *in = &cb->info;
    json_t *nodes = json_array(), *stages = json_array(), *links = json_array();
    int64_t w_all = 0, kv_all = 0;
    for (int s = 0; s < in->n_stages; s++) {
        const coord_stage_info *st = &in->stage[s];
        char name[32];
        snprintf(name, sizeof name, "stage%d", s);
        json_t *dev = json_pack("{s:s, s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:I}", "kind", "cpu", "name", "CPU",
                                "threads", st->cores, "memory_total", (json_int_t)st->mem_total, "memory_available",
                                (json_int_t)st->mem_free, "memory_used", (json_int_t)(st->mem_total - st->mem_free),
                                "weights_bytes", (json_int_t)st->weight_bytes, "kv_bytes", (json_int_t)st->kv_bytes,
                                "rss_bytes", (json_int_t)st->rss_bytes);
        json_array_append_new(nodes, json_pack("{s:s, s:s, s:s, s:s, s:i, s:[o], s:{s:i, s:i}, s:b, s:b}", "id",
                                               st->node_id, "name", st->addr, "host", st->host, "role", "stage",
                                               "stage", s, "devices", dev, "layers", "begin", st->layer_begin, "end",
                                               st->layer_end, "embed", st->with_embed, "output", st->with_output));
        json_array_append_new(stages, json_pack("{s:s, s:s, s:i, s:i, s:i}", "node", st->addr, "node_id", st->node_id,
                                                "layer_begin", st->layer_begin, "layer_end", st->layer_end, "tp", 1));
        int nx = (s + 1) % in->n_stages;
        double hop_ms = cb->tot.n_hop[s] ? 1e3 * cb->tot.hop_s[s] / (double)cb->tot.n_hop[s] : 0;
        if (in->n_stages > 1)
            json_array_append_new(links, json_pack("{s:s, s:s, s:s, s:s, s:f}", "from", st->addr, "to",
                                                   in->stage[nx].addr, "kind", st->next_kind[0] ? st->next_kind : "?",
                                                   "carries", nx == 0 ? "token ids" : "activations", "mean_ms", hop_ms));
        w_all += (int64_t)st->weight_bytes, kv_all += (int64_t)st->kv_bytes;
    }
    json_t *plan = json_pack("{s:s, s:i, s:i, s:o, s:b, s:I}", "model", b->info.model_id, "n_layer", in->n_layer, "tp",
                             1, "stages", stages, "planned", cb->plan.planned, "epoch", (json_int_t)in->epoch);
    if (cb->plan.planned) json_object_set_new(plan, "predicted_tok_s", json_real(cb->plan.predicted_tok_s));
    json_t *mem = json_pack("{s:I, s:I, s:i, s:i}", "weights_bytes", (json_int_t)w_all, "kv_bytes", (json_int_t)kv_all,
                            "kv_slots", in->n_slots, "ctx_per_slot", in->max_ctx);
    json_t *co = json_pack("{s:i, s:i, s:i, s:i, s:I, s:I, s:f}", "peers", in->n_peers, "alive", in->n_alive,
                           "sequences_running", cb->n_active, "sequences_queued", cb->n_queued, "tokens",
                           (json_int_t)cb->tot.n_tokens, "recoveries", (json_int_t)cb->tot.n_recoveries,
                           "recovery_seconds", cb->tot.recovery_s);
    pthread_mutex_unlock(&cb->snap_mu);
    return json_pack("{s:s, s:o, s:o, s:o, s:o, s:o}", "mode", "cluster", "nodes", nodes, "links", links, "plan",
                     plan, "memory", mem, "coordinator", co);
}

/* /metrics lines (HTTP thread, from the snapshot): per-stage compute and per-hop transfer
 * summaries over decode steps (the dashboard divides _sum by _count), tokens, recoveries. */
static void cb_metrics(serve_backend *b, char **buf, size_t *len, size_t *cap) {
    cluster_backend *cb = b->self;
    sbuf o = {*buf, *len, *cap};
    pthread_mutex_lock(&cb->snap_mu);
    const coord_info *in = &cb->info;
    const coord_totals *t = &cb->tot;
    sbuf_printf(&o, "# HELP strata_stage_compute_seconds Compute per decode step on each pipeline stage.\n"
                    "# TYPE strata_stage_compute_seconds summary\n");
    for (int s = 0; s < in->n_stages; s++)
        sbuf_printf(&o,
                    "strata_stage_compute_seconds_sum{stage=\"%d\",node=\"%s\"} %.6f\n"
                    "strata_stage_compute_seconds_count{stage=\"%d\",node=\"%s\"} %llu\n",
                    s, in->stage[s].addr, t->compute_s[s], s, in->stage[s].addr,
                    (unsigned long long)t->n_decode_steps);
    if (in->n_stages > 1) {
        sbuf_printf(&o, "# HELP strata_hop_seconds Transfer time per pipeline hop (activations i -> i+1, token "
                        "id last -> 0).\n"
                        "# TYPE strata_hop_seconds summary\n");
        for (int s = 0; s < in->n_stages; s++) {
            int nx = (s + 1) % in->n_stages;
            sbuf_printf(&o,
                        "strata_hop_seconds_sum{hop=\"%d->%d\"} %.6f\n"
                        "strata_hop_seconds_count{hop=\"%d->%d\"} %llu\n",
                        s, nx, t->hop_s[s], s, nx, (unsigned long long)t->n_hop[s]);
        }
    }
    sbuf_printf(&o,
                "# HELP strata_cluster_tokens_total Tokens the last stage sent back.\n"
                "# TYPE strata_cluster_tokens_total counter\n"
                "strata_cluster_tokens_total %llu\n"
                "# HELP strata_cluster_recoveries_total Re-plans after node loss or a stalled pipeline.\n"
                "# TYPE strata_cluster_recoveries_total counter\n"
                "strata_cluster_recoveries_total %llu\n"
                "# HELP strata_cluster_nodes_alive Nodes answering heartbeats.\n"
                "# TYPE strata_cluster_nodes_alive gauge\n"
                "strata_cluster_nodes_alive %d\n"
                "# HELP strata_cluster_stages Pipeline stages in the current plan.\n"
                "# TYPE strata_cluster_stages gauge\n"
                "strata_cluster_stages %d\n",
                (unsigned long long)t->n_tokens, (unsigned long long)t->n_recoveries, in->n_alive, in->n_stages);
    pthread_mutex_unlock(&cb->snap_mu);
    *buf = o.p;
    *len = o.len;
    *cap = o.cap;
}

// ---------------------------------------------------------------------------------------------
// open / free

static void cb_free(serve_backend *b) {
    if (!b) return;
    cluster_backend *cb = b->self;
    coord_free(cb->c);
    tok_free(cb->tok);
    chat_template_free(cb->tmpl);
    pthread_mutex_destroy(&cb->render_mu);
    pthread_mutex_destroy(&cb->snap_mu);
    free(cb);
}

static void add_eos(serve_backend_info *in, int32_t id) {
    if (id < 0 || id >= in->n_vocab) return;
    for (int i = 0; i < in->n_eos; i++)
        if (in->eos[i] == id) return;
    if (in->n_eos < SERVE_MAX_EOS) in->eos[in->n_eos++] = id;
}

int serve_backend_cluster_open(serve_backend **out, const char *model_dir, const serve_cluster_opts *opts,
                               st_err *err) {
    *out = NULL;
    serve_cluster_opts o = {0};
    if (opts) o = *opts;
    if (!o.peers || !*o.peers) return st_err_set(err, ST_ERR_ARG, "--peers: no nodes given");
    if (!model_dir || !st_path_exists(model_dir))
        return st_err_set(err, ST_ERR_ARG, "%s: not a model directory (a cluster serves a directory with the same path "
                                           "on every node)",
                          model_dir ? model_dir : "(none)");
    cluster_backend *cb = calloc(1, sizeof *cb);
    if (!cb) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    pthread_mutex_init(&cb->render_mu, NULL);
    pthread_mutex_init(&cb->snap_mu, NULL);
    serve_backend *b = &cb->b;
    b->self = cb;
    b->render_chat = cb_render;
    b->tokenize = cb_tokenize;
    b->seq_submit = cb_submit;
    b->seq_cancel = cb_cancel;
    b->seq_poll = cb_poll;
    b->seq_wake = cb_wake;
    b->cluster_json = cb_cluster;
    b->metrics_text = cb_metrics;
    b->free = cb_free;
    int rc = ST_OK;
    model_desc d = {0};
    char *tj = st_path_join(model_dir, "tokenizer.json"), *tc = st_path_join(model_dir, "tokenizer_config.json");
    if (!tj || !tc) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto fail;
    }
    /* text first: a missing tokenizer fails before any node loads anything */
    if (!st_path_exists(tj)) {
        rc = st_err_set(err, ST_ERR_MISSING, "%s has no tokenizer.json: serving needs text", model_dir);
        goto fail;
    }
    if ((rc = tok_load(&cb->tok, tj, err))) goto fail;
    b->tok = cb->tok;
    if (st_path_exists(tc)) {
        st_err terr = {0};
        int r = chat_template_load(&cb->tmpl, tc, &terr);
        if (r && r != ST_ERR_MISSING) {
            *err = terr;
            rc = r;
            goto fail;
        }
    }
    if ((rc = model_desc_load(&d, model_dir, err))) goto fail;
    serve_backend_info *in = &b->info;
    in->n_vocab = (int)d.n_vocab;
    in->has_template = cb->tmpl != NULL;
    /* EOS ids, as engine_open collects them */
    for (int i = 0; i < d.n_eos; i++) add_eos(in, d.eos_ids[i]);
    int32_t ids[16];
    int n = 0;
    st_err e2 = {0};
    if (!stop_load_eos(model_dir, ids, 16, &n, &e2))
        for (int i = 0; i < n; i++) add_eos(in, ids[i]);
    if (cb->tmpl) {
        const char *turn_ends[] = {"<|im_end|>", "<|eot_id|>", "[e~[", NULL};
        for (int i = 0; turn_ends[i]; i++) add_eos(in, tok_token_id(cb->tok, turn_ends[i]));
    }
    int max_ctx = o.max_ctx > 0 ? o.max_ctx : (int)(d.max_pos > 0 && d.max_pos < 4096 ? d.max_pos : 4096);
    if (d.max_pos > 0 && max_ctx > d.max_pos) {
        rc = st_err_set(err, ST_ERR_ARG, "context %d exceeds the model's max_position_embeddings %lld", max_ctx,
                        (long long)d.max_pos);
        goto fail;
    }
    coord_opts co = {.model_dir = model_dir, .peers = o.peers, .cluster_key = o.cluster_key, .n_stages = o.n_stages,
                     .max_ctx = max_ctx, .n_slots = o.n_slots > 0 ? o.n_slots : 4, .max_batch = o.max_batch,
                     .n_threads = o.n_threads, .xport_pref = o.xport_pref, .nccl = o.nccl};
    if ((rc = coord_init(&cb->c, &co, err))) goto fail;
    in->max_ctx = max_ctx;
    in->n_slots = co.n_slots;
    in->max_batch = o.max_batch > 0 ? o.max_batch : 64;
    if (coord_n_vocab(cb->c) != in->n_vocab) {
        rc = st_err_set(err, ST_ERR_INTERNAL, "vocabulary %d on the nodes, %d here", coord_n_vocab(cb->c), in->n_vocab);
        goto fail;
    }
    if (tok_vocab_size(cb->tok) > in->n_vocab)
        ST_WARN("serve: the tokenizer has %d ids but the model only %d: prompts with ids beyond the model's vocabulary "
                "are rejected",
                tok_vocab_size(cb->tok), in->n_vocab);
    if (o.model_name) snprintf(in->model_id, sizeof in->model_id, "%s", o.model_name);
    else {
        size_t L = strlen(model_dir);
        while (L > 1 && model_dir[L - 1] == '/') L--;
        const char *p = model_dir + L;
        while (p > model_dir && p[-1] != '/') p--;
        snprintf(in->model_id, sizeof in->model_id, "%.*s", (int)(model_dir + L - p), p);
    }
    snapshot(cb);
    model_desc_free(&d);
    free(tj), free(tc);
    *out = b;
    return ST_OK;
fail:
    model_desc_free(&d);
    free(tj), free(tc);
    cb_free(b);
    return rc;
}
