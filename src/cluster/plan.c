/* plan.c — the placement solver (see plan.h).
 *
 * A plan is a sequence of stages; stage i holds layers [k_i, k_{i+1}) on a "unit": one device
 * or a tensor-parallel group of similar, directly linked devices. Stage 0 also holds the
 * embedding, the last stage the final norm and lm_head.
 *
 * Cost model (per decoded token, one stream):
 *   member time  = max(bytes read / read bandwidth, FLOPs / matrix throughput)   (roofline)
 *                  bytes read = replicated parts + 1/t of the split parts (+ KV rows read at
 *                  the context being predicted; 0 for the "empty context" figure)
 *   stage time   = slowest member + TP all-reduces: (2, or 3 with full-width QK-norm) per
 *                  layer, each max over member pairs of latency + (t-1) x hidden x 2 B / bw
 *   hop          = latency + hidden x 2 B / bandwidth to every member of the next unit
 *   latency objective     minimise sum(stage) + sum(hop); ties: the slower bottleneck loses
 *   throughput objective  minimise max(stage, hop transfer); ties: the lower latency wins
 *   both evaluate stage times at request.objective_context cached positions: 0 (default) is
 *   the short-context figure; at the full context the KV reads weigh in, which favours TP
 *   (each member reads 1/t of the KV) over a pipeline (each stage reads its layers' KV in turn)
 * The token id's trip from the last stage back to stage 0 is reported but not optimised.
 *
 * Search: dynamic programming over (devices used so far, the device that sends on, layers
 * placed). With <= PLAN_EXACT_DEVICES devices the first part is a bit set, so every subset and
 * every order of devices and TP groups is considered (exact); beyond, devices are put in one
 * greedy order (fastest first, then nearest by link latency) and each may be used or skipped.
 * The latency objective is exact in one pass (sum then max combine monotonically); the
 * throughput objective takes two: the least bottleneck T*, then the least latency among plans
 * whose every stage and hop stays within T*.
 */
#include "strata/plan.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// solver state

typedef struct unit {
    int n;                     /* members (TP degree)                                         */
    int dev[PLAN_MAX_TP];      /* device indices; dev[0] sends the activation on              */
    uint64_t mask;             /* device bits (exact search)                                  */
    int pos;                   /* position of dev[0] in the greedy order (heuristic search)   */
} unit;

typedef struct solver {
    const plan_model *m;
    const plan_cluster *c;
    const plan_request *r;
    int L, D;
    int64_t ctx;               /* context being planned (tokens per sequence)                */
    int64_t obj_ctx;           /* cached positions the objective's stage times read           */
    int slots;
    uint64_t *ps_brepl, *ps_bshard, *ps_rrepl, *ps_rshard; /* [L+1] prefix sums of bytes      */
    double *ps_flops;          /* [L+1]                                                       */
    int coll_per_layer;        /* TP all-reduces per layer                                    */
    uint64_t kv_tok_layer;     /* KV bytes per token per layer, all heads                     */
    uint64_t act_bytes;        /* activation message per token                                */
    uint64_t usable[PLAN_MAX_DEVICES];
    uint64_t scratch[PLAN_MAX_DEVICES][2]; /* at ctx, [not last / last stage]                 */
    unit *units;
    int n_units;
    int exact;
    int order[PLAN_MAX_DEVICES];
    int best_reach;            /* most layers a feasibility pass could place (diagnostics)    */
    int *fit_end;              /* [n_units * L] at ctx: largest b < L with [a, b) fitting (not last) */
    uint8_t *fit_last;         /* [n_units * L] at ctx: 1 if [a, L) fits as the last stage     */
    double *t_stage;           /* [n_units * L * (L+1)] stage time of [a, b) (last iff b == L), or NULL */
} solver;

typedef struct dp_cell {
    double c1, c2;             /* primary and secondary cost                                  */
    int64_t prev;              /* predecessor cell, -1 at the start                           */
    int unit;                  /* unit of the stage that ends here (-1: device skipped)       */
} dp_cell;

typedef struct span {
    int unit, a, b;
} span;

static uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

static const plan_link *link_of(const solver *s, int i, int j) { return plan_cluster_link(s->c, i, j); }

static int stage_fits(const solver *s, const unit *u, int a, int b, int first, int last);

/* Sets the context that the memory checks use and refreshes the scratch and fit tables. */
static void solver_set_ctx(solver *s, int64_t ctx) {
    s->ctx = ctx;
    for (int d = 0; d < s->D; d++)
        for (int last = 0; last < 2; last++)
            s->scratch[d][last] = plan_scratch_bytes(s->m, s->r->chunk, s->slots, ctx, s->c->dev[d].threads, last);
    const int L = s->L;
    for (int ui = 0; ui < s->n_units; ui++)
        for (int a = 0; a < L; a++) {
            const unit *u = &s->units[ui];
            int b = a; /* more layers never need less memory: stop at the first misfit */
            while (b + 1 <= L - 1 && stage_fits(s, u, a, b + 1, a == 0, 0)) b++;
            s->fit_end[(size_t)ui * (size_t)L + (size_t)a] = b;
            s->fit_last[(size_t)ui * (size_t)L + (size_t)a] = (uint8_t)stage_fits(s, u, a, L, a == 0, 1);
        }
}

// ----------------------------------------------------------------------------
// one stage: memory and time

