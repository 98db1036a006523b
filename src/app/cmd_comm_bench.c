/* cmd_comm_bench.c — `strata comm-bench`: latency of GPU-to-GPU communication on the GPUs of
 * this process, per message size: NCCL send/recv one way (ping-pong / 2), NCCL all-reduce and
 * the one-shot peer all-reduce (strata/cuda_comm.h), each plain (launch + synchronise per
 * operation) and inside a CUDA graph (replay time / operations in the graph). Every result is
 * checked against the exact expected values. Prints a markdown table (stdout), writes JSON
 * (--json), and checks that a peer all-reduce left alone returns by itself (bounded wait).
 *
 * Exit status: 0 all measurements that could run ran and were correct; 1 a measurement failed
 * or gave a wrong result; 2 usage error, no GPU, or built without CUDA.
 */
#include "app.h"
#include "strata/base.h"
#include "strata/gpu.h"
#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_comm.h"
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SIZES 32
#define MAX_MSG_BYTES ((size_t)64 << 20)

static void usage(FILE *f) {
    fprintf(f,
            "usage: strata comm-bench [--gpus N] [--sizes 6K,12K,...] [--iters N] [--graph-ops N] [--json FILE]\n"
            "\n"
            "Latency of NCCL send/recv (one way), NCCL all-reduce and the one-shot peer all-reduce between the\n"
            "GPUs of this process, plain (launch + sync per op) and inside a CUDA graph; results are checked.\n"
            "  --gpus N       GPUs 0..N-1 (default: all; send/recv and the timeout check need 2)\n"
            "  --sizes LIST   message sizes in bytes, K = 1024, M = 1048576, multiples of 4\n"
            "                 (default 6K,12K,24K,48K,96K,192K)\n"
            "  --iters N      plain operations timed per measurement (default 1000)\n"
            "  --graph-ops N  operations captured per graph (default 100); replays: max(3, iters / N)\n"
            "  --json FILE    also write the results as JSON\n"
            "NCCL is loaded at run time: $STRATA_NCCL_LIB or libnccl.so.2 on the library path.\n");
}

/* Parses "12K", "192k", "6144", "1M" into bytes (> 0, a multiple of 4, <= MAX_MSG_BYTES);
 * returns 0 or -1. */
static int parse_size(const char *s, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || errno || *s == '-') return -1;
    unsigned long long mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024, end++;
    else if (*end == 'M' || *end == 'm') mul = 1024 * 1024, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v == 0 || v > MAX_MSG_BYTES / mul) return -1;
    v *= mul;
    if (v % 4) return -1;
    *out = (size_t)v;
    return 0;
}

#ifdef STRATA_HAVE_CUDA
static void size_label(size_t bytes, char *buf, size_t cap) {
    if (bytes % (1024 * 1024) == 0) snprintf(buf, cap, "%zuM", bytes >> 20);
    else if (bytes % 1024 == 0) snprintf(buf, cap, "%zuK", bytes >> 10);
    else snprintf(buf, cap, "%zu", bytes);
}

static const char *const k_kind_name[CUDA_COMM_N_KINDS] = {"nccl_sendrecv", "nccl_allreduce", "peer_allreduce"};
static const char *const k_mode_name[2] = {"plain", "graph"};

/* Writes s as a JSON string literal. */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

