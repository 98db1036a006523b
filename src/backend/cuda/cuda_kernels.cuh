// cuda_kernels.cuh — the CUDA backend's kernels (see strata/cuda_backend.h). Included by
// cuda_model.cu only; every kernel mirrors one op of src/backend/cpu/cpu_ops.c or forward.c.
// Activations are fp32 row-major, accumulation fp32, the KV cache bf16.
#pragma once

#include "strata/model.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mv56_layout.h"
#include "cuda_moe_plan.h"

// ---------------------------------------------------------------------------------------------
// device view of a linear weight (one expert, or E experts at fixed strides)

struct dlin {
    int qbits;        // 0 = dense
    int group;        // quantized group size
    int dtype;        // dense: SFT_F32 / SFT_F16 / SFT_BF16
    int sdtype;       // quantized: dtype of scales / biases
    int pk;           // 1: 5/6-bit w in the planes layout of mv56_layout.h (cuda_mv56.cuh), 0: MLX
    int64_t rows, cols;
    const char *w;    // dense [rows, cols] / packed u32 [rows, cols*bits/32]
    const char *s;    // scales [rows, cols/group] in sdtype
    const char *b;    // biases
    size_t row_bytes; // bytes per row of w
    size_t srow;      // scale elements per row
    size_t e_wstride; // bytes between experts in w (0: one weight)
    size_t e_sstride; // scale elements between experts
};

__device__ __forceinline__ float ld_hf(const char *p, size_t i, int dt) {
    if (dt == SFT_F32) return ((const float *)p)[i];
    unsigned short h = ((const unsigned short *)p)[i];
    if (dt == SFT_BF16) return __uint_as_float((unsigned)h << 16);
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float bf16u(unsigned short h) { return __uint_as_float((unsigned)h << 16); }

__device__ __forceinline__ uint32_t q_get(const uint32_t *row, int bits, size_t v) {
    size_t bit = (size_t)bits * v;
    uint64_t x = row[bit >> 5];
    if ((bit & 31) + (size_t)bits > 32) x |= (uint64_t)row[(bit >> 5) + 1] << 32;
    return (uint32_t)(x >> (bit & 31)) & ((1u << bits) - 1u);
}

// Element c of row r (expert e) as float: the reference dequantisation.
__device__ __forceinline__ float dlin_elem(const dlin &w, int e, int64_t r, int64_t c) {
    const char *row = w.w + (size_t)e * w.e_wstride + (size_t)r * w.row_bytes;
    if (!w.qbits) return ld_hf(row, (size_t)c, w.dtype);
    size_t si = (size_t)e * w.e_sstride + (size_t)r * w.srow + (size_t)(c / w.group);
    float s = ld_hf(w.s, si, w.sdtype), b = ld_hf(w.b, si, w.sdtype);
    if (w.pk) { // planes layout: block c / 32 of row r in the W and H planes
        const char *base = w.w + (size_t)e * w.e_wstride;
        const uint32_t *wp = (const uint32_t *)(base + mv56_w_off(w.cols, r, c / 32));
        const uint32_t *hp = (const uint32_t *)(base + mv56_h_off(w.qbits, w.rows, w.cols, r, c / 32));
        return s * (float)mv56_code(w.qbits, wp, hp, (int)(c % 32)) + b;
    }
    return s * (float)q_get((const uint32_t *)row, w.qbits, (size_t)c) + b;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------------------------------------
// programmatic dependent launch (sm_90+). The host launches the kernels of a step with
// cudaLaunchAttributeProgrammaticStreamSerialization (launch_k() in cuda_model.cu; graphs keep the
// programmatic edges), so a kernel's blocks may start while the previous kernel still runs.
// Rule: every kernel starts with PDL_ENTRY() — wait until the previous kernel has completed and
// its writes are visible (griddepcontrol.wait), then let the next kernel's blocks launch
// (launch_dependents) — before it reads or writes any activation, and no block returns before
// it (a grid that completed without waiting would break the transitive ordering of the chain).
// Only data no kernel of the step writes (weights; the KV rows of earlier positions) may be
// touched before the wait: decode attention prefetches its chunk's K/V rows into L2 there, the
// MoE router its weight rows, the streaming matrix-vector kernels (k_mv_s) load their first
// weight units into registers (an L2 prefetch of weight rows in the matrix-vector kernels, tried
// at 2 and 8 KiB per row, gained nothing: PERF.md round 7). Launched without the attribute
// (older GPUs, STRATA_CUDA_NO_PDL=1), both instructions are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// c_pdl_early (STRATA_CUDA_PDL_EARLY=1, set per device at model init): trigger before the wait,
// so the next kernel's blocks may become resident (and wait) while this one still waits too.
__constant__ int c_pdl_early;
#define PDL_ENTRY()                                                                                                 \
    do {                                                                                                            \
        if (c_pdl_early) pdl_trigger();                                                                             \
        pdl_wait();                                                                                                 \
        if (!c_pdl_early) pdl_trigger();                                                                            \
    } while (0)

__device__ __forceinline__ void prefetch_l2(const void *p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// ---------------------------------------------------------------------------------------------
// matrix-vector (decode). A launch covers up to MV_SEGS weights of the same kind at once (q/k/v,
// gate/up: one launch instead of three / two): segment s owns blocks [blk0[s], blk0[s+1]) of
// grid.x. A block has MV_WARPS warps; a warp computes R consecutive output rows, so every x
// chunk it loads serves R rows, and each lane keeps R independent 16-byte weight loads in
// flight. Up to MV_MAXT token rows per weight read (NT = 1: the decode specialisation). Job j
// (blockIdx.y) reads x rows from x + (j / x_div) * ldx (+ t * ldx), writes y + j * ldy
// (+ t * ldy), and uses expert eid[j] (eid may be NULL: expert 0).

#define MV_WARPS 4
#define MV_MAXT 8
#define MV_SEGS 3

struct mv_args {
    dlin w[MV_SEGS];
    float *y[MV_SEGS];
    int64_t ldy[MV_SEGS];
    int blk0[MV_SEGS + 1];
    int nseg;
    const float *x;
    int64_t ldx;
    int nt;
    int x_div;
    const int32_t *eid;
    // dp4a kernels (k_mv_qd): x rows quantised by k_quant_x (row i = x + i * ldx; rows of
    // w.cols values, shared by every segment of the launch)
    const int8_t *xq;  // [rows, cols * XP] int8 in the dp4a layout (see k_quant_x)
    const float4 *xs;  // [rows, cols / 32] per block: (d, sum x, int sum of q as int bits, 0)
};

// segment of this block, its first row, the job's x / y / expert
#define MV_PROLOGUE(R, KS)                                                                                            \
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;                                                     \
    int sg = 0;                                                                                                     \
    _Pragma("unroll") for (int i_ = 1; i_ < MV_SEGS; i_++) if (i_ < a.nseg && (int)blockIdx.x >= a.blk0[i_]) sg = i_; \
    const dlin &w = a.w[sg];                                                                                        \
    const int64_t r0 = ((int64_t)((int)blockIdx.x - a.blk0[sg]) * (MV_WARPS / (KS)) + warp / (KS)) * (R);           \
    const int cw = warp % (KS); /* this warp's share of the columns (KS > 1: split-K in the block) */             \
    (void)cw;                                                                                                       \
    PDL_ENTRY();                                                                                                    \
    if (r0 >= w.rows) return;                                                                                       \
    const int j = blockIdx.y;                                                                                       \
    const int e = a.eid ? a.eid[j] : 0;                                                                             \
    const float *x = a.x + (int64_t)(j / a.x_div) * a.ldx;                                                          \
    const int64_t ldy = a.ldy[sg];                                                                                  \
    float *y = a.y[sg] + (int64_t)j * ldy;

template <int R, int NT, int KS = 1>
__device__ __forceinline__ void mv_store(const mv_args &a, float (&acc)[R][NT], float *y, int64_t ldy, int64_t r0,
                                         int64_t rows, int lane) {
    if constexpr (KS > 1) { // the block's KS warps share rows r0..r0+R: sum their partial dots
        static_assert(KS == MV_WARPS, "split-K spans the whole block");
        __shared__ float red[KS][R * NT];
        const int warp = threadIdx.x >> 5;
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float v = warp_sum(acc[r][t]);
                if (lane == 0) red[warp][r * NT + t] = v;
            }
        __syncthreads();
        if (warp == 0 && lane < R * NT) {
            const int r = lane / NT, t = lane % NT;
            float v = red[0][lane];
#pragma unroll
            for (int k = 1; k < KS; k++) v += red[k][lane];
            if ((NT == 1 || t < a.nt) && r0 + r < rows) y[(int64_t)t * ldy + r0 + r] = v;
        }
    } else {
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (NT == 1 || t < a.nt) {
                    float v = warp_sum(acc[r][t]);
                    if (lane == 0 && r0 + r < rows) y[(int64_t)t * ldy + r0 + r] = v;
                }
            }
        }
    }
}

