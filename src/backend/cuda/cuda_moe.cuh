// cuda_moe.cuh — the MoE feed-forward kernels (forward.c's moe_route / moe_forward). Included by
// cuda_model.cu only, after cuda_kernels.cuh (dlin, load_words, q_unit, dot32, ld_s, warp sums).
//
// Decode (and prefill) of one MoE layer is three launches (moe_ffn in cuda_model.cu):
//   1. k_moe_router: router logits in fp32 x (int8 x flips near-tied top-k choices), split over
//      warps by columns, one block row-set per 8 tokens; the last block to finish (an atomic
//      counter, reset by that block) routes the tokens (top-k, weights) and the same kernel
//      quantises x for the experts' dp4a kernels;
//   2. k_moe_gateup: gate and up rows of the routed expert per (token, k) job with the dp4a dot,
//      silu(g) * u in the epilogue, quantised per 32 values of h (the block holds 32 rows of F);
//      4/8-bit experts in MLX rows, 5/6-bit experts in the planes layout (mv56_layout.h, dlin.pk)
//      through cuda_mv56.cuh's qp_load / qp_dot32 (the arithmetic of k_mv_qp);
//   3. k_moe_down: per token, D / 4 blocks whose warps take the K experts' rows, the weighted
//      sum over k in a fixed order in shared memory (deterministic: no atomics on floats).
// Every reduction has a fixed order, so a row gives the same bits on every run.
#pragma once

#include "cuda_kernels.cuh"
#include "cuda_moe_plan.h"

// ---------------------------------------------------------------------------------------------
// routing: one warp per token, exactly forward.c's moe_route

#define MOE_MAXE 512

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Routes one token from its logits lg[E] (read through L2: they may have been written by other
// blocks of the same launch) into s[K], w[K]. Lane l holds experts e = l + 32 j, j < PL
// (E <= 32 PL). Softmax: score = expf(lg - max) / sum (sum in double, as the CPU), key = score;
// sigmoid: score = 1/(1+exp(-lg)), key = score + bias. K rounds of a warp argmax over the
// untaken keys (ties -> lowest index, like the CPU's strict '>' scan); norm_topk divides by the
// sum of the K scores (in double). Called by all 32 lanes of a warp.
template <int PL>
__device__ __forceinline__ void moe_route_warp(const float *lg, const float *bias, int E, int K, int sigmoid,
                                               int norm_topk, int32_t *s, float *w, int lane) {
    float score[PL], key[PL];
    if (!sigmoid) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < PL; j++) {
            const int e = lane + 32 * j;
            if (e < E) mx = fmaxf(mx, __ldcg(lg + e));
        }
        mx = warp_max(mx);
        double sum = 0;
#pragma unroll
        for (int j = 0; j < PL; j++) {
            const int e = lane + 32 * j;
            score[j] = e < E ? expf(__ldcg(lg + e) - mx) : 0.f;
            sum += score[j];
        }
        sum = warp_sum_d(sum);
#pragma unroll
        for (int j = 0; j < PL; j++) key[j] = score[j] = (float)(score[j] / sum);
    } else {
#pragma unroll
        for (int j = 0; j < PL; j++) {
            const int e = lane + 32 * j;
            score[j] = e < E ? 1.0f / (1.0f + expf(-__ldcg(lg + e))) : 0.f;
            key[j] = score[j] + (bias && e < E ? bias[e] : 0.0f);
        }
    }
    unsigned taken = 0; // bit j: expert lane + 32 j already chosen
    for (int k = 0; k < K; k++) {
        float bv = 0.f, bs = 0.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < PL; j++) {
            const int e = lane + 32 * j;
            if (e < E && !(taken >> j & 1u) && (bi == 0x7fffffff || key[j] > bv)) bv = key[j], bs = score[j], bi = e;
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            // the CPU keeps the first index unless a later key is strictly greater
            const bool take = oi != 0x7fffffff && (bi == 0x7fffffff || ov > bv || (ov == bv && oi < bi));
            if (take) bv = ov, bs = os, bi = oi;
        }
        if ((bi & 31) == lane && bi != 0x7fffffff) taken |= 1u << (bi >> 5);
        if (lane == 0) {
            s[k] = bi == 0x7fffffff ? 0 : bi;
            w[k] = bs;
        }
    }
    if (norm_topk && lane == 0) {
        double sum = 0;
        for (int k = 0; k < K; k++) sum += w[k];
        for (int k = 0; k < K; k++) w[k] = (float)(w[k] / (sum + (sigmoid ? 1e-20 : 0)));
    }
}

