// cuda_comm.cu — collectives between GPUs (see strata/cuda_comm.h): NCCL loaded with dlopen at
// first use, and the one-shot peer all-reduce (device pieces in cuda_peer.cuh).
// base.h is C11 (_Noreturn); C++ spells it as an attribute.
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif
#include "strata/cuda_comm.h"

#include "cuda_peer.cuh"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// nccl.h supplies the types and signatures only (the library is never linked); it ships with
// the CUDA toolkit's NCCL package. Without it the wrapper builds and reports that at run time.
#if defined(__has_include)
#if __has_include(<nccl.h>)
#include <nccl.h>
#define STRATA_NCCL_HEADER 1
#endif
#endif

// ---------------------------------------------------------------------------------------------
// NCCL loader

#ifdef STRATA_NCCL_HEADER
struct nccl_api {
    decltype(&ncclGetVersion) GetVersion;
    decltype(&ncclGetUniqueId) GetUniqueId;
    decltype(&ncclCommInitAll) CommInitAll;
    decltype(&ncclCommInitRank) CommInitRank;
    decltype(&ncclCommDestroy) CommDestroy;
    decltype(&ncclCommAbort) CommAbort;
    decltype(&ncclGroupStart) GroupStart;
    decltype(&ncclGroupEnd) GroupEnd;
    decltype(&ncclAllReduce) AllReduce;
    decltype(&ncclSend) Send;
    decltype(&ncclRecv) Recv;
    decltype(&ncclGetErrorString) GetErrorString;
    decltype(&ncclGetLastError) GetLastError;
};
static nccl_api g_nccl;

struct cuda_nccl_comm {
    ncclComm_t comm;
    int rank, n_ranks, device;
};
#else
struct cuda_nccl_comm {
    int rank, n_ranks, device;
};
#endif

static pthread_mutex_t g_nccl_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_nccl_tried, g_nccl_rc, g_nccl_version;
static char g_nccl_msg[ST_ERR_MSG_MAX];

// Does the load under g_nccl_mu; records the outcome in g_nccl_rc / g_nccl_msg.
static int nccl_load_locked(void) {
#ifndef STRATA_NCCL_HEADER
    snprintf(g_nccl_msg, sizeof g_nccl_msg, "NCCL: strata was built without nccl.h (not on the CUDA toolkit's include path)");
    return ST_ERR_UNSUPPORTED;
#else
    // NVLink multicast (NVLS) stays off, whatever the environment says: it can take the shared
    // GPUs out of service. Set before the library reads its parameters.
    const char *prev = getenv("NCCL_NVLS_ENABLE");
    if (prev && strcmp(prev, "0")) ST_WARN("NCCL_NVLS_ENABLE=%s overridden to 0 (NVLink multicast stays off)", prev);
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    const char *env = getenv("STRATA_NCCL_LIB");
    const char *name = env && *env ? env : "libnccl.so.2";
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        snprintf(g_nccl_msg, sizeof g_nccl_msg,
                 "NCCL: cannot load %s (%s); install NCCL (e.g. pip nvidia-nccl-cu13) and add its lib dir to "
                 "LD_LIBRARY_PATH, or set STRATA_NCCL_LIB",
                 name, why ? why : "?");
        return ST_ERR_UNSUPPORTED;
    }
    struct {
        const char *sym;
        void **slot;
    } syms[] = {
        {"ncclGetVersion", (void **)&g_nccl.GetVersion},   {"ncclGetUniqueId", (void **)&g_nccl.GetUniqueId},
        {"ncclCommInitAll", (void **)&g_nccl.CommInitAll}, {"ncclCommInitRank", (void **)&g_nccl.CommInitRank},
        {"ncclCommDestroy", (void **)&g_nccl.CommDestroy}, {"ncclCommAbort", (void **)&g_nccl.CommAbort},
        {"ncclGroupStart", (void **)&g_nccl.GroupStart},
        {"ncclGroupEnd", (void **)&g_nccl.GroupEnd},       {"ncclAllReduce", (void **)&g_nccl.AllReduce},
        {"ncclSend", (void **)&g_nccl.Send},               {"ncclRecv", (void **)&g_nccl.Recv},
        {"ncclGetErrorString", (void **)&g_nccl.GetErrorString}, {"ncclGetLastError", (void **)&g_nccl.GetLastError},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].sym);
        if (!*syms[i].slot) {
            snprintf(g_nccl_msg, sizeof g_nccl_msg, "NCCL: %s has no %s (too old?)", name, syms[i].sym);
            dlclose(h);
            memset(&g_nccl, 0, sizeof g_nccl);
            return ST_ERR_UNSUPPORTED;
        }
    }
    int v = 0;
    if (g_nccl.GetVersion(&v) != ncclSuccess || v <= 0) {
        snprintf(g_nccl_msg, sizeof g_nccl_msg, "NCCL: ncclGetVersion failed in %s", name);
        return ST_ERR_UNSUPPORTED;
    }
    // the handle stays open for the life of the process (communicators may outlive any caller)
    g_nccl_version = v;
    ST_DEBUG("NCCL %d loaded from %s", v, name);
    return ST_OK;
