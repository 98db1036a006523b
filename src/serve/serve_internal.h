/* serve_internal.h — shared declarations of src/serve/ (openai.c, scheduler.c, metrics.c,
 * http.c). Not installed; see strata/serve.h for the architecture. */
#ifndef STRATA_SERVE_INTERNAL_H
#define STRATA_SERVE_INTERNAL_H

#include "strata/sampler.h"
#include "strata/serve.h"

#include <pthread.h>
#include <stdatomic.h>

/* ------------------------------------------------------------------------------------------ */
/* growable byte buffer                                                                       */

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

int sbuf_put(sbuf *b, const char *s, size_t n);        /* 0, or -1 on allocation failure */
int sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sbuf_free(sbuf *b);

/* ------------------------------------------------------------------------------------------ */
/* openai.c: requests and responses                                                           */

enum oai_kind { OAI_CHAT = 0, OAI_COMPLETION = 1 };

#define OAI_MAX_STOP 16
#define OAI_MAX_TOP_LOGPROBS 20

/* An API error: HTTP status + OpenAI's error object fields. */
typedef struct oai_error {
    int status;            /* 400, 401, 404, 413, 429, 500, 503 ...                         */
    char type[40];         /* "invalid_request_error", "authentication_error", ...           */
    char param[64];        /* offending field ("" = null)                                    */
    char code[48];         /* "" = null                                                      */
    char message[512];
} oai_error;

/* Fills e and returns status. */
int oai_error_set(oai_error *e, int status, const char *type, const char *param, const char *code, const char *fmt,
                  ...) __attribute__((format(printf, 6, 7)));

/* {"error":{"message","type","param","code"}} as a malloc'ed compact JSON string. */
char *oai_error_json(const oai_error *e);

/* A parsed, validated request. Strings and arrays are owned; free with oai_request_free. */
typedef struct oai_request {
    int kind;                  /* OAI_CHAT / OAI_COMPLETION                                  */
    char *model;               /* NULL when absent                                           */
    json_t *messages;          /* chat: normalised messages (content as strings)             */
    json_t *template_kwargs;   /* chat_template_kwargs or NULL                               */
    char *prompt;              /* completion: the prompt text (NULL if given as token ids)   */
    int32_t *prompt_ids;       /* completion: prompt given as token ids                      */
    size_t n_prompt_ids;
    int stream;
    int include_usage;         /* stream_options.include_usage                               */
    int max_tokens;            /* 0: until EOS or the context is full                        */
    smp_params sampling;       /* logit_bias points into bias                                */
    smp_bias *bias;
    char *stop[OAI_MAX_STOP];
    int n_stop;
    int logprobs;              /* 1: report logprobs                                         */
    int top_logprobs;          /* alternatives per token (0..20)                             */
    int seed_given;
} oai_request;

/* Parses and validates body (kind: OAI_CHAT or OAI_COMPLETION). Returns 0, or the HTTP
 * status (400) with e naming the field. n_vocab (> 0) bounds logit_bias ids and token ids. */
int oai_request_parse(oai_request *r, int kind, const char *body, size_t len, int32_t n_vocab, oai_error *e);
void oai_request_free(oai_request *r);

/* Timing and usage of a finished request. */
typedef struct oai_usage {
    int prompt_tokens, cached_tokens, completion_tokens;
    double queue_s, prefill_s, decode_s, ttft_s;
} oai_usage;

json_t *oai_usage_json(const oai_usage *u);
json_t *oai_timings_json(const oai_usage *u);

/* Chunk and response builders (new references). id/model/created identify the completion;
 * logprobs may be NULL (absent) and is borrowed (the builder takes its own reference). */
json_t *oai_chunk_json(int kind, const char *id, const char *model, int64_t created, const char *text, size_t len,
                       int first, const char *finish, json_t *logprobs);
json_t *oai_response_json(int kind, const char *id, const char *model, int64_t created, const char *text, size_t len,
                          const char *finish, json_t *logprobs, const oai_usage *u);

/* Converts chat-style logprobs content entries ([{token, logprob, bytes, top_logprobs}]) into
 * the legacy completions shape ({tokens, token_logprobs, top_logprobs, text_offset}). */
json_t *oai_logprobs_legacy(const json_t *content, size_t text_offset0);

/* "data: <json>\n\n" appended to b; 0 or -1 (allocation). */
int oai_sse_event(sbuf *b, const json_t *obj);

/* Escapes s[0..n) as a JSON string body (no quotes) into b: ", \, control chars; invalid
 * UTF-8 bytes become U+FFFD. 0 or -1. */
int oai_json_escape(sbuf *b, const char *s, size_t n);

/* ------------------------------------------------------------------------------------------ */
/* metrics.c                                                                                  */

