/* bench_cluster.c — `strata bench MODEL_DIR --peers A:P,...`: the seed's table measured on a
 * running cluster of `strata node` processes.
 *
 * How each figure is measured:
 * - token latency: host time between consecutive tokens of one greedy sequence as they reach
 *   the coordinator (after the first), p50/p90/p99;
 * - orchestration per token: the coordinator's decode token time minus the stages' compute
 *   time and the hop times reported with each activation (coord_stats.orch_us_per_token);
 * - per-hop latency: mean transfer time of each hop i -> i+1 and last -> stage 0;
 * - residency per stage: that stage's compute time per decode step / the decode token time
 *   (one stream keeps each stage busy only for its share of the pipeline);
 * - aggregate tokens/s with 1, 4 and 16 concurrent sequences (micro-batched pipeline);
 * - the placement solver's predicted tok/s for one stream against the measured decode tok/s
 *   (the coordinator plans for throughput on matvec rates re-measured at start);
 * - with --context N: the stable context — a second placement with one slot of N positions
 *   (the nodes reserve that KV), a real prefill of N - 16 tokens through the pipeline, then 16
 *   decoded tokens whose median gap is the decode latency at the end of the context.
 */
#include "app.h"
#include "strata/bench.h"
#include "strata/cluster.h"

#include <stdlib.h>
#include <string.h>

typedef struct lat_rec {
    double *t;     /* [cap] arrival times of tokens of sequence 0 */
    int n, cap;
} lat_rec;

/* toks[0..n) = token ids below V from a xorshift64 stream started at seed (a prompt that is
 * the same on every run). */
static void random_ids(int32_t *toks, int n, int V, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        toks[i] = (int32_t)(x % (uint64_t)V);
    }
}
static void on_token(void *ud, int seq, int32_t id, const float *logits, int n_vocab) {
    (void)id, (void)logits, (void)n_vocab;
    lat_rec *r = ud;
    if (seq == 0 && r->n < r->cap) r->t[r->n++] = st_time_s();
}

/* The stable-context figure (see the header): fills r->max_ctx_*; a run that cannot place or
 * complete the context is reported in r->max_ctx_note, not returned as an error. */
