/* strata/cluster.h — the cluster runtime: node daemon and coordinator.
 *
 * A node (`strata node`) listens for authenticated links (xport.h). A coordinator connects to
 * every node (control links), asks for device info, splits the model's layers into
 * contiguous stages (even split by layers), and sends each node a LOAD: it binds only its
 * layers (mmapped: only its tensors' pages are read), allocates its KV cache, connects a
 * data link to the next stage (the last stage to stage 0) and reports ready with its memory
 * use. Generation then runs without the coordinator on the data path:
 *
 *   coordinator --START(prompt, sampling)--> stage 0 --ACT(hidden)--> ... --> last stage
 *   last stage: norm + lm_head + sampling --TOKEN--> stage 0 (next step at once)
 *                                         --TOKEN--> coordinator (stream, stats)
 *
 * Several sequences (one KV slot each) may be in flight; each stage processes frames in
 * arrival order, so while stage 1 works on one sequence stage 0 works on another. Prompts are
 * prefilled in chunks of max_batch tokens, one chunk per sequence per loop turn.
 *
 * The coordinator pings every node (heartbeat_ms); a node whose link closes or that stays
 * silent for dead_ms is declared lost: the coordinator re-plans on the remaining nodes,
 * reloads them (new epoch: stale frames are dropped everywhere), rebuilds each unfinished
 * sequence's KV by replaying prompt + generated tokens, and continues. Greedy output is
 * unchanged; sampled output continues from a re-seeded sampler.
 */
#ifndef STRATA_CLUSTER_H
#define STRATA_CLUSTER_H

#include "strata/base.h"
#include "strata/sampler.h"
#include "strata/xport.h"

#include <signal.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CLUSTER_MAX_STAGES 8
#define CLUSTER_MAX_PEERS 16

/* ------------------------------------------------------------------------------------------ */
/* node                                                                                       */

typedef struct node_opts {
    const char *listen;       /* "host:port" (port 0: any; see port_file)                     */
    const char *port_file;    /* if set, the bound port is written there once listening         */
    const char *cluster_key;  /* NULL: env STRATA_CLUSTER_KEY                                   */
    const char *state_dir;    /* persistent node id lives here (NULL: an ephemeral id)          */
    uint64_t memory_limit;    /* bytes this node may use for weights + KV (0 = physical free)   */
    int xport_pref;           /* XPORT_PREF_TCP refuses shm on incoming links                   */
    int n_threads;            /* compute threads (0 = all cores)                                */
    int bw_probe_mb;          /* buffer for the bandwidth measurement (0 = 64 MiB, <0 = skip)   */
} node_opts;

/* Runs the node daemon until *stop becomes non-zero (signal handler) or a fatal error.
 * Bad input from peers is logged and dropped; it never ends the loop. */
int node_run(const node_opts *o, volatile sig_atomic_t *stop, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* coordinator                                                                                */

typedef struct coord_opts {
    const char *model_dir;    /* same path on every node                                       */
    const char *peers;        /* "A:P,B:P,..." node addresses                                  */
    const char *cluster_key;  /* NULL: env STRATA_CLUSTER_KEY                                   */
    int n_stages;             /* 0 = min(peers, layers)                                         */
    int max_ctx;              /* KV per slot (0 = min(max_pos, 4096))                            */
    int n_slots;              /* concurrent sequences (default 1)                                */
    int max_batch;            /* prefill chunk (default 64)                                      */
    int n_threads;            /* per node (0 = node's default)                                   */
    int xport_pref;           /* data links: XPORT_PREF_AUTO (shm on one host), TCP, SHM        */
    int n_buffers;            /* --xport-buffers (default 8)                                     */
    int max_inflight;         /* --xport-max-inflight (default 256)                              */
    int data_mac;             /* --data-mac                                                      */
    int want_logits;          /* last stage ships each sampled step's logits to the coordinator */
    int exact;                /* nodes use float32 reference kernels                             */
    int heartbeat_ms;         /* default 200                                                      */
    int dead_ms;              /* default 1500                                                     */
    int stall_ms;             /* no token for this long: reload + replay (default 10000)          */
} coord_opts;

typedef struct coord coord;

/* One sequence to generate. out_ids must hold max_tokens ids. */
typedef struct coord_seq {
    const int32_t *prompt;
    int n_prompt;
    smp_params params;        /* temperature 0 = greedy                                          */
    int max_tokens;
    const int32_t *eos;       /* stop ids (NULL: the model's eos ids)                            */
    int n_eos;                /* -1: the model's; 0: none                                         */
    int32_t *out_ids;
    int n_out;                /* filled                                                           */
    double t_first_s;         /* time to first token                                              */
} coord_seq;

/* Called for every generated token, in order per sequence. logits (n_vocab floats) only with
 * want_logits, else NULL. */
typedef void (*coord_token_fn)(void *ud, int seq_index, int32_t id, const float *logits, int n_vocab);

typedef struct coord_stats {
    int n_stages;
    int n_tokens;             /* generated, all sequences                                         */
    int n_recoveries;
    double wall_s;            /* first START to last token                                        */
    double tok_s;             /* aggregate tokens per second                                      */
    double decode_token_ms;   /* mean time between tokens of one sequence (decode steps)         */
    double stage_compute_ms[CLUSTER_MAX_STAGES]; /* mean compute per decode step per stage       */
    double hop_ms[CLUSTER_MAX_STAGES];           /* mean per hop: i -> i+1, last -> 0 (index n-1) */
    double orch_us_per_token; /* decode token time minus compute and hops (single sequence)      */
    double recovery_s;        /* time from loss detection to continuing                            */
    char data_link[8];        /* "tcp" or "shm" (as reported by stage 0)                          */
} coord_stats;

/* Connects, authenticates, queries devices, plans and loads. Logs the plan. */
int coord_init(coord **out, const coord_opts *o, st_err *err);
void coord_free(coord *c);

/* Generates n_seqs sequences concurrently (n_seqs <= n_slots). Survives node loss while at
 * least one node remains. stats may be NULL. */
int coord_generate_many(coord *c, coord_seq *seqs, int n_seqs, coord_token_fn cb, void *ud, coord_stats *stats,
                        st_err *err);

/* One sequence. out_ids holds max_tokens; *n_out receives the count. */
int coord_generate(coord *c, const int32_t *prompt, int n_prompt, const smp_params *params, int max_tokens,
                   const int32_t *eos, int n_eos, int32_t *out_ids, int *n_out, coord_token_fn cb, void *ud,
                   coord_stats *stats, st_err *err);

/* The loaded model's vocabulary and layer count, the current stage count. */
int coord_n_vocab(const coord *c);
int coord_n_stages(const coord *c);

#ifdef __cplusplus
}
#endif
#endif
