/* strata/xport.h — authenticated point-to-point transports between nodes (tcp, shm).
 *
 * A link (xport) is created by xport_connect on one end and xport_accept on the other. Both
 * run the same handshake (below) and both then speak frames:
 *
 *   frame  = header (24 bytes) | payload (len bytes) | MAC (32 bytes, only if flags & MAC)
 *   header = u32 magic "STRA" | u16 type | u16 flags | u32 len | u32 crc32c(payload) | u64 seq
 *   MAC    = HMAC-SHA256(session key, header | payload)
 *
 * Every frame carries the sender's sequence number (1, 2, 3 ... per direction); a frame whose
 * seq is not the next one, whose crc or MAC is wrong, whose magic or length is bad, drops the
 * link (xport_recv returns ST_ERR_NET / ST_ERR_FORMAT with the reason). Control frames (types
 * below XPORT_DATA_TYPES) must carry a MAC; data frames must when the link was set up with
 * data_mac. Integers are in host byte order (little-endian hosts only; checked at handshake).
 *
 * Handshake (mutual challenge-response over the cluster key K):
 *   C -> S  HELLO   {version, role, epoch, sizes, host id, node id, nonce_c, wants shm}
 *   S -> C  ACK     {version, node id, nonce_s, shm ok, mac_s = HMAC(K, "S" nonce_c nonce_s)}
 *   C -> S  AUTH    {mac_c = HMAC(K, "C" nonce_s nonce_c), shm segment name or ""}
 *   S -> C  OK | REFUSE {reason}
 * Session key = HMAC(K, "K" nonce_c nonce_s). Nonces are 32 random bytes, so a recorded
 * handshake cannot be replayed. A version mismatch or wrong key is refused and logged on both
 * sides. With shm (both ends report the same host id = boot id + mount namespace), the
 * connector creates a shared-memory ring of n_buffers slots, the acceptor maps it: frames the
 * connector sends go through the ring (futex wake-up, no syscalls when the receiver is busy),
 * frames the acceptor sends and end-of-link detection use the TCP socket.
 *
 * Buffers: each direction owns a ring of n_buffers pre-allocated slots of max_payload bytes.
 * A sender writes its payload straight into xport_send_buf()'s slot and commits it with
 * xport_send(); at most min(n_buffers, max_inflight) committed frames wait for the socket.
 * A receiver gets a pointer into a slot from xport_recv() and gives it back with
 * xport_release(). Nothing is allocated per message.
 */
#ifndef STRATA_XPORT_H
#define STRATA_XPORT_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The handshake's protocol version: a peer of another version is refused at connect, with a
 * line naming both. It covers the cluster messages carried over the links too (cluster_proto.h):
 * 2 = batched decode (cp_load.batch_rows, dp_token.rows, ACT_BATCH rows). */
#define XPORT_VERSION 2
#define XPORT_HDR 24
#define XPORT_MAC 32
#define XPORT_DATA_TYPES 0x100 /* types >= this are data frames (MAC optional) */

enum xport_role { XPORT_ROLE_CONTROL = 1, XPORT_ROLE_DATA = 2, XPORT_ROLE_PROBE = 3 };
enum xport_kind { XPORT_TCP = 0, XPORT_SHM = 1 };
enum xport_pref { XPORT_PREF_AUTO = 0, XPORT_PREF_TCP = 1, XPORT_PREF_SHM = 2 };

/* The cluster key: raw bytes of the key string. */
typedef struct xport_key {
    uint8_t k[256];
    size_t n;
} xport_key;

/* Fills key from s (--cluster-key) or, when s is NULL, from env STRATA_CLUSTER_KEY.
 * ST_ERR_ARG if neither is set or the key is empty / longer than 255 bytes. */
int xport_key_init(xport_key *key, const char *s, st_err *err);

/* Largest ring an acceptor accepts (slots per direction; the memory is slots x max_payload). */
#define XPORT_MAX_BUFFERS 4096

