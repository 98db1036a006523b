/* coord.c — the coordinator: connect, plan (the placement solver on the measured cluster,
 * coord_plan.c; or an even split by layers), load, generate, recover.
 * See include/strata/cluster.h. Single-threaded: every wait is a poll over the control
 * links with heartbeats sent and checked on the way. */
#include "cluster_proto.h"
#include "strata/synth.h"
#include "coord_plan.h"
#include "strata/model.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

typedef struct cpeer {
    char addr[64];
    xport *x;
    int alive;
    cp_info info;
    uint64_t last_seen, last_ping;
    int stage; /* -1: unused in the current plan */
} cpeer;

typedef struct aseq aseq; /* a submitted sequence (generation section) */

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
    double sum_inv_rows;       /* sum over decode tokens of 1 / rows of their step: the steps */
    int32_t *replay;      /* [max_ctx] prompt + generated, for START on recovery */
    int loading;          /* nodes are busy loading: silence is not loss (closed links still are) */
    cp_load stage_load[CLUSTER_MAX_STAGES];     /* what each stage was told to load            */
    cp_loaded stage_loaded[CLUSTER_MAX_STAGES]; /* what it reported                            */
    cplan *pl;            /* the placement solver's view (NULL: even split; coord_plan.c)      */
    lp_survey *sv;        /* nodes' devices and measured links, in peers order                 */
    /* asynchronous generation (owner thread; see the generation section) */
    aseq **slot_seq;      /* [n_slots] the sequence running in each slot, NULL = free          */
    uint8_t *slot_dirty;  /* [n_slots] a cancelled sequence may still run there: tombstone it  */
    aseq *qhead, *qtail;  /* waiting for a slot, FIFO                                          */
    aseq *dead;           /* done or cancelled, freed at the end of the current call           */
    int n_active, n_queued;
    int wake_rd, wake_wr; /* coord_wake's pipe, in every poll's wait                           */
    int in_poll;          /* inside coord_poll: submit/cancel defer the dispatch               */
    coord_event_fn ev_fn;
    void *ev_ud;
    uint64_t last_progress; /* last token (stall detection)                                    */
    int stalls;           /* reloads since the last token                                      */
    uint64_t last_poll;   /* end of the previous coord_poll                                    */
    int broken;           /* recovery failed: every submission fails with broken_msg           */
    char broken_msg[256];
    coord_totals tot;
};

static int async_init(coord *c, st_err *err);
static void async_free(coord *c);

int coord_n_vocab(const coord *c) { return c->desc.n_vocab; }
int coord_n_stages(const coord *c) { return c->n_stages; }
void coord_get_plan(const coord *c, coord_plan_info *out) { cplan_get_info(c->pl, out); }

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
    xport_wait(xs, c->n_peers, c->wake_rd >= 0 ? &c->wake_rd : NULL, c->wake_rd >= 0, timeout_ms);
    if (c->wake_rd >= 0) {
        char buf[64];
        while (read(c->wake_rd, buf, sizeof buf) > 0) {
        }
    }
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

/* How many sequences' decode rows stage 0 may run as one step (cp_load.batch_rows) on the
 * S stages just placed: all slots up to COORD_CPU_BATCH and the prefill chunk, when every stage
 * is a CPU node; 1 (a step per sequence) with one slot, or with a GPU stage (its batched path
 * is not built yet). STRATA_BATCH_ROWS=N replaces COORD_CPU_BATCH: 0 or 1 turn batching off,
 * N > 8 (up to CP_BATCH_MAX) trades bit-identical outputs for throughput at high concurrency
 * on many-core nodes, where a GEMM over many rows reads the weights once. */
#define COORD_CPU_BATCH 8 /* a CPU step of up to 8 rows runs every row exactly as alone (fused
                           * passes of <= 4 rows, cpu_simd.c), so batching never changes a
                           * sequence's output; beyond 8 the prefill kernels sum in other orders */
static int batch_rows(const coord *c, int S) {
    int cap = COORD_CPU_BATCH;
    const char *e = getenv("STRATA_BATCH_ROWS");
    if (e && *e) {
        char *end;
        long v = strtol(e, &end, 10);
        if (*end || v < 0 || v > CP_BATCH_MAX) ST_WARN("STRATA_BATCH_ROWS=%s is not a row count 0..%d: ignored", e, CP_BATCH_MAX);
        else cap = (int)v;
    }
    int b = c->o.n_slots < cap ? c->o.n_slots : cap;
    if (b > c->o.max_batch) b = c->o.max_batch;
    for (int s = 0; s < S; s++)
        if (!strncmp(c->peers[c->stage_peer[s]].info.dev_kind, "cuda", 4)) b = 1;
    return b < 1 ? 1 : b;
}

