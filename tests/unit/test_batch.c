/* test_batch.c — batched decode over the pipeline's data links (ACT_BATCH, cluster_proto.h) on
 * a live node (node_run on a thread) loaded as the last CPU stage of two, whose next hop (stage
 * 0) is this test: three sequences prefilled one by one, then decode rows of all three in one
 * ACT_BATCH frame and, in a second turn, as single-sequence frames. Every token the node sends
 * back equals the argmax of the same rows run here through a second copy of the stage (the
 * same CPU kernels and row order), and carries the number of rows its step ran. Malformed
 * batches (a slot twice, a wrong length, a slot or position out of range, more rows than the
 * stage batches, a batch that claims a sequence start) are dropped without a token while the
 * node keeps serving (under ASan: without touching memory past its buffers);
 * a row whose sequence has left its slot gets no token, the other rows do. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cluster/cluster_proto.h"
#include "live_node.h"
#include "strata/cluster.h"
#include "strata/model.h"

#include <stdlib.h>
#include <string.h>

#define EPOCH 5
#define SLOTS 6
#define CTX 32

typedef struct fx {
    live_node ln;
    xport_key key;
    xport *ctrl, *d, *s0; /* control link, data link into the node, the node's token hop to us */
    int lfd;
    model *m;
    model_ctx *ref;       /* the same stage here: the reference rows                       */
    int D, V;
    float *logits;        /* [CP_BATCH_MAX, V]                                               */
} fx;

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

/* Deterministic hidden states for (slot, pos): small values the layers keep finite. */
static void hidden_row(float *x, int D, int slot, int pos) {
    for (int i = 0; i < D; i++) x[i] = 0.02f * (float)((i * 7 + slot * 13 + pos * 29) % 17 - 8);
}

/* Sends T rows as one frame: rows (ACT_BATCH) or a single sequence's (slot, pos0). */
static void send_act(fx *f, const dp_act *h, const dp_row *rows, const float *hidden, size_t extra) {
    const size_t rb = rows ? (size_t)h->T * sizeof(dp_row) : 0, hb = (size_t)h->T * (size_t)f->D * 4;
    size_t len = sizeof *h + rb + hb + extra;
    uint8_t *b = calloc(1, len);
    assert_non_null(b);
    memcpy(b, h, sizeof *h);
    if (rb) memcpy(b + sizeof *h, rows, rb);
    memcpy(b + sizeof *h + rb, hidden, hb);
    st_err err = {0};
    assert_int_equal(xport_send_copy(f->d, DP_ACT, b, len, &err), 0);
    xport_flush(f->d);
    free(b);
}

/* Receives n tokens from the node (any order) into tok[slot] / rows_of[slot]. */
static void recv_tokens(fx *f, int n, int32_t tok[SLOTS], int32_t pos[SLOTS], int32_t rows_of[SLOTS]) {
    for (int k = 0; k < n; k++) {
        xport_msg m;
        if (!wait_frame(f->s0, DP_TOKEN, &m, 10000)) fail_msg("token %d of %d did not come", k + 1, n);
        dp_token t;
        assert_true(m.len >= sizeof t);
        memcpy(&t, m.data, sizeof t);
        xport_release(f->s0);
        assert_int_equal((int)t.epoch, EPOCH);
        assert_true(t.slot >= 0 && t.slot < SLOTS);
        assert_int_equal((int)t.seq_id, 100 + t.slot);
        tok[t.slot] = t.token, pos[t.slot] = t.pos, rows_of[t.slot] = t.rows;
    }
}

/* Receives n tokens, one for each slot order[i], and checks them against the reference rows in
 * f->logits (row i for order[i]): the argmax, position pos, and the rows of the step that ran
 * them (rows > 0: exactly; 0: anything from 1 to n, merged or not). */
static void expect_rows(fx *f, const int *order, int n, int32_t pos, int rows) {
    int32_t tok[SLOTS], got_pos[SLOTS], rows_of[SLOTS];
    recv_tokens(f, n, tok, got_pos, rows_of);
    for (int i = 0; i < n; i++) {
        const int s = order[i];
        assert_int_equal(tok[s], argmax(f->logits + (size_t)i * f->V, f->V));
        assert_int_equal(got_pos[s], pos);
        if (rows) assert_int_equal(rows_of[s], rows);
        else assert_true(rows_of[s] >= 1 && rows_of[s] <= n);
    }
}

static void no_token(fx *f, int ms) {
    xport_msg m;
    assert_int_equal(wait_frame(f->s0, DP_TOKEN, &m, ms), 0);
}

/* The node still answers on its control link. */
static void still_alive(fx *f) {
    st_err err = {0};
    uint64_t t = 7;
    xport_msg m;
    assert_int_equal(xport_send_copy(f->ctrl, CP_PING, &t, sizeof t, &err), 0);
    assert_int_equal(wait_frame(f->ctrl, CP_PONG, &m, 3000), 1);
    xport_release(f->ctrl);
}

