/* cluster_proto.h — message payloads between coordinator and nodes (private to src/cluster).
 * Fixed-layout structs sent as frame payloads (xport.h); receivers check the length before
 * reading and clamp every index. Control types < XPORT_DATA_TYPES carry a MAC + sequence. */
#ifndef STRATA_CLUSTER_PROTO_H
#define STRATA_CLUSTER_PROTO_H

#include "strata/cluster.h"

#include <stdint.h>

enum {
    CP_INFO_REQ = 0x10, /* coord -> node: (empty)                                    */
    CP_INFO = 0x11,     /* node -> coord: cp_info                                    */
    CP_LOAD = 0x12,     /* coord -> node: cp_load                                    */
    CP_LOADED = 0x13,   /* node -> coord: cp_loaded                                  */
    CP_START = 0x14,    /* coord -> stage 0: cp_seq + int32 prompt[n_prompt]         */
    CP_TOKEN = 0x15,    /* last stage -> coord: dp_token (+ float logits[n_logits])  */
    CP_PING = 0x16,     /* coord -> node: u64 t                                      */
    CP_PONG = 0x17,     /* node -> coord: u64 t                                      */
    CP_ERROR = 0x18,    /* node -> coord: char msg[]                                 */
    CP_PROBE_REQ = 0x20, /* coord -> node: cp_probe_req (measure links to these peers) */
    CP_PROBE_RES = 0x21, /* node -> coord: cp_probe_res                                */
    /* NCCL data links (ncclink.h): control types (always MACed), sent on a DATA link */
    CP_NCCL_ID = 0x30,  /* stage i -> i+1: cp_nccl_id (bootstrap a 2-rank communicator) */
    CP_NCCL_ACK = 0x31, /* stage i+1 -> i: cp_nccl_ack (joining, or why not)          */
    DP_ACT = 0x100,     /* stage i -> i+1: dp_act + float hidden[T * n_embd]         */
    DP_TOKEN = 0x101,   /* last stage -> stage 0: dp_token                           */
    /* link probes (linkprobe.c), on a XPORT_ROLE_PROBE link from the measuring node */
    LP_PING = 0x120,    /* u64 t: echoed as LP_PONG                                   */
    LP_PONG = 0x121,
    LP_BULK = 0x122,    /* bytes to count (push: prober -> peer; pull: peer -> prober) */
    LP_END = 0x123,     /* push: end of the bulk bytes; the peer answers LP_ACK       */
    LP_ACK = 0x124,     /* u64 bytes received                                         */
    LP_PULL = 0x125,    /* lp_pull: the peer sends `bytes` in LP_BULK frames + LP_END */
};

typedef struct cp_info {
    char node_id[40];
    char host[64];
    uint64_t mem_total, mem_free, mem_limit;
    double bw_bytes_s;
    int32_t cores, threads;   /* threads: the node's compute threads (--threads, else cores) */
    uint64_t rss_bytes;       /* the node process's resident memory now (nothing loaded: its base) */
    double mv_bf16_bytes_s;   /* decode matvec rate with its threads, bf16 weights (calib.c; 0 = not measured) */
    double mv_q4_bytes_s;     /* the same for MLX 4-bit weights                                */
    /* the device this node runs its stages on (--device): "cpu", or "cuda" with the GPU's name,
     * memory (free at node start: a LOAD replaces this node's own stage first) and
     * device-to-device copy bandwidth (0 = not measured: --no-bw-probe) */
    char dev_kind[8];
    char dev_name[64];
    uint64_t dev_mem_total, dev_mem_free;
    double dev_bw_bytes_s;
} cp_info;

/* Link probes: node -> each listed peer, over an authenticated XPORT_ROLE_PROBE link. */
#define CP_PROBE_MAX CLUSTER_MAX_PEERS
typedef struct cp_probe_req {
    int32_t n_peers, pings;   /* pings per peer (median RTT / 2 is the latency)             */
    int32_t xport_pref;       /* the transport the data links would use                    */
    int32_t calib_mb;         /* > 0: first re-measure the decode matvec rate (calib.c) on this
                               * many MiB, now that the cluster is about to run              */
    uint64_t bytes;           /* bulk bytes per direction (bandwidth)                        */
    char addr[CP_PROBE_MAX][64];
} cp_probe_req;

