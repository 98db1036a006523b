/* cmd_plan.c — `strata plan`: where each layer goes, what every device holds, how fast it runs.
 *
 * Loads nothing: the model's figures come from config.json + safetensors headers (MODEL_DIR),
 * a config file alone (--config) or a synthetic preset (--synthetic); the cluster from a
 * cluster.json (docs/cluster-json.md). Exit status: 0 the plan fits, 1 it does not (or an
 * error), 2 usage. --json prints the plan the cluster runtime consumes.
 */
#include "app.h"
#include "strata/cluster.h"
#include "strata/plan.h"
#include "strata/synth.h"

#include <stdlib.h>
#include <string.h>

static void plan_usage(FILE *f) {
    fprintf(f,
            "usage: strata plan MODEL_DIR | --config FILE | --synthetic PRESET[:QUANT]\n"
            "                   --cluster cluster.json | --peers A:P,B:P [options]\n"
            "\n"
            "  --cluster FILE          nodes, devices and links (docs/cluster-json.md; examples/clusters/)\n"
            "  --context N             tokens per sequence to reserve KV for (default: max_position_embeddings)\n"
            "  --slots N               concurrent full-length sequences (default 1)\n"
            "  --objective latency|throughput\n"
            "                          latency: one stream's time per token (default); throughput: slowest stage\n"
            "  --kv-dtype bf16|f16|f32 KV cache element type (default bf16)\n"
            "  --reserve F             fraction of each device's memory held back (default 0.05)\n"
            "  --chunk N               prefill chunk, tokens per forward (default 256)\n"
            "  --optimize-at N|full    cached positions the objective's stage times include (default 0, a short\n"
            "                          context; full: the planned context, for long conversations)\n"
            "  --max-tp N              largest tensor-parallel group (default 8; 1 = pipeline only)\n  --tp N                  only tensor-parallel groups of N devices (compare layouts; 1 = pipeline)\n"
            "  --json                  print the plan as JSON\n"
            "  --peers ADDR,...        plan for a live cluster of `strata node`s: their devices and measured links\n"
            "                          (defaults then follow the coordinator: f32 KV, context min(max, 4096), chunk 64)\n"
            "  --discover PORT[:S]     the live cluster's nodes from their LAN beacons (`strata node --beacon PORT`)\n"
            "  --cluster-key K         with --peers / --discover (or env STRATA_CLUSTER_KEY)\n"
            "  --xport auto|tcp        with --peers: the transport the probes (and data links) use (default auto)\n");
}

/* Parses a non-negative integer, allowing thousands separators ("196,608"). */
static int parse_count(const char *s, int64_t *out) {
    int64_t v = 0;
    int digits = 0;
    for (; *s; s++) {
        if (*s == ',' || *s == '_') continue;
        if (*s < '0' || *s > '9' || v > (INT64_MAX - 9) / 10) return -1;
        v = v * 10 + (*s - '0');
        digits++;
    }
    if (!digits) return -1;
    *out = v;
    return 0;
}

static const char *dev_name(const plan_cluster *c, int d, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s", c->dev[d].node, c->dev[d].name);
    return buf;
}

/* One budget line ("kv cache  23.25 GiB  note"); zero lines are left out. */
static void print_bytes_line(const char *what, uint64_t v, const char *note) {
    char b[32];
    if (!v) return;
    printf("      %-10s %12s%s%s\n", what, st_fmt_bytes((double)v, b, sizeof b), note ? "   " : "", note ? note : "");
}