static void test_batched_decode(void **state) {
    (void)state;
    static fx f;
    memset(&f, 0, sizeof f);
    const char *fxd = getenv("STRATA_FIXTURES");
    if (!fxd) fxd = "tests/fixtures";
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/qwen3-bf16", fxd);
    st_err err = {0};

    /* the reference: the whole layer range with the output layer, in this process */
    model_load_opts mo = {.layer_begin = 0, .layer_end = 0, .with_embed = 0, .with_output = 1, .source = dir};
    if (model_load(&f.m, dir, NULL, &err)) fail_msg("%s", err.msg);
    const int L = f.m->desc.n_layer;
    model_free(f.m), f.m = NULL;
    mo.layer_end = L;
    if (model_load(&f.m, dir, &mo, &err)) fail_msg("%s", err.msg);
    model_ctx_opts co = {.max_ctx = CTX, .n_slots = SLOTS, .max_batch = 8, .n_threads = 1};
    if (model_ctx_init(&f.ref, f.m, &co, &err)) fail_msg("%s", err.msg);
    f.D = f.m->desc.n_embd, f.V = f.m->desc.n_vocab;
    f.logits = malloc((size_t)CP_BATCH_MAX * (size_t)f.V * 4);
    float *hid = malloc((size_t)CP_BATCH_MAX * (size_t)f.D * 4);
    assert_non_null(f.logits);
    assert_non_null(hid);

    /* the node: stage 1 of 2 holding every layer + the output, batching up to 4 rows */
    f.ln = (live_node){.opts = {.cluster_key = "batch-test", .bw_probe_mb = -1, .n_threads = 1}};
    assert_int_equal(live_node_start(&f.ln), 0);
    assert_int_equal(xport_key_init(&f.key, "batch-test", &err), 0);
    xport_opts cop = {.max_payload = 1 << 20, .role = XPORT_ROLE_CONTROL, .node_id = "coord", .timeout_ms = 3000};
    assert_int_equal(xport_connect(&f.ctrl, f.ln.addr, &f.key, &cop, &err), 0);
    int lport = 0;
    assert_int_equal(xport_listen(&f.lfd, "127.0.0.1:0", &lport, &err), 0);
    cp_load l = {.epoch = EPOCH, .layer_begin = 0, .layer_end = L, .with_embed = 0, .with_output = 1, .stage = 1,
                 .n_stages = 2, .max_ctx = CTX, .n_slots = SLOTS, .max_batch = 8, .n_threads = 1, .n_buffers = 8,
                 .max_inflight = 16, .batch_rows = 4};
    snprintf(l.model_dir, sizeof l.model_dir, "%s", dir);
    snprintf(l.next_addr, sizeof l.next_addr, "127.0.0.1:%d", lport);
    assert_int_equal(xport_send_copy(f.ctrl, CP_LOAD, &l, sizeof l, &err), 0);
    xport_opts aopt = {.max_payload = 1 << 16, .timeout_ms = 5000};
    assert_int_equal(xport_accept(&f.s0, f.lfd, &f.key, &aopt, &err), 0);
    xport_msg m;
    assert_int_equal(wait_frame(f.ctrl, CP_LOADED, &m, 20000), 1);
    cp_loaded r;
    memcpy(&r, m.data, sizeof r);
    xport_release(f.ctrl);
    if (r.status) fail_msg("LOAD: %s", r.msg);
    assert_int_equal(r.n_embd, f.D);
    xport_opts dopt = {.n_buffers = 8, .max_inflight = 16, .max_payload = 1 << 20, .role = XPORT_ROLE_DATA,
                       .epoch = EPOCH, .node_id = "stage0", .pref = XPORT_PREF_TCP, .timeout_ms = 3000};
    assert_int_equal(xport_connect(&f.d, f.ln.addr, &f.key, &dopt, &err), 0);

    int32_t tok[SLOTS], pos[SLOTS], rows_of[SLOTS], pbuf[8], sbuf[8];

    /* three sequences, a prefill of 2 rows each (greedy) */
    for (int s = 0; s < 3; s++) {
        dp_act h = {.epoch = EPOCH, .seq_id = 100 + s, .slot = s, .pos0 = 0, .T = 2, .flags = ACT_FIRST | ACT_LAST};
        h.params = (cp_seq){.epoch = EPOCH, .seq_id = 100 + s, .slot = s, .max_tokens = 16, .top_p = 1.0f,
                            .repetition_penalty = 1.0f};
        for (int i = 0; i < 2; i++) hidden_row(hid + (size_t)i * f.D, f.D, s, i), pbuf[i] = i, sbuf[i] = s;
        send_act(&f, &h, NULL, hid, 0);
        assert_int_equal(model_forward_stage(f.ref, NULL, hid, pbuf, sbuf, 2, NULL, f.logits, LOGITS_LAST, &err), 0);
        recv_tokens(&f, 1, tok, pos, rows_of);
        assert_int_equal(tok[s], argmax(f.logits, f.V));
        assert_int_equal(pos[s], 2);
        assert_int_equal(rows_of[s], 1);
    }

    /* one ACT_BATCH of the three sequences' next rows, in the order 2, 0, 1 */
    const int order[3] = {2, 0, 1};
    dp_row rows[CP_BATCH_MAX + 1];
    for (int i = 0; i < 3; i++) {
        rows[i] = (dp_row){.seq_id = 100 + order[i], .slot = order[i], .pos = 2};
        hidden_row(hid + (size_t)i * f.D, f.D, order[i], 2);
        pbuf[i] = 2, sbuf[i] = order[i];
    }
    dp_act hb = {.epoch = EPOCH, .slot = -1, .T = 3, .flags = ACT_LAST | ACT_BATCH};
    send_act(&f, &hb, rows, hid, 0);
    assert_int_equal(model_forward_stage(f.ref, NULL, hid, pbuf, sbuf, 3, NULL, f.logits, LOGITS_ALL, &err), 0);
    expect_rows(&f, order, 3, 3, 3); /* one step ran them all */

    /* malformed batches: each dropped, no token, the node serves on */
    for (int i = 0; i < 3; i++) rows[i].pos = 3, hidden_row(hid + (size_t)i * f.D, f.D, order[i], 3);
    dp_row bad[CP_BATCH_MAX + 1];
    memcpy(bad, rows, 3 * sizeof *rows);
    bad[1].slot = bad[0].slot; /* a slot twice */
    send_act(&f, &hb, bad, hid, 0);
    send_act(&f, &hb, rows, hid, 4); /* four bytes too many */
    memcpy(bad, rows, 3 * sizeof *rows);
    bad[2].slot = SLOTS; /* no such slot */
    send_act(&f, &hb, bad, hid, 0);
    memcpy(bad, rows, 3 * sizeof *rows);
    bad[0].pos = CTX - 1; /* its token would be past the context */
    send_act(&f, &hb, bad, hid, 0);
    dp_act hf = hb;
    hf.flags |= ACT_FIRST; /* a batch never starts a sequence */
    send_act(&f, &hf, rows, hid, 0);
    dp_act hn = hb;
    hn.flags &= ~ACT_LAST; /* every batch row wants its token */
    send_act(&f, &hn, rows, hid, 0);
    { /* more rows than the stage was loaded to batch (4): its logits hold 4 rows */
        dp_row five[5];
        float *h5 = calloc(5 * (size_t)f.D, 4);
        assert_non_null(h5);
        for (int i = 0; i < 5; i++) five[i] = (dp_row){.seq_id = 100 + i, .slot = i, .pos = 3};
        dp_act h5h = hb;
        h5h.T = 5;
        send_act(&f, &h5h, five, h5, 0);
        free(h5);
    }
    no_token(&f, 400);
    still_alive(&f);

    /* the same rows, now well formed, as three single-sequence frames: whether the node merges
     * them into one step or not, each token is the reference's */
    for (int i = 0; i < 3; i++) {
        dp_act h1 = {.epoch = EPOCH, .seq_id = 100 + order[i], .slot = order[i], .pos0 = 3, .T = 1, .flags = ACT_LAST};
        send_act(&f, &h1, NULL, hid + (size_t)i * f.D, 0);
        pbuf[i] = 3, sbuf[i] = order[i];
    }
    assert_int_equal(model_forward_stage(f.ref, NULL, hid, pbuf, sbuf, 3, NULL, f.logits, LOGITS_ALL, &err), 0);
    expect_rows(&f, order, 3, 4, 0);

    /* a row whose sequence left its slot (another seq_id): no token for it, the others get theirs */
    for (int i = 0; i < 3; i++) {
        rows[i].pos = 4, hidden_row(hid + (size_t)i * f.D, f.D, order[i], 4);
        pbuf[i] = 4, sbuf[i] = order[i];
    }
    rows[1].seq_id = 999; /* slot 0 */
    send_act(&f, &hb, rows, hid, 0);
    assert_int_equal(model_forward_stage(f.ref, NULL, hid, pbuf, sbuf, 3, NULL, f.logits, LOGITS_ALL, &err), 0);
    tok[0] = -7;
    recv_tokens(&f, 2, tok, pos, rows_of);
    assert_int_equal(tok[0], -7);
    assert_int_equal(tok[2], argmax(f.logits, f.V));
    assert_int_equal(tok[1], argmax(f.logits + 2 * (size_t)f.V, f.V));
    no_token(&f, 300);
    still_alive(&f);

    xport_close(f.d);
    xport_close(f.s0);
    close(f.lfd);
    xport_close(f.ctrl);
    live_node_stop(&f.ln);
    assert_int_equal(f.ln.err.code, 0);
    model_ctx_free(f.ref);
    model_free(f.m);
    free(f.logits), free(hid);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batched_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
