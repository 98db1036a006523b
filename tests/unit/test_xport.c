/* test_xport.c — the transport: CRC-32C and HMAC-SHA256 against published vectors, tcp and
 * shm links over loopback (both directions, ring wrap-around, MACed data), refusal of a wrong
 * key and of another protocol version, and garbage / truncated input dropped without hurting
 * the listener. References: RFC 3720 (CRC-32C check value), RFC 4231 (HMAC-SHA256 case 2). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "strata/xport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void test_crc_hmac(void **state) {
    (void)state;
    assert_int_equal(xport_crc32c("123456789", 9), 0xE3069283u);
    uint8_t mac[32];
    const char *data = "what do ya want for nothing?";
    assert_int_equal(xport_hmac((const uint8_t *)"Jefe", 4, data, strlen(data), "", 0, "", 0, mac), 0);
    const uint8_t want[32] = {0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7,
                              0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec, 0x38, 0x43};
    assert_memory_equal(mac, want, 32);
}

typedef struct acc_arg {
    int fd;
    xport_key key;
    xport_opts o;
    xport *x;
    int rc;
} acc_arg;

static void *acc_main(void *p) {
    acc_arg *a = p;
    st_err err = {0};
    a->rc = xport_accept(&a->x, a->fd, &a->key, &a->o, &err);
    return NULL;
}

static int recv_wait(xport *x, xport_msg *m) {
    for (int i = 0; i < 2000; i++) {
        st_err err = {0};
        int r = xport_recv(x, m, &err);
        if (r) return r;
        xport_wait(&x, 1, NULL, 0, 10);
    }
    return 0;
}

/* Sets up a linked pair over 127.0.0.1 (connector c, acceptor s). */
static int make_pair(int pref, const char *ckey, const char *skey, int data_mac, xport **c, xport **s, int *arc) {
    int fd, port;
    st_err err = {0};
    assert_int_equal(xport_listen(&fd, "127.0.0.1:0", &port, &err), 0);
    acc_arg a = {.fd = fd, .o = {.max_payload = 1 << 20, .pref = pref, .timeout_ms = 2000, .node_id = "srv"}};
    assert_int_equal(xport_key_init(&a.key, skey, &err), 0);
    pthread_t t;
    pthread_create(&t, NULL, acc_main, &a);
    xport_key k;
    assert_int_equal(xport_key_init(&k, ckey, &err), 0);
    char hp[64];
    snprintf(hp, sizeof hp, "127.0.0.1:%d", port);
    xport_opts o = {.n_buffers = 4, .max_inflight = 3, .max_payload = 4096, .data_mac = data_mac, .pref = pref,
                    .role = XPORT_ROLE_DATA, .epoch = 7, .node_id = "cli", .timeout_ms = 2000};
    int rc = xport_connect(c, hp, &k, &o, &err);
    pthread_join(t, NULL);
    close(fd);
    *s = a.x;
    *arc = a.rc;
    return rc;
}

static void exchange(xport *c, xport *s, int n) {
    st_err err = {0};
    xport_msg m;
    /* connector -> acceptor: more frames than ring slots, read in batches of 3 */
    int sent = 0, got = 0;
    while (got < n) {
        while (sent < n && sent - got < 3) {
            uint32_t *b = xport_send_buf(c, 1024);
            assert_non_null(b);
            for (int i = 0; i < 256; i++) b[i] = (uint32_t)(sent * 1000 + i);
            assert_int_equal(xport_send(c, (uint16_t)(sent % 2 ? 0x100 : 0x20), 1024, &err), 0);
            sent++;
        }
        assert_int_equal(recv_wait(s, &m), 1);
        assert_int_equal(m.len, 1024);
        assert_int_equal(m.type, got % 2 ? 0x100 : 0x20);
        uint32_t v[256];
        memcpy(v, m.data, sizeof v);
        for (int i = 0; i < 256; i++) assert_int_equal(v[i], (uint32_t)(got * 1000 + i));
        xport_release(s);
        got++;
    }
    /* acceptor -> connector */
    for (int i = 0; i < n; i++) {
        assert_int_equal(xport_send_copy(s, 0x101, &i, sizeof i, &err), 0);
        assert_int_equal(recv_wait(c, &m), 1);
        int v;
        memcpy(&v, m.data, 4);
        assert_int_equal(v, i);
        xport_release(c);
    }
}

static void test_tcp_link(void **state) {
    (void)state;
    xport *c = NULL, *s = NULL;
    int arc;
    /* a stage whose next hop was lost sends through a NULL link: no buffer, no crash */
    assert_null(xport_send_buf(NULL, 16));
    assert_int_equal(make_pair(XPORT_PREF_TCP, "k1", "k1", 0, &c, &s, &arc), 0);
    assert_int_equal(arc, 0);
    assert_int_equal(xport_kind_of(c), XPORT_TCP);
    assert_int_equal(xport_get_peer(s)->role, XPORT_ROLE_DATA);
    assert_int_equal((int)xport_get_peer(s)->epoch, 7);
    assert_string_equal(xport_get_peer(s)->node_id, "cli");
    assert_string_equal(xport_get_peer(c)->node_id, "srv");
    exchange(c, s, 50);
    /* garbage injected under the framing breaks the link cleanly on the receiver */
    assert_int_equal(write(xport_fd(c), "garbage garbage garbage!", 24), 24);
    xport_msg m;
    st_err err = {0};
    int r = 0;
    for (int i = 0; i < 100 && r == 0; i++) {
        r = xport_recv(s, &m, &err);
        if (!r) usleep(1000);
    }
    assert_true(r < 0);
    assert_non_null(strstr(err.msg, "magic"));
    xport_close(c), xport_close(s);
    /* with data MACs */
    assert_int_equal(make_pair(XPORT_PREF_TCP, "k1", "k1", 1, &c, &s, &arc), 0);
    exchange(c, s, 20);
    uint64_t mac_ns = 0;
    xport_counters(s, NULL, NULL, &mac_ns);
    assert_true(mac_ns > 0);
    xport_close(c), xport_close(s);
}