// dense bf16 / f16 rows with cols % 8 == 0: 16-byte loads
template <int DT, int R, int NT, int KS = 1>
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_dense16(mv_args a) {
    MV_PROLOGUE(R, KS)
    const uint4 *rowp[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
        rowp[r] = (const uint4 *)(w.w + (size_t)e * w.e_wstride + (size_t)rr * w.row_bytes);
    }
    const int64_t n8 = w.cols / 8;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
#pragma unroll 2
    for (int64_t c = lane + 32 * cw; c < n8; c += 32 * KS) {
        uint4 v[R];
#pragma unroll
        for (int r = 0; r < R; r++) v[r] = __ldg(rowp[r] + c);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (NT == 1 || t < a.nt) {
                const float4 *xp = (const float4 *)(x + (int64_t)t * a.ldx + c * 8);
                const float4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
                const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const unsigned int u[4] = {v[r].x, v[r].y, v[r].z, v[r].w};
                    float s = acc[r][t];
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        float lo, hi;
                        if (DT == SFT_BF16) {
                            lo = __uint_as_float(u[k] << 16);
                            hi = __uint_as_float(u[k] & 0xffff0000u);
                        } else {
                            lo = __half2float(__ushort_as_half((unsigned short)(u[k] & 0xffff)));
                            hi = __half2float(__ushort_as_half((unsigned short)(u[k] >> 16)));
                        }
                        s = fmaf(lo, xv[2 * k], s);
                        s = fmaf(hi, xv[2 * k + 1], s);
                    }
                    acc[r][t] = s;
                }
            }
        }
    }
    mv_store<R, NT, KS>(a, acc, y, ldy, r0, w.rows, lane);
}

// any dense or quantized row, element by element (odd shapes; the reference on the device)
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_generic(mv_args a) {
    MV_PROLOGUE(1, 1)
    float acc[1][MV_MAXT];
#pragma unroll
    for (int t = 0; t < MV_MAXT; t++) acc[0][t] = 0.f;
    for (int64_t c = lane; c < w.cols; c += 32) {
        float wv = dlin_elem(w, e, r0, c);
#pragma unroll
        for (int t = 0; t < MV_MAXT; t++)
            if (t < a.nt) acc[0][t] += wv * x[(int64_t)t * a.ldx + c];
    }
    mv_store<1, MV_MAXT>(a, acc, y, ldy, r0, w.rows, lane);
}

