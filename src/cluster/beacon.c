/* beacon.c — the opt-in LAN beacon: nodes announce themselves by UDP broadcast, a
 * coordinator collects the announcements instead of a --peers list.
 *
 * A beacon is one datagram (host byte order, like every strata frame):
 *   magic "STRB" | u32 version (XPORT_VERSION) | u16 port | u16 pad | u64 unix time (ns)
 *   | u8 nonce[16] | char node_id[40] | char host[64] | u8 mac[32]
 *   mac = HMAC-SHA256(cluster key, "B" | everything before mac)
 * `host` is the node's --listen host ("" or "0.0.0.0": the receiver uses the datagram's source
 * address). A receiver drops datagrams of the wrong size or magic, of another protocol
 * version, older than BEACON_MAX_AGE_S (clocks of one LAN agree that well), and those whose MAC
 * does not verify under its key: nodes of another cluster, or without the key, are ignored.
 * The beacon only says where a node listens; every link is still authenticated at handshake.
 * Sent to the subnet broadcast address of every broadcast-capable IPv4 interface (getifaddrs),
 * so it works without a default route (isolated LANs, network namespaces).
 */
#include "beacon.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BEACON_MAGIC 0x42525453u /* "STRB" little-endian */
#define BEACON_MAX_AGE_S 120

typedef struct beacon_pkt {
    uint32_t magic, version;
    uint16_t port, pad;
    uint32_t pad2;
    uint64_t t_ns;
    uint8_t nonce[16];
    char node_id[40];
    char host[64];
    uint8_t mac[32];
} beacon_pkt;

/* Wall-clock time in ns since the epoch (beacons of one LAN compare it for freshness). */
static uint64_t unix_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* HMAC-SHA256 under the cluster key of "B" | the packet up to its mac field. 0, or
 * ST_ERR_UNSUPPORTED without libcrypto. */
static int beacon_mac(const xport_key *key, const beacon_pkt *p, uint8_t out[32]) {
    return xport_hmac(key->k, key->n, "B", 1, p, offsetof(beacon_pkt, mac), NULL, 0, out);
}

// ----------------------------------------------------------------------------
// sender

int beacon_announce(int fd, int port, const xport_key *key, const char *node_id, const char *listen, st_err *err) {
    beacon_pkt p;
    memset(&p, 0, sizeof p);
    p.magic = BEACON_MAGIC;
    const char *tv = getenv("STRATA_XPORT_TEST_VERSION"); /* tests play another version */
    p.version = tv ? (uint32_t)atoi(tv) : XPORT_VERSION;
    const char *colon = strrchr(listen, ':');
    if (!colon) return st_err_set(err, ST_ERR_ARG, "beacon: listen address '%s' is not HOST:PORT", listen);
    p.port = (uint16_t)atoi(colon + 1);
    size_t hl = (size_t)(colon - listen);
    if (hl >= sizeof p.host) hl = sizeof p.host - 1;
    memcpy(p.host, listen, hl);
    if (!strcmp(p.host, "0.0.0.0")) p.host[0] = 0;
    snprintf(p.node_id, sizeof p.node_id, "%s", node_id);
    p.t_ns = unix_ns();
    if (getrandom(p.nonce, sizeof p.nonce, 0) != (ssize_t)sizeof p.nonce) memset(p.nonce, 0x5a, sizeof p.nonce);
    if (beacon_mac(key, &p, p.mac)) return st_err_set(err, ST_ERR_UNSUPPORTED, "beacon: HMAC unavailable (no libcrypto)");
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs)) return st_err_set(err, ST_ERR_NET, "beacon: getifaddrs: %s", strerror(errno));
    int sent = 0;
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !i->ifa_netmask || !(i->ifa_flags & IFF_BROADCAST) ||
            !(i->ifa_flags & IFF_UP))
            continue;
        /* the subnet's broadcast address from address and mask ("ip addr add" sets no brd by
         * default, so ifa_broadaddr may be 0.0.0.0) */
        uint32_t a = ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr;
        uint32_t m = ((const struct sockaddr_in *)i->ifa_netmask)->sin_addr.s_addr;
        if (m == 0xffffffffu) continue;
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        to.sin_addr.s_addr = a | ~m;
        if (sendto(fd, &p, sizeof p, 0, (const struct sockaddr *)&to, sizeof to) == (ssize_t)sizeof p) sent++;
    }
    freeifaddrs(ifs);
    return sent ? 0 : st_err_set(err, ST_ERR_NET, "beacon: no broadcast-capable interface took the announcement");
}

int beacon_socket(st_err *err) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return st_err_set(err, ST_ERR_NET, "beacon: socket: %s", strerror(errno));
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &one, sizeof one)) {
        int e = errno;
        close(fd);
        return st_err_set(err, ST_ERR_NET, "beacon: SO_BROADCAST: %s", strerror(e));
    }
    return fd;
}

// ----------------------------------------------------------------------------
// receiver

