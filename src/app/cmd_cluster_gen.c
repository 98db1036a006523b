/* cmd_cluster_gen.c — `strata cluster-gen`: generate token ids on a cluster of nodes (or, with
 * --local, in this process on the whole model) for tests and measurements.
 *
 * Prints "ids: a b c ..." on stdout, a "stats:" line with timing on stderr. --print-logits
 * writes each sampled step's logits (float32 [steps, n_vocab], raw) to a file; --check-logits
 * compares them with such a file (max|d| / max|ref| per step <= --rtol) and fails otherwise.
 * --golden K takes the prompt from MODEL_DIR/golden.safetensors (prompt_K) and checks the
 * greedy ids against transformers' greedy_K. --seqs N generates N copies concurrently; with
 * --distinct, sequence s starts with the prompt's first id + s (mod the vocabulary) and its ids
 * follow on an "ids s:" line. */
#include "app.h"
#include "strata/synth.h"
#include "strata/cluster.h"
#include "strata/model.h"
#include "strata/safetensors.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f, "usage: strata cluster-gen MODEL_DIR (--peers A:P,B:P,... | --discover PORT[:S] | --local)\n"
               "                          (--prompt-ids 1,2,3 | --golden K)\n"
               "                          [--max-tokens N] [options]\n"
               "  --cluster-key K         (or env STRATA_CLUSTER_KEY)\n"
               "  --split plan|even       placement: the solver on measured devices + links (default), or the\n"
               "                          layers split evenly over the peers in order (implied by --stages)\n"
               "  --objective latency|throughput   the solver's objective (default latency)\n"
               "  --reserve F             fraction of each node's memory the plan leaves free (default 0.05)\n"
               "  --probe-bytes N         link probe transfer per direction (default 4 MiB)\n"
               "  --calib-mb N            nodes re-measure their decode matvec rate on N MiB before planning\n"
               "  --stages N              even split over the first N peers (at most one stage per layer)\n"
               "  --xport auto|tcp|shm|nccl  data links (default auto: shm between nodes of one host; nccl:\n"
               "                          NCCL between two GPU stages, auto elsewhere)\n"
               "  --xport-buffers N       ring slots per link (default 8)\n"
               "  --xport-max-inflight N  outstanding frames per link (default 256)\n"
               "  --data-mac              MAC data frames too\n"
               "  --ctx N --slots N --chunk N --threads N\n"
               "  --temperature T --top-k K --top-p P --seed S   sampling (default greedy)\n"
               "  --seqs N                N concurrent copies of the prompt (needs --slots >= N)\n"
               "  --distinct              with --seqs: sequence s's first prompt id + s; prints each one's ids\n"
               "  --print-logits FILE     write every step's logits (f32 [steps, vocab])\n"
               "  --check-logits FILE --rtol X   compare with such a file (default 1e-4)\n"
               "  --no-eos                ignore the model's eos ids\n"
               "  --heartbeat-ms N --dead-ms N   node loss detection (default 200 / 1500)\n"
               "  --kill-at N PID [--kill-signal S]   test hook: signal PID after N tokens (default SIGKILL)\n");
}

