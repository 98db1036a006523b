/* scheduler.c — continuous batching over a serve_backend (see strata/serve.h).
 *
 * One thread owns the backend's forward pass. Each iteration:
 *   1. admits queued requests (FIFO) while a KV slot is free and the KV budget allows, choosing
 *      the free slot whose cached tokens share the longest prefix with the prompt (a chat turn
 *      only prefills what is new);
 *   2. drops cancelled sequences (client gone) and frees their slots;
 *   3. runs one prefill chunk (<= max_batch tokens) of the oldest sequence still prefilling;
 *   4. runs one decode step: every decoding sequence contributes one row (its last token at
 *      its next position, in its own slot) to a single forward call; each row's logits are
 *      sampled with that sequence's sampler, detokenised and stop-matched.
 * New sequences join and finished ones leave between steps, so a long prefill delays the
 * decoders by at most one chunk. Text goes to the request under its mutex and wakes the HTTP
 * thread waiting on it.
 *
 * A sequence-level backend (the cluster, b->seq_submit set) replaces steps 3-4: admission
 * submits the whole request (prompt ids, sampling parameters, max_tokens, EOS ids), the
 * backend samples remotely and seq_poll delivers token ids, which go through the same
 * detokenise / stop-string / max_tokens path; a stop-string match or a disconnect cancels
 * the sequence in the backend, which frees its KV slot at once.
 */
#include "serve_internal.h"

#include "strata/stop.h"

#include <stdlib.h>
#include <string.h>

/* per-sequence generation state, created by the HTTP thread before submission */
typedef struct seq_priv {
    smp_sampler *smp;
    stop_matcher *sm;
    tok_stream *ts;
    char *emit;        /* stop matcher output buffer                                            */
    size_t emit_cap;
} seq_priv;

struct sched {
    serve_backend *b;
    serve_metrics *met;
    int n_slots, max_ctx, V, max_batch, queue_max;
    int64_t kv_budget;
    pthread_mutex_t mu;        /* guards the queue, stop, and the gauges below                */
    pthread_cond_t cv;
    pthread_t th;
    int started, stop;
    uint64_t iter;             /* scheduler iterations (one prefill chunk per sequence each)  */
    sreq *qhead, *qtail;
    int qlen;
    int n_active;              /* gauge (mu)                                                  */
    int64_t kv_used;           /* gauge (mu): KV positions held by active sequences           */
    int64_t kv_reserved;       /* (mu) sum of kv_need of active sequences, against kv_budget   */
    /* scheduler thread only */
    sreq **active;             /* [n_slots] the sequence in each slot, NULL = free            */
    int32_t *slot_tokens;      /* [n_slots, max_ctx] tokens whose K/V each slot holds          */
    int *slot_len;             /* [n_slots]                                                    */
    int32_t *row_tok, *row_pos, *row_slot; /* [n_slots] decode rows                           */
    sreq **rows;               /* [n_slots]                                                    */
    float *logits;             /* [n_slots, V]                                                 */
    smp_logprob *top;          /* [OAI_MAX_TOP_LOGPROBS]                                       */
};

// ---------------------------------------------------------------------------------------------
// requests

sreq *sreq_new(void) {
    sreq *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancelled, 0);
    r->slot = -1;
    return r;
}

static void priv_free(seq_priv *p) {
    if (!p) return;
    smp_free(p->smp);
    stop_matcher_free(p->sm);
    tok_stream_free(p->ts);
    free(p->emit);
    free(p);
}

