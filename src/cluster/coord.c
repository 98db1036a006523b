/* coord.c — the coordinator: connect, plan (even split by layers), load, generate, recover.
 * See include/strata/cluster.h. Single-threaded: every wait is a poll over the control
 * links with heartbeats sent and checked on the way. */
#include "cluster_proto.h"
#include "strata/model.h"

#include <stdlib.h>
#include <string.h>

typedef struct cpeer {
    char addr[64];
    xport *x;
    int alive;
    cp_info info;
    uint64_t last_seen, last_ping;
    int stage; /* -1: unused in the current plan */
} cpeer;

typedef struct cseq {
    coord_seq *s;
    uint64_t id;
    int slot;
    int done;
    uint64_t t_start, t_last;
} cseq;

struct coord {
    coord_opts o;
    xport_key key;
    model_desc desc;
    int n_peers;
    cpeer peers[CLUSTER_MAX_PEERS];
    int n_stages;
    int stage_peer[CLUSTER_MAX_STAGES];
    uint64_t epoch;
    uint64_t next_seq;
    size_t ctrl_payload;
    char data_kind[8];
    /* per-generation accumulators */
    double sum_compute[CLUSTER_MAX_STAGES], sum_hop[CLUSTER_MAX_STAGES];
    int n_hop_samples[CLUSTER_MAX_STAGES];
    int n_decode_samples;
    double sum_decode_gap;
    int32_t *replay;      /* [max_ctx] prompt + generated, for START on recovery */
    int loading;          /* nodes are busy loading: silence is not loss (closed links still are) */
};

int coord_n_vocab(const coord *c) { return c->desc.n_vocab; }
int coord_n_stages(const coord *c) { return c->n_stages; }

static void peer_lost(coord *c, cpeer *p, const char *why) {
    if (!p->alive) return;
    ST_ERROR("node %s (%s) lost: %s", p->addr, p->info.node_id, why);
    p->alive = 0;
    xport_close(p->x);
    p->x = NULL;
}

/* Heartbeats: pings every heartbeat_ms, declares nodes silent for dead_ms lost. Returns the
 * number of nodes lost in this call. */
static int heartbeat(coord *c) {
    uint64_t now = st_time_ns(), hb = (uint64_t)c->o.heartbeat_ms * 1000000ull, dead = (uint64_t)c->o.dead_ms * 1000000ull;
    int lost = 0;
    for (int i = 0; i < c->n_peers; i++) {
        cpeer *p = &c->peers[i];
        if (!p->alive) continue;
        if (now - p->last_ping >= hb) {
            st_err err = {0};
            p->last_ping = now;
            if (xport_send_copy(p->x, CP_PING, &now, sizeof now, &err)) {
                peer_lost(c, p, err.msg);
                lost++;
                continue;
            }
        }
        if (c->loading) p->last_seen = now;
        if (now - p->last_seen > dead) {
            peer_lost(c, p, "no heartbeat");
            lost++;
        }
    }
    return lost;
}

/* Polls every live control link once (waiting up to timeout_ms) and passes each message to
 * fn. A broken link marks its node lost. Returns the number of nodes lost. */
typedef void (*msg_fn)(coord *c, cpeer *p, const xport_msg *m, void *ud);
static int pump(coord *c, int timeout_ms, msg_fn fn, void *ud) {
    xport *xs[CLUSTER_MAX_PEERS];
    for (int i = 0; i < c->n_peers; i++) xs[i] = c->peers[i].alive ? c->peers[i].x : NULL;
    xport_wait(xs, c->n_peers, NULL, 0, timeout_ms);
    int lost = 0;
    for (int i = 0; i < c->n_peers; i++) {
        cpeer *p = &c->peers[i];
        while (p->alive) {
            xport_msg m;
            st_err err = {0};
            int r = xport_recv(p->x, &m, &err);
            if (r < 0) {
                peer_lost(c, p, err.msg);
                lost++;
                break;
            }
            if (r == 0) break;
            p->last_seen = st_time_ns();
            if (m.type == CP_ERROR) ST_WARN("node %s: %.*s", p->addr, (int)m.len, (const char *)m.data);
            else if (m.type != CP_PONG && fn) fn(c, p, &m, ud);
            xport_release(p->x);
        }
        if (p->alive) xport_flush(p->x);
    }
    return lost + heartbeat(c);
}