/* Places the layers on the live peers (the solver, or an even split in --peers order), then
 * LOADs every stage and, in planner mode, checks what each reports against its budget. */
static int plan_and_load(coord *c, st_err *err) {
    int alive[CLUSTER_MAX_PEERS], na = 0;
    for (int i = 0; i < c->n_peers; i++) {
        c->peers[i].stage = -1;
        if (c->peers[i].alive) alive[na++] = i;
    }
    if (na == 0) return st_err_set(err, ST_ERR_NET, "no live nodes left");
    int L = c->desc.n_layer, S = na;
    int lb[CLUSTER_MAX_STAGES], le[CLUSTER_MAX_STAGES];
    if (c->pl) { /* the placement solver on the live nodes */
        cplan_stage st[PLAN_MAX_DEVICES];
        int rc = cplan_solve(c->pl, c->sv, alive, na, st, &S, err);
        if (rc) return rc;
        for (int s = 0; s < S; s++) alive[s] = st[s].node, lb[s] = st[s].layer_begin, le[s] = st[s].layer_end;
    } else {
        if (c->o.n_stages > 0 && c->o.n_stages < S) S = c->o.n_stages;
        if (S > L) S = L;
        if (S > CLUSTER_MAX_STAGES) S = CLUSTER_MAX_STAGES;
        for (int s = 0; s < S; s++) lb[s] = s * L / S, le[s] = (s + 1) * L / S;
    }
    c->n_stages = S;
    c->epoch++;
    for (int s = 0; s < S; s++) c->stage_peer[s] = alive[s], c->peers[alive[s]].stage = s;
    const int batch = batch_rows(c, S);
    if (batch > 1) ST_INFO("plan (epoch %llu): decode steps batch up to %d sequences", CP_EPOCH_SEQ(c->epoch), batch);
    int need[CLUSTER_MAX_PEERS] = {0};
    for (int s = 0; s < S; s++) {
        cpeer *p = &c->peers[c->stage_peer[s]];
        cp_load l = {.epoch = c->epoch, .layer_begin = lb[s], .layer_end = le[s], .with_embed = s == 0,
                     .with_output = s == S - 1, .stage = s, .n_stages = S, .max_ctx = c->o.max_ctx,
                     .n_slots = c->o.n_slots, .max_batch = c->o.max_batch, .n_threads = c->o.n_threads,
                     .n_buffers = c->o.n_buffers, .max_inflight = c->o.max_inflight, .data_mac = c->o.data_mac,
                     .xport_pref = c->o.xport_pref, .exact = c->o.exact, .nccl = c->o.nccl,
                     .batch_rows = batch};
        snprintf(l.model_dir, sizeof l.model_dir, "%s", c->o.model_dir);
        snprintf(l.next_addr, sizeof l.next_addr, "%s", c->peers[c->stage_peer[(s + 1) % S]].addr);
        ST_INFO("plan (epoch %llu): stage %d on %s: layers %d..%d%s%s", CP_EPOCH_SEQ(c->epoch), s, p->addr,
                l.layer_begin, l.layer_end - 1, l.with_embed ? " +embed" : "", l.with_output ? " +output" : "");
        c->stage_load[s] = l;
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
        c->stage_loaded[s] = r;
        if (r.status) rc = st_err_set(err, r.status, "node %s: %s", c->peers[c->stage_peer[s]].addr, r.msg);
        else {
            char a[32], b[32], d[32];
            ST_INFO("stage %d ready on %s: weights %s, KV %s, rss %s, next hop %s", s, c->peers[c->stage_peer[s]].addr,
                    st_fmt_bytes((double)r.weight_bytes, a, sizeof a), st_fmt_bytes((double)r.kv_bytes, b, sizeof b),
                    st_fmt_bytes((double)r.rss_bytes, d, sizeof d), r.next_kind[0] ? r.next_kind : "-");
            if (s == 0) snprintf(c->data_kind, sizeof c->data_kind, "%s", r.next_kind[0] ? r.next_kind : "none");
            if (c->pl) cplan_check(c->pl, s, c->peers[c->stage_peer[s]].addr, r.weight_bytes, r.kv_bytes, r.rss_bytes);
        }
    }
    free(w);
    return rc;
}

/* Planner mode: the model's figures and, with several nodes, the measured link matrix
 * (coord_plan.c). Nothing to do for an even split. */
