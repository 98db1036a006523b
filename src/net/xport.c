/* xport.c — tcp and shm links behind one interface: framing, handshake, MACs, rings.
 * The protocol is described in include/strata/xport.h. */
#include "strata/xport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifdef STRATA_HAVE_CRYPTO
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#endif

#define XP_MAGIC 0x41525453u /* "STRA" */
#define XP_ENDIAN 0x01020304u
#define XP_F_MAC 1u
#define XP_F_NOCRC 2u

enum { HS_HELLO = 1, HS_ACK = 2, HS_AUTH = 3, HS_OK = 4, HS_REFUSE = 5 };

typedef struct hs_hello {
    uint32_t endian, version, role, n_buffers, max_inflight, data_mac, want_shm, pad;
    uint64_t epoch, max_payload;
    char host_id[64];
    char node_id[40];
    uint8_t nonce[32];
} hs_hello;

typedef struct hs_ack {
    uint32_t endian, version, shm_ok, pad;
    char node_id[40];
    uint8_t nonce[32];
    uint8_t mac[32];
} hs_ack;

typedef struct hs_auth {
    uint8_t mac[32];
    char shm_name[64];
} hs_auth;

/* The shared-memory ring: one producer (connector), one consumer (acceptor). */
typedef struct shm_ring {
    uint32_t magic, nbuf;
    uint64_t slot_size;
    _Alignas(64) _Atomic uint32_t head; /* frames published */
    _Alignas(64) _Atomic uint32_t tail; /* frames consumed  */
    _Alignas(64) _Atomic uint32_t rx_sleep; /* consumer waits on head */
    _Alignas(64) _Atomic uint32_t tx_sleep; /* producer waits on tail */
} shm_ring;
#define SHM_SLOTS_OFF 512
_Static_assert(sizeof(shm_ring) <= SHM_SLOTS_OFF, "ring header overlaps the slots");

struct xport {
    int fd;
    int kind;
    int connector;
    xport_peer peer;
    int data_mac;
    size_t max_payload, slot_size;
    int nbuf, max_q;
    uint8_t skey[32];
    /* tx (tcp) */
    uint8_t *tx;
    uint32_t *tx_len;
    int tx_first, tx_n;
    size_t tx_off;
    uint64_t tx_seq;
    /* rx (tcp) */
    uint8_t *rx;
    int rx_w, rx_r, rx_ready, rx_out;
    size_t rx_got;
    uint64_t rx_seq;
    int broken;
    char why[160];
    /* shm */
    shm_ring *ring;
    size_t ring_size;
    int shm_out; /* consumer: a ring frame handed out */
    /* counters */
    uint64_t tx_bytes, rx_bytes, mac_ns;
#ifdef STRATA_HAVE_CRYPTO
    EVP_MAC_CTX *mac;
#endif
};

/* ------------------------------------------------------------------------------------------ */
/* crc32c, hmac                                                                               */

static uint32_t g_crc_tab[8][256];
static _Atomic int g_crc_init;

static void crc_init(void) {
    if (atomic_load(&g_crc_init)) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        g_crc_tab[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++) g_crc_tab[t][i] = (g_crc_tab[t - 1][i] >> 8) ^ g_crc_tab[0][g_crc_tab[t - 1][i] & 0xff];
    atomic_store(&g_crc_init, 1);
}

/* Slice-by-8 CRC-32C (Castagnoli). */
uint32_t xport_crc32c(const void *buf, size_t n) {
    crc_init();
    const uint8_t *p = buf;
    uint32_t c = 0xffffffffu;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = g_crc_tab[7][v & 0xff] ^ g_crc_tab[6][(v >> 8) & 0xff] ^ g_crc_tab[5][(v >> 16) & 0xff] ^
            g_crc_tab[4][(v >> 24) & 0xff] ^ g_crc_tab[3][(v >> 32) & 0xff] ^ g_crc_tab[2][(v >> 40) & 0xff] ^
            g_crc_tab[1][(v >> 48) & 0xff] ^ g_crc_tab[0][v >> 56];
        p += 8, n -= 8;
    }
    while (n--) c = (c >> 8) ^ g_crc_tab[0][(c ^ *p++) & 0xff];
    return ~c;
}

int xport_hmac(const uint8_t *key, size_t nkey, const void *a, size_t na, const void *b, size_t nb, const void *c,
               size_t nc, uint8_t out[32]) {
#ifdef STRATA_HAVE_CRYPTO
    uint8_t buf[512];
    if (na + nb + nc > sizeof buf) return ST_ERR_LIMIT;
    memcpy(buf, a, na);
    if (nb) memcpy(buf + na, b, nb);
    if (nc) memcpy(buf + na + nb, c, nc);
    size_t outlen = 0;
    if (!EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, key, nkey, buf, na + nb + nc, out, 32, &outlen) || outlen != 32)
        return ST_ERR_INTERNAL;
    return 0;
#else
    (void)key, (void)nkey, (void)a, (void)na, (void)b, (void)nb, (void)c, (void)nc;
    memset(out, 0, 32);
    return ST_ERR_UNSUPPORTED;
#endif
}

