/* http.c — the HTTP front end of `strata serve` (libmicrohttpd).
 *
 * Threads: MHD's listener thread accepts; every connection gets its own thread
 * (MHD_USE_THREAD_PER_CONNECTION), which parses the request, renders and tokenises the prompt,
 * submits it to the scheduler and then blocks: a non-streaming request waits in the access
 * handler, a streaming one in the response's content reader, both on the request's condition
 * variable with a 100 ms timeout. On each timeout the thread peeks at its socket: a closed
 * connection (EOF or error) cancels the generation, so a client that disconnects frees its KV
 * slot within ~100 ms even while it waits in the queue or during a long prefill. The response
 * free callback cancels as well (every other way a connection can end).
 *
 * Routes (auth: the /v1/ routes only, when keys are configured):
 *   GET  /  /index.html        the dashboard (embedded)
 *   GET  /health               200 ok | 503 loading | 503 error
 *   GET  /metrics              Prometheus text
 *   GET  /v1/models[/ID]       the served model
 *   GET  /v1/cluster           nodes, devices, links, plan, memory
 *   POST /v1/chat/completions  OpenAI chat (SSE with "stream": true)
 *   POST /v1/completions       OpenAI legacy completions
 */
#include "serve_internal.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#ifdef STRATA_HAVE_DASHBOARD
extern const unsigned char strata_dashboard_html[];
extern const size_t strata_dashboard_html_len;
#else
static const unsigned char strata_dashboard_html[] =
    "<!doctype html><title>strata</title><p>The dashboard was not embedded in this build.</p>";
static const size_t strata_dashboard_html_len = sizeof strata_dashboard_html - 1;
#endif

struct serve_server {
    serve_opts o;
    char **keys;
    int n_keys;
    struct MHD_Daemon *d;
    int port;
    serve_backend *_Atomic b;
    sched *sc;
    serve_metrics met;
    pthread_mutex_t mu;          /* load_error                                               */
    char load_error[512];
    atomic_uint_fast64_t seq;    /* completion ids                                           */
    int64_t created;
};

/* the endpoint the current thread is answering (for strata_requests_total's label): one
 * thread per connection, and every reply is queued from that thread */
static _Thread_local int tl_endpoint = MET_EP_OTHER;

/* per-connection state (MHD's con_cls) */
typedef struct conn {
    sbuf body;
    int too_big;
} conn;

/* a streaming response (the content reader's cls) */
typedef struct stream {
    serve_server *s;
    sreq *r;
    int kind, include_usage, fd;
    char model[256];
    int64_t created;
    sbuf out;
    size_t off;
    size_t text_offset;          /* legacy completions logprobs: bytes sent so far            */
    int finished;
} stream;

// ---------------------------------------------------------------------------------------------
// replies

static enum MHD_Result reply(serve_server *s, struct MHD_Connection *c, int status, const char *ctype, const char *body,
                             size_t len, int retry_after) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_after);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    metrics_count_status(&s->met, tl_endpoint, status);
    return rc;
}

static enum MHD_Result reply_json(serve_server *s, struct MHD_Connection *c, int status, json_t *obj) {
    char *txt = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!txt) return reply(s, c, 500, "text/plain", "out of memory\n", 14, 0);
    enum MHD_Result rc = reply(s, c, status, "application/json", txt, strlen(txt), 0);
    free(txt);
    return rc;
}

static enum MHD_Result reply_error(serve_server *s, struct MHD_Connection *c, const oai_error *e) {
    char *txt = oai_error_json(e);
    int retry = e->status == 429 ? 1 : e->status == 503 ? 5 : 0;
    enum MHD_Result rc = txt ? reply(s, c, e->status, "application/json", txt, strlen(txt), retry)
                             : reply(s, c, 500, "text/plain", "out of memory\n", 14, 0);
    free(txt);
    return rc;
}

