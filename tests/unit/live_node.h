/* live_node.h — a `strata node` on a thread of a unit test (node_run with a port file), for
 * tests that talk to a real node loop over real links, and wait_frame to read its answers.
 * Header-only; include once per test. */
#ifndef STRATA_TEST_LIVE_NODE_H
#define STRATA_TEST_LIVE_NODE_H

#include "strata/cluster.h"
#include "strata/xport.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct live_node {
    node_opts opts;                /* as given; listen and port_file are set by live_node_start */
    volatile sig_atomic_t stop;
    pthread_t th;
    st_err err;                    /* node_run's error, after live_node_stop                    */
    char port_file[64];
    char addr[64];                 /* "127.0.0.1:PORT" once started                             */
} live_node;

static void *live_node_main(void *arg) {
    live_node *n = arg;
    node_run(&n->opts, &n->stop, &n->err);
    return NULL;
}

/* Starts a node listening on a free loopback port with n->opts (listen and port_file are
 * overwritten). Returns 0 with n->addr set, -1 if it did not come up within 4 s. */
static int live_node_start(live_node *n) {
    snprintf(n->port_file, sizeof n->port_file, "/tmp/strata-live-node-XXXXXX");
    int fd = mkstemp(n->port_file);
    if (fd < 0) return -1;
    close(fd);
    unlink(n->port_file);
    n->opts.listen = "127.0.0.1:0";
    n->opts.port_file = n->port_file;
    n->stop = 0;
    if (pthread_create(&n->th, NULL, live_node_main, n)) return -1;
    int port = 0;
    for (int i = 0; i < 400 && !port; i++) {
        FILE *f = fopen(n->port_file, "r");
        if (f) {
            if (fscanf(f, "%d", &port) != 1) port = 0;
            fclose(f);
        }
        if (!port) usleep(10000);
    }
    if (!port) {
        n->stop = 1;
        pthread_join(n->th, NULL);
        return -1;
    }
    snprintf(n->addr, sizeof n->addr, "127.0.0.1:%d", port);
    return 0;
}

/* Waits up to ms for a frame of `type` on x (others are released and skipped); 1 with *m
 * filled (release it), 0 on timeout or a broken link. */
static inline int wait_frame(xport *x, uint16_t type, xport_msg *m, int ms) {
    st_err err = {0};
    for (int t = 0; t < ms; t += 5) {
        xport_flush(x);
        int r = xport_recv(x, m, &err);
        if (r < 0) return 0;
        if (r == 1) {
            if (m->type == type) return 1;
            xport_release(x);
            continue;
        }
        xport_wait(&x, 1, NULL, 0, 5);
    }
    return 0;
}

/* Stops the node (as its signal handler would) and joins its thread. */
static void live_node_stop(live_node *n) {
    n->stop = 1;
    pthread_join(n->th, NULL);
    unlink(n->port_file);
}

#endif
