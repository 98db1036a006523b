/* strata/serve.h — `strata serve`: an OpenAI-compatible HTTP API (libmicrohttpd) over a
 * continuous-batching scheduler.
 *
 * Layers, top to bottom:
 *
 *   http.c       libmicrohttpd daemon, one thread per connection; routes, auth, body limits,
 *                SSE streaming with a blocking reader, disconnect detection
 *   openai.c     request parsing/validation (names the bad field) and response/chunk JSON
 *   scheduler.c  one thread: a bounded FIFO queue, admission into free KV slots, chunked
 *                prefill, and decode steps that forward one row per active sequence in a single
 *                backend->forward call; sampling, stop strings and detokenisation per sequence
 *   metrics.c    Prometheus counters and histograms
 *   backend_local.c   a serve_backend over a local engine (one process, one model_ctx)
 *   backend_cluster.c a sequence-level serve_backend over the cluster coordinator
 *
 * Two kinds of backend sit under the same scheduler. A row-level backend (local) implements
 * forward(): the scheduler batches rows of different KV slots, gets logits back and samples on
 * the host. A sequence-level backend (cluster) implements seq_*: the scheduler submits whole
 * requests (prompt ids + sampling parameters), the pipeline's last stage samples, and only
 * token ids come back; detokenisation, stop strings, max_tokens, usage and disconnects stay
 * in the scheduler. Everything above the scheduler is shared.
 */
#ifndef STRATA_SERVE_H
#define STRATA_SERVE_H

#include "strata/base.h"
#include "strata/model.h"
#include "strata/sampler.h"
#include "strata/tok.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* backend: what the scheduler needs from a model (local engine or cluster coordinator)       */

#define SERVE_MAX_EOS 16

typedef struct serve_backend_info {
    char model_id[256];         /* the name clients use in "model"                          */
    int n_vocab;
    int max_ctx;                /* KV capacity per slot, tokens                              */
    int n_slots;                /* concurrent sequences (KV slots)                           */
    int max_batch;              /* rows per forward call the backend handles well            */
    int32_t eos[SERVE_MAX_EOS]; /* end-of-sequence ids                                       */
    int n_eos;
    int has_template;           /* chat completions need a chat template                     */
} serve_backend_info;

/* One whole request for a sequence-level backend. */
typedef struct serve_seq_req {
    const int32_t *prompt;      /* borrowed for the call                                     */
    int n_prompt;
    const smp_params *sampling; /* logit_bias is refused (ST_ERR_ARG)                         */
    int max_tokens;             /* >= 1 (the scheduler passes the context when unlimited)     */
    const int32_t *eos;         /* end-of-sequence ids the backend stops on                   */
    int n_eos;
} serve_seq_req;

/* A sequence-level event: token >= 0 is one generated id; done = 1 ends the sequence (after
 * its last token) and msg != NULL says it failed. */
typedef void (*serve_seq_fn)(void *ud, uint64_t id, int32_t token, int done, const char *msg);