/* Budget of member i of unit u holding layers [a, b) at the solver's context. */
static void member_budget(const solver *s, const unit *u, int i, int a, int b, int first, int last, plan_budget *bd) {
    const plan_model *m = s->m;
    const uint64_t t = (uint64_t)u->n;
    const int dev = u->dev[i];
    memset(bd, 0, sizeof *bd);
    bd->dev = dev;
    bd->usable = s->usable[dev];
    bd->weights = (s->ps_brepl[b] - s->ps_brepl[a]) + ceil_div(s->ps_bshard[b] - s->ps_bshard[a], t);
    bd->embed = first ? m->embed_bytes : 0;
    bd->output = last ? m->out_norm_bytes + (m->tied ? (first ? 0 : m->embed_bytes) : m->lm_head_bytes) : 0;
    bd->kv = s->kv_tok_layer / t * (uint64_t)(b - a) * (uint64_t)s->ctx * (uint64_t)s->slots;
    bd->scratch = s->scratch[dev][last ? 1 : 0];
    bd->overhead = s->c->dev[dev].overhead;
    bd->total = bd->weights + bd->embed + bd->output + bd->kv + bd->scratch + bd->overhead;
}

/* 1 if every member of u fits holding [a, b). */
static int stage_fits(const solver *s, const unit *u, int a, int b, int first, int last) {
    for (int i = 0; i < u->n; i++) {
        plan_budget bd;
        member_budget(s, u, i, a, b, first, last, &bd);
        if (bd.total > bd.usable) return 0;
    }
    return 1;
}

/* Time of one all-reduce of `bytes` per member within u. */
static double allreduce_time(const solver *s, const unit *u, double bytes) {
    double worst = 0;
    for (int i = 0; i < u->n; i++)
        for (int j = 0; j < u->n; j++) {
            if (i == j) continue;
            const plan_link *l = link_of(s, u->dev[i], u->dev[j]);
            double t = l->latency + (double)(u->n - 1) * bytes / l->bandwidth;
            if (t > worst) worst = t;
        }
    return worst;
}

/* Bytes read and FLOPs per decoded token of member i holding [a, b), with `kv_ctx` cached
 * positions of one sequence read by attention. */
static void member_work(const solver *s, const unit *u, int i, int a, int b, int first, int last, int64_t kv_ctx,
                        double *bytes, double *flops) {
    const plan_model *m = s->m;
    const double t = u->n;
    double by = (double)(s->ps_rrepl[b] - s->ps_rrepl[a]) + (double)ceil_div(s->ps_rshard[b] - s->ps_rshard[a], (uint64_t)u->n);
    double fl = (s->ps_flops[b] - s->ps_flops[a]) / t;
    (void)i;
    if (first) by += (double)(m->embed_bytes / (uint64_t)m->n_vocab); /* one row */
    if (last) {
        by += (double)(m->out_norm_bytes + (m->tied ? m->embed_bytes : m->lm_head_bytes));
        fl += m->output_flops;
    }
    by += (double)(s->kv_tok_layer / (uint64_t)u->n) * (double)(b - a) * (double)kv_ctx;
    fl += 4.0 * m->n_head * m->head_dim * (double)kv_ctx * (double)(b - a) / t; /* q.k and p.v */
    *bytes = by;
    *flops = fl;
}

/* Decode time per token of member i: the roofline max(bytes / bandwidth, FLOPs / throughput). */
static double member_time(const solver *s, const unit *u, int i, int a, int b, int first, int last, int64_t kv_ctx) {
    const plan_device *d = &s->c->dev[u->dev[i]];
    double bytes, flops;
    member_work(s, u, i, a, b, first, last, kv_ctx, &bytes, &flops);
    double tb = bytes / d->bandwidth, tf = d->flops > 0 ? flops / d->flops : 0;
    return tb > tf ? tb : tf;
}

/* TP all-reduce time per token of a stage of b - a layers. */
static double stage_comm(const solver *s, const unit *u, int a, int b, double tokens) {
    if (u->n < 2) return 0;
    return (double)(b - a) * s->coll_per_layer * allreduce_time(s, u, tokens * (double)s->act_bytes);
}

/* Stage time per decoded token: slowest member + TP communication. */
static double stage_time(const solver *s, const unit *u, int a, int b, int first, int last, int64_t kv_ctx) {
    double worst = 0;
    for (int i = 0; i < u->n; i++) {
        double t = member_time(s, u, i, a, b, first, last, kv_ctx);
        if (t > worst) worst = t;
    }
    return worst + stage_comm(s, u, a, b, 1);
}

/* Time of one prefill chunk through the stage (0 if a member has no flops figure): every
 * member reads its weights once per chunk (at most chunk x its per-token reads) and does
 * chunk x its FLOPs. */
static double stage_prefill(const solver *s, const unit *u, int a, int b, int first, int last) {
    const double chunk = s->r->chunk;
    double worst = 0;
    for (int i = 0; i < u->n; i++) {
        const plan_device *d = &s->c->dev[u->dev[i]];
        if (!(d->flops > 0)) return 0;
        plan_budget bd;
        member_budget(s, u, i, a, b, first, last, &bd);
        double stored = (double)(bd.weights + bd.embed + bd.output), bytes, flops;
        member_work(s, u, i, a, b, first, last, 0, &bytes, &flops);
        bytes = chunk * bytes < stored ? chunk * bytes : stored;
        double t = bytes / d->bandwidth;
        if (chunk * flops / d->flops > t) t = chunk * flops / d->flops;
        if (t > worst) worst = t;
    }
    return worst + stage_comm(s, u, a, b, chunk);
}

/* Hop from device `from` to every member of u: latency + bytes / bandwidth, the slowest;
 * INFINITY if a link is missing. *xfer (optional) receives the transfer part alone. */
static double hop_time(const solver *s, int from, const unit *u, double bytes, double *xfer) {
    double worst = 0, wx = 0;
    for (int j = 0; j < u->n; j++) {
        if (u->dev[j] == from) continue;
        const plan_link *l = link_of(s, from, u->dev[j]);
        if (!(l->bandwidth > 0)) return INFINITY;
        double x = bytes / l->bandwidth;
        if (l->latency + x > worst) worst = l->latency + x;
        if (x > wx) wx = x;
    }
    if (xfer) *xfer = wx;
    return worst;
}