/* Per-link MAC over (header | payload) with the session key; no allocation after setup. */
static int link_mac(xport *x, const uint8_t *hdr, const uint8_t *payload, size_t len, uint8_t out[32]) {
#ifdef STRATA_HAVE_CRYPTO
    uint64_t t0 = st_time_ns();
    size_t ol = 0;
    int ok = EVP_MAC_init(x->mac, NULL, 0, NULL) && EVP_MAC_update(x->mac, hdr, XPORT_HDR) &&
             (len == 0 || EVP_MAC_update(x->mac, payload, len)) && EVP_MAC_final(x->mac, out, &ol, 32) && ol == 32;
    x->mac_ns += st_time_ns() - t0;
    return ok ? 0 : ST_ERR_INTERNAL;
#else
    (void)x, (void)hdr, (void)payload, (void)len;
    memset(out, 0, 32);
    return ST_ERR_UNSUPPORTED;
#endif
}

static int link_mac_init(xport *x, st_err *err) {
#ifdef STRATA_HAVE_CRYPTO
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (!m) return st_err_set(err, ST_ERR_INTERNAL, "libcrypto: no HMAC");
    x->mac = EVP_MAC_CTX_new(m);
    EVP_MAC_free(m);
    if (!x->mac) return st_err_set(err, ST_ERR_NOMEM, "libcrypto: MAC context");
    OSSL_PARAM p[2] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0), OSSL_PARAM_construct_end()};
    if (!EVP_MAC_init(x->mac, x->skey, 32, p)) return st_err_set(err, ST_ERR_INTERNAL, "libcrypto: HMAC init");
    return 0;
#else
    (void)x;
    return st_err_set(err, ST_ERR_UNSUPPORTED, "built without libcrypto: authenticated links are unavailable");
#endif
}

static int ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) d |= a[i] ^ b[i];
    return d == 0;
}

int xport_key_init(xport_key *key, const char *s, st_err *err) {
    memset(key, 0, sizeof *key);
    if (!s) s = getenv("STRATA_CLUSTER_KEY");
    if (!s || !*s) return st_err_set(err, ST_ERR_ARG, "no cluster key: pass --cluster-key K or set STRATA_CLUSTER_KEY");
    size_t n = strlen(s);
    if (n >= sizeof key->k) return st_err_set(err, ST_ERR_ARG, "cluster key longer than 255 bytes");
    memcpy(key->k, s, n);
    key->n = n;
    return 0;
}

void xport_host_id(char *buf, size_t cap) {
    char boot[64] = "noboot", ns[64] = "nons";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f)) strcpy(boot, "noboot");
        fclose(f);
        boot[strcspn(boot, "\n")] = 0;
    }
    ssize_t n = readlink("/proc/self/ns/mnt", ns, sizeof ns - 1);
    if (n > 0) ns[n] = 0;
    snprintf(buf, cap, "%.36s/%.20s", boot, ns);
}

/* ------------------------------------------------------------------------------------------ */
/* sockets                                                                                    */

static int split_hostport(const char *hp, char *host, size_t hcap, char *port, size_t pcap) {
    const char *c = strrchr(hp, ':');
    if (!c || c == hp || !c[1]) return -1;
    size_t hl = (size_t)(c - hp);
    if (hl >= hcap || strlen(c + 1) >= pcap) return -1;
    memcpy(host, hp, hl);
    host[hl] = 0;
    strcpy(port, c + 1);
    return 0;
}

int xport_listen(int *fd_out, const char *hostport, int *port_out, st_err *err) {
    char host[128], port[16];
    if (split_hostport(hostport, host, sizeof host, port, sizeof port))
        return st_err_set(err, ST_ERR_ARG, "listen address '%s' is not HOST:PORT", hostport);
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) return st_err_set(err, ST_ERR_NET, "%s: %s", hostport, gai_strerror(rc));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 64)) {
        int e = errno;
        freeaddrinfo(ai);
        if (fd >= 0) close(fd);
        return st_err_set(err, ST_ERR_NET, "listen on %s: %s", hostport, strerror(e));
    }
    freeaddrinfo(ai);
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    if (port_out) *port_out = ntohs(sa.sin_port);
    *fd_out = fd;
    return 0;
}

