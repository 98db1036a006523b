/* strata/cluster.h — the cluster runtime: node daemon and coordinator.
 *
 * A node (`strata node`) listens for authenticated links (xport.h) and, with --beacon, announces
 * itself by signed UDP broadcast (beacon.c; coordinators find it with --discover). A
 * coordinator connects to every node (control links), asks for device info (memory, measured
 * read bandwidth and decode matvec rate), has every pair of nodes measure their link (latency:
 * median RTT / 2 of 20 pings; bandwidth: a 4 MiB transfer each way, linkprobe.c), and asks the
 * placement solver (plan.h) for stages: contiguous layer ranges in the solver's order, for its
 * context, slots and prefill chunk (coord_plan.c; `--split even` / n_stages keep the old even
 * split by layers). It sends each node a LOAD: it binds only its
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
 * After the loads the coordinator compares what each node reports (weights, KV cache, rss)
 * with its planned budget (coord_get_plan). The coordinator pings every node (heartbeat_ms);
 * a node whose link closes or that stays silent for dead_ms is declared lost: the coordinator
 * re-plans on the remaining nodes (with the links measured at start),
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
    int bw_probe_mb;          /* buffer for the bandwidth and matvec measurements (0 = 64 MiB,
                               * <0 = skip both; calib.c)                                        */
    const char *device;       /* "cpu" (NULL) or "cuda[:N]": where this node runs its stage      */
    int sync_host;            /* GPU stage: 1 = wait with cudaStreamSynchronize, blocking the
                                 loop (the baseline); 0 = the stream raises a mapped flag that
                                 the loop polls while it keeps serving links (default)           */
    int beacon_port;          /* > 0: announce this node by UDP broadcast on that port (beacon.c) */
    int beacon_ms;            /* beacon period (default 1000)                                    */
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
    int nccl;                 /* --xport nccl: hidden states between two GPU stages over NCCL
                               * (bootstrapped over the data link; xport_pref elsewhere and as
                               * the fallback; src/cluster/ncclink.h)                             */
    int n_buffers;            /* --xport-buffers (default 8)                                     */
    int max_inflight;         /* --xport-max-inflight (default 256)                              */
    int data_mac;             /* --data-mac                                                      */
    int want_logits;          /* last stage ships each sampled step's logits to the coordinator */
    int exact;                /* nodes use float32 reference kernels                             */
    int heartbeat_ms;         /* default 200                                                      */
    int dead_ms;              /* default 1500                                                     */
    int stall_ms;             /* no token for this long: reload + replay (default 10000)          */
    /* placement (coord_plan.c) */
    int split;                /* COORD_SPLIT_PLAN (default; even when n_stages > 0) or _EVEN    */
    int objective;            /* 0 latency (default), 1 throughput                               */
    double reserve;           /* fraction of each node's memory held back (default 0.05)         */
    int probe_pings;          /* link probe: pings per pair (default 20)                         */
    uint64_t probe_bytes;     /* link probe: bytes per direction (default 4 MiB)                 */
    int calib_mb;             /* > 0: nodes re-measure their decode matvec rate on this many MiB
                               * before planning (default 0: the figure each measured at start) */
} coord_opts;

enum { COORD_SPLIT_PLAN = 0, COORD_SPLIT_EVEN = 1 };

/* The placement in use: the solver's predictions, and each stage's planned budget against
 * what its node reported after loading (weights, KV cache, resident memory). */