/* Human-readable plan: model, request, stages, per-device budgets, per-token time, limits. */
static void print_plan(const plan_result *p, const plan_model *m, const plan_cluster *c, const char *kv_name) {
    char b1[32], b2[32], b3[32], b4[32], n1[32], n2[32], lbl[160];
    uint64_t layers = 0;
    for (int l = 0; l < m->n_layer; l++) layers += m->layers[l].bytes;
    printf("model    %s (%s, %d layers", m->name, m->model_type, m->n_layer);
    if (m->q_bits) printf(", MLX %d-bit g%d", m->q_bits, m->q_group);
    printf("; bytes from %s)\n", m->from_headers ? "the safetensors headers" : "the descriptor");
    printf("         weights %s: layers %s, embedding %s, output %s%s\n", st_fmt_bytes((double)plan_model_weight_bytes(m), b1, sizeof b1),
           st_fmt_bytes((double)layers, b2, sizeof b2), st_fmt_bytes((double)m->embed_bytes, b3, sizeof b3),
           st_fmt_bytes((double)(m->out_norm_bytes + m->lm_head_bytes), b4, sizeof b4),
           m->tied ? " (tied: lm_head is the embedding; copied to the last stage unless it is stage 0)" : "");
    printf("         read per token %s; KV %s per token (%s, %d layers)\n", st_fmt_bytes((double)plan_model_read_bytes(m), b1, sizeof b1),
           st_fmt_bytes((double)(plan_model_kv_bytes(m, p->kv_elem_bytes) * (uint64_t)m->n_layer), b2, sizeof b2), kv_name,
           m->n_layer);
    if (m->other_bytes) printf("         not loaded: %s in %llu tensors (MTP heads, extra layers)\n",
                               st_fmt_bytes((double)m->other_bytes, b1, sizeof b1), (unsigned long long)m->n_other);
    printf("cluster  %s: %d device%s\n", c->name, c->n_dev, c->n_dev == 1 ? "" : "s");
    printf("request  context %s tokens x %d slot%s, objective %s", plan_fmt_count(p->context, n1, sizeof n1), p->slots,
           p->slots == 1 ? "" : "s", p->objective == PLAN_THROUGHPUT ? "throughput" : "latency");
    if (p->objective_context > 0) printf(" at %s cached tokens", plan_fmt_count(p->objective_context, n2, sizeof n2));
    printf(", reserve %.1f%%, prefill chunk %d\n", p->reserve * 100, p->chunk);
    if (!p->fits) {
        printf("\nDOES NOT FIT: %s\n", p->binding);
        if (p->max_context > 0)
            printf("max context: %s tokens x %d slot%s (the largest that fits on these devices)\n",
                   plan_fmt_count(p->max_context, n1, sizeof n1), p->slots, p->slots == 1 ? "" : "s");
        else
            printf("max context: none (the model does not fit at any context with %d slot%s)\n", p->slots, p->slots == 1 ? "" : "s");
        return;
    }
    printf("\nstages\n  %-3s %-24s %-14s %-6s %10s %10s %10s\n", "#", "device", "layers", "TP", "compute", "TP comm", "hop");
    for (int i = 0; i < p->n_stage; i++) {
        const plan_stage *s = &p->stage[i];
        char range[32];
        snprintf(range, sizeof range, "%d-%d (%d)", s->layer_begin, s->layer_end - 1, s->layer_end - s->layer_begin);
        for (int j = 0; j < s->n_tp; j++) {
            char tp[16] = "-";
            if (s->n_tp > 1) snprintf(tp, sizeof tp, "%d/%d", j, s->n_tp);
            if (j == 0)
                printf("  %-3d %-24s %-14s %-6s %8.3f ms %7.3f ms %7.3f ms%s%s\n", i, dev_name(c, s->member[j].dev, lbl, sizeof lbl),
                       range, tp, s->t_compute * 1e3, s->t_comm * 1e3, s->t_hop * 1e3, s->has_embed ? "  +embedding" : "",
                       s->has_output ? "  +norm/lm_head" : "");
            else
                printf("  %-3s %-24s %-14s %-6s\n", "", dev_name(c, s->member[j].dev, lbl, sizeof lbl), "", tp);
        }
    }
    printf("\nmemory budget per device\n");
    uint8_t used[PLAN_MAX_DEVICES] = {0};
    for (int i = 0; i < p->n_stage; i++)
        for (int j = 0; j < p->stage[i].n_tp; j++) {
            const plan_stage *s = &p->stage[i];
            const plan_budget *bd = &s->member[j];
            used[bd->dev] = 1;
            char note[128];
            printf("  %s (stage %d%s): %s usable of %s\n", dev_name(c, bd->dev, lbl, sizeof lbl), i, s->n_tp > 1 ? ", TP" : "",
                   st_fmt_bytes((double)bd->usable, b1, sizeof b1), st_fmt_bytes((double)c->dev[bd->dev].memory, b2, sizeof b2));
            snprintf(note, sizeof note, "%d layers%s", s->layer_end - s->layer_begin, s->n_tp > 1 ? ", 1/TP of each split tensor" : "");
            print_bytes_line("weights", bd->weights, note);
            print_bytes_line("embedding", bd->embed, NULL);
            print_bytes_line("output", bd->output,
                             !m->tied ? "norm + lm_head" : s->has_embed ? "norm (lm_head is the embedding above)" : "norm + copy of the tied embedding");
            snprintf(note, sizeof note, "%d layers x %s tokens x %d slot%s", s->layer_end - s->layer_begin,
                     plan_fmt_count(p->context, n1, sizeof n1), p->slots, p->slots == 1 ? "" : "s");
            print_bytes_line("kv cache", bd->kv, note);
            print_bytes_line("scratch", bd->scratch, "activations for the prefill chunk, attention rows, logits");
            print_bytes_line("runtime", bd->overhead, NULL);
            printf("      %-10s %12s   %s free\n", "total", st_fmt_bytes((double)bd->total, b1, sizeof b1),
                   st_fmt_bytes((double)(bd->usable - bd->total), b2, sizeof b2));
        }
    for (int d = 0; d < c->n_dev; d++)
        if (!used[d]) printf("  %s: unused (the objective is better without it)\n", dev_name(c, d, lbl, sizeof lbl));
    printf("\npredicted time per token (decode, one stream, short context)\n");
    for (int i = 0; i < p->n_stage; i++) {
        const plan_stage *s = &p->stage[i];
        printf("  stage %-2d %-24s %8.3f ms", i, dev_name(c, s->member[0].dev, lbl, sizeof lbl), (s->t_compute + s->t_comm) * 1e3);
        if (s->n_tp > 1) printf("  (compute %.3f + TP all-reduce %.3f)", s->t_compute * 1e3, s->t_comm * 1e3);
        printf("\n");
        if (i + 1 < p->n_stage)
            printf("  hop %d->%d  %-24s %8.3f ms\n", i, i + 1, "activation", s->t_hop * 1e3);
        else if (p->n_stage > 1)
            printf("  hop %d->0  %-24s %8.3f ms\n", i, "token id back to stage 0", s->t_hop * 1e3);
    }
    printf("  total                              %8.3f ms  ->  %.1f tok/s\n", p->t_token * 1e3, p->tok_s);
    printf("  at the full context (%s tokens read per step): %.3f ms -> %.1f tok/s\n", plan_fmt_count(p->context, n1, sizeof n1),
           p->t_token_full * 1e3, p->tok_s_full);
    printf("  throughput: slowest stage/link %.3f ms -> up to %.1f tok/s aggregate with %d slot%s\n", p->t_bottleneck * 1e3,
           p->tok_s_aggregate, p->slots, p->slots == 1 ? "" : "s");
    if (p->prefill_tok_s > 0) printf("  prefill: ~%.0f tok/s (chunks of %d, pipelined)\n", p->prefill_tok_s, p->chunk);
    printf("\nbinding: %s\n", p->binding);
    printf("max context: %s tokens x %d slot%s%s\n", plan_fmt_count(p->max_context, n2, sizeof n2), p->slots,
           p->slots == 1 ? "" : "s", p->max_context_is_model_limit ? " (the model's max_position_embeddings)" : " (memory-bound)");
    if (!p->exact) printf("search: heuristic device order (more than %d devices)\n", PLAN_EXACT_DEVICES);
}

