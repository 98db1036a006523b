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
    DP_ACT = 0x100,     /* stage i -> i+1: dp_act + float hidden[T * n_embd]         */
    DP_TOKEN = 0x101,   /* last stage -> stage 0: dp_token                           */
};

typedef struct cp_info {
    char node_id[40];
    char host[64];
    uint64_t mem_total, mem_free, mem_limit;
    double bw_bytes_s;
    int32_t cores, pad;
} cp_info;

typedef struct cp_load {
    uint64_t epoch;
    int32_t layer_begin, layer_end, with_embed, with_output;
    int32_t stage, n_stages, max_ctx, n_slots;
    int32_t max_batch, n_threads, n_buffers, max_inflight;
    int32_t data_mac, xport_pref, exact, pad;
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

enum { ACT_FIRST = 1, ACT_LAST = 2 };

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
} dp_token;

#endif
