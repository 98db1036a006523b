// cuda_peer.cuh — the device side of the one-shot peer all-reduce (strata/cuda_comm.h), in
// pieces a kernel can fuse (e.g. all-reduce + residual add + RMSNorm in cuda_model.cu):
//
//   uint32_t e = cuda_peer_begin(v);              // epoch of this call; 0: the rank is poisoned
//   if (!e) return;                               //   (an earlier timeout): do nothing
//   cuda_peer_chunk_range(n, gridDim.x, blockIdx.x, 1, &b, &end);   // this block's elements
//   cuda_peer_push_signal<VEC>(v, e, blockIdx.x, x, b, end);        // x[b,end) to every peer
//   if (!cuda_peer_wait(v, e, blockIdx.x))                          // every peer's block arrived
//       ... read cuda_peer_src(v, e, p)[i] (__ldcg) for p != rank, x[i] for p == rank ...
//   cuda_peer_end(v, e);                          // every block, exactly once: advances the epoch
//
// Rules for a fused kernel: every block of the grid calls begin and end exactly once and uses
// chunk = blockIdx.x < v.max_chunks; every rank launches the same grid for the same n; a rank's
// calls are ordered on one stream (the next call starts after the previous one finished). The
// view is passed by value (frozen in a graph); all changing state is in device memory.
//
// Why two receive slots suffice. Rank r's call k writes slot k & 1 on peer q (epochs are k+1,
// the parity is the same). Its call k+2 writes the same slot again. Call k+2 starts only after
// r's call k+1 finished, and r's call k+1 finishes only after every one of its blocks saw q's
// flags of call k+1; q raises those in its call k+1, which started only after q's call k had
// finished — including every read of slot k & 1. So when r's call k+2 pushes, q is done reading
// call k's data. The flags need no reset either: a flag holds the latest epoch its source
// pushed, and while r waits in epoch e, q's flag is in [e-1, e+1] (q starts call e+2 only after
// finishing e+1, which needs r's flags of e+1, raised after r finished e), so `flag >= e` taken
// mod 2^32 is exact.
//
// Scheduling: block b of a rank waits only for block b of each peer, and pushes before it waits,
// so the blocks of one grid never wait for each other; a grid of <= max_chunks (64) blocks is
// resident at once on an otherwise idle H200 (132 SMs). If other kernels fill a GPU so that a
// peer's block b cannot start, the wait ends at the timeout instead of hanging.
//
// Memory ordering: pushes are plain stores through peer pointers (NVLink), then every thread
// runs __threadfence_system(), the block synchronises, and one thread per peer writes the flag
// with st.release.sys. The waiter reads flags with ld.acquire.sys, the block synchronises, and
// slot data is read with __ldcg (L2; never a stale L1 line).
//
// Bounded waits: after v.timeout_ns (%globaltimer) a waiter records cuda_peer_err_encode(peer,
// block) in state[ERR] and the block skips the sum; cuda_peer_begin returns 0 while the error
// word is set, so later calls (e.g. graph replays) return at once. The host reads and clears the
// word (cuda_peer_error) and re-arms the group (cuda_peer_group_reset).
#pragma once

#include "cuda_peer_proto.h"
#include "strata/cuda_comm.h"

#include <cuda_runtime.h>
#include <stdint.h>

struct cuda_peer_view {
    int rank, n_ranks;
    int max_chunks;                            // flags per source; grid size limit
    size_t stride;                             // floats per (slot, source) row
    unsigned long long timeout_ns;             // bound of one wait
    float *recv;                               // this rank's [2][n_ranks][stride] fp32
    uint32_t *flags;                           // this rank's [n_ranks][max_chunks]
    uint32_t *state;                           // this rank's [CUDA_PEER_STATE_WORDS]
    float *peer_recv[CUDA_PEER_MAX_RANKS];     // rank p's recv (device pointers, peer access)
    uint32_t *peer_flags[CUDA_PEER_MAX_RANKS]; // rank p's flags
};

// The view of `rank` (host; defined in cuda_comm.cu). Valid while the group lives.
cuda_peer_view cuda_peer_group_view(const cuda_peer_group *g, int rank);

