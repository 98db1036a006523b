/* test_linkprobe.c — the peer side of a link probe on a live node (node_run on a thread, no
 * model loaded): a prober that reads slower than the node sends must still get every byte of
 * a pull and its LP_END over TCP. The node's send queue holds the last frames of a pull when
 * the socket is full; a node loop that never flushed its probe links left them there until
 * the prober's next frame (which never came: "pull: no data within 20 s", a CI flake of the
 * planner). Then the prober's own measurement (lp_probe_peer) against the same node. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cluster/linkprobe.h"
#include "strata/cluster.h"
#include "live_node.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static live_node g_node;
static const char *g_addr;
static xport_key g_key;

static int node_up(void **state) {
    (void)state;
    g_node = (live_node){.opts = {.cluster_key = "linkprobe-test", .bw_probe_mb = -1, .n_threads = 1,
                                  .xport_pref = XPORT_PREF_TCP}};
    if (live_node_start(&g_node)) return -1;
    g_addr = g_node.addr;
    st_err err = {0};
    return xport_key_init(&g_key, "linkprobe-test", &err) ? -1 : 0;
}

static int node_down(void **state) {
    (void)state;
    live_node_stop(&g_node);
    return g_node.err.code ? -1 : 0;
}

/* A pull of 48 MiB read one frame per 2 ms: the node's socket stays full, so its last
 * frames wait in its send queue when lp_serve returns. Every byte and the END must arrive
 * within a few seconds of the last frame received. */
static void test_slow_pull(void **state) {
    (void)state;
    st_err err = {0};
    xport *x = NULL;
    xport_opts xo = {.n_buffers = 8, .max_inflight = 256, .max_payload = LP_CHUNK, .role = XPORT_ROLE_PROBE,
                     .pref = XPORT_PREF_TCP, .node_id = "slow-prober", .timeout_ms = 5000};
    assert_int_equal(xport_connect(&x, g_addr, &g_key, &xo, &err), 0);
    assert_string_equal(xport_kind_name(x), "tcp");
    const uint64_t bytes = 48ull << 20;
    lp_pull rq = {.bytes = bytes, .chunk = LP_CHUNK};
    assert_int_equal(xport_send_copy(x, LP_PULL, &rq, sizeof rq, &err), 0);
    xport_flush(x);
    uint64_t got = 0, end_count = 0;
    uint64_t last = st_time_ns();
    int ended = 0;
    while (!ended && st_time_ns() - last < 5000000000ull) {
        xport_msg m;
        int r = xport_recv(x, &m, &err);
        assert_true(r >= 0);
        if (r == 0) {
            xport_wait(&x, 1, NULL, 0, 10);
            continue;
        }
        last = st_time_ns();
        if (m.type == LP_BULK) got += m.len;
        else if (m.type == LP_END) {
            assert_int_equal(m.len, sizeof end_count);
            memcpy(&end_count, m.data, sizeof end_count);
            ended = 1;
        } else
            fail_msg("unexpected frame 0x%x", m.type);
        xport_release(x);
        usleep(2000);
    }
    if (!ended) fail_msg("pull stalled after %llu of %llu bytes", (unsigned long long)got, (unsigned long long)bytes);
    assert_int_equal(got, bytes);
    assert_int_equal(end_count, bytes);
    xport_close(x);
}

/* The prober's measurement against the same node: figures, no error. */
static void test_probe_peer(void **state) {
    (void)state;
    cp_probe_link l;
    assert_int_equal(lp_probe_peer(g_addr, &g_key, "prober", XPORT_PREF_TCP, 5, 8ull << 20, &l), 0);
    assert_string_equal(l.kind, "tcp");
    assert_true(l.latency_s > 0 && l.bw_in > 0 && l.bw_out > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slow_pull),
        cmocka_unit_test(test_probe_peer),
    };
    return cmocka_run_group_tests(tests, node_up, node_down);
}
