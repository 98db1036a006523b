/* linkprobe.h — measuring the links between nodes, and gathering a cluster's devices + links
 * (private to src/cluster; see linkprobe.c and coord_plan.c).
 *
 * A node told to probe a peer opens an authenticated XPORT_ROLE_PROBE link to it (the same
 * handshake and transport choice as a data link), sends `pings` small frames that the peer
 * echoes (latency = median RTT / 2), then pushes and pulls `bytes` in 256 KiB frames
 * (bandwidth each way = bytes / (transfer time - one RTT)). The peer answers from its main
 * loop (lp_serve), so the figures include what a data frame pays: framing, CRC, wake-up.
 */
#ifndef STRATA_LINKPROBE_H
#define STRATA_LINKPROBE_H

#include "cluster_proto.h"
#include "strata/plan.h"

#define LP_CHUNK (256u << 10)         /* bulk frame payload                                  */
#define LP_DEFAULT_PINGS 20
#define LP_DEFAULT_BYTES (4ull << 20) /* per direction                                      */

/* Prober side: measures the link to `addr` (see above) and fills *out (status 0, or the error
 * code with out->msg naming what failed). Blocks up to a few seconds per step. Returns
 * out->status. */
int lp_probe_peer(const char *addr, const xport_key *key, const char *node_id, int pref, int pings, uint64_t bytes,
                  cp_probe_link *out);

/* Peer side: answers one frame m received on a probe link x (echo, count, ack, send bulk).
 * *bulk is the link's byte counter (starts at 0; LP_END reports and resets it). Returns 0,
 * or < 0 when the link should be closed (bad frame, send failed). */
int lp_serve(xport *x, const xport_msg *m, uint64_t *bulk);

/* ------------------------------------------------------------------------------------------ */
/* what a coordinator (or `strata plan --peers`) learns about a live cluster                   */

typedef struct lp_survey {
    int n;                                            /* nodes                               */
    char addr[CLUSTER_MAX_PEERS][64];                 /* as the coordinator reaches them     */
    cp_info info[CLUSTER_MAX_PEERS];
    int probed;                                       /* 1: link[][] was measured            */
    cp_probe_link link[CLUSTER_MAX_PEERS][CLUSTER_MAX_PEERS]; /* [i][j]: i -> j               */
} lp_survey;

/* Asks every node i (control links xs[i], already answering) to probe the nodes j > i, one
 * node at a time (two nodes never probe each other at once), and fills sv->link both ways:
 * i -> j from i's push, j -> i from i's pull, latency from i's pings. With calib_mb > 0 each
 * node first re-measures its decode matvec rate (calib.c; sv->info is updated), also one at a
 * time, as a single stream's pipeline runs its stages. Logs the matrix. */
int lp_survey_links(lp_survey *sv, xport **xs, int pref, int pings, uint64_t bytes, int calib_mb, st_err *err);

/* Runtime assumptions that size a live node's "runtime" budget line besides its base RSS. */
typedef struct lp_runtime {
    int max_batch;            /* prefill chunk (data link frames)                               */
    int n_buffers;            /* transport ring slots per direction                             */
    size_t ctrl_payload;      /* the coordinator's control link frames                          */
    int n_embd;
    int q_bits;               /* the model's quantization (0: dense): picks the matvec rate     */
} lp_runtime;

/* The bandwidth the planner uses for node info: its measured decode matvec rate for the
 * model's weight format (rt->q_bits: 4-bit rate for quantized models, bf16 rate for dense
 * ones), else its plain read bandwidth, else default_bw. */
double lp_node_bandwidth(const cp_info *in, const lp_runtime *rt, double default_bw);

/* Runtime overhead the planner reserves on a GPU stage's device: the CUDA context, cuBLAS
 * workspace, activation scratch and graphs (the transport rings stay in host memory). */
#define LP_GPU_OVERHEAD (1024ull << 20)

/* Builds a plan_cluster from the survey's nodes `use[0..n_use)` (device k = node use[k]):
 * one device per node named by its address. A CPU node: kind "cpu", memory = its
 * --memory-limit, else its free memory; bandwidth = lp_node_bandwidth; overhead = its base RSS
 * + transport rings + 32 MiB. A node running its stages on a GPU (dev_kind "cuda"): kind "gpu"
 * named by the GPU, memory = its --memory-limit, else the GPU's free memory; bandwidth = its
 * measured copy bandwidth, else default_bw; overhead = LP_GPU_OVERHEAD. Links from the probe
 * matrix (1 us / 10 GB/s assumed between nodes that were not probed). */
int lp_survey_cluster(const lp_survey *sv, const int *use, int n_use, const lp_runtime *rt, double default_bw,
                      plan_cluster *c, st_err *err);

#endif
