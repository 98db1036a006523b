/* strata/cuda_comm.h — collectives between GPUs: an NCCL wrapper loaded at run time, a one-shot
 * all-reduce over CUDA peer access (NVLink) for the GPUs of one process, and the measurements
 * behind `strata comm-bench`.
 *
 * NCCL is never linked: cuda_nccl_load dlopens $STRATA_NCCL_LIB, else "libnccl.so.2", at first
 * use and resolves the few functions used here, so the binary starts on machines without NCCL
 * (CPU-only users, CI). It forces NCCL_NVLS_ENABLE=0 in the environment first: NVLink multicast
 * (NVLS) must stay off on the shared GPUs, and nothing here calls cuMulticastCreate.
 *
 * Every operation is enqueued on a caller's stream and returns without waiting, so it can be
 * captured into a CUDA graph (NCCL: one GPU per thread when capturing; NCCL's documentation
 * warns that graphs of several GPUs driven by one thread can deadlock).
 *
 * Compiled only with CUDA (src/backend/cuda/cuda_comm.cu); callers outside src/backend/cuda
 * guard their calls with STRATA_HAVE_CUDA. Built without nccl.h (looked up on the CUDA
 * toolkit's include path at build time), cuda_nccl_load fails with a line saying so and the
 * peer all-reduce still works.
 */
#ifndef STRATA_CUDA_COMM_H
#define STRATA_CUDA_COMM_H

#include "strata/base.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A cudaStream_t without the CUDA headers (cudaStream_t is `struct CUstream_st *`). */
typedef struct CUstream_st *cuda_comm_stream;

/* ------------------------------------------------------------------------------------------ */
/* NCCL                                                                                       */

#define CUDA_NCCL_ID_BYTES 128 /* ncclUniqueId */

typedef struct cuda_nccl_comm cuda_nccl_comm;

/* Loads NCCL once per process (later calls return the first result). ST_ERR_UNSUPPORTED with
 * one line when the library is absent, lacks a function, or strata was built without nccl.h.
 * Call it from one thread before using NCCL from several. */
int cuda_nccl_load(st_err *err);

/* NCCL's version code (e.g. 22809 for 2.28.9); 0 before a successful cuda_nccl_load. */
int cuda_nccl_version(void);

/* A fresh unique id for cuda_nccl_init_rank: rank 0 makes it and ships the bytes to the other
 * ranks over its own control channel. */
int cuda_nccl_get_id(uint8_t id[CUDA_NCCL_ID_BYTES], st_err *err);

/* One communicator per GPU of this process (ncclCommInitAll): comms[i] is rank i on
 * devices[i]. On failure no communicator is left allocated. Free each with cuda_nccl_free. */
int cuda_nccl_init_all(cuda_nccl_comm **comms, int n, const int *devices, st_err *err);

/* This process's rank of an n_ranks communicator on `device` (ncclCommInitRank); blocks until
 * every rank has joined. *out is NULL on failure. */
int cuda_nccl_init_rank(cuda_nccl_comm **out, const uint8_t id[CUDA_NCCL_ID_BYTES], int n_ranks, int rank,
                        int device, st_err *err);

/* Destroys the communicator (waits for its pending operations). NULL is a no-op. */
void cuda_nccl_free(cuda_nccl_comm *c);

/* ncclCommAbort: destroys the communicator without waiting; operations still pending on a
 * stream (a send or receive whose peer never came) return, leaving their buffers undefined.
 * Never blocks on the peer. NULL is a no-op. */
void cuda_nccl_abort(cuda_nccl_comm *c);

int cuda_nccl_rank(const cuda_nccl_comm *c);
int cuda_nccl_device(const cuda_nccl_comm *c);

/* ncclGroupStart / ncclGroupEnd: one thread driving several GPUs must bracket the operations of
 * all of them (e.g. a send on one and the matching receive on another). */
int cuda_nccl_group_begin(st_err *err);
int cuda_nccl_group_end(st_err *err);

/* Enqueued on st (a stream of the communicator's device); device pointers. out[n] = the sum of
 * every rank's in[n] (fp32; in == out is allowed). */
int cuda_nccl_allreduce_f32(cuda_nccl_comm *c, const float *in, float *out, size_t n, cuda_comm_stream st,
                            st_err *err);
