/* test_cluster_plan.c — what the coordinator plans a live cluster with (coord_plan.c,
 * linkprobe.h) and the beacon's --discover spec (beacon.c).
 *
 * The live-cluster device of a node: memory = its --memory-limit, else its free memory;
 * bandwidth = its measured decode matvec rate for the model's format, else its read
 * bandwidth, else the default; runtime overhead = base RSS + transport rings + 32 MiB; links
 * from the probe matrix (1 us / 10 GB/s assumed when not probed). Expected values are written
 * out by hand below. The measurements themselves (probes over real links, the budget check
 * after a real load) are exercised end to end by tests/integration/test_cluster.sh and
 * test_cluster_netns.sh.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "cluster/beacon.h"
#include "cluster/linkprobe.h"

#define GiB (1024ull * 1024 * 1024)
#define MiB (1024ull * 1024)

/* A survey of 3 nodes: 0 has a memory limit and measured matvec rates, 1 only a read
 * bandwidth, 2 measured nothing. Links 0<->1 and 1<->2 probed (asymmetric bandwidths). */
static void make_survey(lp_survey *sv) {
    memset(sv, 0, sizeof *sv);
    sv->n = 3;
    for (int i = 0; i < 3; i++) snprintf(sv->addr[i], sizeof sv->addr[i], "10.0.0.%d:7700", i + 1);
    sv->info[0] = (cp_info){.mem_total = 64 * GiB, .mem_free = 60 * GiB, .mem_limit = 8 * GiB, .bw_bytes_s = 20e9,
                            .cores = 16, .threads = 8, .rss_bytes = 20 * MiB, .mv_bf16_bytes_s = 12e9,
                            .mv_q4_bytes_s = 9e9};
    sv->info[1] = (cp_info){.mem_total = 32 * GiB, .mem_free = 30 * GiB, .bw_bytes_s = 15e9, .cores = 8,
                            .rss_bytes = 10 * MiB};
    sv->info[2] = (cp_info){.mem_total = 16 * GiB, .mem_free = 12 * GiB, .cores = 4, .threads = 0, .rss_bytes = 0};
    sv->probed = 1;
    sv->link[0][1] = (cp_probe_link){.latency_s = 20e-6, .bw_out = 2e9, .bw_in = 1e9};
    sv->link[1][0] = (cp_probe_link){.latency_s = 20e-6, .bw_out = 1e9, .bw_in = 2e9};
    sv->link[1][2] = (cp_probe_link){.latency_s = 50e-6, .bw_out = 0.5e9, .bw_in = 0.25e9};
    sv->link[2][1] = (cp_probe_link){.latency_s = 50e-6, .bw_out = 0.25e9, .bw_in = 0.5e9};
}

static void test_devices_from_survey(void **state) {
    (void)state;
    lp_survey sv;
    make_survey(&sv);
    lp_runtime rt = {.max_batch = 64, .n_buffers = 8, .ctrl_payload = 1 << 20, .n_embd = 1024, .q_bits = 0};
    int use[3] = {0, 1, 2};
    plan_cluster c;
    st_err err = {0};
    assert_int_equal(lp_survey_cluster(&sv, use, 3, &rt, 7e9, &c, &err), 0);
    assert_int_equal(c.n_dev, 3);
    assert_string_equal(c.dev[0].node, "10.0.0.1:7700");
    assert_string_equal(c.dev[0].name, "cpu");
    assert_string_equal(c.dev[0].kind, "cpu");
    /* memory: the limit wins over free memory; without one, free memory */
    assert_int_equal(c.dev[0].memory, 8 * GiB);
    assert_int_equal(c.dev[1].memory, 30 * GiB);
    assert_int_equal(c.dev[2].memory, 12 * GiB);
    /* bandwidth: bf16 matvec rate (dense model), else read bandwidth, else the default */
    assert_true(c.dev[0].bandwidth == 12e9);
    assert_true(c.dev[1].bandwidth == 15e9);
    assert_true(c.dev[2].bandwidth == 7e9);
    /* threads: --threads, else cores */
    assert_int_equal(c.dev[0].threads, 8);
    assert_int_equal(c.dev[1].threads, 8);
    assert_int_equal(c.dev[2].threads, 4);
    /* overhead: rss + 6 data rings of n_buffers frames + 2 x 8 control frames + 32 MiB */
    uint64_t act = sizeof(dp_act) + 64ull * 1024 * 4 + XPORT_HDR + XPORT_MAC;
    uint64_t rings = 6 * 8 * act + 16 * ((1 << 20) + XPORT_HDR + XPORT_MAC);
    assert_int_equal(c.dev[0].overhead, 20 * MiB + rings + 32 * MiB);
    assert_int_equal(c.dev[2].overhead, rings + 32 * MiB);
    /* links: probed figures per direction; 0 <-> 2 was not probed (both 0): no link */
    assert_true(plan_cluster_link(&c, 0, 1)->latency == 20e-6 && plan_cluster_link(&c, 0, 1)->bandwidth == 2e9);
    assert_true(plan_cluster_link(&c, 1, 0)->bandwidth == 1e9);
    assert_true(plan_cluster_link(&c, 2, 1)->latency == 50e-6 && plan_cluster_link(&c, 2, 1)->bandwidth == 0.25e9);
    assert_true(plan_cluster_link(&c, 0, 2)->bandwidth == 0);
    plan_cluster_free(&c);

    /* a quantized model plans with the 4-bit rate; a subset keeps the survey's order */
    rt.q_bits = 4;
    int sub[2] = {2, 0};
    assert_int_equal(lp_survey_cluster(&sv, sub, 2, &rt, 7e9, &c, &err), 0);
    assert_string_equal(c.dev[0].node, "10.0.0.3:7700");
    assert_true(c.dev[1].bandwidth == 9e9);
    assert_true(c.dev[0].bandwidth == 7e9);
    assert_true(plan_cluster_link(&c, 0, 1)->bandwidth == 0); /* 2 -> 0 not probed */
    plan_cluster_free(&c);

    /* not probed at all (one node, or --split even): assumed 1 us / 10 GB/s */
    sv.probed = 0;
    assert_int_equal(lp_survey_cluster(&sv, use, 3, &rt, 7e9, &c, &err), 0);
    assert_true(plan_cluster_link(&c, 0, 2)->latency == 1e-6 && plan_cluster_link(&c, 0, 2)->bandwidth == 10e9);
    plan_cluster_free(&c);

    /* no nodes */
    assert_int_equal(lp_survey_cluster(&sv, use, 0, &rt, 7e9, &c, &err), ST_ERR_ARG);
}