static void set_timeouts(int fd, int ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int write_all(int fd, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n) {
    uint8_t *p = buf;
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

/* Handshake frames: header (seq 0, no MAC) + fixed payload, blocking under SO_RCVTIMEO. */
static int hs_send(int fd, uint16_t type, const void *p, uint32_t len) {
    uint8_t hdr[XPORT_HDR] = {0};
    uint32_t magic = XP_MAGIC, crc = xport_crc32c(p, len);
    uint16_t flags = 0;
    memcpy(hdr, &magic, 4), memcpy(hdr + 4, &type, 2), memcpy(hdr + 6, &flags, 2);
    memcpy(hdr + 8, &len, 4), memcpy(hdr + 12, &crc, 4);
    if (write_all(fd, hdr, sizeof hdr)) return -1;
    return write_all(fd, p, len);
}

/* Receives one handshake frame into buf (cap bytes); returns its type, or -1 (closed,
 * timeout, bad magic/length/crc: *why says which). */
static int hs_recv(int fd, void *buf, uint32_t cap, uint32_t *len_out, const char **why) {
    uint8_t hdr[XPORT_HDR];
    if (read_all(fd, hdr, sizeof hdr)) return *why = "connection closed or timed out during handshake", -1;
    uint32_t magic, len, crc;
    uint16_t type;
    memcpy(&magic, hdr, 4), memcpy(&type, hdr + 4, 2), memcpy(&len, hdr + 8, 4), memcpy(&crc, hdr + 12, 4);
    if (magic != XP_MAGIC) return *why = "not a strata peer (bad magic)", -1;
    if (len > cap) return *why = "oversized handshake frame", -1;
    if (read_all(fd, buf, len)) return *why = "truncated handshake frame", -1;
    if (xport_crc32c(buf, len) != crc) return *why = "handshake frame checksum mismatch", -1;
    *len_out = len;
    return type;
}

static void peer_addr(int fd, char *buf, size_t cap) {
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    if (getpeername(fd, (struct sockaddr *)&sa, &sl) == 0) {
        char ip[INET_ADDRSTRLEN] = "?";
        inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof ip);
        snprintf(buf, cap, "%s:%d", ip, ntohs(sa.sin_port));
    } else {
        snprintf(buf, cap, "?");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* link setup                                                                                 */

static int futex_wait(_Atomic uint32_t *a, uint32_t val, int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    return (int)syscall(SYS_futex, (uint32_t *)a, FUTEX_WAIT, val, &ts, NULL, 0);
}
static void futex_wake(_Atomic uint32_t *a) { syscall(SYS_futex, (uint32_t *)a, FUTEX_WAKE, 1, NULL, NULL, 0); }

static int link_alloc(xport *x, int fd, int nbuf, int max_inflight, size_t max_payload, st_err *err) {
    x->fd = fd;
    x->nbuf = nbuf < 1 ? 1 : nbuf > 1024 ? 1024 : nbuf;
    x->max_q = max_inflight < 1 ? 1 : max_inflight < x->nbuf ? max_inflight : x->nbuf;
    x->max_payload = (max_payload + 7) & ~(size_t)7;
    x->slot_size = XPORT_HDR + x->max_payload + XPORT_MAC;
    size_t total;
    if (st_mul_size(x->slot_size, (size_t)x->nbuf, &total))
        return st_err_set(err, ST_ERR_LIMIT, "link buffers overflow");
    x->tx = st_alloc_aligned(total);
    x->rx = st_alloc_aligned(total);
    x->tx_len = calloc((size_t)x->nbuf, sizeof *x->tx_len);
    if (!x->tx || !x->rx || !x->tx_len)
        return st_err_set(err, ST_ERR_NOMEM, "link buffers: %d x %zu bytes", x->nbuf, x->slot_size);
    x->tx_bytes = x->rx_bytes = 0;
    return 0;
}

static int make_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void link_ready(xport *x) {
    struct timeval tv = {0};
    setsockopt(x->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(x->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(x->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    make_nonblocking(x->fd);
}

void xport_close(xport *x) {
    if (!x) return;
    if (x->fd >= 0) close(x->fd);
    if (x->ring) munmap(x->ring, x->ring_size);
    st_free_aligned(x->tx);
    st_free_aligned(x->rx);
    free(x->tx_len);
#ifdef STRATA_HAVE_CRYPTO
    EVP_MAC_CTX_free(x->mac);
#endif
    free(x);
}

static int shm_create(xport *x, char *name, size_t cap, st_err *err) {
    uint8_t r[8];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) memset(r, 7, sizeof r);
    snprintf(name, cap, "/strata-%d-%02x%02x%02x%02x%02x%02x", (int)getpid(), r[0], r[1], r[2], r[3], r[4], r[5]);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return st_err_set(err, ST_ERR_IO, "shm_open %s: %s", name, strerror(errno));
    x->ring_size = SHM_SLOTS_OFF + x->slot_size * (size_t)x->nbuf;
    if (ftruncate(fd, (off_t)x->ring_size)) {
        close(fd);
        shm_unlink(name);
        return st_err_set(err, ST_ERR_IO, "shm %s: %s", name, strerror(errno));
    }
    void *p = mmap(NULL, x->ring_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        return st_err_set(err, ST_ERR_IO, "mmap shm %s: %s", name, strerror(errno));
    }
    x->ring = p;
    x->ring->magic = XP_MAGIC;
    x->ring->nbuf = (uint32_t)x->nbuf;
    x->ring->slot_size = x->slot_size;
    return 0;
}

static int shm_attach(xport *x, const char *name, st_err *err) {
    if (strncmp(name, "/strata-", 8) || strchr(name + 1, '/'))
        return st_err_set(err, ST_ERR_FORMAT, "bad shm segment name");
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return st_err_set(err, ST_ERR_IO, "shm_open %s: %s", name, strerror(errno));
    shm_unlink(name); /* both ends hold it now; nothing is left behind in /dev/shm */
    struct stat st;
    size_t want = SHM_SLOTS_OFF + x->slot_size * (size_t)x->nbuf;
    if (fstat(fd, &st) || (size_t)st.st_size != want) {
        close(fd);
        return st_err_set(err, ST_ERR_FORMAT, "shm %s: size mismatch", name);
    }
    void *p = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return st_err_set(err, ST_ERR_IO, "mmap shm %s: %s", name, strerror(errno));
    x->ring = p;
    x->ring_size = want;
    if (x->ring->magic != XP_MAGIC || x->ring->nbuf != (uint32_t)x->nbuf || x->ring->slot_size != x->slot_size)
        return st_err_set(err, ST_ERR_FORMAT, "shm %s: header mismatch", name);
    return 0;
}

int xport_connect(xport **out, const char *hostport, const xport_key *key, const xport_opts *o, st_err *err) {
    *out = NULL;
    char host[128], port[16];
    if (split_hostport(hostport, host, sizeof host, port, sizeof port))
        return st_err_set(err, ST_ERR_ARG, "peer address '%s' is not HOST:PORT", hostport);
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) return st_err_set(err, ST_ERR_NET, "%s: %s", hostport, gai_strerror(rc));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int tmo = o->timeout_ms > 0 ? o->timeout_ms : 3000;
    set_timeouts(fd, tmo);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen)) {
        int e = errno;
        freeaddrinfo(ai);
        if (fd >= 0) close(fd);
        return st_err_set(err, ST_ERR_NET, "connect to %s: %s", hostport, strerror(e));
    }
    freeaddrinfo(ai);
    xport *x = calloc(1, sizeof *x);
    if (!x) return close(fd), st_err_set(err, ST_ERR_NOMEM, "xport");
    x->fd = fd;
    x->connector = 1;
    snprintf(x->peer.addr, sizeof x->peer.addr, "%s", hostport);
    /* STRATA_XPORT_TEST_VERSION lets the tests play a peer of another protocol version */
    const char *tv = getenv("STRATA_XPORT_TEST_VERSION");
    hs_hello h = {.endian = XP_ENDIAN, .version = tv ? (uint32_t)atoi(tv) : XPORT_VERSION, .role = (uint32_t)o->role,
                  .n_buffers = (uint32_t)(o->n_buffers > 0 ? o->n_buffers : 8),
                  .max_inflight = (uint32_t)(o->max_inflight > 0 ? o->max_inflight : 256),
                  .data_mac = (uint32_t)!!o->data_mac, .want_shm = o->pref != XPORT_PREF_TCP, .epoch = o->epoch,
                  .max_payload = o->max_payload};
    xport_host_id(h.host_id, sizeof h.host_id);
    snprintf(h.node_id, sizeof h.node_id, "%s", o->node_id ? o->node_id : "");
    if (getrandom(h.nonce, 32, 0) != 32) return xport_close(x), st_err_set(err, ST_ERR_INTERNAL, "getrandom failed");
    const char *why = NULL;
    uint8_t buf[512];
    uint32_t len = 0;
    if (hs_send(fd, HS_HELLO, &h, sizeof h)) {
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s: handshake send failed", hostport);
    }
    int t = hs_recv(fd, buf, sizeof buf, &len, &why);
    if (t == HS_REFUSE) {
        buf[len < sizeof buf ? len : sizeof buf - 1] = 0;
        ST_ERROR("refused by %s: %s", hostport, (char *)buf);
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "refused by %s: %s", hostport, (char *)buf);
    }
    if (t != HS_ACK || len != sizeof(hs_ack)) {
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s: handshake failed: %s", hostport, why ? why : "unexpected frame");
    }
    hs_ack a;
    memcpy(&a, buf, sizeof a);
    if (a.endian != XP_ENDIAN || a.version != XPORT_VERSION) {
        ST_ERROR("refusing %s: protocol version mismatch (ours %d, peer %u)", hostport, XPORT_VERSION, a.version);
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s: protocol version mismatch (ours %d, peer %u)", hostport, XPORT_VERSION,
                          a.version);
    }
    uint8_t want[32];
    hs_auth au;
    memset(&au, 0, sizeof au);
    if (xport_hmac(key->k, key->n, "S", 1, h.nonce, 32, a.nonce, 32, want) ||
        xport_hmac(key->k, key->n, "C", 1, a.nonce, 32, h.nonce, 32, au.mac)) {
        xport_close(x);
        return st_err_set(err, ST_ERR_UNSUPPORTED, "HMAC unavailable (built without libcrypto)");
    }
    int server_ok = ct_equal(want, a.mac, 32);
    a.node_id[sizeof a.node_id - 1] = 0;
    snprintf(x->peer.node_id, sizeof x->peer.node_id, "%s", a.node_id);
    x->peer.role = o->role;
    x->peer.epoch = o->epoch;
    if (link_alloc(x, fd, (int)h.n_buffers, (int)h.max_inflight, o->max_payload, err)) return xport_close(x), err->code;
    x->data_mac = (int)h.data_mac;
    int use_shm = server_ok && a.shm_ok && h.want_shm;
    if (!server_ok) {
        /* still send our proof so the server logs the failure too */
        hs_send(fd, HS_AUTH, &au, sizeof au);
        ST_ERROR("refusing %s: it failed authentication (wrong cluster key?)", hostport);
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s failed authentication (wrong cluster key?)", hostport);
    }
    if (use_shm && shm_create(x, au.shm_name, sizeof au.shm_name, err)) {
        ST_WARN("%s: shm unavailable (%s), using tcp", hostport, err->msg);
        use_shm = 0;
        au.shm_name[0] = 0;
    }
    if (hs_send(fd, HS_AUTH, &au, sizeof au)) {
        if (use_shm) shm_unlink(au.shm_name);
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s: handshake send failed", hostport);
    }
    t = hs_recv(fd, buf, sizeof buf, &len, &why);
    if (t != HS_OK) {
        if (use_shm) shm_unlink(au.shm_name);
        if (t == HS_REFUSE) {
            buf[len < sizeof buf ? len : sizeof buf - 1] = 0;
            ST_ERROR("refused by %s: %s", hostport, (char *)buf);
            st_err_set(err, ST_ERR_NET, "refused by %s: %s", hostport, (char *)buf);
        } else {
            st_err_set(err, ST_ERR_NET, "%s: handshake failed: %s", hostport, why ? why : "unexpected frame");
        }
        xport_close(x);
        return err->code;
    }
    if (use_shm) x->kind = XPORT_SHM;
    if (xport_hmac(key->k, key->n, "K", 1, h.nonce, 32, a.nonce, 32, x->skey) || link_mac_init(x, err))
        return xport_close(x), err->code ? err->code : ST_ERR_INTERNAL;
    link_ready(x);
    *out = x;
    return 0;
}

