/* cmd_node.c — `strata node`: the per-machine daemon of a cluster (src/cluster/node.c).
 * Runs until SIGINT / SIGTERM; exit status 0 on a clean stop, 1 on a startup error. */
#include "app.h"
#include "strata/cluster.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f) {
    fprintf(f, "usage: strata node --listen HOST:PORT [options]\n"
               "  --cluster-key K       shared cluster key (or env STRATA_CLUSTER_KEY)\n"
               "  --state-dir DIR       keeps the persistent node id (DIR/node_id)\n"
               "  --memory-limit BYTES  refuse LOADs needing more (weights + KV); suffixes K M G\n"
               "  --threads N           compute threads (default: all cores)\n"
               "  --xport auto|tcp      tcp: refuse shared-memory links\n"
               "  --port-file FILE      write the bound port (with --listen HOST:0)\n"
               "  --no-bw-probe         skip the memory bandwidth measurement at start\n"
               "  --device cpu|cuda[:N] run the stage on the CPU (default) or CUDA device N\n"
               "  --sync-mode stream|host  GPU hand-off: stream-ordered flag (default) or host sync\n"
               "GPU stages join NCCL links when the coordinator runs with --xport nccl; environment:\n"
               "  STRATA_NCCL_TIMEOUT_MS  bound on a step in flight over NCCL (default 10000; joins: 3x)\n"
               "  STRATA_NCCL_GRAPH=1     capture the NCCL receive / send into the stage graphs\n"
               "  STRATA_NCCL_LIB         the NCCL library to load (default libnccl.so.2)\n");
}

static uint64_t parse_bytes(const char *s) {
    char *e;
    double v = strtod(s, &e);
    if (e == s || v < 0) return 0;
    switch (*e) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    default: break;
    }
    return (uint64_t)v;
}

int cmd_node(int argc, char **argv) {
    node_opts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--listen") && more) o.listen = argv[++i];
        else if (!strcmp(a, "--cluster-key") && more) o.cluster_key = argv[++i];
        else if (!strcmp(a, "--state-dir") && more) o.state_dir = argv[++i];
        else if (!strcmp(a, "--memory-limit") && more) {
            const char *v = argv[++i], *eq = strchr(v, '=');
            o.memory_limit = parse_bytes(eq ? eq + 1 : v); /* accepts DEV=BYTES too (cpu only) */
        } else if (!strcmp(a, "--threads") && more) o.n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--xport") && more) o.xport_pref = !strcmp(argv[++i], "tcp") ? XPORT_PREF_TCP : XPORT_PREF_AUTO;
        else if (!strcmp(a, "--port-file") && more) o.port_file = argv[++i];
        else if (!strcmp(a, "--no-bw-probe")) o.bw_probe_mb = -1;
        else if (!strcmp(a, "--beacon") && more) {
            o.beacon_port = atoi(argv[++i]);
            if (o.beacon_port < 1 || o.beacon_port > 65535) {
                fprintf(stderr, "strata node: --beacon wants a UDP port 1..65535, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--beacon-ms") && more) o.beacon_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--device") && more) o.device = argv[++i];
        else if (!strcmp(a, "--sync-mode") && more) {
            const char *v = argv[++i];
            if (strcmp(v, "host") && strcmp(v, "stream")) {
                fprintf(stderr, "strata node: --sync-mode takes host or stream, not '%s'\n", v);
                return 2;
            }
            o.sync_host = !strcmp(v, "host");
        }
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) return usage(stdout), 0;
        else {
            fprintf(stderr, "strata node: unknown or incomplete option '%s'\n", a);
            return usage(stderr), 2;
        }
    }
    if (!o.listen) return usage(stderr), 2;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    st_err err = {0};
    if (node_run(&o, &g_stop, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return 1;
    }
    return 0;
}
