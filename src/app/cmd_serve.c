/* cmd_serve.c — `strata serve MODEL`: the OpenAI-compatible HTTP server (see strata/serve.h).
 * With --peers the model runs on a cluster of `strata node` processes (backend_cluster.c):
 * this process tokenises, schedules and streams; the nodes hold the weights.
 *
 * The HTTP daemon starts first (answering 503 "loading" with Retry-After), the model loads on
 * a second thread, and the main thread waits for SIGINT/SIGTERM to shut down cleanly.
 */
#include "app.h"
#include "strata/base.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef STRATA_HAVE_MHD
int cmd_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "strata serve: this build has no HTTP server (libmicrohttpd-dev was not found at configure time)\n");
    return 1;
}
#else

#include "strata/serve.h"
#include "strata/xport.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define SERVE_MAX_KEYS 256

static void usage(void) {
    fprintf(stderr,
            "usage: strata serve MODEL [options]\n"
            "  MODEL is a checkpoint directory or a hub id org/name[@rev]; --synthetic PRESET[:QUANT] for random weights\n"
            "  --host ADDR           listen address (default 127.0.0.1)\n"
            "  --port N              (default 8080; 0 = any free port, see --port-file)\n"
            "  --port-file F         write the port number to F once listening\n"
            "  --slots N             KV slots = sequences decoded together (default 4)\n"
            "  --queue N             requests waiting for a slot before 429 (default 64)\n"
            "  --ctx N               context per slot (default min(model max, 4096))\n"
            "  --kv-budget N         KV tokens admitted at once, prompt + max_tokens (default slots x ctx)\n"
            "  --api-key KEY         require 'Authorization: Bearer KEY' on /v1/* (repeatable)\n"
            "  --api-key-file F      keys, one per line ('#' comments)\n"
            "  --max-body BYTES      request body limit, k/m suffixes (default 1m)\n"
            "  --model-name NAME     the id clients use (default: the directory's name)\n"
            "  --tokenizer DIR  --threads N  --offline\n"
            "Cluster (MODEL is a directory with the same path on every node):\n"
            "  --peers A:P,B:P,...   serve from these `strata node` processes (pipeline stages)\n"
            "  --cluster-key K       shared key (default: env STRATA_CLUSTER_KEY)\n"
            "  --stages N            pipeline stages (default: as many as nodes and layers allow)\n"
            "  --xport tcp|shm|nccl  data links between stages (default: shm on one host, else tcp; nccl:\n"
            "                        NCCL between two GPU stages, the default elsewhere)\n"
            "  --batch N             prefill chunk on the nodes (default 64)\n"
            "Endpoints: POST /v1/chat/completions, /v1/completions; GET /v1/models, /v1/cluster, /health,\n"
            "/metrics, / (dashboard). Test hooks (environment): STRATA_SERVE_LOAD_DELAY_MS delays the\n"
            "model load; STRATA_SERVE_FAULTS=1 honours the x-strata-fault: internal request header.\n");
}

static int parse_size(const char *s, size_t *out) {
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s || v < 0) return -1;
    if (*end == 'k' || *end == 'K') v *= 1024, end++;
    else if (*end == 'm' || *end == 'M') v *= 1024 * 1024, end++;
    else if (*end == 'g' || *end == 'G') v *= 1024.0 * 1024 * 1024, end++;
    if (*end == 'b' || *end == 'B') end++;
    if (*end) return -1;
    *out = (size_t)v;
    return 0;
}

static int read_keys(const char *path, char **keys, int *n) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "strata serve: --api-key-file %s: cannot open\n", path);
        return -1;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        p[strcspn(p, "\r\n")] = 0;
        size_t l = strlen(p);
        while (l && (p[l - 1] == ' ' || p[l - 1] == '\t')) p[--l] = 0;
        if (!l || *p == '#') continue;
        if (*n >= SERVE_MAX_KEYS) break;
        keys[(*n)++] = strdup(p);
    }
    fclose(f);
    return 0;
}

typedef struct loader {
    serve_server *srv;
    const char *model;
    serve_local_opts lo;
    serve_cluster_opts co;     /* co.peers set: serve from a cluster                         */
    int ok;
} loader;

