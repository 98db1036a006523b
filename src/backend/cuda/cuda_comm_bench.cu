// cuda_comm_bench.cu — the measurements of `strata comm-bench` (see strata/cuda_comm.h): NCCL
// send/recv and all-reduce, and the one-shot peer all-reduce, on the GPUs of this process, each
// plain (launch + synchronise per operation) and inside a CUDA graph.
//
// One host thread per GPU drives its rank (NCCL's documentation warns that graphs of several
// GPUs driven by one thread can deadlock); the threads meet at a barrier before and after each
// timed loop, and rank 0 reads the clock at those barriers. Every rank has three input buffers
// of small-integer patterns (different per rank and buffer) and three output buffers; operation
// j uses buffer j % 3, so consecutive calls carry different data and a stale receive slot shows
// up as a wrong sum. Outputs are set to NaN before each measurement and checked bit for bit
// afterwards (integer sums are exact in fp32).
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif
#include "strata/cuda_comm.h"

#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NBUF 3

struct cuda_comm_bench {
    cuda_comm_bench_opts o;
    int n;
    int dev[CUDA_PEER_MAX_RANKS];
    cudaStream_t st[CUDA_PEER_MAX_RANKS];
    float *in[CUDA_PEER_MAX_RANKS][NBUF];  // on dev[r]: [max_floats] fp32, pattern (r, m)
    float *out[CUDA_PEER_MAX_RANKS][NBUF]; // on dev[r]: [max_floats] fp32
    float *host;                           // [max_floats] staging for checks
    size_t max_floats;
    cuda_nccl_comm *comm[CUDA_PEER_MAX_RANKS]; // NULL when NCCL is not available
    cuda_peer_group *peer;                     // NULL when peer access is not available
    cuda_comm_bench_info info;
};

// Rank r's input m, element i: a small integer in [-30, 30] (sums of 8 ranks stay exact).
static __host__ __device__ inline float pattern(int r, int m, size_t i) {
    return (float)((int)((i * 131u + (size_t)r * 7919u + (size_t)m * 31u) % 61u) - 30);
}