// MLX affine rows: a lane takes chunks of 32 values (= BITS words, one group since groups are
// multiples of 32). Each value q becomes f = 1 + q / 2^BITS by placing its bits under the
// exponent of 1.0f (a shift and a LOP3, no int->float conversion); then per chunk
// sum(q x) = 2^BITS (sum(f x) - sum(x)), and w = s q + b gives s * sum(q x) + b * sum(x).
// sum(x) is computed once per chunk for all R rows.
template <int BITS>
__device__ __forceinline__ void load_words(const uint32_t *p, uint32_t (&wv)[BITS]) {
    if constexpr (BITS == 4) {
        uint4 v = __ldg((const uint4 *)p);
        wv[0] = v.x, wv[1] = v.y, wv[2] = v.z, wv[3] = v.w;
    } else if constexpr (BITS == 8) {
        uint4 v = __ldg((const uint4 *)p), u = __ldg((const uint4 *)p + 1);
        wv[0] = v.x, wv[1] = v.y, wv[2] = v.z, wv[3] = v.w, wv[4] = u.x, wv[5] = u.y, wv[6] = u.z, wv[7] = u.w;
    } else if constexpr (BITS == 2) {
        uint2 v = __ldg((const uint2 *)p);
        wv[0] = v.x, wv[1] = v.y;
    } else if constexpr (BITS == 6) {
        uint2 v0 = __ldg((const uint2 *)p), v1 = __ldg((const uint2 *)p + 1), v2 = __ldg((const uint2 *)p + 2);
        wv[0] = v0.x, wv[1] = v0.y, wv[2] = v1.x, wv[3] = v1.y, wv[4] = v2.x, wv[5] = v2.y;
    } else {
#pragma unroll
        for (int k = 0; k < BITS; k++) wv[k] = __ldg(p + k);
    }
}

template <int BITS>
__device__ __forceinline__ float q_unit(const uint32_t (&wv)[BITS], const int v) {
    constexpr int P = 23 - BITS;
    const int bit = v * BITS, wi = bit >> 5, sh = bit & 31;
    uint32_t u;
    if (sh + BITS <= 32) u = P >= sh ? (wv[wi] << (P - sh)) : (wv[wi] >> (sh - P));
    else u = __funnelshift_r(wv[wi], wv[wi + 1], sh) << P;
    return __uint_as_float((u & (((1u << BITS) - 1u) << P)) | 0x3F800000u);
}

template <int BITS, int R, int NT, int KS = 1>
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_q(mv_args a) {
    MV_PROLOGUE(R, KS)
    const uint32_t *rowp[R];
    size_t sb[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
        rowp[r] = (const uint32_t *)(w.w + (size_t)e * w.e_wstride + (size_t)rr * w.row_bytes);
        sb[r] = (size_t)e * w.e_sstride + (size_t)rr * w.srow;
    }
    const int64_t nch = w.cols / 32;
    const int cpg = w.group / 32; // chunks per group
    const float two_b = (float)(1u << BITS);
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
    for (int64_t c = lane + 32 * cw; c < nch; c += 32 * KS) {
        uint32_t wv[R][BITS];
#pragma unroll
        for (int r = 0; r < R; r++) load_words<BITS>(rowp[r] + c * BITS, wv[r]);
        const size_t gi = (size_t)(c / cpg);
        float sc[R], bs[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            sc[r] = ld_hf(w.s, sb[r] + gi, w.sdtype) * two_b;
            bs[r] = ld_hf(w.b, sb[r] + gi, w.sdtype);
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (NT == 1 || t < a.nt) {
                const float4 *xp = (const float4 *)(x + (int64_t)t * a.ldx + c * 32);
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
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float f0 = 0.f, f1 = 0.f;
#pragma unroll
                    for (int v = 0; v < 32; v += 2) {
                        f0 = fmaf(q_unit<BITS>(wv[r], v), xv[v], f0);
                        f1 = fmaf(q_unit<BITS>(wv[r], v + 1), xv[v + 1], f1);
                    }
                    acc[r][t] += sc[r] * ((f0 + f1) - sx) + bs[r] * sx;
                }
            }
        }
    }
    mv_store<R, NT, KS>(a, acc, y, ldy, r0, w.rows, lane);
}

// ---------------------------------------------------------------------------------------------
// integer dot-product matrix-vector kernels for MLX affine 4- and 8-bit weights (decode).
//
// k_mv_q spends ~4 instructions per weight value turning it into a float, which at 4.3 TB/s of
// 4-bit weights is the whole issue rate of an H200. Here x is quantised once per linear input
// (k_quant_x) to int8 per block of 32 values, x ~ d * q_x, and each block of 32 weight values
// is dotted with __dp4a-style instructions in int32:
//     sum_i w_i x_i = s * sum_i q_i x_i + b * sum_i x_i
//                  ~ s * d * (sum_i (q_i - MID) q_x,i) + (b + MID * s) * sum_i x_i
// with MID = 2^(BITS-1) (centring the weight codes halves the error of the int8 x for the
// usual b ~ -MID*s; the integer identity sum (q - MID) q_x = sum q q_x - MID sum q_x is exact)
// and the block's exact float sum of x for the bias term. XP = 2 stores x as two int8 planes
// (hi * 256 + lo, |q_x| <= 32512, i.e. int16 precision) at twice the dp4a work.
//
// Layout: MLX 4-bit packs value 8k+i of a row at bits 4i of word k, so (w & 0x0F0F0F0F) holds
// values 0,2,4,6 and (w & 0xF0F0F0F0) = 16 x values 1,3,5,7 (no shift: its dot is divided by
// 16, exactly). x is stored per 8 values as [x0 x2 x4 x6][x1 x3 x5 x7] (two words), which
// feeds those masks directly; 8-bit words are permuted into the same order with two PRMTs.