static void test_shm_link(void **state) {
    (void)state;
    xport *c = NULL, *s = NULL;
    int arc;
    assert_int_equal(make_pair(XPORT_PREF_AUTO, "k2", "k2", 0, &c, &s, &arc), 0);
    assert_int_equal(arc, 0);
    assert_int_equal(xport_kind_of(c), XPORT_SHM);
    assert_int_equal(xport_kind_of(s), XPORT_SHM);
    exchange(c, s, 100);
    /* the producer goes away: the consumer sees the link end */
    xport_close(c);
    xport_msg m;
    st_err err = {0};
    int r = 0;
    for (int i = 0; i < 100 && r == 0; i++) {
        xport_wait(&s, 1, NULL, 0, 10);
        r = xport_recv(s, &m, &err);
    }
    assert_true(r < 0);
    xport_close(s);
}

static void *producer(void *p) {
    xport *c = p;
    st_err err = {0};
    for (int i = 0; i < 20000; i++) {
        uint32_t *b = xport_send_buf(c, 1000);
        if (!b) return (void *)1;
        for (int k = 0; k < 250; k++) b[k] = (uint32_t)i;
        if (xport_send(c, 0x100, 1000, &err)) return (void *)1;
    }
    return NULL;
}

/* A producer thread outruns a slow consumer: the ring fills, the producer waits on the futex,
 * every frame arrives once, in order, intact. Over shm and tcp. */
static void test_ring_full(void **state) {
    (void)state;
    for (int pref = 0; pref < 2; pref++) {
        xport *c = NULL, *s = NULL;
        int arc;
        assert_int_equal(make_pair(pref ? XPORT_PREF_TCP : XPORT_PREF_AUTO, "k", "k", 0, &c, &s, &arc), 0);
        assert_int_equal(xport_kind_of(s), pref ? XPORT_TCP : XPORT_SHM);
        pthread_t t;
        pthread_create(&t, NULL, producer, c);
        for (int i = 0; i < 20000; i++) {
            xport_msg m;
            assert_int_equal(recv_wait(s, &m), 1);
            uint32_t v[250];
            memcpy(v, m.data, sizeof v);
            assert_int_equal(v[0], (uint32_t)i);
            assert_int_equal(v[249], (uint32_t)i);
            if (i % 2000 == 0) usleep(3000);
            xport_release(s);
        }
        void *ret;
        pthread_join(t, &ret);
        assert_null(ret);
        xport_close(c), xport_close(s);
    }
}

static void test_refusals(void **state) {
    (void)state;
    xport *c = NULL, *s = NULL;
    int arc;
    assert_int_not_equal(make_pair(XPORT_PREF_TCP, "right", "wrong", 0, &c, &s, &arc), 0);
    assert_int_not_equal(arc, 0);
    assert_null(c), assert_null(s);
    setenv("STRATA_XPORT_TEST_VERSION", "99", 1);
    assert_int_not_equal(make_pair(XPORT_PREF_TCP, "k", "k", 0, &c, &s, &arc), 0);
    unsetenv("STRATA_XPORT_TEST_VERSION");
    assert_int_not_equal(arc, 0);
    st_err err = {0};
    xport_key k;
    unsetenv("STRATA_CLUSTER_KEY");
    assert_int_equal(xport_key_init(&k, NULL, &err), ST_ERR_ARG);
}

/* Raw clients: garbage, a truncated hello, silence. Each accept fails (bounded by the
 * handshake timeout) and the listener then still accepts a proper client. */
static void test_garbage(void **state) {
    (void)state;
    int fd, port;
    st_err err = {0};
    assert_int_equal(xport_listen(&fd, "127.0.0.1:0", &port, &err), 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    const char *payloads[3] = {"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "STRA\x01\x00", ""};
    size_t lens[3] = {27, 6, 0};
    for (int i = 0; i < 3; i++) {
        int cfd = socket(AF_INET, SOCK_STREAM, 0);
        assert_int_equal(connect(cfd, (struct sockaddr *)&sa, sizeof sa), 0);
        if (lens[i]) assert_int_equal(write(cfd, payloads[i], lens[i]), (ssize_t)lens[i]);
        acc_arg a = {.fd = fd, .o = {.max_payload = 1 << 20, .timeout_ms = 300}};
        xport_key_init(&a.key, "k", &err);
        acc_main(&a);
        assert_int_not_equal(a.rc, 0);
        assert_null(a.x);
        close(cfd);
    }
    close(fd);
    xport *c = NULL, *s = NULL;
    int arc;
    assert_int_equal(make_pair(XPORT_PREF_TCP, "k", "k", 0, &c, &s, &arc), 0);
    exchange(c, s, 3);
    xport_close(c), xport_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc_hmac), cmocka_unit_test(test_tcp_link), cmocka_unit_test(test_shm_link), cmocka_unit_test(test_ring_full),
        cmocka_unit_test(test_refusals), cmocka_unit_test(test_garbage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