typedef struct cp_probe_link {
    int32_t status;           /* 0 ok, else ST_ERR_* (msg says why)                          */
    char kind[8];             /* "tcp" / "shm"                                               */
    double latency_s;         /* one way: median RTT / 2                                     */
    double rtt_min_s;
    double bw_out;            /* bytes/s prober -> peer                                      */
    double bw_in;             /* bytes/s peer -> prober                                      */
    char msg[96];
} cp_probe_link;

typedef struct cp_probe_res {
    int32_t n_peers, pad;
    double mv_bf16_bytes_s, mv_q4_bytes_s; /* the node's matvec rates (re-measured with calib_mb) */
    cp_probe_link link[CP_PROBE_MAX];
} cp_probe_res;

typedef struct lp_pull {
    uint64_t bytes;
    uint32_t chunk, pad;
} lp_pull;

/* Epochs name a coordinator's placements: a random run id in the high 32 bits (coord_init), a
 * counter of its loads in the low 32. Order means something only within one run; a link or
 * offer of another run is from a newer coordinator (the older one's pipeline was replaced by
 * the LOADs that came since). Before run ids, a stale link of an earlier coordinator with a
 * higher counter displaced the new run's link and the new pipeline stalled until a reload. */
static inline int cp_epoch_same_run(uint64_t a, uint64_t b) { return (a >> 32) == (b >> 32); }
/* a link / offer of epoch `have` yields to one of epoch `got` */
static inline int cp_epoch_yields(uint64_t have, uint64_t got) { return !cp_epoch_same_run(have, got) || have <= got; }
#define CP_EPOCH_SEQ(e) ((unsigned long long)((e) & 0xffffffffu)) /* the counter, for logs */

typedef struct cp_load {
    uint64_t epoch;
    int32_t layer_begin, layer_end, with_embed, with_output;
    int32_t stage, n_stages, max_ctx, n_slots;
    int32_t max_batch, n_threads, n_buffers, max_inflight;
    int32_t data_mac, xport_pref, exact;
    int32_t nccl;             /* 1: hidden states to a next GPU stage over NCCL (ncclink.h)  */
    int32_t batch_rows;       /* stage 0 runs up to this many sequences' decode rows as one
                               * step (ACT_BATCH; <= 1: one sequence per step)                */
    int32_t pad;
    char model_dir[1024];
    char next_addr[64];
} cp_load;

typedef struct cp_loaded {
    uint64_t epoch;
    int32_t status, n_vocab, n_embd, pad;
    uint64_t weight_bytes, kv_bytes, rss_bytes;
    char next_kind[8];
    char msg[256];
} cp_loaded;

#define CP_MAX_EOS 8
typedef struct cp_seq {
    uint64_t epoch, seq_id;
    int32_t slot, n_prompt, max_tokens, n_eos;
    int32_t eos[CP_MAX_EOS];
    int32_t want_logits, top_k;
    float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    uint64_t seed;
} cp_seq;

/* ACT_NCCL: the T x n_embd floats are not in this frame: the sender's GPU sends them over the
 * link's NCCL communicator, one ncclSend per such header, in header order (ncclink.h).
 * ACT_BATCH: T decode rows of T different sequences, one row each and each wanting its next
 * token (with ACT_LAST): dp_row[T] follow the header, then the T x n_embd floats; the header's
 * seq_id, slot (-1) and pos0 are unused. Never with ACT_FIRST or ACT_NCCL. */
enum { ACT_FIRST = 1, ACT_LAST = 2, ACT_NCCL = 4, ACT_BATCH = 8 };

/* One row of an ACT_BATCH step: its sequence, slot and position. */
typedef struct dp_row {
    uint64_t seq_id;
    int32_t slot, pos;
} dp_row;

#define CP_BATCH_MAX 64 /* rows of an ACT_BATCH step (the last stage keeps [rows, n_vocab] logits) */

typedef struct dp_act {
    uint64_t epoch, seq_id;
    int32_t slot, pos0, T, flags;
    uint64_t t_sent;
    uint64_t compute_ns[CLUSTER_MAX_STAGES];
    uint64_t hop_ns[CLUSTER_MAX_STAGES];
    cp_seq params; /* meaningful with ACT_FIRST */
} dp_act;

typedef struct dp_token {
    uint64_t epoch, seq_id;
    int32_t slot, pos, token, done;
    uint64_t t_sent;
    uint64_t compute_ns[CLUSTER_MAX_STAGES];
    uint64_t hop_ns[CLUSTER_MAX_STAGES];
    int32_t n_logits, prefill;
    int32_t rows, pad;       /* sequences in the decode step that produced it (ACT_BATCH: T, else 1) */
} dp_token;

#endif