/* ------------------------------------------------------------------------------------------ */
/* formation and loading                                                                       */

typedef struct wait_ctx {
    int type;
    int got[CLUSTER_MAX_PEERS];
    uint8_t buf[CLUSTER_MAX_PEERS][sizeof(cp_loaded) > sizeof(cp_info) ? sizeof(cp_loaded) : sizeof(cp_info)];
} wait_ctx;

static void on_reply(coord *c, cpeer *p, const xport_msg *m, void *ud) {
    wait_ctx *w = ud;
    int i = (int)(p - c->peers);
    if (m->type != w->type) return;
    size_t want = w->type == CP_INFO ? sizeof(cp_info) : sizeof(cp_loaded);
    if (m->len != want) return;
    memcpy(w->buf[i], m->data, want);
    w->got[i] = 1;
}

/* Waits until every peer with need[i] replied with type (or was lost), up to timeout. */
static int wait_replies(coord *c, wait_ctx *w, const int *need, int timeout_ms, st_err *err) {
    uint64_t end = st_time_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int missing = 0;
        for (int i = 0; i < c->n_peers; i++) {
            if (!need[i]) continue;
            if (!c->peers[i].alive) return st_err_set(err, ST_ERR_NET, "node %s lost while waiting for it", c->peers[i].addr);
            if (!w->got[i]) missing++;
        }
        if (!missing) return 0;
        if (st_time_ns() > end) return st_err_set(err, ST_ERR_NET, "timed out waiting for %d node(s)", missing);
        pump(c, 50, on_reply, w);
    }
}

/* Even split of the layers over the first n live peers (in --peers order), then LOAD. */
static int plan_and_load(coord *c, st_err *err) {
    int alive[CLUSTER_MAX_PEERS], na = 0;
    for (int i = 0; i < c->n_peers; i++) {
        c->peers[i].stage = -1;
        if (c->peers[i].alive) alive[na++] = i;
    }
    if (na == 0) return st_err_set(err, ST_ERR_NET, "no live nodes left");
    int L = c->desc.n_layer, S = na;
    if (c->o.n_stages > 0 && c->o.n_stages < S) S = c->o.n_stages;
    if (S > L) S = L;
    if (S > CLUSTER_MAX_STAGES) S = CLUSTER_MAX_STAGES;
    c->n_stages = S;
    c->epoch++;
    for (int s = 0; s < S; s++) c->stage_peer[s] = alive[s], c->peers[alive[s]].stage = s;
    int need[CLUSTER_MAX_PEERS] = {0};
    for (int s = 0; s < S; s++) {
        cpeer *p = &c->peers[c->stage_peer[s]];
        cp_load l = {.epoch = c->epoch, .layer_begin = s * L / S, .layer_end = (s + 1) * L / S, .with_embed = s == 0,
                     .with_output = s == S - 1, .stage = s, .n_stages = S, .max_ctx = c->o.max_ctx,
                     .n_slots = c->o.n_slots, .max_batch = c->o.max_batch, .n_threads = c->o.n_threads,
                     .n_buffers = c->o.n_buffers, .max_inflight = c->o.max_inflight, .data_mac = c->o.data_mac,
                     .xport_pref = c->o.xport_pref, .exact = c->o.exact};
        snprintf(l.model_dir, sizeof l.model_dir, "%s", c->o.model_dir);
        snprintf(l.next_addr, sizeof l.next_addr, "%s", c->peers[c->stage_peer[(s + 1) % S]].addr);
        ST_INFO("plan (epoch %llu): stage %d on %s: layers %d..%d%s%s", (unsigned long long)c->epoch, s, p->addr,
                l.layer_begin, l.layer_end - 1, l.with_embed ? " +embed" : "", l.with_output ? " +output" : "");
        if (xport_send_copy(p->x, CP_LOAD, &l, sizeof l, err)) return err->code;
        need[c->stage_peer[s]] = 1;
    }
    wait_ctx *w = calloc(1, sizeof *w);
    if (!w) return st_err_set(err, ST_ERR_NOMEM, "wait");
    w->type = CP_LOADED;
    c->loading = 1;
    int rc = wait_replies(c, w, need, 300000, err);
    c->loading = 0;
    for (int s = 0; rc == 0 && s < S; s++) {
        cp_loaded r;
        memcpy(&r, w->buf[c->stage_peer[s]], sizeof r);
        r.msg[sizeof r.msg - 1] = 0;
        r.next_kind[sizeof r.next_kind - 1] = 0;
        if (r.status) rc = st_err_set(err, r.status, "node %s: %s", c->peers[c->stage_peer[s]].addr, r.msg);
        else {
            char a[32], b[32], d[32];
            ST_INFO("stage %d ready on %s: weights %s, KV %s, rss %s, next hop %s", s, c->peers[c->stage_peer[s]].addr,
                    st_fmt_bytes((double)r.weight_bytes, a, sizeof a), st_fmt_bytes((double)r.kv_bytes, b, sizeof b),
                    st_fmt_bytes((double)r.rss_bytes, d, sizeof d), r.next_kind[0] ? r.next_kind : "-");
            if (s == 0) snprintf(c->data_kind, sizeof c->data_kind, "%s", r.next_kind[0] ? r.next_kind : "none");
        }
    }
    free(w);
    return rc;
}