static int coord_survey_init(coord *c, st_err *err) {
    if (c->o.split == COORD_SPLIT_EVEN || c->o.n_stages > 0) return 0;
    c->sv = calloc(1, sizeof *c->sv);
    if (!c->sv) return st_err_set(err, ST_ERR_NOMEM, "survey");
    c->sv->n = c->n_peers;
    xport *xs[CLUSTER_MAX_PEERS];
    for (int i = 0; i < c->n_peers; i++) {
        snprintf(c->sv->addr[i], sizeof c->sv->addr[i], "%s", c->peers[i].addr);
        c->sv->info[i] = c->peers[i].info;
        xs[i] = c->peers[i].x;
    }
    int rc = cplan_init(&c->pl, &c->o, &c->desc, c->ctrl_payload, err);
    if (!rc && (c->n_peers > 1 || c->o.calib_mb > 0)) {
        uint64_t t0 = st_time_ns();
        rc = lp_survey_links(c->sv, xs, c->o.xport_pref, c->o.probe_pings,
                             c->o.probe_bytes ? c->o.probe_bytes : LP_DEFAULT_BYTES, c->o.calib_mb, err);
        if (!rc) ST_INFO("link probes: %d nodes in %.2f s", c->n_peers, (double)(st_time_ns() - t0) / 1e9);
    }
    /* the probes took the nodes' attention: they are not silent */
    for (int i = 0; i < c->n_peers; i++) c->peers[i].last_seen = c->peers[i].last_ping = st_time_ns();
    return rc;
}

int coord_init(coord **out, const coord_opts *o, st_err *err) {
    *out = NULL;
    coord *c = calloc(1, sizeof *c);
    if (!c) return st_err_set(err, ST_ERR_NOMEM, "coord");
    c->o = *o;
    c->wake_rd = c->wake_wr = -1;
    if (!c->o.n_slots) c->o.n_slots = 1;
    if (!c->o.max_batch) c->o.max_batch = 64;
    if (!c->o.n_buffers) c->o.n_buffers = 8;
    if (!c->o.max_inflight) c->o.max_inflight = 256;
    if (!c->o.heartbeat_ms) c->o.heartbeat_ms = 200;
    if (!c->o.dead_ms) c->o.dead_ms = 1500;
    if (!c->o.stall_ms) c->o.stall_ms = 10000;
    { /* this run's id in the epochs' high bits (cp_epoch_same_run): nonzero, random */
        uint32_t run = 0;
        if (getrandom(&run, sizeof run, 0) != (ssize_t)sizeof run || !run)
            run = (uint32_t)(st_time_ns() ^ ((uint64_t)getpid() << 16)) | 1u;
        c->epoch = (uint64_t)run << 32;
    }
    int rc;
    if ((rc = xport_key_init(&c->key, o->cluster_key, err))) goto fail;
    if ((rc = async_init(c, err))) goto fail;
    /* "synthetic:PRESET[:QUANT]": nodes generate the preset's weights themselves (no files) */
    if (!strncmp(o->model_dir, "synthetic:", 10)) {
        if ((rc = synth_preset_desc(o->model_dir + 10, &c->desc, err))) goto fail;
    } else if ((rc = model_desc_load(&c->desc, o->model_dir, err))) goto fail;
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
    if ((rc = coord_survey_init(c, err))) goto fail;
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
    async_free(c);
    model_desc_free(&c->desc);
    free(c->replay);
    cplan_free(c->pl);
    free(c->sv);
    free(c);
}

/* ------------------------------------------------------------------------------------------ */
/* generation: sequences in slots, events, recovery (see "asynchronous generation" in
 * strata/cluster.h). Everything here runs on the owner thread; only coord_wake is not. */

/* One submitted sequence. Allocated by coord_submit, freed (via the dead list) once it is
 * done or cancelled; hist holds what a replay needs. */
typedef struct aseq {
    uint64_t id;
    int slot;                 /* -1 while queued                                                */
    int32_t *hist;            /* (cap,) prompt then generated ids                               */
    int cap, n_prompt, n_out, max_tokens;
    smp_params params;        /* logit_bias NULL                                                 */
    int32_t eos[CP_MAX_EOS];
    int n_eos;
    uint64_t t_last;          /* arrival of the previous token (decode-gap statistics)          */
    struct aseq *next;        /* queue / dead list                                               */
} aseq;

int coord_n_active(const coord *c) { return c->n_active; }
int coord_n_queued(const coord *c) { return c->n_queued; }
void coord_get_totals(const coord *c, coord_totals *t) { *t = c->tot; }