typedef struct serve_backend serve_backend;
struct serve_backend {
    void *self;
    serve_backend_info info;
    /* Tokenizer for streaming detokenisation (borrowed, immutable, shared by all threads). */
    const tok_tokenizer *tok;
    /* Renders a chat (messages JSON array) with add_generation_prompt; *out malloc'ed.
     * Called from HTTP threads concurrently: must be thread-safe. */
    int (*render_chat)(serve_backend *b, const json_t *messages, const json_t *extra, char **out, st_err *err);
    /* Tokenises text (thread-safe); *ids malloc'ed. */
    int (*tokenize)(serve_backend *b, const char *text, int add_special, int32_t **ids, size_t *n, st_err *err);
    /* Forwards T rows (token, position, slot), as model_forward; only the scheduler thread
     * calls it. logits: [T, n_vocab] for LOGITS_ALL, [n_vocab] for LOGITS_LAST. */
    int (*forward)(serve_backend *b, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                   float *logits, logits_mode mode, st_err *err);
    /* Sequence-level backends set these four and leave forward NULL. Only the scheduler
     * thread calls submit/cancel/poll; wake may be called from any thread and makes a waiting
     * poll return early. submit queues r (*id names it in events; ST_ERR_ARG for what the
     * backend cannot do); cancel forgets a sequence at once (no further events); poll waits up
     * to timeout_ms and reports tokens and ends through fn (returns non-zero only for a
     * backend-wide failure, after a done event with msg for every sequence). */
    int (*seq_submit)(serve_backend *b, const serve_seq_req *r, uint64_t *id, st_err *err);
    void (*seq_cancel)(serve_backend *b, uint64_t id);
    int (*seq_poll)(serve_backend *b, int timeout_ms, serve_seq_fn fn, void *ud, st_err *err);
    void (*seq_wake)(serve_backend *b);
    /* GET /v1/cluster body: nodes, devices, links, plan, memory (new reference). */
    json_t *(*cluster_json)(serve_backend *b);
    /* Extra Prometheus lines (per-node / per-hop timings); appends to the malloc'ed *buf of
     * *len bytes in a *cap allocation (*buf may be NULL), reallocating as needed. The
     * dashboard shows strata_hop_seconds_sum{hop="..."} / strata_hop_seconds_count{hop="..."}
     * as per-hop latency. */
    void (*metrics_text)(serve_backend *b, char **buf, size_t *len, size_t *cap);
    void (*free)(serve_backend *b);
};

typedef struct serve_local_opts {
    const char *tokenizer_dir;  /* NULL: the model directory                                 */
    const char *synthetic;      /* "PRESET[:QUANT]" instead of a model directory              */
    const char *model_name;     /* NULL: the directory's base name / the preset               */
    int max_ctx, n_slots, n_threads, offline;
} serve_local_opts;

/* Opens a local engine for model_spec as a serve_backend. On failure *out is NULL. */
int serve_backend_local_open(serve_backend **out, const char *model_spec, const serve_local_opts *opts,
                             st_err *err);

typedef struct serve_cluster_opts {
    const char *peers;          /* "A:P,B:P,..." node addresses                               */
    const char *cluster_key;    /* NULL: env STRATA_CLUSTER_KEY                                */
    const char *model_name;     /* NULL: the directory's base name                             */
    int n_stages;               /* 0: as many as the nodes/layers allow                        */
    int xport_pref;             /* XPORT_PREF_AUTO / TCP / SHM for the data links               */
    int nccl;                   /* --xport nccl: NCCL between two GPU stages (coord_opts.nccl)   */
    int max_ctx, n_slots, n_threads, max_batch;
} serve_cluster_opts;

/* Connects to the nodes, plans and loads model_dir (the same path on every node) and returns
 * a sequence-level serve_backend; the tokenizer and chat template are read here from
 * model_dir, the weights only on the nodes. On failure *out is NULL. */
int serve_backend_cluster_open(serve_backend **out, const char *model_dir, const serve_cluster_opts *opts,
                               st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* server                                                                                     */

typedef struct serve_opts {
    const char *host;           /* "127.0.0.1" default                                       */
    int port;                   /* 0: an ephemeral port (serve_port tells which)              */
    int queue_max;              /* waiting requests beyond the slots (default 64)             */
    size_t max_body;            /* request body limit in bytes (default 1 MiB)                */
    const char *const *api_keys;/* accepted Bearer keys; n_api_keys == 0: no auth            */
    int n_api_keys;
    int64_t kv_budget;          /* total KV tokens admitted at once (0: slots * ctx)          */
    int test_faults;            /* honour the x-strata-fault request header (tests only)      */
} serve_opts;

typedef struct serve_server serve_server;

/* Starts the HTTP daemon (answers 503 "loading" until a backend is attached). */
int serve_start(serve_server **out, const serve_opts *opts, st_err *err);

/* The port the daemon listens on. */
int serve_port(const serve_server *s);

/* Attaches the backend (ownership passes to the server) and starts the scheduler thread. */
int serve_attach(serve_server *s, serve_backend *b, st_err *err);

/* Marks loading as failed: API requests get 503 with msg from now on. */
void serve_set_load_error(serve_server *s, const char *msg);

/* Stops the daemon, cancels every request, joins the threads and frees everything. */
void serve_stop(serve_server *s);

#ifdef __cplusplus
}
#endif
#endif
