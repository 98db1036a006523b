// cuda_mv56.cuh — matrix-vector kernels for MLX affine 5- and 6-bit weights stored in the planes
// layout of mv56_layout.h (dlin.pk = 1), and the repack from MLX at upload. Included by
// cuda_kernels.cuh after k_mv_qd, whose launch layout, x quantisation (k_quant_x) and
// accumulation these kernels share:
//   k_mv_qp  (dp4a, x as one or two int8 planes): per row and block of 32 values one 16-byte W
//            load and one 4- (5-bit) or 8-byte (6-bit) H load, one integer dot (mv56_dot32_*),
//            then acc += s*d*(isum - MID*qsum) + (b + MID*s)*sum(x), MID = 2^(BITS-1);
//   k_mv_qpf (fp32 x, what STRATA_CUDA_NO_DP4A-style fp32 paths and the parity's matvec-fp32 run
//            on planes weights): k_mv_q's arithmetic with each code placed under the exponent of
//            1.0f from the planes instead of the MLX bit stream.
// Everything else that reads a quantized weight element by element (k_mv_generic, k_embed,
// k_dequant_bf16) goes through dlin_elem, which reads the planes with mv56_code.
#pragma once

#include "mv56_layout.h"

// One thread per (row, block of 32 values): rows [r0, r0 + n) of one expert of rows x cols, in
// MLX layout at mlx (n rows of cols*bits/32 words, row r0 first) -> the planes of the expert at
// dst (16-byte aligned, mv56_bytes bytes). Borrows both buffers.
__global__ void k_mv56_pack(const uint32_t *mlx, int64_t r0, int64_t n, int64_t rows, int64_t cols, int bits, char *dst) {
    PDL_ENTRY();
    const int64_t items = n * (cols / 32);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < items; i += (int64_t)gridDim.x * blockDim.x)
        mv56_pack_item(bits, rows, cols, mlx, r0, i, dst);
}

// Row pointers of rows r0 .. r0+R-1 (clamped to the last row) of expert e: W-plane blocks as
// uint4, H-plane words, and the scale / bias element offset of the row.
template <int BITS, int R>
__device__ __forceinline__ void qp_rows(const dlin &w, int e, int64_t r0, const uint4 *(&wrow)[R],
                                        const uint32_t *(&hrow)[R], size_t (&sb)[R]) {
    const char *base = w.w + (size_t)e * w.e_wstride;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
        wrow[r] = (const uint4 *)(base + mv56_w_off(w.cols, rr, 0));
        hrow[r] = (const uint32_t *)(base + mv56_h_off(BITS, w.rows, w.cols, rr, 0));
        sb[r] = (size_t)e * w.e_sstride + (size_t)rr * w.srow;
    }
}

// block c of a row: its 4 W words and BITS - 4 H words
template <int BITS>
__device__ __forceinline__ void qp_load(const uint4 *wrow, const uint32_t *hrow, int64_t c, uint32_t (&wv)[4],
                                        uint32_t (&hv)[BITS - 4]) {
    const uint4 v = __ldg(wrow + c);
    wv[0] = v.x, wv[1] = v.y, wv[2] = v.z, wv[3] = v.w;
    if constexpr (BITS == 5) hv[0] = __ldg(hrow + c);
    else {
        const uint2 u = __ldg((const uint2 *)hrow + c);
        hv[0] = u.x, hv[1] = u.y;
    }
}

template <int BITS>
__device__ __forceinline__ int qp_dot32(const uint32_t (&wv)[4], const uint32_t (&hv)[BITS - 4], const uint32_t (&xv)[8]) {
    if constexpr (BITS == 5) return mv56_dot32_5(wv, hv[0], xv);
    else return mv56_dot32_6(wv, hv, xv);
}

// The dp4a kernel: k_mv_qd's structure (R rows per warp, NT tokens, split-K KS, SDT = SFT_BF16
// or -1 for any scale dtype, XP int8 planes of x) on planes weights.
template <int BITS, int XP, int SDT, int R, int NT, int KS = 1>
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_qp(mv_args a) {
    static_assert(BITS == 5 || BITS == 6, "planes layout: 5- and 6-bit weights");
    static_assert(XP == 1 || XP == 2, "one or two int8 planes of x");
    MV_PROLOGUE(R, KS)
    (void)x;
    const uint4 *wrow[R];
    const uint32_t *hrow[R];
    size_t sb[R];
    qp_rows<BITS, R>(w, e, r0, wrow, hrow, sb);
    const char *sp[R], *bp[R]; // this row's scales / biases
    const size_t ssz = w.sdtype == SFT_F32 ? 4 : 2;
#pragma unroll
    for (int r = 0; r < R; r++) sp[r] = w.s + sb[r] * ssz, bp[r] = w.b + sb[r] * ssz;
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
        uint32_t wv[R][4], hv[R][BITS - 4];
#pragma unroll
        for (int r = 0; r < R; r++) qp_load<BITS>(wrow[r], hrow[r], c, wv[r], hv[r]);
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
                    // |isum| <= 32 * 63 * 32512 < 2^31 with two planes
                    int is = qp_dot32<BITS>(wv[r], hv[r], xh);
                    if constexpr (XP == 2) is = is * 256 + qp_dot32<BITS>(wv[r], hv[r], xl);
                    is -= MID * qsum;
                    acc[r][t] = fmaf(sc[r] * st.x, (float)is, fmaf(bc[r], st.y, acc[r][t]));
                }
            }
        }
    }
    mv_store<R, NT, KS>(a, acc, y, ldy, r0, w.rows, lane);
}

// code v of a block as f = 1 + q / 2^BITS (the code under the exponent of 1.0f, as q_unit)
template <int BITS>
__device__ __forceinline__ float qp_unit(const uint32_t (&wv)[4], const uint32_t (&hv)[BITS - 4], const int v) {
    return __uint_as_float((mv56_code(BITS, wv, hv, v) << (23 - BITS)) | 0x3F800000u);
}

// The fp32-x kernel on planes weights: k_mv_q's arithmetic (sum(q x) = 2^BITS (sum(f x) - sum(x)))
template <int BITS, int R, int NT, int KS = 1>
__global__ void __launch_bounds__(MV_WARPS * 32) k_mv_qpf(mv_args a) {
    static_assert(BITS == 5 || BITS == 6, "planes layout: 5- and 6-bit weights");
    MV_PROLOGUE(R, KS)
    const uint4 *wrow[R];
    const uint32_t *hrow[R];
    size_t sb[R];
    qp_rows<BITS, R>(w, e, r0, wrow, hrow, sb);
    const int64_t nch = w.cols / 32;
    const int cpg = w.group / 32; // chunks per group
    const float two_b = (float)(1u << BITS);
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.f;
    for (int64_t c = lane + 32 * cw; c < nch; c += 32 * KS) {
        uint32_t wv[R][4], hv[R][BITS - 4];
#pragma unroll
        for (int r = 0; r < R; r++) qp_load<BITS>(wrow[r], hrow[r], c, wv[r], hv[r]);
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
                        f0 = fmaf(qp_unit<BITS>(wv[r], hv[r], v), xv[v], f0);
                        f1 = fmaf(qp_unit<BITS>(wv[r], hv[r], v + 1), xv[v + 1], f1);
                    }
                    acc[r][t] += sc[r] * ((f0 + f1) - sx) + bs[r] * sx;
                }
            }
        }
    }
    mv_store<R, NT, KS>(a, acc, y, ldy, r0, w.rows, lane);
}