void sreq_release(sreq *r) {
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    priv_free(r->priv);
    free(r->prompt);
    free(r->bias);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    sbuf_free(&r->text);
    json_decref(r->lp);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

/* Creates the sampler, stop matcher and detokeniser of r (HTTP thread, before submission), so
 * that bad sampling parameters fail the request with 400 and allocation stays off the
 * scheduler thread. */
static int priv_create(sched *s, sreq *r, st_err *err) {
    seq_priv *p = calloc(1, sizeof *p);
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    r->priv = p;
    r->sampling.logit_bias = r->bias;
    p->smp = smp_init(&r->sampling, s->V, (size_t)s->max_ctx, err);
    if (!p->smp) return err->code ? err->code : ST_ERR_NOMEM;
    p->sm = stop_matcher_init((const char *const *)r->stop, r->n_stop, err);
    if (!p->sm) return err->code ? err->code : ST_ERR_NOMEM;
    int rc = tok_stream_init(&p->ts, s->b->tok, 1, err);
    if (rc) return rc;
    p->emit_cap = 8192 + stop_matcher_hold_max(p->sm);
    p->emit = malloc(p->emit_cap);
    if (!p->emit) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    smp_accept_prompt(p->smp, r->prompt, r->n_prompt);
    return ST_OK;
}

// ---------------------------------------------------------------------------------------------
// output to the HTTP thread

static void emit_text(sreq *r, const char *t, size_t n) {
    if (!n) return;
    pthread_mutex_lock(&r->mu);
    sbuf_put(&r->text, t, n);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void emit_logprob(sched *s, sreq *r, int32_t id, float lp, const smp_logprob *top, int n_top) {
    json_t *ent = json_object();
    for (int k = -1; k < n_top; k++) {
        int32_t tid = k < 0 ? id : top[k].id;
        char *txt = NULL;
        size_t len = 0;
        st_err err = {0};
        if (tok_decode(s->b->tok, &tid, 1, 0, &txt, &len, &err)) txt = NULL;
        json_t *bytes = json_array();
        for (size_t i = 0; txt && i < len; i++) json_array_append_new(bytes, json_integer((unsigned char)txt[i]));
        json_t *tj = json_stringn(txt ? txt : "", txt ? len : 0);
        if (!tj) tj = json_string("\xEF\xBF\xBD");
        json_t *o = k < 0 ? ent : json_object();
        json_object_set_new(o, "token", tj);
        json_object_set_new(o, "logprob", json_real(k < 0 ? lp : top[k].logprob));
        json_object_set_new(o, "bytes", bytes);
        if (k >= 0) json_array_append_new(json_object_get(ent, "top_logprobs"), o);
        else json_object_set_new(ent, "top_logprobs", json_array());
        free(txt);
    }
    pthread_mutex_lock(&r->mu);
    if (!r->lp) r->lp = json_array();
    json_array_append_new(r->lp, ent);
    pthread_mutex_unlock(&r->mu);
}

static int64_t kv_need(const sched *s, const sreq *r) {
    int64_t need = (int64_t)r->n_prompt + (r->max_tokens > 0 ? r->max_tokens : s->max_ctx);
    return need < s->max_ctx ? need : s->max_ctx;
}

/* Ends r: records the outcome, wakes its HTTP thread, frees its slot and drops the
 * scheduler's reference. status != 0 marks a failure (msg says why). */
static void finish(sched *s, sreq *r, const char *reason, int status, const char *msg) {
    double now = st_time_s();
    oai_usage u = {.prompt_tokens = (int)r->n_prompt,
                   .cached_tokens = r->usage.cached_tokens,
                   .completion_tokens = r->n_gen,
                   .queue_s = r->t_admit > 0 ? r->t_admit - r->t_submit : now - r->t_submit,
                   .prefill_s = r->t_first > 0 ? r->t_first - (r->t_admit > 0 ? r->t_admit : r->t_submit) : 0,
                   .decode_s = r->t_first > 0 ? now - r->t_first : 0,
                   .ttft_s = r->t_first > 0 ? r->t_first - r->t_submit : 0};
    if (status == 500) {
        char eid[32];
        snprintf(eid, sizeof eid, "err-%08x%04x", (unsigned)(st_time_ns() & 0xffffffffu), (unsigned)(rand() & 0xffff));
        ST_ERROR("serve: request %s failed, error id %s: %s", r->id, eid, msg ? msg : "internal error");
        pthread_mutex_lock(&r->mu);
        snprintf(r->err_msg, sizeof r->err_msg, "internal server error (error id %s; see the server log)", eid);
    } else {
        pthread_mutex_lock(&r->mu);
        if (msg) snprintf(r->err_msg, sizeof r->err_msg, "%s", msg);
    }
    r->usage = u;
    r->err_status = status;
    r->finish = reason;
    r->done = 1;
    r->state = SREQ_DONE;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);

    pthread_mutex_lock(&s->met->mu);
    if (!strcmp(reason, "cancelled")) s->met->cancelled++;
    if (r->t_admit > 0) met_hist_observe(&s->met->e2e, now - r->t_submit);
    pthread_mutex_unlock(&s->met->mu);

    if (r->slot >= 0) {
        s->active[r->slot] = NULL;
        pthread_mutex_lock(&s->mu);
        s->n_active--;
        s->kv_reserved -= kv_need(s, r);
        pthread_mutex_unlock(&s->mu);
        r->slot = -1;
    }
    sreq_release(r);
}

// ---------------------------------------------------------------------------------------------
// one generated token

/* Feeds text through the stop matcher to the client; returns STOP_STRING on a match. */
static int feed_text(seq_priv *p, sreq *r, const char *txt, size_t len) {
    int fr = STOP_NONE;
    while (len > 0) {
        size_t chunk = len < 8192 ? len : 8192, k = 0;
        fr = stop_matcher_feed(p->sm, txt, chunk, p->emit, p->emit_cap, &k);
        emit_text(r, p->emit, k);
        if (fr == STOP_STRING) return fr;
        txt += chunk;
        len -= chunk;
    }
    return fr;
}

static void flush_all(seq_priv *p, sreq *r) {
    const char *txt;
    size_t len = 0, k = 0;
    st_err err = {0};
    if (!tok_stream_flush(p->ts, &txt, &len, &err) && len && feed_text(p, r, txt, len) == STOP_STRING) return;
    if (!stop_matcher_flush(p->sm, p->emit, p->emit_cap, &k)) emit_text(r, p->emit, k);
}

/* Handles the token just sampled for r: timing, stop checks, text. Returns 1 if r finished
 * (r may then be freed). */
static int seq_token(sched *s, sreq *r, int32_t id, float lp, int n_top) {
    seq_priv *p = r->priv;
    double now = st_time_s();
    pthread_mutex_lock(&s->met->mu);
    if (r->n_gen == 0) met_hist_observe(&s->met->ttft, now - r->t_submit);
    else met_hist_observe(&s->met->itl, now - r->t_last);
    s->met->completion_tokens++;
    pthread_mutex_unlock(&s->met->mu);
    if (r->n_gen == 0) r->t_first = now;
    r->t_last = now;
    if (id < 0) { /* every token banned by the logit bias */
        finish(s, r, "stop", 0, NULL);
        return 1;
    }
    r->n_gen++;
    smp_accept(p->smp, id);
    int limit = r->max_tokens > 0 ? r->max_tokens : s->max_ctx;
    int st = stop_check_token(s->b->info.eos, s->b->info.n_eos, id, r->n_gen, limit);
    if (st == STOP_EOS) {
        flush_all(p, r);
        finish(s, r, "stop", 0, NULL);
        return 1;
    }
    if (r->logprobs) emit_logprob(s, r, id, lp, s->top, n_top);
    const char *txt;
    size_t len = 0;
    st_err err = {0};
    if (tok_stream_push(p->ts, id, &txt, &len, &err)) {
        finish(s, r, "stop", 500, err.msg);
        return 1;
    }
    if (feed_text(p, r, txt, len) == STOP_STRING) {
        finish(s, r, "stop", 0, NULL);
        return 1;
    }
    if (st == STOP_LENGTH || r->n_past >= s->max_ctx) {
        flush_all(p, r);
        finish(s, r, "length", 0, NULL);
        return 1;
    }
    r->next = id;
    r->state = SREQ_DECODE;
    return 0;
}

static int sample_row(sched *s, sreq *r, float *logits) {
    seq_priv *p = r->priv;
    int32_t n_top = 0;
    float lp = 0;
    int32_t id;
    if (r->logprobs) id = smp_sample_logprobs(p->smp, logits, r->top_logprobs, s->top, &n_top, &lp);
    else id = smp_sample(p->smp, logits);
    return seq_token(s, r, id, lp, n_top);
}

// ---------------------------------------------------------------------------------------------
// admission, prefill, decode

/* Chooses a free slot for r (longest cached prefix; ties: the slot caching least) and sets up
 * prefix reuse. */
static void admit(sched *s, sreq *r) {
    int best = -1, best_keep = -1;
    for (int i = 0; i < s->n_slots; i++) {
        if (s->active[i]) continue;
        const int32_t *c = s->slot_tokens + (size_t)i * s->max_ctx;
        int keep = 0;
        while (keep < s->slot_len[i] && keep < (int)r->n_prompt - 1 && c[keep] == r->prompt[keep]) keep++;
        if (keep > best_keep || (keep == best_keep && s->slot_len[i] < s->slot_len[best])) best = i, best_keep = keep;
    }
    ST_ASSERT(best >= 0);
    r->slot = best;
    r->n_past = best_keep;
    r->usage.cached_tokens = best_keep;
    r->state = SREQ_PREFILL;
    r->t_admit = st_time_s();
    s->active[best] = r;
    pthread_mutex_lock(&s->met->mu);
    met_hist_observe(&s->met->queue, r->t_admit - r->t_submit);
    s->met->prompt_tokens += r->n_prompt;
    s->met->cached_tokens += (uint64_t)best_keep;
    pthread_mutex_unlock(&s->met->mu);
}

/* Runs the next prefill chunk of r, at most max_tokens tokens; returns the tokens used. */
static int prefill_chunk(sched *s, sreq *r, int max_tokens) {
    if (r->fault) {
        finish(s, r, "stop", 500, "injected fault (x-strata-fault header)");
        return 1;
    }
    int n = (int)r->n_prompt - r->n_past;
    if (n > max_tokens) n = max_tokens;
    int last = r->n_past + n == (int)r->n_prompt;
    int32_t *pos = malloc((size_t)n * 2 * sizeof(int32_t));
    if (!pos) {
        finish(s, r, "stop", 500, "out of memory");
        return n;
    }
    int32_t *slot = pos + n;
    for (int i = 0; i < n; i++) pos[i] = r->n_past + i, slot[i] = r->slot;
    st_err err = {0};
    double t0 = st_time_s();
    int rc = s->b->forward(s->b, r->prompt + r->n_past, pos, slot, n, s->logits, last ? LOGITS_LAST : LOGITS_NONE, &err);
    double dt = st_time_s() - t0;
    free(pos);
    pthread_mutex_lock(&s->met->mu);
    s->met->prefill_chunks++;
    s->met->forward_s += dt;
    pthread_mutex_unlock(&s->met->mu);
    int32_t *cache = s->slot_tokens + (size_t)r->slot * s->max_ctx;
    if (rc) {
        s->slot_len[r->slot] = r->n_past; /* what was written before this chunk is still valid */
        finish(s, r, "stop", 500, err.msg);
        return n;
    }
    memcpy(cache + r->n_past, r->prompt + r->n_past, (size_t)n * sizeof(int32_t));
    r->n_past += n;
    s->slot_len[r->slot] = r->n_past;
    if (last) sample_row(s, r, s->logits);
    return n;
}

static void decode_step(sched *s) {
    int T = 0;
    for (int i = 0; i < s->n_slots; i++) {
        sreq *r = s->active[i];
        if (!r || r->state != SREQ_DECODE) continue;
        s->rows[T] = r;
        s->row_tok[T] = r->next;
        s->row_pos[T] = r->n_past;
        s->row_slot[T] = r->slot;
        T++;
    }
    if (!T) return;
    st_err err = {0};
    double t0 = st_time_s();
    int rc = s->b->forward(s->b, s->row_tok, s->row_pos, s->row_slot, T, s->logits, LOGITS_ALL, &err);
    double dt = st_time_s() - t0;
    pthread_mutex_lock(&s->met->mu);
    s->met->decode_steps++;
    s->met->decode_rows += (uint64_t)T;
    s->met->forward_s += dt;
    pthread_mutex_unlock(&s->met->mu);
    for (int t = 0; t < T; t++) {
        sreq *r = s->rows[t];
        if (rc) {
            s->slot_len[r->slot] = r->n_past;
            finish(s, r, "stop", 500, err.msg);
            continue;
        }
        s->slot_tokens[(size_t)r->slot * s->max_ctx + r->n_past] = r->next;
        r->n_past++;
        s->slot_len[r->slot] = r->n_past;
        sample_row(s, r, s->logits + (size_t)t * s->V);
    }
}

// ---------------------------------------------------------------------------------------------
// sequence-level backends

/* Admits r into a free scheduler slot and submits it whole to the backend; a refusal fails
 * the request (503: the backend cannot run it now). */
static void admit_seq(sched *s, sreq *r) {
    int i = 0;
    while (i < s->n_slots && s->active[i]) i++;
    ST_ASSERT(i < s->n_slots);
    r->slot = i;
    r->n_past = (int)r->n_prompt;
    r->state = SREQ_PREFILL;
    r->t_admit = st_time_s();
    s->active[i] = r;
    pthread_mutex_lock(&s->met->mu);
    met_hist_observe(&s->met->queue, r->t_admit - r->t_submit);
    s->met->prompt_tokens += r->n_prompt;
    pthread_mutex_unlock(&s->met->mu);
    if (r->fault) {
        finish(s, r, "stop", 500, "injected fault (x-strata-fault header)");
        return;
    }
    int limit = r->max_tokens > 0 ? r->max_tokens : s->max_ctx;
    serve_seq_req q = {.prompt = r->prompt, .n_prompt = (int)r->n_prompt, .sampling = &r->sampling,
                       .max_tokens = limit, .eos = s->b->info.eos, .n_eos = s->b->info.n_eos};
    st_err err = {0};
    if (s->b->seq_submit(s->b, &q, &r->bseq, &err)) finish(s, r, "stop", err.code == ST_ERR_ARG ? 400 : 503, err.msg);
}

/* seq_poll's callback: one token and/or the end of sequence id. */
static void on_seq_event(void *ud, uint64_t id, int32_t token, int done, const char *msg) {
    sched *s = ud;
    sreq *r = NULL;
    for (int i = 0; i < s->n_slots && !r; i++)
        if (s->active[i] && s->active[i]->bseq == id) r = s->active[i];
    if (!r) return; /* already finished here (stop string, EOS, cancel) */
    if (token >= 0) {
        r->n_past = (int)r->n_prompt + r->n_gen + 1; /* positions the sequence holds with this token */
        pthread_mutex_lock(&s->met->mu);
        s->met->decode_rows++;
        pthread_mutex_unlock(&s->met->mu);
        if (seq_token(s, r, token, 0, 0)) {
            if (!done) s->b->seq_cancel(s->b, id); /* stop string or limit: free the remote slot now */
            return;
        }
    }
    if (!done) return;
    if (msg) {
        finish(s, r, "stop", 503, msg);
        return;
    }
    flush_all(r->priv, r);
    finish(s, r, "length", 0, NULL); /* EOS would have ended it above: the stage hit a limit */
}

/* The KV gauge for /metrics: positions held by the sequences in slots (scheduler thread). */
static void update_kv_gauge(sched *s) {
    int64_t used = 0;
    for (int i = 0; i < s->n_slots; i++)
        if (s->active[i]) used += s->active[i]->n_past;
    pthread_mutex_lock(&s->mu);
    s->kv_used = used;
    pthread_mutex_unlock(&s->mu);
}

/* Moves queued requests into free slots while the KV budget allows (the first always fits:
 * its prompt was checked against the context). Caller holds s->mu; returns how many went to
 * adm (at most the free slots). */
static int take_admissions(sched *s, sreq **adm) {
    int n_adm = 0;
    while (s->qhead && s->n_active < s->n_slots) {
        sreq *r = s->qhead;
        int64_t need = kv_need(s, r);
        if (s->n_active > 0 && s->kv_reserved + need > s->kv_budget) break;
        s->qhead = r->qnext;
        if (!s->qhead) s->qtail = NULL;
        s->qlen--;
        s->n_active++;
        s->kv_reserved += need;
        adm[n_adm++] = r;
    }
    return n_adm;
}

/* The scheduler loop for sequence-level backends: admit + submit, cancel, poll. */
static void sched_loop_seq(sched *s, sreq **adm) {
    serve_backend *b = s->b;
    for (;;) {
        /* no condition wait: seq_poll is the wait (woken by submissions and cancellations),
         * and it keeps polling while idle so the backend's heartbeats keep going */
        pthread_mutex_lock(&s->mu);
        if (s->stop) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        int n_adm = take_admissions(s, adm);
        int busy = s->n_active > 0;
        pthread_mutex_unlock(&s->mu);
        /* cancellations first: their slots go to the admissions below */
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->active[i];
            if (r && atomic_load(&r->cancelled)) {
                b->seq_cancel(b, r->bseq);
                finish(s, r, "cancelled", 0, NULL);
            }
        }
        for (int i = 0; i < n_adm; i++) admit_seq(s, adm[i]);
        st_err err = {0};
        double t0 = st_time_s();
        if (b->seq_poll(b, busy ? 50 : 100, on_seq_event, s, &err)) ST_ERROR("serve: the backend failed: %s", err.msg);
        if (busy) {
            pthread_mutex_lock(&s->met->mu);
            s->met->decode_steps++;
            s->met->forward_s += st_time_s() - t0;
            pthread_mutex_unlock(&s->met->mu);
        }
        update_kv_gauge(s);
    }
    for (int i = 0; i < s->n_slots; i++)
        if (s->active[i]) b->seq_cancel(b, s->active[i]->bseq);
}