/* A node running its stages on a GPU is planned as that GPU: its free device memory (or its
 * --memory-limit), its copy bandwidth (else the default), LP_GPU_OVERHEAD; not the host's RAM
 * (a 24 GB GPU in a 64 GB host must not be given 60 GB of layers). A "cuda" report without
 * device memory is a CPU node. */
static void test_gpu_node(void **state) {
    (void)state;
    lp_survey sv;
    memset(&sv, 0, sizeof sv);
    sv.n = 3;
    for (int i = 0; i < 3; i++) snprintf(sv.addr[i], sizeof sv.addr[i], "10.0.0.%d:7700", i + 1);
    sv.info[0] = (cp_info){.mem_total = 64 * GiB, .mem_free = 60 * GiB, .cores = 8, .mv_bf16_bytes_s = 30e9,
                           .dev_mem_total = 24 * GiB, .dev_mem_free = 23 * GiB, .dev_bw_bytes_s = 900e9};
    snprintf(sv.info[0].dev_kind, sizeof sv.info[0].dev_kind, "cuda");
    snprintf(sv.info[0].dev_name, sizeof sv.info[0].dev_name, "NVIDIA GeForce RTX 4090");
    sv.info[1] = sv.info[0];
    sv.info[1].mem_limit = 10 * GiB, sv.info[1].dev_bw_bytes_s = 0; /* --memory-limit, --no-bw-probe */
    sv.info[2] = (cp_info){.mem_total = 64 * GiB, .mem_free = 60 * GiB, .cores = 8, .rss_bytes = 5 * MiB};
    snprintf(sv.info[2].dev_kind, sizeof sv.info[2].dev_kind, "cuda"); /* no device memory reported */
    lp_runtime rt = {.max_batch = 64, .n_buffers = 8, .ctrl_payload = 1 << 20, .n_embd = 1024, .q_bits = 0};
    int use[3] = {0, 1, 2};
    plan_cluster c;
    st_err err = {0};
    assert_int_equal(lp_survey_cluster(&sv, use, 3, &rt, 7e9, &c, &err), 0);
    assert_string_equal(c.dev[0].kind, "gpu");
    assert_string_equal(c.dev[0].name, "NVIDIA GeForce RTX 4090");
    assert_int_equal(c.dev[0].memory, 23 * GiB);
    assert_true(c.dev[0].bandwidth == 900e9);
    assert_int_equal(c.dev[0].overhead, LP_GPU_OVERHEAD);
    assert_string_equal(c.dev[1].kind, "gpu");
    assert_int_equal(c.dev[1].memory, 10 * GiB);
    assert_true(c.dev[1].bandwidth == 7e9);
    assert_string_equal(c.dev[2].kind, "cpu");
    assert_int_equal(c.dev[2].memory, 60 * GiB);
    plan_cluster_free(&c);
}

static void test_node_bandwidth(void **state) {
    (void)state;
    lp_runtime dense = {.q_bits = 0}, quant = {.q_bits = 5};
    cp_info a = {.bw_bytes_s = 20e9, .mv_bf16_bytes_s = 11e9, .mv_q4_bytes_s = 6e9};
    cp_info b = {.bw_bytes_s = 20e9, .mv_bf16_bytes_s = 11e9};
    assert_true(lp_node_bandwidth(&a, &dense, 1e9) == 11e9);
    assert_true(lp_node_bandwidth(&a, &quant, 1e9) == 6e9);
    assert_true(lp_node_bandwidth(&b, &quant, 1e9) == 20e9); /* no 4-bit figure: read bandwidth */
    cp_info none = {0};
    assert_true(lp_node_bandwidth(&none, &dense, 1e9) == 1e9);
}

static void test_discover_spec(void **state) {
    (void)state;
    int port = 0;
    double s = 0;
    assert_int_equal(beacon_parse_spec("7799", &port, &s), 0);
    assert_int_equal(port, 7799);
    assert_true(s == 3);
    assert_int_equal(beacon_parse_spec("1:0.5", &port, &s), 0);
    assert_int_equal(port, 1);
    assert_true(s == 0.5);
    assert_int_equal(beacon_parse_spec("65535:10", &port, &s), 0);
    const char *bad[] = {"", "0", "65536", "-5", "abc", "7799:", "7799:x", "7799:0", "7799:-1", "7799:1s", "7799x", "7799:4000"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) assert_int_equal(beacon_parse_spec(bad[i], &port, &s), -1);
    /* discovery refuses a bad spec before touching the network */
    char peers[64];
    st_err err = {0};
    assert_int_equal(beacon_discover("nope", "k", peers, sizeof peers, NULL, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "PORT[:SECONDS]"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_devices_from_survey),
        cmocka_unit_test(test_gpu_node),
        cmocka_unit_test(test_node_bandwidth),
        cmocka_unit_test(test_discover_spec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
