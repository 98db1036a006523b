/* metrics.c — Prometheus counters and histograms for `strata serve` (text format 0.0.4). */
#include "serve_internal.h"

#include <string.h>

static void hist_init(met_hist *h, const double *le, int n) {
    memset(h, 0, sizeof *h);
    h->n = n;
    memcpy(h->le, le, (size_t)n * sizeof *le);
}

void metrics_init(serve_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    static const double lat[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
    static const double e2e[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
    hist_init(&m->ttft, lat, 13);
    hist_init(&m->queue, lat, 13);
    hist_init(&m->itl, itl, 11);
    hist_init(&m->e2e, e2e, 11);
    m->t_start = st_time_s();
}

void metrics_destroy(serve_metrics *m) { pthread_mutex_destroy(&m->mu); }

void metrics_count_status(serve_metrics *m, int endpoint, int status) {
    if (endpoint < 0 || endpoint >= MET_N_ENDPOINTS) endpoint = MET_EP_OTHER;
    pthread_mutex_lock(&m->mu);
    if (status >= 100 && status < 600) m->by_status[endpoint][status]++;
    pthread_mutex_unlock(&m->mu);
}

void met_hist_observe(met_hist *h, double v) {
    int b = 0;
    while (b < h->n && v > h->le[b]) b++;
    h->count[b]++;
    h->sum += v;
    h->total++;
}

void metrics_observe(serve_metrics *m, met_hist *h, double v) {
    pthread_mutex_lock(&m->mu);
    met_hist_observe(h, v);
    pthread_mutex_unlock(&m->mu);
}

static void hist_render(sbuf *o, const char *name, const char *help, const met_hist *h) {
    sbuf_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->count[i];
        sbuf_printf(o, "%s_bucket{le=\"%g\"} %llu\n", name, h->le[i], (unsigned long long)cum);
    }
    cum += h->count[h->n];
    sbuf_printf(o, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)cum, name,
                h->sum, name, (unsigned long long)h->total);
}

int metrics_render(serve_metrics *m, const serve_gauges *g, sbuf *o) {
    pthread_mutex_lock(&m->mu);
    static const char *const ep_names[MET_N_ENDPOINTS] = {"chat", "completions", "models", "cluster",
                                                          "metrics", "health", "dashboard", "other"};
    sbuf_printf(o, "# HELP strata_requests_total HTTP responses by endpoint and status code.\n"
                   "# TYPE strata_requests_total counter\n");
    for (int e = 0; e < MET_N_ENDPOINTS; e++)
        for (int s = 100; s < 600; s++)
            if (m->by_status[e][s])
                sbuf_printf(o, "strata_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n", ep_names[e], s,
                            (unsigned long long)m->by_status[e][s]);
    sbuf_printf(o,
                "# HELP strata_prompt_tokens_total Prompt tokens of admitted requests.\n# TYPE strata_prompt_tokens_total counter\n"
                "strata_prompt_tokens_total %llu\n"
                "# HELP strata_prompt_tokens_cached_total Prompt tokens reused from a slot's KV cache.\n# TYPE strata_prompt_tokens_cached_total counter\n"
                "strata_prompt_tokens_cached_total %llu\n"
                "# HELP strata_generation_tokens_total Generated tokens.\n# TYPE strata_generation_tokens_total counter\n"
                "strata_generation_tokens_total %llu\n"
                "# HELP strata_requests_cancelled_total Generations cancelled by a client disconnect.\n# TYPE strata_requests_cancelled_total counter\n"
                "strata_requests_cancelled_total %llu\n"
                "# HELP strata_decode_steps_total Batched decode forward calls.\n# TYPE strata_decode_steps_total counter\n"
                "strata_decode_steps_total %llu\n"
                "# HELP strata_decode_rows_total Sequences advanced by decode steps (rows / steps = mean batch).\n# TYPE strata_decode_rows_total counter\n"
                "strata_decode_rows_total %llu\n"
                "# HELP strata_prefill_chunks_total Prefill forward calls.\n# TYPE strata_prefill_chunks_total counter\n"
                "strata_prefill_chunks_total %llu\n"
                "# HELP strata_forward_seconds_total Wall time inside the backend's forward.\n# TYPE strata_forward_seconds_total counter\n"
                "strata_forward_seconds_total %.6f\n",
                (unsigned long long)m->prompt_tokens, (unsigned long long)m->cached_tokens,
                (unsigned long long)m->completion_tokens, (unsigned long long)m->cancelled,
                (unsigned long long)m->decode_steps, (unsigned long long)m->decode_rows,
                (unsigned long long)m->prefill_chunks, m->forward_s);
    hist_render(o, "strata_time_to_first_token_seconds", "Time from arrival to the first generated token.", &m->ttft);
    hist_render(o, "strata_inter_token_seconds", "Time between consecutive tokens of a sequence.", &m->itl);
    hist_render(o, "strata_queue_seconds", "Time from arrival to admission into a KV slot.", &m->queue);
    hist_render(o, "strata_request_seconds", "Time from arrival to the end of generation.", &m->e2e);
    double up = st_time_s() - m->t_start;
    pthread_mutex_unlock(&m->mu);
    sbuf_printf(o,
                "# HELP strata_kv_slots_used KV slots holding an active sequence.\n# TYPE strata_kv_slots_used gauge\n"
                "strata_kv_slots_used %d\n"
                "# HELP strata_kv_slots_total KV slots.\n# TYPE strata_kv_slots_total gauge\nstrata_kv_slots_total %d\n"
                "# HELP strata_kv_tokens_used KV positions held by active sequences.\n# TYPE strata_kv_tokens_used gauge\n"
                "strata_kv_tokens_used %lld\n"
                "# HELP strata_kv_tokens_total KV capacity in tokens (slots x context).\n# TYPE strata_kv_tokens_total gauge\n"
                "strata_kv_tokens_total %lld\n"
                "# HELP strata_queue_depth Requests waiting for a slot.\n# TYPE strata_queue_depth gauge\nstrata_queue_depth %d\n"
                "# HELP strata_queue_capacity Queue bound (429 beyond it).\n# TYPE strata_queue_capacity gauge\nstrata_queue_capacity %d\n"
                "# HELP strata_loading 1 while the model loads.\n# TYPE strata_loading gauge\nstrata_loading %d\n"
                "# HELP strata_uptime_seconds Seconds since start.\n# TYPE strata_uptime_seconds gauge\nstrata_uptime_seconds %.3f\n",
                g->slots_used, g->slots_total, (long long)g->kv_tokens_used, (long long)g->kv_tokens_total,
                g->queue_depth, g->queue_max, g->loading, up);
    return 0;
}