#define MET_MAX_BUCKETS 16

/* endpoints for strata_requests_total{endpoint=...} */
enum met_endpoint { MET_EP_CHAT, MET_EP_COMPLETIONS, MET_EP_MODELS, MET_EP_CLUSTER, MET_EP_METRICS, MET_EP_HEALTH,
                    MET_EP_DASHBOARD, MET_EP_OTHER, MET_N_ENDPOINTS };

typedef struct met_hist {
    int n;                         /* buckets                                                */
    double le[MET_MAX_BUCKETS];    /* upper bounds                                           */
    uint64_t count[MET_MAX_BUCKETS + 1]; /* per bucket (non-cumulative) + +Inf              */
    double sum;
    uint64_t total;
} met_hist;

typedef struct serve_metrics {
    pthread_mutex_t mu;
    uint64_t by_status[MET_N_ENDPOINTS][600]; /* responses by endpoint and HTTP status       */
    uint64_t prompt_tokens, cached_tokens, completion_tokens;
    uint64_t cancelled, decode_steps, decode_rows, prefill_chunks;
    double forward_s;
    met_hist ttft, itl, e2e, queue;
    double t_start;
} serve_metrics;

void metrics_init(serve_metrics *m);
void metrics_destroy(serve_metrics *m);
void metrics_count_status(serve_metrics *m, int endpoint, int status);
void metrics_observe(serve_metrics *m, met_hist *h, double v);
void met_hist_observe(met_hist *h, double v);
/* Prometheus text exposition of everything, plus the gauges passed in. */
typedef struct serve_gauges {
    int slots_used, slots_total, queue_depth, queue_max, loading;
    int64_t kv_tokens_used, kv_tokens_total;
} serve_gauges;
int metrics_render(serve_metrics *m, const serve_gauges *g, sbuf *out);

/* ------------------------------------------------------------------------------------------ */
/* scheduler.c                                                                                */

typedef struct sched sched;

enum sreq_state { SREQ_QUEUED = 0, SREQ_PREFILL, SREQ_DECODE, SREQ_DONE };

/* One generation request. Created by an HTTP thread, shared with the scheduler by reference
 * counting (sreq_release). Fields under "input" are set before sched_submit and then
 * read-only; "output" fields are guarded by mu. */
typedef struct sreq {
    /* input */
    int32_t *prompt;           /* owned                                                      */
    size_t n_prompt;
    int max_tokens;            /* 0: until the context is full                               */
    smp_params sampling;       /* logit_bias points into bias (owned)                        */
    smp_bias *bias;
    char *stop[OAI_MAX_STOP];  /* owned                                                      */
    int n_stop;
    int logprobs, top_logprobs;
    int fault;                 /* test hook: fail with an internal error                     */
    char id[48];               /* completion id, for logs                                    */
    /* output (mu) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    sbuf text;                 /* generated text not yet taken by the HTTP thread            */
    json_t *lp;                /* pending logprobs content entries (array) or NULL           */
    int done;
    const char *finish;        /* "stop", "length", "cancelled"                              */
    int err_status;            /* != 0: failed (HTTP status)                                 */
    char err_msg[256];
    oai_usage usage;
    /* shared */
    atomic_int cancelled;
    atomic_int refs;
    /* scheduler-private */
    int state, slot, n_past, n_gen;
    int32_t next;              /* token to forward next (decode)                             */
    uint64_t pf_iter;          /* scheduler iteration of the last prefill chunk              */
    double t_submit, t_admit, t_first, t_last;
    void *priv;                /* sampler, stop matcher, tok stream                          */
    uint64_t bseq;             /* sequence-level backend: the backend's id of this request   */
    struct sreq *qnext;
} sreq;

/* A new request with one reference; NULL on allocation failure. */
sreq *sreq_new(void);
void sreq_release(sreq *r);

/* Starts the scheduler thread over b (borrowed). queue_max bounds waiting requests. */
int sched_start(sched **out, serve_backend *b, int queue_max, int64_t kv_budget, serve_metrics *m, st_err *err);
/* Ends every request (503 "shutting down") and joins the thread; submissions fail from now
 * on, sched_cancel stays safe. */
void sched_halt(sched *s);
/* sched_halt, then frees s. */
void sched_stop(sched *s);

/* Queues r (the scheduler takes its own reference). Returns 0, ST_ERR_LIMIT when the queue is
 * full, ST_ERR_ARG when the prompt cannot fit the context (message in err). */
int sched_submit(sched *s, sreq *r, st_err *err);

/* Marks r cancelled (client gone); the scheduler drops it and frees its slot at its next step. */
void sched_cancel(sched *s, sreq *r);

void sched_gauges(sched *s, serve_gauges *g);

#endif
