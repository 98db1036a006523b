/* test_ncclink.c — the NCCL data link protocol without a GPU (src/cluster/ncclink.h): the
 * CP_NCCL_ID / CP_NCCL_ACK checks and the DP_ACT payload rule with ACT_NCCL, each bad message
 * turned into one line naming what is wrong; then a live node (node_run on a thread, a CPU
 * stage 0 of the qwen3-bf16 fixture, then a CPU stage 1 of 2) sent malformed and refusable offers
 * over an authenticated data link: it answers each with a refusal, drops a header-only ACT that
 * claims NCCL on a link without a communicator, and keeps running the host copy path. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cluster/ncclink.h"
#include "strata/cluster.h"
#include "live_node.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static cp_nccl_id good_id(void) {
    cp_nccl_id m = {.epoch = 3, .version = NCL_VERSION, .stage = 0, .n_embd = 64, .max_batch = 8};
    for (int i = 0; i < NCL_ID_BYTES; i++) m.id[i] = (uint8_t)i;
    return m;
}

static void test_parse_id(void **state) {
    (void)state;
    cp_nccl_id m = good_id(), out;
    st_err err = {0};
    assert_int_equal(ncl_parse_id(&m, sizeof m, &out, &err), 0);
    assert_memory_equal(out.id, m.id, NCL_ID_BYTES);
    assert_int_equal(ncl_parse_id(&m, sizeof m - 1, &out, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "bytes"));
    assert_null(strchr(err.msg, '\n'));
    cp_nccl_id b = m;
    b.version = NCL_VERSION + 1;
    assert_int_equal(ncl_parse_id(&b, sizeof b, &out, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "version"));
    b = m, b.n_embd = 0;
    assert_int_equal(ncl_parse_id(&b, sizeof b, &out, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "out of range"));
    b = m, b.stage = -1;
    assert_int_equal(ncl_parse_id(&b, sizeof b, &out, &err), ST_ERR_FORMAT);
    b = m, b.max_batch = 1 << 20;
    assert_int_equal(ncl_parse_id(&b, sizeof b, &out, &err), ST_ERR_FORMAT);
}

static void test_check_id(void **state) {
    (void)state;
    cp_nccl_id m = good_id();
    ncl_self s = {.loaded = 1, .epoch = 3, .stage = 1, .n_stages = 2, .gpu = 1, .n_embd = 64, .max_batch = 8};
    st_err err = {0};
    assert_int_equal(ncl_check_id(&m, &s, &err), NCL_ACCEPT);
    ncl_self t = s;
    t = s, t.epoch = 2; /* the LOAD of the offer's epoch is still queued */
    assert_int_equal(ncl_check_id(&m, &t, &err), NCL_LATER);
    t = s, t.loaded = 0; /* the LOAD of the offer's epoch failed: answer now, the sender waits */
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "failed to load"));
    t = s, t.loaded = 0, t.epoch = 0; /* nothing loaded yet */
    assert_int_equal(ncl_check_id(&m, &t, &err), NCL_LATER);
    t = s, t.epoch = 4;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_NET);
    assert_non_null(strstr(err.msg, "stale"));
    t = s, t.stage = 0;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "stage 0"));
    t = s, t.stage = 2;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "from stage 0 to stage 2"));
    t = s, t.gpu = 0;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "runs on the CPU"));
    t = s, t.n_embd = 128;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "8 x 64"));
    t = s, t.max_batch = 16;
    assert_int_equal(ncl_check_id(&m, &t, &err), ST_ERR_ARG);
    /* an offer of another coordinator's run (other high bits) is never "stale": its LOAD comes */
    t = s, t.epoch = (7ull << 32) | 9;
    assert_int_equal(ncl_check_id(&m, &t, &err), NCL_LATER);
}

/* Epoch order only within a run; a link of another run always wins (a newer coordinator). */
static void test_epoch_runs(void **state) {
    (void)state;
    const uint64_t a1 = (5ull << 32) | 1, a2 = (5ull << 32) | 2, b1 = (9ull << 32) | 1;
    assert_true(cp_epoch_same_run(a1, a2));
    assert_false(cp_epoch_same_run(a2, b1));
    assert_true(cp_epoch_yields(a1, a2));  /* a reload of the same run replaces the link */
    assert_true(cp_epoch_yields(a2, a2));
    assert_false(cp_epoch_yields(a2, a1)); /* a late link of an earlier placement does not */
    assert_true(cp_epoch_yields(a2, b1));  /* another run: the new coordinator, though lower */
    assert_true(cp_epoch_yields(b1, a2));
    assert_int_equal(CP_EPOCH_SEQ(a2), 2);
}