#define XQ_MAX1 127.0f   // |q_x| bound, one plane
#define XQ_MAX2 32512.0f // two planes: 127 * 256, so hi = (q + 128) >> 8 stays in [-127, 127]

// Quantises rows [0, nrows) of x (row stride ldx, cols % 32 == 0) into xq (row stride
// cols * planes bytes: per block of 32 values its 32 * planes bytes, plane 0 first) and
// xs[row * (cols / 32) + block] = (d, sum x, sum q as int bits, 0). One warp per block.
// One block of 32 values, lane l holding value l (all 32 lanes call it): d = amax / qmax, codes
// rounded to nearest, the float and integer sums, written to o[32 * planes] in the dp4a order
// (moe_xq_pos) and *st = (d, sum x, sum q as int bits, 0). k_quant_x and the MoE kernels share
// it, so every path gives the same bits for the same x.
__device__ __forceinline__ void quant32(float v, int lane, int planes, int8_t *o, float4 *st) {
    const float amax = warp_max(fabsf(v)), sum = warp_sum(v);
    const float qmax = planes == 2 ? XQ_MAX2 : XQ_MAX1;
    const float id = amax > 0.f ? qmax / amax : 0.f;
    int q = __float2int_rn(v * id);
    q = max(-(int)qmax, min((int)qmax, q)); // tiny amax: id may be inf
    const int qs = __reduce_add_sync(0xffffffffu, q);
    const int pos = moe_xq_pos(lane); // per 8 values: even values, then odd
    if (planes == 2) {
        const int hi = moe_xq_hi(q); // floor: q - 256 hi in [-128, 127]
        o[pos] = (int8_t)hi;
        o[32 + pos] = (int8_t)(q - hi * 256);
    } else o[pos] = (int8_t)q;
    if (lane == 0) *st = make_float4(amax / qmax, sum, __int_as_float(qs), 0.f);
}

__global__ void k_quant_x(const float *x, int64_t ldx, int nrows, int64_t cols, int planes, int8_t *xq, float4 *xs) {
    PDL_ENTRY();
    const int64_t nb = cols / 32;
    const int64_t blk = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (blk >= nb * nrows) return; // whole warps
    const int64_t r = blk / nb, c = blk % nb;
    quant32(x[r * ldx + c * 32 + lane], lane, planes, xq + (r * nb + c) * 32 * planes, xs + r * nb + c);
}

// c + dot(4 unsigned bytes of a, 4 signed bytes of b)
__device__ __forceinline__ int dp4a_us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// sum over one block of 32 values of q_i * q_x,i: BITS words of weight codes, 8 words of x
template <int BITS>
__device__ __forceinline__ int dot32(const uint32_t (&wv)[BITS], const uint32_t (&xv)[8]) {
    if constexpr (BITS == 4) {
        int lo = 0, hi16 = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            lo = dp4a_us(wv[k] & 0x0F0F0F0Fu, xv[2 * k], lo);
            hi16 = dp4a_us(wv[k] & 0xF0F0F0F0u, xv[2 * k + 1], hi16);
        }
        return lo + (hi16 >> 4); // hi16 is 16 x an integer: exact
    } else {
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s = dp4a_us(__byte_perm(wv[2 * k], wv[2 * k + 1], 0x6420), xv[2 * k], s);
            s = dp4a_us(__byte_perm(wv[2 * k], wv[2 * k + 1], 0x7531), xv[2 * k + 1], s);
        }
        return s;
    }
}

// scale / bias element i: SDT = SFT_BF16 (what MLX checkpoints store) without the dtype switch
template <int SDT> __device__ __forceinline__ float ld_s(const char *p, int i, int dt) {
    if constexpr (SDT == SFT_BF16) return bf16u(((const unsigned short *)p)[i]);
    else return ld_hf(p, (size_t)i, dt);
}