/* 500 with an id that is also in the log */
static enum MHD_Result reply_internal(serve_server *s, struct MHD_Connection *c, const char *what) {
    char eid[32];
    snprintf(eid, sizeof eid, "err-%08x%04x", (unsigned)(st_time_ns() & 0xffffffffu), (unsigned)(rand() & 0xffff));
    ST_ERROR("serve: internal error, error id %s: %s", eid, what);
    oai_error e;
    oai_error_set(&e, 500, "server_error", NULL, NULL, "internal server error (error id %s; see the server log)", eid);
    return reply_error(s, c, &e);
}

static enum MHD_Result reply_loading(serve_server *s, struct MHD_Connection *c) {
    oai_error e;
    pthread_mutex_lock(&s->mu);
    if (s->load_error[0])
        oai_error_set(&e, 503, "server_error", NULL, "model_load_failed", "the model failed to load: %s", s->load_error);
    else
        oai_error_set(&e, 503, "server_error", NULL, "model_loading", "the model is loading; retry shortly");
    pthread_mutex_unlock(&s->mu);
    return reply_error(s, c, &e);
}

// ---------------------------------------------------------------------------------------------
// client liveness

/* 1 if the peer closed the connection (EOF or socket error). Pipelined bytes are not EOF. */
static int client_gone(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL | POLLRDHUP)) return 1;
    if (p.revents & POLLIN) {
        char ch;
        ssize_t n = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
        return n == 0;
    }
    return 0;
}