static void test_parse_ack(void **state) {
    (void)state;
    cp_nccl_ack a = {.epoch = 5, .status = 0, .stage = 1}, out;
    st_err err = {0};
    assert_int_equal(ncl_parse_ack(&a, sizeof a, 5, &out, &err), 0);
    assert_int_equal(out.status, 0);
    assert_int_equal(ncl_parse_ack(&a, sizeof a, 6, &out, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "epoch 5, expected 6"));
    assert_int_equal(ncl_parse_ack(&a, sizeof a + 4, 5, &out, &err), ST_ERR_FORMAT);
    /* a refusal is well formed: its reason comes back NUL-terminated even if the sender's wasn't */
    a.status = ST_ERR_UNSUPPORTED;
    memset(a.msg, 'x', sizeof a.msg);
    assert_int_equal(ncl_parse_ack(&a, sizeof a, 5, &out, &err), 0);
    assert_int_equal(out.status, ST_ERR_UNSUPPORTED);
    assert_int_equal((int)strlen(out.msg), (int)sizeof out.msg - 1);
    a.status = 7;
    assert_int_equal(ncl_parse_ack(&a, sizeof a, 5, &out, &err), ST_ERR_FORMAT);
    a.status = -1000;
    assert_int_equal(ncl_parse_ack(&a, sizeof a, 5, &out, &err), ST_ERR_FORMAT);
}

static void test_act_payload(void **state) {
    (void)state;
    dp_act h = {.T = 3};
    const int D = 16;
    const size_t full = sizeof h + 3 * D * 4;
    st_err err = {0};
    assert_int_equal(ncl_act_payload(&h, full, D, 0, &err), 0);
    assert_int_equal(ncl_act_payload(&h, full, D, 1, &err), 0); /* the host path stays valid on a linked hop */
    assert_int_equal(ncl_act_payload(&h, full - 4, D, 0, &err), ST_ERR_FORMAT);
    assert_int_equal(ncl_act_payload(&h, sizeof h, D, 1, &err), ST_ERR_FORMAT); /* no rows, no flag */
    h.flags = ACT_NCCL | ACT_LAST;
    assert_int_equal(ncl_act_payload(&h, sizeof h, D, 1, &err), 1);
    assert_int_equal(ncl_act_payload(&h, full, D, 1, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "header only"));
    assert_int_equal(ncl_act_payload(&h, sizeof h, D, 0, &err), ST_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "no NCCL communicator"));
}

static void test_timeout_env(void **state) {
    (void)state;
    unsetenv("STRATA_NCCL_TIMEOUT_MS");
    assert_int_equal(ncl_timeout_ms(), 10000);
    setenv("STRATA_NCCL_TIMEOUT_MS", "2500", 1);
    assert_int_equal(ncl_timeout_ms(), 2500);
    setenv("STRATA_NCCL_TIMEOUT_MS", "1", 1);
    assert_int_equal(ncl_timeout_ms(), 100);
    setenv("STRATA_NCCL_TIMEOUT_MS", "99999999", 1);
    assert_int_equal(ncl_timeout_ms(), 600000);
    unsetenv("STRATA_NCCL_TIMEOUT_MS");
}

/* ------------------------------------------------------------------------------------------ */
/* a live node                                                                                */