/* Sends a refusal (best effort) and logs it. */
static int refuse(int fd, const char *addr, st_err *err, const char *reason) {
    hs_send(fd, HS_REFUSE, reason, (uint32_t)strlen(reason));
    ST_ERROR("refused connection from %s: %s", addr, reason);
    return st_err_set(err, ST_ERR_NET, "refused %s: %s", addr, reason);
}

int xport_accept(xport **out, int listen_fd, const xport_key *key, const xport_opts *o, st_err *err) {
    *out = NULL;
    int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return st_err_set(err, ST_ERR_NET, "accept: %s", strerror(errno));
    set_timeouts(fd, o->timeout_ms > 0 ? o->timeout_ms : 3000);
    char addr[64];
    peer_addr(fd, addr, sizeof addr);
    uint8_t buf[512];
    uint32_t len = 0;
    const char *why = NULL;
    int t = hs_recv(fd, buf, sizeof buf, &len, &why);
    if (t < 0 || t != HS_HELLO || len != sizeof(hs_hello)) {
        ST_WARN("dropped connection from %s: %s", addr, t < 0 ? why : "expected a hello");
        close(fd);
        return st_err_set(err, ST_ERR_FORMAT, "%s: %s", addr, t < 0 ? why : "expected a hello");
    }
    hs_hello h;
    memcpy(&h, buf, sizeof h);
    h.host_id[sizeof h.host_id - 1] = 0;
    h.node_id[sizeof h.node_id - 1] = 0;
    char reason[200];
    if (h.endian != XP_ENDIAN || h.version != XPORT_VERSION) {
        snprintf(reason, sizeof reason, "protocol version mismatch (ours %d, peer %u)", XPORT_VERSION, h.version);
        refuse(fd, addr, err, reason);
        close(fd);
        return err->code;
    }
    if (h.n_buffers < 1 || h.n_buffers > XPORT_MAX_BUFFERS || h.max_payload > ((uint64_t)1 << 31) ||
        (o->max_payload && h.max_payload > o->max_payload) || (h.role < 1 || h.role > 3)) {
        refuse(fd, addr, err, "link parameters out of range");
        close(fd);
        return err->code;
    }
    char myhost[64];
    xport_host_id(myhost, sizeof myhost);
    hs_ack a = {.endian = XP_ENDIAN, .version = XPORT_VERSION};
    a.shm_ok = h.want_shm && o->pref != XPORT_PREF_TCP && !strcmp(myhost, h.host_id);
    snprintf(a.node_id, sizeof a.node_id, "%s", o->node_id ? o->node_id : "");
    if (getrandom(a.nonce, 32, 0) != 32 || xport_hmac(key->k, key->n, "S", 1, h.nonce, 32, a.nonce, 32, a.mac)) {
        close(fd);
        return st_err_set(err, ST_ERR_UNSUPPORTED, "HMAC unavailable (built without libcrypto)");
    }
    if (hs_send(fd, HS_ACK, &a, sizeof a)) {
        close(fd);
        return st_err_set(err, ST_ERR_NET, "%s: handshake send failed", addr);
    }
    t = hs_recv(fd, buf, sizeof buf, &len, &why);
    if (t != HS_AUTH || len != sizeof(hs_auth)) {
        ST_WARN("dropped connection from %s: %s", addr, t < 0 ? why : "expected auth");
        close(fd);
        return st_err_set(err, ST_ERR_NET, "%s: %s", addr, t < 0 ? why : "expected auth");
    }
    hs_auth au;
    memcpy(&au, buf, sizeof au);
    au.shm_name[sizeof au.shm_name - 1] = 0;
    uint8_t want[32];
    xport_hmac(key->k, key->n, "C", 1, a.nonce, 32, h.nonce, 32, want);
    if (!ct_equal(want, au.mac, 32)) {
        if (au.shm_name[0] && !strncmp(au.shm_name, "/strata-", 8)) shm_unlink(au.shm_name);
        refuse(fd, addr, err, "authentication failed (wrong cluster key)");
        close(fd);
        return err->code;
    }
    xport *x = calloc(1, sizeof *x);
    if (!x) return close(fd), st_err_set(err, ST_ERR_NOMEM, "xport");
    x->fd = fd;
    x->peer.role = (int)h.role;
    x->peer.epoch = h.epoch;
    snprintf(x->peer.node_id, sizeof x->peer.node_id, "%s", h.node_id);
    snprintf(x->peer.addr, sizeof x->peer.addr, "%s", addr);
    x->data_mac = (int)h.data_mac;
    if (link_alloc(x, fd, (int)h.n_buffers, (int)h.max_inflight, h.max_payload, err)) {
        refuse(fd, addr, err, "cannot allocate link buffers");
        xport_close(x);
        return ST_ERR_NOMEM;
    }
    if (au.shm_name[0]) {
        if (!a.shm_ok || shm_attach(x, au.shm_name, err)) {
            if (a.shm_ok) shm_unlink(au.shm_name);
            refuse(fd, addr, err, "shared memory segment unusable");
            xport_close(x);
            return ST_ERR_NET;
        }
        x->kind = XPORT_SHM;
    }
    if (xport_hmac(key->k, key->n, "K", 1, h.nonce, 32, a.nonce, 32, x->skey) || link_mac_init(x, err)) {
        xport_close(x);
        return err->code ? err->code : ST_ERR_INTERNAL;
    }
    if (hs_send(fd, HS_OK, "ok", 2)) {
        xport_close(x);
        return st_err_set(err, ST_ERR_NET, "%s: handshake send failed", addr);
    }
    link_ready(x);
    *out = x;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* framing                                                                                    */

static int is_shm_tx(const xport *x) { return x->kind == XPORT_SHM && x->connector; }
static int is_shm_rx(const xport *x) { return x->kind == XPORT_SHM && !x->connector; }

static void set_broken(xport *x, const char *fmt, const char *arg) {
    if (x->broken) return;
    x->broken = 1;
    snprintf(x->why, sizeof x->why, fmt, arg);
}

/* Writes queued tcp frames; blocking: wait for the socket up to 10 s per frame. */
static void tx_pump(xport *x, int blocking) {
    while (x->tx_n > 0 && !x->broken) {
        uint8_t *s = x->tx + (size_t)x->tx_first * x->slot_size;
        size_t n = x->tx_len[x->tx_first];
        ssize_t w = send(x->fd, s + x->tx_off, n - x->tx_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            x->tx_off += (size_t)w;
            if (x->tx_off == n) {
                x->tx_off = 0;
                x->tx_first = (x->tx_first + 1) % x->nbuf;
                x->tx_n--;
            }
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!blocking) return;
            struct pollfd p = {.fd = x->fd, .events = POLLOUT};
            if (poll(&p, 1, 10000) <= 0) set_broken(x, "%s", "send timed out (peer not reading)");
            continue;
        }
        set_broken(x, "send failed: %s", strerror(errno));
    }
}