#define MAXCTX_TAIL 16
static void bench_cluster_max_ctx(const char *model_dir, const char *peers, int64_t ctx, int threads, int nccl,
                                  int n_stages, bench_result *r) {
    r->max_ctx_target = ctx;
    if (ctx < 2 * MAXCTX_TAIL || ctx > INT32_MAX / 2) {
        snprintf(r->max_ctx_note, sizeof r->max_ctx_note, "--context %lld: at least %d", (long long)ctx, 2 * MAXCTX_TAIL);
        return;
    }
    /* as many stages as the main run, layers split evenly over the first n_stages peers: the
     * layout the table above measured, not what the solver would pick for a single slot */
    coord_opts o = {.model_dir = model_dir, .peers = peers, .n_stages = n_stages, .max_ctx = (int)ctx, .n_slots = 1,
                    .max_batch = 256, .n_threads = threads, .nccl = nccl};
    coord *c = NULL;
    st_err e = {0};
    const int n_prompt = (int)ctx - MAXCTX_TAIL;
    int32_t *toks = malloc((size_t)n_prompt * sizeof(int32_t)), out[MAXCTX_TAIL];
    lat_rec lr = {malloc(MAXCTX_TAIL * sizeof(double)), 0, MAXCTX_TAIL};
    double lat[MAXCTX_TAIL];
    if (!toks || !lr.t) {
        snprintf(r->max_ctx_note, sizeof r->max_ctx_note, "not measured: out of memory");
        goto done;
    }
    fprintf(stderr, "strata: stable context: placing one slot of %lld positions ...\n", (long long)ctx);
    if (coord_init(&c, &o, &e)) {
        snprintf(r->max_ctx_note, sizeof r->max_ctx_note, "not placed at %lld positions: %s", (long long)ctx, e.msg);
        goto done;
    }
    const int V = coord_n_vocab(c);
    random_ids(toks, n_prompt, V, 0x2545F4914F6CDD1Dull);
    smp_params greedy = smp_params_default();
    greedy.temperature = 0;
    fprintf(stderr, "strata: stable context: prefill of %d tokens through %d stages, then %d decoded ...\n", n_prompt,
            coord_n_stages(c), MAXCTX_TAIL);
    int n_out = 0;
    const double t0 = st_time_s();
    if (coord_generate(c, toks, n_prompt, &greedy, MAXCTX_TAIL, NULL, 0, out, &n_out, on_token, &lr, NULL, &e)) {
        snprintf(r->max_ctx_note, sizeof r->max_ctx_note, "failed at %lld positions: %s", (long long)ctx, e.msg);
        goto done;
    }
    int nl = 0;
    for (int i = 1; i < lr.n; i++) lat[nl++] = (lr.t[i] - lr.t[i - 1]) * 1e3;
    const double fill_s = lr.n ? lr.t[0] - t0 : st_time_s() - t0;
    r->max_ctx_stable = n_prompt + n_out;
    r->lat_at_max_ctx_ms = bench_percentile(lat, (size_t)nl, 50);
    snprintf(r->max_ctx_note, sizeof r->max_ctx_note,
             "one slot over %d stages (even split): prefill of %d tokens in %.1f s (%.0f tok/s), then %d decoded",
             coord_n_stages(c), n_prompt,
             fill_s, fill_s > 0 ? n_prompt / fill_s : 0, n_out);
    fprintf(stderr, "strata: stable context: %lld of %lld positions, decode there %.2f ms/token\n",
            (long long)r->max_ctx_stable, (long long)ctx, r->lat_at_max_ctx_ms);
done:
    free(toks), free(lr.t);
    coord_free(c);
}