static int conn_fd(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

/* Waits on r until it has output (or is done). Returns 0, or -1 if the client went away
 * (then r is cancelled). r->mu must be held; it is held again on return. */
static int wait_output(serve_server *s, sreq *r, int fd, int need_done) {
    while (!r->done && (need_done || (!r->text.len && !r->lp))) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) && !r->done && client_gone(fd)) {
            pthread_mutex_unlock(&r->mu);
            sched_cancel(s->sc, r);
            pthread_mutex_lock(&r->mu);
            return -1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// streaming

static void stream_free(void *cls) {
    stream *st = cls;
    if (!st) return;
    pthread_mutex_lock(&st->r->mu);
    int done = st->r->done;
    pthread_mutex_unlock(&st->r->mu);
    if (!done) sched_cancel(st->s->sc, st->r); /* the connection ended before the answer did */
    sreq_release(st->r);
    sbuf_free(&st->out);
    free(st);
}

/* Appends the events for what r has produced since the last call to st->out. */
static int stream_fill(stream *st) {
    sreq *r = st->r;
    pthread_mutex_lock(&r->mu);
    if (wait_output(st->s, r, st->fd, 0)) {
        pthread_mutex_unlock(&r->mu);
        return -1;
    }
    sbuf text = r->text;
    memset(&r->text, 0, sizeof r->text);
    json_t *lp = r->lp;
    r->lp = NULL;
    int done = r->done, status = r->err_status;
    const char *finish = r->finish;
    char msg[256];
    snprintf(msg, sizeof msg, "%s", r->err_msg);
    oai_usage u = r->usage;
    pthread_mutex_unlock(&r->mu);

    json_t *lpj = NULL;
    if (lp) {
        lpj = st->kind == OAI_CHAT ? json_pack("{s:o}", "content", json_incref(lp))
                                   : oai_logprobs_legacy(lp, st->text_offset);
    }
    int rc = 0;
    if (text.len || lpj) {
        json_t *ch = oai_chunk_json(st->kind, r->id, st->model, st->created, text.p, text.len, 0, NULL, lpj);
        rc |= oai_sse_event(&st->out, ch);
        json_decref(ch);
    }
    st->text_offset += text.len;
    sbuf_free(&text);
    json_decref(lp);
    json_decref(lpj);
    if (done) {
        if (status) { /* failed after the stream started: an error event, then [DONE] */
            oai_error e;
            oai_error_set(&e, status, status == 500 ? "server_error" : "invalid_request_error", NULL, NULL, "%s", msg);
            char *ej = oai_error_json(&e);
            rc |= sbuf_put(&st->out, "data: ", 6) || sbuf_put(&st->out, ej ? ej : "{}", ej ? strlen(ej) : 2) ||
                  sbuf_put(&st->out, "\n\n", 2);
            free(ej);
        } else {
            json_t *ch = oai_chunk_json(st->kind, r->id, st->model, st->created, "", 0, 0, finish, NULL);
            json_t *usage = oai_usage_json(&u), *timings = oai_timings_json(&u);
            if (st->include_usage) {
                rc |= oai_sse_event(&st->out, ch);
                json_decref(ch);
                ch = json_pack("{s:s, s:s, s:I, s:s, s:[]}", "id", r->id, "object",
                               st->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion", "created",
                               (json_int_t)st->created, "model", st->model, "choices");
            }
            /* the last chunk carries usage and timings */
            json_object_set_new(ch, "usage", usage);
            json_object_set_new(ch, "timings", timings);
            rc |= oai_sse_event(&st->out, ch);
            json_decref(ch);
        }
        rc |= sbuf_put(&st->out, "data: [DONE]\n\n", 14);
        st->finished = 1;
    }
    return rc ? -1 : 0;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *st = cls;
    for (;;) {
        if (st->off < st->out.len) {
            size_t n = st->out.len - st->off;
            if (n > max) n = max;
            memcpy(buf, st->out.p + st->off, n);
            st->off += n;
            if (st->off == st->out.len) st->off = st->out.len = 0;
            return (ssize_t)n;
        }
        if (st->finished) return MHD_CONTENT_READER_END_OF_STREAM;
        if (stream_fill(st)) return MHD_CONTENT_READER_END_WITH_ERROR;
    }
}

// ---------------------------------------------------------------------------------------------
// generation endpoints

static int check_model(serve_server *s, const char *model, oai_error *e) {
    serve_backend *b = atomic_load(&s->b);
    if (model && *model && strcmp(model, b->info.model_id))
        return oai_error_set(e, 404, "invalid_request_error", "model", "model_not_found",
                             "The model '%s' does not exist (this server serves '%s')", model, b->info.model_id);
    return 0;
}

static enum MHD_Result handle_generate(serve_server *s, struct MHD_Connection *c, conn *cc, int kind) {
    serve_backend *b = atomic_load(&s->b);
    if (!b) return reply_loading(s, c);
    oai_request rq;
    oai_error e;
    if (oai_request_parse(&rq, kind, cc->body.p ? cc->body.p : "", cc->body.len, b->info.n_vocab, &e))
        return reply_error(s, c, &e);
    enum MHD_Result ret;
    st_err err = {0};
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    sreq *r = NULL;
    if (check_model(s, rq.model, &e)) {
        ret = reply_error(s, c, &e);
        goto out;
    }
    /* prompt -> token ids */
    if (kind == OAI_CHAT) {
        if (!b->info.has_template) {
            oai_error_set(&e, 400, "invalid_request_error", "messages", NULL,
                          "the model has no chat template; use /v1/completions");
            ret = reply_error(s, c, &e);
            goto out;
        }
        if (b->render_chat(b, rq.messages, rq.template_kwargs, &text, &err)) {
            oai_error_set(&e, 400, "invalid_request_error", "messages", NULL, "cannot render the chat template: %s",
                          err.msg);
            ret = reply_error(s, c, &e);
            goto out;
        }
    }
    if (rq.prompt_ids) {
        ids = rq.prompt_ids;
        n_ids = rq.n_prompt_ids;
        rq.prompt_ids = NULL;
    } else if (b->tokenize(b, text ? text : rq.prompt, kind == OAI_COMPLETION, &ids, &n_ids, &err)) {
        oai_error_set(&e, 400, "invalid_request_error", kind == OAI_CHAT ? "messages" : "prompt", NULL,
                      "cannot tokenize the prompt: %s", err.msg);
        ret = reply_error(s, c, &e);
        goto out;
    }
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= b->info.n_vocab) {
            oai_error_set(&e, 400, "invalid_request_error", kind == OAI_CHAT ? "messages" : "prompt", NULL,
                          "the prompt has token id %d, beyond the model's vocabulary of %d", ids[i], b->info.n_vocab);
            ret = reply_error(s, c, &e);
            goto out;
        }
    }
    if (n_ids >= (size_t)b->info.max_ctx || n_ids == 0) {
        oai_error_set(&e, 400, "invalid_request_error", kind == OAI_CHAT ? "messages" : "prompt", "context_length_exceeded",
                      n_ids ? "the prompt has %zu tokens but the model's context holds %d tokens"
                            : "the prompt is empty (%zu tokens; context %d)",
                      n_ids, b->info.max_ctx);
        ret = reply_error(s, c, &e);
        goto out;
    }
    /* the request */
    r = sreq_new();
    if (!r) {
        ret = reply_internal(s, c, "out of memory");
        goto out;
    }
    r->prompt = ids;
    r->n_prompt = n_ids;
    ids = NULL;
    r->max_tokens = rq.max_tokens;
    r->sampling = rq.sampling;
    r->bias = rq.bias;
    rq.bias = NULL;
    if (!rq.seed_given) r->sampling.seed = st_time_ns() ^ ((uint64_t)atomic_load(&s->seq) << 32);
    for (int i = 0; i < rq.n_stop; i++) r->stop[i] = rq.stop[i], rq.stop[i] = NULL;
    r->n_stop = rq.n_stop;
    r->logprobs = rq.logprobs;
    r->top_logprobs = rq.top_logprobs;
    const char *fault = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-strata-fault");
    if (s->o.test_faults && fault && !strcmp(fault, "internal")) r->fault = 1;
    snprintf(r->id, sizeof r->id, "%s-%016llx", kind == OAI_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)(atomic_fetch_add(&s->seq, 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)s->created));
    int rc = sched_submit(s->sc, r, &err);
    if (rc == ST_ERR_LIMIT) {
        oai_error_set(&e, 429, "rate_limit_error", NULL, "queue_full", "%s", err.msg);
        ret = reply_error(s, c, &e);
        goto out;
    }
    if (rc == ST_ERR_ARG) {
        oai_error_set(&e, 400, "invalid_request_error", NULL, NULL, "%s", err.msg);
        ret = reply_error(s, c, &e);
        goto out;
    }
    if (rc) {
        ret = reply_internal(s, c, err.msg);
        goto out;
    }
    int64_t created = (int64_t)time(NULL);
    int fd = conn_fd(c);
    if (rq.stream) {
        stream *st = calloc(1, sizeof *st);
        if (!st) {
            sched_cancel(s->sc, r);
            ret = reply_internal(s, c, "out of memory");
            goto out;
        }
        st->s = s;
        st->r = r;
        r = NULL; /* the stream owns the reference now */
        st->kind = kind;
        st->include_usage = rq.include_usage;
        st->fd = fd;
        st->created = created;
        snprintf(st->model, sizeof st->model, "%s", b->info.model_id);
        /* the first chunk announces the role (OpenAI sends it before any token) */
        if (kind == OAI_CHAT) {
            json_t *ch = oai_chunk_json(kind, st->r->id, st->model, created, "", 0, 1, NULL, NULL);
            oai_sse_event(&st->out, ch);
            json_decref(ch);
        }
        struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, st,
                                                                      stream_free);
        if (!resp) {
            stream_free(st);
            ret = MHD_NO;
            goto out;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        metrics_count_status(&s->met, tl_endpoint, 200);
        goto out;
    }
    /* non-streaming: wait here (this connection's own thread) */
    pthread_mutex_lock(&r->mu);
    if (wait_output(s, r, fd, 1)) {
        pthread_mutex_unlock(&r->mu);
        ret = MHD_NO; /* the client is gone: close */
        goto out;
    }
    if (r->err_status) {
        oai_error_set(&e, r->err_status, r->err_status == 500 ? "server_error" : "invalid_request_error", NULL, NULL,
                      "%s", r->err_msg);
        pthread_mutex_unlock(&r->mu);
        ret = reply_error(s, c, &e);
        goto out;
    }
    json_t *lpj = NULL;
    if (r->logprobs) {
        json_t *content = r->lp ? r->lp : json_array();
        if (!r->lp) r->lp = content;
        lpj = kind == OAI_CHAT ? json_pack("{s:O}", "content", content) : oai_logprobs_legacy(content, 0);
    }
    json_t *resp = oai_response_json(kind, r->id, b->info.model_id, created, r->text.p, r->text.len, r->finish, lpj,
                                     &r->usage);
    pthread_mutex_unlock(&r->mu);
    json_decref(lpj);
    ret = reply_json(s, c, 200, resp);