// ----------------------------------------------------------------------------
// units: devices and tensor-parallel groups

static int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* 1 if devices dev[0..n) may form a TP group of the model: n divides the KV heads, the heads
 * and the FFN widths; same kind; memory and bandwidth within PLAN_TP_SIMILAR; linked pairwise. */
static int tp_valid(const solver *s, const int *dev, int n) {
    const plan_model *m = s->m;
    if (n < 2) return 1;
    if (n > s->r->max_tp || n > PLAN_MAX_TP) return 0;
    if (m->n_head_kv % n || m->n_head % n) return 0;
    if (m->has_dense && m->n_ff % n) return 0;
    if (m->has_moe && m->n_ff_expert % n) return 0;
    double mlo = INFINITY, mhi = 0, blo = INFINITY, bhi = 0;
    for (int i = 0; i < n; i++) {
        const plan_device *d = &s->c->dev[dev[i]];
        if (strcmp(d->kind, s->c->dev[dev[0]].kind)) return 0;
        mlo = fmin(mlo, (double)d->memory);
        mhi = fmax(mhi, (double)d->memory);
        blo = fmin(blo, d->bandwidth);
        bhi = fmax(bhi, d->bandwidth);
        for (int j = 0; j < n; j++)
            if (i != j && !(link_of(s, dev[i], dev[j])->bandwidth > 0)) return 0;
    }
    return mhi <= mlo * PLAN_TP_SIMILAR && bhi <= blo * PLAN_TP_SIMILAR;
}

/* Fills s->units: every device alone, plus valid TP groups (any subset in exact mode,
 * consecutive runs of the greedy order otherwise). */
static int build_units(solver *s, st_err *err) {
    const int D = s->D;
    size_t cap = s->exact ? ((size_t)1 << D) : (size_t)D * PLAN_MAX_TP;
    s->units = calloc(cap, sizeof *s->units);
    if (!s->units) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int pos_of[PLAN_MAX_DEVICES];
    for (int p = 0; p < D; p++) pos_of[s->order[p]] = p;
    for (int d = 0; d < D && s->r->min_tp <= 1; d++) {
        unit *u = &s->units[s->n_units++];
        u->n = 1;
        u->dev[0] = d;
        u->mask = s->exact ? 1ull << d : 0;
        u->pos = pos_of[d];
    }
    if (s->exact) {
        for (uint64_t mask = 1; mask < (1ull << D); mask++) {
            int n = popcount64(mask);
            if (n < 2 || n < s->r->min_tp || n > PLAN_MAX_TP) continue;
            int dev[PLAN_MAX_TP], k = 0;
            for (int d = 0; d < D; d++)
                if (mask >> d & 1) dev[k++] = d;
            if (!tp_valid(s, dev, n)) continue;
            unit *u = &s->units[s->n_units++];
            u->n = n;
            memcpy(u->dev, dev, sizeof dev);
            u->mask = mask;
            u->pos = pos_of[dev[0]];
        }
    } else {
        for (int p = 0; p < D; p++)
            for (int n = 2; n <= PLAN_MAX_TP && p + n <= D; n++) {
                if (n < s->r->min_tp || !tp_valid(s, &s->order[p], n)) continue;
                unit *u = &s->units[s->n_units++];
                u->n = n;
                memcpy(u->dev, &s->order[p], (size_t)n * sizeof(int));
                u->pos = p;
            }
    }
    return ST_OK;
}

/* Greedy device order for large clusters: the fastest device first, then repeatedly the
 * unplaced device nearest (lowest link latency) to the last one, ties to the faster. */
static void greedy_order(solver *s) {
    uint8_t used[PLAN_MAX_DEVICES] = {0};
    for (int p = 0; p < s->D; p++) {
        int best = -1;
        double bl = INFINITY;
        for (int d = 0; d < s->D; d++) {
            if (used[d]) continue;
            double lat = 0;
            if (p > 0) {
                const plan_link *l = link_of(s, s->order[p - 1], d);
                lat = l->bandwidth > 0 ? l->latency : 1e9;
            }
            if (best < 0 || lat < bl || (lat == bl && s->c->dev[d].bandwidth > s->c->dev[best].bandwidth)) {
                best = d;
                bl = lat;
            }
        }
        used[best] = 1;
        s->order[p] = best;
    }
}

// ----------------------------------------------------------------------------
// search

/* Number of search states ("devices used": a bit set, or a position in the greedy order). */
static size_t n_states(const solver *s) { return s->exact ? ((size_t)1 << s->D) : (size_t)s->D + 1; }

/* 1 if unit u may follow state st; *next receives the state after it. */
static int unit_step(const solver *s, size_t st, const unit *u, size_t *next) {
    if (s->exact) {
        if (st & u->mask) return 0;
        *next = st | u->mask;
        return 1;
    }
    if ((size_t)u->pos != st) return 0;
    *next = st + (size_t)u->n;
    return 1;
}

/* Feasibility at the solver's context: can some plan hold every layer? (Exact: placing as many
 * layers as fit on each unit in turn is optimal, since fewer layers never need more memory.) */
static int feasible(solver *s, st_err *err, int *ok) {
    const size_t NS = n_states(s), NE = (size_t)s->D + 1;
    const int L = s->L;
    int *reach = malloc(NS * NE * sizeof *reach);
    if (!reach) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < NS * NE; i++) reach[i] = -1;
    reach[0 * NE + (size_t)s->D] = 0;
    *ok = 0;
    s->best_reach = 0;
    for (size_t st = 0; st < NS && !*ok; st++)
        for (size_t e = 0; e < NE && !*ok; e++) {
            int r = reach[st * NE + e];
            if (r < 0) continue;
            if (r > s->best_reach) s->best_reach = r;
            if (!s->exact && st < (size_t)s->D && reach[(st + 1) * NE + e] < r) reach[(st + 1) * NE + e] = r; /* skip */
            for (int ui = 0; ui < s->n_units && !*ok; ui++) {
                const unit *u = &s->units[ui];
                size_t nx;
                if (!unit_step(s, st, u, &nx)) continue;
                if (e != (size_t)s->D && !isfinite(hop_time(s, (int)e, u, 1, NULL))) continue;
                const size_t fi = (size_t)ui * (size_t)L + (size_t)r;
                if (s->fit_last[fi]) {
                    *ok = 1;
                    s->best_reach = L;
                    break;
                }
                int b = s->fit_end[fi];
                if (b > r && reach[nx * NE + (size_t)u->dev[0]] < b) reach[nx * NE + (size_t)u->dev[0]] = b;
            }
        }
    free(reach);
    return ST_OK;
}