/* buf[n] to / from rank `peer`; the peer posts the matching call. */
int cuda_nccl_send_f32(cuda_nccl_comm *c, const float *buf, size_t n, int peer, cuda_comm_stream st, st_err *err);
int cuda_nccl_recv_f32(cuda_nccl_comm *c, float *buf, size_t n, int peer, cuda_comm_stream st, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* one-shot peer all-reduce (the GPUs of one process, peer access between them)               */

#define CUDA_PEER_MAX_RANKS 8

typedef struct cuda_peer_group cuda_peer_group;

/* A group of the n GPUs devices[n] (rank i = devices[i]) for messages of up to max_floats
 * floats: enables peer access between every pair (it stays enabled after free: peer access is
 * process-wide and NCCL may rely on it), allocates on each GPU two receive slots per peer, a
 * flag per (peer, block) and the per-rank call counter. n = 1 is allowed (the sum of one).
 * Waits are bounded by $STRATA_PEER_TIMEOUT_MS (default 300 ms).
 * ST_ERR_UNSUPPORTED when a pair of GPUs cannot access each other, ST_ERR_NOMEM, ST_ERR_ARG. */
int cuda_peer_group_init(cuda_peer_group **out, int n, const int *devices, size_t max_floats, st_err *err);
void cuda_peer_group_free(cuda_peer_group *g);

int cuda_peer_group_size(const cuda_peer_group *g);
int cuda_peer_group_device(const cuda_peer_group *g, int rank);

/* Enqueues on st (a stream of rank's device) one kernel that pushes in[n] into every peer's
 * receive slot over NVLink, raises its flag on every peer, waits for every peer's flag and
 * writes out[n] = in_0 + in_1 + ... in rank order (bitwise the same on every rank; in == out is
 * allowed). Every rank calls it with the same n, each rank's calls in order on one stream.
 * Capturable into a CUDA graph and replayable: the epoch comes from a counter in device memory.
 * Returns ST_OK or ST_ERR_INTERNAL when the launch failed. A peer that does not arrive within
 * the timeout makes the kernel record an error and return (see cuda_peer_error). */
int cuda_peer_allreduce(cuda_peer_group *g, int rank, const float *in, float *out, size_t n, cuda_comm_stream st);

/* Reads and clears rank's error word (call after the rank's stream has been synchronised):
 * ST_OK, or ST_ERR_NET with "peer all-reduce: rank R waited > T ms for rank P (block B)". After
 * an error the group's ranks are out of step; later calls on that rank return at once without
 * touching memory until cuda_peer_group_reset. */
int cuda_peer_error(cuda_peer_group *g, int rank, st_err *err);

/* Synchronises every device of the group and zeroes every counter, flag and error word. */
int cuda_peer_group_reset(cuda_peer_group *g, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* measurements for `strata comm-bench` (src/backend/cuda/cuda_comm_bench.cu)                 */

enum { CUDA_COMM_SENDRECV = 0, CUDA_COMM_NCCL_ALLREDUCE = 1, CUDA_COMM_PEER_ALLREDUCE = 2, CUDA_COMM_N_KINDS = 3 };
enum { CUDA_COMM_PLAIN = 0, CUDA_COMM_GRAPH = 1 };
enum { CUDA_COMM_RAN = 0, CUDA_COMM_SKIPPED = 1, CUDA_COMM_FAILED = 2 }; /* cuda_comm_bench_row.status */

typedef struct cuda_comm_bench_opts {
    int n_gpus;       /* GPUs 0..n_gpus-1 of this process                                   */
    size_t max_bytes; /* largest message                                                   */
    int iters;        /* plain: operations timed (launch + synchronise each)               */
    int graph_ops;    /* operations captured in one graph; replays = max(3, iters/graph_ops) */
} cuda_comm_bench_opts;

typedef struct cuda_comm_bench_info {
    int n_gpus;
    char device[128];       /* name of GPU 0                                           */
    int nccl_version;       /* 0: NCCL not loaded (nccl_why says why)                   */
    char nccl_why[256];
    int peer_ok;            /* the peer group exists (peer_why says why not)            */
    char peer_why[256];
    int p2p_link[2];        /* cudaDevP2PAttrPerformanceRank / AccessSupported of 0 -> 1 */
} cuda_comm_bench_info;

/* One message size: us[kind][mode] microseconds per operation (send/recv: one way, i.e. half
 * a ping-pong round trip), < 0 when not run; status[kind][mode] is CUDA_COMM_RAN, _SKIPPED
 * (nothing to run it on: no NCCL, one GPU, no peer access) or _FAILED, why[kind][mode] says why;
 * bad[kind][mode] counts result elements that differ from the exact expected value (inputs are
 * small integers, so every sum is exact in fp32). */
typedef struct cuda_comm_bench_row {
    size_t bytes;
    double us[CUDA_COMM_N_KINDS][2];
    int status[CUDA_COMM_N_KINDS][2];
    long bad[CUDA_COMM_N_KINDS][2];
    char why[CUDA_COMM_N_KINDS][2][128];
} cuda_comm_bench_row;

typedef struct cuda_comm_bench cuda_comm_bench;

/* Sets up streams, buffers, the NCCL communicators (skipped with a reason when NCCL cannot be
 * loaded or n_gpus < 2 for send/recv) and the peer group (skipped with a reason when peer
 * access is impossible). Fails (ST_ERR_ARG / ST_ERR_UNSUPPORTED) only when the GPUs are not
 * there. */
int cuda_comm_bench_init(cuda_comm_bench **out, const cuda_comm_bench_opts *o, st_err *err);
void cuda_comm_bench_free(cuda_comm_bench *b);
void cuda_comm_bench_get_info(const cuda_comm_bench *b, cuda_comm_bench_info *info);

/* Measures every kind and mode at `bytes` (a multiple of 4, <= max_bytes). Failures of one
 * measurement are recorded in row->why and do not stop the others; returns ST_OK unless the
 * device is unusable. */
int cuda_comm_bench_run(cuda_comm_bench *b, size_t bytes, cuda_comm_bench_row *row, st_err *err);

/* The bounded wait, checked: rank 0 runs a peer all-reduce alone (no other rank calls). The
 * kernel must return by itself with a timeout error. *ms: how long the launch + synchronise
 * took; msg: the error line read back. Resets the group afterwards. ST_ERR_UNSUPPORTED without
 * a peer group of >= 2 GPUs; ST_ERR_INTERNAL when no error was reported. */
int cuda_comm_bench_timeout_check(cuda_comm_bench *b, double *ms, char *msg, size_t cap, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