void xport_flush(xport *x) {
    if (x && !is_shm_tx(x)) tx_pump(x, 0);
}

void *xport_send_buf(xport *x, size_t len) {
    if (!x || x->broken || len > x->max_payload) return NULL; /* no link (peer lost): no buffer */
    if (is_shm_tx(x)) {
        shm_ring *r = x->ring;
        uint64_t t0 = st_time_ns();
        while (atomic_load(&r->head) - atomic_load(&r->tail) >= (uint32_t)x->nbuf) {
            uint32_t tail = atomic_load(&r->tail);
            atomic_store(&r->tx_sleep, 1);
            if (atomic_load(&r->head) - tail >= (uint32_t)x->nbuf) futex_wait(&r->tail, tail, 5);
            atomic_store(&r->tx_sleep, 0);
            /* the consumer may be gone: its socket closes */
            struct pollfd p = {.fd = x->fd, .events = POLLIN};
            if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR | POLLIN))) {
                char c;
                if (recv(x->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) return set_broken(x, "%s", "peer closed"), NULL;
            }
            if (st_time_ns() - t0 > 10000000000ull) return set_broken(x, "%s", "shm ring full for 10 s"), NULL;
        }
        uint32_t h = atomic_load(&r->head);
        return (uint8_t *)r + SHM_SLOTS_OFF + (size_t)(h % (uint32_t)x->nbuf) * x->slot_size + XPORT_HDR;
    }
    if (x->tx_n >= x->max_q) tx_pump(x, 1);
    if (x->broken) return NULL;
    int i = (x->tx_first + x->tx_n) % x->nbuf;
    return x->tx + (size_t)i * x->slot_size + XPORT_HDR;
}