typedef struct coord_plan_info {
    int planned;              /* 1: placed by the solver; 0: even split (no figures below)       */
    int n_stages;
    double predicted_tok_s;   /* one stream, empty context                                       */
    double predicted_aggregate_tok_s; /* with the planned slots                                  */
    double predicted_token_ms;
    double predicted_stage_ms[CLUSTER_MAX_STAGES];
    double predicted_hop_ms[CLUSTER_MAX_STAGES];  /* stage i -> i+1; last: token id to stage 0   */
    uint64_t budget_weights[CLUSTER_MAX_STAGES];  /* weights + embedding + output lines          */
    uint64_t budget_kv[CLUSTER_MAX_STAGES];
    uint64_t budget_total[CLUSTER_MAX_STAGES];    /* every line: what the node may hold in all   */
    uint64_t actual_weights[CLUSTER_MAX_STAGES], actual_kv[CLUSTER_MAX_STAGES], actual_rss[CLUSTER_MAX_STAGES];
    int budget_checked;       /* stages compared after loading                                   */
    int n_over_budget;        /* of which over their budget (warned)                              */
} coord_plan_info;

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
    double rows_per_step;     /* mean sequences per decode step (stage 0 batches them; 1 = one)   */
    double recovery_s;        /* time from loss detection to continuing                            */
    char data_link[8];        /* "tcp", "shm" or "nccl" (stage 0's link to stage 1)               */
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

/* ------------------------------------------------------------------------------------------ */
/* asynchronous generation (continuous batching over the pipeline)                            */
/*
 * One owner thread calls coord_submit, coord_cancel and coord_poll (the coordinator is not
 * locked); any thread may call coord_wake. Submitted sequences wait in a FIFO until a KV slot
 * is free, then START on stage 0 while other slots keep decoding. coord_poll pumps the control
 * links once and reports what happened through the callback, on the owner thread:
 *
 *   COORD_EV_TOKEN   one generated id (in order per sequence)
 *   COORD_EV_DONE    the sequence ended on the last stage (EOS id, max_tokens, context full)
 *                    or failed (finish COORD_FINISH_ERROR, msg says why); its id is then gone
 *
 * coord_cancel forgets a sequence at once and frees its slot: the next START into that slot
 * supersedes it on every stage (stage 0 drops tokens of the old sequence id). A slot that no
 * waiting sequence takes gets a one-token "tombstone" START so the old chain stops burning
 * compute. Node loss and stalls are handled inside coord_poll exactly as for
 * coord_generate_many: re-plan, reload, replay prompt + generated ids of every active sequence.
 */

typedef struct coord_seq_req {
    const int32_t *prompt;    /* copied by coord_submit                                          */
    int n_prompt;
    smp_params params;        /* temperature 0 = greedy; logit_bias is not carried (ST_ERR_ARG) */
    int max_tokens;           /* >= 1; the stage also stops when the context is full            */
    const int32_t *eos;       /* stop ids (NULL: the model's eos ids); at most 8 are used        */
    int n_eos;                /* -1: the model's; 0: none                                         */
} coord_seq_req;

enum coord_event_kind { COORD_EV_TOKEN = 1, COORD_EV_DONE = 2 };
enum coord_finish { COORD_FINISH_EOS = 1, COORD_FINISH_LENGTH = 2, COORD_FINISH_ERROR = 3 };

typedef struct coord_event {
    int kind;                 /* COORD_EV_*                                                       */
    uint64_t id;              /* coord_submit's id                                                */
    int32_t token;            /* TOKEN: the id                                                    */
    const float *logits;      /* TOKEN: n_vocab floats with want_logits, else NULL (borrowed)    */
    int last;                 /* TOKEN: the sequence ends with this id (a DONE event follows)    */
    int finish;               /* DONE: COORD_FINISH_*                                             */
    const char *msg;          /* DONE with COORD_FINISH_ERROR: why (borrowed)                     */
} coord_event;

typedef void (*coord_event_fn)(void *ud, const coord_event *ev);

/* Queues one sequence; *id names it in events and coord_cancel. Copies the prompt. Returns
 * ST_ERR_ARG (empty prompt, max_tokens < 1, prompt >= context, logit_bias, bad sampling
 * parameters), ST_ERR_NET (no live stage), ST_ERR_NOMEM. Owner thread only. */
int coord_submit(coord *c, const coord_seq_req *r, uint64_t *id, st_err *err);

/* Drops sequence id (queued or running) and frees its slot for the next submission; no event
 * follows for it. Returns 0, or ST_ERR_ARG if id is unknown (already done). Owner thread only. */
int coord_cancel(coord *c, uint64_t id);