// The launch layout of k_mv_q (R rows per warp, NT tokens, split-K KS); a lane takes blocks of
// 32 values: one (4-bit) or two (8-bit) 16-byte weight loads per row, 32 * XP bytes of x and
// one float4 of block statistics per token, then per row and token one int32 dot and two FMAs.
// SDT: SFT_BF16 for bf16 scales / biases, -1 for any dtype (ld_hf).
template <int BITS, int XP, int SDT, int R, int NT, int KS = 1>
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_qd(mv_args a) {
    static_assert(BITS == 4 || BITS == 8, "dp4a matvec: 4- and 8-bit weights");
    static_assert(XP == 1 || XP == 2, "one or two int8 planes of x");
    MV_PROLOGUE(R, KS)
    (void)x;
    const uint32_t *rowp[R];
    const char *sp[R], *bp[R]; // this row's scales / biases
    const size_t ssz = w.sdtype == SFT_F32 ? 4 : 2;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
        rowp[r] = (const uint32_t *)(w.w + (size_t)e * w.e_wstride + (size_t)rr * w.row_bytes);
        const size_t sb = ((size_t)e * w.e_sstride + (size_t)rr * w.srow) * ssz;
        sp[r] = w.s + sb, bp[r] = w.b + sb;
    }
    const int nch = (int)(w.cols / 32);
    const int cpg = w.group / 32; // blocks per group
    const int gsh = (cpg & (cpg - 1)) == 0 ? __ffs(cpg) - 1 : -1; // power of two: a shift
    const int64_t xr = j / a.x_div; // x row of token 0 of this job (token t: xr + t)
    const uint4 *xq = (const uint4 *)a.xq + xr * nch * (2 * XP);
    const float4 *xs = a.xs + xr * nch;
    constexpr int MID = 1 << (BITS - 1);
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
#pragma unroll 2
    for (int c = lane + 32 * cw; c < nch; c += 32 * KS) {
        uint32_t wv[R][BITS];
#pragma unroll
        for (int r = 0; r < R; r++) load_words<BITS>(rowp[r] + (size_t)c * BITS, wv[r]);
        const int gi = gsh >= 0 ? c >> gsh : c / cpg;
        float sc[R], bc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            sc[r] = ld_s<SDT>(sp[r], gi, w.sdtype);
            bc[r] = fmaf((float)MID, sc[r], ld_s<SDT>(bp[r], gi, w.sdtype));
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (NT == 1 || t < a.nt) {
                const uint4 *xp = xq + ((int64_t)t * nch + c) * (2 * XP);
                const float4 st = __ldg(xs + (int64_t)t * nch + c);
                const int qsum = __float_as_int(st.z);
                uint32_t xh[8], xl[8];
                {
                    const uint4 u0 = __ldg(xp), u1 = __ldg(xp + 1);
                    xh[0] = u0.x, xh[1] = u0.y, xh[2] = u0.z, xh[3] = u0.w, xh[4] = u1.x, xh[5] = u1.y, xh[6] = u1.z, xh[7] = u1.w;
                }
                if constexpr (XP == 2) {
                    const uint4 u2 = __ldg(xp + 2), u3 = __ldg(xp + 3);
                    xl[0] = u2.x, xl[1] = u2.y, xl[2] = u2.z, xl[3] = u2.w, xl[4] = u3.x, xl[5] = u3.y, xl[6] = u3.z, xl[7] = u3.w;
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int is = dot32<BITS>(wv[r], xh);
                    if constexpr (XP == 2) is = is * 256 + dot32<BITS>(wv[r], xl);
                    is -= MID * qsum;
                    acc[r][t] = fmaf(sc[r] * st.x, (float)is, fmaf(bc[r], st.y, acc[r][t]));
                }
            }
        }
    }
    mv_store<R, NT, KS>(a, acc, y, ldy, r0, w.rows, lane);
}

// the same kernels for 5- and 6-bit weights repacked into dp4a-friendly planes at upload
#include "cuda_mv56.cuh"
// the streaming kernels of single-row decode (k_mv_s)
#include "cuda_mvs.cuh"

// ---------------------------------------------------------------------------------------------
// dequantise / convert rows [r0, r0+n) of a weight (expert 0) into bf16 [n, cols] (GEMM input)

__global__ void k_dequant_bf16(dlin w, int64_t r0, int64_t n, __nv_bfloat16 *out) {
    PDL_ENTRY();
    int64_t total = n * w.cols;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / w.cols, c = i % w.cols;
        out[i] = __float2bfloat16(dlin_elem(w, 0, r0 + r, c));
    }
}

__global__ void k_f32_to_bf16(const float *x, int64_t n, __nv_bfloat16 *out) {
    PDL_ENTRY();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(x[i]);
}

// ---------------------------------------------------------------------------------------------
// elementwise and row ops

__global__ void k_embed(float *out, const int32_t *tokens, int T, dlin table) {
    PDL_ENTRY();
    const int t = blockIdx.x;
    if (t >= T) return;
    const int64_t r = tokens[t];
    for (int64_t c = threadIdx.x; c < table.cols; c += blockDim.x) out[(int64_t)t * table.cols + c] = dlin_elem(table, 0, r, c);
}

// one warp per row (short rows: per-head QK-norm)
__global__ void k_rmsnorm_warp(float *out, const float *x, const float *w, int64_t n_rows, int n, float eps) {
    PDL_ENTRY();
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= n_rows) return;
    const float *xr = x + r * n;
    float ss = 0.f;
    for (int i = lane; i < n; i += 32) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / (float)n + eps);
    float *o = out + r * n;
    for (int i = lane; i < n; i += 32) o[i] = xr[i] * inv * w[i];
}

// one block per row (full-width rows)
__global__ void k_rmsnorm_block(float *out, const float *x, const float *w, int n, float eps) {
    PDL_ENTRY();
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const float *xr = x + r * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)n + eps);
    float *o = out + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// x += y, then out = rmsnorm(x) * w: the residual add fused with the next norm (one block per row)
__global__ void k_add_rmsnorm(float *out, float *x, const float *y, const float *w, int n, float eps) {
    PDL_ENTRY();
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    float *xr = x + r * n;
    const float *yr = y + r * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] + yr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)n + eps);
    float *o = out + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// Vectorised (add +) RMSNorm: one block of up to NORM_THREADS threads per row, each thread keeps
// up to NORM_VEC float4 of the row in registers (one read of x / y, one write of x and out).
// Needs n % 4 == 0, 16-byte aligned rows and n <= 4 * NORM_VEC * NORM_THREADS. planes > 0 (n % 32
// == 0): then out is also quantised into xq / xs in k_quant_x's layout and bits. ADD: x += y
// first (the residual add fused with the next norm). out may alias x (per-thread elements).
#define NORM_THREADS 1024
#define NORM_VEC 4
template <bool ADD>
__global__ void __launch_bounds__(NORM_THREADS) k_add_rmsnorm_v(float *out, float *x, const float *y, const float *w, int n,
                                                               float eps, int planes, int8_t *xq, float4 *xs) {
    PDL_ENTRY();
    __shared__ float red[32];
    const int64_t r = blockIdx.x;
    const int n4 = n >> 2;
    float4 *xr = (float4 *)(x + r * n);
    float4 v[NORM_VEC];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            v[k] = xr[i];
            if (ADD) {
                const float4 u = __ldg((const float4 *)(y + r * n) + i);
                v[k].x += u.x, v[k].y += u.y, v[k].z += u.z, v[k].w += u.w;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            if (ADD) xr[i] = v[k];
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
        t = warp_sum(t);
        if (threadIdx.x == 0) red[0] = t;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)n + eps);
    float4 *o = (float4 *)(out + r * n);
