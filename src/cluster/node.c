/* node.c — the node daemon: identity, device report, LOAD, and the stage loop.
 *
 * Threads: an accept thread runs handshakes (so a node blocked connecting to its next stage
 * never stops others from connecting to it) and hands authenticated links to the main loop
 * through a queue + pipe. The main loop owns everything else: control links (coordinators),
 * the inbound data link (previous stage, or the last stage for stage 0), the outbound data
 * link, the model, its context and per-slot sequence state. */
#include "beacon.h"
#include "calib.h"
#include "cluster_proto.h"
#include "linkprobe.h"
#include "ncclink.h"
#include "strata/bench.h"
#include "strata/model.h"
#include "strata/pool.h"
#include "strata/gpu.h"
#include "strata/synth.h"
#include "strata/cuda_backend.h" /* declarations only; calls are under STRATA_HAVE_CUDA */
#include "strata/cuda_comm.h"    /* likewise */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

/* data messages one loop turn handles at most (and for at most this long) before it serves the
 * control links again: heartbeats must be answered well within the coordinator's dead_ms */
#define NODE_DATA_BURST 16
#define NODE_DATA_BURST_NS 50000000ull

#define NODE_MAX_CTRL 8
#define NODE_MAX_PROBE 4
#define NODE_QUEUE 16
#define NODE_CTRL_PAYLOAD (64u << 20)

typedef struct slot_state {
    int active;             /* stage 0: sequence present                                    */
    uint64_t seq_id;
    cp_seq params;
    int32_t *prompt;        /* [max_ctx] stage 0's prompt copy                              */
    int n_prompt, prefilled;
    int pending_local;      /* stage 0: next decode token queued (a single stage, or batching) */
    int32_t pend_tok, pend_pos;
    uint64_t hop_back_ns;   /* last -> stage 0 hop of the previous step                      */
    /* last stage */
    smp_sampler *smp;
    int n_gen;
} slot_state;

typedef struct node {
    const node_opts *o;
    xport_key key;
    char node_id[40];
    int listen_fd;
    int pipe_rd, pipe_wr;
    pthread_t acc_thread;
    pthread_t beacon_thread;
    char beacon_addr[80];   /* "HOST:PORT" announced by the beacon thread                  */
    volatile sig_atomic_t *stop;
    int acc_stop;
    pthread_mutex_t mu;
    xport *queue[NODE_QUEUE];
    int n_queue;
    /* links */
    xport *ctrl[NODE_MAX_CTRL];
    xport *coord;           /* the control link that sent the current LOAD                  */
    xport *data_in, *data_out;
    xport *probe[NODE_MAX_PROBE]; /* links other nodes measure (linkprobe.c)                */
    uint64_t probe_bulk[NODE_MAX_PROBE];
    /* device */
    cp_info info;
    /* loaded stage */
    cp_load load;
    int loaded;
    int rr_local;           /* stage 0: the slot the next turn's local work starts at          */
    model *m;
    model_ctx *ctx;
    slot_state *slots;
    int32_t *pos_buf, *slot_buf;
    dp_row *rows_buf;       /* [max_batch] an ACT_BATCH step's rows (stage 0 builds, others copy) */
    int32_t *tok_buf;       /* [max_batch] stage 0: the token ids of a batched decode step      */
    int rr_dec;             /* stage 0: the slot the next batched decode starts at              */
    /* stages > 0 with batch_rows > 1: decode rows of the messages drained in one loop turn,
     * merged into one step (act_rows / merge_flush): the queue of a slower stage is its batch */
    dp_act m_h;             /* the first merged message's header (its timing rides along)      */
    dp_row *m_rows;         /* [batch_rows]                                                     */
    float *m_hidden;        /* [batch_rows, D]                                                  */
    int m_n;
    uint64_t m_t_in;
    float *logits;          /* [rows, V]: rows = batch_rows on a batching last stage, else 1    */
    float *logits2;
    int D, V;
    /* GPU stage (--device cuda[:N]): the stage runs in gpu; one step at a time in flight,
     * described by gp (completed by gpu_complete when the stream's flag is up) */
    int cuda_dev;           /* -1: CPU stage                                                  */
    cuda_model *gpu;        /* the stage on the GPU, or NULL                                  */
    model_desc gdesc;       /* synthetic GPU stage: the preset's descriptor (n->m is NULL)    */
    int gdesc_set;
    struct {
        int active, kind, greedy;
        int io;             /* CUDA_STAGE_*_NCCL of the step in flight                        */
        dp_act h;
        uint64_t t0, t_in, t_last;
    } gp;
    int diag_every;         /* steps since the last STRATA_STAGE_DIAG line                    */
    int gpu_dead;           /* a stream did not finish even after its NCCL link was aborted   */
    /* NCCL data links (ncclink.h): nc_out = the hop to the next stage (rank 0), nc_in = the
     * hop from the previous one (rank 1), joined by a helper thread (join_in) */
    cuda_nccl_comm *nc_in, *nc_out;
    struct ncl_join *join_in;
    uint64_t join_in_deadline;
    cp_nccl_id ncl_offer;   /* an offer that came before its LOAD (ncl_offer_held)            */
    int ncl_offer_held;
    int ncl_timeout_ms;
    int ncl_test_skip, ncl_n_in; /* STRATA_TEST_NCCL_SKIP_RECV (see on_act); headers on NCCL seen */
    /* a linked sender's figures of its last finished decode step, reported in the next header
     * (its header leaves before the step runs): GPU time of the layers and of the send */
    uint64_t ncl_prev_compute_ns, ncl_prev_send_ns;
} node;

/* ------------------------------------------------------------------------------------------ */
/* identity and devices                                                                       */

static void random_hex(char *buf, int nbytes) {
    uint8_t r[32];
    if (getrandom(r, (size_t)nbytes, 0) != nbytes) memset(r, 0x5a, sizeof r);
    for (int i = 0; i < nbytes; i++) sprintf(buf + 2 * i, "%02x", r[i]);
}

/* Reads STATE_DIR/node_id or creates it; without a state dir the id is ephemeral. */
static int node_identity(node *n, st_err *err) {
    if (!n->o->state_dir) {
        random_hex(n->node_id, 8);
        ST_INFO("node id %s (ephemeral: no --state-dir)", n->node_id);
        return 0;
    }
    if (st_mkdir_p(n->o->state_dir, err)) return err->code;
    char *p = st_path_join(n->o->state_dir, "node_id");
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "path");
    char *txt = NULL;
    size_t len = 0;
    st_err e2 = {0};
    if (st_path_exists(p) && st_file_read(p, &txt, &len, &e2) == 0 && len >= 8) {
        txt[strcspn(txt, "\r\n")] = 0;
        snprintf(n->node_id, sizeof n->node_id, "%.32s", txt);
    } else {
        random_hex(n->node_id, 8);
        FILE *f = fopen(p, "w");
        if (!f) {
            free(p), free(txt);
            return st_err_set(err, ST_ERR_IO, "%s/node_id: cannot write", n->o->state_dir);
        }
        fprintf(f, "%s\n", n->node_id);
        fclose(f);
    }
    free(p), free(txt);
    return 0;
}

static uint64_t meminfo(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    uint64_t v = 0;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':') {
            v = strtoull(line + kl + 1, NULL, 10) * 1024;
            break;
        }
    fclose(f);
    return v;
}

static uint64_t rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long a = 0, b = 0;
    if (f) {
        if (fscanf(f, "%lu %lu", &a, &b) != 2) b = 0;
        fclose(f);
    }
    return (uint64_t)b * (uint64_t)sysconf(_SC_PAGESIZE);
}

