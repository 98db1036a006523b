/* linkprobe.c — link measurements between nodes (latency, bandwidth both ways) and the
 * survey of a live cluster that the coordinator and `strata plan --peers` plan with.
 * See linkprobe.h. */
#include "linkprobe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// prober side

/* Waits up to timeout_ms for the next frame on x. Returns 1 with *m (release it), 0 on
 * timeout, < 0 when the link broke (err says why). */
static int lp_next(xport *x, xport_msg *m, int timeout_ms, st_err *err) {
    uint64_t end = st_time_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int r = xport_recv(x, m, err);
        if (r) return r;
        uint64_t now = st_time_ns();
        if (now >= end) return 0;
        xport_flush(x);
        xport_wait(&x, 1, NULL, 0, (int)((end - now) / 1000000ull) + 1);
    }
}

/* Waits for a frame of `type` (others are protocol errors). Returns 0, or sets err. */
static int lp_expect(xport *x, uint16_t type, xport_msg *m, int timeout_ms, st_err *err) {
    int r = lp_next(x, m, timeout_ms, err);
    if (r < 0) return err->code;
    if (r == 0) return st_err_set(err, ST_ERR_NET, "no answer within %d ms", timeout_ms);
    if (m->type != type) {
        uint16_t got = m->type;
        xport_release(x);
        return st_err_set(err, ST_ERR_FORMAT, "unexpected probe frame 0x%x (wanted 0x%x)", got, type);
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Pushes `bytes` in LP_BULK frames + LP_END and waits for the peer's LP_ACK. Returns the
 * seconds from the first frame to the ACK, or < 0 with err set. */
static double lp_push(xport *x, uint64_t bytes, st_err *err) {
    uint64_t t0 = st_time_ns();
    for (uint64_t done = 0; done < bytes;) {
        size_t n = bytes - done < LP_CHUNK ? (size_t)(bytes - done) : LP_CHUNK;
        uint8_t *b = xport_send_buf(x, n);
        if (!b) return st_err_set(err, ST_ERR_NET, "send failed: %s", xport_error(x)), -1;
        memset(b, (int)(done >> 18), n < 64 ? n : 64);
        if (xport_send(x, LP_BULK, n, err)) return -1;
        done += n;
    }
    if (xport_send_copy(x, LP_END, &bytes, sizeof bytes, err)) return -1;
    xport_flush(x);
    xport_msg m;
    if (lp_expect(x, LP_ACK, &m, 20000, err)) return -1;
    uint64_t got = 0;
    if (m.len == sizeof got) memcpy(&got, m.data, sizeof got);
    xport_release(x);
    if (got != bytes) return st_err_set(err, ST_ERR_NET, "peer counted %llu of %llu bytes", (unsigned long long)got,
                                        (unsigned long long)bytes), -1;
    return (double)(st_time_ns() - t0) / 1e9;
}

/* Asks the peer for `bytes` and receives them. Returns the seconds from the request to the
 * LP_END, or < 0 with err set. */
static double lp_pull_bytes(xport *x, uint64_t bytes, st_err *err) {
    lp_pull rq = {.bytes = bytes, .chunk = LP_CHUNK};
    uint64_t t0 = st_time_ns(), got = 0;
    if (xport_send_copy(x, LP_PULL, &rq, sizeof rq, err)) return -1;
    xport_flush(x);
    for (;;) {
        xport_msg m;
        int r = lp_next(x, &m, 20000, err);
        if (r < 0) return -1;
        if (r == 0) return st_err_set(err, ST_ERR_NET, "pull: no data within 20 s"), -1;
        uint16_t t = m.type;
        if (t == LP_BULK) got += m.len;
        xport_release(x);
        if (t == LP_END) break;
        if (t != LP_BULK) return st_err_set(err, ST_ERR_FORMAT, "pull: unexpected frame 0x%x", t), -1;
    }
    if (got != bytes)
        return st_err_set(err, ST_ERR_NET, "pull: got %llu of %llu bytes", (unsigned long long)got, (unsigned long long)bytes), -1;
    return (double)(st_time_ns() - t0) / 1e9;
}

int lp_probe_peer(const char *addr, const xport_key *key, const char *node_id, int pref, int pings, uint64_t bytes,
                  cp_probe_link *out) {
    memset(out, 0, sizeof *out);
    st_err err = {0};
    xport *x = NULL;
    if (pings < 3) pings = 3;
    if (pings > 1000) pings = 1000;
    double *rtt = malloc((size_t)pings * sizeof *rtt);
    xport_opts xo = {.n_buffers = 8, .max_inflight = 256, .max_payload = LP_CHUNK, .role = XPORT_ROLE_PROBE,
                     .pref = pref, .node_id = node_id, .timeout_ms = 5000};
    if (!rtt) {
        st_err_set(&err, ST_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (xport_connect(&x, addr, key, &xo, &err)) goto done;
    snprintf(out->kind, sizeof out->kind, "%s", xport_kind_name(x));
    /* latency: 2 warm-up pings, then `pings` timed ones */
    for (int i = -2; i < pings; i++) {
        uint64_t t0 = st_time_ns();
        if (xport_send_copy(x, LP_PING, &t0, sizeof t0, &err)) goto done;
        xport_flush(x);
        xport_msg m;
        if (lp_expect(x, LP_PONG, &m, 5000, &err)) goto done;
        xport_release(x);
        if (i >= 0) rtt[i] = (double)(st_time_ns() - t0) / 1e9;
    }
    qsort(rtt, (size_t)pings, sizeof *rtt, cmp_double);
    double med = pings % 2 ? rtt[pings / 2] : 0.5 * (rtt[pings / 2 - 1] + rtt[pings / 2]);
    out->latency_s = med / 2;
    out->rtt_min_s = rtt[0];
    if (bytes) {
        /* a short warm-up transfer each way, then the timed ones */
        if (lp_push(x, LP_CHUNK, &err) < 0 || lp_pull_bytes(x, LP_CHUNK, &err) < 0) goto done;
        double tp = lp_push(x, bytes, &err);
        if (tp < 0) goto done;
        double tl = lp_pull_bytes(x, bytes, &err);
        if (tl < 0) goto done;
        /* one round trip of each transfer is latency, not bandwidth */
        out->bw_out = (double)bytes / fmax(tp - med, tp * 0.05);
        out->bw_in = (double)bytes / fmax(tl - med, tl * 0.05);
    }
done:
    if (err.code) {
        out->status = err.code;
        snprintf(out->msg, sizeof out->msg, "%s", err.msg);
    }
    xport_close(x);
    free(rtt);
    return out->status;
}

// ----------------------------------------------------------------------------
// peer side

int lp_serve(xport *x, const xport_msg *m, uint64_t *bulk) {
    st_err err = {0};
    int rc = 0;
    switch (m->type) {
    case LP_PING:
        rc = xport_send_copy(x, LP_PONG, m->data, m->len > 8 ? 8 : m->len, &err);
        break;
    case LP_BULK:
        *bulk += m->len;
        return 0;
    case LP_END:
        /* the bytes received since the previous END */
        rc = xport_send_copy(x, LP_ACK, bulk, sizeof *bulk, &err);
        *bulk = 0;
        break;
    case LP_PULL: {
        lp_pull rq;
        if (m->len != sizeof rq) return -1;
        memcpy(&rq, m->data, sizeof rq);
        if (rq.bytes > (1ull << 32) || rq.chunk == 0 || rq.chunk > xport_max_payload(x)) return -1;
        for (uint64_t done = 0; done < rq.bytes && !rc;) {
            size_t n = rq.bytes - done < rq.chunk ? (size_t)(rq.bytes - done) : rq.chunk;
            uint8_t *b = xport_send_buf(x, n);
            if (!b) return -1;
            memset(b, 0x5a, n < 64 ? n : 64);
            rc = xport_send(x, LP_BULK, n, &err);
            done += n;
        }
        if (!rc) rc = xport_send_copy(x, LP_END, &rq.bytes, sizeof rq.bytes, &err);
        break;
    }
    default:
        return -1;
    }
    xport_flush(x);
    return rc ? -1 : 0;
}
