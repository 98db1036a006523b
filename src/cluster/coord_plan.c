/* coord_plan.c — what the coordinator plans with: the survey of a live cluster (devices +
 * measured links), the placement solver's plan on the live nodes, and the check that every
 * node's actual allocation stays within its planned budget. See linkprobe.h, coord_plan.h. */
#include "coord_plan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// the survey: probe every pair of nodes once

/* Waits up to timeout_ms for a control frame of `type` on x (heartbeat answers and other
 * frames are skipped). Returns 1 with *m to release, or sets err. */
static int ctrl_expect(xport *x, uint16_t type, xport_msg *m, int timeout_ms, st_err *err) {
    uint64_t end = st_time_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int r = xport_recv(x, m, err);
        if (r < 0) return err->code;
        if (r == 1) {
            if (m->type == type) return 1;
            if (m->type == CP_ERROR) ST_WARN("node %s: %.*s", xport_get_peer(x)->addr, (int)m->len, (const char *)m->data);
            xport_release(x);
            continue;
        }
        uint64_t now = st_time_ns();
        if (now >= end) return st_err_set(err, ST_ERR_NET, "%s: no answer within %d ms", xport_get_peer(x)->addr, timeout_ms);
        xport_flush(x);
        xport_wait(&x, 1, NULL, 0, (int)((end - now) / 1000000ull) + 1);
    }
}

int lp_survey_links(lp_survey *sv, xport **xs, int pref, int pings, uint64_t bytes, int calib_mb, st_err *err) {
    memset(sv->link, 0, sizeof sv->link);
    sv->probed = 0;
    if (pings <= 0) pings = LP_DEFAULT_PINGS;
    for (int i = 0; i < sv->n; i++) {
        cp_probe_req rq = {.n_peers = sv->n - 1 - i, .pings = pings, .xport_pref = pref, .bytes = bytes, .calib_mb = calib_mb};
        if (rq.n_peers == 0 && calib_mb <= 0) break;
        for (int j = i + 1; j < sv->n; j++) snprintf(rq.addr[j - i - 1], sizeof rq.addr[0], "%s", sv->addr[j]);
        if (xport_send_copy(xs[i], CP_PROBE_REQ, &rq, sizeof rq, err)) return err->code;
        xport_flush(xs[i]);
        xport_msg m;
        int timeout = 10000 + (calib_mb > 0 ? 5000 + calib_mb * 100 : 0) + rq.n_peers * (int)(20000 + bytes / (1 << 20) * 2000);
        if (ctrl_expect(xs[i], CP_PROBE_RES, &m, timeout, err) != 1) return st_err_prefix(err, "link probe"), err->code;
        cp_probe_res res;
        if (m.len != sizeof res) {
            xport_release(xs[i]);
            return st_err_set(err, ST_ERR_FORMAT, "node %s: probe result of %u bytes (expected %zu)", sv->addr[i], m.len, sizeof res);
        }
        memcpy(&res, m.data, sizeof res);
        xport_release(xs[i]);
        if (res.mv_bf16_bytes_s > 0) sv->info[i].mv_bf16_bytes_s = res.mv_bf16_bytes_s;
        if (res.mv_q4_bytes_s > 0) sv->info[i].mv_q4_bytes_s = res.mv_q4_bytes_s;
        if (res.n_peers != rq.n_peers)
            return st_err_set(err, ST_ERR_FORMAT, "node %s probed %d peers of %d", sv->addr[i], res.n_peers, rq.n_peers);
        for (int k = 0; k < res.n_peers; k++) {
            cp_probe_link *l = &res.link[k];
            int j = i + 1 + k;
            l->msg[sizeof l->msg - 1] = 0, l->kind[sizeof l->kind - 1] = 0;
            if (l->status) return st_err_set(err, ST_ERR_NET, "node %s cannot probe %s: %s", sv->addr[i], sv->addr[j], l->msg);
            if (!(l->latency_s > 0) || !(l->bw_out > 0) || !(l->bw_in > 0))
                return st_err_set(err, ST_ERR_FORMAT, "node %s: probe of %s gave no figures", sv->addr[i], sv->addr[j]);
            sv->link[i][j] = *l;
            cp_probe_link back = *l;
            back.bw_out = l->bw_in, back.bw_in = l->bw_out;
            sv->link[j][i] = back;
        }
    }
    sv->probed = 1;
    /* the matrix, one line per directed pair */
    for (int i = 0; i < sv->n; i++)
        for (int j = 0; j < sv->n; j++) {
            if (i == j) continue;
            const cp_probe_link *l = &sv->link[i][j];
            ST_INFO("link %s -> %s (%s): latency %.1f us (min RTT %.1f us), bandwidth %.2f GB/s", sv->addr[i], sv->addr[j],
                    l->kind, l->latency_s * 1e6, l->rtt_min_s * 1e6, l->bw_out / 1e9);
        }
    return 0;
}