static void *load_main(void *arg) {
    loader *L = arg;
    const char *delay = getenv("STRATA_SERVE_LOAD_DELAY_MS");
    if (delay && atoi(delay) > 0) {
        struct timespec ts = {atoi(delay) / 1000, (long)(atoi(delay) % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    double t0 = st_time_s();
    serve_backend *b = NULL;
    st_err err = {0};
    int rc = L->co.peers ? serve_backend_cluster_open(&b, L->model, &L->co, &err)
                         : serve_backend_local_open(&b, L->model, &L->lo, &err);
    if (rc || serve_attach(L->srv, b, &err)) {
        ST_ERROR("serve: %s", err.msg);
        serve_set_load_error(L->srv, err.msg);
        return NULL;
    }
    L->ok = 1;
    ST_INFO("serve: model '%s' ready in %.1f s (%d slots x %d tokens of context, vocabulary %d)", b->info.model_id,
            st_time_s() - t0, b->info.n_slots, b->info.max_ctx, b->info.n_vocab);
    return NULL;
}

int cmd_serve(int argc, char **argv) {
    const char *model = NULL, *port_file = NULL;
    serve_opts so = {.host = "127.0.0.1", .port = 8080, .queue_max = 64, .max_body = 1 << 20};
    serve_local_opts lo = {.n_slots = 4};
    serve_cluster_opts co = {0};
    char *keys[SERVE_MAX_KEYS];
    int n_keys = 0, rc = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED()                                                             \
    do {                                                                   \
        if (!v) {                                                          \
            fprintf(stderr, "strata serve: %s needs a value\n", a);        \
            goto usage_err;                                                \
        }                                                                  \
        i++;                                                               \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            rc = 0;
            goto out;
        } else if (!strcmp(a, "--host")) { NEED(); so.host = v; }
        else if (!strcmp(a, "--port")) { NEED(); so.port = atoi(v); }
        else if (!strcmp(a, "--port-file")) { NEED(); port_file = v; }
        else if (!strcmp(a, "--slots")) { NEED(); lo.n_slots = atoi(v); }
        else if (!strcmp(a, "--queue")) { NEED(); so.queue_max = atoi(v); }
        else if (!strcmp(a, "--ctx")) { NEED(); lo.max_ctx = atoi(v); }
        else if (!strcmp(a, "--kv-budget")) { NEED(); so.kv_budget = atoll(v); }
        else if (!strcmp(a, "--threads")) { NEED(); lo.n_threads = atoi(v); }
        else if (!strcmp(a, "--tokenizer")) { NEED(); lo.tokenizer_dir = v; }
        else if (!strcmp(a, "--synthetic")) { NEED(); lo.synthetic = v; }
        else if (!strcmp(a, "--model-name")) { NEED(); lo.model_name = v; }
        else if (!strcmp(a, "--offline")) lo.offline = 1;
        else if (!strcmp(a, "--peers")) { NEED(); co.peers = v; }
        else if (!strcmp(a, "--cluster-key")) { NEED(); co.cluster_key = v; }
        else if (!strcmp(a, "--stages")) { NEED(); co.n_stages = atoi(v); }
        else if (!strcmp(a, "--batch")) { NEED(); co.max_batch = atoi(v); }
        else if (!strcmp(a, "--xport")) {
            NEED();
            if (!strcmp(v, "tcp")) co.xport_pref = XPORT_PREF_TCP;
            else if (!strcmp(v, "shm")) co.xport_pref = XPORT_PREF_SHM;
            else if (!strcmp(v, "auto")) co.xport_pref = XPORT_PREF_AUTO;
            else if (!strcmp(v, "nccl")) co.xport_pref = XPORT_PREF_AUTO, co.nccl = 1;
            else {
                fprintf(stderr, "strata serve: --xport %s: expected tcp, shm, auto or nccl\n", v);
                goto usage_err;
            }
        }
        else if (!strcmp(a, "--api-key")) {
            NEED();
            if (n_keys < SERVE_MAX_KEYS) keys[n_keys++] = strdup(v);
        } else if (!strcmp(a, "--api-key-file")) {
            NEED();
            if (read_keys(v, keys, &n_keys)) goto out;
        } else if (!strcmp(a, "--max-body")) {
            NEED();
            if (parse_size(v, &so.max_body) || so.max_body == 0) {
                fprintf(stderr, "strata serve: --max-body %s: not a size\n", v);
                goto usage_err;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "strata serve: unknown option %s\n", a);
            goto usage_err;
        } else if (!model) model = a;
        else {
            fprintf(stderr, "strata serve: unexpected argument %s\n", a);
            goto usage_err;
        }
#undef NEED
    }
    if (!model && !lo.synthetic) {
        fprintf(stderr, "strata serve: no MODEL given\n");
        goto usage_err;
    }
    if (lo.n_slots < 1 || lo.n_slots > 1024 || so.queue_max < 0 || so.port < 0 || so.port > 65535) {
        fprintf(stderr, "strata serve: --slots must be in [1, 1024], --queue >= 0, --port in [0, 65535]\n");
        goto usage_err;
    }
    if (co.peers && (lo.synthetic || lo.tokenizer_dir || !model)) {
        fprintf(stderr, "strata serve: --peers serves a model directory (no --synthetic, no --tokenizer)\n");
        goto usage_err;
    }
    if (co.n_stages < 0 || co.n_stages > 8 || co.max_batch < 0 || co.max_batch > 8192) {
        fprintf(stderr, "strata serve: --stages must be in [0, 8], --batch in [0, 8192]\n");
        goto usage_err;
    }
    co.n_slots = lo.n_slots, co.max_ctx = lo.max_ctx, co.n_threads = lo.n_threads, co.model_name = lo.model_name;
    so.api_keys = (const char *const *)keys;
    so.n_api_keys = n_keys;
    const char *faults = getenv("STRATA_SERVE_FAULTS");
    so.test_faults = faults && !strcmp(faults, "1");

    /* signals go to the main thread only: block them before any thread starts */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    serve_server *srv = NULL;
    st_err err = {0};
    if (serve_start(&srv, &so, &err)) {
        fprintf(stderr, "strata serve: %s\n", err.msg);
        goto out;
    }
    int port = serve_port(srv);
    if (port_file) {
        FILE *f = fopen(port_file, "w");
        if (f) {
            fprintf(f, "%d\n", port);
            fclose(f);
        }
    }
    ST_INFO("serve: listening on http://%s:%d (dashboard at /, API at /v1)%s", so.host, port,
            n_keys ? ", API keys required" : "");
    loader L = {.srv = srv, .model = model, .lo = lo, .co = co};
    if (!L.model) L.model = lo.synthetic;
    pthread_t th;
    if (pthread_create(&th, NULL, load_main, &L)) {
        serve_stop(srv);
        goto out;
    }
    int sig = 0;
    sigwait(&set, &sig);
    ST_INFO("serve: %s received, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    pthread_join(th, NULL);
    serve_stop(srv);
    rc = 0;
    goto out;
usage_err:
    usage();
    rc = 2;
out:
    for (int i = 0; i < n_keys; i++) free(keys[i]);
    return rc;
}
#endif