void coord_wake(coord *c) {
    if (!c || c->wake_wr < 0) return;
    char b = 1;
    if (write(c->wake_wr, &b, 1) < 0) { /* full pipe: a wake-up is already pending */
    }
}

/* Creates the slot table and the wake-up pipe (coord_init). */
static int async_init(coord *c, st_err *err) {
    c->wake_rd = c->wake_wr = -1;
    c->slot_seq = calloc((size_t)c->o.n_slots, sizeof *c->slot_seq);
    c->slot_dirty = calloc((size_t)c->o.n_slots, 1);
    if (!c->slot_seq || !c->slot_dirty) return st_err_set(err, ST_ERR_NOMEM, "slot table");
    int pp[2];
    if (pipe(pp)) return st_err_set(err, ST_ERR_IO, "pipe: %s", strerror(errno));
    fcntl(pp[0], F_SETFL, O_NONBLOCK);
    fcntl(pp[1], F_SETFL, O_NONBLOCK);
    c->wake_rd = pp[0], c->wake_wr = pp[1];
    return 0;
}

static void aseq_free(aseq *q) {
    if (!q) return;
    free(q->hist);
    free(q);
}

/* Frees every sequence, the table and the pipe (coord_free). */
static void async_free(coord *c) {
    for (aseq *q = c->qhead, *n; q; q = n) n = q->next, aseq_free(q);
    for (aseq *q = c->dead, *n; q; q = n) n = q->next, aseq_free(q);
    if (c->slot_seq)
        for (int s = 0; s < c->o.n_slots; s++) aseq_free(c->slot_seq[s]);
    free(c->slot_seq);
    free(c->slot_dirty);
    if (c->wake_rd >= 0) close(c->wake_rd), close(c->wake_wr);
}

static void emit(coord *c, const coord_event *ev) {
    if (c->ev_fn) c->ev_fn(c->ev_ud, ev);
}

/* Sends START for q into its slot: the prompt plus whatever it generated so far (a replay
 * after recovery continues where it stopped; the sampler is re-seeded with seed + n_out). */
static int send_start(coord *c, aseq *q, st_err *err) {
    int n_hist = q->n_prompt + q->n_out;
    if (n_hist >= c->o.max_ctx)
        return st_err_set(err, ST_ERR_LIMIT, "sequence of %d tokens exceeds the context %d", n_hist, c->o.max_ctx);
    const smp_params *sp = &q->params;
    cp_seq m = {.epoch = c->epoch, .seq_id = q->id, .slot = q->slot, .n_prompt = n_hist,
                .max_tokens = q->max_tokens - q->n_out, .want_logits = c->o.want_logits, .top_k = sp->top_k,
                .temperature = sp->temperature, .top_p = sp->top_p, .min_p = sp->min_p,
                .repetition_penalty = sp->repetition_penalty, .presence_penalty = sp->presence_penalty,
                .frequency_penalty = sp->frequency_penalty, .seed = sp->seed + (uint64_t)q->n_out, .n_eos = q->n_eos};
    memcpy(m.eos, q->eos, sizeof m.eos);
    cpeer *p = &c->peers[c->stage_peer[0]];
    size_t len = sizeof m + (size_t)n_hist * 4;
    uint8_t *b = p->alive ? xport_send_buf(p->x, len) : NULL;
    if (!b) return st_err_set(err, ST_ERR_NET, "stage 0 (%s) unavailable", p->addr);
    memcpy(b, &m, sizeof m);
    memcpy(b + sizeof m, q->hist, (size_t)n_hist * 4);
    return xport_send(p->x, CP_START, len, err);
}

/* A one-token, one-step START into slot s under a fresh id: stage 0 then drops the tokens of
 * the cancelled sequence that ran there, so its chain stops; its own token is ignored here. */
static void send_tombstone(coord *c, int s) {
    cp_seq m = {.epoch = c->epoch, .seq_id = ++c->next_seq, .slot = s, .n_prompt = 1, .max_tokens = 1};
    int32_t tok = 0;
    cpeer *p = &c->peers[c->stage_peer[0]];
    uint8_t *b = p->alive ? xport_send_buf(p->x, sizeof m + 4) : NULL;
    if (!b) return;
    memcpy(b, &m, sizeof m);
    memcpy(b + sizeof m, &tok, 4);
    st_err err = {0};
    if (xport_send(p->x, CP_START, sizeof m + 4, &err)) ST_DEBUG("tombstone for slot %d: %s", s, err.msg);
}

/* Gives free slots to queued sequences (FIFO), tombstones freed slots nobody took, and frees
 * the dead list. Send failures are left to the loss detection + replay. */