static void *sched_main(void *arg) {
    sched *s = arg;
    sreq **adm = calloc((size_t)s->n_slots, sizeof *adm);
    ST_ASSERT(adm);
    if (s->b->seq_submit) sched_loop_seq(s, adm);
    while (!s->b->seq_submit) { /* row-level backends: steps 1-4 of the file comment */
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->qhead && s->n_active == 0) pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        int n_adm = take_admissions(s, adm);
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < n_adm; i++) admit(s, adm[i]);
        /* cancellations: the client went away; its slot is free for the next admission */
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->active[i];
            if (r && atomic_load(&r->cancelled)) {
                finish(s, r, "cancelled", 0, NULL);
            }
        }
        /* prefill, oldest admission first, up to max_batch prompt tokens per iteration (one
         * forward call per sequence chunk: each needs only its last row's logits) */
        for (int budget = s->max_batch; budget > 0;) {
            sreq *pf = NULL;
            for (int i = 0; i < s->n_slots; i++) {
                sreq *r = s->active[i];
                if (r && r->state == SREQ_PREFILL && r->pf_iter != s->iter && (!pf || r->t_admit < pf->t_admit)) pf = r;
            }
            if (!pf) break;
            pf->pf_iter = s->iter;
            budget -= prefill_chunk(s, pf, budget);
        }
        s->iter++;
        decode_step(s);
        update_kv_gauge(s);
    }
    /* shutdown: fail what is left */
    for (int i = 0; i < s->n_slots; i++)
        if (s->active[i]) finish(s, s->active[i], "cancelled", 503, "the server is shutting down");
    pthread_mutex_lock(&s->mu);
    sreq *q = s->qhead;
    s->qhead = s->qtail = NULL;
    s->qlen = 0;
    pthread_mutex_unlock(&s->mu);
    while (q) {
        sreq *next = q->qnext;
        finish(s, q, "cancelled", 503, "the server is shutting down");
        q = next;
    }
    free(adm);
    return NULL;
}