/* 1 if a and b place the same layers on the same devices. */
static int same_layout(const plan_result *a, const plan_result *b) {
    if (a->n_stage != b->n_stage) return 0;
    for (int i = 0; i < a->n_stage; i++) {
        const plan_stage *x = &a->stage[i], *y = &b->stage[i];
        if (x->layer_begin != y->layer_begin || x->layer_end != y->layer_end || x->n_tp != y->n_tp) return 0;
        for (int j = 0; j < x->n_tp; j++)
            if (x->member[j].dev != y->member[j].dev) return 0;
    }
    return 1;
}

/* One line naming a plan's stages: "33 layers on h200/gpu1, 29 on h200/gpu0" or "62 layers on
 * TP=2 (h200/gpu0 + h200/gpu1)". */
static void layout_line(const plan_result *p, const plan_cluster *c, char *buf, size_t cap) {
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < p->n_stage && o < cap; i++) {
        const plan_stage *s = &p->stage[i];
        char lbl[160];
        o += (size_t)snprintf(buf + o, cap - o, "%s%d%s on ", i ? ", " : "", s->layer_end - s->layer_begin, i ? "" : " layers");
        if (o < cap && s->n_tp > 1) o += (size_t)snprintf(buf + o, cap - o, "TP=%d (", s->n_tp);
        for (int j = 0; j < s->n_tp && o < cap; j++)
            o += (size_t)snprintf(buf + o, cap - o, "%s%s", j ? " + " : "", dev_name(c, s->member[j].dev, lbl, sizeof lbl));
        if (o < cap && s->n_tp > 1) o += (size_t)snprintf(buf + o, cap - o, ")");
    }
}