int coord_init(coord **out, const coord_opts *o, st_err *err) {
    *out = NULL;
    coord *c = calloc(1, sizeof *c);
    if (!c) return st_err_set(err, ST_ERR_NOMEM, "coord");
    c->o = *o;
    if (!c->o.n_slots) c->o.n_slots = 1;
    if (!c->o.max_batch) c->o.max_batch = 64;
    if (!c->o.n_buffers) c->o.n_buffers = 8;
    if (!c->o.max_inflight) c->o.max_inflight = 256;
    if (!c->o.heartbeat_ms) c->o.heartbeat_ms = 200;
    if (!c->o.dead_ms) c->o.dead_ms = 1500;
    if (!c->o.stall_ms) c->o.stall_ms = 10000;
    int rc;
    if ((rc = xport_key_init(&c->key, o->cluster_key, err))) goto fail;
    if ((rc = model_desc_load(&c->desc, o->model_dir, err))) goto fail;
    if (!c->o.max_ctx) c->o.max_ctx = c->desc.max_pos > 0 && c->desc.max_pos < 4096 ? (int)c->desc.max_pos : 4096;
    c->replay = malloc((size_t)c->o.max_ctx * sizeof(int32_t));
    if (!c->replay) {
        rc = st_err_set(err, ST_ERR_NOMEM, "replay buffer");
        goto fail;
    }
    size_t a = sizeof(dp_token) + (size_t)c->desc.n_vocab * 4, b = sizeof(cp_seq) + (size_t)c->o.max_ctx * 4;
    c->ctrl_payload = (a > b ? a : b) + 4096;
    /* peers */
    const char *s = o->peers;
    while (s && *s) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (c->n_peers == CLUSTER_MAX_PEERS || n == 0 || n >= sizeof c->peers[0].addr) {
            rc = st_err_set(err, ST_ERR_ARG, "--peers: bad list (at most %d HOST:PORT entries)", CLUSTER_MAX_PEERS);
            goto fail;
        }
        memcpy(c->peers[c->n_peers].addr, s, n);
        c->peers[c->n_peers++].addr[n] = 0;
        s = e ? e + 1 : NULL;
    }
    if (c->n_peers == 0) {
        rc = st_err_set(err, ST_ERR_ARG, "--peers: no nodes given");
        goto fail;
    }
    xport_opts xo = {.n_buffers = 8, .max_inflight = 256, .max_payload = c->ctrl_payload, .role = XPORT_ROLE_CONTROL,
                     .pref = XPORT_PREF_TCP, .node_id = "coordinator", .timeout_ms = 5000};
    int need[CLUSTER_MAX_PEERS] = {0};
    for (int i = 0; i < c->n_peers; i++) {
        cpeer *p = &c->peers[i];
        if ((rc = xport_connect(&p->x, p->addr, &c->key, &xo, err))) goto fail;
        p->alive = 1;
        p->last_seen = p->last_ping = st_time_ns();
        if ((rc = xport_send_copy(p->x, CP_INFO_REQ, NULL, 0, err))) goto fail;
        need[i] = 1;
    }
    wait_ctx *w = calloc(1, sizeof *w);
    if (!w) {
        rc = st_err_set(err, ST_ERR_NOMEM, "wait");
        goto fail;
    }
    w->type = CP_INFO;
    rc = wait_replies(c, w, need, 10000, err);
    for (int i = 0; rc == 0 && i < c->n_peers; i++) {
        memcpy(&c->peers[i].info, w->buf[i], sizeof(cp_info));
        cp_info *in = &c->peers[i].info;
        in->node_id[sizeof in->node_id - 1] = 0, in->host[sizeof in->host - 1] = 0;
        char x1[32], x2[32];
        ST_INFO("node %s: id %s host %s, %d cores, memory %s / %s free, bandwidth %.1f GB/s", c->peers[i].addr,
                in->node_id, in->host, in->cores, st_fmt_bytes((double)in->mem_total, x1, sizeof x1),
                st_fmt_bytes((double)in->mem_free, x2, sizeof x2), in->bw_bytes_s / 1e9);
    }
    free(w);
    if (rc) goto fail;
    if ((rc = plan_and_load(c, err))) goto fail;
    *out = c;
    return 0;