#pragma unroll
    for (int k = 0; k < NORM_VEC; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            const float4 g = __ldg((const float4 *)w + i);
            o[i] = make_float4(v[k].x * inv * g.x, v[k].y * inv * g.y, v[k].z * inv * g.z, v[k].w * inv * g.w);
        }
    }
    if (planes) { // out quantised for the next dp4a launch, as k_quant_x would (n % 32 == 0)
        __syncthreads(); // the block's writes of out are visible to the block
        const int lane = threadIdx.x & 31, nw = blockDim.x >> 5, nb = n >> 5;
        const float *orow = out + r * n;
#pragma unroll 4
        for (int b = threadIdx.x >> 5; b < nb; b += nw)
            quant32(orow[b * 32 + lane], lane, planes, xq + (r * nb + b) * 32 * planes, xs + r * nb + b);
    }
}

// Per-head QK-norm (optional), RoPE and the K/V store of one step in one launch, one warp per
// head row: rows [0, Hq) of token t are q heads, [Hq, Hq+Hk) k heads, [Hq+Hk, Hq+2Hk) v heads
// (only when kc is given). The arithmetic is exactly k_rmsnorm_warp's, k_rope's and
// k_kv_store's (same order of operations, same rounding).
__global__ void k_qk_rope_kv(float *q, int Hq, float *k, int Hk, const float *v, const float *qn_w, const float *kn_w,
                             float eps, const int32_t *pos, int hd, int n_rot, const double *inv_freq, __nv_bfloat16 *kc,
                             __nv_bfloat16 *vc, const int32_t *slot, size_t slot_stride, int T) {
    PDL_ENTRY();
    const int nh = Hq + (kc ? 2 * Hk : Hk);
    const int64_t gw = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (gw >= (int64_t)T * nh) return;
    const int t = (int)(gw / nh), h = (int)(gw % nh);
    const int kvd = Hk * hd;
    if (h >= Hq + Hk) { // v head: store only
        const int hv = h - Hq - Hk;
        const size_t base = (size_t)slot[t] * slot_stride + (size_t)pos[t] * kvd + (size_t)hv * hd;
        const float *vr = v + (int64_t)t * kvd + (int64_t)hv * hd;
        for (int i = lane; i < hd; i += 32) vc[base + i] = __float2bfloat16(vr[i]);
        return;
    }
    float *row;
    const float *nw;
    if (h < Hq) row = q + ((int64_t)t * Hq + h) * hd, nw = qn_w;
    else row = k + ((int64_t)t * Hk + (h - Hq)) * hd, nw = kn_w;
    if (nw) {
        float ss = 0.f;
        for (int i = lane; i < hd; i += 32) ss += row[i] * row[i];
        ss = warp_sum(ss);
        const float inv = rsqrtf(ss / (float)hd + eps);
        for (int i = lane; i < hd; i += 32) row[i] = row[i] * inv * nw[i];
        __syncwarp();
    }
    if (n_rot > 0) {
        const int half = n_rot / 2;
        const double p = (double)pos[t];
        for (int f = lane; f < half; f += 32) {
            double ang = p * inv_freq[f];
            float co = (float)cos(ang), si = (float)sin(ang);
            float x1 = row[f], x2 = row[f + half];
            row[f] = x1 * co - x2 * si;
            row[f + half] = x2 * co + x1 * si;
        }
        __syncwarp();
    }
    if (kc && h >= Hq) {
        const int hk = h - Hq;
        const size_t base = (size_t)slot[t] * slot_stride + (size_t)pos[t] * kvd + (size_t)hk * hd;
        for (int i = lane; i < hd; i += 32) kc[base + i] = __float2bfloat16(row[i]);
    }
}

// rotate-half RoPE of q[T, Hq, hd] and k[T, Hk, hd] (k may be NULL) on the first n_rot dims;
// angles in double like cpu_rope_table.
__global__ void k_rope(float *q, int Hq, float *k, int Hk, const int32_t *pos, int hd, int n_rot, const double *inv_freq) {
    PDL_ENTRY();
    const int t = blockIdx.x, half = n_rot / 2;
    const double p = (double)pos[t];
    const int n = (Hq + Hk) * half;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int h = i / half, f = i % half;
        float *v = h < Hq ? q + ((int64_t)t * Hq + h) * hd : k + ((int64_t)t * Hk + (h - Hq)) * hd;
        double ang = p * inv_freq[f];
        float co = (float)cos(ang), si = (float)sin(ang);
        float x1 = v[f], x2 = v[f + half];
        v[f] = x1 * co - x2 * si;
        v[f + half] = x2 * co + x1 * si;
    }
}

// K/V rows of T tokens into the bf16 cache of one layer: cache + slot*slot_stride + pos*kvd
__global__ void k_kv_store(__nv_bfloat16 *kc, __nv_bfloat16 *vc, const float *k, const float *v, const int32_t *pos,
                           const int32_t *slot, int kvd, size_t slot_stride) {
    PDL_ENTRY();
    const int t = blockIdx.x;
    const size_t base = (size_t)slot[t] * slot_stride + (size_t)pos[t] * kvd;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        kc[base + i] = __float2bfloat16(k[(int64_t)t * kvd + i]);
        vc[base + i] = __float2bfloat16(v[(int64_t)t * kvd + i]);
    }
}