static int parse_ids(const char *s, int32_t **out, int *n) {
    int cap = 16, k = 0;
    int32_t *v = malloc((size_t)cap * 4);
    while (v && s && *s) {
        char *e;
        long x = strtol(s, &e, 10);
        if (e == s || x < 0 || x > INT32_MAX) break;
        if (k == cap) {
            int32_t *nv = realloc(v, (size_t)(cap *= 2) * 4);
            if (!nv) break;
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = *e == ',' ? e + 1 : e;
        if (!*e) {
            *out = v, *n = k;
            return 0;
        }
    }
    free(v);
    return -1;
}

typedef struct gen_out {
    FILE *logits_f;
    float *ref;        /* reference logits [ref_steps, V] */
    long ref_steps;
    long step;
    double rtol, worst;
    int bad;
    int kill_at, kill_pid, kill_sig, n_seen; /* test hook: signal a node after kill_at tokens */
    uint64_t t_prev;
    double max_gap_s;                         /* longest wait between two tokens of sequence 0 */
} gen_out;

static void on_tok(void *ud, int seq, int32_t id, const float *logits, int V) {
    gen_out *g = ud;
    if (seq == 0) {
        uint64_t now = st_time_ns();
        if (g->t_prev && (double)(now - g->t_prev) / 1e9 > g->max_gap_s) g->max_gap_s = (double)(now - g->t_prev) / 1e9;
        g->t_prev = now;
    }
    if (seq == 0 && g->kill_pid > 0 && ++g->n_seen == g->kill_at) {
        fprintf(stderr, "cluster-gen: sending signal %d to node process %d after %d tokens\n", g->kill_sig, g->kill_pid,
                g->kill_at);
        kill(g->kill_pid, g->kill_sig);
    }
    if (seq != 0 || !logits) return;
    if (g->logits_f) fwrite(logits, sizeof(float), (size_t)V, g->logits_f);
    if (g->ref) {
        if (g->step >= g->ref_steps) g->bad = 1;
        else {
            const float *r = g->ref + (size_t)g->step * (size_t)V;
            double md = 0, mr = 0;
            for (int i = 0; i < V; i++) {
                double d = fabs((double)logits[i] - r[i]);
                if (!(d <= md)) md = d;
                if (fabs(r[i]) > mr) mr = fabs(r[i]);
            }
            double rel = mr > 0 ? md / mr : md;
            if (!(rel <= g->worst)) g->worst = rel;
            if (!(rel <= g->rtol)) g->bad = 1;
        }
    }
    g->step++;
}

/* Single-node reference: the whole model in this process, same sampler. */
static int run_local(const char *dir, const int32_t *prompt, int n_prompt, const smp_params *sp, int max_tokens,
                     int no_eos, int threads, int chunk, int32_t *out, int *n_out, gen_out *g, st_err *err) {
    model *m = NULL;
    model_ctx *ctx = NULL;
    smp_sampler *smp = NULL;
    float *lg = NULL, *lg2 = NULL;
    int rc = !strncmp(dir, "synthetic:", 10) ? synth_model(&m, dir + 10, 1, NULL, err) : model_load(&m, dir, NULL, err);
    if (rc) return rc;
    int V = m->desc.n_vocab;
    model_ctx_opts co = {.max_ctx = n_prompt + max_tokens + 1, .n_slots = 1, .max_batch = chunk > 0 ? chunk : 64, .n_threads = threads};
    if ((rc = model_ctx_init(&ctx, m, &co, err))) goto out;
    lg = malloc((size_t)V * 4), lg2 = malloc((size_t)V * 4);
    if (!lg || !lg2 || !(smp = smp_init(sp, V, 0, err))) {
        rc = err->code ? err->code : ST_ERR_NOMEM;
        goto out;
    }
    *n_out = 0;
    if ((rc = model_forward_seq(ctx, prompt, n_prompt, 0, lg, LOGITS_LAST, err))) goto out;
    for (int i = 0; i < max_tokens; i++) {
        memcpy(lg2, lg, (size_t)V * 4);
        on_tok(g, 0, 0, lg2, V);
        int32_t t = smp_sample(smp, lg);
        if (t < 0) break;
        smp_accept(smp, t);
        out[(*n_out)++] = t;
        int eos = 0;
        for (int k = 0; k < m->desc.n_eos && !no_eos; k++) eos |= t == m->desc.eos_ids[k];
        if (eos || i + 1 == max_tokens) break;
        if ((rc = model_forward_seq(ctx, &t, 1, n_prompt + i, lg, LOGITS_LAST, err))) goto out;
    }
out:
    free(lg), free(lg2);
    smp_free(smp);
    model_ctx_free(ctx);
    model_free(m);
    return rc;
}

int cmd_cluster_gen(int argc, char **argv) {
    const char *dir = NULL, *logits_path = NULL, *check_path = NULL, *ids = NULL;
    coord_opts o = {.cluster_key = NULL};
    smp_params sp = smp_params_default();
    sp.temperature = 0;
    int max_tokens = 16, local = 0, golden = -1, no_eos = 0, n_seqs = 1, distinct = 0;
    int32_t *dprompts = NULL; /* --distinct: [n_seqs, n_prompt] */
    int *dn_out = NULL;       /* --distinct: each sequence's count */
    const char *discover = NULL;
    char found[CLUSTER_MAX_PEERS * 64];
    double rtol = 1e-4;
    gen_out g = {.kill_sig = SIGKILL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--peers") && more) o.peers = argv[++i];
        else if (!strcmp(a, "--discover") && more) discover = argv[++i];
        else if (!strcmp(a, "--local")) local = 1;
        else if (!strcmp(a, "--prompt-ids") && more) ids = argv[++i];
        else if (!strcmp(a, "--golden") && more) golden = atoi(argv[++i]);
        else if (!strcmp(a, "--max-tokens") && more) max_tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--cluster-key") && more) o.cluster_key = argv[++i];
        else if (!strcmp(a, "--stages") && more) o.n_stages = atoi(argv[++i]);
        else if (!strcmp(a, "--split") && more) {
            const char *k = argv[++i];
            if (strcmp(k, "even") && strcmp(k, "plan")) {
                fprintf(stderr, "strata cluster-gen: --split is plan or even, got '%s'\n", k);
                return 2;
            }
            o.split = !strcmp(k, "even") ? COORD_SPLIT_EVEN : COORD_SPLIT_PLAN;
        } else if (!strcmp(a, "--objective") && more) {
            const char *k = argv[++i];
            if (strcmp(k, "latency") && strcmp(k, "throughput")) {
                fprintf(stderr, "strata cluster-gen: --objective is latency or throughput, got '%s'\n", k);
                return 2;
            }
            o.objective = !strcmp(k, "throughput");
        } else if (!strcmp(a, "--reserve") && more) o.reserve = atof(argv[++i]);
        else if (!strcmp(a, "--probe-bytes") && more) o.probe_bytes = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--calib-mb") && more) o.calib_mb = atoi(argv[++i]);
        else if (!strcmp(a, "--xport") && more) {
            const char *k = argv[++i];
            o.xport_pref = !strcmp(k, "tcp") ? XPORT_PREF_TCP : !strcmp(k, "shm") ? XPORT_PREF_SHM : XPORT_PREF_AUTO;
            o.nccl = !strcmp(k, "nccl");
        } else if (!strcmp(a, "--xport-buffers") && more) o.n_buffers = atoi(argv[++i]);
        else if (!strcmp(a, "--xport-max-inflight") && more) o.max_inflight = atoi(argv[++i]);
        else if (!strcmp(a, "--data-mac")) o.data_mac = 1;
        else if (!strcmp(a, "--ctx") && more) o.max_ctx = atoi(argv[++i]);
        else if (!strcmp(a, "--slots") && more) o.n_slots = atoi(argv[++i]);
        else if (!strcmp(a, "--chunk") && more) o.max_batch = atoi(argv[++i]);
        else if (!strcmp(a, "--threads") && more) o.n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--seqs") && more) n_seqs = atoi(argv[++i]);
        else if (!strcmp(a, "--distinct")) distinct = 1;
        else if (!strcmp(a, "--temperature") && more) sp.temperature = (float)atof(argv[++i]);
        else if (!strcmp(a, "--top-k") && more) sp.top_k = atoi(argv[++i]);
        else if (!strcmp(a, "--top-p") && more) sp.top_p = (float)atof(argv[++i]);
        else if (!strcmp(a, "--seed") && more) sp.seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--print-logits") && more) logits_path = argv[++i];
        else if (!strcmp(a, "--check-logits") && more) check_path = argv[++i];
        else if (!strcmp(a, "--rtol") && more) rtol = atof(argv[++i]);
        else if (!strcmp(a, "--no-eos")) no_eos = 1;
        else if (!strcmp(a, "--kill-at") && i + 2 < argc) {
            g.kill_at = atoi(argv[++i]);
            g.kill_pid = atoi(argv[++i]);
        } else if (!strcmp(a, "--kill-signal") && more) g.kill_sig = atoi(argv[++i]);
        else if (!strcmp(a, "--heartbeat-ms") && more) o.heartbeat_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--dead-ms") && more) o.dead_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) return usage(stdout), 0;
        else if (a[0] == '-') {
            fprintf(stderr, "strata cluster-gen: unknown or incomplete option '%s'\n", a);
            return usage(stderr), 2;
        } else if (!dir) dir = a;
        else return usage(stderr), 2;
    }
    if (discover && !o.peers && !local) { /* peers from the nodes' LAN beacons */
        st_err derr = {0};
        if (beacon_discover(discover, o.cluster_key, found, sizeof found, NULL, &derr)) {
            fprintf(stderr, "strata: %s\n", derr.msg);
            return 1;
        }
        o.peers = found;
    }
    if (!dir || (!local && !o.peers) || (!ids && golden < 0) || max_tokens < 1 || n_seqs < 1)
        return usage(stderr), 2;
    if (n_seqs > 1 && o.n_slots < n_seqs) o.n_slots = n_seqs;
    o.model_dir = dir;
    o.want_logits = logits_path || check_path;
    st_err err = {0};
    int32_t *prompt = NULL, *out = NULL, *golden_ids = NULL;
    int n_prompt = 0, n_golden = 0, rc = 1;
    g.rtol = rtol;
    sft_set gs = {0};
    coord *c = NULL;
    if (ids && parse_ids(ids, &prompt, &n_prompt)) {
        fprintf(stderr, "strata: --prompt-ids: expected comma-separated ids\n");
        return 2;
    }
    if (golden >= 0) {
        char *gp = st_path_join(dir, "golden.safetensors"), n1[32], n2[32];
        snprintf(n1, sizeof n1, "prompt_%d", golden), snprintf(n2, sizeof n2, "greedy_%d", golden);
        const sft_tensor *tp = NULL, *tg = NULL;
        if (!gp || sft_set_open_file(&gs, gp, &err) || !(tp = sft_set_find(&gs, n1)) || !(tg = sft_set_find(&gs, n2)) ||
            tp->dtype != SFT_I32 || tg->dtype != SFT_I32) {
            fprintf(stderr, "strata: %s: no usable %s / %s%s%s\n", gp ? gp : dir, n1, n2, err.msg[0] ? ": " : "", err.msg);
            free(gp);
            goto out;
        }
        free(gp);
        n_prompt = (int)tp->shape[0];
        prompt = malloc((size_t)n_prompt * 4);
        memcpy(prompt, tp->data, (size_t)n_prompt * 4);
        golden_ids = (int32_t *)tg->data;
        n_golden = (int)tg->shape[0];
        no_eos = 1; /* transformers' greedy run ignores eos */
    }
    out = calloc((size_t)max_tokens * (size_t)n_seqs, 4);
    if (logits_path && !(g.logits_f = fopen(logits_path, "wb"))) {
        fprintf(stderr, "strata: %s: cannot write\n", logits_path);
        goto out;
    }
    if (check_path) {
        FILE *f = fopen(check_path, "rb");
        if (!f) {
            fprintf(stderr, "strata: %s: cannot read\n", check_path);
            goto out;
        }
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        g.ref = malloc((size_t)sz + 4);
        if (!g.ref || fread(g.ref, 1, (size_t)sz, f) != (size_t)sz) {
            fclose(f);
            fprintf(stderr, "strata: %s: read failed\n", check_path);
            goto out;
        }
        fclose(f);
        g.ref_steps = sz; /* in bytes until the vocabulary is known */
    }
    int n_out = 0;
    coord_stats st = {0};
    if (local) {
        model_desc d = {0};
        if (model_desc_load(&d, dir, &err) == 0) {
            if (g.ref) g.ref_steps /= (long)d.n_vocab * 4;
            model_desc_free(&d);
        }
        uint64_t t0 = st_time_ns();
        if (run_local(dir, prompt, n_prompt, &sp, max_tokens, no_eos, o.n_threads, o.max_batch, out, &n_out, &g, &err)) {
            fprintf(stderr, "strata: %s\n", err.msg);
            goto out;
        }
        fprintf(stderr, "stats: local, %d tokens in %.3f s\n", n_out, (double)(st_time_ns() - t0) / 1e9);
    } else {
        if (coord_init(&c, &o, &err)) {
            fprintf(stderr, "strata: %s\n", err.msg);
            goto out;
        }
        if (g.ref) g.ref_steps /= (long)coord_n_vocab(c) * 4;
        coord_seq *seqs = calloc((size_t)n_seqs, sizeof *seqs);
        if (distinct && (!(dprompts = malloc((size_t)n_seqs * (size_t)n_prompt * 4)) || !(dn_out = calloc((size_t)n_seqs, sizeof *dn_out)))) {
            fprintf(stderr, "strata: out of memory\n");
            free(seqs);
            goto out;
        }
        for (int s = 0; seqs && s < n_seqs; s++) {
            const int32_t *ps = prompt;
            if (distinct) {
                int32_t *d = dprompts + (size_t)s * (size_t)n_prompt;
                memcpy(d, prompt, (size_t)n_prompt * 4);
                d[0] = (int32_t)(((int64_t)d[0] + s) % coord_n_vocab(c));
                ps = d;
            }
            seqs[s] = (coord_seq){.prompt = ps, .n_prompt = n_prompt, .params = sp, .max_tokens = max_tokens,
                                  .eos = NULL, .n_eos = no_eos ? 0 : -1, .out_ids = out + (size_t)s * max_tokens};
        }
        if (!seqs || coord_generate_many(c, seqs, n_seqs, on_tok, &g, &st, &err)) {
            fprintf(stderr, "strata: %s\n", seqs ? err.msg : "out of memory");
            free(seqs);
            goto out;
        }
        n_out = seqs[0].n_out;
        for (int s = 0; distinct && s < n_seqs; s++) dn_out[s] = seqs[s].n_out;
        for (int s = 1; s < n_seqs && !distinct; s++)
            if (seqs[s].n_out != n_out || memcmp(seqs[s].out_ids, out, (size_t)n_out * 4))
                fprintf(stderr, "strata: warning: concurrent sequence %d differs from sequence 0\n", s);
        free(seqs);
        fprintf(stderr, "stats: stages %d link %s tokens %d wall %.4f s aggregate %.1f tok/s decode %.3f ms/token"
                        " orchestration %.1f us/token recoveries %d (%.2f s) max_gap %.3f s rows/step %.2f\n",
                st.n_stages, st.data_link, st.n_tokens, st.wall_s, st.tok_s, st.decode_token_ms, st.orch_us_per_token,
                st.n_recoveries, st.recovery_s, g.max_gap_s, st.rows_per_step);
        for (int k = 0; k < st.n_stages; k++)
            fprintf(stderr, "stats: stage %d compute %.3f ms, hop %d->%d %.3f ms, residency %.0f%%\n", k,
                    st.stage_compute_ms[k], k, (k + 1) % st.n_stages, st.hop_ms[k],
                    st.decode_token_ms > 0 ? 100.0 * st.stage_compute_ms[k] / st.decode_token_ms : 0.0);
        coord_plan_info pi;
        coord_get_plan(c, &pi);
        if (pi.planned) {
            double meas = st.decode_token_ms > 0 ? 1e3 / st.decode_token_ms : 0;
            fprintf(stderr, "plan: stages %d predicted %.3f ms/token %.1f tok/s, measured %.1f tok/s (error %+.1f%%); "
                            "budget checked %d over %d\n",
                    pi.n_stages, pi.predicted_token_ms, pi.predicted_tok_s, meas,
                    pi.predicted_tok_s > 0 && meas > 0 ? 100 * (pi.predicted_tok_s - meas) / meas : 0, pi.budget_checked,
                    pi.n_over_budget);
            for (int k = 0; k < pi.n_stages; k++)
                fprintf(stderr, "plan: stage %d budget weights %llu/%llu kv %llu/%llu rss %llu/%llu\n", k,
                        (unsigned long long)pi.actual_weights[k], (unsigned long long)pi.budget_weights[k],
                        (unsigned long long)pi.actual_kv[k], (unsigned long long)pi.budget_kv[k],
                        (unsigned long long)pi.actual_rss[k], (unsigned long long)pi.budget_total[k]);
        }
    }
    printf("ids:");
    for (int i = 0; i < n_out; i++) printf(" %d", out[i]);
    printf("\n");
    for (int s = 1; dn_out && s < n_seqs; s++) {
        printf("ids %d:", s);
        for (int i = 0; i < dn_out[s]; i++) printf(" %d", out[(size_t)s * max_tokens + i]);
        printf("\n");
    }
    rc = 0;
    if (golden_ids) {
        int n = n_out < n_golden ? n_out : n_golden, same = 0;
        while (same < n && out[same] == golden_ids[same]) same++;
        printf("golden: greedy %d/%d %s\n", same, n, same == n ? "match" : "MISMATCH");
        if (same != n) rc = 1;
    }
    if (g.ref) {
        printf("logits: %ld steps, worst max|d|/max|ref| %.3e (rtol %.1e) %s\n", g.step, g.worst, rtol,
               g.bad || g.step != g.ref_steps ? "MISMATCH" : "match");
        if (g.bad || g.step != g.ref_steps) rc = 1;
    }
out:
    if (g.logits_f) fclose(g.logits_f);
    free(g.ref);
    coord_free(c);
    free(prompt), free(out), free(dprompts), free(dn_out);
    sft_set_close(&gs);
    return rc;
}