out:
    sreq_release(r);
    free(ids);
    free(text);
    oai_request_free(&rq);
    return ret;
}

// ---------------------------------------------------------------------------------------------
// other endpoints

static json_t *model_json(serve_backend *b, int64_t created) {
    return json_pack("{s:s, s:s, s:I, s:s, s:{s:i, s:i, s:i}}", "id", b->info.model_id, "object", "model", "created",
                     (json_int_t)created, "owned_by", "strata", "meta", "n_ctx", b->info.max_ctx, "n_vocab",
                     b->info.n_vocab, "n_slots", b->info.n_slots);
}

static enum MHD_Result handle_metrics(serve_server *s, struct MHD_Connection *c) {
    serve_gauges g = {0};
    serve_backend *b = atomic_load(&s->b);
    if (s->sc) sched_gauges(s->sc, &g);
    g.queue_max = s->o.queue_max;
    g.loading = b == NULL;
    sbuf o = {0};
    metrics_render(&s->met, &g, &o);
    if (b && b->metrics_text) b->metrics_text(b, &o.p, &o.len, &o.cap);
    enum MHD_Result rc = reply(s, c, 200, "text/plain; version=0.0.4", o.p ? o.p : "", o.len, 0);
    sbuf_free(&o);
    return rc;
}

static int auth_ok(serve_server *s, struct MHD_Connection *c, oai_error *e) {
    if (!s->n_keys) return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7)) {
        oai_error_set(e, 401, "invalid_request_error", NULL, "missing_api_key",
                      "missing API key: send the header 'Authorization: Bearer YOUR_KEY'");
        return 0;
    }
    const char *key = h + 7;
    while (*key == ' ') key++;
    size_t kl = strlen(key);
    int ok = 0;
    for (int i = 0; i < s->n_keys; i++) {
        size_t l = strlen(s->keys[i]);
        unsigned diff = (unsigned)(l != kl);
        for (size_t j = 0; j < l; j++) diff |= (unsigned char)s->keys[i][j] ^ (unsigned char)(j < kl ? key[j] : 0);
        ok |= diff == 0;
    }
    if (!ok) oai_error_set(e, 401, "invalid_request_error", NULL, "invalid_api_key", "invalid API key");
    return ok;
}