__device__ __forceinline__ float swiglu1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__global__ void k_swiglu(float *out, const float *g, const float *u, int64_t n) {
    PDL_ENTRY();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = swiglu1(g[i], u[i]);
}

// k_swiglu that also quantises its output for the dp4a kernel of the down projection (the work
// of the k_quant_x launch it replaces, in the same layout and bits): one warp per block of 32
// values of the flat [n] array (n % 32 == 0; rows of a multiple of 32 values, so block b of
// the flat array is block b % (cols / 32) of row b / (cols / 32), as k_quant_x indexes it).
__global__ void k_swiglu_q(float *out, const float *g, const float *u, int64_t n, int planes, int8_t *xq, float4 *xs) {
    PDL_ENTRY();
    const int lane = threadIdx.x & 31;
    const int64_t nw = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t b = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < n / 32; b += nw) {
        const int64_t i = b * 32 + lane;
        const float h = swiglu1(g[i], u[i]);
        out[i] = h;
        quant32(h, lane, planes, xq + b * 32 * planes, xs + b);
    }
}

// does nothing but take part in the programmatic-launch chain: STRATA_CUDA_NOP=N launches N per
// layer to measure what one more small kernel costs inside a decode graph (PERF.md round 8)
__global__ void k_nop() { PDL_ENTRY(); }

__global__ void k_add(float *x, const float *y, int64_t n) {
    PDL_ENTRY();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) x[i] += y[i];
}

// ---------------------------------------------------------------------------------------------
// attention: split-K flash decoding. Block (row = t*H + h, split) runs an online softmax over
// positions [split*chunk, min(pos[t]+1, (split+1)*chunk)) of its slot with ATT_WARPS warps (one
// position per warp at a time), and writes (o unnormalised [hd], m, l) to part. k_attn_combine
// merges the splits. Works for decode and (slowly, untiled) prefill.

#define ATT_WARPS 4
#define ATT_MAXJ 8 // hd <= 256
#define ATT_U 4    // positions in flight per warp

__global__ void __launch_bounds__(ATT_WARPS * 32)
    k_attn_split(float *part, const float *q, const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, const int32_t *pos,
                 const int32_t *slot, int H, int Hkv, int hd, float scale, size_t slot_stride, int chunk, int nsplit) {
    PDL_ENTRY();
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
    __shared__ float sm_o[ATT_WARPS][ATT_MAXJ * 32];
    const int row = blockIdx.x, split = blockIdx.y, t = row / H, h = row % H;
    const int kvh = h / (H / Hkv), kvd = Hkv * hd;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = pos[t] + 1, p0 = split * chunk, p1 = min(n, p0 + chunk);
    float *out = part + ((size_t)row * nsplit + split) * (hd + 2);
    if (p0 >= n) {
        if (threadIdx.x == 0) out[hd] = -INFINITY, out[hd + 1] = 0.f;
        return;
    }
    float qr[ATT_MAXJ], o[ATT_MAXJ];
#pragma unroll
    for (int jj = 0; jj < ATT_MAXJ; jj++) {
        int i = lane + 32 * jj;
        qr[jj] = i < hd ? q[((int64_t)t * H + h) * hd + i] * scale : 0.f;
        o[jj] = 0.f;
    }
    const __nv_bfloat16 *kb = kc + (size_t)slot[t] * slot_stride + (size_t)kvh * hd;
    const __nv_bfloat16 *vb = vc + (size_t)slot[t] * slot_stride + (size_t)kvh * hd;
    float m = -INFINITY, l = 0.f;
    // ATT_U positions per warp at a time: their K and V loads are all issued before the first
    // use, the U dot-product reductions interleave, one rescale per group
    for (int p = p0 + warp; p < p1; p += ATT_WARPS * ATT_U) {
        float d[ATT_U], vv[ATT_U][ATT_MAXJ];
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            const int pu = p + u * ATT_WARPS;
            const bool ok = pu < p1;
            const __nv_bfloat16 *kr = kb + (size_t)(ok ? pu : p) * kvd, *vr = vb + (size_t)(ok ? pu : p) * kvd;
            float s = 0.f;
#pragma unroll
            for (int jj = 0; jj < ATT_MAXJ; jj++) {
                int i = lane + 32 * jj;
                if (i < hd) {
                    s += qr[jj] * __bfloat162float(kr[i]);
                    vv[u][jj] = __bfloat162float(vr[i]);
                } else vv[u][jj] = 0.f;
            }
            d[u] = s;
        }
#pragma unroll
        for (int u = 0; u < ATT_U; u++) d[u] = warp_sum(d[u]);
        float mx = d[0];
#pragma unroll
        for (int u = 1; u < ATT_U; u++)
            if (p + u * ATT_WARPS < p1) mx = fmaxf(mx, d[u]);
        const float mn = fmaxf(m, mx), corr = __expf(m - mn);
        float pe[ATT_U];
        l *= corr;
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            pe[u] = p + u * ATT_WARPS < p1 ? __expf(d[u] - mn) : 0.f;
            l += pe[u];
        }
#pragma unroll
        for (int jj = 0; jj < ATT_MAXJ; jj++) {
            float a = o[jj] * corr;
#pragma unroll
            for (int u = 0; u < ATT_U; u++) a += pe[u] * vv[u][jj];
            o[jj] = a;
        }
        m = mn;
    }
    if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
#pragma unroll
    for (int jj = 0; jj < ATT_MAXJ; jj++) sm_o[warp][lane + 32 * jj] = o[jj];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm_m[w] != -INFINITY) acc += sm_o[w][i] * __expf(sm_m[w] - M);
        out[i] = acc;
    }
    if (threadIdx.x == 0) {
        float L = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (sm_m[w] != -INFINITY) L += sm_l[w] * __expf(sm_m[w] - M);
        out[hd] = M, out[hd + 1] = L;
    }
}