/* After a plan optimised for a short context: when the layout optimised for the full context
 * decodes faster there, one line says so (a pipeline reads its stages' KV in turn, a TP group
 * in parallel; long conversations favour TP). Prints nothing when the solve fails. */
static void hint_full_context(const plan_model *m, const plan_cluster *c, const plan_request *req, const plan_result *res) {
    if (!res->fits || req->objective_context != 0) return;
    plan_result *alt = malloc(sizeof *alt);
    if (!alt) return;
    plan_request r2 = *req;
    r2.objective_context = PLAN_AT_FULL;
    st_err e = {0};
    if (plan_solve(m, c, &r2, alt, &e) == 0 && alt->fits && !same_layout(res, alt) && alt->tok_s_full > res->tok_s_full * 1.03) {
        char n1[32], l1[512];
        layout_line(alt, c, l1, sizeof l1);
        printf("hint: at the full context (%s tokens) %s decodes at %.1f tok/s against %.1f for this plan "
               "(--optimize-at full plans for it)\n",
               plan_fmt_count(res->context, n1, sizeof n1), l1, alt->tok_s_full, res->tok_s_full);
    }
    free(alt);
}

/* `strata plan`: parses the flags, builds the model figures and the cluster, solves, prints. */
int cmd_plan(int argc, char **argv) {
    const char *dir = NULL, *config = NULL, *synthetic = NULL, *cluster = NULL, *kv = "bf16";
    const char *peers = NULL, *cluster_key = NULL, *discover = NULL;
    char found[CLUSTER_MAX_PEERS * 64];
    int json = 0, xport_pref = XPORT_PREF_AUTO, kv_given = 0, chunk_given = 0;
    plan_request req;
    plan_request_init(&req);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t n;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            plan_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
            continue;
        } else if (a[0] != '-') {
            if (dir) {
                fprintf(stderr, "strata plan: more than one model given ('%s', '%s')\n", dir, a);
                return 2;
            }
            dir = a;
            continue;
        }
        if (!v) {
            fprintf(stderr, "strata plan: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--config")) config = v;
        else if (!strcmp(a, "--synthetic")) synthetic = v;
        else if (!strcmp(a, "--cluster")) cluster = v;
        else if (!strcmp(a, "--peers")) peers = v;
        else if (!strcmp(a, "--discover")) discover = v;
        else if (!strcmp(a, "--cluster-key")) cluster_key = v;
        else if (!strcmp(a, "--xport")) {
            if (strcmp(v, "auto") && strcmp(v, "tcp")) {
                fprintf(stderr, "strata plan: --xport is auto or tcp, got '%s'\n", v);
                return 2;
            }
            xport_pref = !strcmp(v, "tcp") ? XPORT_PREF_TCP : XPORT_PREF_AUTO;
        } else if (!strcmp(a, "--context") || !strcmp(a, "--slots") || !strcmp(a, "--chunk") || !strcmp(a, "--max-tp") ||
                   !strcmp(a, "--tp")) {
            if (parse_count(v, &n) || n < 1 || (strcmp(a, "--context") && n > 1 << 20)) {
                fprintf(stderr, "strata plan: %s wants a positive integer, got '%s'\n", a, v);
                return 2;
            }
            if (!strcmp(a, "--context")) req.context = n;
            else if (!strcmp(a, "--slots")) req.slots = (int)n;
            else if (!strcmp(a, "--chunk")) req.chunk = (int)n, chunk_given = 1;
            else if (!strcmp(a, "--tp")) req.min_tp = req.max_tp = (int)n;
            else req.max_tp = (int)n;
        } else if (!strcmp(a, "--optimize-at")) {
            if (!strcmp(v, "full")) req.objective_context = PLAN_AT_FULL;
            else if (parse_count(v, &n) || n < 0) {
                fprintf(stderr, "strata plan: --optimize-at is a token count or 'full', got '%s'\n", v);
                return 2;
            } else
                req.objective_context = n;
        } else if (!strcmp(a, "--objective")) {
            if (!strcmp(v, "latency")) req.objective = PLAN_LATENCY;
            else if (!strcmp(v, "throughput")) req.objective = PLAN_THROUGHPUT;
            else {
                fprintf(stderr, "strata plan: --objective is latency or throughput, got '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--kv-dtype")) {
            if (!strcmp(v, "bf16") || !strcmp(v, "f16")) req.kv_elem_bytes = 2;
            else if (!strcmp(v, "f32")) req.kv_elem_bytes = 4;
            else {
                fprintf(stderr, "strata plan: --kv-dtype is bf16, f16 or f32, got '%s'\n", v);
                return 2;
            }
            kv = v;
            kv_given = 1;
        } else if (!strcmp(a, "--reserve")) {
            char *end;
            double r = strtod(v, &end);
            if (*end || !(r >= 0 && r < 1)) {
                fprintf(stderr, "strata plan: --reserve is a fraction in [0, 1), got '%s'\n", v);
                return 2;
            }
            req.reserve = r;
        } else {
            fprintf(stderr, "strata plan: unknown option '%s'\n", a);
            plan_usage(stderr);
            return 2;
        }
    }
    if (!!dir + !!config + !!synthetic != 1) {
        fprintf(stderr, "strata plan: give exactly one of MODEL_DIR, --config FILE, --synthetic PRESET\n");
        plan_usage(stderr);
        return 2;
    }
    if (discover && !peers) { /* the live cluster's nodes from their LAN beacons */
        st_err derr = {0};
        if (beacon_discover(discover, cluster_key, found, sizeof found, NULL, &derr)) {
            fprintf(stderr, "strata: %s\n", derr.msg);
            return 1;
        }
        peers = found;
    }
    if (!!cluster + !!peers != 1) {
        fprintf(stderr, "strata plan: give --cluster cluster.json (see examples/clusters/, docs/cluster-json.md) or "
                        "--peers A:P,... (a live cluster)\n");
        return 2;
    }

    st_err err = {0};
    plan_model pm;
    plan_cluster cl;
    int rc;
    if (dir) {
        rc = plan_model_from_dir(&pm, dir, &err);
    } else {
        model_desc d;
        if (config) {
            char *txt = NULL;
            size_t len = 0;
            rc = st_file_read(config, &txt, &len, &err);
            if (!rc) rc = model_desc_parse(&d, txt, len, config, &err);
            free(txt);
        } else {
            rc = synth_preset_desc(synthetic, &d, &err);
        }
        if (!rc) {
            rc = plan_model_from_desc(&pm, &d, config ? config : synthetic, &err);
            model_desc_free(&d);
        }
    }
    if (rc) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return 1;
    }
    if (peers) { /* a live cluster, planned as its coordinator would */
        if (!kv_given) req.kv_elem_bytes = 4, kv = "f32";
        if (!chunk_given) req.chunk = 64;
        if (!req.context) req.context = pm.max_pos > 0 && pm.max_pos < 4096 ? pm.max_pos : 4096;
        req.act_bytes = 4;
        req.max_tp = 1; /* the runtime runs pipeline stages only */
        coord_survey_opts so = {.peers = peers, .cluster_key = cluster_key, .xport_pref = xport_pref,
                                .max_batch = req.chunk, .n_embd = pm.n_embd, .n_vocab = pm.n_vocab,
                                .max_ctx = (int)req.context, .q_bits = pm.q_bits};
        rc = coord_survey(&cl, &so, &err);
    } else {
        rc = plan_cluster_load(&cl, cluster, &err);
    }
    if (rc) {
        fprintf(stderr, "strata: %s\n", err.msg);
        plan_model_free(&pm);
        return 1;
    }
    plan_result *res = malloc(sizeof *res);
    if (!res) {
        fprintf(stderr, "strata: out of memory\n");
        plan_cluster_free(&cl);
        plan_model_free(&pm);
        return 1;
    }
    rc = plan_solve(&pm, &cl, &req, res, &err);
    int status = 0;
    if (rc && rc != ST_ERR_LIMIT) {
        fprintf(stderr, "strata: %s\n", err.msg);
        status = 1;
    } else {
        if (json) {
            char *txt = plan_result_json(res, &pm, &cl);
            if (txt) printf("%s\n", txt);
            else fprintf(stderr, "strata: out of memory\n");
            free(txt);
        } else {
            print_plan(res, &pm, &cl, kv);
            hint_full_context(&pm, &cl, &req, res);
        }
        if (rc == ST_ERR_LIMIT && json) { /* the text form already said it */
            char n1[32];
            fprintf(stderr, "strata: does not fit: %s\nstrata: max context for %d slot%s: %s tokens\n", res->binding, res->slots,
                    res->slots == 1 ? "" : "s", plan_fmt_count(res->max_context, n1, sizeof n1));
        }
        if (rc == ST_ERR_LIMIT) status = 1;
    }
    free(res);
    plan_cluster_free(&cl);
    plan_model_free(&pm);
    return status;
}