int xport_send(xport *x, uint16_t type, size_t len, st_err *err) {
    if (x->broken) return st_err_set(err, ST_ERR_NET, "link to %s: %s", x->peer.addr, x->why);
    ST_ASSERT(len <= x->max_payload);
    uint8_t *s;
    int shm = is_shm_tx(x);
    if (shm) {
        uint32_t h = atomic_load(&x->ring->head);
        s = (uint8_t *)x->ring + SHM_SLOTS_OFF + (size_t)(h % (uint32_t)x->nbuf) * x->slot_size;
    } else {
        s = x->tx + (size_t)((x->tx_first + x->tx_n) % x->nbuf) * x->slot_size;
    }
    int mac = type < XPORT_DATA_TYPES || x->data_mac;
    uint32_t magic = XP_MAGIC, l32 = (uint32_t)len, crc = shm ? 0 : xport_crc32c(s + XPORT_HDR, len);
    uint16_t flags = (uint16_t)((mac ? XP_F_MAC : 0) | (shm ? XP_F_NOCRC : 0));
    uint64_t seq = ++x->tx_seq;
    memcpy(s, &magic, 4), memcpy(s + 4, &type, 2), memcpy(s + 6, &flags, 2);
    memcpy(s + 8, &l32, 4), memcpy(s + 12, &crc, 4), memcpy(s + 16, &seq, 8);
    if (mac && link_mac(x, s, s + XPORT_HDR, len, s + XPORT_HDR + len))
        return st_err_set(err, ST_ERR_INTERNAL, "MAC failed");
    x->tx_bytes += len;
    if (shm) {
        atomic_fetch_add(&x->ring->head, 1);
        if (atomic_load(&x->ring->rx_sleep)) futex_wake(&x->ring->head);
        return 0;
    }
    x->tx_len[(x->tx_first + x->tx_n) % x->nbuf] = (uint32_t)(XPORT_HDR + len + (mac ? XPORT_MAC : 0));
    x->tx_n++;
    tx_pump(x, 0);
    if (x->broken) return st_err_set(err, ST_ERR_NET, "link to %s: %s", x->peer.addr, x->why);
    return 0;
}