// Merges the splits of one row: warp 0 reduces (m, l) over the splits with lanes over splits and
// leaves each split's weight exp(m_s - M) in shared memory; then every thread sums its output
// dims over the splits with independent loads (was: three serial passes over the splits). The
// active splits are a prefix (both attention kernels fill splits in position order and mark the
// unused ones -inf), so the sum stops after the last active one.
#define ATT_MAXSPLIT 64
// planes > 0 (hd % 32 == 0): also quantises the output for the dp4a kernel of the o projection,
// as k_quant_x would (row `row` = t * H + h is columns [h * hd, (h + 1) * hd) of x row t, so its
// 32-value blocks are blocks (row * hd) / 32 + i / 32 of the flat array); the loop over i is
// warp-uniform then, each warp pass one block.
__global__ void k_attn_combine(float *out, const float *part, int hd, int nsplit, int planes, int8_t *xq, float4 *xs) {
    PDL_ENTRY();
    __shared__ float sw[ATT_MAXSPLIT];
    __shared__ float sinv;
    __shared__ int scnt;
    const int row = blockIdx.x;
    const float *p = part + (size_t)row * nsplit * (hd + 2);
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        float M = -INFINITY;
        for (int s = lane; s < nsplit; s += 32) M = fmaxf(M, p[(size_t)s * (hd + 2) + hd]);
        M = warp_max(M);
        float L = 0.f;
        int last = -1;
        for (int s = lane; s < nsplit; s += 32) {
            const float ms = p[(size_t)s * (hd + 2) + hd];
            const float e = ms != -INFINITY ? __expf(ms - M) : 0.f;
            sw[s] = ms != -INFINITY ? e : -1.f; // -1: empty split (its o was never written)
            L += ms != -INFINITY ? p[(size_t)s * (hd + 2) + hd + 1] * e : 0.f;
            if (ms != -INFINITY) last = s;
        }
        L = warp_sum(L);
        for (int o = 16; o; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
        if (lane == 0) sinv = 1.0f / L, scnt = last + 1;
    }
    __syncthreads();
    const float inv = sinv;
    const int ns = scnt;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        // loads are unconditional (an empty split's o was never written: its value is dropped by
        // the select, never multiplied), so 16 are in flight instead of one per taken branch
        float acc = 0.f;
#pragma unroll 16
        for (int s = 0; s < ns; s++) {
            const float e = sw[s], v = p[(size_t)s * (hd + 2) + i];
            acc += e >= 0.f ? v * e : 0.f;
        }
        out[(size_t)row * hd + i] = acc * inv;
        if (planes) {
            const size_t b = ((size_t)row * hd + i) / 32;
            quant32(acc * inv, threadIdx.x & 31, planes, xq + b * 32 * planes, xs + b);
        }
    }
}

// (the MoE routing and expert kernels are in cuda_moe.cuh)

// ---------------------------------------------------------------------------------------------
// argmax per row (ties: lowest index, like the CPU loop), and the greedy loop's bookkeeping

__global__ void k_argmax(const float *x, int n, int32_t *out) {
    PDL_ENTRY();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *r = x + (size_t)blockIdx.x * n;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = r[i];
        if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = bv, si[threadIdx.x >> 5] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); w++)
            if (sv[w] > bv || (sv[w] == bv && si[w] < bi)) bv = sv[w], bi = si[w];
        out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

// after a greedy step: tokens <- next, pos += 1, log[counter++] = next[0] (single-stream loop)
__global__ void k_advance(int32_t *tokens, const int32_t *next, int32_t *pos, int B, int32_t *log, int32_t *counter) {
    PDL_ENTRY();
    const int b = threadIdx.x;
    if (b < B) {
        tokens[b] = next[b];
        pos[b] += 1;
    }
    if (b == 0 && log) log[(*counter)++] = next[0];
}

__global__ void k_fill_kv(__nv_bfloat16 *kc, __nv_bfloat16 *vc, size_t n, uint64_t seed) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        x ^= x >> 29, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 32;
        float r = (float)((x >> 40) & 0xffff) / 65536.0f - 0.5f;
        kc[i] = __float2bfloat16(r);
        vc[i] = __float2bfloat16(-r);
    }
}

// ---------------------------------------------------------------------------------------------
// synthetic weights generated in device memory (cuda_model_init_synthetic): a counter hash per
// element, no host copy

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
    x ^= x >> 30, x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27, x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ float unif_pm1(uint64_t seed, size_t i) { // [-1, 1)
    return (float)(mix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull) >> 40) / 8388608.0f - 1.0f;
}

__global__ void k_synth_u32(uint32_t *p, size_t n, uint64_t seed) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint32_t)mix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull);
}

// bf16 values center + amp * u, u uniform in [-1, 1)
__global__ void k_synth_bf16(__nv_bfloat16 *p, size_t n, uint64_t seed, float center, float amp) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16(center + amp * unif_pm1(seed, i));
}

// MLX affine scales s (bf16, s0 * (1 + 0.1 u)) and matching biases -s * qmid (zero-mean weights)
__global__ void k_synth_scales(__nv_bfloat16 *s, __nv_bfloat16 *b, size_t n, uint64_t seed, float s0, float qmid) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float sc = s0 * (1.0f + 0.1f * unif_pm1(seed, i));
        s[i] = __float2bfloat16(sc);
        b[i] = __float2bfloat16(-sc * qmid);
    }
}

__global__ void k_synth_f32(float *p, size_t n, uint64_t seed, float center, float amp) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = center + amp * unif_pm1(seed, i);
}