double lp_node_bandwidth(const cp_info *in, const lp_runtime *rt, double default_bw) {
    double mv = rt->q_bits > 0 ? in->mv_q4_bytes_s : in->mv_bf16_bytes_s;
    if (mv > 0) return mv;
    return in->bw_bytes_s > 0 ? in->bw_bytes_s : default_bw;
}

int lp_survey_cluster(const lp_survey *sv, const int *use, int n_use, const lp_runtime *rt, double default_bw,
                      plan_cluster *c, st_err *err) {
    memset(c, 0, sizeof *c);
    if (n_use < 1 || n_use > PLAN_MAX_DEVICES) return st_err_set(err, ST_ERR_ARG, "%d nodes to plan on", n_use);
    snprintf(c->name, sizeof c->name, "live");
    c->n_dev = n_use;
    c->dev = calloc((size_t)n_use, sizeof *c->dev);
    c->link = calloc((size_t)n_use * (size_t)n_use, sizeof *c->link);
    if (!c->dev || !c->link) {
        plan_cluster_free(c);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    /* transport rings a stage holds: data in + data out (tx and rx rings each, plus the shm
     * segment), and the control link (tx + rx) */
    uint64_t act = sizeof(dp_act) + (uint64_t)rt->max_batch * (uint64_t)rt->n_embd * 4 + XPORT_HDR + XPORT_MAC;
    uint64_t rings = 6ull * (uint64_t)rt->n_buffers * act + 2ull * 8 * (rt->ctrl_payload + XPORT_HDR + XPORT_MAC);
    for (int k = 0; k < n_use; k++) {
        const cp_info *in = &sv->info[use[k]];
        plan_device *d = &c->dev[k];
        snprintf(d->node, sizeof d->node, "%s", sv->addr[use[k]]);
        d->flops = 0;
        if (!strncmp(in->dev_kind, "cuda", sizeof in->dev_kind) && in->dev_mem_total > 0) {
            /* a GPU stage: weights and KV live in device memory; the host keeps the rings */
            snprintf(d->name, sizeof d->name, "%.*s", (int)strnlen(in->dev_name, sizeof in->dev_name), in->dev_name);
            snprintf(d->kind, sizeof d->kind, "gpu");
            d->memory = in->mem_limit ? in->mem_limit : in->dev_mem_free;
            d->bandwidth = in->dev_bw_bytes_s > 0 ? in->dev_bw_bytes_s : default_bw;
            d->overhead = LP_GPU_OVERHEAD;
        } else {
            snprintf(d->name, sizeof d->name, "cpu");
            snprintf(d->kind, sizeof d->kind, "cpu");
            d->memory = in->mem_limit ? in->mem_limit : in->mem_free;
            d->bandwidth = lp_node_bandwidth(in, rt, default_bw);
            d->overhead = in->rss_bytes + rings + (32ull << 20);
        }
        d->threads = in->threads > 0 ? in->threads : in->cores > 0 ? in->cores : 1;
        for (int j = 0; j < n_use; j++) {
            plan_link *l = &c->link[(size_t)k * (size_t)n_use + (size_t)j];
            if (j == k) {
                l->latency = 0, l->bandwidth = 1e12;
            } else if (sv->probed) {
                const cp_probe_link *p = &sv->link[use[k]][use[j]];
                l->latency = p->latency_s, l->bandwidth = p->bw_out;
            } else {
                l->latency = 1e-6, l->bandwidth = 10e9;
            }
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------
// the coordinator's planner

struct cplan {
    plan_model pm;
    int have_model;
    plan_request req;
    lp_runtime rt;
    double default_bw;
    int max_tp_used;
    plan_result *res;          /* the last plan (fits) */
    plan_cluster cl;           /* the cluster it was solved on */
    coord_plan_info info;
};

int cplan_init(cplan **out, const coord_opts *o, const model_desc *d, size_t ctrl_payload, st_err *err) {
    *out = NULL;
    cplan *p = calloc(1, sizeof *p);
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    p->res = calloc(1, sizeof *p->res);
    if (!p->res) {
        free(p);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    int rc = plan_model_from_dir(&p->pm, o->model_dir, err);
    if (rc) {
        ST_WARN("planner: %s; using the descriptor's byte counts", err->msg);
        memset(err, 0, sizeof *err);
        rc = plan_model_from_desc(&p->pm, d, o->model_dir, err);
    }
    if (rc) {
        cplan_free(p);
        return rc;
    }
    p->have_model = 1;
    plan_request_init(&p->req);
    p->req.context = o->max_ctx;
    p->req.slots = o->n_slots;
    p->req.chunk = o->max_batch;
    p->req.objective = o->objective == 1 ? PLAN_THROUGHPUT : PLAN_LATENCY;
    p->req.kv_elem_bytes = 4; /* conservative: a CPU stage keeps K/V in float16 where AVX2+F16C
                               * and head_dim % 8 allow, else float32; GPU stages in bf16 */
    p->req.act_bytes = 4;     /* activations travel as float32 */
    p->req.reserve = o->reserve > 0 ? o->reserve : 0.05;
    p->rt = (lp_runtime){.max_batch = o->max_batch, .n_buffers = o->n_buffers, .ctrl_payload = ctrl_payload,
                         .n_embd = d->n_embd, .q_bits = p->pm.q_bits};
    p->default_bw = 10e9;
    *out = p;
    return 0;
}

void cplan_free(cplan *p) {
    if (!p) return;
    if (p->have_model) plan_model_free(&p->pm);
    plan_cluster_free(&p->cl);
    free(p->res);
    free(p);
}

int cplan_solve(cplan *p, const lp_survey *sv, const int *alive, int n_alive, cplan_stage *st, int *n_stages, st_err *err) {
    char b1[32], b2[32], b3[32], b4[32], b5[32];
    plan_cluster_free(&p->cl);
    memset(&p->info, 0, sizeof p->info);
    int rc = lp_survey_cluster(sv, alive, n_alive, &p->rt, p->default_bw, &p->cl, err);
    if (rc) return rc;
    for (int k = 0; k < n_alive; k++)
        if (!(sv->info[alive[k]].bw_bytes_s > 0) && !(sv->info[alive[k]].mv_bf16_bytes_s > 0))
            ST_WARN("planner: node %s did not measure its memory bandwidth (--no-bw-probe): assuming %.0f GB/s",
                    sv->addr[alive[k]], p->default_bw / 1e9);
    plan_request rq = p->req;
    rc = plan_solve(&p->pm, &p->cl, &rq, p->res, err);
    if (rc == 0) {
        int tp = 0;
        for (int s = 0; s < p->res->n_stage; s++)
            if (p->res->stage[s].n_tp > tp) tp = p->res->stage[s].n_tp;
        if (tp > 1) {
            ST_WARN("planner: the plan groups %d devices for tensor parallelism; the runtime runs pipeline stages only: "
                    "re-planning without TP",
                    tp);
            rq.max_tp = 1;
            rc = plan_solve(&p->pm, &p->cl, &rq, p->res, err);
        }
    }
    if (rc) return st_err_prefix(err, "planner"), rc;
    const plan_result *r = p->res;
    if (r->n_stage > CLUSTER_MAX_STAGES)
        return st_err_set(err, ST_ERR_LIMIT, "planner: %d stages, the runtime supports %d", r->n_stage, CLUSTER_MAX_STAGES);
    coord_plan_info *pi = &p->info;
    pi->planned = 1;
    pi->n_stages = r->n_stage;
    pi->predicted_tok_s = r->tok_s;
    pi->predicted_aggregate_tok_s = r->tok_s_aggregate;
    pi->predicted_token_ms = r->t_token * 1e3;
    for (int s = 0; s < r->n_stage; s++) {
        const plan_stage *ps = &r->stage[s];
        const plan_budget *bd = &ps->member[0];
        st[s].node = alive[bd->dev];
        st[s].layer_begin = ps->layer_begin;
        st[s].layer_end = ps->layer_end;
        pi->predicted_stage_ms[s] = (ps->t_compute + ps->t_comm) * 1e3;
        pi->predicted_hop_ms[s] = ps->t_hop * 1e3;
        pi->budget_weights[s] = bd->weights + bd->embed + bd->output;
        pi->budget_kv[s] = bd->kv;
        pi->budget_total[s] = bd->total;
        ST_INFO("plan: stage %d on %s: layers %d..%d%s%s; budget %s (weights %s, KV %s, scratch + runtime %s) of %s usable; "
                "predicted %.3f ms compute + %.3f ms hop",
                s, sv->addr[st[s].node], ps->layer_begin, ps->layer_end - 1, ps->has_embed ? " +embed" : "",
                ps->has_output ? " +output" : "", st_fmt_bytes((double)bd->total, b1, sizeof b1),
                st_fmt_bytes((double)pi->budget_weights[s], b2, sizeof b2), st_fmt_bytes((double)bd->kv, b3, sizeof b3),
                st_fmt_bytes((double)(bd->scratch + bd->overhead), b4, sizeof b4),
                st_fmt_bytes((double)bd->usable, b5, sizeof b5), ps->t_compute * 1e3, ps->t_hop * 1e3);
    }
    for (int k = 0; k < n_alive; k++) {
        int used = 0;
        for (int s = 0; s < r->n_stage; s++) used |= st[s].node == alive[k];
        if (!used) ST_INFO("plan: node %s unused (the %s objective is better without it)", sv->addr[alive[k]],
                           rq.objective == PLAN_THROUGHPUT ? "throughput" : "latency");
    }
    ST_INFO("plan: predicted %.3f ms per token -> %.1f tok/s (one stream), %.1f tok/s aggregate with %d slot%s; binding: %s",
            r->t_token * 1e3, r->tok_s, r->tok_s_aggregate, r->slots, r->slots == 1 ? "" : "s", r->binding);
    *n_stages = r->n_stage;
    return 0;
}

int cplan_check(cplan *p, int stage, const char *addr, uint64_t weights, uint64_t kv, uint64_t rss) {
    coord_plan_info *pi = &p->info;
    if (!pi->planned || stage < 0 || stage >= pi->n_stages) return 0;
    char a[32], b[32], c[32], d[32], e[32], f[32];
    pi->actual_weights[stage] = weights, pi->actual_kv[stage] = kv, pi->actual_rss[stage] = rss;
    int over = weights > pi->budget_weights[stage] || kv > pi->budget_kv[stage] || rss > pi->budget_total[stage];
    pi->budget_checked++;
    if (over) pi->n_over_budget++;
    st_fmt_bytes((double)weights, a, sizeof a), st_fmt_bytes((double)pi->budget_weights[stage], b, sizeof b);
    st_fmt_bytes((double)kv, c, sizeof c), st_fmt_bytes((double)pi->budget_kv[stage], d, sizeof d);
    st_fmt_bytes((double)rss, e, sizeof e), st_fmt_bytes((double)pi->budget_total[stage], f, sizeof f);
    if (over)
        ST_WARN("budget: stage %d on %s OVER its planned budget: weights %s (planned %s), KV %s (planned %s), rss %s "
                "(planned total %s)",
                stage, addr, a, b, c, d, e, f);
    else
        ST_INFO("budget: stage %d on %s within its planned budget: weights %s <= %s, KV %s <= %s, rss %s <= %s", stage,
                addr, a, b, c, d, e, f);
    return over;
}

void cplan_get_info(const cplan *p, coord_plan_info *out) {
    if (p) *out = p->info;
    else memset(out, 0, sizeof *out);
}

// ----------------------------------------------------------------------------
// `strata plan --peers`: the same survey without a coordinator

int coord_survey(plan_cluster *out, const coord_survey_opts *so, st_err *err) {
    memset(out, 0, sizeof *out);
    xport_key key;
    int rc = xport_key_init(&key, so->cluster_key, err);
    if (rc) return rc;
    lp_survey *sv = calloc(1, sizeof *sv);
    xport *xs[CLUSTER_MAX_PEERS] = {0};
    if (!sv) return st_err_set(err, ST_ERR_NOMEM, "survey");
    for (const char *s = so->peers; s && *s;) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (sv->n == CLUSTER_MAX_PEERS || n == 0 || n >= sizeof sv->addr[0]) {
            rc = st_err_set(err, ST_ERR_ARG, "--peers: bad list (at most %d HOST:PORT entries)", CLUSTER_MAX_PEERS);
            goto done;
        }
        memcpy(sv->addr[sv->n], s, n);
        sv->addr[sv->n++][n] = 0;
        s = e ? e + 1 : NULL;
    }
    if (sv->n == 0) {
        rc = st_err_set(err, ST_ERR_ARG, "--peers: no nodes given");
        goto done;
    }
    lp_runtime rt = {.max_batch = so->max_batch > 0 ? so->max_batch : 64, .n_buffers = 8, .n_embd = so->n_embd,
                     .q_bits = so->q_bits};
    size_t a = sizeof(dp_token) + (size_t)so->n_vocab * 4, b = sizeof(cp_seq) + (size_t)so->max_ctx * 4;
    rt.ctrl_payload = (a > b ? a : b) + 4096;
    xport_opts xo = {.n_buffers = 8, .max_inflight = 256, .max_payload = rt.ctrl_payload, .role = XPORT_ROLE_CONTROL,
                     .pref = XPORT_PREF_TCP, .node_id = "plan", .timeout_ms = 5000};
    for (int i = 0; i < sv->n; i++) {
        if ((rc = xport_connect(&xs[i], sv->addr[i], &key, &xo, err))) goto done;
        if ((rc = xport_send_copy(xs[i], CP_INFO_REQ, NULL, 0, err))) goto done;
        xport_flush(xs[i]);
    }
    for (int i = 0; i < sv->n; i++) {
        xport_msg m;
        if (ctrl_expect(xs[i], CP_INFO, &m, 10000, err) != 1) {
            rc = err->code ? err->code : ST_ERR_NET;
            goto done;
        }
        if (m.len != sizeof(cp_info)) {
            xport_release(xs[i]);
            rc = st_err_set(err, ST_ERR_FORMAT, "node %s: device report of %u bytes (expected %zu)", sv->addr[i], m.len,
                            sizeof(cp_info));
            goto done;
        }
        memcpy(&sv->info[i], m.data, sizeof(cp_info));
        xport_release(xs[i]);
        cp_info *in = &sv->info[i];
        in->node_id[sizeof in->node_id - 1] = 0, in->host[sizeof in->host - 1] = 0;
        char x1[32], x2[32];
        in->dev_kind[sizeof in->dev_kind - 1] = 0, in->dev_name[sizeof in->dev_name - 1] = 0;
        ST_INFO("node %s: id %s host %s, %d cores (%d threads), memory %s / %s free, read bandwidth %.1f GB/s, "
                "decode matvec %.1f GB/s bf16, %.1f GB/s 4-bit",
                sv->addr[i], in->node_id, in->host, in->cores, in->threads, st_fmt_bytes((double)in->mem_total, x1, sizeof x1),
                st_fmt_bytes((double)in->mem_free, x2, sizeof x2), in->bw_bytes_s / 1e9, in->mv_bf16_bytes_s / 1e9,
                in->mv_q4_bytes_s / 1e9);
        if (!strcmp(in->dev_kind, "cuda"))
            ST_INFO("node %s: stages on %s: memory %s / %s free, copy bandwidth %.0f GB/s", sv->addr[i], in->dev_name,
                    st_fmt_bytes((double)in->dev_mem_total, x1, sizeof x1), st_fmt_bytes((double)in->dev_mem_free, x2, sizeof x2),
                    in->dev_bw_bytes_s / 1e9);
    }
    if ((sv->n > 1 || so->calib_mb > 0) &&
        (rc = lp_survey_links(sv, xs, so->xport_pref, so->probe_pings, so->probe_bytes ? so->probe_bytes : LP_DEFAULT_BYTES,
                              so->calib_mb, err)))
        goto done;
    int use[CLUSTER_MAX_PEERS];
    for (int i = 0; i < sv->n; i++) {
        use[i] = i;
        if (!(sv->info[i].bw_bytes_s > 0) && !(sv->info[i].mv_bf16_bytes_s > 0))
            ST_WARN("node %s did not measure its memory bandwidth (--no-bw-probe): assuming 10 GB/s", sv->addr[i]);
    }
    rc = lp_survey_cluster(sv, use, sv->n, &rt, 10e9, out, err);
done:
    for (int i = 0; i < CLUSTER_MAX_PEERS; i++) xport_close(xs[i]);
    free(sv);
    return rc;
}