#endif
}

extern "C" int cuda_nccl_load(st_err *err) {
    pthread_mutex_lock(&g_nccl_mu);
    if (!g_nccl_tried) {
        g_nccl_tried = 1;
        g_nccl_rc = nccl_load_locked();
    }
    int rc = g_nccl_rc;
    pthread_mutex_unlock(&g_nccl_mu);
    if (rc) return st_err_set(err, rc, "%s", g_nccl_msg);
    return ST_OK;
}

extern "C" int cuda_nccl_version(void) { return g_nccl_rc == ST_OK ? g_nccl_version : 0; }

extern "C" int cuda_nccl_rank(const cuda_nccl_comm *c) { return c->rank; }
extern "C" int cuda_nccl_device(const cuda_nccl_comm *c) { return c->device; }

#ifdef STRATA_NCCL_HEADER
// Formats an NCCL failure: the call, NCCL's error string and its last-error detail.
static int nccl_fail(st_err *err, ncclResult_t r, const char *what, ncclComm_t comm) {
    const char *detail = g_nccl.GetLastError ? g_nccl.GetLastError(comm) : NULL;
    return st_err_set(err, r == ncclInvalidArgument || r == ncclInvalidUsage ? ST_ERR_ARG : ST_ERR_INTERNAL,
                      "NCCL: %s failed: %s%s%s", what, g_nccl.GetErrorString(r), detail && *detail ? ": " : "",
                      detail ? detail : "");
}

#define NCCL_TRY(call, what, comm)                                                                                   \
    do {                                                                                                             \
        ncclResult_t r_ = (call);                                                                                    \
        if (r_ != ncclSuccess) return nccl_fail(err, r_, what, comm);                                                \
    } while (0)

#define NCCL_READY()                                                                                                 \
    do {                                                                                                             \
        int rc_ = cuda_nccl_load(err);                                                                               \
        if (rc_) return rc_;                                                                                         \
    } while (0)

extern "C" int cuda_nccl_get_id(uint8_t id[CUDA_NCCL_ID_BYTES], st_err *err) {
    static_assert(sizeof(ncclUniqueId) == CUDA_NCCL_ID_BYTES, "ncclUniqueId size");
    NCCL_READY();
    ncclUniqueId u;
    NCCL_TRY(g_nccl.GetUniqueId(&u), "ncclGetUniqueId", NULL);
    memcpy(id, &u, sizeof u);
    return ST_OK;
}

extern "C" int cuda_nccl_init_all(cuda_nccl_comm **comms, int n, const int *devices, st_err *err) {
    NCCL_READY();
    if (n < 1 || n > 64) return st_err_set(err, ST_ERR_ARG, "NCCL: %d GPUs for one process", n);
    ncclComm_t raw[64];
    NCCL_TRY(g_nccl.CommInitAll(raw, n, devices), "ncclCommInitAll", NULL);
    for (int i = 0; i < n; i++) {
        comms[i] = (cuda_nccl_comm *)calloc(1, sizeof(cuda_nccl_comm));
        if (!comms[i]) {
            for (int j = 0; j < n; j++) {
                if (j < i) free(comms[j]), comms[j] = NULL;
                g_nccl.CommDestroy(raw[j]);
            }
            return st_err_set(err, ST_ERR_NOMEM, "out of memory");
        }
        comms[i]->comm = raw[i];
        comms[i]->rank = i, comms[i]->n_ranks = n, comms[i]->device = devices[i];
    }
    return ST_OK;
}