fail:
    coord_free(c);
    return rc ? rc : ST_ERR_INTERNAL;
}

void coord_free(coord *c) {
    if (!c) return;
    for (int i = 0; i < c->n_peers; i++) xport_close(c->peers[i].x);
    model_desc_free(&c->desc);
    free(c->replay);
    free(c);
}

/* ------------------------------------------------------------------------------------------ */
/* generation                                                                                  */

typedef struct gen_ctx {
    cseq *seqs;
    int n;
    coord_token_fn cb;
    void *ud;
    int n_tokens;
} gen_ctx;

/* Sends START for sequence q: its prompt plus whatever it generated so far (replay). */
static int send_start(coord *c, cseq *q, st_err *err) {
    coord_seq *s = q->s;
    int n_hist = s->n_prompt + s->n_out;
    if (n_hist >= c->o.max_ctx)
        return st_err_set(err, ST_ERR_LIMIT, "sequence of %d tokens exceeds the context %d", n_hist, c->o.max_ctx);
    cp_seq m = {.epoch = c->epoch, .seq_id = q->id, .slot = q->slot, .n_prompt = n_hist,
                .max_tokens = s->max_tokens - s->n_out, .want_logits = c->o.want_logits,
                .top_k = s->params.top_k, .temperature = s->params.temperature, .top_p = s->params.top_p,
                .min_p = s->params.min_p, .repetition_penalty = s->params.repetition_penalty,
                .presence_penalty = s->params.presence_penalty, .frequency_penalty = s->params.frequency_penalty,
                .seed = s->params.seed + (uint64_t)s->n_out};
    if (s->n_eos < 0) {
        m.n_eos = c->desc.n_eos < CP_MAX_EOS ? c->desc.n_eos : CP_MAX_EOS;
        memcpy(m.eos, c->desc.eos_ids, (size_t)m.n_eos * 4);
    } else {
        m.n_eos = s->n_eos < CP_MAX_EOS ? s->n_eos : CP_MAX_EOS;
        if (m.n_eos) memcpy(m.eos, s->eos, (size_t)m.n_eos * 4);
    }
    memcpy(c->replay, s->prompt, (size_t)s->n_prompt * 4);
    if (s->n_out) memcpy(c->replay + s->n_prompt, s->out_ids, (size_t)s->n_out * 4);
    cpeer *p = &c->peers[c->stage_peer[0]];
    size_t len = sizeof m + (size_t)n_hist * 4;
    uint8_t *b = xport_send_buf(p->x, len);
    if (!b) return st_err_set(err, ST_ERR_NET, "stage 0 (%s) unavailable", p->addr);
    memcpy(b, &m, sizeof m);
    memcpy(b + sizeof m, c->replay, (size_t)n_hist * 4);
    return xport_send(p->x, CP_START, len, err);
}