/* The results as JSON into path; 0 or -1 (errno). */
static int write_json(const char *path, const cuda_comm_bench_info *info, int iters, int graph_ops,
                      const cuda_comm_bench_row *rows, int n_rows, int tc_ran, double tc_ms, const char *tc_msg,
                      int tc_ok) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "{\n  \"machine\": {\"gpus\": %d, \"device\": ", info->n_gpus);
    json_str(f, info->device);
    fprintf(f, ", \"nccl_version\": %d, \"nccl_note\": ", info->nccl_version);
    json_str(f, info->nccl_why);
    fprintf(f, ", \"peer_access\": %s, \"peer_note\": ", info->peer_ok ? "true" : "false");
    json_str(f, info->peer_why);
    fprintf(f, ", \"p2p_performance_rank\": %d, \"p2p_access_supported\": %d},\n", info->p2p_link[0],
            info->p2p_link[1]);
    fprintf(f, "  \"iters\": %d,\n  \"graph_ops\": %d,\n  \"unit\": \"microseconds per operation (send/recv: one way)\",\n",
            iters, graph_ops);
    fprintf(f, "  \"rows\": [\n");
    for (int i = 0; i < n_rows; i++) {
        const cuda_comm_bench_row *r = &rows[i];
        fprintf(f, "    {\"bytes\": %zu, \"floats\": %zu", r->bytes, r->bytes / 4);
        for (int k = 0; k < CUDA_COMM_N_KINDS; k++) {
            fprintf(f, ", \"%s\": {", k_kind_name[k]);
            for (int m = 0; m < 2; m++) {
                const char *st = r->status[k][m] == CUDA_COMM_RAN ? "ok"
                                 : r->status[k][m] == CUDA_COMM_SKIPPED ? "skipped" : "failed";
                fprintf(f, "%s\"%s\": {\"status\": \"%s\", \"us\": ", m ? ", " : "", k_mode_name[m], st);
                if (r->us[k][m] >= 0) fprintf(f, "%.3f", r->us[k][m]);
                else fprintf(f, "null");
                fprintf(f, ", \"wrong_values\": %ld, \"note\": ", r->bad[k][m]);
                json_str(f, r->why[k][m]);
                fputc('}', f);
            }
            fputc('}', f);
        }
        fprintf(f, "}%s\n", i + 1 < n_rows ? "," : "");
    }
    fprintf(f, "  ],\n  \"timeout_check\": ");
    if (tc_ran) {
        fprintf(f, "{\"ok\": %s, \"ms\": %.1f, \"message\": ", tc_ok ? "true" : "false", tc_ms);
        json_str(f, tc_msg);
        fprintf(f, "}\n}\n");
    } else {
        fprintf(f, "null\n}\n");
    }
    return fclose(f) ? -1 : 0;
}

/* One table cell: the time, or why there is none. */
static void cell(const cuda_comm_bench_row *r, int k, int m, char *buf, size_t cap) {
    if (r->status[k][m] == CUDA_COMM_SKIPPED) snprintf(buf, cap, "skipped");
    else if (r->status[k][m] == CUDA_COMM_FAILED && r->us[k][m] >= 0) snprintf(buf, cap, "%.2f WRONG", r->us[k][m]);
    else if (r->status[k][m] == CUDA_COMM_FAILED) snprintf(buf, cap, "FAILED");
    else snprintf(buf, cap, "%.2f", r->us[k][m]);
}
#endif