static void async_dispatch(coord *c) {
    for (int s = 0; s < c->o.n_slots && !c->broken; s++) {
        if (c->slot_seq[s]) continue;
        if (c->qhead) {
            aseq *q = c->qhead;
            c->qhead = q->next;
            if (!c->qhead) c->qtail = NULL;
            c->n_queued--;
            q->next = NULL;
            q->slot = s;
            q->t_last = 0;
            c->slot_seq[s] = q;
            c->slot_dirty[s] = 0;
            if (c->n_active++ == 0) c->last_progress = st_time_ns();
            st_err err = {0};
            if (send_start(c, q, &err)) ST_WARN("sequence %llu: %s (replayed after recovery)", (unsigned long long)q->id, err.msg);
        } else if (c->slot_dirty[s]) {
            c->slot_dirty[s] = 0;
            send_tombstone(c, s);
        }
    }
    for (aseq *q = c->dead, *n; q; q = n) n = q->next, aseq_free(q);
    c->dead = NULL;
}

/* Ends the sequence in slot s (its chain finished on the last stage, or it failed). */
static void slot_end(coord *c, int s, int dirty) {
    aseq *q = c->slot_seq[s];
    c->slot_seq[s] = NULL;
    c->slot_dirty[s] = (uint8_t)dirty;
    c->n_active--;
    q->next = c->dead;
    c->dead = q;
}

/* pump's handler while generating: a CP_TOKEN from the last stage. Drops tokens of an old
 * epoch, of cancelled sequences and of tombstones (slot + id must match); records decode-step
 * timings; appends the id to the history, emits TOKEN (the callback may cancel the sequence)
 * and, when the stage says it is done or a limit is reached, DONE. */
static void on_gen(coord *c, cpeer *p, const xport_msg *m, void *ud) {
    (void)p, (void)ud;
    if (m->type != CP_TOKEN || m->len < sizeof(dp_token)) return;
    dp_token t;
    memcpy(&t, m->data, sizeof t);
    if (t.epoch != c->epoch || t.slot < 0 || t.slot >= c->o.n_slots) return; /* before a recovery */
    aseq *q = c->slot_seq[t.slot];
    if (!q || q->id != t.seq_id) return; /* cancelled, or a tombstone */
    uint64_t now = st_time_ns();
    c->last_progress = now;
    c->stalls = 0;
    if (!t.prefill && q->t_last) {
        /* a decode step: its timing */
        c->sum_decode_gap += (double)(now - q->t_last);
        c->n_decode_samples++;
        c->tot.n_decode_steps++;
        const double rows = t.rows >= 1 && t.rows <= CP_BATCH_MAX ? t.rows : 1;
        c->sum_inv_rows += 1.0 / rows;
        for (int k = 0; k < c->n_stages; k++) {
            c->sum_compute[k] += (double)t.compute_ns[k];
            c->tot.compute_s[k] += (double)t.compute_ns[k] / 1e9 / rows;
            if (t.hop_ns[k]) {
                c->sum_hop[k] += (double)t.hop_ns[k], c->n_hop_samples[k]++;
                c->tot.hop_s[k] += (double)t.hop_ns[k] / 1e9, c->tot.n_hop[k]++;
            }
        }
    }
    q->t_last = now;
    int fin = 0;
    if (t.token >= 0 && q->n_out < q->max_tokens && q->n_prompt + q->n_out < q->cap) {
        q->hist[q->n_prompt + q->n_out++] = t.token;
        c->tot.n_tokens++;
        const float *lg = t.n_logits == c->desc.n_vocab && m->len == sizeof t + (size_t)t.n_logits * 4
                              ? (const float *)(m->data + sizeof t)
                              : NULL;
        int last = t.done || q->n_out >= q->max_tokens || q->n_prompt + q->n_out >= q->cap;
        coord_event ev = {.kind = COORD_EV_TOKEN, .id = q->id, .token = t.token, .logits = lg, .last = last};
        emit(c, &ev);
        if (c->slot_seq[t.slot] != q) return; /* cancelled from the callback */
        for (int i = 0; i < q->n_eos; i++)
            if (q->eos[i] == t.token) fin = COORD_FINISH_EOS;
    } else if (t.token < 0) {
        fin = COORD_FINISH_EOS; /* nothing left to sample */
    }
    if (t.done || t.token < 0 || q->n_out >= q->max_tokens || q->n_prompt + q->n_out >= q->cap) {
        coord_event ev = {.kind = COORD_EV_DONE, .id = q->id, .finish = fin ? fin : COORD_FINISH_LENGTH};
        slot_end(c, t.slot, !t.done); /* not done on the stage: its chain still runs there */
        emit(c, &ev);
    }
}