static enum MHD_Result route(serve_server *s, struct MHD_Connection *c, const char *url, const char *method,
                             conn *cc) {
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST");
    oai_error e;
    serve_backend *b = atomic_load(&s->b);
    tl_endpoint = !strcmp(url, "/v1/chat/completions") ? MET_EP_CHAT
                  : !strcmp(url, "/v1/completions")    ? MET_EP_COMPLETIONS
                  : !strncmp(url, "/v1/models", 10)    ? MET_EP_MODELS
                  : !strcmp(url, "/v1/cluster")        ? MET_EP_CLUSTER
                  : !strcmp(url, "/metrics")           ? MET_EP_METRICS
                  : !strcmp(url, "/health")            ? MET_EP_HEALTH
                  : (!strcmp(url, "/") || !strcmp(url, "/index.html") || !strcmp(url, "/dashboard")) ? MET_EP_DASHBOARD
                                                       : MET_EP_OTHER;
    if (!strcmp(url, "/") || !strcmp(url, "/index.html") || !strcmp(url, "/dashboard")) {
        if (!get) goto bad_method;
        return reply(s, c, 200, "text/html; charset=utf-8", (const char *)strata_dashboard_html,
                     strata_dashboard_html_len, 0);
    }
    if (!strcmp(url, "/health")) {
        if (!get) goto bad_method;
        if (!b) {
            pthread_mutex_lock(&s->mu);
            json_t *o = s->load_error[0] ? json_pack("{s:s, s:s}", "status", "error", "message", s->load_error)
                                         : json_pack("{s:s}", "status", "loading");
            pthread_mutex_unlock(&s->mu);
            char *t = json_dumps(o, JSON_COMPACT);
            json_decref(o);
            enum MHD_Result rc = reply(s, c, 503, "application/json", t ? t : "{}", t ? strlen(t) : 2, 5);
            free(t);
            return rc;
        }
        serve_gauges g = {0};
        sched_gauges(s->sc, &g);
        return reply_json(s, c, 200,
                          json_pack("{s:s, s:s, s:i, s:i, s:i}", "status", "ok", "model", b->info.model_id,
                                    "slots_idle", g.slots_total - g.slots_used, "slots_processing", g.slots_used,
                                    "queue", g.queue_depth));
    }
    if (!strcmp(url, "/metrics")) {
        if (!get) goto bad_method;
        return handle_metrics(s, c);
    }
    if (strncmp(url, "/v1/", 4)) goto not_found;
    if (!auth_ok(s, c, &e)) return reply_error(s, c, &e);
    int known = !strcmp(url, "/v1/chat/completions") || !strcmp(url, "/v1/completions") ||
                !strcmp(url, "/v1/models") || !strncmp(url, "/v1/models/", 11) || !strcmp(url, "/v1/cluster");
    if (!known) goto not_found;
    if (!b) return reply_loading(s, c);
    if (!strcmp(url, "/v1/chat/completions") || !strcmp(url, "/v1/completions")) {
        if (!post) goto bad_method;
        return handle_generate(s, c, cc, url[4] == 'c' && url[5] == 'h' ? OAI_CHAT : OAI_COMPLETION);
    }
    if (!get) goto bad_method;
    if (!strcmp(url, "/v1/models"))
        return reply_json(s, c, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", model_json(b, s->created)));
    if (!strncmp(url, "/v1/models/", 11)) {
        if (check_model(s, url + 11, &e)) return reply_error(s, c, &e);
        return reply_json(s, c, 200, model_json(b, s->created));
    }
    /* /v1/cluster */
    json_t *cl = b->cluster_json ? b->cluster_json(b) : json_object();
    serve_gauges g = {0};
    sched_gauges(s->sc, &g);
    json_object_set_new(cl, "kv", json_pack("{s:i, s:i, s:I, s:I, s:i}", "slots_used", g.slots_used, "slots_total",
                                            g.slots_total, "tokens_used", (json_int_t)g.kv_tokens_used, "tokens_total",
                                            (json_int_t)g.kv_tokens_total, "queue_depth", g.queue_depth));
    json_object_set_new(cl, "model", json_string(b->info.model_id));
    return reply_json(s, c, 200, cl);
not_found:
    oai_error_set(&e, 404, "invalid_request_error", NULL, "not_found", "no route for %s %s", method, url);
    return reply_error(s, c, &e);
bad_method:
    oai_error_set(&e, 405, "invalid_request_error", NULL, "method_not_allowed", "%s is not allowed on %s", method, url);
    return reply_error(s, c, &e);
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                 const char *version, const char *upload_data, size_t *upload_data_size,
                                 void **con_cls) {
    serve_server *s = cls;
    conn *cc = *con_cls;
    if (!cc) {
        cc = calloc(1, sizeof *cc);
        if (!cc) return MHD_NO;
        *con_cls = cc;
        tl_endpoint = !strcmp(url, "/v1/chat/completions") ? MET_EP_CHAT
                      : !strcmp(url, "/v1/completions")    ? MET_EP_COMPLETIONS
                                                           : MET_EP_OTHER;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->o.max_body) {
            oai_error e;
            oai_error_set(&e, 413, "invalid_request_error", NULL, "request_too_large",
                          "the request body has %s bytes, over the limit of %zu bytes (--max-body)", cl, s->o.max_body);
            return reply_error(s, c, &e);
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (cc->body.len + *upload_data_size > s->o.max_body) cc->too_big = 1;
        else if (sbuf_put(&cc->body, upload_data, *upload_data_size)) return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (cc->too_big) {
        tl_endpoint = !strcmp(url, "/v1/chat/completions") ? MET_EP_CHAT
                      : !strcmp(url, "/v1/completions")    ? MET_EP_COMPLETIONS
                                                           : MET_EP_OTHER;
        oai_error e;
        oai_error_set(&e, 413, "invalid_request_error", NULL, "request_too_large",
                      "the request body is over the limit of %zu bytes (--max-body)", s->o.max_body);
        return reply_error(s, c, &e);
    }
    return route(s, c, url, method, cc);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    conn *cc = *con_cls;
    if (!cc) return;
    sbuf_free(&cc->body);
    free(cc);
    *con_cls = NULL;
}

// ---------------------------------------------------------------------------------------------
// server

int serve_start(serve_server **out, const serve_opts *opts, st_err *err) {
    *out = NULL;
    serve_server *s = calloc(1, sizeof *s);
    if (!s) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    s->o = *opts;
    if (!s->o.host) s->o.host = "127.0.0.1";
    if (!s->o.max_body) s->o.max_body = 1 << 20;
    if (s->o.queue_max < 0) s->o.queue_max = 0;
    s->created = (int64_t)time(NULL);
    atomic_init(&s->seq, (uint64_t)st_time_ns());
    pthread_mutex_init(&s->mu, NULL);
    metrics_init(&s->met);
    srand((unsigned)st_time_ns());
    if (opts->n_api_keys) {
        s->keys = calloc((size_t)opts->n_api_keys, sizeof *s->keys);
        for (int i = 0; s->keys && i < opts->n_api_keys; i++) s->keys[i] = strdup(opts->api_keys[i]);
        s->n_keys = opts->n_api_keys;
    }
    s->o.api_keys = NULL;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->o.port)};
    const char *host = !strcmp(s->o.host, "localhost") ? "127.0.0.1" : s->o.host;
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        serve_stop(s);
        return st_err_set(err, ST_ERR_ARG, "--host %s: not an IPv4 address", s->o.host);
    }
    s->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG,
                            (uint16_t)s->o.port, NULL, NULL, on_access, s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_CONNECTION_LIMIT, (unsigned)1000,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300, MHD_OPTION_THREAD_STACK_SIZE,
                            (size_t)(1 << 20), MHD_OPTION_END);
    if (!s->d) {
        int port = s->o.port;
        serve_stop(s);
        return st_err_set(err, ST_ERR_NET, "cannot listen on %s:%d (address in use?)", host, port);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : s->o.port;
    *out = s;
    return ST_OK;
}

int serve_port(const serve_server *s) { return s->port; }

int serve_attach(serve_server *s, serve_backend *b, st_err *err) {
    int rc = sched_start(&s->sc, b, s->o.queue_max, s->o.kv_budget, &s->met, err);
    if (rc) {
        b->free(b);
        return rc;
    }
    atomic_store(&s->b, b);
    return ST_OK;
}

void serve_set_load_error(serve_server *s, const char *msg) {
    pthread_mutex_lock(&s->mu);
    snprintf(s->load_error, sizeof s->load_error, "%s", msg);
    pthread_mutex_unlock(&s->mu);
}

void serve_stop(serve_server *s) {
    if (!s) return;
    /* stop generating first: waiting connection threads see their requests end */
    sched_halt(s->sc);
    if (s->d) MHD_stop_daemon(s->d); /* joins the connection threads */
    sched_stop(s->sc);
    s->sc = NULL;
    serve_backend *b = atomic_load(&s->b);
    if (b) b->free(b);
    for (int i = 0; i < s->n_keys; i++) free(s->keys[i]);
    free(s->keys);
    metrics_destroy(&s->met);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