int cmd_comm_bench(int argc, char **argv) {
    int gpus = 0, iters = 1000, graph_ops = 100;
    const char *json = NULL;
    size_t sizes[MAX_SIZES] = {6 << 10, 12 << 10, 24 << 10, 48 << 10, 96 << 10, 192 << 10};
    int n_sizes = 6;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--gpus") && v) {
            if (app_parse_int(v, 1, 64, &gpus)) {
                fprintf(stderr, "strata: comm-bench: --gpus '%s': not a GPU count (1..64)\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--iters") && v) {
            if (app_parse_int(v, 1, 100000000, &iters)) {
                fprintf(stderr, "strata: comm-bench: --iters '%s': not a count (1..100000000)\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--graph-ops") && v) {
            if (app_parse_int(v, 1, 100000, &graph_ops)) {
                fprintf(stderr, "strata: comm-bench: --graph-ops '%s': not a count (1..100000)\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--json") && v) {
            json = v;
            i++;
        } else if (!strcmp(a, "--sizes") && v) {
            n_sizes = 0;
            char buf[1024];
            if (strlen(v) >= sizeof buf) {
                fprintf(stderr, "strata: comm-bench: --sizes: list too long\n");
                return 2;
            }
            strcpy(buf, v);
            char *save = NULL;
            for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (n_sizes == MAX_SIZES) {
                    fprintf(stderr, "strata: comm-bench: --sizes: more than %d sizes\n", MAX_SIZES);
                    return 2;
                }
                if (parse_size(t, &sizes[n_sizes])) {
                    fprintf(stderr,
                            "strata: comm-bench: --sizes '%s': not a message size (bytes > 0, K or M suffix, a "
                            "multiple of 4, at most 64M)\n",
                            t);
                    return 2;
                }
                n_sizes++;
            }
            if (!n_sizes) {
                fprintf(stderr, "strata: comm-bench: --sizes: empty list\n");
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "strata: comm-bench: unknown or incomplete option '%s' (see --help)\n", a);
            return 2;
        }
    }
    char why[256] = "";
    int count = st_gpu_count(why, sizeof why);
    if (count <= 0) {
        fprintf(stderr, "strata: comm-bench: no CUDA device: %s\n", why[0] ? why : "none found");
        return 2;
    }
#ifndef STRATA_HAVE_CUDA
    (void)json, (void)iters, (void)graph_ops, (void)gpus;
    fprintf(stderr, "strata: comm-bench: built without CUDA\n");
    return 2;
#else
    if (gpus > count) {
        fprintf(stderr, "strata: comm-bench: --gpus %d: only %d CUDA device(s) visible\n", gpus, count);
        return 2;
    }
    if (!gpus) gpus = count > CUDA_PEER_MAX_RANKS ? CUDA_PEER_MAX_RANKS : count;
    if (gpus > CUDA_PEER_MAX_RANKS) {
        fprintf(stderr, "strata: comm-bench: --gpus %d: at most %d\n", gpus, CUDA_PEER_MAX_RANKS);
        return 2;
    }
    size_t max_bytes = 0;
    for (int i = 0; i < n_sizes; i++)
        if (sizes[i] > max_bytes) max_bytes = sizes[i];
    cuda_comm_bench_opts o = {.n_gpus = gpus, .max_bytes = max_bytes, .iters = iters, .graph_ops = graph_ops};
    cuda_comm_bench *b = NULL;
    st_err err = {0};
    if (cuda_comm_bench_init(&b, &o, &err)) {
        fprintf(stderr, "strata: comm-bench: %s\n", err.msg);
        return err.code == ST_ERR_ARG || err.code == ST_ERR_UNSUPPORTED ? 2 : 1;
    }
    cuda_comm_bench_info info;
    cuda_comm_bench_get_info(b, &info);
    fprintf(stderr, "strata: comm-bench: %d x %s", info.n_gpus, info.device);
    if (info.nccl_version)
        fprintf(stderr, ", NCCL %d.%d.%d", info.nccl_version / 10000, info.nccl_version / 100 % 100,
                info.nccl_version % 100);
    if (info.n_gpus >= 2)
        fprintf(stderr, ", peer access %s (P2P performance rank %d)", info.p2p_link[1] ? "supported" : "not supported",
                info.p2p_link[0]);
    fprintf(stderr, "\n");
    if (!info.nccl_version) fprintf(stderr, "strata: comm-bench: NCCL measurements skipped: %s\n", info.nccl_why);
    if (!info.peer_ok) fprintf(stderr, "strata: comm-bench: peer all-reduce skipped: %s\n", info.peer_why);
    if (info.n_gpus < 2)
        fprintf(stderr, "strata: comm-bench: 1 GPU: send/recv and the timeout check skipped (they need 2); the "
                        "all-reduces run on a single rank\n");

    cuda_comm_bench_row rows[MAX_SIZES];
    const int tty = isatty(STDERR_FILENO);
    int rc = 0, n_rows = 0;
    for (int i = 0; i < n_sizes; i++) {
        char lab[32];
        size_label(sizes[i], lab, sizeof lab);
        if (tty) fprintf(stderr, "\r  [%d/%d] %s ...   ", i + 1, n_sizes, lab), fflush(stderr);
        if (cuda_comm_bench_run(b, sizes[i], &rows[n_rows], &err)) {
            if (tty) fprintf(stderr, "\r\033[K");
            fprintf(stderr, "strata: comm-bench: %s\n", err.msg);
            rc = 1;
            break;
        }
        n_rows++;
    }
    if (tty) fprintf(stderr, "\r\033[K");

    int tc_ran = 0, tc_ok = 0;
    double tc_ms = -1;
    char tc_msg[ST_ERR_MSG_MAX] = "";
    if (!rc && info.peer_ok && info.n_gpus >= 2) {
        if (tty) fprintf(stderr, "  bounded-wait check (rank 0 alone) ..."), fflush(stderr);
        st_err e2 = {0};
        tc_ran = 1;
        tc_ok = cuda_comm_bench_timeout_check(b, &tc_ms, tc_msg, sizeof tc_msg, &e2) == ST_OK;
        if (tty) fprintf(stderr, "\r\033[K");
        if (!tc_ok && !tc_msg[0]) snprintf(tc_msg, sizeof tc_msg, "%s", e2.msg);
        if (!tc_ok) rc = 1;
    }

    printf("## strata comm-bench: %d x %s\n\n", info.n_gpus, info.device);
    printf("microseconds per operation (send/recv: one way = ping-pong / 2); plain: launch + synchronise per op, "
           "mean of %d; graph: %d ops per CUDA graph, replay time / ops\n\n",
           iters, graph_ops);
    printf("| size | floats | NCCL send/recv plain | NCCL send/recv graph | NCCL all-reduce plain | NCCL all-reduce graph "
           "| peer all-reduce plain | peer all-reduce graph |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n_rows; i++) {
        char lab[32];
        size_label(rows[i].bytes, lab, sizeof lab);
        printf("| %s | %zu", lab, rows[i].bytes / 4);
        for (int k = 0; k < CUDA_COMM_N_KINDS; k++)
            for (int m = 0; m < 2; m++) {
                char c[48];
                cell(&rows[i], k, m, c, sizeof c);
                printf(" | %s", c);
                if (rows[i].status[k][m] == CUDA_COMM_FAILED) rc = 1;
            }
        printf(" |\n");
    }
    /* each distinct reason for a missing or wrong cell, once */
    int printed = 0;
    for (int i = 0; i < n_rows; i++)
        for (int k = 0; k < CUDA_COMM_N_KINDS; k++)
            for (int m = 0; m < 2; m++) {
                const char *w = rows[i].why[k][m];
                if (!w[0]) continue;
                int seen = 0;
                for (int j = 0; j <= i && !seen; j++)
                    for (int k2 = 0; k2 < CUDA_COMM_N_KINDS && !seen; k2++)
                        for (int m2 = 0; m2 < 2 && !seen; m2++)
                            if ((j < i || k2 < k || (k2 == k && m2 < m)) && !strcmp(rows[j].why[k2][m2], w)) seen = 1;
                if (seen) continue;
                char lab[32];
                size_label(rows[i].bytes, lab, sizeof lab);
                printf("%s- %s %s (%s): %s\n", printed++ ? "" : "\n", k_kind_name[k], k_mode_name[m], lab, w);
            }
    if (tc_ran)
        printf("\nbounded wait: a peer all-reduce on rank 0 alone returned after %.1f ms: %s (%s)\n", tc_ms, tc_msg,
               tc_ok ? "ok" : "FAILED");
    fflush(stdout);
    if (json) {
        if (write_json(json, &info, iters, graph_ops, rows, n_rows, tc_ran, tc_ms, tc_msg, tc_ok)) {
            fprintf(stderr, "strata: comm-bench: cannot write %s: %s\n", json, strerror(errno));
            rc = 1;
        } else {
            fprintf(stderr, "strata: comm-bench: wrote %s\n", json);
        }
    }
    int n_ok = 0, n_fail = 0, n_skip = 0;
    for (int i = 0; i < n_rows; i++)
        for (int k = 0; k < CUDA_COMM_N_KINDS; k++)
            for (int m = 0; m < 2; m++) {
                int st = rows[i].status[k][m];
                n_ok += st == CUDA_COMM_RAN, n_fail += st == CUDA_COMM_FAILED, n_skip += st == CUDA_COMM_SKIPPED;
            }
    fprintf(stderr, "strata: comm-bench: %d measurements passed, %d failed, %d skipped%s\n", n_ok, n_fail, n_skip,
            tc_ran ? (tc_ok ? "; bounded wait ok" : "; bounded wait FAILED") : "");
    cuda_comm_bench_free(b);
    return rc;
#endif
}