static void test_live_node(void **state) {
    (void)state;
    const char *fx = getenv("STRATA_FIXTURES");
    if (!fx) fx = "tests/fixtures";
    char model[1024];
    snprintf(model, sizeof model, "%s/models/qwen3-bf16", fx);
    static live_node ln;
    ln = (live_node){.opts = {.cluster_key = "ncclink-test", .bw_probe_mb = -1, .n_threads = 1}};
    assert_int_equal(live_node_start(&ln), 0);
    const char *addr = ln.addr;
    xport_key key;
    st_err err = {0};
    assert_int_equal(xport_key_init(&key, "ncclink-test", &err), 0);

    /* load a one-stage CPU pipeline, epoch 9, with NCCL links asked for */
    xport_opts co = {.max_payload = 1 << 20, .role = XPORT_ROLE_CONTROL, .node_id = "coord", .timeout_ms = 3000};
    xport *ctrl = NULL;
    assert_int_equal(xport_connect(&ctrl, addr, &key, &co, &err), 0);
    cp_load l = {.epoch = 9, .layer_begin = 0, .layer_end = 1, .with_embed = 1, .with_output = 1, .stage = 0,
                 .n_stages = 1, .max_ctx = 64, .n_slots = 1, .max_batch = 8, .n_threads = 1, .n_buffers = 4,
                 .max_inflight = 16, .nccl = 1};
    snprintf(l.model_dir, sizeof l.model_dir, "%s", model);
    assert_int_equal(xport_send_copy(ctrl, CP_LOAD, &l, sizeof l, &err), 0);
    xport_msg m;
    assert_int_equal(wait_frame(ctrl, CP_LOADED, &m, 20000), 1);
    cp_loaded r;
    assert_int_equal((int)m.len, (int)sizeof r);
    memcpy(&r, m.data, sizeof r);
    xport_release(ctrl);
    assert_int_equal(r.status, 0);

    /* a data link into it, as a previous stage would open */
    xport_opts dopt = {.n_buffers = 4, .max_inflight = 16, .max_payload = 1 << 16, .role = XPORT_ROLE_DATA,
                       .epoch = 9, .node_id = "prev", .pref = XPORT_PREF_TCP, .timeout_ms = 3000};
    xport *d = NULL;
    assert_int_equal(xport_connect(&d, addr, &key, &dopt, &err), 0);
    cp_nccl_ack a;

    /* 1. a truncated offer: refused with the reason */
    cp_nccl_id id = good_id();
    id.epoch = 9;
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &id, sizeof id - 8, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 9, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_FORMAT);
    assert_non_null(strstr(a.msg, "bytes"));

    /* 2. another protocol version */
    cp_nccl_id v = id;
    v.version = 99;
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &v, sizeof v, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 9, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_FORMAT);
    assert_non_null(strstr(a.msg, "version"));

    /* 3. a well-formed offer to stage 0 (the token hop): declined, the sender keeps its copy path */
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &id, sizeof id, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 9, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(a.msg, "stage 0"));

    /* 4. an offer for a stale epoch */
    cp_nccl_id old = id;
    old.epoch = 8;
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &old, sizeof old, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 8, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_NET);

    /* 5. a header-only ACT claiming NCCL, and one with a wrong length: dropped */
    dp_act h = {.epoch = 9, .slot = 0, .pos0 = 0, .T = 1, .flags = ACT_NCCL | ACT_LAST};
    assert_int_equal(xport_send_copy(d, DP_ACT, &h, sizeof h, &err), 0);
    uint8_t longer[sizeof h + 12] = {0};
    memcpy(longer, &h, sizeof h);
    assert_int_equal(xport_send_copy(d, DP_ACT, longer, sizeof longer, &err), 0);

    /* the node still answers on its control link */
    uint64_t t = 42;
    assert_int_equal(xport_send_copy(ctrl, CP_PING, &t, sizeof t, &err), 0);
    assert_int_equal(wait_frame(ctrl, CP_PONG, &m, 3000), 1);
    assert_int_equal((int)m.len, 8);
    xport_release(ctrl);

    xport_close(d);

    /* reload as the CPU stage 1 of 2 (epoch 10); its next hop (stage 0) is this test */
    int lfd = -1, lport = 0;
    assert_int_equal(xport_listen(&lfd, "127.0.0.1:0", &lport, &err), 0);
    l.epoch = 10, l.stage = 1, l.n_stages = 2, l.with_embed = 0;
    snprintf(l.next_addr, sizeof l.next_addr, "127.0.0.1:%d", lport);
    assert_int_equal(xport_send_copy(ctrl, CP_LOAD, &l, sizeof l, &err), 0);
    xport_opts aopt = {.max_payload = 1 << 16, .timeout_ms = 5000};
    xport *s0 = NULL;
    assert_int_equal(xport_accept(&s0, lfd, &key, &aopt, &err), 0);
    assert_int_equal(wait_frame(ctrl, CP_LOADED, &m, 20000), 1);
    memcpy(&r, m.data, sizeof r);
    xport_release(ctrl);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.n_embd > 0, 1);
    dopt.epoch = 10;
    assert_int_equal(xport_connect(&d, addr, &key, &dopt, &err), 0);

    /* 6. a CPU stage declines the offer */
    id.epoch = 10, id.n_embd = r.n_embd;
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &id, sizeof id, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 10, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(a.msg, "runs on the CPU"));

    /* 7. ACT_NCCL on a link without a communicator: dropped; then the host path still runs:
     * one row of hidden states in, the greedy token out to "stage 0" */
    dp_act h1 = {.epoch = 10, .seq_id = 77, .slot = 0, .pos0 = 0, .T = 1, .flags = ACT_NCCL | ACT_FIRST | ACT_LAST};
    h1.params = (cp_seq){.epoch = 10, .seq_id = 77, .max_tokens = 4, .n_eos = 0, .top_p = 1.0f, .repetition_penalty = 1.0f};
    assert_int_equal(xport_send_copy(d, DP_ACT, &h1, sizeof h1, &err), 0);
    /* the sender hears that the link is down (else its rows would go on into NCCL) */
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 10, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_NET);
    assert_non_null(strstr(a.msg, "dropped the link"));
    size_t plen = sizeof h1 + (size_t)r.n_embd * 4;
    uint8_t *pay = calloc(1, plen);
    assert_non_null(pay);
    h1.flags = ACT_FIRST | ACT_LAST;
    memcpy(pay, &h1, sizeof h1);
    for (int i = 0; i < r.n_embd; i++) ((float *)(pay + sizeof h1))[i] = 0.01f * (float)(i % 7);
    assert_int_equal(xport_send_copy(d, DP_ACT, pay, plen, &err), 0);
    free(pay);
    assert_int_equal(wait_frame(s0, DP_TOKEN, &m, 10000), 1);
    dp_token tk;
    memcpy(&tk, m.data, sizeof tk);
    xport_release(s0);
    assert_int_equal((int)tk.seq_id, 77);
    assert_int_equal(tk.pos, 1);
    assert_true(tk.token >= 0 && tk.token < r.n_vocab);
    /* exactly one token: the NCCL-flagged header produced none */
    assert_int_equal(wait_frame(s0, DP_TOKEN, &m, 300), 0);

    xport_close(d);
    xport_close(s0);

    /* 8. a LOAD that fails (no such model): an offer for its epoch is declined at once, so its
     * sender does not wait out the answer timeout */
    l.epoch = 11;
    snprintf(l.model_dir, sizeof l.model_dir, "%s/no-such-model", fx);
    assert_int_equal(xport_send_copy(ctrl, CP_LOAD, &l, sizeof l, &err), 0);
    assert_int_equal(wait_frame(ctrl, CP_LOADED, &m, 20000), 1);
    memcpy(&r, m.data, sizeof r);
    xport_release(ctrl);
    assert_true(r.status != 0);
    dopt.epoch = 11;
    assert_int_equal(xport_connect(&d, addr, &key, &dopt, &err), 0);
    id.epoch = 11;
    assert_int_equal(xport_send_copy(d, CP_NCCL_ID, &id, sizeof id, &err), 0);
    assert_int_equal(wait_frame(d, CP_NCCL_ACK, &m, 3000), 1);
    assert_int_equal(ncl_parse_ack(m.data, m.len, 11, &a, &err), 0);
    xport_release(d);
    assert_int_equal(a.status, ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(a.msg, "failed to load"));
    xport_close(d);

    close(lfd);
    xport_close(ctrl);
    live_node_stop(&ln);
    assert_int_equal(ln.err.code, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_id),   cmocka_unit_test(test_check_id),    cmocka_unit_test(test_parse_ack),
        cmocka_unit_test(test_act_payload), cmocka_unit_test(test_timeout_env), cmocka_unit_test(test_live_node),
        cmocka_unit_test(test_epoch_runs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