extern "C" int cuda_nccl_init_rank(cuda_nccl_comm **out, const uint8_t id[CUDA_NCCL_ID_BYTES], int n_ranks, int rank,
                                   int device, st_err *err) {
    *out = NULL;
    NCCL_READY();
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return st_err_set(err, ST_ERR_ARG, "NCCL: rank %d of %d", rank, n_ranks);
    cuda_nccl_comm *c = (cuda_nccl_comm *)calloc(1, sizeof *c);
    if (!c) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int prev = 0;
    cudaGetDevice(&prev);
    cudaError_t ce = cudaSetDevice(device);
    if (ce != cudaSuccess) {
        free(c);
        cudaGetLastError();
        return st_err_set(err, ST_ERR_ARG, "NCCL: device %d: %s", device, cudaGetErrorString(ce));
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclResult_t r = g_nccl.CommInitRank(&c->comm, n_ranks, u, rank);
    if (r != ncclSuccess) {
        cudaSetDevice(prev);
        free(c);
        return nccl_fail(err, r, "ncclCommInitRank", NULL);
    }
    // Connect every peer now, while all ranks are here: NCCL connects point-to-point pairs at
    // their first send / recv, and that first call blocks on the host until the peer makes its
    // matching call. A pipeline stage enqueues its send before it tells the next stage (over
    // its own link) to post the receive, so a lazy connection deadlocked the first step (found
    // on nvidia-h200-x2: the sending node hung). One float each way in a group never blocks
    // on order.
    float *ping = nullptr;
    cudaStream_t st = nullptr;
    ce = cudaMalloc(&ping, 2 * sizeof(float) * (size_t)n_ranks);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    if (ce == cudaSuccess) {
        r = g_nccl.GroupStart();
        for (int p = 0; p < n_ranks && r == ncclSuccess; p++) {
            if (p == rank) continue;
            r = g_nccl.Send(ping + 2 * p, 1, ncclFloat32, p, c->comm, st);
            if (r == ncclSuccess) r = g_nccl.Recv(ping + 2 * p + 1, 1, ncclFloat32, p, c->comm, st);
        }
        const ncclResult_t r2 = g_nccl.GroupEnd();
        if (r == ncclSuccess) r = r2;
        if (r == ncclSuccess) ce = cudaStreamSynchronize(st);
    }
    if (st) cudaStreamDestroy(st);
    if (ping) cudaFree(ping);
    cudaSetDevice(prev);
    if (ce != cudaSuccess || r != ncclSuccess) {
        g_nccl.CommAbort(c->comm);
        free(c);
        cudaGetLastError();
        if (r != ncclSuccess) return nccl_fail(err, r, "connecting the peers (ncclSend / ncclRecv)", NULL);
        return st_err_set(err, ST_ERR_INTERNAL, "NCCL: connecting the peers: %s", cudaGetErrorString(ce));
    }
    c->rank = rank, c->n_ranks = n_ranks, c->device = device;
    *out = c;
    return ST_OK;
}

extern "C" void cuda_nccl_free(cuda_nccl_comm *c) {
    if (!c) return;
    if (c->comm) g_nccl.CommDestroy(c->comm);
    free(c);
}

extern "C" void cuda_nccl_abort(cuda_nccl_comm *c) {
    if (!c) return;
    if (c->comm) g_nccl.CommAbort(c->comm);
    free(c);
}

extern "C" int cuda_nccl_group_begin(st_err *err) {
    NCCL_READY();
    NCCL_TRY(g_nccl.GroupStart(), "ncclGroupStart", NULL);
    return ST_OK;
}

extern "C" int cuda_nccl_group_end(st_err *err) {
    NCCL_READY();
    NCCL_TRY(g_nccl.GroupEnd(), "ncclGroupEnd", NULL);
    return ST_OK;
}

// The enqueue wrappers skip NCCL_READY: a communicator exists only after a successful load.
extern "C" int cuda_nccl_allreduce_f32(cuda_nccl_comm *c, const float *in, float *out, size_t n, cuda_comm_stream st,
                                       st_err *err) {
    NCCL_TRY(g_nccl.AllReduce(in, out, n, ncclFloat32, ncclSum, c->comm, (cudaStream_t)st), "ncclAllReduce", c->comm);
    return ST_OK;
}

extern "C" int cuda_nccl_send_f32(cuda_nccl_comm *c, const float *buf, size_t n, int peer, cuda_comm_stream st,
                                  st_err *err) {
    NCCL_TRY(g_nccl.Send(buf, n, ncclFloat32, peer, c->comm, (cudaStream_t)st), "ncclSend", c->comm);
    return ST_OK;
}

extern "C" int cuda_nccl_recv_f32(cuda_nccl_comm *c, float *buf, size_t n, int peer, cuda_comm_stream st,
                                  st_err *err) {
    NCCL_TRY(g_nccl.Recv(buf, n, ncclFloat32, peer, c->comm, (cudaStream_t)st), "ncclRecv", c->comm);
    return ST_OK;
}
#else
// Built without nccl.h: every entry point reports the loader's message.
extern "C" int cuda_nccl_get_id(uint8_t id[CUDA_NCCL_ID_BYTES], st_err *err) { return cuda_nccl_load(err); }
extern "C" int cuda_nccl_init_all(cuda_nccl_comm **comms, int n, const int *devices, st_err *err) {
    return cuda_nccl_load(err);
}
extern "C" int cuda_nccl_init_rank(cuda_nccl_comm **out, const uint8_t id[CUDA_NCCL_ID_BYTES], int n_ranks, int rank,
                                   int device, st_err *err) {
    *out = NULL;
    return cuda_nccl_load(err);
}
extern "C" void cuda_nccl_free(cuda_nccl_comm *c) { free(c); }
extern "C" void cuda_nccl_abort(cuda_nccl_comm *c) { free(c); }
extern "C" int cuda_nccl_group_begin(st_err *err) { return cuda_nccl_load(err); }
extern "C" int cuda_nccl_group_end(st_err *err) { return cuda_nccl_load(err); }
extern "C" int cuda_nccl_allreduce_f32(cuda_nccl_comm *c, const float *in, float *out, size_t n, cuda_comm_stream st,
                                       st_err *err) {
    return cuda_nccl_load(err);
}
extern "C" int cuda_nccl_send_f32(cuda_nccl_comm *c, const float *buf, size_t n, int peer, cuda_comm_stream st,
                                  st_err *err) {
    return cuda_nccl_load(err);
}
extern "C" int cuda_nccl_recv_f32(cuda_nccl_comm *c, float *buf, size_t n, int peer, cuda_comm_stream st,
                                  st_err *err) {
    return cuda_nccl_load(err);
}
#endif

// ---------------------------------------------------------------------------------------------
// one-shot peer all-reduce: the group (host) and the kernel

struct cuda_peer_group {
    int n;
    int dev[CUDA_PEER_MAX_RANKS];
    size_t max_floats, stride;
    int max_chunks;
    unsigned timeout_ms;
    float *recv[CUDA_PEER_MAX_RANKS];     // on dev[r]: [2][n][stride]
    uint32_t *flags[CUDA_PEER_MAX_RANKS]; // on dev[r]: [n][max_chunks]
    uint32_t *state[CUDA_PEER_MAX_RANKS]; // on dev[r]: [CUDA_PEER_STATE_WORDS]
    cuda_peer_view view[CUDA_PEER_MAX_RANKS];
};

// The whole all-reduce as one kernel: one block per chunk of the message (cuda_peer.cuh).
template <bool VEC>
__global__ void __launch_bounds__(CUDA_PEER_THREADS) k_peer_allreduce(cuda_peer_view v, const float *in, float *out,
                                                                      size_t n) {
    const uint32_t e = cuda_peer_begin(v);
    if (!e) return;
    size_t b, end;
    cuda_peer_chunk_range(n, (int)gridDim.x, (int)blockIdx.x, 1, &b, &end);
    cuda_peer_push_signal<VEC>(v, e, (int)blockIdx.x, in, b, end);
    if (!cuda_peer_wait(v, e, (int)blockIdx.x)) cuda_peer_sum<VEC>(v, e, in, out, b, end);
    cuda_peer_end(v, e);
}

#define PEER_TRY(call)                                                                                               \
    do {                                                                                                             \
        cudaError_t e_ = (call);                                                                                     \
        if (e_ != cudaSuccess) {                                                                                     \
            cudaGetLastError();                                                                                      \
            rc = st_err_set(err, e_ == cudaErrorMemoryAllocation ? ST_ERR_NOMEM : ST_ERR_INTERNAL,                  \
                            "peer all-reduce: %s failed: %s", #call, cudaGetErrorString(e_));                        \
            goto fail;                                                                                               \
        }                                                                                                            \
    } while (0)

cuda_peer_view cuda_peer_group_view(const cuda_peer_group *g, int rank) {
    ST_ASSERT(rank >= 0 && rank < g->n);
    return g->view[rank];
}

extern "C" int cuda_peer_group_size(const cuda_peer_group *g) { return g->n; }
extern "C" int cuda_peer_group_device(const cuda_peer_group *g, int rank) {
    ST_ASSERT(rank >= 0 && rank < g->n);
    return g->dev[rank];
}

extern "C" void cuda_peer_group_free(cuda_peer_group *g) {
    if (!g) return;
    int prev = 0;
    cudaGetDevice(&prev);
    for (int r = 0; r < g->n; r++) {
        if (cudaSetDevice(g->dev[r]) != cudaSuccess) continue;
        cudaDeviceSynchronize(); // no kernel of the group may still run on the buffers
        cudaFree(g->recv[r]);
        cudaFree(g->flags[r]);
        cudaFree(g->state[r]);
    }
    cudaGetLastError();
    cudaSetDevice(prev);
    free(g);
}

extern "C" int cuda_peer_group_init(cuda_peer_group **out, int n, const int *devices, size_t max_floats,
                                    st_err *err) {
    *out = NULL;
    int n_dev = 0, prev = 0, rc = ST_OK;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess) {
        cudaGetLastError();
        n_dev = 0;
    }
    if (n < 1 || n > CUDA_PEER_MAX_RANKS)
        return st_err_set(err, ST_ERR_ARG, "peer all-reduce: %d GPUs (1..%d)", n, CUDA_PEER_MAX_RANKS);
    if (max_floats < 1) return st_err_set(err, ST_ERR_ARG, "peer all-reduce: empty maximum message");
    for (int i = 0; i < n; i++) {
        if (devices[i] < 0 || devices[i] >= n_dev)
            return st_err_set(err, ST_ERR_ARG, "peer all-reduce: no CUDA device %d (%d present)", devices[i], n_dev);
        for (int j = 0; j < i; j++)
            if (devices[j] == devices[i])
                return st_err_set(err, ST_ERR_ARG, "peer all-reduce: device %d listed twice", devices[i]);
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            int ok = 0;
            if (i == j) continue;
            if (cudaDeviceCanAccessPeer(&ok, devices[i], devices[j]) != cudaSuccess || !ok) {
                cudaGetLastError();
                return st_err_set(err, ST_ERR_UNSUPPORTED, "peer all-reduce: GPU %d cannot access GPU %d as a peer",
                                  devices[i], devices[j]);
            }
        }
    cuda_peer_group *g = (cuda_peer_group *)calloc(1, sizeof *g);
    if (!g) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    g->n = n;
    g->max_floats = max_floats;
    g->stride = cuda_peer_stride(max_floats);
    g->max_chunks = CUDA_PEER_MAX_CHUNKS;
    g->timeout_ms = 300;
    const char *tm = getenv("STRATA_PEER_TIMEOUT_MS");
    if (tm && *tm) {
        long v = strtol(tm, NULL, 10);
        if (v >= 1 && v <= 600000) g->timeout_ms = (unsigned)v;
        else ST_WARN("STRATA_PEER_TIMEOUT_MS=%s ignored (1..600000)", tm);
    }
    cudaGetDevice(&prev);
    for (int r = 0; r < n; r++) {
        g->dev[r] = devices[r];
        PEER_TRY(cudaSetDevice(devices[r]));
        for (int q = 0; q < n; q++) {
            if (q == r) continue;
            cudaError_t e = cudaDeviceEnablePeerAccess(devices[q], 0);
            if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
            else PEER_TRY(e);
        }
        size_t recv_floats = 2 * (size_t)n * g->stride, n_flags = (size_t)n * (size_t)g->max_chunks;
        PEER_TRY(cudaMalloc(&g->recv[r], recv_floats * sizeof(float)));
        PEER_TRY(cudaMalloc(&g->flags[r], n_flags * sizeof(uint32_t)));
        PEER_TRY(cudaMalloc(&g->state[r], CUDA_PEER_STATE_WORDS * sizeof(uint32_t)));
        PEER_TRY(cudaMemset(g->recv[r], 0, recv_floats * sizeof(float)));
        PEER_TRY(cudaMemset(g->flags[r], 0, n_flags * sizeof(uint32_t)));
        PEER_TRY(cudaMemset(g->state[r], 0, CUDA_PEER_STATE_WORDS * sizeof(uint32_t)));
        PEER_TRY(cudaDeviceSynchronize());
    }
    for (int r = 0; r < n; r++) {
        cuda_peer_view &v = g->view[r];
        memset(&v, 0, sizeof v);
        v.rank = r, v.n_ranks = n, v.max_chunks = g->max_chunks, v.stride = g->stride;
        v.timeout_ns = (unsigned long long)g->timeout_ms * 1000000ull;
        v.recv = g->recv[r], v.flags = g->flags[r], v.state = g->state[r];
        for (int p = 0; p < n; p++) v.peer_recv[p] = g->recv[p], v.peer_flags[p] = g->flags[p];
    }
    cudaSetDevice(prev);
    *out = g;
    return ST_OK;
fail:
    cudaSetDevice(prev);
    cuda_peer_group_free(g);
    return rc;
}

extern "C" int cuda_peer_allreduce(cuda_peer_group *g, int rank, const float *in, float *out, size_t n,
                                   cuda_comm_stream st) {
    ST_ASSERT(rank >= 0 && rank < g->n);
    ST_ASSERT(n <= g->max_floats);
    if (n == 0) return ST_OK; // every rank skips alike: the counters stay in step
    int cur = -1;
    cudaGetDevice(&cur);
    if (cur != g->dev[rank] && cudaSetDevice(g->dev[rank]) != cudaSuccess) {
        cudaGetLastError();
        return ST_ERR_INTERNAL;
    }
    const int grid = cuda_peer_n_chunks(n, 1, g->max_chunks);
    const bool vec = (((uintptr_t)in | (uintptr_t)out) & 15) == 0;
    if (vec) k_peer_allreduce<true><<<grid, CUDA_PEER_THREADS, 0, (cudaStream_t)st>>>(g->view[rank], in, out, n);
    else k_peer_allreduce<false><<<grid, CUDA_PEER_THREADS, 0, (cudaStream_t)st>>>(g->view[rank], in, out, n);
    return cudaPeekAtLastError() == cudaSuccess ? ST_OK : (cudaGetLastError(), ST_ERR_INTERNAL);
}

extern "C" int cuda_peer_error(cuda_peer_group *g, int rank, st_err *err) {
    ST_ASSERT(rank >= 0 && rank < g->n);
    int prev = 0, rc = ST_OK;
    uint32_t w = 0;
    cudaGetDevice(&prev);
    PEER_TRY(cudaSetDevice(g->dev[rank]));
    PEER_TRY(cudaMemcpy(&w, g->state[rank] + CUDA_PEER_STATE_ERR, sizeof w, cudaMemcpyDeviceToHost));
    if (w) {
        uint32_t zero = 0;
        PEER_TRY(cudaMemcpy(g->state[rank] + CUDA_PEER_STATE_ERR, &zero, sizeof zero, cudaMemcpyHostToDevice));
        rc = st_err_set(err, ST_ERR_NET,
                        "peer all-reduce: rank %d waited > %u ms for rank %d (block %d); the group is out of step "
                        "until reset",
                        rank, g->timeout_ms, cuda_peer_err_peer(w), cuda_peer_err_chunk(w));
    }
fail:
    cudaSetDevice(prev);
    return rc;
}

extern "C" int cuda_peer_group_reset(cuda_peer_group *g, st_err *err) {
    int prev = 0, rc = ST_OK;
    cudaGetDevice(&prev);
    for (int r = 0; r < g->n; r++) {
        PEER_TRY(cudaSetDevice(g->dev[r]));
        PEER_TRY(cudaDeviceSynchronize());
    }
    for (int r = 0; r < g->n; r++) {
        PEER_TRY(cudaSetDevice(g->dev[r]));
        PEER_TRY(cudaMemset(g->flags[r], 0, (size_t)g->n * (size_t)g->max_chunks * sizeof(uint32_t)));
        PEER_TRY(cudaMemset(g->state[r], 0, CUDA_PEER_STATE_WORDS * sizeof(uint32_t)));
        PEER_TRY(cudaDeviceSynchronize());
    }
fail:
    cudaSetDevice(prev);
    return rc;
}