// ---------------------------------------------------------------------------------------------
// public

int sched_start(sched **out, serve_backend *b, int queue_max, int64_t kv_budget, serve_metrics *m, st_err *err) {
    *out = NULL;
    sched *s = calloc(1, sizeof *s);
    if (!s) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    s->b = b;
    s->met = m;
    s->n_slots = b->info.n_slots;
    s->max_ctx = b->info.max_ctx;
    s->V = b->info.n_vocab;
    s->max_batch = b->info.max_batch > 0 ? b->info.max_batch : 256;
    s->queue_max = queue_max;
    s->kv_budget = kv_budget > 0 ? kv_budget : (int64_t)s->n_slots * s->max_ctx;
    s->iter = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    size_t ns = (size_t)s->n_slots;
    s->active = calloc(ns, sizeof *s->active);
    s->slot_tokens = calloc(ns * (size_t)s->max_ctx, sizeof(int32_t));
    s->slot_len = calloc(ns, sizeof(int));
    s->row_tok = calloc(ns, sizeof(int32_t));
    s->row_pos = calloc(ns, sizeof(int32_t));
    s->row_slot = calloc(ns, sizeof(int32_t));
    s->rows = calloc(ns, sizeof *s->rows);
    s->logits = malloc(ns * (size_t)s->V * sizeof(float));
    s->top = calloc(OAI_MAX_TOP_LOGPROBS, sizeof *s->top);
    if (!s->active || !s->slot_tokens || !s->slot_len || !s->row_tok || !s->row_pos || !s->row_slot || !s->rows ||
        !s->logits || !s->top) {
        sched_stop(s);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory for %d slots x %d logits", s->n_slots, s->V);
    }
    if (pthread_create(&s->th, NULL, sched_main, s)) {
        sched_stop(s);
        return st_err_set(err, ST_ERR_INTERNAL, "cannot start the scheduler thread");
    }
    s->started = 1;
    *out = s;
    return ST_OK;
}