int xport_send_copy(xport *x, uint16_t type, const void *data, size_t len, st_err *err) {
    void *b = xport_send_buf(x, len);
    if (!b) {
        if (len > x->max_payload)
            return st_err_set(err, ST_ERR_LIMIT, "message of %zu bytes exceeds the link's %zu", len, x->max_payload);
        return st_err_set(err, ST_ERR_NET, "link to %s: %s", x->peer.addr, x->why);
    }
    if (len) memcpy(b, data, len);
    return xport_send(x, type, len, err);
}

/* Checks a complete frame at s: crc, seq, MAC. 0 or -1 (link marked broken). */
static int frame_verify(xport *x, const uint8_t *s) {
    uint16_t type, flags;
    uint32_t len, crc;
    uint64_t seq;
    memcpy(&type, s + 4, 2), memcpy(&flags, s + 6, 2), memcpy(&len, s + 8, 4), memcpy(&crc, s + 12, 4);
    memcpy(&seq, s + 16, 8);
    if (!(flags & XP_F_NOCRC) && xport_crc32c(s + XPORT_HDR, len) != crc)
        return set_broken(x, "%s", "frame checksum mismatch"), -1;
    if ((flags & XP_F_NOCRC) && !is_shm_rx(x)) return set_broken(x, "%s", "frame without checksum"), -1;
    if (seq != x->rx_seq + 1) return set_broken(x, "%s", "frame out of sequence (replay or loss)"), -1;
    int need_mac = type < XPORT_DATA_TYPES || x->data_mac;
    if (need_mac && !(flags & XP_F_MAC)) return set_broken(x, "%s", "frame without the required MAC"), -1;
    if (flags & XP_F_MAC) {
        uint8_t m[32];
        if (link_mac(x, s, s + XPORT_HDR, len, m) || !ct_equal(m, s + XPORT_HDR + len, 32))
            return set_broken(x, "%s", "frame MAC mismatch"), -1;
    }
    x->rx_seq = seq;
    x->rx_bytes += len;
    return 0;
}

/* Reads from the socket into free rx slots without blocking. */
static void rx_pump(xport *x) {
    while (!x->broken && x->rx_ready < x->nbuf) {
        uint8_t *s = x->rx + (size_t)x->rx_w * x->slot_size;
        size_t need = XPORT_HDR;
        if (x->rx_got >= XPORT_HDR) {
            uint32_t len;
            uint16_t flags;
            memcpy(&len, s + 8, 4), memcpy(&flags, s + 6, 2);
            need = XPORT_HDR + len + ((flags & XP_F_MAC) ? XPORT_MAC : 0);
        }
        if (x->rx_got < need) {
            ssize_t r = recv(x->fd, s + x->rx_got, need - x->rx_got, MSG_DONTWAIT);
            if (r == 0) return set_broken(x, "%s", "peer closed the connection");
            if (r < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) set_broken(x, "recv: %s", strerror(errno));
                return;
            }
            x->rx_got += (size_t)r;
            if (x->rx_got == XPORT_HDR) {
                uint32_t magic, len;
                memcpy(&magic, s, 4), memcpy(&len, s + 8, 4);
                if (magic != XP_MAGIC) return set_broken(x, "%s", "bad frame magic (garbage from peer)");
                if (len > x->max_payload) return set_broken(x, "%s", "frame longer than the link allows");
            }
            continue;
        }
        /* complete */
        if (frame_verify(x, s)) return;
        x->rx_got = 0;
        x->rx_w = (x->rx_w + 1) % x->nbuf;
        x->rx_ready++;
    }
}

