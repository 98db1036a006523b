// cuda_tp.cuh — the tensor-parallel all-reduce points of a decode/prefill step, fused with the
// element-wise work that follows them (cuda_model.cu, struct cuda_tp). Each rank holds 1/n of
// the attention heads, KV heads and FFN / expert widths; the attention output projection and
// the FFN's down projection leave partial sums of the residual update, which these kernels
// reduce over the one-shot peer all-reduce of cuda_peer.cuh (push to every peer over NVLink,
// flag, wait, sum in rank order: every rank computes bitwise the same residual stream).
// Included by cuda_model.cu after cuda_kernels.cuh and cuda_peer.cuh.
#pragma once

#define TP_THREADS 1024

// Block-wide sum of v (TP_THREADS threads); every thread gets the total.
__device__ __forceinline__ float tp_block_sum(float v, float *sh /* [32] */) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads(); // sh may still be read by a previous call
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f;
    return warp_sum(t);
}

// Rows of this block: [r0, r1) of T, grid = min(T, max_chunks) blocks.
__device__ __forceinline__ void tp_rows(int T, int *r0, int *r1) {
    const int per = (T + (int)gridDim.x - 1) / (int)gridDim.x;
    *r0 = min(T, (int)blockIdx.x * per);
    *r1 = min(T, *r0 + per);
}

// x[T, n] += sum over ranks of y[T, n] (this rank's partial), then (NORM) out[T, n] =
// rmsnorm(x) * w. One block per run of rows; y is pushed to the peers, the sum is taken in rank
// order. A timed-out wait (cuda_peer_wait) leaves x unchanged; the host reports the stalled
// link after the step (cuda_peer_error).
template <bool NORM>
__global__ void __launch_bounds__(TP_THREADS)
    k_tp_add_rmsnorm(cuda_peer_view v, float *out, float *x, const float *y, const float *w, int T, int n, float eps) {
    PDL_ENTRY();
    __shared__ float sh[32];
    const uint32_t e = cuda_peer_begin(v);
    if (!e) return;
    int r0, r1;
    tp_rows(T, &r0, &r1);
    const size_t b = (size_t)r0 * n, end = (size_t)r1 * n;
    if (n % 4 == 0) cuda_peer_push_signal<true>(v, e, blockIdx.x, y, b, end);
    else cuda_peer_push_signal<false>(v, e, blockIdx.x, y, b, end);
    if (!cuda_peer_wait(v, e, blockIdx.x)) {
        const float *row0 = v.recv + cuda_peer_recv_offset(cuda_peer_slot_of(e), 0, v.n_ranks, v.stride);
        for (int r = r0; r < r1; r++) {
            float *xr = x + (size_t)r * n;
            float ss = 0.f;
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const size_t k = (size_t)r * n + i;
                float s = 0.f;
                for (int p = 0; p < v.n_ranks; p++) {
                    const float t = p == v.rank ? y[k] : __ldcg(row0 + (size_t)p * v.stride + k);
                    s = p == 0 ? t : s + t;
                }
                const float xi = xr[i] + s;
                xr[i] = xi;
                ss += xi * xi;
            }
            if (NORM) {
                const float inv = rsqrtf(tp_block_sum(ss, sh) / (float)n + eps);
                for (int i = threadIdx.x; i < n; i += blockDim.x) out[(size_t)r * n + i] = xr[i] * inv * w[i];
            }
        }
    }
    cuda_peer_end(v, e);
}

// Full-width QK-norm (minimax-m2: RMSNorm over all heads of q and of k) when the heads are split
// over the ranks: per row the local sums of squares of q [T, nq] and k [T, nk] go to scr[T, 2],
// are all-reduced, and q, k are scaled with the totals over nq_all / nk_all values and this
// rank's slices of the norm weights wq [nq], wk [nk].
__global__ void __launch_bounds__(TP_THREADS)
    k_tp_qk_norm_full(cuda_peer_view v, float *q, int nq, float *k, int nk, const float *wq, const float *wk,
                      float *scr, int T, int nq_all, int nk_all, float eps) {
    PDL_ENTRY();
    __shared__ float sh[32];
    const uint32_t e = cuda_peer_begin(v);
    if (!e) return;
    int r0, r1;
    tp_rows(T, &r0, &r1);
    for (int r = r0; r < r1; r++) {
        float sq = 0.f, sk = 0.f;
        for (int i = threadIdx.x; i < nq; i += blockDim.x) sq += q[(size_t)r * nq + i] * q[(size_t)r * nq + i];
        for (int i = threadIdx.x; i < nk; i += blockDim.x) sk += k[(size_t)r * nk + i] * k[(size_t)r * nk + i];
        sq = tp_block_sum(sq, sh);
        sk = tp_block_sum(sk, sh);
        if (threadIdx.x == 0) scr[2 * r] = sq, scr[2 * r + 1] = sk;
    }
    __syncthreads();
    cuda_peer_push_signal<false>(v, e, blockIdx.x, scr, 2 * (size_t)r0, 2 * (size_t)r1);
    if (!cuda_peer_wait(v, e, blockIdx.x)) {
        const float *row0 = v.recv + cuda_peer_recv_offset(cuda_peer_slot_of(e), 0, v.n_ranks, v.stride);
        for (int r = r0; r < r1; r++) {
            float tq = 0.f, tk = 0.f;
            for (int p = 0; p < v.n_ranks; p++) {
                const float a = p == v.rank ? scr[2 * r] : __ldcg(row0 + (size_t)p * v.stride + 2 * r);
                const float c = p == v.rank ? scr[2 * r + 1] : __ldcg(row0 + (size_t)p * v.stride + 2 * r + 1);
                tq = p == 0 ? a : tq + a;
                tk = p == 0 ? c : tk + c;
            }
            const float iq = rsqrtf(tq / (float)nq_all + eps), ik = rsqrtf(tk / (float)nk_all + eps);
            for (int i = threadIdx.x; i < nq; i += blockDim.x) q[(size_t)r * nq + i] *= iq * wq[i];
            for (int i = threadIdx.x; i < nk; i += blockDim.x) k[(size_t)r * nk + i] *= ik * wk[i];
        }
    }
    cuda_peer_end(v, e);
}