void sched_halt(sched *s) {
    if (!s || !s->started) return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->b->seq_wake) s->b->seq_wake(s->b);
    pthread_join(s->th, NULL);
    s->started = 0;
}

void sched_stop(sched *s) {
    if (!s) return;
    sched_halt(s);
    free(s->active);
    free(s->slot_tokens);
    free(s->slot_len);
    free(s->row_tok);
    free(s->row_pos);
    free(s->row_slot);
    free(s->rows);
    free(s->logits);
    free(s->top);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

int sched_submit(sched *s, sreq *r, st_err *err) {
    if (r->n_prompt == 0) return st_err_set(err, ST_ERR_ARG, "the prompt is empty");
    if ((int64_t)r->n_prompt >= s->max_ctx)
        return st_err_set(err, ST_ERR_ARG,
                          "the prompt has %zu tokens but the context holds %d tokens (the prompt must be shorter, to "
                          "leave room for the answer)",
                          r->n_prompt, s->max_ctx);
    if (s->b->seq_submit && r->logprobs)
        return st_err_set(err, ST_ERR_ARG,
                          "logprobs are not available when serving from a cluster: the last pipeline stage samples "
                          "and only token ids come back");
    if (s->b->seq_submit && r->sampling.n_logit_bias > 0)
        return st_err_set(err, ST_ERR_ARG,
                          "logit_bias is not supported when serving from a cluster: the last pipeline stage samples "
                          "without it");
    int rc = priv_create(s, r, err);
    if (rc) return rc;
    pthread_mutex_lock(&s->mu);
    int free_slots = s->n_slots - s->n_active;
    if (s->stop || s->qlen - free_slots >= s->queue_max) {
        int stopping = s->stop;
        pthread_mutex_unlock(&s->mu);
        return st_err_set(err, ST_ERR_LIMIT, stopping ? "the server is shutting down"
                                                      : "the request queue is full (%d waiting); retry later",
                          s->queue_max);
    }
    atomic_fetch_add(&r->refs, 1);
    r->state = SREQ_QUEUED;
    r->t_submit = st_time_s();
    r->qnext = NULL;
    if (s->qtail) s->qtail->qnext = r;
    else s->qhead = r;
    s->qtail = r;
    s->qlen++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->b->seq_wake) s->b->seq_wake(s->b);
    return ST_OK;
}

void sched_cancel(sched *s, sreq *r) {
    atomic_store(&r->cancelled, 1);
    /* still queued: unlink it now, so it stops holding a queue place */
    pthread_mutex_lock(&s->mu);
    sreq *prev = NULL, *q = s->qhead;
    while (q && q != r) prev = q, q = q->qnext;
    if (q) {
        if (prev) prev->qnext = q->qnext;
        else s->qhead = q->qnext;
        if (s->qtail == q) s->qtail = prev;
        s->qlen--;
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->b->seq_wake) s->b->seq_wake(s->b);
    if (q) finish(s, r, "cancelled", 0, NULL);
}

void sched_gauges(sched *s, serve_gauges *g) {
    pthread_mutex_lock(&s->mu);
    g->slots_used = s->n_active;
    g->slots_total = s->n_slots;
    g->queue_depth = s->qlen;
    g->queue_max = s->queue_max;
    g->kv_tokens_used = s->kv_used;
    g->kv_tokens_total = (int64_t)s->n_slots * s->max_ctx;
    pthread_mutex_unlock(&s->mu);
}
