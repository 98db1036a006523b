/* ncclink.h — NCCL data links between two GPU pipeline stages (private to src/cluster).
 *
 * With `--xport nccl` (cp_load.nccl) a GPU stage i whose next stage is not the last -> 0 token
 * hop offers its next stage a 2-rank NCCL communicator once the ordinary (tcp/shm) data link
 * is up, over that authenticated link:
 *
 *   i -> i+1   CP_NCCL_ID  {epoch, version, stage, n_embd, max_batch, ncclUniqueId}
 *   i+1 -> i   CP_NCCL_ACK {epoch, status 0 | ST_ERR_*, stage, msg}   (msg: why not)
 *
 * Both are control types, so they always carry a MAC (the data link's session key) whatever
 * --data-mac says. On an ACK of 0 both ends join the communicator (rank 0 = stage i, rank 1 =
 * stage i+1), each bounded by ncl_timeout_ms() * 3: past it, or on any refusal, stage i keeps
 * the host copy path with one warning naming the link. Stage i blocks in its LOAD for this
 * (the coordinator waits for LOADED anyway); stage i+1 joins from a helper thread so its loop
 * keeps serving links.
 *
 * Per step, a linked stage i enqueues its layers and then ncclSend of the output rows (device
 * buffer, T x n_embd fp32) on its stream, and sends the DP_ACT header at once with ACT_NCCL and
 * no payload; stage i+1 enqueues ncclRecv into its input rows, then its layers, on its stream.
 * NCCL operations therefore pair up in the order of the headers on the FIFO link. A step in
 * flight longer than ncl_timeout_ms() aborts the communicator (ncclCommAbort) and names the
 * stalled link; the stage falls back to the host copy path (the coordinator's stall timer
 * replays what was lost).
 *
 * The functions here are the host-side checks of those messages, unit-tested without a GPU. */
#ifndef STRATA_NCCLINK_H
#define STRATA_NCCLINK_H

#include "cluster_proto.h"

#include <stddef.h>
#include <stdint.h>

#define NCL_VERSION 1
#define NCL_ID_BYTES 128 /* ncclUniqueId (CUDA_NCCL_ID_BYTES) */

typedef struct cp_nccl_id {
    uint64_t epoch;
    int32_t version;          /* NCL_VERSION                                                  */
    int32_t stage;            /* the sender's stage (rank 0)                                  */
    int32_t n_embd, max_batch; /* must equal the receiver's: the payload is T x n_embd fp32   */
    uint8_t id[NCL_ID_BYTES];
} cp_nccl_id;

typedef struct cp_nccl_ack {
    uint64_t epoch;
    int32_t status;           /* 0: joining as rank 1; else ST_ERR_* and msg says why not     */
    int32_t stage;            /* the receiver's stage                                         */
    char msg[120];
} cp_nccl_ack;

/* What the receiving node knows about itself when a CP_NCCL_ID arrives. */
typedef struct ncl_self {
    int loaded;               /* a stage is loaded                                             */
    uint64_t epoch;           /* its epoch (not loaded: the last LOAD's, which failed; 0: none) */
    int stage, n_stages;
    int gpu;                  /* 1: the stage runs on a GPU                                    */
    int n_embd, max_batch;
} ncl_self;

enum { NCL_ACCEPT = 0, NCL_LATER = 1 }; /* ncl_check_id's non-error results */

/* Parses a CP_NCCL_ID payload (len bytes) into *out. ST_ERR_FORMAT with one line (wrong size,
 * version, fields out of range) on anything malformed. */
int ncl_parse_id(const void *p, size_t len, cp_nccl_id *out, st_err *err);

/* Whether the receiver described by self can join the link *m offers: NCL_ACCEPT; NCL_LATER
 * when m is for a newer epoch than the one loaded (the LOAD has not been handled yet: keep the
 * offer until it is); else (also when the LOAD of m's epoch failed) ST_ERR_UNSUPPORTED / ST_ERR_ARG / ST_ERR_NET with the reason to send
 * back (a CPU stage, stage 0, a stale epoch, another width). */
int ncl_check_id(const cp_nccl_id *m, const ncl_self *self, st_err *err);

/* Parses a CP_NCCL_ACK for `epoch` into *out (msg NUL-terminated). ST_ERR_FORMAT on a wrong
 * size or epoch; a well-formed refusal returns ST_OK with out->status != 0. */
int ncl_parse_ack(const void *p, size_t len, uint64_t epoch, cp_nccl_ack *out, st_err *err);

/* Checks a DP_ACT frame's payload length against its flags: returns 0 (T x n_embd floats
 * follow the header), 1 (ACT_NCCL: no payload, the rows come over the link's communicator), or
 * ST_ERR_FORMAT with one line (length does not match, ACT_NCCL on a link without a
 * communicator: nccl_ready == 0). h->T must already be range-checked. */
int ncl_act_payload(const dp_act *h, size_t len, int n_embd, int nccl_ready, st_err *err);

/* The step / join bound in ms: $STRATA_NCCL_TIMEOUT_MS (100 .. 600000), default 10000. */
int ncl_timeout_ms(void);

#endif