/* Waits up to timeout_ms for traffic (returns early on coord_wake), handles it, recovers from
 * node loss, and calls fn for every event. Returns 0, or the error of a failed recovery (every
 * sequence then got a DONE/ERROR event). Owner thread only. */
int coord_poll(coord *c, int timeout_ms, coord_event_fn fn, void *ud, st_err *err);

/* Makes a coord_poll that is waiting return now. Any thread; async-signal-safe. */
void coord_wake(coord *c);

/* Sequences running in slots / waiting for one. */
int coord_n_active(const coord *c);
int coord_n_queued(const coord *c);

/* Cumulative timings since coord_init (decode steps only), for /metrics. */
typedef struct coord_totals {
    uint64_t n_tokens, n_decode_steps, n_recoveries;
    double compute_s[CLUSTER_MAX_STAGES];     /* summed over decode steps, per stage (a batched
                                               * step once, not once per sequence in it)        */
    double hop_s[CLUSTER_MAX_STAGES];         /* per hop i -> i+1 (last -> 0 at n_stages - 1)    */
    uint64_t n_hop[CLUSTER_MAX_STAGES];
    double recovery_s;
} coord_totals;
void coord_get_totals(const coord *c, coord_totals *t);

/* What runs where, for GET /v1/cluster. */
typedef struct coord_stage_info {
    char addr[64], node_id[40], host[64];
    int cores;
    uint64_t mem_total, mem_free;
    int layer_begin, layer_end, with_embed, with_output;
    uint64_t weight_bytes, kv_bytes, rss_bytes;
    char next_kind[8];        /* data link to the next stage: "tcp", "shm", "nccl" or ""       */
} coord_stage_info;
typedef struct coord_info {
    int n_stages, n_layer, n_slots, max_ctx, n_peers, n_alive;
    uint64_t epoch;           /* placements so far (1 + reloads)                                  */
    coord_stage_info stage[CLUSTER_MAX_STAGES];
} coord_info;
void coord_get_info(const coord *c, coord_info *out);

/* The loaded model's vocabulary and layer count, the current stage count. */
int coord_n_vocab(const coord *c);
int coord_n_stages(const coord *c);

/* The current placement's predictions and budget checks (see coord_plan_info). */
void coord_get_plan(const coord *c, coord_plan_info *out);

/* ------------------------------------------------------------------------------------------ */
/* discovery: the opt-in LAN beacon (beacon.c)                                                */

/* Listens on UDP port PORT for SECONDS (spec "PORT[:SECONDS]", default 3 s) for beacons of
 * nodes started with --beacon PORT, keeps those signed with this cluster key (others are
 * logged once per source and ignored) and writes their addresses, sorted, as "A:P,B:P" into
 * peers[cap]; *n_found (may be NULL) gets the count. ST_ERR_NET when none answered. */
int beacon_discover(const char *spec, const char *cluster_key, char *peers, size_t cap, int *n_found, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* surveying a live cluster (`strata plan --peers`)                                           */

struct plan_cluster;

typedef struct coord_survey_opts {
    const char *peers;        /* "A:P,B:P,..."                                                   */
    const char *cluster_key;  /* NULL: env STRATA_CLUSTER_KEY                                     */
    int xport_pref;           /* the transport data links would use (probes use the same)        */
    int probe_pings;          /* 0 = 20                                                           */
    uint64_t probe_bytes;     /* 0 = 4 MiB per direction                                          */
    /* what sizes the runtime overhead line, as the coordinator would run the model:           */
    int max_batch, n_embd, n_vocab, max_ctx;
    int q_bits;               /* the model's quantization: which measured matvec rate to plan with */
    int calib_mb;             /* > 0: nodes re-measure their matvec rate first (see coord_opts)    */
} coord_survey_opts;

/* Connects to every node, asks for its devices, has each pair of nodes probe their link and
 * fills *out (plan.h; plan_cluster_free it) exactly as the coordinator plans on a live
 * cluster: one "cpu" device per node named by its address (docs/cluster-json.md, "Live
 * clusters"). Errors name the node. */
int coord_survey(struct plan_cluster *out, const coord_survey_opts *so, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