// moe_route_warp with the lane count fitted to E (E <= MOE_MAXE)
__device__ __forceinline__ void moe_route_any(const float *lg, const float *bias, int E, int K, int sigmoid, int norm_topk,
                                              int32_t *s, float *w, int lane) {
    if (E <= 128) moe_route_warp<4>(lg, bias, E, K, sigmoid, norm_topk, s, w, lane);
    else if (E <= 256) moe_route_warp<8>(lg, bias, E, K, sigmoid, norm_topk, s, w, lane);
    else moe_route_warp<MOE_MAXE / 32>(lg, bias, E, K, sigmoid, norm_topk, s, w, lane);
}

// Routing alone (cuda_op_moe_route): one warp per token of logits[T, E].
__global__ void k_moe_route(const float *logits, const float *bias, int T, int E, int K, int sigmoid, int norm_topk,
                            int32_t *sel, float *selw) {
    PDL_ENTRY();
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= T) return;
    moe_route_any(logits + (size_t)t * E, bias, E, K, sigmoid, norm_topk, sel + (size_t)t * K, selw + (size_t)t * K, lane);
}

// out[t, :] = sum_k selw[t, k] * ye[t*K + k, :] (the unfused path)
__global__ void k_moe_combine(float *out, const float *ye, const float *selw, int K, int D) {
    PDL_ENTRY();
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = 0.f;
        for (int k = 0; k < K; k++) acc += selw[t * K + k] * ye[((size_t)t * K + k) * D + i];
        out[(size_t)t * D + i] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. router logits + routing (+ x quantised for the experts)

struct moe_rt_args {
    dlin w;             // router [E, D] (one weight)
    const float *x;     // [T, D] fp32 (rows 16-byte aligned for BITS > 0)
    const float *bias;  // [E] selection bias (sigmoid routers) or NULL
    float *logits;      // [T, E] out
    int32_t *sel;       // [T, K] out
    float *selw;        // [T, K] out
    unsigned *cnt;      // [gridDim.y] finished-block counters, 0 before and after a launch
    int8_t *xq;         // planes > 0: x quantised, [T, D / 32] blocks of 32 * planes bytes
    float4 *xs;         //             their statistics [T, D / 32]
    int T, E, K, S;     // S: warps per router row (moe_rt_slices)
    int sigmoid, norm, planes;
};

// Block (x, y): rows [x * 4/S, (x+1) * 4/S) of the router for tokens [8y, 8y + 8). Warp w takes
// row x * 4/S + w / S and column slice w % S (chunks of 32 values interleaved as k_mv_q's
// split-K); per chunk the fp32-x arithmetic of k_mv_q (BITS 4 / 8: MLX affine) or, BITS = 0,
// dlin_elem per element for any format (lanes over elements). The S slice sums of a row are
// added in slice order. Then the block's warps quantise a share of the 32-value blocks of x
// (planes > 0), and the last block of row y to finish routes its tokens.
template <int BITS>
__global__ void __launch_bounds__(MOE_RT_WARPS * 32) k_moe_router(moe_rt_args a) {
    __shared__ float red[MOE_RT_WARPS][MOE_NT];
    __shared__ int last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int S = a.S, rpb = MOE_RT_WARPS / S;
    const int row = blockIdx.x * rpb + warp / S, sl = warp % S;
    if (BITS > 0 && row < a.E) { // the router rows are weights: prefetched before the PDL wait
        const int lines = (int)((a.w.row_bytes + 127) / 128);
        for (int i = sl * 32 + lane; i < lines; i += 32 * S) prefetch_l2(a.w.w + (size_t)row * a.w.row_bytes + (size_t)i * 128);
        if (sl == 0 && lane == 0) {
            const size_t o = (size_t)row * a.w.srow * (a.w.sdtype == SFT_F32 ? 4 : 2);
            prefetch_l2(a.w.s + o);
            prefetch_l2(a.w.b + o);
        }
    }
    PDL_ENTRY();
    const int t0 = blockIdx.y * MOE_NT, nt = min(MOE_NT, a.T - t0);
    const dlin &w = a.w;
    const int64_t D = w.cols;
    const float *x = a.x + (int64_t)t0 * D;
    float acc[MOE_NT];
#pragma unroll
    for (int t = 0; t < MOE_NT; t++) acc[t] = 0.f;
    if (row < a.E) {
        if constexpr (BITS > 0) {
            const uint32_t *rowp = (const uint32_t *)(w.w + (size_t)row * w.row_bytes);
            const size_t sb = (size_t)row * w.srow;
            const int nch = (int)(D / 32), cpg = w.group / 32;
            const float two_b = (float)(1u << BITS);
            for (int c = moe_chunk0(sl, lane); c < nch; c += moe_chunk_step(S)) {
                uint32_t wv[BITS];
                load_words<BITS>(rowp + (size_t)c * BITS, wv);
                const size_t gi = (size_t)(c / cpg);
                const float sc = ld_hf(w.s, sb + gi, w.sdtype) * two_b, bs = ld_hf(w.b, sb + gi, w.sdtype);
#pragma unroll
                for (int t = 0; t < MOE_NT; t++) {
                    if (t < nt) {
                        const float4 *xp = (const float4 *)(x + (int64_t)t * D + (int64_t)c * 32);
                        float xv[32];
#pragma unroll
                        for (int k = 0; k < 8; k++) {
                            const float4 q = __ldg(xp + k);
                            xv[4 * k] = q.x, xv[4 * k + 1] = q.y, xv[4 * k + 2] = q.z, xv[4 * k + 3] = q.w;
                        }
                        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
                        for (int k = 0; k < 8; k++) s0 += xv[4 * k], s1 += xv[4 * k + 1], s2 += xv[4 * k + 2], s3 += xv[4 * k + 3];
                        const float sx = (s0 + s1) + (s2 + s3);
                        float f0 = 0.f, f1 = 0.f;
#pragma unroll
                        for (int v = 0; v < 32; v += 2) {
                            f0 = fmaf(q_unit<BITS>(wv, v), xv[v], f0);
                            f1 = fmaf(q_unit<BITS>(wv, v + 1), xv[v + 1], f1);
                        }
                        acc[t] += sc * ((f0 + f1) - sx) + bs * sx;
                    }
                }
            }
        } else {
            for (int64_t c = (int64_t)sl * 32 + lane; c < D; c += 32 * S) {
                const float wv = dlin_elem(w, 0, row, c);
#pragma unroll
                for (int t = 0; t < MOE_NT; t++)
                    if (t < nt) acc[t] = fmaf(wv, x[(int64_t)t * D + c], acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MOE_NT; t++) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) red[warp][t] = v;
    }
    __syncthreads();
    if ((int)threadIdx.x < rpb * MOE_NT) {
        const int rb = threadIdx.x / MOE_NT, t = threadIdx.x % MOE_NT, r = blockIdx.x * rpb + rb;
        if (r < a.E && t < nt) {
            float v = red[rb * S][t];
            for (int s = 1; s < S; s++) v += red[rb * S + s][t];
            a.logits[(int64_t)(t0 + t) * a.E + r] = v;
        }
    }
    if (a.planes) { // x of these tokens quantised for the experts, blocks spread over the warps
        const int nb = (int)(D / 32), nq = nt * nb, nw = gridDim.x * MOE_RT_WARPS;
        for (int q = blockIdx.x * MOE_RT_WARPS + warp; q < nq; q += nw) {
            const int t = q / nb, c = q % nb;
            const int64_t blk = (int64_t)(t0 + t) * nb + c;
            quant32(x[(int64_t)t * D + (int64_t)c * 32 + lane], lane, a.planes, a.xq + blk * 32 * a.planes, a.xs + blk);
        }
    }
    // the last block of this token row to finish routes the tokens (threadFenceReduction pattern)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(a.cnt + blockIdx.y, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int t = warp; t < nt; t += MOE_RT_WARPS)
        moe_route_any(a.logits + (int64_t)(t0 + t) * a.E, a.bias, a.E, a.K, a.sigmoid, a.norm, a.sel + (int64_t)(t0 + t) * a.K,
                      a.selw + (int64_t)(t0 + t) * a.K, lane);
    if (threadIdx.x == 0) a.cnt[blockIdx.y] = 0; // every block has counted: ready for the next launch
}

// ---------------------------------------------------------------------------------------------
// 2. expert gate/up + SwiGLU + quantisation of h

struct moe_gu_args {
    dlin wg, wu;          // [E] x [F, D] (F % 32 == 0, D % 32 == 0)
    const int8_t *xq;     // x rows quantised by k_moe_router: [T, D / 32] blocks of 32 * XP bytes
    const float4 *xs;     // [T, D / 32]
    const int32_t *sel;   // [T * K] expert of job j = t * K + k
    int K;
    int8_t *hq;           // out: h = silu(gate) * up of job j quantised, [T * K, F / 32] blocks
    float4 *hs;           //      [T * K, F / 32]
};

// Block (x, j): rows [32x, 32x + 32) of F for job j = t * K + k (expert sel[j], x row t). Warp
// w computes rows 32x + 4w .. + 3 of gate and of up (8 weight rows share each x chunk; lanes over
// chunks of 32 values, the dp4a arithmetic of k_mv_qd, or of k_mv_qp for BITS 5/6: planes
// weights, one 16-byte W and one 4/8-byte H load per row and chunk), h = g / (1 + exp(-g)) * u
// (k_swiglu's expression) into shared memory, then warp 0 quantises the 32 values of h
// (quant32). BITS 5/6 need gate and up with pk = 1 and moe_pk_fits (moe_fused_planes).
// Registers (ptxas sm_90a, two planes, bf16 scales): 4-bit 102, 8-bit 128, 5-bit 127, 6-bit 127
// (H rows as int offsets: with pointers the 6-bit kernel took 130, one block per SM), no spills.
template <int BITS, int XP, int SDT>
__global__ void __launch_bounds__(MOE_GU_WARPS * 32) k_moe_gateup(moe_gu_args a) {
    PDL_ENTRY();
    static_assert(MOE_GU_WARPS * MOE_GU_R == 32, "a block holds one 32-value block of h");
    static_assert(BITS == 4 || BITS == 5 || BITS == 6 || BITS == 8, "4/8-bit MLX rows, 5/6-bit planes");
    constexpr bool PK = BITS == 5 || BITS == 6; // planes layout (cuda_mv56.cuh)
    constexpr int NW = PK ? 4 : BITS, NH = PK ? BITS - 4 : 1; // W / H words per row and chunk
    constexpr int R2 = 2 * MOE_GU_R; // gate rows 0..R-1, up rows R..2R-1
    constexpr int MID = 1 << (BITS - 1);
    __shared__ float hb[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = blockIdx.y, t = j / a.K, e = a.sel[j];
    const int64_t r0 = (int64_t)blockIdx.x * 32 + warp * MOE_GU_R;
    const int nch = (int)(a.wg.cols / 32);
    const uint32_t *rowp[R2]; // MLX row (4/8-bit) or W-plane row (5/6-bit)
    int hoff[R2];             // 5/6-bit: bytes from the W-plane row to the H-plane row (< 2^31:
                              // moe_pk_fits; 4 bytes a row instead of a pointer's 8 in registers)
    const char *sp[R2], *bp[R2];
    int cpg[2], gsh[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const dlin &w = h ? a.wu : a.wg;
        const size_t ssz = w.sdtype == SFT_F32 ? 4 : 2;
        cpg[h] = w.group / 32;
        gsh[h] = (cpg[h] & (cpg[h] - 1)) == 0 ? __ffs(cpg[h]) - 1 : -1;
#pragma unroll
        for (int r = 0; r < MOE_GU_R; r++) {
            if constexpr (PK) {
                const size_t wo = moe_pk_w_row(w.e_wstride, e, w.cols, r0 + r);
                rowp[h * MOE_GU_R + r] = (const uint32_t *)(w.w + wo);
                hoff[h * MOE_GU_R + r] = (int)(moe_pk_h_row(BITS, w.e_wstride, e, w.rows, w.cols, r0 + r) - wo);
            } else {
                rowp[h * MOE_GU_R + r] = (const uint32_t *)(w.w + (size_t)e * w.e_wstride + (size_t)(r0 + r) * w.row_bytes);
                hoff[h * MOE_GU_R + r] = 0;
            }
            const size_t sb = ((size_t)e * w.e_sstride + (size_t)(r0 + r) * w.srow) * ssz;
            sp[h * MOE_GU_R + r] = w.s + sb, bp[h * MOE_GU_R + r] = w.b + sb;
        }
    }
    const uint4 *xq = (const uint4 *)a.xq + (int64_t)t * nch * (2 * XP);
    const float4 *xs = a.xs + (int64_t)t * nch;
    float acc[R2];
#pragma unroll
    for (int r = 0; r < R2; r++) acc[r] = 0.f;
#pragma unroll(BITS == 4 ? 2 : 1)
    for (int c = lane; c < nch; c += 32) {
        uint32_t wv[R2][NW], hv[R2][NH];
#pragma unroll
        for (int r = 0; r < R2; r++) {
            if constexpr (PK)
                qp_load<BITS>((const uint4 *)rowp[r], (const uint32_t *)((const char *)rowp[r] + hoff[r]), c, wv[r], hv[r]);
            else load_words<BITS>(rowp[r] + (size_t)c * BITS, wv[r]);
        }
        const int gi0 = gsh[0] >= 0 ? c >> gsh[0] : c / cpg[0], gi1 = gsh[1] >= 0 ? c >> gsh[1] : c / cpg[1];
        const float4 st = __ldg(xs + c);
        const int qsum = __float_as_int(st.z);
        uint32_t xh[8], xl[8];
        {
            const uint4 u0 = __ldg(xq + (int64_t)c * (2 * XP)), u1 = __ldg(xq + (int64_t)c * (2 * XP) + 1);
            xh[0] = u0.x, xh[1] = u0.y, xh[2] = u0.z, xh[3] = u0.w, xh[4] = u1.x, xh[5] = u1.y, xh[6] = u1.z, xh[7] = u1.w;
        }
        if constexpr (XP == 2) {
            const uint4 u2 = __ldg(xq + (int64_t)c * 4 + 2), u3 = __ldg(xq + (int64_t)c * 4 + 3);
            xl[0] = u2.x, xl[1] = u2.y, xl[2] = u2.z, xl[3] = u2.w, xl[4] = u3.x, xl[5] = u3.y, xl[6] = u3.z, xl[7] = u3.w;
        }
#pragma unroll
        for (int r = 0; r < R2; r++) {
            const dlin &w = r < MOE_GU_R ? a.wg : a.wu;
            const int gi = r < MOE_GU_R ? gi0 : gi1;
            const float sc = ld_s<SDT>(sp[r], gi, w.sdtype);
            const float bc = fmaf((float)MID, sc, ld_s<SDT>(bp[r], gi, w.sdtype));
            int is;
            if constexpr (PK) {
                // |isum| <= 32 * 63 * 32512 < 2^31 with two planes (as k_mv_qp)
                is = qp_dot32<BITS>(wv[r], hv[r], xh);
                if constexpr (XP == 2) is = is * 256 + qp_dot32<BITS>(wv[r], hv[r], xl);
            } else {
                is = dot32<BITS>(wv[r], xh);
                if constexpr (XP == 2) is = is * 256 + dot32<BITS>(wv[r], xl);
            }
            is -= MID * qsum;
            acc[r] = fmaf(sc * st.x, (float)is, fmaf(bc, st.y, acc[r]));
        }
    }
#pragma unroll
    for (int r = 0; r < R2; r++) acc[r] = warp_sum(acc[r]);
    if (lane < MOE_GU_R) {
        float g = acc[0], u = acc[MOE_GU_R];
#pragma unroll
        for (int r = 1; r < MOE_GU_R; r++)
            if (lane == r) g = acc[r], u = acc[MOE_GU_R + r];
        hb[warp * MOE_GU_R + lane] = g / (1.0f + expf(-g)) * u;
    }
    __syncthreads();
    if (warp == 0) {
        const int64_t blk = (int64_t)j * gridDim.x + blockIdx.x;
        quant32(hb[lane], lane, XP, a.hq + blk * 32 * XP, a.hs + blk);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. expert down + weighted combine

struct moe_dn_args {
    dlin wd;              // [E] x [D, F] (F % 32 == 0)
    const int8_t *hq;     // h of job j = t * K + k quantised: [T * K, F / 32] blocks
    const float4 *hs;     // [T * K, F / 32]
    const int32_t *sel;   // [T * K]
    const float *selw;    // [T * K]
    int K, S;             // S: column slices per expert (moe_dn_slices), K * S <= MOE_DN_MAXP
    float *out;           // [T, D] out: sum_k selw[t, k] * down_k(h_{t,k})
};

// Block (x, t): output rows [4x, 4x + 4) of token t. Warp w takes the (expert k, slice s) pairs
// p = w, w + 8, ... < K * S (k = p / S): the rows of expert sel[t*K + k] over chunks
// s * 32 + lane + 32 S i of h_{t,k} with the dp4a arithmetic of k_mv_qd; partial dots in shared
// memory; then out = sum over k (in order) of selw * (sum over s in order). BITS 5/6: planes
// weights (pk = 1, moe_pk_fits), k_mv_qp's loads and dot.
template <int BITS, int XP, int SDT>
__global__ void __launch_bounds__(MOE_DN_WARPS * 32) k_moe_down(moe_dn_args a) {
    PDL_ENTRY();
    static_assert(BITS == 4 || BITS == 5 || BITS == 6 || BITS == 8, "4/8-bit MLX rows, 5/6-bit planes");
    constexpr bool PK = BITS == 5 || BITS == 6; // planes layout (cuda_mv56.cuh)
    constexpr int NW = PK ? 4 : BITS, NH = PK ? BITS - 4 : 1; // W / H words per row and chunk
    constexpr int MID = 1 << (BITS - 1);
    __shared__ float part[MOE_DN_MAXP][MOE_DN_R];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.y, K = a.K, S = a.S;
    const dlin &w = a.wd;
    const int64_t r0 = (int64_t)blockIdx.x * MOE_DN_R;
    const int nch = (int)(w.cols / 32), cpg = w.group / 32;
    const int gsh = (cpg & (cpg - 1)) == 0 ? __ffs(cpg) - 1 : -1;
    const size_t ssz = w.sdtype == SFT_F32 ? 4 : 2;
    for (int p = warp; p < K * S; p += MOE_DN_WARPS) {
        const int k = p / S, sl = p % S, j = t * K + k, e = a.sel[j];
        const uint32_t *rowp[MOE_DN_R], *hrow[MOE_DN_R]; // MLX / W-plane row, H-plane row (5/6-bit)
        const char *sp[MOE_DN_R], *bp[MOE_DN_R];
#pragma unroll
        for (int r = 0; r < MOE_DN_R; r++) {
            const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
            if constexpr (PK) {
                rowp[r] = (const uint32_t *)(w.w + moe_pk_w_row(w.e_wstride, e, w.cols, rr));
                hrow[r] = (const uint32_t *)(w.w + moe_pk_h_row(BITS, w.e_wstride, e, w.rows, w.cols, rr));
            } else {
                rowp[r] = (const uint32_t *)(w.w + (size_t)e * w.e_wstride + (size_t)rr * w.row_bytes);
                hrow[r] = nullptr;
            }
            const size_t sb = ((size_t)e * w.e_sstride + (size_t)rr * w.srow) * ssz;
            sp[r] = w.s + sb, bp[r] = w.b + sb;
        }
        const uint4 *xq = (const uint4 *)a.hq + (int64_t)j * nch * (2 * XP);
        const float4 *xs = a.hs + (int64_t)j * nch;
        float acc[MOE_DN_R];
#pragma unroll
        for (int r = 0; r < MOE_DN_R; r++) acc[r] = 0.f;
#pragma unroll 2
        for (int c = moe_chunk0(sl, lane); c < nch; c += moe_chunk_step(S)) {
            uint32_t wv[MOE_DN_R][NW], hv[MOE_DN_R][NH];
#pragma unroll
            for (int r = 0; r < MOE_DN_R; r++) {
                if constexpr (PK) qp_load<BITS>((const uint4 *)rowp[r], hrow[r], c, wv[r], hv[r]);
                else load_words<BITS>(rowp[r] + (size_t)c * BITS, wv[r]);
            }
            const int gi = gsh >= 0 ? c >> gsh : c / cpg;
            const float4 st = __ldg(xs + c);
            const int qsum = __float_as_int(st.z);
            uint32_t xh[8], xl[8];
            {
                const uint4 u0 = __ldg(xq + (int64_t)c * (2 * XP)), u1 = __ldg(xq + (int64_t)c * (2 * XP) + 1);
                xh[0] = u0.x, xh[1] = u0.y, xh[2] = u0.z, xh[3] = u0.w, xh[4] = u1.x, xh[5] = u1.y, xh[6] = u1.z, xh[7] = u1.w;
            }
            if constexpr (XP == 2) {
                const uint4 u2 = __ldg(xq + (int64_t)c * 4 + 2), u3 = __ldg(xq + (int64_t)c * 4 + 3);
                xl[0] = u2.x, xl[1] = u2.y, xl[2] = u2.z, xl[3] = u2.w, xl[4] = u3.x, xl[5] = u3.y, xl[6] = u3.z, xl[7] = u3.w;
            }
#pragma unroll
            for (int r = 0; r < MOE_DN_R; r++) {
                const float sc = ld_s<SDT>(sp[r], gi, w.sdtype);
                const float bc = fmaf((float)MID, sc, ld_s<SDT>(bp[r], gi, w.sdtype));
                int is;
                if constexpr (PK) {
                    is = qp_dot32<BITS>(wv[r], hv[r], xh);
                    if constexpr (XP == 2) is = is * 256 + qp_dot32<BITS>(wv[r], hv[r], xl);
                } else {
                    is = dot32<BITS>(wv[r], xh);
                    if constexpr (XP == 2) is = is * 256 + dot32<BITS>(wv[r], xl);
                }
                is -= MID * qsum;
                acc[r] = fmaf(sc * st.x, (float)is, fmaf(bc, st.y, acc[r]));
            }
        }
#pragma unroll
        for (int r = 0; r < MOE_DN_R; r++) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) part[p][r] = v;
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < MOE_DN_R && r0 + threadIdx.x < w.rows) {
        const int r = threadIdx.x;
        float o = 0.f;
        for (int k = 0; k < K; k++) {
            float y = part[k * S][r];
            for (int s = 1; s < S; s++) y += part[k * S + s][r];
            o += a.selw[t * K + k] * y;
        }
        a.out[(int64_t)t * w.rows + r0 + r] = o;
    }
}