/* Fails every queued and running sequence with msg (DONE / ERROR events). */
static void fail_all(coord *c, const char *msg) {
    for (int s = 0; s < c->o.n_slots; s++) {
        aseq *q = c->slot_seq[s];
        if (!q) continue;
        coord_event ev = {.kind = COORD_EV_DONE, .id = q->id, .finish = COORD_FINISH_ERROR, .msg = msg};
        slot_end(c, s, 1);
        emit(c, &ev);
    }
    while (c->qhead) {
        aseq *q = c->qhead;
        c->qhead = q->next;
        c->n_queued--;
        q->next = c->dead;
        c->dead = q;
        coord_event ev = {.kind = COORD_EV_DONE, .id = q->id, .finish = COORD_FINISH_ERROR, .msg = msg};
        emit(c, &ev);
    }
    c->qtail = NULL;
}

/* Re-plans on the live nodes, reloads and replays every running sequence. */
static int recover(coord *c, st_err *err) {
    uint64_t r0 = st_time_ns();
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].stage >= 0 && !c->peers[i].alive) ST_WARN("stage %d (%s) lost: re-planning", c->peers[i].stage, c->peers[i].addr);
    int rc = plan_and_load(c, err);
    c->tot.n_recoveries++;
    if (rc) {
        st_err_prefix(err, "recovery failed");
        c->tot.recovery_s += (double)(st_time_ns() - r0) / 1e9;
        return rc;
    }
    memset(c->slot_dirty, 0, (size_t)c->o.n_slots); /* a new epoch: every stage starts empty */
    for (int s = 0; s < c->o.n_slots && !rc; s++) {
        aseq *q = c->slot_seq[s];
        if (!q) continue;
        q->t_last = 0;
        if ((rc = send_start(c, q, err))) break;
        ST_INFO("sequence %llu: replaying %d tokens", (unsigned long long)q->id, q->n_prompt + q->n_out);
    }
    c->last_progress = st_time_ns();
    c->tot.recovery_s += (double)(c->last_progress - r0) / 1e9;
    return rc;
}

int coord_submit(coord *c, const coord_seq_req *r, uint64_t *id, st_err *err) {
    *id = 0;
    if (c->broken) return st_err_set(err, ST_ERR_NET, "the cluster is down (%s)", c->broken_msg);
    if (!r->prompt || r->n_prompt < 1 || r->max_tokens < 1)
        return st_err_set(err, ST_ERR_ARG, "empty prompt or max_tokens < 1");
    if (r->n_prompt >= c->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "prompt of %d tokens does not fit the context of %d tokens", r->n_prompt,
                          c->o.max_ctx);
    if (r->params.n_logit_bias > 0)
        return st_err_set(err, ST_ERR_ARG, "logit_bias is not supported on a cluster (the last stage samples)");
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= c->desc.n_vocab)
            return st_err_set(err, ST_ERR_ARG, "prompt token %d is outside the vocabulary [0, %d)", r->prompt[i],
                              c->desc.n_vocab);
    /* the last stage would drop a START with bad sampling parameters: refuse them here */
    smp_params sp = r->params;
    sp.logit_bias = NULL, sp.n_logit_bias = 0, sp.n_vocab = 0;
    smp_sampler *chk = smp_init(&sp, c->desc.n_vocab, 0, err);
    if (!chk) return err->code ? err->code : ST_ERR_ARG;
    smp_free(chk);
    aseq *q = calloc(1, sizeof *q);
    int64_t cap = (int64_t)r->n_prompt + r->max_tokens;
    if (cap > c->o.max_ctx) cap = c->o.max_ctx;
    if (q) q->hist = malloc((size_t)cap * sizeof(int32_t));
    if (!q || !q->hist) {
        aseq_free(q);
        return st_err_set(err, ST_ERR_NOMEM, "sequence of %lld tokens", (long long)cap);
    }
    q->id = ++c->next_seq;
    q->slot = -1;
    q->cap = (int)cap;
    q->n_prompt = r->n_prompt;
    q->max_tokens = r->max_tokens;
    q->params = sp;
    memcpy(q->hist, r->prompt, (size_t)r->n_prompt * sizeof(int32_t));
    const int32_t *eos = r->n_eos < 0 || (!r->eos && r->n_eos) ? c->desc.eos_ids : r->eos;
    int n_eos = r->n_eos < 0 || (!r->eos && r->n_eos) ? c->desc.n_eos : r->n_eos;
    q->n_eos = n_eos < CP_MAX_EOS ? n_eos : CP_MAX_EOS;
    if (q->n_eos > 0) memcpy(q->eos, eos, (size_t)q->n_eos * sizeof(int32_t));
    if (c->qtail) c->qtail->next = q;
    else c->qhead = q;
    c->qtail = q;
    c->n_queued++;
    *id = q->id;
    if (!c->in_poll) async_dispatch(c);
    return 0;
}