static __global__ void k_fill(float *x, size_t n, int r, int m) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = pattern(r, m, i);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define CB_TRY(call)                                                                                                 \
    do {                                                                                                             \
        cudaError_t e_ = (call);                                                                                     \
        if (e_ != cudaSuccess) {                                                                                     \
            cudaGetLastError();                                                                                      \
            return st_err_set(err, e_ == cudaErrorMemoryAllocation ? ST_ERR_NOMEM : ST_ERR_INTERNAL,                \
                              "comm-bench: %s failed: %s", #call, cudaGetErrorString(e_));                           \
        }                                                                                                            \
    } while (0)

extern "C" void cuda_comm_bench_free(cuda_comm_bench *b) {
    if (!b) return;
    for (int r = 0; r < b->n; r++) {
        if (cudaSetDevice(b->dev[r]) != cudaSuccess) continue;
        cudaDeviceSynchronize();
        cuda_nccl_free(b->comm[r]);
        for (int m = 0; m < NBUF; m++) cudaFree(b->in[r][m]), cudaFree(b->out[r][m]);
        if (b->st[r]) cudaStreamDestroy(b->st[r]);
    }
    cuda_peer_group_free(b->peer);
    cudaFreeHost(b->host);
    cudaGetLastError();
    free(b);
}

// Fills the bench after allocation (b->n, b->dev set); on failure the caller frees b.
static int bench_setup(cuda_comm_bench *b, st_err *err) {
    const size_t bytes = b->max_floats * sizeof(float);
    CB_TRY(cudaMallocHost(&b->host, bytes));
    for (int r = 0; r < b->n; r++) {
        CB_TRY(cudaSetDevice(b->dev[r]));
        CB_TRY(cudaStreamCreateWithFlags(&b->st[r], cudaStreamNonBlocking));
        for (int m = 0; m < NBUF; m++) {
            CB_TRY(cudaMalloc(&b->in[r][m], bytes));
            CB_TRY(cudaMalloc(&b->out[r][m], bytes));
            k_fill<<<64, 256, 0, b->st[r]>>>(b->in[r][m], b->max_floats, r, m);
            CB_TRY(cudaGetLastError());
        }
        CB_TRY(cudaStreamSynchronize(b->st[r]));
    }
    cudaDeviceProp p;
    CB_TRY(cudaGetDeviceProperties(&p, b->dev[0]));
    snprintf(b->info.device, sizeof b->info.device, "%s (sm_%d%d)", p.name, p.major, p.minor);
    b->info.n_gpus = b->n;
    if (b->n >= 2) {
        int v = 0;
        if (cudaDeviceGetP2PAttribute(&v, cudaDevP2PAttrPerformanceRank, b->dev[0], b->dev[1]) == cudaSuccess)
            b->info.p2p_link[0] = v;
        if (cudaDeviceGetP2PAttribute(&v, cudaDevP2PAttrAccessSupported, b->dev[0], b->dev[1]) == cudaSuccess)
            b->info.p2p_link[1] = v;
        cudaGetLastError();
    }
    st_err e2 = {};
    if (cuda_nccl_load(&e2) == ST_OK && cuda_nccl_init_all(b->comm, b->n, b->dev, &e2) == ST_OK) {
        b->info.nccl_version = cuda_nccl_version();
    } else {
        for (int r = 0; r < b->n; r++) b->comm[r] = NULL;
        snprintf(b->info.nccl_why, sizeof b->info.nccl_why, "%s", e2.msg);
    }
    st_err e3 = {};
    if (cuda_peer_group_init(&b->peer, b->n, b->dev, b->max_floats, &e3) == ST_OK) b->info.peer_ok = 1;
    else snprintf(b->info.peer_why, sizeof b->info.peer_why, "%s", e3.msg);
    return ST_OK;
}

extern "C" int cuda_comm_bench_init(cuda_comm_bench **out, const cuda_comm_bench_opts *o, st_err *err) {
    *out = NULL;
    int n_dev = 0;
    cudaError_t ce = cudaGetDeviceCount(&n_dev);
    if (ce != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        return st_err_set(err, ST_ERR_UNSUPPORTED, "no CUDA device (%s)",
                          ce != cudaSuccess ? cudaGetErrorString(ce) : "none found");
    }
    if (o->n_gpus < 1 || o->n_gpus > n_dev || o->n_gpus > CUDA_PEER_MAX_RANKS)
        return st_err_set(err, ST_ERR_ARG, "--gpus %d: %d CUDA device(s) present (at most %d used)", o->n_gpus, n_dev,
                          CUDA_PEER_MAX_RANKS);
    if (o->max_bytes < 4 || o->iters < 1 || o->graph_ops < 1)
        return st_err_set(err, ST_ERR_ARG, "comm-bench: bad sizes or counts");
    cuda_comm_bench *b = (cuda_comm_bench *)calloc(1, sizeof *b);
    if (!b) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    b->o = *o;
    b->n = o->n_gpus;
    b->max_floats = o->max_bytes / sizeof(float);
    for (int r = 0; r < b->n; r++) b->dev[r] = r;
    int prev = 0;
    cudaGetDevice(&prev);
    int rc = bench_setup(b, err);
    cudaSetDevice(prev);
    if (rc) {
        cuda_comm_bench_free(b);
        return rc;
    }
    *out = b;
    return ST_OK;
}

extern "C" void cuda_comm_bench_get_info(const cuda_comm_bench *b, cuda_comm_bench_info *info) { *info = b->info; }

// ---------------------------------------------------------------------------------------------
// one measurement: a thread per rank

struct bench_shared {
    cuda_comm_bench *b;
    int kind, mode;
    size_t n;                // floats per message
    pthread_barrier_t bar;
    volatile int failed;     // any rank failed a step: the others skip the GPU work after it
    double t0, t1;           // rank 0's clock at the barriers around the timed loop
    int ops;                 // operations timed (send/recv: round trips)
    char why[128];
    pthread_mutex_t mu;
};

struct bench_rank {
    bench_shared *s;
    int r;
};

static void bench_fail(bench_shared *s, const char *fmt, const char *a, const char *b2) {
    pthread_mutex_lock(&s->mu);
    if (!s->failed) snprintf(s->why, sizeof s->why, fmt, a, b2);
    s->failed = 1;
    pthread_mutex_unlock(&s->mu);
}

// Enqueues operation j of rank r on its stream; 0 or -1 (s->why set).
static int bench_op(bench_shared *s, int r, int j) {
    cuda_comm_bench *b = s->b;
    const int m = j % NBUF;
    cudaStream_t st = b->st[r];
    st_err e = {};
    int rc = ST_OK;
    switch (s->kind) {
    case CUDA_COMM_SENDRECV: // ping-pong between ranks 0 and 1; other ranks idle
        if (r == 0) {
            rc = cuda_nccl_send_f32(b->comm[0], b->in[0][m], s->n, 1, st, &e);
            if (!rc) rc = cuda_nccl_recv_f32(b->comm[0], b->out[0][m], s->n, 1, st, &e);
        } else if (r == 1) {
            rc = cuda_nccl_recv_f32(b->comm[1], b->out[1][m], s->n, 0, st, &e);
            if (!rc) rc = cuda_nccl_send_f32(b->comm[1], b->in[1][m], s->n, 0, st, &e);
        }
        break;
    case CUDA_COMM_NCCL_ALLREDUCE: rc = cuda_nccl_allreduce_f32(b->comm[r], b->in[r][m], b->out[r][m], s->n, st, &e); break;
    case CUDA_COMM_PEER_ALLREDUCE:
        rc = cuda_peer_allreduce(b->peer, r, b->in[r][m], b->out[r][m], s->n, st);
        if (rc) snprintf(e.msg, sizeof e.msg, "peer all-reduce launch: %s", cudaGetErrorString(cudaGetLastError()));
        break;
    }
    if (rc) {
        bench_fail(s, "%s%s", e.msg, "");
        return -1;
    }
    return 0;
}

static void bench_sync(bench_shared *s, int r) {
    cudaError_t e = cudaStreamSynchronize(s->b->st[r]);
    if (e != cudaSuccess) bench_fail(s, "cudaStreamSynchronize: %s%s", cudaGetErrorString(e), "");
}

static void *bench_rank_main(void *arg) {
    bench_rank *br = (bench_rank *)arg;
    bench_shared *s = br->s;
    cuda_comm_bench *b = s->b;
    const int r = br->r;
    const int idle = s->kind == CUDA_COMM_SENDRECV && r >= 2;
    cudaSetDevice(b->dev[r]);
    const int warm = 10;
    if (s->mode == CUDA_COMM_PLAIN) {
        for (int j = 0; j < warm && !s->failed && !idle; j++)
            if (!bench_op(s, r, j)) bench_sync(s, r);
        pthread_barrier_wait(&s->bar);
        if (r == 0) s->t0 = now_s();
        for (int j = 0; j < b->o.iters && !s->failed && !idle; j++)
            if (!bench_op(s, r, j)) bench_sync(s, r);
        pthread_barrier_wait(&s->bar);
        if (r == 0) s->t1 = now_s(), s->ops = b->o.iters;
        return NULL;
    }
    // graph: graph_ops operations captured on this rank's stream (thread-local capture mode)
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    const int reps = b->o.iters / b->o.graph_ops > 3 ? b->o.iters / b->o.graph_ops : 3;
    if (!idle) {
        cudaError_t e = cudaStreamBeginCapture(b->st[r], cudaStreamCaptureModeThreadLocal);
        if (e != cudaSuccess) bench_fail(s, "cudaStreamBeginCapture: %s%s", cudaGetErrorString(e), "");
        else {
            for (int j = 0; j < b->o.graph_ops; j++)
                if (bench_op(s, r, j)) break;
            e = cudaStreamEndCapture(b->st[r], &graph);
            if (e != cudaSuccess) bench_fail(s, "capture: %s%s", cudaGetErrorString(e), "");
            else if ((e = cudaGraphInstantiate(&exec, graph, 0)) != cudaSuccess)
                bench_fail(s, "cudaGraphInstantiate: %s%s", cudaGetErrorString(e), "");
        }
        cudaGetLastError();
    }
    pthread_barrier_wait(&s->bar); // every rank captured (or someone failed: nobody launches)
    if (!s->failed && !idle) {
        cudaError_t e = cudaGraphLaunch(exec, b->st[r]); // warm-up replay (uploads the graph)
        if (e != cudaSuccess) bench_fail(s, "cudaGraphLaunch: %s%s", cudaGetErrorString(e), "");
        else bench_sync(s, r);
    }
    pthread_barrier_wait(&s->bar);
    if (r == 0) s->t0 = now_s();
    for (int k = 0; k < reps && !s->failed && !idle; k++) {
        cudaError_t e = cudaGraphLaunch(exec, b->st[r]);
        if (e != cudaSuccess) bench_fail(s, "cudaGraphLaunch: %s%s", cudaGetErrorString(e), "");
        else bench_sync(s, r);
    }
    pthread_barrier_wait(&s->bar);
    if (r == 0) s->t1 = now_s(), s->ops = reps * b->o.graph_ops;
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    return NULL;
}

// Counts elements of rank r's output m (n floats) that differ from the expected result.
static long bench_check_one(cuda_comm_bench *b, int kind, int r, int m, size_t n, st_err *err) {
    if (kind == CUDA_COMM_SENDRECV && r >= 2) return 0;
    CB_TRY(cudaSetDevice(b->dev[r]));
    CB_TRY(cudaMemcpy(b->host, b->out[r][m], n * sizeof(float), cudaMemcpyDeviceToHost));
    long bad = 0;
    for (size_t i = 0; i < n; i++) {
        float want;
        if (kind == CUDA_COMM_SENDRECV) want = pattern(1 - r, m, i); // what the other end sent
        else {
            want = pattern(0, m, i);
            for (int p = 1; p < b->n; p++) want += pattern(p, m, i);
        }
        if (memcmp(&want, &b->host[i], sizeof want)) bad++;
    }
    return bad;
}

// Runs one (kind, mode) at n floats; fills row->us / bad / why.
static void bench_measure(cuda_comm_bench *b, int kind, int mode, size_t n, cuda_comm_bench_row *row) {
    char *why = row->why[kind][mode];
    row->us[kind][mode] = -1;
    row->bad[kind][mode] = 0;
    row->status[kind][mode] = CUDA_COMM_SKIPPED;
    why[0] = 0;
    if (kind != CUDA_COMM_PEER_ALLREDUCE && !b->comm[0]) {
        snprintf(why, 128, "NCCL not available");
        return;
    }
    if (kind == CUDA_COMM_SENDRECV && b->n < 2) {
        snprintf(why, 128, "needs 2 GPUs");
        return;
    }
    if (kind == CUDA_COMM_PEER_ALLREDUCE && !b->peer) {
        snprintf(why, 128, "no peer access");
        return;
    }
    row->status[kind][mode] = CUDA_COMM_FAILED; // until measured and checked
    for (int r = 0; r < b->n; r++) { // NaN outputs: a result that is never written cannot pass
        cudaSetDevice(b->dev[r]);
        for (int m = 0; m < NBUF; m++) cudaMemset(b->out[r][m], 0xff, n * sizeof(float));
        cudaDeviceSynchronize();
    }
    bench_shared s;
    memset(&s, 0, sizeof s);
    s.b = b, s.kind = kind, s.mode = mode, s.n = n;
    pthread_barrier_init(&s.bar, NULL, (unsigned)b->n);
    pthread_mutex_init(&s.mu, NULL);
    pthread_t th[CUDA_PEER_MAX_RANKS];
    bench_rank br[CUDA_PEER_MAX_RANKS];
    int started = 0;
    for (int r = 0; r < b->n; r++) {
        br[r].s = &s, br[r].r = r;
        if (pthread_create(&th[r], NULL, bench_rank_main, &br[r])) break;
        started++;
    }
    ST_ASSERT(started == b->n); // a barrier of n would wait forever for a thread that never started
    for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&s.bar);
    pthread_mutex_destroy(&s.mu);
    if (kind == CUDA_COMM_PEER_ALLREDUCE) {
        for (int r = 0; r < b->n; r++) {
            st_err e = {};
            if (cuda_peer_error(b->peer, r, &e) && !s.failed) {
                s.failed = 1;
                snprintf(s.why, sizeof s.why, "%s", e.msg);
            }
        }
        if (s.failed) {
            st_err e = {};
            cuda_peer_group_reset(b->peer, &e);
        }
    }
    if (s.failed) {
        snprintf(why, 128, "%s", s.why);
        return;
    }
    const double per = kind == CUDA_COMM_SENDRECV ? 2.0 : 1.0; // one way = round trip / 2
    row->us[kind][mode] = (s.t1 - s.t0) * 1e6 / ((double)s.ops * per);
    long bad = 0;
    for (int r = 0; r < b->n; r++)
        for (int m = 0; m < NBUF; m++) {
            st_err e = {};
            long k = bench_check_one(b, kind, r, m, n, &e);
            if (k < 0) {
                snprintf(why, 128, "check: %s", e.msg);
                return;
            }
            bad += k;
        }
    row->bad[kind][mode] = bad;
    if (bad) snprintf(why, 128, "%ld of %zu result values wrong", bad, n * (size_t)b->n * NBUF);
    else row->status[kind][mode] = CUDA_COMM_RAN;
}