int beacon_parse_spec(const char *spec, int *port, double *seconds) {
    char *end;
    long p = strtol(spec, &end, 10);
    if (end == spec || p < 1 || p > 65535) return -1;
    double s = 3;
    if (*end == ':') {
        char *e2;
        s = strtod(end + 1, &e2);
        if (e2 == end + 1 || *e2 || !(s > 0 && s <= 3600)) return -1;
    } else if (*end) {
        return -1;
    }
    *port = (int)p;
    *seconds = s;
    return 0;
}

/* Remembers that source address `from` sent an ignored beacon; returns 1 the first time
 * (so each source is logged once per discovery). */
static int first_ignore(uint32_t *seen, int *n_seen, int cap, uint32_t from) {
    for (int i = 0; i < *n_seen; i++)
        if (seen[i] == from) return 0;
    if (*n_seen < cap) seen[(*n_seen)++] = from;
    return 1;
}

int beacon_discover(const char *spec, const char *cluster_key, char *peers, size_t cap, int *n_found, st_err *err) {
    int port;
    double seconds;
    peers[0] = 0;
    if (n_found) *n_found = 0;
    if (beacon_parse_spec(spec, &port, &seconds))
        return st_err_set(err, ST_ERR_ARG, "--discover: '%s' is not PORT[:SECONDS] (port 1..65535, seconds > 0)", spec);
    xport_key key;
    int rc = xport_key_init(&key, cluster_key, err);
    if (rc) return rc;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return st_err_set(err, ST_ERR_NET, "--discover: socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (const struct sockaddr *)&sa, sizeof sa)) {
        int e = errno;
        close(fd);
        return st_err_set(err, ST_ERR_NET, "--discover: cannot listen on UDP port %d: %s", port, strerror(e));
    }
    ST_INFO("discovering nodes: listening for beacons on UDP port %d for %.1f s", port, seconds);
    char found[CLUSTER_MAX_PEERS][64], ids[CLUSTER_MAX_PEERS][40];
    int n = 0, n_ign = 0;
    uint32_t ignored[64];
    uint64_t end = st_time_ns() + (uint64_t)(seconds * 1e9);
    for (;;) {
        uint64_t now = st_time_ns();
        if (now >= end) break;
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, (int)((end - now) / 1000000ull) + 1) <= 0) continue;
        beacon_pkt p;
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t r = recvfrom(fd, &p, sizeof p, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (r < 0) continue;
        char src[32];
        inet_ntop(AF_INET, &from.sin_addr, src, sizeof src);
        const char *why = NULL;
        uint8_t want[32];
        uint64_t t = unix_ns();
        if (r != (ssize_t)sizeof p || p.magic != BEACON_MAGIC) why = "not a strata beacon";
        else if (p.version != XPORT_VERSION) why = "another protocol version";
        else if (beacon_mac(&key, &p, want) || memcmp(want, p.mac, 32)) why = "wrong cluster key (another cluster, or none)";
        else if ((p.t_ns > t ? p.t_ns - t : t - p.t_ns) > (uint64_t)BEACON_MAX_AGE_S * 1000000000ull) why = "stale (clock skew?)";
        if (why) {
            if (first_ignore(ignored, &n_ign, 64, from.sin_addr.s_addr))
                ST_WARN("beacon from %s ignored: %s", src, why);
            continue;
        }
        p.node_id[sizeof p.node_id - 1] = 0, p.host[sizeof p.host - 1] = 0;
        int dup = 0;
        for (int i = 0; i < n; i++) dup |= !strcmp(ids[i], p.node_id);
        if (dup) continue;
        if (n == CLUSTER_MAX_PEERS) {
            ST_WARN("beacon from %s (node %s) ignored: already %d nodes", src, p.node_id, CLUSTER_MAX_PEERS);
            continue;
        }
        snprintf(found[n], sizeof found[n], "%s:%u", p.host[0] ? p.host : src, (unsigned)p.port);
        snprintf(ids[n], sizeof ids[n], "%s", p.node_id);
        ST_INFO("beacon: node %s at %s", ids[n], found[n]);
        n++;
    }
    close(fd);
    if (n == 0) return st_err_set(err, ST_ERR_NET, "--discover: no node of this cluster announced itself on UDP port %d within %.1f s", port, seconds);
    /* a stable order: by address */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(found[j - 1], found[j]) > 0; j--) {
            char tmp[64];
            memcpy(tmp, found[j], 64), memcpy(found[j], found[j - 1], 64), memcpy(found[j - 1], tmp, 64);
        }
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        int w = snprintf(peers + o, cap - o, "%s%s", i ? "," : "", found[i]);
        if (w < 0 || (size_t)w >= cap - o) return st_err_set(err, ST_ERR_LIMIT, "--discover: peer list longer than %zu bytes", cap);
        o += (size_t)w;
    }
    if (n_found) *n_found = n;
    ST_INFO("discovered %d node%s: %s", n, n == 1 ? "" : "s", peers);
    return 0;
}