static inline double dmax(double a, double b) { return a > b ? a : b; }

/* Lexicographic "strictly better" with a relative tolerance (float sums in different orders). */
static inline int better(double a1, double a2, double b1, double b2) {
    if (!isfinite(b1)) return isfinite(a1);
    if (!isfinite(a1)) return 0;
    double tol = 1e-9 * dmax(fabs(a1), fabs(b1));
    if (a1 < b1 - tol) return 1;
    if (a1 > b1 + tol) return 0;
    if (!isfinite(b2)) return isfinite(a2);
    return a2 < b2 - 1e-9 * dmax(fabs(a2), fabs(b2));
}

enum { OBJ_SUM, OBJ_MAX };

/* Optimal plan at the solver's context. obj OBJ_SUM: (latency, bottleneck); OBJ_MAX:
 * (bottleneck, latency). cap: stages and hop transfers above it are not allowed (INFINITY =
 * none). Writes the stages into spans[*n_spans] and the primary cost into *cost; *n_spans = 0
 * if nothing fits. */
static int optimize(solver *s, int obj, double cap, span *spans, int *n_spans, double *cost, st_err *err) {
    const size_t NS = n_states(s), NE = (size_t)s->D + 1, NK = (size_t)s->L + 1;
    const int L = s->L;
    const double act = (double)s->act_bytes, lim = cap * (1 + 1e-9);
    size_t n = NS * NE * NK;
    dp_cell *f = malloc(n * sizeof *f);
    if (!f) return st_err_set(err, ST_ERR_NOMEM, "out of memory (plan search: %zu states)", n);
    for (size_t i = 0; i < n; i++) f[i] = (dp_cell){INFINITY, INFINITY, -1, -1};
#define CELL(st, e, k) (((st) * NE + (e)) * NK + (size_t)(k))
    f[CELL(0, (size_t)s->D, 0)] = (dp_cell){0, 0, -1, -1};
    int64_t best = -1;
    for (size_t st = 0; st < NS; st++)
        for (size_t e = 0; e < NE; e++)
            for (int k = 0; k < L; k++) {
                const size_t ci = CELL(st, e, k);
                const dp_cell cur = f[ci];
                if (!isfinite(cur.c1)) continue;
                if (!s->exact && st < (size_t)s->D) { /* skip the device at this position */
                    dp_cell *t = &f[CELL(st + 1, e, k)];
                    if (better(cur.c1, cur.c2, t->c1, t->c2)) *t = (dp_cell){cur.c1, cur.c2, (int64_t)ci, -1};
                }
                for (int ui = 0; ui < s->n_units; ui++) {
                    const unit *u = &s->units[ui];
                    size_t nx;
                    if (!unit_step(s, st, u, &nx)) continue;
                    double hx = 0, hop = e == (size_t)s->D ? 0 : hop_time(s, (int)e, u, act, &hx);
                    if (!isfinite(hop) || hx > lim) continue;
                    const int first = k == 0;
                    const size_t fi = (size_t)ui * (size_t)L + (size_t)k;
                    const int bmax = s->fit_end[fi];
                    for (int b = k + 1; b <= L; b++) {
                        const int last = b == L;
                        /* past bmax nothing fits, not even [k, L) as the last stage (more memory) */
                        if (last ? !s->fit_last[fi] : b > bmax) break;
                        double t = s->t_stage ? s->t_stage[fi * NK + (size_t)b] : stage_time(s, u, k, b, first, last, s->obj_ctx);
                        if (t > lim) break;
                        double c1, c2;
                        if (obj == OBJ_SUM) {
                            c1 = cur.c1 + hop + t;
                            c2 = dmax(cur.c2, dmax(t, hx));
                        } else {
                            c1 = dmax(cur.c1, dmax(t, hx));
                            c2 = cur.c2 + hop + t;
                        }
                        const size_t ti = CELL(nx, (size_t)u->dev[0], b);
                        if (better(c1, c2, f[ti].c1, f[ti].c2)) f[ti] = (dp_cell){c1, c2, (int64_t)ci, ui};
                    }
                }
            }
    for (size_t st = 0; st < NS; st++) /* terminal cells: every layer placed */
        for (size_t e = 0; e < NE; e++) {
            const size_t ti = CELL(st, e, L);
            if (isfinite(f[ti].c1) && (best < 0 || better(f[ti].c1, f[ti].c2, f[best].c1, f[best].c2))) best = (int64_t)ti;
        }
    *n_spans = 0;
    if (best >= 0) {
        *cost = f[best].c1;
        span tmp[PLAN_MAX_DEVICES];
        int ns = 0;
        for (int64_t ci = best; ci >= 0 && f[ci].prev >= 0; ci = f[ci].prev) {
            if (f[ci].unit < 0) continue; /* skipped device */
            ST_ASSERT(ns < PLAN_MAX_DEVICES);
            tmp[ns].unit = f[ci].unit;
            tmp[ns].b = (int)((size_t)ci % NK);
            tmp[ns].a = (int)((size_t)f[ci].prev % NK);
            ns++;
        }
        for (int i = 0; i < ns; i++) spans[i] = tmp[ns - 1 - i];
        *n_spans = ns;
    }
#undef CELL
    free(f);
    return ST_OK;
}