extern "C" int cuda_comm_bench_run(cuda_comm_bench *b, size_t bytes, cuda_comm_bench_row *row, st_err *err) {
    if (bytes < 4 || bytes % 4 || bytes > b->max_floats * sizeof(float))
        return st_err_set(err, ST_ERR_ARG, "comm-bench: message of %zu bytes (multiples of 4 up to %zu)", bytes,
                          b->max_floats * sizeof(float));
    memset(row, 0, sizeof *row);
    row->bytes = bytes;
    int prev = 0;
    cudaGetDevice(&prev);
    for (int k = 0; k < CUDA_COMM_N_KINDS; k++)
        for (int mode = 0; mode < 2; mode++) bench_measure(b, k, mode, bytes / sizeof(float), row);
    cudaSetDevice(prev);
    cudaError_t e = cudaGetLastError();
    if (e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure)
        return st_err_set(err, ST_ERR_INTERNAL, "comm-bench: device error: %s", cudaGetErrorString(e));
    return ST_OK;
}

extern "C" int cuda_comm_bench_timeout_check(cuda_comm_bench *b, double *ms, char *msg, size_t cap, st_err *err) {
    *ms = -1;
    if (msg && cap) msg[0] = 0;
    if (!b->peer || b->n < 2)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "needs a peer group of 2 or more GPUs");
    int prev = 0;
    cudaGetDevice(&prev);
    CB_TRY(cudaSetDevice(b->dev[0]));
    const double t0 = now_s();
    int rc = cuda_peer_allreduce(b->peer, 0, b->in[0][0], b->out[0][0], 1024, b->st[0]);
    if (rc) {
        cudaSetDevice(prev);
        return st_err_set(err, ST_ERR_INTERNAL, "peer all-reduce launch failed");
    }
    CB_TRY(cudaStreamSynchronize(b->st[0]));
    *ms = (now_s() - t0) * 1e3;
    st_err e = {};
    rc = cuda_peer_error(b->peer, 0, &e);
    if (msg && cap) snprintf(msg, cap, "%s", rc ? e.msg : "no error reported");
    st_err e2 = {};
    int rc2 = cuda_peer_group_reset(b->peer, &e2);
    cudaSetDevice(prev);
    if (rc2) return st_err_set(err, rc2, "%s", e2.msg);
    if (rc != ST_ERR_NET) return st_err_set(err, ST_ERR_INTERNAL, "rank 0 alone: the kernel reported no timeout");
    return ST_OK;
}