static void on_gen(coord *c, cpeer *p, const xport_msg *m, void *ud) {
    gen_ctx *g = ud;
    if (m->type != CP_TOKEN || m->len < sizeof(dp_token)) return;
    dp_token t;
    memcpy(&t, m->data, sizeof t);
    if (t.epoch != c->epoch) return; /* before a recovery */
    cseq *q = NULL;
    for (int i = 0; i < g->n; i++)
        if (g->seqs[i].id == t.seq_id) q = &g->seqs[i];
    if (!q || q->done) return;
    coord_seq *s = q->s;
    if (s->n_out >= s->max_tokens) return;
    uint64_t now = st_time_ns();
    if (t.token >= 0) {
        s->out_ids[s->n_out++] = t.token;
        g->n_tokens++;
    }
    if (s->n_out == 1) s->t_first_s = (double)(now - q->t_start) / 1e9;
    if (!t.prefill && q->t_last) {
        /* a decode step: its timing */
        c->sum_decode_gap += (double)(now - q->t_last);
        c->n_decode_samples++;
        for (int k = 0; k < c->n_stages; k++) c->sum_compute[k] += (double)t.compute_ns[k];
        for (int k = 0; k < c->n_stages; k++)
            if (t.hop_ns[k]) c->sum_hop[k] += (double)t.hop_ns[k], c->n_hop_samples[k]++;
    }
    q->t_last = now;
    const float *lg = t.n_logits == c->desc.n_vocab && m->len == sizeof t + (size_t)t.n_logits * 4
                          ? (const float *)(m->data + sizeof t)
                          : NULL;
    if (g->cb && t.token >= 0) g->cb(g->ud, (int)(q - g->seqs), t.token, lg, c->desc.n_vocab);
    if (t.done || t.token < 0 || s->n_out >= s->max_tokens) q->done = 1;
}

/* Re-plans on the live nodes, reloads and replays every unfinished sequence. */
static int recover(coord *c, gen_ctx *g, st_err *err) {
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].stage >= 0 && !c->peers[i].alive) ST_WARN("stage %d (%s) lost: re-planning", c->peers[i].stage, c->peers[i].addr);
    int rc = plan_and_load(c, err);
    if (rc) return st_err_prefix(err, "recovery failed"), rc;
    for (int i = 0; i < g->n; i++) {
        cseq *q = &g->seqs[i];
        if (q->done) continue;
        q->t_last = 0;
        if ((rc = send_start(c, q, err))) return rc;
        ST_INFO("sequence %d: replaying %d tokens", i, q->s->n_prompt + q->s->n_out);
    }
    return 0;
}