typedef struct xport_opts {
    int n_buffers;         /* ring slots per direction (--xport-buffers, default 8; at most
                              XPORT_MAX_BUFFERS)                                              */
    int max_inflight;      /* committed frames waiting for the socket (default 256)          */
    size_t max_payload;    /* largest payload either side may send                           */
    int data_mac;          /* 1: data frames carry a MAC too (--data-mac)                    */
    int pref;              /* xport_pref: shm when both ends are on one host (AUTO), or forced */
    int role;              /* xport_role announced by the connector                          */
    uint64_t epoch;        /* the connector's configuration epoch (data links)               */
    const char *node_id;   /* this end's id (announced), may be NULL                         */
    int timeout_ms;        /* handshake timeout (default 3000)                                */
} xport_opts;

/* What the other end announced at handshake. */
typedef struct xport_peer {
    int role;
    uint64_t epoch;
    char node_id[40];
    char addr[64];         /* "ip:port" of the remote socket                                 */
} xport_peer;

typedef struct xport xport;

/* A received frame: payload borrowed from a receive slot until xport_release. */
typedef struct xport_msg {
    uint16_t type;
    uint32_t len;
    uint8_t *data;
} xport_msg;

/* Opens a TCP listener on "host:port" (port 0 = any; *port_out gets the bound port). */
int xport_listen(int *fd_out, const char *hostport, int *port_out, st_err *err);

/* Connects to "host:port" and runs the client side of the handshake. On success *out is a
 * ready link. Refusals (version, key) come back as ST_ERR_NET with the reason in err and are
 * logged. */
int xport_connect(xport **out, const char *hostport, const xport_key *key, const xport_opts *o, st_err *err);

/* Accepts one connection from listen_fd (blocking) and runs the server side of the
 * handshake under o->timeout_ms. Garbage, truncated hellos, wrong keys and version
 * mismatches fail with ST_ERR_NET / ST_ERR_FORMAT (logged); the listener stays usable.
 * Sizes come from the connector's hello (max_payload capped by o->max_payload). */
int xport_accept(xport **out, int listen_fd, const xport_key *key, const xport_opts *o, st_err *err);

/* Payload area of the next send slot (len <= max_payload), or NULL (too large, the link is
 * broken, or x is NULL: a lost peer's link). Blocks while every slot is waiting for the socket. */
void *xport_send_buf(xport *x, size_t len);

/* Commits the slot from xport_send_buf as one frame of `type` and `len` bytes. Control types
 * always get a MAC. Returns 0 or ST_ERR_NET. */
int xport_send(xport *x, uint16_t type, size_t len, st_err *err);

/* xport_send_buf + memcpy + xport_send. */
int xport_send_copy(xport *x, uint16_t type, const void *data, size_t len, st_err *err);

/* Non-blocking: 1 and *m filled when a complete, verified frame is ready; 0 when none yet;
 * < 0 when the link is closed or broken (err says why). The caller must xport_release the
 * frame before the next xport_recv. */
int xport_recv(xport *x, xport_msg *m, st_err *err);
void xport_release(xport *x);

/* Waits up to timeout_ms until one of xs (NULL entries skipped) may have a frame or an event,
 * or one of extra_fds is readable. Returns the number of ready things (0 on timeout). */
int xport_wait(xport **xs, int n, const int *extra_fds, int n_extra, int timeout_ms);

/* Pushes queued frames to the socket without blocking (call from event loops). */
void xport_flush(xport *x);

void xport_close(xport *x);

/* Why the link broke ("" while it works). */
const char *xport_error(const xport *x);

/* The link's TCP socket (tests inject raw bytes through it). */
int xport_fd(const xport *x);

int xport_kind_of(const xport *x);
const char *xport_kind_name(const xport *x);
const xport_peer *xport_get_peer(const xport *x);
size_t xport_max_payload(const xport *x);

/* Data bytes and frames sent / received, and ns spent computing MACs, since the link opened. */
void xport_counters(const xport *x, uint64_t *tx_bytes, uint64_t *rx_bytes, uint64_t *mac_ns);

/* This host's id (boot id + mount namespace): two nodes with equal ids can share memory. */
void xport_host_id(char *buf, size_t cap);

/* CRC-32C of buf. */
uint32_t xport_crc32c(const void *buf, size_t n);

/* HMAC-SHA256 of (a | b | c) under key; 0 or ST_ERR_UNSUPPORTED without libcrypto. */
int xport_hmac(const uint8_t *key, size_t nkey, const void *a, size_t na, const void *b, size_t nb, const void *c,
               size_t nc, uint8_t out[32]);

#ifdef __cplusplus
}
#endif
#endif