int coord_cancel(coord *c, uint64_t id) {
    for (int s = 0; s < c->o.n_slots; s++)
        if (c->slot_seq[s] && c->slot_seq[s]->id == id) {
            slot_end(c, s, 1);
            if (!c->in_poll) async_dispatch(c);
            return 0;
        }
    for (aseq *q = c->qhead, *prev = NULL; q; prev = q, q = q->next)
        if (q->id == id) {
            if (prev) prev->next = q->next;
            else c->qhead = q->next;
            if (c->qtail == q) c->qtail = prev;
            c->n_queued--;
            q->next = c->dead;
            c->dead = q;
            return 0;
        }
    return ST_ERR_ARG;
}

int coord_poll(coord *c, int timeout_ms, coord_event_fn fn, void *ud, st_err *err) {
    int rc = 0;
    c->in_poll = 1;
    c->ev_fn = fn, c->ev_ud = ud;
    /* the owner did not poll for a while (an idle server): nobody read the nodes' pongs, so
     * their silence says nothing yet */
    uint64_t now = st_time_ns();
    if (c->last_poll && now - c->last_poll > (uint64_t)c->o.heartbeat_ms * 1000000ull)
        for (int i = 0; i < c->n_peers; i++)
            if (c->peers[i].alive) c->peers[i].last_seen = now;
    int lost = pump(c, c->broken ? (timeout_ms < 100 ? timeout_ms : 100) : timeout_ms, on_gen, NULL);
    int stage_lost = 0;
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].stage >= 0 && !c->peers[i].alive) stage_lost = 1;
    if (c->broken) {
        /* nothing to recover onto */
    } else if (lost || stage_lost) {
        if (stage_lost) rc = recover(c, err);
    } else if (c->n_active > 0 && st_time_ns() - c->last_progress > (uint64_t)c->o.stall_ms * 1000000ull) {
        /* every node answers heartbeats but no token arrives: a frame was lost inside the
         * pipeline. Reload and replay, a few times at most. */
        if (++c->stalls > 3) {
            rc = st_err_set(err, ST_ERR_NET, "no progress for %d ms after %d reloads", c->o.stall_ms, c->stalls - 1);
        } else {
            ST_WARN("no token for %d ms: reloading the pipeline and replaying", c->o.stall_ms);
            rc = recover(c, err);
        }
    }
    if (rc) {
        c->broken = 1;
        snprintf(c->broken_msg, sizeof c->broken_msg, "%s", err->msg);
        fail_all(c, err->msg);
    }
    async_dispatch(c);
    c->ev_fn = NULL, c->ev_ud = NULL;
    c->in_poll = 0;
    c->last_poll = st_time_ns();
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* blocking generation over a fixed set of sequences: a wrapper over submit/poll              */

typedef struct many_ctx {
    coord *c;
    coord_seq *seqs;
    uint64_t *ids;
    int n, left;
    coord_token_fn cb;
    void *ud;
    uint64_t t0;
    int failed;
    char msg[256];
} many_ctx;

/* coord_generate_many's event handler: tokens into seqs[i].out_ids (+ the caller's callback),
 * DONE counts down, the first failure is kept for the return value. */
static void on_many(void *ud, const coord_event *ev) {
    many_ctx *g = ud;
    int i = 0;
    while (i < g->n && g->ids[i] != ev->id) i++;
    if (i == g->n) return;
    coord_seq *s = &g->seqs[i];
    if (ev->kind == COORD_EV_TOKEN) {
        if (s->n_out >= s->max_tokens) return;
        s->out_ids[s->n_out++] = ev->token;
        if (s->n_out == 1) s->t_first_s = (double)(st_time_ns() - g->t0) / 1e9;
        if (g->cb) g->cb(g->ud, i, ev->token, ev->logits, g->c->desc.n_vocab);
    } else {
        g->ids[i] = 0;
        g->left--;
        if (ev->finish == COORD_FINISH_ERROR && !g->failed) {
            g->failed = 1;
            snprintf(g->msg, sizeof g->msg, "%s", ev->msg ? ev->msg : "failed");
        }
    }
}