int xport_recv(xport *x, xport_msg *m, st_err *err) {
    ST_ASSERT(!x->rx_out && !x->shm_out);
    if (is_shm_rx(x) && !x->broken) {
        shm_ring *r = x->ring;
        uint32_t tail = atomic_load(&r->tail);
        if (atomic_load(&r->head) != tail) {
            uint8_t *s = (uint8_t *)r + SHM_SLOTS_OFF + (size_t)(tail % (uint32_t)x->nbuf) * x->slot_size;
            uint32_t len, magic;
            memcpy(&magic, s, 4), memcpy(&len, s + 8, 4);
            if (magic != XP_MAGIC || len > x->max_payload) {
                char w[96];
                snprintf(w, sizeof w, "corrupt shm frame (magic %08x len %u head %u tail %u)", magic, len, atomic_load(&r->head), tail);
                set_broken(x, "%s", w);
            }
            else if (frame_verify(x, s) == 0) {
                memcpy(&m->type, s + 4, 2);
                m->len = len;
                m->data = s + XPORT_HDR;
                x->shm_out = 1;
                return 1;
            }
        }
    }
    if (x->rx_ready == 0) rx_pump(x);
    if (x->rx_ready > 0) {
        uint8_t *s = x->rx + (size_t)x->rx_r * x->slot_size;
        memcpy(&m->type, s + 4, 2);
        memcpy(&m->len, s + 8, 4);
        m->data = s + XPORT_HDR;
        x->rx_out = 1;
        return 1;
    }
    if (x->broken) return st_err_set(err, ST_ERR_NET, "link %s: %s", x->peer.addr, x->why);
    return 0;
}

void xport_release(xport *x) {
    if (x->shm_out) {
        x->shm_out = 0;
        atomic_fetch_add(&x->ring->tail, 1);
        if (atomic_load(&x->ring->tx_sleep)) futex_wake(&x->ring->tail);
        return;
    }
    if (x->rx_out) {
        x->rx_out = 0;
        x->rx_r = (x->rx_r + 1) % x->nbuf;
        x->rx_ready--;
    }
}

int xport_wait(xport **xs, int n, const int *extra_fds, int n_extra, int timeout_ms) {
    struct pollfd pf[64];
    int np = 0, ready = 0;
    xport *shm = NULL;
    for (int i = 0; i < n; i++) {
        xport *x = xs[i];
        if (!x) continue;
        if (x->rx_ready > 0 || x->broken) ready++;
        if (is_shm_rx(x)) {
            if (atomic_load(&x->ring->head) != atomic_load(&x->ring->tail)) ready++;
            if (!shm) shm = x;
        }
        if (np < 64) pf[np++] = (struct pollfd){.fd = x->fd, .events = (short)(POLLIN | (x->tx_n > 0 ? POLLOUT : 0))};
    }
    for (int i = 0; i < n_extra && np < 64; i++) pf[np++] = (struct pollfd){.fd = extra_fds[i], .events = POLLIN};
    if (ready) return ready;
    if (!shm) {
        int r = poll(pf, (nfds_t)np, timeout_ms);
        return r < 0 ? 0 : r;
    }
    uint64_t end = st_time_ns() + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000ull;
    for (;;) {
        int r = poll(pf, (nfds_t)np, 0);
        if (r > 0) return r;
        if (timeout_ms == 0) return 0; /* a poll, never a sleep: the futex wait below lasts up to
                                          2 ms, which a busy GPU stage paid on every step */
        shm_ring *rg = shm->ring;
        uint32_t tail = atomic_load(&rg->tail);
        atomic_store(&rg->rx_sleep, 1);
        if (atomic_load(&rg->head) == tail) futex_wait(&rg->head, tail, 2);
        atomic_store(&rg->rx_sleep, 0);
        if (atomic_load(&rg->head) != tail) return 1;
        if (st_time_ns() >= end) return 0;
    }
}

int xport_fd(const xport *x) { return x->fd; }
const char *xport_error(const xport *x) { return x->why; }
int xport_kind_of(const xport *x) { return x->kind; }
const char *xport_kind_name(const xport *x) { return x->kind == XPORT_SHM ? "shm" : "tcp"; }
const xport_peer *xport_get_peer(const xport *x) { return &x->peer; }
size_t xport_max_payload(const xport *x) { return x->max_payload; }

void xport_counters(const xport *x, uint64_t *tx_bytes, uint64_t *rx_bytes, uint64_t *mac_ns) {
    if (tx_bytes) *tx_bytes = x->tx_bytes;
    if (rx_bytes) *rx_bytes = x->rx_bytes;
    if (mac_ns) *mac_ns = x->mac_ns;
}