int coord_generate_many(coord *c, coord_seq *seqs, int n_seqs, coord_token_fn cb, void *ud, coord_stats *stats,
                        st_err *err) {
    if (n_seqs < 1 || n_seqs > c->o.n_slots)
        return st_err_set(err, ST_ERR_ARG, "%d sequences for %d slots", n_seqs, c->o.n_slots);
    cseq *qs = calloc((size_t)n_seqs, sizeof *qs);
    if (!qs) return st_err_set(err, ST_ERR_NOMEM, "sequences");
    memset(c->sum_compute, 0, sizeof c->sum_compute);
    memset(c->sum_hop, 0, sizeof c->sum_hop);
    memset(c->n_hop_samples, 0, sizeof c->n_hop_samples);
    c->n_decode_samples = 0, c->sum_decode_gap = 0;
    gen_ctx g = {.seqs = qs, .n = n_seqs, .cb = cb, .ud = ud};
    int rc = 0, n_rec = 0;
    double rec_s = 0;
    uint64_t t0 = st_time_ns();
    for (int i = 0; i < n_seqs && !rc; i++) {
        qs[i].s = &seqs[i];
        qs[i].id = ++c->next_seq;
        qs[i].slot = i;
        seqs[i].n_out = 0;
        qs[i].t_start = st_time_ns();
        if (seqs[i].n_prompt < 1 || seqs[i].max_tokens < 1) rc = st_err_set(err, ST_ERR_ARG, "empty prompt or max_tokens < 1");
        else rc = send_start(c, &qs[i], err);
    }
    uint64_t last_progress = st_time_ns();
    int last_tokens = 0, stalls = 0;
    while (!rc) {
        int left = 0;
        for (int i = 0; i < n_seqs; i++) left += !qs[i].done;
        if (!left) break;
        int lost = pump(c, 20, on_gen, &g);
        if (g.n_tokens != last_tokens) last_tokens = g.n_tokens, last_progress = st_time_ns();
        else if (st_time_ns() - last_progress > (uint64_t)c->o.stall_ms * 1000000ull) {
            /* every node answers heartbeats but no token arrives: a frame was lost inside the
             * pipeline. Reload and replay, a few times at most. */
            if (++stalls > 3) {
                rc = st_err_set(err, ST_ERR_NET, "no progress for %d ms after %d reloads", c->o.stall_ms, stalls - 1);
                break;
            }
            ST_WARN("no token for %d ms: reloading the pipeline and replaying", c->o.stall_ms);
            uint64_t r0 = st_time_ns();
            rc = recover(c, &g, err);
            rec_s += (double)(st_time_ns() - r0) / 1e9;
            n_rec++;
            last_progress = st_time_ns();
            continue;
        }
        int stage_lost = 0;
        for (int i = 0; i < c->n_peers; i++)
            if (c->peers[i].stage >= 0 && !c->peers[i].alive) stage_lost = 1;
        if (lost || stage_lost) {
            if (!stage_lost) continue;
            uint64_t r0 = st_time_ns();
            rc = recover(c, &g, err);
            rec_s += (double)(st_time_ns() - r0) / 1e9;
            n_rec++;
        }
    }
    double wall = (double)(st_time_ns() - t0) / 1e9;
    if (stats) {
        memset(stats, 0, sizeof *stats);
        stats->n_stages = c->n_stages;
        stats->n_tokens = g.n_tokens;
        stats->n_recoveries = n_rec;
        stats->recovery_s = rec_s;
        stats->wall_s = wall;
        stats->tok_s = wall > 0 ? g.n_tokens / wall : 0;
        snprintf(stats->data_link, sizeof stats->data_link, "%s", c->data_kind);
        int nd = c->n_decode_samples;
        if (nd) {
            stats->decode_token_ms = c->sum_decode_gap / nd / 1e6;
            double sum = 0;
            for (int k = 0; k < c->n_stages; k++) {
                stats->stage_compute_ms[k] = c->sum_compute[k] / nd / 1e6;
                sum += stats->stage_compute_ms[k];
                if (c->n_hop_samples[k]) stats->hop_ms[k] = c->sum_hop[k] / c->n_hop_samples[k] / 1e6;
                if (c->n_stages > 1) sum += stats->hop_ms[k];
            }
            stats->orch_us_per_token = (stats->decode_token_ms - sum) * 1e3;
        }
    }
    free(qs);
    return rc;
}

int coord_generate(coord *c, const int32_t *prompt, int n_prompt, const smp_params *params, int max_tokens,
                   const int32_t *eos, int n_eos, int32_t *out_ids, int *n_out, coord_token_fn cb, void *ud,
                   coord_stats *stats, st_err *err) {
    coord_seq s = {.prompt = prompt, .n_prompt = n_prompt, .params = params ? *params : smp_params_default(),
                   .max_tokens = max_tokens, .eos = eos, .n_eos = n_eos, .out_ids = out_ids};
    if (!params) s.params.temperature = 0;
    int rc = coord_generate_many(c, &s, 1, cb, ud, stats, err);
    if (n_out) *n_out = s.n_out;
    return rc;
}