int coord_generate_many(coord *c, coord_seq *seqs, int n_seqs, coord_token_fn cb, void *ud, coord_stats *stats,
                        st_err *err) {
    if (n_seqs < 1 || n_seqs > c->o.n_slots)
        return st_err_set(err, ST_ERR_ARG, "%d sequences for %d slots", n_seqs, c->o.n_slots);
    uint64_t *ids = calloc((size_t)n_seqs, sizeof *ids);
    if (!ids) return st_err_set(err, ST_ERR_NOMEM, "sequences");
    memset(c->sum_compute, 0, sizeof c->sum_compute);
    memset(c->sum_hop, 0, sizeof c->sum_hop);
    memset(c->n_hop_samples, 0, sizeof c->n_hop_samples);
    c->n_decode_samples = 0, c->sum_decode_gap = 0, c->sum_inv_rows = 0;
    coord_totals t_before = c->tot;
    many_ctx g = {.c = c, .seqs = seqs, .ids = ids, .n = n_seqs, .cb = cb, .ud = ud, .t0 = st_time_ns()};
    int rc = 0;
    for (int i = 0; i < n_seqs && !rc; i++) {
        seqs[i].n_out = 0;
        seqs[i].t_first_s = 0;
        coord_seq_req r = {.prompt = seqs[i].prompt, .n_prompt = seqs[i].n_prompt, .params = seqs[i].params,
                           .max_tokens = seqs[i].max_tokens, .eos = seqs[i].eos, .n_eos = seqs[i].n_eos};
        if (!(rc = coord_submit(c, &r, &ids[i], err))) g.left++;
    }
    while (!rc && g.left > 0) {
        rc = coord_poll(c, 20, on_many, &g, err);
        if (!rc && g.failed) rc = st_err_set(err, ST_ERR_NET, "%s", g.msg);
    }
    for (int i = 0; i < n_seqs; i++)
        if (ids[i]) coord_cancel(c, ids[i]); /* after a failure: nothing keeps running */
    async_dispatch(c);
    double wall = (double)(st_time_ns() - g.t0) / 1e9;
    if (stats) {
        memset(stats, 0, sizeof *stats);
        stats->n_stages = c->n_stages;
        stats->n_tokens = (int)(c->tot.n_tokens - t_before.n_tokens);
        stats->n_recoveries = (int)(c->tot.n_recoveries - t_before.n_recoveries);
        stats->recovery_s = c->tot.recovery_s - t_before.recovery_s;
        stats->wall_s = wall;
        stats->tok_s = wall > 0 ? stats->n_tokens / wall : 0;
        snprintf(stats->data_link, sizeof stats->data_link, "%s", c->data_kind);
        int nd = c->n_decode_samples;
        if (nd) {
            stats->decode_token_ms = c->sum_decode_gap / nd / 1e6;
            stats->rows_per_step = c->sum_inv_rows > 0 ? nd / c->sum_inv_rows : 1;
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
    free(ids);
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

void coord_get_info(const coord *c, coord_info *out) {
    memset(out, 0, sizeof *out);
    out->n_stages = c->n_stages;
    out->n_layer = c->desc.n_layer;
    out->n_slots = c->o.n_slots;
    out->max_ctx = c->o.max_ctx;
    out->n_peers = c->n_peers;
    out->epoch = CP_EPOCH_SEQ(c->epoch); /* the placement counter, without the run id */
    for (int i = 0; i < c->n_peers; i++) out->n_alive += c->peers[i].alive;
    for (int s = 0; s < c->n_stages && s < CLUSTER_MAX_STAGES; s++) {
        const cpeer *p = &c->peers[c->stage_peer[s]];
        coord_stage_info *o = &out->stage[s];
        snprintf(o->addr, sizeof o->addr, "%s", p->addr);
        snprintf(o->node_id, sizeof o->node_id, "%s", p->info.node_id);
        snprintf(o->host, sizeof o->host, "%s", p->info.host);
        o->cores = p->info.cores;
        o->mem_total = p->info.mem_total, o->mem_free = p->info.mem_free;
        const cp_load *l = &c->stage_load[s];
        const cp_loaded *r = &c->stage_loaded[s];
        o->layer_begin = l->layer_begin, o->layer_end = l->layer_end;
        o->with_embed = l->with_embed, o->with_output = l->with_output;
        o->weight_bytes = r->weight_bytes, o->kv_bytes = r->kv_bytes, o->rss_bytes = r->rss_bytes;
        snprintf(o->next_kind, sizeof o->next_kind, "%.7s", r->next_kind);
    }
}