/* Runs the objective's search (two passes for throughput). */
static int search(solver *s, span *spans, int *n_spans, st_err *err) {
    double cost = 0;
    if (s->r->objective == PLAN_LATENCY) return optimize(s, OBJ_SUM, INFINITY, spans, n_spans, &cost, err);
    int rc = optimize(s, OBJ_MAX, INFINITY, spans, n_spans, &cost, err);
    if (rc || !*n_spans) return rc;
    return optimize(s, OBJ_SUM, cost, spans, n_spans, &cost, err);
}

/* Largest context in [lo, hi] that is feasible, given that lo is. */
static int max_feasible_ctx(solver *s, int64_t lo, int64_t hi, int64_t *out, st_err *err) {
    int ok, rc;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        solver_set_ctx(s, mid);
        if ((rc = feasible(s, err, &ok))) return rc;
        if (ok) lo = mid;
        else hi = mid - 1;
    }
    *out = lo;
    return ST_OK;
}

// ----------------------------------------------------------------------------
// results

const char *plan_fmt_count(int64_t n, char *buf, size_t cap) {
    char tmp[32];
    int len = snprintf(tmp, sizeof tmp, "%lld", (long long)(n < 0 ? -n : n));
    size_t o = 0;
    if (n < 0 && o + 1 < cap) buf[o++] = '-';
    for (int i = 0; i < len && o + 1 < cap; i++) {
        if (i > 0 && (len - i) % 3 == 0 && o + 1 < cap) buf[o++] = ',';
        if (o + 1 < cap) buf[o++] = tmp[i];
    }
    buf[o] = 0;
    return buf;
}

/* "node/device" of device d. */
static const char *dev_label(const plan_cluster *c, int d, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s", c->dev[d].node, c->dev[d].name);
    return buf;
}

/* Return trip of the token id from the last stage to stage 0: the direct link if there is
 * one, else back through the stages (each reverse link), else 0 (unknown). */
static double return_hop(const solver *s, const span *sp, int ns) {
    if (ns < 2) return 0;
    const unit *first = &s->units[sp[0].unit], *last = &s->units[sp[ns - 1].unit];
    double t = hop_time(s, last->dev[0], first, 4, NULL);
    if (isfinite(t)) return t;
    t = 0;
    for (int i = ns - 1; i > 0; i--) {
        double h = hop_time(s, s->units[sp[i].unit].dev[0], &s->units[sp[i - 1].unit], 4, NULL);
        if (!isfinite(h)) return 0;
        t += h;
    }
    return t;
}

/* Fills the stages and predictions of out from spans at the solver's context. */
static void fill_result(const solver *s, const span *sp, int ns, plan_result *out) {
    out->n_stage = ns;
    double bottleneck = 0, prefill_worst = 0;
    int prefill_known = 1;
    out->t_token = out->t_token_full = 0;
    for (int i = 0; i < ns; i++) {
        const unit *u = &s->units[sp[i].unit];
        plan_stage *st = &out->stage[i];
        memset(st, 0, sizeof *st);
        const int a = sp[i].a, b = sp[i].b, first = i == 0, last = i == ns - 1;
        st->layer_begin = a;
        st->layer_end = b;
        st->n_tp = u->n;
        st->has_embed = first;
        st->has_output = last;
        for (int j = 0; j < u->n; j++) member_budget(s, u, j, a, b, first, last, &st->member[j]);
        st->t_comm = stage_comm(s, u, a, b, 1);
        st->t_compute = stage_time(s, u, a, b, first, last, 0) - st->t_comm;
        st->t_full = stage_time(s, u, a, b, first, last, s->ctx);
        st->t_prefill = stage_prefill(s, u, a, b, first, last);
        if (st->t_prefill <= 0) prefill_known = 0;
        double hx = 0;
        if (!last) st->t_hop = hop_time(s, u->dev[0], &s->units[sp[i + 1].unit], (double)s->act_bytes, &hx);
        else st->t_hop = return_hop(s, sp, ns);
        bottleneck = fmax(bottleneck, fmax(st->t_compute + st->t_comm, hx));
        if (!last) {
            double px = 0;
            hop_time(s, u->dev[0], &s->units[sp[i + 1].unit], (double)s->act_bytes * s->r->chunk, &px);
            prefill_worst = fmax(prefill_worst, px);
        }
        prefill_worst = fmax(prefill_worst, st->t_prefill);
        out->t_token += st->t_compute + st->t_comm + st->t_hop;
        out->t_token_full += st->t_full + st->t_hop;
    }
    out->tok_s = out->t_token > 0 ? 1.0 / out->t_token : 0;
    out->tok_s_full = out->t_token_full > 0 ? 1.0 / out->t_token_full : 0;
    out->t_bottleneck = bottleneck;
    double agg = out->t_token > 0 ? out->slots / out->t_token : 0;
    if (bottleneck > 0 && 1.0 / bottleneck < agg) agg = 1.0 / bottleneck;
    out->tok_s_aggregate = agg;
    out->prefill_tok_s = prefill_known && prefill_worst > 0 ? s->r->chunk / prefill_worst : 0;
}