__device__ __forceinline__ uint32_t cuda_peer_ld_acquire(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void cuda_peer_st_release(uint32_t *p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned long long cuda_peer_clock_ns(void) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Block-wide: the epoch of this call (read once by thread 0 and shared), or 0 when the rank's
// error word is set.
__device__ __forceinline__ uint32_t cuda_peer_begin(const cuda_peer_view &v) {
    __shared__ uint32_t s_epoch;
    if (threadIdx.x == 0) {
        volatile uint32_t *st = v.state;
        s_epoch = st[CUDA_PEER_STATE_ERR] ? 0u : cuda_peer_epoch_of(st[CUDA_PEER_STATE_CTR]);
    }
    __syncthreads();
    return s_epoch;
}

// This rank's receive row of source `src` for epoch e (src != v.rank).
__device__ __forceinline__ const float *cuda_peer_src(const cuda_peer_view &v, uint32_t e, int src) {
    return v.recv + cuda_peer_recv_offset(cuda_peer_slot_of(e), src, v.n_ranks, v.stride);
}

// Block-wide: stores x[begin, end) into row (slot of e, v.rank) of every peer's receive buffer
// at the same offsets, fences, and raises flag (v.rank, chunk) = e on every peer. VEC: x is
// 16-byte aligned and begin is a multiple of 4 (cuda_peer_chunk_range with vec = 1).
template <bool VEC>
__device__ __forceinline__ void cuda_peer_push_signal(const cuda_peer_view &v, uint32_t e, int chunk, const float *x,
                                                      size_t begin, size_t end) {
    const size_t row = cuda_peer_recv_offset(cuda_peer_slot_of(e), v.rank, v.n_ranks, v.stride);
    size_t i0 = begin;
    if (VEC) {
        const size_t nv = (end - begin) / 4;
        const float4 *s4 = reinterpret_cast<const float4 *>(x + begin);
        for (size_t i = threadIdx.x; i < nv; i += blockDim.x) {
            const float4 val = s4[i];
            for (int p = 0; p < v.n_ranks; p++)
                if (p != v.rank) reinterpret_cast<float4 *>(v.peer_recv[p] + row + begin)[i] = val;
        }
        i0 = begin + nv * 4;
    }
    for (size_t i = i0 + threadIdx.x; i < end; i += blockDim.x) {
        const float val = x[i];
        for (int p = 0; p < v.n_ranks; p++)
            if (p != v.rank) v.peer_recv[p][row + i] = val;
    }
    __threadfence_system();
    __syncthreads();
    const int p = (int)threadIdx.x;
    if (p < v.n_ranks && p != v.rank)
        cuda_peer_st_release(v.peer_flags[p] + cuda_peer_flag_index(v.rank, chunk, v.max_chunks), e);
}

// Block-wide: waits until every peer has raised flag (peer, chunk) to epoch e. Returns 0, or 1
// for every thread of the block when a wait timed out (the error word is recorded) or the rank
// is already poisoned by another block's timeout.
__device__ __forceinline__ int cuda_peer_wait(const cuda_peer_view &v, uint32_t e, int chunk) {
    int bad = 0;
    const int p = (int)threadIdx.x;
    if (p < v.n_ranks && p != v.rank) {
        const uint32_t *f = v.flags + cuda_peer_flag_index(p, chunk, v.max_chunks);
        if (!cuda_peer_flag_reached(cuda_peer_ld_acquire(f), e)) {
            const unsigned long long t0 = cuda_peer_clock_ns();
            for (uint32_t spin = 1;; spin++) {
                if (cuda_peer_flag_reached(cuda_peer_ld_acquire(f), e)) break;
                if ((spin & 63u) == 0) {
                    if (*(volatile uint32_t *)(v.state + CUDA_PEER_STATE_ERR)) {
                        bad = 1;
                        break;
                    }
                    if (cuda_peer_clock_ns() - t0 > v.timeout_ns) {
                        atomicCAS(v.state + CUDA_PEER_STATE_ERR, 0u, cuda_peer_err_encode(p, chunk));
                        bad = 1;
                        break;
                    }
                }
            }
        }
    }
    return __syncthreads_or(bad);
}

// Block-wide: out[i] = x_0[i] + x_1[i] + ... in rank order for i in [begin, end), x_p read from
// the receive rows (p != rank) or x (p == rank). The same additions in the same order on every
// rank give bitwise identical sums. out may equal x (each element is read, then written, by the
// same thread).
template <bool VEC>
__device__ __forceinline__ void cuda_peer_sum(const cuda_peer_view &v, uint32_t e, const float *x, float *out,
                                              size_t begin, size_t end) {
    const float *row0 = v.recv + cuda_peer_recv_offset(cuda_peer_slot_of(e), 0, v.n_ranks, v.stride);
    size_t i0 = begin;
    if (VEC) {
        const size_t nv = (end - begin) / 4;
        for (size_t i = threadIdx.x; i < nv; i += blockDim.x) {
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int p = 0; p < v.n_ranks; p++) {
                const float4 t = p == v.rank ? reinterpret_cast<const float4 *>(x + begin)[i]
                                             : __ldcg(reinterpret_cast<const float4 *>(row0 + (size_t)p * v.stride + begin) + i);
                if (p == 0) acc = t;
                else acc.x += t.x, acc.y += t.y, acc.z += t.z, acc.w += t.w;
            }
            reinterpret_cast<float4 *>(out + begin)[i] = acc;
        }
        i0 = begin + nv * 4;
    }
    for (size_t i = i0 + threadIdx.x; i < end; i += blockDim.x) {
        float acc = 0.f;
        for (int p = 0; p < v.n_ranks; p++) {
            const float t = p == v.rank ? x[i] : __ldcg(row0 + (size_t)p * v.stride + i);
            acc = p == 0 ? t : acc + t;
        }
        out[i] = acc;
    }
}

// Block-wide, every block exactly once per call: counts the block done; the last block of the
// grid resets the done-counter and advances the call counter to e (the next call, later on the
// stream, reads it in cuda_peer_begin).
__device__ __forceinline__ void cuda_peer_end(const cuda_peer_view &v, uint32_t e) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const uint32_t prev = atomicAdd(v.state + CUDA_PEER_STATE_DONE, 1u);
        if (prev == gridDim.x * gridDim.y * gridDim.z - 1) {
            volatile uint32_t *st = v.state;
            st[CUDA_PEER_STATE_DONE] = 0;
            st[CUDA_PEER_STATE_CTR] = e;
            __threadfence();
        }
    }
}