static void node_devices(node *n) {
    cp_info *i = &n->info;
    snprintf(i->node_id, sizeof i->node_id, "%s", n->node_id);
    if (gethostname(i->host, sizeof i->host)) strcpy(i->host, "?");
    i->mem_total = meminfo("MemTotal");
    i->mem_free = meminfo("MemAvailable");
    i->mem_limit = n->o->memory_limit;
    i->cores = st_cpu_count();
    i->threads = n->o->n_threads > 0 ? n->o->n_threads : i->cores;
    i->rss_bytes = rss_bytes();
    if (n->o->bw_probe_mb >= 0) {
        size_t mb = n->o->bw_probe_mb ? (size_t)n->o->bw_probe_mb : 64;
        st_pool *p = st_pool_init(n->o->n_threads > 0 ? n->o->n_threads : i->cores);
        if (p) {
            i->bw_bytes_s = bench_measure_bandwidth(p, mb << 20, 3);
            st_pool_free(p);
        }
        calib_result cr;
        if (calib_matvec(i->threads, mb << 20, 5, &cr) == 0)
            i->mv_bf16_bytes_s = cr.bf16_bytes_s, i->mv_q4_bytes_s = cr.q4_bytes_s;
    }
    char a[32], b[32];
    ST_INFO("node %s: %d cores, memory %s total / %s free, read bandwidth %.1f GB/s, decode matvec %.1f GB/s bf16, "
            "%.1f GB/s 4-bit (%d threads)",
            n->node_id, i->cores, st_fmt_bytes((double)i->mem_total, a, sizeof a),
            st_fmt_bytes((double)i->mem_free, b, sizeof b), i->bw_bytes_s / 1e9, i->mv_bf16_bytes_s / 1e9,
            i->mv_q4_bytes_s / 1e9, i->threads);
    snprintf(i->dev_kind, sizeof i->dev_kind, "cpu");
#ifdef STRATA_HAVE_CUDA
    size_t tot = 0, fr = 0;
    if (n->cuda_dev >= 0 && st_gpu_describe(n->cuda_dev, i->dev_name, sizeof i->dev_name, &tot, &fr) == 0 && tot > 0) {
        snprintf(i->dev_kind, sizeof i->dev_kind, "cuda");
        i->dev_mem_total = tot, i->dev_mem_free = fr;
        if (n->o->bw_probe_mb >= 0) i->dev_bw_bytes_s = cuda_measure_copy_bandwidth(n->cuda_dev, (size_t)256 << 20, 3);
        ST_INFO("node %s: stages on GPU %d (%s): memory %s total / %s free, copy bandwidth %.0f GB/s", n->node_id,
                n->cuda_dev, i->dev_name, st_fmt_bytes((double)tot, a, sizeof a), st_fmt_bytes((double)fr, b, sizeof b),
                i->dev_bw_bytes_s / 1e9);
    }
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* accept thread                                                                              */

static void *accept_main(void *arg) {
    node *n = arg;
    xport_opts ao = {.max_payload = NODE_CTRL_PAYLOAD, .pref = n->o->xport_pref, .node_id = n->node_id,
                     .timeout_ms = 2000};
    while (!n->acc_stop && !*n->stop) {
        struct pollfd p = {.fd = n->listen_fd, .events = POLLIN};
        if (poll(&p, 1, 200) <= 0) continue;
        xport *x = NULL;
        st_err err = {0};
        if (xport_accept(&x, n->listen_fd, &n->key, &ao, &err)) {
            ST_DEBUG("accept: %s", err.msg);
            continue;
        }
        pthread_mutex_lock(&n->mu);
        if (n->n_queue < NODE_QUEUE) {
            n->queue[n->n_queue++] = x;
            x = NULL;
        }
        pthread_mutex_unlock(&n->mu);
        if (x) {
            ST_WARN("dropping link from %s: too many pending", xport_get_peer(x)->addr);
            xport_close(x);
        } else {
            char c = 1;
            if (write(n->pipe_wr, &c, 1) < 0) ST_DEBUG("accept pipe: %s", strerror(errno));
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* beacon thread (--beacon PORT): one signed UDP announcement every beacon_ms                 */

/* The beacon thread: announces n->beacon_addr every beacon_ms until the node stops. A send
 * failure (no broadcast interface yet) is logged once and retried. */
static void *beacon_main(void *arg) {
    node *n = arg;
    st_err err = {0};
    int fd = beacon_socket(&err);
    if (fd < 0) {
        ST_ERROR("beacon disabled: %s", err.msg);
        return NULL;
    }
    int period = n->o->beacon_ms > 0 ? n->o->beacon_ms : 1000, warned = 0;
    while (!n->acc_stop && !*n->stop) {
        memset(&err, 0, sizeof err);
        if (beacon_announce(fd, n->o->beacon_port, &n->key, n->node_id, n->beacon_addr, &err) && !warned++)
            ST_WARN("%s (will keep trying)", err.msg);
        for (int t = 0; t < period && !n->acc_stop && !*n->stop; t += 50) usleep(50000);
    }
    close(fd);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* NCCL data links (ncclink.h)                                                                */

/* One rank joining a 2-rank communicator on a helper thread (ncclCommInitRank blocks until the
 * peer joins, without a timeout of its own). The node polls it; a join it gives up on is
 * abandoned: the thread then aborts whatever it gets and frees the struct itself. */
_Static_assert(NCL_ID_BYTES == CUDA_NCCL_ID_BYTES, "the offer carries an ncclUniqueId");

typedef struct ncl_join {
    uint8_t id[NCL_ID_BYTES];
    int rank, device;
    pthread_mutex_t mu;
    int done, abandoned, rc;
    st_err err;
    cuda_nccl_comm *comm;
} ncl_join;

#ifdef STRATA_HAVE_CUDA
static void *ncl_join_main(void *arg) {
    ncl_join *j = arg;
    st_err e = {0};
    cuda_nccl_comm *c = NULL;
    int rc = cuda_nccl_init_rank(&c, j->id, 2, j->rank, j->device, &e);
    pthread_mutex_lock(&j->mu);
    j->done = 1, j->rc = rc, j->err = e, j->comm = c;
    int abandoned = j->abandoned;
    pthread_mutex_unlock(&j->mu);
    if (abandoned) {
        cuda_nccl_abort(c);
        pthread_mutex_destroy(&j->mu);
        free(j);
    }
    return NULL;
}

/* Starts joining as `rank` on `device` (a detached thread). NULL with err on failure. */
static ncl_join *ncl_join_start(const uint8_t id[NCL_ID_BYTES], int rank, int device, st_err *err) {
    ncl_join *j = calloc(1, sizeof *j);
    if (!j) return st_err_set(err, ST_ERR_NOMEM, "NCCL join"), NULL;
    memcpy(j->id, id, NCL_ID_BYTES);
    j->rank = rank, j->device = device;
    pthread_mutex_init(&j->mu, NULL);
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    int bad = pthread_create(&t, &a, ncl_join_main, j);
    pthread_attr_destroy(&a);
    if (bad) {
        pthread_mutex_destroy(&j->mu);
        free(j);
        return st_err_set(err, ST_ERR_INTERNAL, "cannot start the NCCL join thread"), NULL;
    }
    return j;
}

/* 0 while the join runs; 1 when it finished: *comm is the communicator (owned by the caller) or
 * NULL with err set, and j is freed. */
static int ncl_join_poll(ncl_join *j, cuda_nccl_comm **comm, st_err *err) {
    pthread_mutex_lock(&j->mu);
    int done = j->done;
    pthread_mutex_unlock(&j->mu);
    if (!done) return 0;
    *comm = j->comm;
    if (j->rc) st_err_set(err, j->rc, "%s", j->err.msg);
    pthread_mutex_destroy(&j->mu);
    free(j);
    return 1;
}

/* Gives up on a join: its communicator, whenever it comes, is aborted. NULL is a no-op. */
static void ncl_join_abandon(ncl_join *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    int done = j->done;
    j->abandoned = 1;
    pthread_mutex_unlock(&j->mu);
    if (done) { /* the thread has already looked at `abandoned`: clean up here */
        cuda_nccl_abort(j->comm);
        pthread_mutex_destroy(&j->mu);
        free(j);
    }
}
static void gpu_drain(node *n);
#endif

/* Drops this stage's NCCL links in `which` (CUDA_STAGE_IN_NCCL / _OUT_NCCL bits; the inbound
 * join in progress too with IN) with ncclCommAbort, which never waits for the peer. A step in
 * flight that used one of them is waited for (bounded: its NCCL calls return after the abort)
 * and dropped. A dropped inbound link is announced to its sender with `why` (CP_NCCL_ACK with an
 * error: its rows would otherwise go on into a receive that never comes); why NULL: not. */
static void ncl_drop(node *n, int which, const char *why) {
    st_err e = {0};
    if ((which & CUDA_STAGE_IN_NCCL) && why && n->data_in && n->loaded) {
        /* also when this end has no communicator (any more): the sender thinks it has one */
        cp_nccl_ack a = {.epoch = n->load.epoch, .status = ST_ERR_NET, .stage = n->load.stage};
        snprintf(a.msg, sizeof a.msg, "stage %d dropped the link: %s", n->load.stage, why);
        xport_send_copy(n->data_in, CP_NCCL_ACK, &a, sizeof a, &e);
    }
#ifdef STRATA_HAVE_CUDA
    if (which & CUDA_STAGE_IN_NCCL) ncl_join_abandon(n->join_in), n->join_in = NULL;
    cuda_nccl_comm *in = (which & CUDA_STAGE_IN_NCCL) ? n->nc_in : NULL;
    cuda_nccl_comm *out = (which & CUDA_STAGE_OUT_NCCL) ? n->nc_out : NULL;
    if (!in && !out) return;
    cuda_nccl_abort(in), cuda_nccl_abort(out);
    if (in) n->nc_in = NULL;
    if (out) n->nc_out = NULL;
    if (n->gpu && n->gp.active && (n->gp.io & which)) {
        uint64_t dl = st_time_ns() + 2000000000ull;
        while (!cuda_stage_done(n->gpu) && st_time_ns() < dl) {
        }
        if (!cuda_stage_done(n->gpu)) {
            ST_ERROR("stage %d: the GPU stream did not finish 2 s after aborting its NCCL link; this stage stops "
                     "running steps",
                     n->load.stage);
            n->gpu_dead = 1;
        } else cuda_stage_finish(n->gpu, 1, &e); /* the step's data is garbage: dropped */
        n->gp.active = 0;
    }
    if (n->gpu && !n->gpu_dead) cuda_stage_set_nccl(n->gpu, n->nc_in, n->nc_out, &e);
#endif
}
#define NCL_BOTH (CUDA_STAGE_IN_NCCL | CUDA_STAGE_OUT_NCCL)

/* The inbound join finished or ran out of time: attach the communicator or report why not. */
static void ncl_join_tick(node *n, int wait) {
#ifdef STRATA_HAVE_CUDA
    if (!n->join_in) return;
    st_err err = {0};
    cuda_nccl_comm *c = NULL;
    int done;
    while (!(done = ncl_join_poll(n->join_in, &c, &err)) && wait && st_time_ns() < n->join_in_deadline) usleep(200);
    if (!done) {
        if (st_time_ns() < n->join_in_deadline) return;
        ST_WARN("stage %d: NCCL link from stage %d: the communicator was not up within %d ms; host copy path",
                n->load.stage, n->load.stage - 1, 3 * n->ncl_timeout_ms);
        ncl_join_abandon(n->join_in), n->join_in = NULL;
        return;
    }
    n->join_in = NULL;
    if (!c) return ST_WARN("stage %d: NCCL link from stage %d: %s; host copy path", n->load.stage, n->load.stage - 1, err.msg);
    gpu_drain(n);
    if (!n->gpu || n->gpu_dead || cuda_stage_set_nccl(n->gpu, c, n->nc_out, &err)) {
        cuda_nccl_abort(c);
        return ST_WARN("stage %d: NCCL link from stage %d: %s; host copy path", n->load.stage, n->load.stage - 1,
                       n->gpu ? err.msg : "no GPU stage");
    }
    n->nc_in = c;
    ST_INFO("stage %d: hidden states from stage %d arrive over NCCL", n->load.stage, n->load.stage - 1);
#else
    (void)n, (void)wait;
#endif
}

/* A CP_NCCL_ID offer from the previous stage (already parsed): join as rank 1 from a helper
 * thread and answer CP_NCCL_ACK 0, or answer why not. An offer for an epoch not loaded yet is
 * held until its LOAD. */
static void ncl_offer(node *n, const cp_nccl_id *m) {
    st_err err = {0}, e2 = {0};
    ncl_self self = {.loaded = n->loaded, .epoch = n->load.epoch, .stage = n->load.stage, .n_stages = n->load.n_stages,
                     .gpu = n->gpu != NULL && !n->gpu_dead, .n_embd = n->D, .max_batch = n->load.max_batch};
    int rc = ncl_check_id(m, &self, &err);
    if (rc == NCL_LATER) {
        n->ncl_offer = *m, n->ncl_offer_held = 1;
        return;
    }
    cp_nccl_ack a = {.epoch = m->epoch, .stage = n->load.stage};
#ifdef STRATA_HAVE_CUDA
    if (rc == NCL_ACCEPT && !(rc = cuda_nccl_load(&err))) {
        ncl_join_abandon(n->join_in), n->join_in = NULL;
        if (n->nc_in) { /* a new offer replaces the old link */
            gpu_drain(n);
            cuda_nccl_abort(n->nc_in), n->nc_in = NULL;
            if (n->gpu && !n->gpu_dead) cuda_stage_set_nccl(n->gpu, NULL, n->nc_out, &e2);
        }
        if (!(n->join_in = ncl_join_start(m->id, 1, n->cuda_dev, &err))) rc = err.code;
        n->join_in_deadline = st_time_ns() + (uint64_t)n->ncl_timeout_ms * 3000000ull;
    }
#else
    if (rc == NCL_ACCEPT) rc = st_err_set(&err, ST_ERR_UNSUPPORTED, "this strata was built without CUDA");
#endif
    a.status = rc;
    if (rc) {
        snprintf(a.msg, sizeof a.msg, "%s", err.msg);
        ST_WARN("NCCL offer from stage %d refused: %s", (int)m->stage, err.msg);
    }
    if (n->data_in && xport_send_copy(n->data_in, CP_NCCL_ACK, &a, sizeof a, &e2))
        ST_WARN("NCCL answer to stage %d: %s", (int)m->stage, e2.msg);
}

/* A CP_NCCL_ID frame on the inbound data link: malformed ones get a refusal (one line). */
static void on_nccl_id(node *n, const uint8_t *p, size_t len) {
    cp_nccl_id m;
    st_err err = {0}, e2 = {0};
    if (ncl_parse_id(p, len, &m, &err)) {
        ST_WARN("%s, refused", err.msg);
        cp_nccl_ack a = {.status = err.code, .stage = n->load.stage};
        if (len >= sizeof a.epoch) memcpy(&a.epoch, p, sizeof a.epoch);
        snprintf(a.msg, sizeof a.msg, "%s", err.msg);
        if (n->data_in && xport_send_copy(n->data_in, CP_NCCL_ACK, &a, sizeof a, &e2)) ST_DEBUG("%s", e2.msg);
        return;
    }
    ncl_offer(n, &m);
}

/* Stage i (a GPU stage, not the last) offers stage i+1 an NCCL link over the data link just
 * connected and waits for it: the answer (up to 300 s: the next stage answers once its own LOAD
 * is done), then the join (3 x ncl_timeout_ms). Any failure leaves the host copy path, with
 * one warning naming the link. */
static void ncl_link_out(node *n, const cp_load *l) {
#ifdef STRATA_HAVE_CUDA
    char link[112];
    snprintf(link, sizeof link, "NCCL link stage %d -> %d (%s)", l->stage, l->stage + 1, l->next_addr);
    st_err err = {0};
    cp_nccl_id m = {.epoch = l->epoch, .version = NCL_VERSION, .stage = l->stage, .n_embd = n->D,
                    .max_batch = l->max_batch};
    if (cuda_nccl_load(&err) || cuda_nccl_get_id(m.id, &err) ||
        xport_send_copy(n->data_out, CP_NCCL_ID, &m, sizeof m, &err))
        return ST_WARN("%s: %s; host copy path", link, err.msg);
    uint64_t dl = st_time_ns() + 300000000000ull;
    cp_nccl_ack a;
    int got = 0;
    while (!got && !*n->stop) {
        if (st_time_ns() > dl) return ST_WARN("%s: no answer from the next stage in 300 s; host copy path", link);
        xport_flush(n->data_out);
        xport_wait(&n->data_out, 1, NULL, 0, 50);
        xport_msg f;
        int r = xport_recv(n->data_out, &f, &err);
        if (r < 0) return ST_WARN("%s: data link lost: %s", link, err.msg);
        if (r == 0) continue;
        if (f.type == CP_NCCL_ACK) {
            int rc = ncl_parse_ack(f.data, f.len, l->epoch, &a, &err);
            xport_release(n->data_out);
            if (rc) return ST_WARN("%s: %s; host copy path", link, err.msg);
            got = 1;
        } else {
            ST_WARN("%s: unexpected frame 0x%x while waiting for the answer, dropped", link, f.type);
            xport_release(n->data_out);
        }
    }
    if (!got) return;
    if (a.status) return ST_WARN("%s: the next stage declined (%s); host copy path", link, a.msg);
    ncl_join *j = ncl_join_start(m.id, 0, n->cuda_dev, &err);
    if (!j) return ST_WARN("%s: %s; host copy path", link, err.msg);
    dl = st_time_ns() + (uint64_t)n->ncl_timeout_ms * 3000000ull;
    cuda_nccl_comm *c = NULL;
    while (!ncl_join_poll(j, &c, &err)) {
        if (st_time_ns() > dl || *n->stop) {
            ncl_join_abandon(j);
            return ST_WARN("%s: the communicator was not up within %d ms; host copy path", link, 3 * n->ncl_timeout_ms);
        }
        usleep(500);
    }
    if (!c) return ST_WARN("%s: %s; host copy path", link, err.msg);
    if (cuda_stage_set_nccl(n->gpu, n->nc_in, c, &err)) {
        cuda_nccl_abort(c);
        return ST_WARN("%s: %s; host copy path", link, err.msg);
    }
    n->nc_out = c;
    int v = cuda_nccl_version();
    ST_INFO("%s: hidden states go over NCCL %d.%d.%d", link, v / 10000, v / 100 % 100, v % 100);
#else
    (void)n, (void)l;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* loading                                                                                    */

static void stage_unload(node *n) {
    if (n->slots)
        for (int s = 0; s < n->load.n_slots; s++) {
            free(n->slots[s].prompt);
            smp_free(n->slots[s].smp);
        }
    free(n->slots), n->slots = NULL;
    free(n->pos_buf), free(n->slot_buf), n->pos_buf = n->slot_buf = NULL;
    free(n->rows_buf), free(n->tok_buf), n->rows_buf = NULL, n->tok_buf = NULL;
    free(n->m_rows), free(n->m_hidden), n->m_rows = NULL, n->m_hidden = NULL, n->m_n = 0;
    n->rr_dec = 0;
    free(n->logits), free(n->logits2), n->logits = n->logits2 = NULL;
    ncl_drop(n, NCL_BOTH, NULL); /* aborts (never waits on the peer) before the stream is waited for */
#ifdef STRATA_HAVE_CUDA
    if (n->gpu && n->gpu_dead)
        ST_ERROR("stage %d: the GPU stage is left allocated (its stream never finished)", n->load.stage);
    else if (n->gpu) {
        if (n->gp.active) {
            st_err e = {0};
            cuda_stage_finish(n->gpu, 0, &e);
        }
        cuda_model_free(n->gpu);
    }
#endif
    n->gpu = NULL, n->gp.active = 0, n->gpu_dead = 0;
    n->ncl_prev_compute_ns = n->ncl_prev_send_ns = 0;
    if (n->gdesc_set) model_desc_free(&n->gdesc), n->gdesc_set = 0;
    model_ctx_free(n->ctx), n->ctx = NULL;
    model_free(n->m), n->m = NULL;
    xport_close(n->data_out), n->data_out = NULL;
    n->loaded = 0;
}

static int load_check(const cp_load *l) {
    return l->layer_begin >= 0 && l->layer_end > l->layer_begin && l->stage >= 0 && l->n_stages >= 1 &&
           l->n_stages <= CLUSTER_MAX_STAGES && l->stage < l->n_stages && l->max_ctx > 0 && l->max_ctx <= (1 << 24) &&
           l->n_slots > 0 && l->n_slots <= 1024 && l->max_batch > 0 && l->max_batch <= 8192 && l->n_buffers > 0 &&
           l->n_buffers <= 1024 && l->max_inflight > 0 && l->batch_rows >= 0 && l->batch_rows <= CP_BATCH_MAX &&
           l->batch_rows <= l->max_batch && memchr(l->model_dir, 0, sizeof l->model_dir) &&
           memchr(l->next_addr, 0, sizeof l->next_addr);
}

/* Weights and KV bytes of the loaded stage (host or device). */
static void stage_memory(node *n, uint64_t *weights, uint64_t *kv) {
#ifdef STRATA_HAVE_CUDA
    if (n->gpu) {
        cuda_model_info ci;
        cuda_model_get_info(n->gpu, &ci);
        *weights = ci.weight_bytes, *kv = ci.kv_bytes;
        return;
    }
#endif
    *weights = n->m->weight_bytes, *kv = model_ctx_kv_bytes(n->ctx);
}

/* GPU stage: binds the range on the host (mmap; synthetic: only the descriptor) and uploads
 * it to n->cuda_dev (synthetic: generated on the device). Sets n->D / n->V. */
static int stage_load_gpu(node *n, const cp_load *l, const model_load_opts *mo, int synthetic, st_err *err) {
#ifdef STRATA_HAVE_CUDA
    cuda_model_opts co = {.max_ctx = l->max_ctx, .n_slots = l->n_slots, .max_batch = l->max_batch,
                          .device = n->cuda_dev, .layer_begin = l->layer_begin, .layer_end = l->layer_end,
                          .with_embed = l->with_embed, .with_output = l->with_output};
    cuda_model *cm = NULL;
    const model_desc *d;
    if (synthetic) {
        int rc = synth_preset_desc(l->model_dir + 10, &n->gdesc, err);
        if (rc) return rc;
        n->gdesc_set = 1;
        if (l->layer_end > n->gdesc.n_layer)
            return st_err_set(err, ST_ERR_ARG, "layers %d..%d beyond the model's %d", l->layer_begin, l->layer_end,
                              n->gdesc.n_layer);
        if ((rc = cuda_model_init_synthetic(&cm, &n->gdesc, &co, 1, err))) return rc;
        d = &n->gdesc;
    } else {
        int rc = model_load(&n->m, l->model_dir, mo, err);
        if (rc) return rc;
        if (l->layer_end > n->m->desc.n_layer)
            return st_err_set(err, ST_ERR_ARG, "layers %d..%d beyond the model's %d", l->layer_begin, l->layer_end,
                              n->m->desc.n_layer);
        if ((rc = cuda_model_init(&cm, n->m, &co, err))) return rc;
        d = &n->m->desc;
    }
    n->gpu = cm;
    n->D = d->n_embd, n->V = d->n_vocab;
    return ST_OK;
#else
    (void)n, (void)l, (void)mo, (void)synthetic;
    return st_err_set(err, ST_ERR_UNSUPPORTED, "this strata was built without CUDA (--device cuda)");
#endif
}

/* Handles LOAD: binds the layer range, allocates KV + state, connects the next hop.
 * Replies CP_LOADED (status 0, or the error). */
static void stage_load(node *n, xport *from, const cp_load *l) {
    cp_loaded r = {.epoch = l->epoch};
    st_err err = {0};
    stage_unload(n);
    n->load = *l;
    n->coord = from;
    if (n->data_in && xport_get_peer(n->data_in)->epoch != l->epoch &&
        cp_epoch_yields(xport_get_peer(n->data_in)->epoch, l->epoch))
        xport_close(n->data_in), n->data_in = NULL;
    model_load_opts mo = {.layer_begin = l->layer_begin, .layer_end = l->layer_end, .with_embed = l->with_embed,
                          .with_output = l->with_output, .source = l->model_dir};
    model_ctx_opts co = {.max_ctx = l->max_ctx, .n_slots = l->n_slots, .max_batch = l->max_batch,
                         .n_threads = l->n_threads > 0 ? l->n_threads : n->o->n_threads, .exact = l->exact};
    uint64_t t0 = st_time_ns();
    const int synthetic = !strncmp(l->model_dir, "synthetic:", 10);
    if (n->cuda_dev >= 0) {
        if (stage_load_gpu(n, l, &mo, synthetic, &err)) goto fail;
        goto loaded_gpu;
    }
    if (synthetic ? synth_model(&n->m, l->model_dir + 10, 1, &mo, &err) : model_load(&n->m, l->model_dir, &mo, &err))
        goto fail;
    if (l->layer_end > n->m->desc.n_layer) {
        st_err_set(&err, ST_ERR_ARG, "layers %d..%d beyond the model's %d", l->layer_begin, l->layer_end, n->m->desc.n_layer);
        goto fail;
    }
    uint64_t limit = n->o->memory_limit ? n->o->memory_limit : n->info.mem_free;
    size_t kv_need = model_desc_kv_bytes_per_token(&n->m->desc, 2) * (size_t)(l->layer_end - l->layer_begin) *
                     (size_t)l->max_ctx * (size_t)l->n_slots;
    if (limit && n->m->weight_bytes + kv_need > limit) {
        char a[32], b[32];
        st_err_set(&err, ST_ERR_LIMIT, "layers %d..%d need %s (weights + KV), memory limit is %s", l->layer_begin,
                   l->layer_end, st_fmt_bytes((double)(n->m->weight_bytes + kv_need), a, sizeof a),
                   st_fmt_bytes((double)limit, b, sizeof b));
        goto fail;
    }
    if (model_ctx_init(&n->ctx, n->m, &co, &err)) goto fail;
    n->D = n->m->desc.n_embd, n->V = n->m->desc.n_vocab;
loaded_gpu:
    n->slots = calloc((size_t)l->n_slots, sizeof *n->slots);
    n->pos_buf = malloc((size_t)l->max_batch * sizeof(int32_t));
    n->slot_buf = malloc((size_t)l->max_batch * sizeof(int32_t));
    n->rows_buf = malloc((size_t)l->max_batch * sizeof(dp_row));
    n->tok_buf = malloc((size_t)l->max_batch * sizeof(int32_t));
    n->logits = malloc((size_t)n->V * (size_t)(l->with_output && l->batch_rows > 1 ? l->batch_rows : 1) * sizeof(float));
    n->logits2 = malloc((size_t)n->V * sizeof(float));
    if (l->stage > 0 && l->batch_rows > 1) {
        n->m_rows = malloc((size_t)l->batch_rows * sizeof(dp_row));
        n->m_hidden = malloc((size_t)l->batch_rows * (size_t)n->D * sizeof(float));
        if (!n->m_rows || !n->m_hidden) {
            st_err_set(&err, ST_ERR_NOMEM, "stage state");
            goto fail;
        }
    }
    if (!n->slots || !n->pos_buf || !n->slot_buf || !n->rows_buf || !n->tok_buf || !n->logits || !n->logits2) {
        st_err_set(&err, ST_ERR_NOMEM, "stage state");
        goto fail;
    }
    if (l->stage == 0)
        for (int s = 0; s < l->n_slots; s++)
            if (!(n->slots[s].prompt = malloc((size_t)l->max_ctx * sizeof(int32_t)))) {
                st_err_set(&err, ST_ERR_NOMEM, "prompt buffers");
                goto fail;
            }
    if (l->n_stages > 1) {
        size_t payload = l->with_output ? sizeof(dp_token)
                                        : sizeof(dp_act) + (size_t)l->batch_rows * sizeof(dp_row) + (size_t)l->max_batch * (size_t)n->D * 4;
        /* The token hop back to stage 0 closes the pipeline's cycle of bounded rings. A stage
         * blocks while its output ring is full, so with more sequences in flight than slots the
         * last stage could wait on a full token ring while stage 0 waits on a full activation
         * ring (16 sequences over 2 stages stalled until the 10 s recovery). At most one token
         * per sequence is in flight: n_slots + 1 slots of a token each never fill. */
        int nbuf = l->n_buffers;
        if (l->with_output && nbuf < l->n_slots + 1) nbuf = l->n_slots + 1 < XPORT_MAX_BUFFERS ? l->n_slots + 1 : XPORT_MAX_BUFFERS;
        xport_opts xo = {.n_buffers = nbuf, .max_inflight = l->max_inflight, .max_payload = payload,
                         .data_mac = l->data_mac, .pref = l->xport_pref, .role = XPORT_ROLE_DATA, .epoch = l->epoch,
                         .node_id = n->node_id, .timeout_ms = 5000};
        if (xport_connect(&n->data_out, l->next_addr, &n->key, &xo, &err)) goto fail;
        snprintf(r.next_kind, sizeof r.next_kind, "%s", xport_kind_name(n->data_out));
    }
    n->loaded = 1;
    /* NCCL links: first answer an offer from the previous stage that came before this LOAD (the
     * join runs on its own), then offer one to the next stage (blocks until it is up or refused) */
    if (n->ncl_offer_held) {
        n->ncl_offer_held = 0;
        if (cp_epoch_same_run(n->ncl_offer.epoch, l->epoch) && n->ncl_offer.epoch >= l->epoch) ncl_offer(n, &n->ncl_offer);
    }
    if (l->nccl && n->gpu && !l->with_output && l->n_stages > 1) {
        ncl_link_out(n, l);
        if (n->nc_out) snprintf(r.next_kind, sizeof r.next_kind, "nccl");
    }
    r.n_vocab = n->V, r.n_embd = n->D;
    stage_memory(n, &r.weight_bytes, &r.kv_bytes);
    r.rss_bytes = rss_bytes();
    char a[32], b[32];
    ST_INFO("stage %d/%d on %s: layers %d..%d%s%s loaded in %.2f s: weights %s, KV %s (%d x %d), next hop %s %s",
            l->stage, l->n_stages, n->gpu ? (n->o->sync_host ? "cuda (host sync)" : "cuda (stream flag)") : "cpu", l->layer_begin, l->layer_end - 1, l->with_embed ? " +embed" : "",
            l->with_output ? " +output" : "", (double)(st_time_ns() - t0) / 1e9,
            st_fmt_bytes((double)r.weight_bytes, a, sizeof a), st_fmt_bytes((double)r.kv_bytes, b, sizeof b),
            l->n_slots, l->max_ctx, l->n_stages > 1 ? l->next_addr : "(self)", r.next_kind);
    xport_send_copy(from, CP_LOADED, &r, sizeof r, &err);
    return;
fail:
    ST_ERROR("LOAD failed: %s", err.msg);
    stage_unload(n);
    if (n->ncl_offer_held && n->ncl_offer.epoch == l->epoch && n->data_in) { /* its sender waits for an answer */
        cp_nccl_ack a = {.epoch = l->epoch, .status = ST_ERR_UNSUPPORTED, .stage = l->stage};
        snprintf(a.msg, sizeof a.msg, "stage %d failed to load", l->stage);
        st_err e3 = {0};
        xport_send_copy(n->data_in, CP_NCCL_ACK, &a, sizeof a, &e3);
        n->ncl_offer_held = 0;
    }
    r.status = err.code ? err.code : ST_ERR_INTERNAL;
    snprintf(r.msg, sizeof r.msg, "%s", err.msg);
    st_err e2 = {0};
    xport_send_copy(from, CP_LOADED, &r, sizeof r, &e2);
}

/* ------------------------------------------------------------------------------------------ */
/* the stage                                                                                  */

/* The last stage's sampled token: to the coordinator, and (unless done) to stage 0. */
static void emit_token(node *n, int slot, int32_t pos, int32_t tok, int done, const dp_act *h, int prefill) {
    slot_state *ss = &n->slots[slot];
    st_err err = {0};
    if (n->coord) {
        int nl = ss->params.want_logits ? n->V : 0;
        size_t len = sizeof(dp_token) + (size_t)nl * 4;
        uint8_t *b = xport_send_buf(n->coord, len);
        if (b) {
            dp_token t = {.epoch = n->load.epoch, .seq_id = ss->seq_id, .slot = slot, .pos = pos, .token = tok,
                          .done = done, .t_sent = st_time_ns(), .n_logits = nl, .prefill = prefill,
                          .rows = (h->flags & ACT_BATCH) ? h->T : 1};
            memcpy(t.compute_ns, h->compute_ns, sizeof t.compute_ns);
            memcpy(t.hop_ns, h->hop_ns, sizeof t.hop_ns);
            memcpy(b, &t, sizeof t);
            if (nl) memcpy(b + sizeof t, n->logits2, (size_t)nl * 4);
            if (xport_send(n->coord, CP_TOKEN, len, &err)) ST_WARN("token to coordinator: %s", err.msg);
        }
    }
    if (done) return;
    if (n->load.n_stages == 1) {
        ss->pending_local = 1, ss->pend_tok = tok, ss->pend_pos = pos;
        return;
    }
    if (!n->data_out) return;
    dp_token t = {.epoch = n->load.epoch, .seq_id = ss->seq_id, .slot = slot, .pos = pos, .token = tok,
                  .t_sent = st_time_ns(), .rows = (h->flags & ACT_BATCH) ? h->T : 1};
    if (xport_send_copy(n->data_out, DP_TOKEN, &t, sizeof t, &err)) ST_WARN("token to stage 0: %s", err.msg);
}

static void last_stage_emit(node *n, dp_act *h, int32_t greedy);
static void emit_row(node *n, const dp_act *h, int slot, int32_t pos, int32_t greedy, float *logits, int prefill);
#ifdef STRATA_HAVE_CUDA
static void gpu_rows(node *n, dp_act *h, const int32_t *tokens, const float *hidden_in, uint64_t t_in);
#endif

/* The send buffer for T rows of hidden states to the next stage (header, with_rows ? dp_row[T]
 * : nothing, [T, D] floats), or NULL with a warning when the next hop is unavailable (the step
 * is dropped; recovery replays). T = 0: the header alone (ACT_NCCL). */
static uint8_t *act_send_buf(node *n, int T, int with_rows, size_t *len) {
    *len = sizeof(dp_act) + (with_rows ? (size_t)T * sizeof(dp_row) : 0) + (size_t)T * (size_t)n->D * 4;
    uint8_t *b = xport_send_buf(n->data_out, *len);
    if (!b)
        ST_WARN("stage %d: next hop unavailable (%s), dropping step", n->load.stage,
                n->data_out ? xport_error(n->data_out) : "not connected");
    return b;
}

/* Runs T rows through this stage. Input: token ids (stage 0) or hidden states. h describes
 * the rows (slot, pos0, flags, timing so far); rows (ACT_BATCH, else NULL) gives each row's
 * sequence, slot and position instead; t_in is when the input arrived. Borrows everything. */
static void stage_rows(node *n, dp_act *h, const int32_t *tokens, const float *hidden_in, const dp_row *rows,
                       uint64_t t_in) {
    st_err err = {0};
    const cp_load *l = &n->load;
    if (rows)
        for (int i = 0; i < h->T; i++) n->pos_buf[i] = rows[i].pos, n->slot_buf[i] = rows[i].slot;
    else
        for (int i = 0; i < h->T; i++) n->pos_buf[i] = h->pos0 + i, n->slot_buf[i] = h->slot;
    if (!rows && (h->flags & ACT_FIRST)) {
        slot_state *ss = &n->slots[h->slot];
        ss->seq_id = h->seq_id;
        if (l->with_output) {
            ss->params = h->params;
            smp_free(ss->smp), ss->smp = NULL;
            smp_params sp = smp_params_default();
            sp.temperature = h->params.temperature, sp.top_k = h->params.top_k, sp.top_p = h->params.top_p;
            sp.min_p = h->params.min_p, sp.repetition_penalty = h->params.repetition_penalty;
            sp.presence_penalty = h->params.presence_penalty, sp.frequency_penalty = h->params.frequency_penalty;
            sp.seed = h->params.seed;
            ss->smp = smp_init(&sp, n->V, 0, &err);
            if (!ss->smp) ST_WARN("sequence %llu: bad sampling parameters: %s", (unsigned long long)h->seq_id, err.msg);
            ss->n_gen = 0;
        }
    }
#ifdef STRATA_HAVE_CUDA
    if (n->gpu) {
        if (rows) return ST_WARN("stage %d: batched decode rows on a GPU stage are not supported, step dropped", l->stage);
        return gpu_rows(n, h, tokens, hidden_in, t_in);
    }
#endif
    if (!l->with_output) {
        size_t len;
        uint8_t *b = act_send_buf(n, h->T, rows != NULL, &len);
        if (!b) return;
        const size_t rb = rows ? (size_t)h->T * sizeof(dp_row) : 0;
        uint64_t t0 = st_time_ns();
        if (model_forward_stage(n->ctx, tokens, hidden_in, n->pos_buf, n->slot_buf, h->T, (float *)(b + sizeof(dp_act) + rb),
                                NULL, LOGITS_NONE, &err)) {
            ST_WARN("stage %d: forward failed: %s", l->stage, err.msg);
            return; /* the slot is reused by the next commit */
        }
        uint64_t t1 = st_time_ns();
        h->compute_ns[l->stage] = t1 - t0;
        if (l->stage > 0) h->hop_ns[l->stage - 1] = t0 > h->t_sent ? t_in - h->t_sent : 0;
        h->t_sent = st_time_ns();
        memcpy(b, h, sizeof *h);
        if (rb) memcpy(b + sizeof *h, rows, rb);
        if (xport_send(n->data_out, DP_ACT, len, &err)) ST_WARN("stage %d: send: %s", l->stage, err.msg);
        return;
    }
    /* last stage */
    int want = (h->flags & ACT_LAST) != 0;
    const logits_mode mode = !want ? LOGITS_NONE : rows ? LOGITS_ALL : LOGITS_LAST;
    uint64_t t0 = st_time_ns();
    if (model_forward_stage(n->ctx, tokens, hidden_in, n->pos_buf, n->slot_buf, h->T, NULL, want ? n->logits : NULL, mode,
                            &err)) {
        ST_WARN("stage %d: forward failed: %s", l->stage, err.msg);
        return;
    }
    h->compute_ns[l->stage] = st_time_ns() - t0;
    if (l->stage > 0) h->hop_ns[l->stage - 1] = t_in - h->t_sent;
    if (!want) return;
    if (!rows) return last_stage_emit(n, h, -1);
    for (int i = 0; i < h->T; i++) {
        if (n->slots[rows[i].slot].seq_id != rows[i].seq_id) continue; /* the slot moved on: a stale row */
        emit_row(n, h, rows[i].slot, rows[i].pos + 1, -1, n->logits + (size_t)i * (size_t)n->V, 0);
    }
}

/* One sequence's step is done at the last stage: `logits` [V] holds its row's logits (they
 * are consumed), or `greedy` >= 0 is the argmax the GPU computed. Samples, counts, and emits
 * the token for position `pos`. */
static void emit_row(node *n, const dp_act *h, int slot, int32_t pos, int32_t greedy, float *logits, int prefill) {
    slot_state *ss = &n->slots[slot];
    if (!ss->smp) {
        ST_WARN("slot %d: no sampler (sequence start lost), dropping", slot);
        return;
    }
    int32_t tok = greedy;
    if (tok < 0) {
        memcpy(n->logits2, logits, (size_t)n->V * 4);
        tok = smp_sample(ss->smp, logits);
    }
    if (tok >= 0) smp_accept(ss->smp, tok);
    ss->n_gen++;
    int done = tok < 0 || ss->n_gen >= ss->params.max_tokens || pos + 1 >= n->load.max_ctx;
    for (int i = 0; i < ss->params.n_eos && i < CP_MAX_EOS; i++)
        if (tok == ss->params.eos[i]) done = 1;
    emit_token(n, slot, pos, tok, done, h, prefill);
}

/* The last stage's step of one sequence is done (n->logits holds the last row's logits, or
 * `greedy` >= 0 is the argmax the GPU computed). */
static void last_stage_emit(node *n, dp_act *h, int32_t greedy) {
    emit_row(n, h, h->slot, h->pos0 + h->T, greedy, n->logits, (h->flags & ACT_FIRST) != 0);
}

#ifdef STRATA_HAVE_CUDA
/* The GPU step in flight is complete: hand the hidden states to the next stage, or emit the
 * token (last stage). Timing as in stage_rows; compute = submit to completion seen. */
static void gpu_complete(node *n) {
    st_err err = {0};
    const cp_load *l = &n->load;
    dp_act *h = &n->gp.h;
    n->gp.active = 0;
    const int io = n->gp.io;
    uint64_t compute = st_time_ns() - n->gp.t0;
    double rus = 0, cus = 0, sus = 0;
    const int timed = io && cuda_stage_nccl_times(n->gpu, &rus, &cus, &sus);
    if (timed) compute = (uint64_t)(cus * 1e3);
    if (io & CUDA_STAGE_OUT_NCCL) { /* its header has left: these figures ride on the next one */
        if (h->T == 1) n->ncl_prev_compute_ns = compute, n->ncl_prev_send_ns = timed ? (uint64_t)(sus * 1e3) : 0;
        return;
    }
    h->compute_ns[l->stage] = compute;
    /* a hop over NCCL keeps what its sender reported (the GPU time of its send) */
    if (l->stage > 0 && !(io & CUDA_STAGE_IN_NCCL))
        h->hop_ns[l->stage - 1] = n->gp.t_in > h->t_sent ? n->gp.t_in - h->t_sent : 0;
    h->flags &= ~ACT_NCCL;
    if (!l->with_output) {
        size_t len;
        uint8_t *b = act_send_buf(n, h->T, 0, &len);
        if (!b) return;
        h->t_sent = st_time_ns();
        memcpy(b, h, sizeof *h);
        memcpy(b + sizeof *h, cuda_stage_output(n->gpu), (size_t)h->T * (size_t)n->D * 4);
        if (xport_send(n->data_out, DP_ACT, len, &err)) ST_WARN("stage %d: send: %s", l->stage, err.msg);
        return;
    }
    if (!(h->flags & ACT_LAST)) return;
    if (n->gp.kind == 2) return last_stage_emit(n, h, cuda_stage_tokens(n->gpu)[h->T - 1]);
    memcpy(n->logits, cuda_stage_output(n->gpu), (size_t)n->V * 4);
    last_stage_emit(n, h, -1);
}

/* Waits for the step in flight (spinning on the stream's flag, or cudaStreamSynchronize with
 * --sync-mode host) and completes it. */
static void gpu_drain(node *n) {
    if (!n->gp.active) return;
    st_err err = {0};
    if (n->gp.io) { /* bounded: a peer that never posts its half must not wedge this GPU */
        const uint64_t dl = n->gp.t0 + (uint64_t)n->ncl_timeout_ms * 1000000ull;
        while (!cuda_stage_done(n->gpu)) {
            if (st_time_ns() <= dl) continue;
            int w = cuda_stage_nccl_stalled(n->gpu);
            char lk[96];
            if (w == CUDA_STAGE_IN_NCCL) snprintf(lk, sizeof lk, "from stage %d", n->load.stage - 1);
            else if (w == CUDA_STAGE_OUT_NCCL) snprintf(lk, sizeof lk, "to stage %d (%s)", n->load.stage + 1, n->load.next_addr);
            else snprintf(lk, sizeof lk, "%s stage %d", n->gp.io & CUDA_STAGE_IN_NCCL ? "from" : "to",
                          n->gp.io & CUDA_STAGE_IN_NCCL ? n->load.stage - 1 : n->load.stage + 1);
            ST_ERROR("stage %d: a step waited more than %d ms on the NCCL link %s: aborting the communicator, "
                     "back to the host copy path (step dropped)",
                     n->load.stage, n->ncl_timeout_ms, lk);
            ncl_drop(n, w ? w : n->gp.io, "a step timed out");
            return;
        }
    }
    if (cuda_stage_finish(n->gpu, !n->o->sync_host, &err)) {
        ST_WARN("stage %d: GPU step failed: %s", n->load.stage, err.msg);
        n->gp.active = 0;
        return;
    }
    gpu_complete(n);
    n->gp.t_last = st_time_ns();
    double gms, tus;
    if (++n->diag_every % 128 == 0 && cuda_stage_diag(n->gpu, &gms, &tus))
        ST_INFO("stage %d: GPU %.3f ms per step, stream tail after the flag %.1f us", n->load.stage, gms, tus);
}

/* Submits T rows to the GPU stage and returns at once (stream mode: the loop completes the
 * step when the flag is up) or after the step (host mode). A greedy sequence's last stage
 * computes the argmax on the GPU so only the id leaves the device. */
static void gpu_rows(node *n, dp_act *h, const int32_t *tokens, const float *hidden_in, uint64_t t_in) {
    st_err err = {0};
    const cp_load *l = &n->load;
    gpu_drain(n);
    const slot_state *ss = &n->slots[h->slot];
    const cp_seq *p = &ss->params;
    int kind = 0;
    if (l->with_output) {
        int greedy = p->temperature <= 0.0f && (p->repetition_penalty == 0.0f || p->repetition_penalty == 1.0f) &&
                     p->presence_penalty == 0.0f && p->frequency_penalty == 0.0f && !p->want_logits && h->T <= 8;
        kind = greedy && (h->flags & ACT_LAST) ? 2 : 1;
    }
    if (n->gpu_dead) return ST_WARN("stage %d: the GPU stage is out of service, step dropped", l->stage);
    int io = (h->flags & ACT_NCCL) ? CUDA_STAGE_IN_NCCL : 0;
    if (n->nc_out && !l->with_output) io |= CUDA_STAGE_OUT_NCCL;
    size_t len = 0;
    uint8_t *b = NULL;
    if ((io & CUDA_STAGE_OUT_NCCL) && !(b = act_send_buf(n, 0, 0, &len))) {
        if (io & CUDA_STAGE_IN_NCCL) ncl_drop(n, CUDA_STAGE_IN_NCCL, "next hop unavailable"); /* rows unmatched */
        return;
    }
    const uint64_t t0 = st_time_ns(); /* compute includes the launch */
    if (cuda_stage_submit(n->gpu, l->with_embed ? tokens : NULL, l->with_embed || (io & CUDA_STAGE_IN_NCCL) ? NULL : hidden_in,
                          n->pos_buf, n->slot_buf, h->T, kind, io, &err)) {
        ST_WARN("stage %d: GPU submit failed: %s", l->stage, err.msg);
        if (io) ncl_drop(n, io, "GPU submit failed");
        return;
    }
    n->gp.active = 1, n->gp.kind = kind, n->gp.io = io, n->gp.h = *h, n->gp.t0 = t0, n->gp.t_in = t_in;
    if (io & CUDA_STAGE_OUT_NCCL) {
        /* the rows follow on the stream's ncclSend: the header leaves now, before the GPU is done,
         * so the next stage's receive and layers queue up behind it on its own stream. It
         * carries this stage's figures of its previous decode step (see gpu_complete). */
        dp_act *o = &n->gp.h;
        o->flags |= ACT_NCCL;
        o->compute_ns[l->stage] = n->ncl_prev_compute_ns;
        o->hop_ns[l->stage] = n->ncl_prev_send_ns;
        if (l->stage > 0 && !(io & CUDA_STAGE_IN_NCCL)) o->hop_ns[l->stage - 1] = t_in > o->t_sent ? t_in - o->t_sent : 0;
        o->t_sent = st_time_ns();
        memcpy(b, o, sizeof *o);
        if (xport_send(n->data_out, DP_ACT, len, &err)) ST_WARN("stage %d: send: %s", l->stage, err.msg);
    }
    if (n->o->sync_host) gpu_drain(n);
}
#endif

/* Stage 0: one prefill chunk of a slot. */
static void prefill_chunk(node *n, int s) {
    slot_state *ss = &n->slots[s];
    int T = ss->n_prompt - ss->prefilled;
    if (T > n->load.max_batch) T = n->load.max_batch;
    dp_act h = {.epoch = n->load.epoch, .seq_id = ss->seq_id, .slot = s, .pos0 = ss->prefilled, .T = T};
    if (ss->prefilled == 0) h.flags |= ACT_FIRST, h.params = ss->params;
    if (ss->prefilled + T == ss->n_prompt) h.flags |= ACT_LAST;
    const int32_t *toks = ss->prompt + ss->prefilled;
    ss->prefilled += T;
    stage_rows(n, &h, toks, NULL, NULL, st_time_ns());
}

static void decode_step(node *n, int s, int32_t tok, int32_t pos, uint64_t hop_back) {
    slot_state *ss = &n->slots[s];
    dp_act h = {.epoch = n->load.epoch, .seq_id = ss->seq_id, .slot = s, .pos0 = pos, .T = 1, .flags = ACT_LAST};
    h.hop_ns[n->load.n_stages - 1] = hop_back;
    stage_rows(n, &h, &tok, NULL, NULL, st_time_ns());
}

/* Stage 0: runs rows_buf[0..k) / tok_buf[0..k) as one ACT_BATCH decode step. */
static void decode_rows(node *n, int k, uint64_t hop_back) {
    dp_act h = {.epoch = n->load.epoch, .slot = -1, .T = k, .flags = ACT_LAST | ACT_BATCH};
    h.hop_ns[n->load.n_stages - 1] = hop_back;
    stage_rows(n, &h, n->tok_buf, NULL, n->rows_buf, st_time_ns());
}

/* Stage 0 with batch_rows > 1: every queued decode (pending_local) as steps of up to
 * batch_rows rows of different sequences (ACT_BATCH), round robin from where the last step
 * stopped, so no sequence waits behind others when more are ready than a step takes. */
static void decode_batches(node *n) {
    const int S = n->load.n_slots, cap = n->load.batch_rows;
    int k = 0;
    uint64_t hop_back = 0;
    for (int j = 0; j < S; j++) {
        const int s = (n->rr_dec + j) % S;
        slot_state *ss = &n->slots[s];
        if (!ss->pending_local) continue;
        ss->pending_local = 0;
        n->rows_buf[k] = (dp_row){.seq_id = ss->seq_id, .slot = s, .pos = ss->pend_pos};
        n->tok_buf[k] = ss->pend_tok;
        if (ss->hop_back_ns > hop_back) hop_back = ss->hop_back_ns;
        n->rr_dec = (s + 1) % S;
        if (++k == cap) decode_rows(n, k, hop_back), k = 0, hop_back = 0;
    }
    if (k) decode_rows(n, k, hop_back);
}

/* Stages > 0: runs the merged decode rows (if any) as one ACT_BATCH step. */
static void merge_flush(node *n) {
    if (!n->m_n) return;
    dp_act h = n->m_h;
    h.T = n->m_n, h.slot = -1, h.pos0 = 0, h.seq_id = 0, h.flags = ACT_LAST | ACT_BATCH;
    n->m_n = 0;
    stage_rows(n, &h, NULL, n->m_hidden, n->m_rows, n->m_t_in);
}

/* A checked step from the previous stage (rows: ACT_BATCH's, else NULL). Decode rows (a batch,
 * or one sequence's single ACT_LAST row) join the merge set when this stage batches; anything
 * else first runs the merge set, keeping the order of the link. */
static void act_rows(node *n, dp_act *h, const dp_row *rows, const float *hidden, uint64_t t_in) {
    const int decode = rows || (h->T == 1 && (h->flags & ACT_LAST) && !(h->flags & (ACT_FIRST | ACT_NCCL)));
    if (!n->m_rows || !decode || !hidden || n->gpu) {
        merge_flush(n);
        return stage_rows(n, h, NULL, hidden, rows, t_in);
    }
    for (int i = 0; i < h->T; i++) {
        const dp_row r = rows ? rows[i] : (dp_row){.seq_id = h->seq_id, .slot = h->slot, .pos = h->pos0};
        int dup = n->m_n == n->load.batch_rows;
        for (int j = 0; j < n->m_n && !dup; j++) dup = n->m_rows[j].slot == r.slot;
        if (dup) merge_flush(n);
        if (n->m_n == 0) n->m_h = *h, n->m_t_in = t_in;
        n->m_rows[n->m_n] = r;
        memcpy(n->m_hidden + (size_t)n->m_n * (size_t)n->D, hidden + (size_t)i * (size_t)n->D, (size_t)n->D * 4);
        n->m_n++;
    }
}

static void on_start(node *n, const uint8_t *p, size_t len) {
    cp_seq q;
    if (len < sizeof q) return ST_WARN("START: short message dropped");
    memcpy(&q, p, sizeof q);
    if (!n->loaded || n->load.stage != 0 || q.epoch != n->load.epoch)
        return ST_WARN("START for epoch %llu dropped (not stage 0 of the current epoch)", CP_EPOCH_SEQ(q.epoch));
    if (q.slot < 0 || q.slot >= n->load.n_slots || q.n_prompt < 1 || q.n_prompt >= n->load.max_ctx ||
        len != sizeof q + (size_t)q.n_prompt * 4 || q.n_eos < 0 || q.n_eos > CP_MAX_EOS || q.max_tokens < 1)
        return ST_WARN("START: bad fields, dropped");
    slot_state *ss = &n->slots[q.slot];
    memcpy(ss->prompt, p + sizeof q, (size_t)q.n_prompt * 4);
    for (int i = 0; i < q.n_prompt; i++)
        if (ss->prompt[i] < 0 || ss->prompt[i] >= n->V) return ST_WARN("START: token id out of range, dropped");
    ss->active = 1, ss->seq_id = q.seq_id, ss->params = q, ss->n_prompt = q.n_prompt, ss->prefilled = 0;
    ss->pending_local = 0; /* its chunks run in the loop's local work, this same turn */
}

/* An ACT_BATCH step from the previous stage (header h already checked for its epoch): every
 * row's slot and position in range, no slot twice, the frame exactly rows + hidden states.
 * Runs it, or drops it with one line. */
static void on_act_batch(node *n, const dp_act *hp, const uint8_t *p, size_t len, uint64_t t_in) {
    dp_act h = *hp;
    const cp_load *l = &n->load;
    if (l->stage == 0 || (h.flags & (ACT_FIRST | ACT_NCCL)) || !(h.flags & ACT_LAST) || h.T < 1)
        return ST_WARN("ACT: bad batch header (T %d, flags 0x%x), dropped", h.T, h.flags);
    if (h.T > l->batch_rows) /* the logits and merge buffers hold batch_rows rows */
        return ST_WARN("ACT: batch of %d rows on a stage loaded for %d, dropped", h.T, l->batch_rows);
    const size_t rb = (size_t)h.T * sizeof(dp_row);
    if (len != sizeof h + rb + (size_t)h.T * (size_t)n->D * 4)
        return ST_WARN("ACT: batch of %d rows in %zu bytes (expected %zu), dropped", h.T, len,
                       sizeof h + rb + (size_t)h.T * (size_t)n->D * 4);
    memcpy(n->rows_buf, p + sizeof h, rb);
    for (int i = 0; i < h.T; i++) {
        const dp_row *r = &n->rows_buf[i];
        if (r->slot < 0 || r->slot >= l->n_slots || r->pos < 0 || r->pos + 1 >= l->max_ctx)
            return ST_WARN("ACT: batch row %d (slot %d, position %d) out of range, dropped", i, r->slot, r->pos);
        for (int j = 0; j < i; j++)
            if (n->rows_buf[j].slot == r->slot) return ST_WARN("ACT: batch names slot %d twice, dropped", r->slot);
    }
    act_rows(n, &h, n->rows_buf, (const float *)(p + sizeof h + rb), t_in);
}

static void on_act(node *n, const uint8_t *p, size_t len, uint64_t t_in) {
    dp_act h;
    if (len < sizeof h) return ST_WARN("ACT: short message dropped");
    memcpy(&h, p, sizeof h);
    if (!n->loaded || h.epoch != n->load.epoch) return; /* stale epoch: silently dropped */
    if (h.flags & ACT_BATCH) return on_act_batch(n, &h, p, len, t_in);
    if (n->load.stage == 0 || h.slot < 0 || h.slot >= n->load.n_slots || h.T < 1 || h.T > n->load.max_batch ||
        h.pos0 < 0 || h.pos0 + h.T > n->load.max_ctx) {
        if (h.flags & ACT_NCCL) ncl_drop(n, CUDA_STAGE_IN_NCCL, "bad ACT fields"); /* its rows stay unmatched */
        return ST_WARN("ACT: bad fields, dropped");
    }
    if ((h.flags & ACT_NCCL) && !n->nc_in && n->join_in) ncl_join_tick(n, 1); /* the join is finishing */
    st_err err = {0};
    int on_nccl = ncl_act_payload(&h, len, n->D, n->nc_in != NULL, &err);
    if (on_nccl < 0) {
        /* an unmatched NCCL send stalls the sender until its timeout aborts the link: drop ours too */
        if (h.flags & ACT_NCCL) ncl_drop(n, CUDA_STAGE_IN_NCCL, err.msg);
        return ST_WARN("%s, dropped", err.msg);
    }
    if ((h.flags & ACT_FIRST) && (h.params.n_eos < 0 || h.params.n_eos > CP_MAX_EOS)) {
        if (on_nccl) ncl_drop(n, CUDA_STAGE_IN_NCCL, "bad ACT params");
        return ST_WARN("ACT: bad params, dropped");
    }
    if (on_nccl && n->ncl_test_skip > 0 && ++n->ncl_n_in == n->ncl_test_skip) {
        /* STRATA_TEST_NCCL_SKIP_RECV=N: the N-th header on NCCL is dropped without its receive, as
         * if this stage had lost it: the link must go down on both ends and the run recover */
        ST_WARN("stage %d: STRATA_TEST_NCCL_SKIP_RECV: dropping NCCL step %d without its receive", n->load.stage,
                n->ncl_n_in);
        return ncl_drop(n, CUDA_STAGE_IN_NCCL, "test: a step dropped without its receive");
    }
    act_rows(n, &h, NULL, on_nccl ? NULL : (const float *)(p + sizeof h), t_in);
}

static void on_token(node *n, const uint8_t *p, size_t len, uint64_t t_in) {
    dp_token t;
    if (len < sizeof t) return ST_WARN("TOKEN: short message dropped");
    memcpy(&t, p, sizeof t);
    if (!n->loaded || t.epoch != n->load.epoch) return;
    if (n->load.stage != 0 || t.slot < 0 || t.slot >= n->load.n_slots || t.pos < 1 || t.pos >= n->load.max_ctx ||
        t.token < 0 || t.token >= n->V)
        return ST_WARN("TOKEN: bad fields, dropped");
    slot_state *ss = &n->slots[t.slot];
    if (ss->seq_id != t.seq_id) return;
    if (n->load.batch_rows > 1) { /* with the others ready this turn, in decode_batches */
        ss->pending_local = 1, ss->pend_tok = t.token, ss->pend_pos = t.pos, ss->hop_back_ns = t_in - t.t_sent;
        return;
    }
    decode_step(n, t.slot, t.token, t.pos, t_in - t.t_sent);
}

/* Handles PROBE_REQ: measures the link to each listed peer, one after the other, and replies
 * PROBE_RES. Blocks this loop for the duration (the coordinator probes before loading). */
static void on_probe_req(node *n, xport *from, const xport_msg *m) {
    cp_probe_req rq;
    st_err err = {0};
    cp_probe_res *res = calloc(1, sizeof *res);
    if (!res) return;
    if (m->len != sizeof rq) {
        ST_WARN("PROBE: wrong size, dropped");
        res->n_peers = -1;
    } else {
        memcpy(&rq, m->data, sizeof rq);
        if (rq.n_peers < 0 || rq.n_peers > CP_PROBE_MAX || rq.pings < 1 || rq.pings > 1000 || rq.bytes > (1ull << 30)) {
            ST_WARN("PROBE: fields out of range, dropped");
            res->n_peers = -1;
        } else {
            res->n_peers = rq.n_peers;
            calib_result cr;
            if (rq.calib_mb > 0 && rq.calib_mb <= 4096 && calib_matvec(n->info.threads, (size_t)rq.calib_mb << 20, 9, &cr) == 0) {
                n->info.mv_bf16_bytes_s = cr.bf16_bytes_s, n->info.mv_q4_bytes_s = cr.q4_bytes_s;
                ST_INFO("decode matvec (%d threads): %.2f GB/s bf16, %.2f GB/s 4-bit", n->info.threads, cr.bf16_bytes_s / 1e9,
                        cr.q4_bytes_s / 1e9);
            }
            res->mv_bf16_bytes_s = n->info.mv_bf16_bytes_s, res->mv_q4_bytes_s = n->info.mv_q4_bytes_s;
            for (int k = 0; k < rq.n_peers; k++) {
                rq.addr[k][sizeof rq.addr[k] - 1] = 0;
                cp_probe_link *l = &res->link[k];
                if (lp_probe_peer(rq.addr[k], &n->key, n->node_id, rq.xport_pref, rq.pings, rq.bytes, l))
                    ST_WARN("probe of %s failed: %s", rq.addr[k], l->msg);
                else
                    ST_INFO("link to %s (%s): latency %.1f us, bandwidth out %.2f GB/s, in %.2f GB/s", rq.addr[k], l->kind,
                            l->latency_s * 1e6, l->bw_out / 1e9, l->bw_in / 1e9);
            }
        }
    }
    xport_send_copy(from, CP_PROBE_RES, res, sizeof *res, &err);
    free(res);
}

static void on_control(node *n, xport *x, const xport_msg *m) {
    st_err err = {0};
    switch (m->type) {
    case CP_PROBE_REQ:
        on_probe_req(n, x, m);
        break;
    case CP_INFO_REQ:
        n->info.rss_bytes = rss_bytes();
        n->info.mem_free = meminfo("MemAvailable");
        xport_send_copy(x, CP_INFO, &n->info, sizeof n->info, &err);
        break;
    case CP_PING:
        xport_send_copy(x, CP_PONG, m->data, m->len > 8 ? 8 : m->len, &err);
        break;
    case CP_LOAD: {
        cp_load l;
        if (m->len != sizeof l) {
            ST_WARN("LOAD: wrong size, dropped");
            break;
        }
        memcpy(&l, m->data, sizeof l);
        if (!load_check(&l)) {
            ST_WARN("LOAD: fields out of range, dropped");
            cp_loaded r = {.epoch = l.epoch, .status = ST_ERR_ARG};
            snprintf(r.msg, sizeof r.msg, "LOAD fields out of range");
            xport_send_copy(x, CP_LOADED, &r, sizeof r, &err);
            break;
        }
        stage_load(n, x, &l);
        break;
    }
    case CP_START:
        on_start(n, m->data, m->len);
        break;
    default:
        ST_WARN("control message type 0x%x from %s dropped", m->type, xport_get_peer(x)->addr);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* main loop                                                                                  */

static void drop_ctrl(node *n, int i, const char *why) {
    ST_INFO("control link %s closed: %s", xport_get_peer(n->ctrl[i])->addr, why);
    if (n->coord == n->ctrl[i]) n->coord = NULL;
    xport_close(n->ctrl[i]);
    n->ctrl[i] = NULL;
}

static void take_new_links(node *n) {
    char buf[64];
    while (read(n->pipe_rd, buf, sizeof buf) > 0) {
    }
    pthread_mutex_lock(&n->mu);
    for (int i = 0; i < n->n_queue; i++) {
        xport *x = n->queue[i];
        const xport_peer *p = xport_get_peer(x);
        if (p->role == XPORT_ROLE_CONTROL) {
            int k = 0;
            while (k < NODE_MAX_CTRL && n->ctrl[k]) k++;
            if (k == NODE_MAX_CTRL) {
                ST_WARN("too many control links, dropping %s", p->addr);
                xport_close(x);
            } else {
                n->ctrl[k] = x;
                ST_INFO("control link from %s (%s)", p->addr, p->node_id[0] ? p->node_id : "coordinator");
            }
        } else if (p->role == XPORT_ROLE_DATA) {
            if (n->data_in && !cp_epoch_yields(xport_get_peer(n->data_in)->epoch, p->epoch)) {
                xport_close(x); /* a late link of an earlier placement of the same run */
            } else {
                xport_close(n->data_in);
                n->data_in = x;
                ST_INFO("data link from %s (node %s, %s, epoch %llu)", p->addr, p->node_id, xport_kind_name(x),
                        CP_EPOCH_SEQ(p->epoch));
            }
        } else {
            int k = 0;
            while (k < NODE_MAX_PROBE && n->probe[k]) k++;
            if (k == NODE_MAX_PROBE) {
                ST_WARN("too many probe links, dropping %s", p->addr);
                xport_close(x);
            } else {
                n->probe[k] = x, n->probe_bulk[k] = 0;
                ST_DEBUG("probe link from %s (node %s, %s)", p->addr, p->node_id, xport_kind_name(x));
            }
        }
    }
    n->n_queue = 0;
    pthread_mutex_unlock(&n->mu);
}

static int node_loop(node *n) {
    xport_msg m;
    st_err err = {0};
    while (!*n->stop) {
        int busy = 0;
        if (n->loaded)
            for (int s = 0; s < n->load.n_slots; s++)
                if ((n->slots[s].active && n->slots[s].prefilled < n->slots[s].n_prompt) || n->slots[s].pending_local)
                    busy = 1;
        /* a GPU step in flight: poll its flag without sleeping; a GPU stage that ran a step in
         * the last 20 ms keeps polling its links too (a core per GPU node, like NCCL's proxy
         * threads): waking from poll() costs tens of microseconds per hop */
        if (n->gp.active || (n->gpu && st_time_ns() - n->gp.t_last < 20000000ull)) busy = 1;
        xport *xs[NODE_MAX_PROBE + NODE_MAX_CTRL + 2];
        int nx = 0;
        /* probe links first: xport_wait sleeps on the first shared-memory ring it finds */
        for (int i = 0; i < NODE_MAX_PROBE; i++) xs[nx++] = n->probe[i];
        for (int i = 0; i < NODE_MAX_CTRL; i++) xs[nx++] = n->ctrl[i];
        xs[nx++] = n->data_in;
        xs[nx++] = n->data_out;
        xport_wait(xs, nx, &n->pipe_rd, 1, busy ? 0 : 100);
        const uint64_t t_turn = st_time_ns();
        int probed = 0;
        take_new_links(n);
        for (int i = 0; i < NODE_MAX_CTRL; i++) {
            while (n->ctrl[i]) {
                int r = xport_recv(n->ctrl[i], &m, &err);
                if (r < 0) {
                    drop_ctrl(n, i, err.msg);
                    break;
                }
                if (r == 0) break;
                xport *x = n->ctrl[i];
                probed |= m.type == CP_PROBE_REQ || m.type == CP_LOAD; /* seconds by design, before a run */
                on_control(n, x, &m);
                if (n->ctrl[i] == x) xport_release(x);
            }
        }
        const uint64_t t_probe = st_time_ns();
        for (int i = 0; i < NODE_MAX_PROBE; i++) {
            while (n->probe[i]) {
                int r = xport_recv(n->probe[i], &m, &err);
                if (r == 0) break;
                if (r < 0 || lp_serve(n->probe[i], &m, &n->probe_bulk[i]) < 0) {
                    if (r > 0) ST_WARN("probe link %s: bad frame 0x%x, closed", xport_get_peer(n->probe[i])->addr, m.type);
                    xport_close(n->probe[i]); /* the prober closed it: done */
                    n->probe[i] = NULL;
                    break;
                }
                xport_release(n->probe[i]);
            }
        }
        /* a bounded share of data messages per turn: with many sequences in flight the input
         * ring is never empty, and draining it to the end starved the control links (the
         * coordinator declared the node dead for a missing heartbeat) */
        const uint64_t t_data = st_time_ns();
        int n_data = 0;
        for (int k = 0; n->data_in && k < NODE_DATA_BURST && st_time_ns() - t_data < NODE_DATA_BURST_NS; k++) {
            int r = xport_recv(n->data_in, &m, &err);
            if (r < 0) {
                ST_WARN("upstream data link lost: %s", err.msg);
                xport_close(n->data_in), n->data_in = NULL;
                break;
            }
            if (r == 0) break;
            uint64_t t_in = st_time_ns();
            n_data++;
            if (m.type == DP_ACT) on_act(n, m.data, m.len, t_in);
            else if (m.type == DP_TOKEN) on_token(n, m.data, m.len, t_in);
            else if (m.type == CP_NCCL_ID) on_nccl_id(n, m.data, m.len);
            else ST_WARN("data message type 0x%x dropped", m.type);
            if (n->data_in) xport_release(n->data_in);
        }
        merge_flush(n); /* the decode rows this turn drained, as one step */
#ifdef STRATA_HAVE_CUDA
        /* a step with NCCL io past its timeout: gpu_drain aborts the link and reports it */
        if (n->gp.active && (cuda_stage_done(n->gpu) ||
                             (n->gp.io && st_time_ns() - n->gp.t0 > (uint64_t)n->ncl_timeout_ms * 1000000ull)))
            gpu_drain(n);
        if (n->join_in) ncl_join_tick(n, 0);
#endif
        if (n->data_out) {
            xport_flush(n->data_out);
            int r = xport_recv(n->data_out, &m, &err);
            if (r < 0) {
                ST_WARN("downstream data link lost: %s", err.msg);
                xport_close(n->data_out), n->data_out = NULL;
            } else if (r == 1) {
                cp_nccl_ack a;
                st_err e2 = {0};
                if (m.type == CP_NCCL_ACK && ncl_parse_ack(m.data, m.len, n->load.epoch, &a, &e2) == 0 && a.status) {
                    if (n->nc_out)
                        ST_WARN("stage %d: NCCL link to stage %d: %s; host copy path", n->load.stage, n->load.stage + 1,
                                a.msg);
                    xport_release(n->data_out);
                    ncl_drop(n, CUDA_STAGE_OUT_NCCL, a.msg);
                } else {
                    ST_WARN("unexpected frame 0x%x on the downstream link dropped", m.type);
                    xport_release(n->data_out);
                }
            }
        }
        for (int i = 0; i < NODE_MAX_CTRL; i++)
            if (n->ctrl[i]) xport_flush(n->ctrl[i]);
        /* the end of a pull that did not fit the socket waits in the send queue: the prober
         * sends nothing more until it has it, so only this flush delivers it */
        for (int i = 0; i < NODE_MAX_PROBE; i++)
            if (n->probe[i]) xport_flush(n->probe[i]);
        if (n->data_in) xport_flush(n->data_in); /* NCCL acks go back upstream */
        const uint64_t t_local = st_time_ns();
        /* stage 0 work queued locally: one prefill chunk per slot, local decodes, round robin
         * from where the last turn stopped, until NODE_DATA_BURST_NS is spent (at least one
         * piece): 16 sequences starting together ran 16 chunks in one turn, seconds without
         * answering a heartbeat on a busy machine */
        if (n->loaded && n->load.stage == 0) {
            if (n->load.batch_rows > 1) decode_batches(n); /* decodes first: they are one step each */
            const int S = n->load.n_slots;
            for (int k = 0; k < S; k++) {
                const int s = (n->rr_local + k) % S;
                slot_state *ss = &n->slots[s];
                if (ss->active && ss->prefilled < ss->n_prompt) prefill_chunk(n, s);
                else if (ss->pending_local) {
                    ss->pending_local = 0;
                    decode_step(n, s, ss->pend_tok, ss->pend_pos, 0);
                } else continue;
                if (st_time_ns() - t_local > NODE_DATA_BURST_NS) {
                    n->rr_local = (s + 1) % S;
                    break;
                }
            }
        }
        /* a turn this long keeps the coordinator's heartbeats waiting (it declares a node dead
         * after 1.5 s by default): say where it went */
        const uint64_t t_end = st_time_ns();
        if (!probed && t_end - t_turn > 1000000000ull)
            ST_WARN("loop turn of %.0f ms (control %.0f ms, probes %.0f ms, %d data messages %.0f ms, local prefill / "
                    "decode %.0f ms): heartbeats wait",
                    (t_end - t_turn) / 1e6, (t_probe - t_turn) / 1e6, (t_data - t_probe) / 1e6, n_data,
                    (t_local - t_data) / 1e6, (t_end - t_local) / 1e6);
    }
    return 0;
}

int node_run(const node_opts *o, volatile sig_atomic_t *stop, st_err *err) {
    node *n = calloc(1, sizeof *n);
    if (!n) return st_err_set(err, ST_ERR_NOMEM, "node");
    n->o = o;
    n->stop = stop;
    n->listen_fd = n->pipe_rd = n->pipe_wr = -1;
    int rc = 0, port = 0, thread = 0;
    pthread_mutex_init(&n->mu, NULL);
    n->cuda_dev = -1;
    n->ncl_timeout_ms = ncl_timeout_ms();
    if (getenv("STRATA_TEST_NCCL_SKIP_RECV")) n->ncl_test_skip = atoi(getenv("STRATA_TEST_NCCL_SKIP_RECV"));
    if (o->device && strcmp(o->device, "cpu")) {
        char *end = NULL;
        if (!strcmp(o->device, "cuda")) n->cuda_dev = 0;
        else if (!strncmp(o->device, "cuda:", 5) && o->device[5]) n->cuda_dev = (int)strtol(o->device + 5, &end, 10);
        if (n->cuda_dev < 0 || (end && *end)) {
            rc = st_err_set(err, ST_ERR_ARG, "--device: expected cpu, cuda or cuda:N, got '%s'", o->device);
            goto out;
        }
        char why[256] = "";
        int ng = st_gpu_count(why, sizeof why);
        if (n->cuda_dev >= ng) {
            if (ng == 0) ST_WARN("--device %s: no usable GPU (%s); this node runs its stages on the CPU", o->device, why);
            else ST_WARN("--device %s: only %d CUDA device(s); this node runs its stages on the CPU", o->device, ng);
            n->cuda_dev = -1;
        }
    }
    if ((rc = xport_key_init(&n->key, o->cluster_key, err))) goto out;
    if ((rc = node_identity(n, err))) goto out;
    node_devices(n);
    if ((rc = xport_listen(&n->listen_fd, o->listen, &port, err))) goto out;
    int pp[2];
    if (pipe(pp)) {
        rc = st_err_set(err, ST_ERR_IO, "pipe: %s", strerror(errno));
        goto out;
    }
    n->pipe_rd = pp[0], n->pipe_wr = pp[1];
    fcntl(n->pipe_rd, F_SETFL, O_NONBLOCK);
    if (pthread_create(&n->acc_thread, NULL, accept_main, n)) {
        rc = st_err_set(err, ST_ERR_INTERNAL, "cannot start the accept thread");
        goto out;
    }
    thread = 1;
    ST_INFO("node %s listening on %s (port %d)", n->node_id, o->listen, port);
    if (o->beacon_port > 0) {
        const char *colon = strrchr(o->listen, ':');
        int hl = colon ? (int)(colon - o->listen) : 0;
        snprintf(n->beacon_addr, sizeof n->beacon_addr, "%.*s:%d", hl, o->listen, port);
        if (!strncmp(n->beacon_addr, "127.", 4) || !strncmp(n->beacon_addr, "localhost:", 10))
            ST_WARN("beacon: announcing a loopback address (%s): only this host can use it", n->beacon_addr);
        if (pthread_create(&n->beacon_thread, NULL, beacon_main, n)) {
            rc = st_err_set(err, ST_ERR_INTERNAL, "cannot start the beacon thread");
            goto out;
        }
        thread = 2;
        ST_INFO("beacon: announcing %s on UDP port %d every %d ms", n->beacon_addr, o->beacon_port,
                o->beacon_ms > 0 ? o->beacon_ms : 1000);
    }
    if (o->port_file) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", o->port_file);
        FILE *f = fopen(tmp, "w");
        if (f) {
            fprintf(f, "%d\n", port);
            fclose(f);
            rename(tmp, o->port_file);
        }
    }
    rc = node_loop(n);
out:
    n->acc_stop = 1;
    if (thread) pthread_join(n->acc_thread, NULL);
    if (thread == 2) pthread_join(n->beacon_thread, NULL);
    for (int i = 0; i < n->n_queue; i++) xport_close(n->queue[i]);
    for (int i = 0; i < NODE_MAX_CTRL; i++) xport_close(n->ctrl[i]);
    for (int i = 0; i < NODE_MAX_PROBE; i++) xport_close(n->probe[i]);
    xport_close(n->data_in);
    stage_unload(n);
    if (n->listen_fd >= 0) close(n->listen_fd);
    if (n->pipe_rd >= 0) close(n->pipe_rd), close(n->pipe_wr);
    pthread_mutex_destroy(&n->mu);
    free(n);
    ST_INFO("node stopped");
    return rc;
}