/* The member with the least free memory: the binding device of a plan that fits. */
static void describe_tightest(const solver *s, plan_result *out) {
    const plan_budget *tb = NULL;
    const plan_stage *ts = NULL;
    for (int i = 0; i < out->n_stage; i++)
        for (int j = 0; j < out->stage[i].n_tp; j++) {
            const plan_budget *bd = &out->stage[i].member[j];
            if (!tb || bd->usable - bd->total < tb->usable - tb->total) {
                tb = bd;
                ts = &out->stage[i];
            }
        }
    if (!tb) return;
    char l[160], u[32], t[32], f[32], c[32];
    out->binding_dev = tb->dev;
    snprintf(out->binding, sizeof out->binding,
             "node %s: %s usable, %s planned for %d layers%s at %s tokens x %d slot%s (%s free)",
             dev_label(s->c, tb->dev, l, sizeof l), st_fmt_bytes((double)tb->usable, u, sizeof u),
             st_fmt_bytes((double)tb->total, t, sizeof t), ts->layer_end - ts->layer_begin, ts->n_tp > 1 ? " (its TP share)" : "",
             plan_fmt_count(s->ctx, c, sizeof c), s->slots, s->slots == 1 ? "" : "s",
             st_fmt_bytes((double)(tb->usable - tb->total), f, sizeof f));
}

/* Nothing fits at the target context. With a plan found at a smaller context, names the
 * member of that plan that overflows most at the target; with none, says why the weights
 * alone do not fit. */
static void describe_overflow(solver *s, const span *sp, int ns, int64_t target, plan_result *out) {
    char l[160], a[32], b[32], c[32];
    out->binding_dev = -1;
    if (ns > 0) {
        solver_set_ctx(s, target);
        plan_budget worst = {0}, bd;
        int wl = 0, wt = 1, have = 0;
        for (int i = 0; i < ns; i++) {
            const unit *u = &s->units[sp[i].unit];
            for (int j = 0; j < u->n; j++) {
                member_budget(s, u, j, sp[i].a, sp[i].b, i == 0, i == ns - 1, &bd);
                double over = (double)bd.total - (double)bd.usable;
                if (!have || over > (double)worst.total - (double)worst.usable) {
                    worst = bd;
                    wl = sp[i].b - sp[i].a;
                    wt = u->n;
                    have = 1;
                }
            }
        }
        out->binding_dev = worst.dev;
        snprintf(out->binding, sizeof out->binding, "node %s: %s usable, needs %s for %d layers%s at %s tokens x %d slot%s",
                 dev_label(s->c, worst.dev, l, sizeof l), st_fmt_bytes((double)worst.usable, a, sizeof a),
                 st_fmt_bytes((double)worst.total, b, sizeof b), wl, wt > 1 ? " (its TP share)" : "",
                 plan_fmt_count(target, c, sizeof c), s->slots,
                 s->slots == 1 ? "" : "s");
        return;
    }
    /* even one token per sequence does not fit */
    solver_set_ctx(s, 1);
    double room = 0;
    for (int d = 0; d < s->D; d++) {
        double free_d = (double)s->usable[d] - (double)s->c->dev[d].overhead - (double)s->scratch[d][0];
        if (free_d > 0) room += free_d;
    }
    uint64_t w = plan_model_weight_bytes(s->m);
    if ((double)w > room) {
        snprintf(out->binding, sizeof out->binding,
                 "weights: the model needs %s, the cluster holds %s after the %.0f%% reserve, runtime overhead and scratch",
                 st_fmt_bytes((double)w, a, sizeof a), st_fmt_bytes(room, b, sizeof b), s->r->reserve * 100);
        return;
    }
    int ok = 0;
    st_err e = {0};
    feasible(s, &e, &ok);
    uint64_t biggest = 0;
    for (int i = 0; i < s->L; i++)
        if (s->m->layers[i].bytes > biggest) biggest = s->m->layers[i].bytes;
    snprintf(out->binding, sizeof out->binding,
             "layers: no split into contiguous ranges over linked devices fits even at 1 token (at most %d of %d "
             "layers could be placed; largest layer %s)",
             s->best_reach, s->L, st_fmt_bytes((double)biggest, a, sizeof a));
}

void plan_request_init(plan_request *r) {
    memset(r, 0, sizeof *r);
    r->context = 0;
    r->slots = 1;
    r->objective = PLAN_LATENCY;
    r->kv_elem_bytes = 2;
    r->reserve = 0.05;
    r->chunk = 256;
    r->act_bytes = 2;
    r->max_tp = PLAN_MAX_TP;
    r->min_tp = 1;
}

static void solver_free(solver *s) {
    free(s->fit_end);
    free(s->fit_last);
    free(s->t_stage);
    free(s->ps_brepl);
    free(s->ps_bshard);
    free(s->ps_rrepl);
    free(s->ps_rshard);
    free(s->ps_flops);
    free(s->units);
}