int bench_cluster(const char *model_dir, const char *peers, int prompt, int gen, int conc, int threads, int nccl,
                  int64_t ctx, bench_result *r, st_err *err) {
    int max_conc = conc > 16 ? conc : 16;
    /* placed by the solver for throughput (16 sequences in flight), on matvec rates the nodes
     * re-measure just before planning: the table then compares its prediction with the run */
    coord_opts o = {.model_dir = model_dir, .peers = peers, .max_ctx = prompt + gen + 32, .n_slots = max_conc,
                    .max_batch = 64, .n_threads = threads, .objective = 1, .calib_mb = 64, .nccl = nccl};
    coord *c = NULL;
    int rc = coord_init(&c, &o, err);
    if (rc) return rc;
    const int V = coord_n_vocab(c);
    int32_t *toks = malloc((size_t)prompt * sizeof(int32_t)), *out = malloc((size_t)max_conc * gen * sizeof(int32_t));
    lat_rec lr = {malloc((size_t)gen * sizeof(double)), 0, gen};
    double *lat = malloc((size_t)gen * sizeof(double));
    coord_seq *seqs = calloc((size_t)max_conc, sizeof *seqs);
    int32_t *sp = malloc((size_t)max_conc * 16 * sizeof(int32_t));
    if (!toks || !out || !lr.t || !lat || !seqs || !sp) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto done;
    }
    random_ids(toks, prompt, V, 0x9E3779B97F4A7C15ull);
    smp_params greedy = smp_params_default();
    greedy.temperature = 0;
    coord_stats st1;
    int n_out = 0;
    fprintf(stderr, "strata: cluster of %d stages: one greedy sequence (%d prompt + %d tokens) ...\n", coord_n_stages(c),
            prompt, gen);
    double t0 = st_time_s();
    if ((rc = coord_generate(c, toks, prompt, &greedy, gen, NULL, 0, out, &n_out, on_token, &lr, &st1, err))) goto done;
    int nl = 0;
    for (int i = 1; i < lr.n; i++) lat[nl++] = (lr.t[i] - lr.t[i - 1]) * 1e3;
    r->ttft_s = lr.n ? lr.t[0] - t0 : 0;
    r->prefill_tok_s = r->ttft_s > 0 ? prompt / r->ttft_s : 0;
    double sum = 0;
    for (int i = 0; i < nl; i++) sum += lat[i];
    r->lat_mean_ms = nl ? sum / nl : 0;
    r->decode_tok_s = r->lat_mean_ms > 0 ? 1e3 / r->lat_mean_ms : 0;
    r->lat_p50_ms = bench_percentile(lat, (size_t)nl, 50);
    r->lat_p90_ms = bench_percentile(lat, (size_t)nl, 90);
    r->lat_p99_ms = bench_percentile(lat, (size_t)nl, 99);
    r->orch_us_per_token = st1.orch_us_per_token;
    r->aggregate_tok_s = r->decode_tok_s;
    snprintf(r->backend, sizeof r->backend, "cluster: %d stages over %s (%s)", st1.n_stages, st1.data_link, peers);
    printf("\n| Stage / hop | Value | Notes |\n| :--- | :--- | :--- |\n");
    for (int s = 0; s < st1.n_stages; s++)
        printf("| stage %d compute | %.3f ms/step | residency %.0f%% of the decode token time |\n", s,
               st1.stage_compute_ms[s], st1.decode_token_ms > 0 ? 100 * st1.stage_compute_ms[s] / st1.decode_token_ms : 0);
    for (int s = 0; s < st1.n_stages; s++)
        printf("| hop %d -> %d (%s) | %.1f us | mean per token |\n", s, (s + 1) % st1.n_stages, st1.data_link,
               st1.hop_ms[s] * 1e3);
    printf("| orchestration | %.1f us/token | decode token time - stage compute - hops |\n", st1.orch_us_per_token);
    coord_plan_info pi;
    coord_get_plan(c, &pi);
    if (pi.planned && r->decode_tok_s > 0)
        printf("| predicted (plan) | %.1f tok/s | measured %.1f tok/s: error %+.1f%% (%d stages, plan %.3f ms/token) |\n",
               pi.predicted_tok_s, r->decode_tok_s, 100 * (pi.predicted_tok_s - r->decode_tok_s) / r->decode_tok_s,
               pi.n_stages, pi.predicted_token_ms);
    /* aggregate throughput with 1, 4, 16 (and --concurrency) sequences */
    int levels[4] = {1, 4, 16, conc}, nlev = conc == 1 || conc == 4 || conc == 16 ? 3 : 4;
    for (int li = 0; li < nlev; li++) {
        int n = levels[li];
        for (int s = 0; s < n; s++) {
            for (int i = 0; i < 16; i++) sp[s * 16 + i] = (int32_t)((i * 7919 + s * 104729 + 1) % V);
            seqs[s] = (coord_seq){.prompt = sp + s * 16, .n_prompt = 16, .params = greedy, .max_tokens = gen,
                                  .eos = NULL, .n_eos = 0, .out_ids = out + (size_t)s * gen};
        }
        coord_stats st;
        if ((rc = coord_generate_many(c, seqs, n, NULL, NULL, &st, err))) goto done;
        printf("| aggregate, %2d sequences | %.1f tok/s | %d tokens in %.2f s, %.1f sequences per decode step |\n", n,
               st.tok_s, st.n_tokens, st.wall_s, st.rows_per_step);
        if (n == conc) r->aggregate_tok_s = st.tok_s;
    }
    printf("\n");
done:
    free(toks), free(out), free(lr.t), free(lat), free(seqs), free(sp);
    coord_free(c); /* unloads the stages before the stable-context placement */
    if (!rc && ctx > 0) bench_cluster_max_ctx(model_dir, peers, ctx, threads, nccl, st1.n_stages, r);
    return rc;
}