int plan_solve(const plan_model *m, const plan_cluster *c, const plan_request *r, plan_result *out, st_err *err) {
    memset(out, 0, sizeof *out);
    out->binding_dev = -1;
    char a[32], b[32];
    if (r->slots < 1) return st_err_set(err, ST_ERR_ARG, "slots must be >= 1 (got %d)", r->slots);
    if (r->kv_elem_bytes < 1 || r->kv_elem_bytes > 8)
        return st_err_set(err, ST_ERR_ARG, "KV element size %d is not 1..8 bytes", r->kv_elem_bytes);
    if (!(r->reserve >= 0 && r->reserve < 1)) return st_err_set(err, ST_ERR_ARG, "reserve %g is not in [0, 1)", r->reserve);
    if (r->min_tp > r->max_tp) /* min_tp 0 (a zeroed request): any unit, like 1 */
        return st_err_set(err, ST_ERR_ARG, "smallest TP group %d exceeds the largest %d", r->min_tp, r->max_tp);
    if (r->chunk < 1 || r->act_bytes < 1 || r->max_tp < 1)
        return st_err_set(err, ST_ERR_ARG, "chunk, activation bytes and max TP must be >= 1");
    if (c->n_dev < 1 || c->n_dev > PLAN_MAX_DEVICES) return st_err_set(err, ST_ERR_ARG, "cluster has %d devices", c->n_dev);
    int64_t ctx = r->context ? r->context : m->max_pos;
    if (ctx < 1) return st_err_set(err, ST_ERR_ARG, "context must be >= 1 (got %lld)", (long long)ctx);
    if (ctx > m->max_pos)
        return st_err_set(err, ST_ERR_ARG, "context %s exceeds %s's max_position_embeddings (%s)", plan_fmt_count(ctx, a, sizeof a),
                          m->name, plan_fmt_count(m->max_pos, b, sizeof b));
    if ((double)plan_model_kv_bytes(m, r->kv_elem_bytes) * m->n_layer * (double)ctx * r->slots > 1e18)
        return st_err_set(err, ST_ERR_ARG, "a KV cache for %s tokens x %d slots would exceed 1 EB", plan_fmt_count(ctx, a, sizeof a),
                          r->slots);
    if (r->objective_context < PLAN_AT_FULL)
        return st_err_set(err, ST_ERR_ARG, "objective context %lld is not a token count", (long long)r->objective_context);
    out->context = ctx;
    out->slots = r->slots;
    out->objective = r->objective;
    out->objective_context = r->objective_context == PLAN_AT_FULL ? ctx : r->objective_context < ctx ? r->objective_context : ctx;
    out->kv_elem_bytes = r->kv_elem_bytes;
    out->reserve = r->reserve;
    out->chunk = r->chunk;

    solver s = {0};
    s.m = m;
    s.c = c;
    s.r = r;
    s.L = m->n_layer;
    s.D = c->n_dev;
    s.slots = r->slots;
    s.obj_ctx = out->objective_context;
    s.exact = s.D <= PLAN_EXACT_DEVICES;
    s.coll_per_layer = 2 + (m->qk_norm_full ? 1 : 0);
    s.kv_tok_layer = plan_model_kv_bytes(m, r->kv_elem_bytes);
    s.act_bytes = (uint64_t)m->n_embd * (uint64_t)r->act_bytes;
    out->exact = s.exact;
    int rc = ST_OK;
    const size_t NL = (size_t)s.L + 1;
    s.ps_brepl = calloc(NL, sizeof(uint64_t));
    s.ps_bshard = calloc(NL, sizeof(uint64_t));
    s.ps_rrepl = calloc(NL, sizeof(uint64_t));
    s.ps_rshard = calloc(NL, sizeof(uint64_t));
    s.ps_flops = calloc(NL, sizeof(double));
    if (!s.ps_brepl || !s.ps_bshard || !s.ps_rrepl || !s.ps_rshard || !s.ps_flops) {
        solver_free(&s);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    for (int l = 0; l < s.L; l++) {
        const plan_layer *L = &m->layers[l];
        s.ps_brepl[l + 1] = s.ps_brepl[l] + (L->bytes - L->shard_bytes);
        s.ps_bshard[l + 1] = s.ps_bshard[l] + L->shard_bytes;
        s.ps_rrepl[l + 1] = s.ps_rrepl[l] + (L->read_bytes - L->read_shard_bytes);
        s.ps_rshard[l + 1] = s.ps_rshard[l] + L->read_shard_bytes;
        s.ps_flops[l + 1] = s.ps_flops[l] + L->flops;
    }
    for (int d = 0; d < s.D; d++) s.usable[d] = (uint64_t)((double)c->dev[d].memory * (1.0 - r->reserve));
    for (int d = 0; d < s.D; d++) s.order[d] = d;
    if (!s.exact) greedy_order(&s);
    if ((rc = build_units(&s, err))) {
        solver_free(&s);
        return rc;
    }
    const size_t UL = (size_t)s.n_units * (size_t)s.L;
    s.fit_end = malloc(UL * sizeof *s.fit_end);
    s.fit_last = malloc(UL);
    if (!s.fit_end || !s.fit_last) {
        solver_free(&s);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    /* the objective's stage times do not depend on the context being tried for memory (the
     * max-context search): tabulate them once when the table is modest */
    if (UL * NL <= ((size_t)8 << 20)) { /* <= 64 MiB */
        s.t_stage = malloc(UL * NL * sizeof *s.t_stage);
        if (s.t_stage)
            for (int ui = 0; ui < s.n_units; ui++)
                for (int a = 0; a < s.L; a++)
                    for (int b = a + 1; b <= s.L; b++)
                        s.t_stage[((size_t)ui * (size_t)s.L + (size_t)a) * NL + (size_t)b] =
                            stage_time(&s, &s.units[ui], a, b, a == 0, b == s.L, s.obj_ctx);
    }

    span sp[PLAN_MAX_DEVICES];
    int ns = 0, ok = 0;
    solver_set_ctx(&s, ctx);
    if ((rc = feasible(&s, err, &ok))) goto done;
    if (ok) {
        if ((rc = search(&s, sp, &ns, err))) goto done;
        ST_ASSERT(ns > 0); /* feasibility and search agree on what fits */
        fill_result(&s, sp, ns, out);
        out->fits = 1;
        describe_tightest(&s, out);
        /* the largest context this cluster could serve with these slots */
        int64_t mx = ctx;
        solver_set_ctx(&s, m->max_pos);
        if ((rc = feasible(&s, err, &ok))) goto done;
        if (ok) mx = m->max_pos;
        else if ((rc = max_feasible_ctx(&s, ctx, m->max_pos - 1, &mx, err))) goto done;
        out->max_context = mx;
        out->max_context_is_model_limit = mx == m->max_pos;
        rc = ST_OK;
        goto done;
    }
    /* nothing fits: the largest context that does, and what binds at the one asked for */
    out->fits = 0;
    solver_set_ctx(&s, 1);
    if ((rc = feasible(&s, err, &ok))) goto done;
    int64_t mx = 0;
    if (ok && (rc = max_feasible_ctx(&s, 1, ctx - 1, &mx, err))) goto done;
    out->max_context = mx;
    ns = 0;
    if (mx > 0) {
        solver_set_ctx(&s, mx);
        if ((rc = search(&s, sp, &ns, err))) goto done;
    }
    describe_overflow(&s, sp, ns, ctx, out);
    rc = st_err_set(err, ST_ERR_LIMIT, "does not fit: %s; max context for %d slot%s: %s tokens", out->binding, r->slots,
                    r->slots == 1 ? "" : "s", plan_fmt_count(mx, a, sizeof a));
done:
    solver_free(&s);
    return rc;
}

// ----------------------------------------------------------------------------
// JSON (the form the cluster runtime consumes)

char *plan_result_json(const plan_result *p, const plan_model *m, const plan_cluster *c) {
    json_t *root = json_object();
    if (!root) return NULL;
    char lbl[160];
    json_object_set_new(root, "fits", json_boolean(p->fits));
    json_t *jm = json_object();
    json_object_set_new(jm, "name", json_string(m->name));
    json_object_set_new(jm, "model_type", json_string(m->model_type));
    json_object_set_new(jm, "n_layer", json_integer(m->n_layer));
    json_object_set_new(jm, "max_position_embeddings", json_integer(m->max_pos));
    json_object_set_new(jm, "weight_bytes", json_integer((json_int_t)plan_model_weight_bytes(m)));
    json_object_set_new(jm, "read_bytes_per_token", json_integer((json_int_t)plan_model_read_bytes(m)));
    json_object_set_new(jm, "kv_bytes_per_token",
                        json_integer((json_int_t)(plan_model_kv_bytes(m, p->kv_elem_bytes) * (uint64_t)m->n_layer)));
    json_object_set_new(jm, "bytes_from", json_string(m->from_headers ? "safetensors headers" : "descriptor"));
    json_object_set_new(root, "model", jm);
    json_object_set_new(root, "cluster", json_string(c->name));
    json_t *jr = json_object();
    json_object_set_new(jr, "context", json_integer(p->context));
    json_object_set_new(jr, "slots", json_integer(p->slots));
    json_object_set_new(jr, "objective", json_string(p->objective == PLAN_THROUGHPUT ? "throughput" : "latency"));
    json_object_set_new(jr, "objective_context", json_integer(p->objective_context));
    json_object_set_new(jr, "kv_elem_bytes", json_integer(p->kv_elem_bytes));
    json_object_set_new(jr, "reserve", json_real(p->reserve));
    json_object_set_new(jr, "chunk", json_integer(p->chunk));
    json_object_set_new(root, "request", jr);
    json_t *js = json_array();
    for (int i = 0; i < p->n_stage; i++) {
        const plan_stage *st = &p->stage[i];
        json_t *o = json_object();
        json_object_set_new(o, "index", json_integer(i));
        json_object_set_new(o, "layer_begin", json_integer(st->layer_begin));
        json_object_set_new(o, "layer_end", json_integer(st->layer_end));
        json_object_set_new(o, "embed", json_boolean(st->has_embed));
        json_object_set_new(o, "output", json_boolean(st->has_output));
        json_object_set_new(o, "tp", json_integer(st->n_tp));
        json_t *mem = json_array();
        for (int j = 0; j < st->n_tp; j++) {
            const plan_budget *bd = &st->member[j];
            json_t *b = json_object();
            json_object_set_new(b, "node", json_string(c->dev[bd->dev].node));
            json_object_set_new(b, "device", json_string(c->dev[bd->dev].name));
            json_object_set_new(b, "tp_rank", json_integer(j));
            json_object_set_new(b, "usable", json_integer((json_int_t)bd->usable));
            json_object_set_new(b, "weights", json_integer((json_int_t)bd->weights));
            json_object_set_new(b, "embed", json_integer((json_int_t)bd->embed));
            json_object_set_new(b, "output", json_integer((json_int_t)bd->output));
            json_object_set_new(b, "kv", json_integer((json_int_t)bd->kv));
            json_object_set_new(b, "scratch", json_integer((json_int_t)bd->scratch));
            json_object_set_new(b, "overhead", json_integer((json_int_t)bd->overhead));
            json_object_set_new(b, "total", json_integer((json_int_t)bd->total));
            json_array_append_new(mem, b);
        }
        json_object_set_new(o, "members", mem);
        json_object_set_new(o, "compute_s", json_real(st->t_compute));
        json_object_set_new(o, "tp_comm_s", json_real(st->t_comm));
        json_object_set_new(o, "hop_s", json_real(st->t_hop));
        json_object_set_new(o, "full_context_s", json_real(st->t_full));
        json_object_set_new(o, "prefill_chunk_s", json_real(st->t_prefill));
        json_array_append_new(js, o);
    }
    json_object_set_new(root, "stages", js);
    json_t *jp = json_object();
    json_object_set_new(jp, "token_s", json_real(p->t_token));
    json_object_set_new(jp, "tok_s", json_real(p->tok_s));
    json_object_set_new(jp, "token_s_full_context", json_real(p->t_token_full));
    json_object_set_new(jp, "tok_s_full_context", json_real(p->tok_s_full));
    json_object_set_new(jp, "bottleneck_s", json_real(p->t_bottleneck));
    json_object_set_new(jp, "aggregate_tok_s", json_real(p->tok_s_aggregate));
    json_object_set_new(jp, "prefill_tok_s", json_real(p->prefill_tok_s));
    json_object_set_new(root, "predicted", jp);
    json_object_set_new(root, "binding", json_string(p->binding));
    json_object_set_new(root, "binding_device",
                        p->binding_dev >= 0 ? json_string(dev_label(c, p->binding_dev, lbl, sizeof lbl)) : json_null());
    json_object_set_new(root, "max_context", json_integer(p->max_context));
    json_object_set_new(root, "max_context_is_model_limit", json_boolean(p->max_context_is_model_limit));
    json_object_set_new(root, "search", json_string(p->exact ? "exhaustive" : "heuristic"));
    char *txt = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(12));
    json_decref(root);
    return txt;
}
