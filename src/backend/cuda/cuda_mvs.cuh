// cuda_mvs.cuh — streaming matrix-vector kernels for one token row (the decode step, NT = 1).
// Included by cuda_kernels.cuh after k_mv_qd (it reuses mv_args, dot32, dp4a, warp_sum and the
// x quantisation of k_quant_x); launched by mv_launch_n in cuda_model.cu.
//
// Why a second family next to k_mv_dense16 / k_mv_qd: Nsight Compute on qwen3-8b decode
// (PERF.md round 8) showed those kernels at 30% (4-bit o / down / q,k,v) to 80% (bf16 gate/up)
// of the DRAM peak: at B = 1 a lane of theirs read 1-3 units of a row and the block retired
// (grids of 1024-1536 blocks of 4 rows, 1.3-2 waves of short-lived blocks, x re-read from L2 by
// every warp). Here:
// - a block of MVS_WARPS warps owns 8R rows, a warp R rows, a lane every 32nd unit of them
//   (unit = 16 bytes of bf16/f16 = 8 values, or 32 values of 4-bit (16 B) / 8-bit (32 B)
//   codes), in ascending order — the same per-lane order and arithmetic as the KS = 1 kernels,
//   so the results are bitwise those of k_mv_dense16 / k_mv_qd without split-K;
// - each lane keeps P units per row in flight (a register ring refilled as it is consumed), and
//   the first P are loaded BEFORE the programmatic-launch wait: weights are never written by
//   the step, so while the previous kernel (usually the small x quantisation) runs, this
//   kernel's resident blocks already have their first loads in flight (for o of the 8B, 4-bit
//   at 2 rows per warp, that is the lane's whole share: 4 units of each row);
// - x (k_quant_x's codes + block statistics, or fp32) is staged once per block in shared
//   memory, in planes so that lane-consecutive 16-byte reads hit distinct banks (quantising x
//   in every block instead of k_quant_x, tried: qwen3-8b q4g64 -29%, each warp's rounds of
//   x loads from L2 serialise);
// - launch sizes (mv_launch_n) aim at one wave of resident blocks for the mid-size matrices.
// Expert-indexed launches (eid) are not served: the expert id is an activation, unknown before
// the wait. Dynamic shared memory: mvs_smem() bytes (<= 48 KiB, else the caller keeps the old
// kernels).

#define MVS_WARPS 8
enum { MVS_BF16 = 0, MVS_F16 = 1, MVS_Q4 = 4, MVS_Q8 = 8 };

// 32-bit words a lane reads per unit, and values per unit
template <int FMT> struct mvs_fmt {
    static constexpr int WORDS = FMT == MVS_Q8 ? 8 : 4;
    static constexpr int VALS = FMT == MVS_Q4 || FMT == MVS_Q8 ? 32 : 8;
    static constexpr bool Q = FMT == MVS_Q4 || FMT == MVS_Q8;
    // units in flight per lane and row (ring depth) for R rows per warp: 8 x 16 B per lane
    __host__ __device__ static constexpr int depth(int R) { return (FMT == MVS_Q8 ? 4 : 8) / R; }
};

// bytes of shared memory for a row of `cols` values: per unit the x codes (XP planes of 32
// bytes) and a float4 of statistics, or 8 fp32 values
__host__ __device__ constexpr size_t mvs_smem(int fmt, int xp, int64_t cols) {
    return fmt == MVS_Q4 || fmt == MVS_Q8 ? (size_t)(cols / 32) * (32 * (size_t)xp + 16) : (size_t)cols * 4;
}

// a scale / bias as raw bits (converted only where it is used, so the load stays in flight)
template <int SDT> __device__ __forceinline__ uint32_t mvs_ld_raw(const char *p, int i, int dt) {
    if (SDT == SFT_BF16 || (SDT < 0 && dt != SFT_F32)) return ((const unsigned short *)p)[i];
    return ((const uint32_t *)p)[i];
}
template <int SDT> __device__ __forceinline__ float mvs_cvt(uint32_t u, int dt) {
    if (SDT == SFT_BF16 || (SDT < 0 && dt == SFT_BF16)) return __uint_as_float(u << 16);
    if (SDT < 0 && dt == SFT_F16) return __half2float(__ushort_as_half((unsigned short)u));
    return __uint_as_float(u);
}

template <int FMT, int XP, int SDT, int R>
__global__ void __launch_bounds__(MVS_WARPS * 32) k_mv_s(mv_args a) {
    using F = mvs_fmt<FMT>;
    constexpr int P = F::depth(R), W = F::WORDS;
    static_assert(P >= 1 && P * R <= 8 && (R == 1 || R == 2 || R == 4), "ring depth, rows per warp");
    extern __shared__ uint4 mvs_x[]; // Q: [2 XP][nu] code halves, then [nu] float4 stats; dense: [2][nu] float4
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int sg = 0;
#pragma unroll
    for (int i = 1; i < MV_SEGS; i++)
        if (i < a.nseg && (int)blockIdx.x >= a.blk0[i]) sg = i;
    const dlin &w = a.w[sg];
    const int64_t r0 = ((int64_t)((int)blockIdx.x - a.blk0[sg]) * MVS_WARPS + warp) * R;
    const int nu = (int)(w.cols / F::VALS);
    // rows past the end read the last row (no branch before the wait); their sums are dropped
    const uint4 *rowp[R];
    const char *sp[R] = {}, *bp[R] = {}; // scales / biases of the rows (quantized formats)
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int64_t rr = r0 + r < w.rows ? r0 + r : w.rows - 1;
        rowp[r] = (const uint4 *)(w.w + (size_t)rr * w.row_bytes);
        if constexpr (F::Q) {
            const size_t sb = (size_t)rr * w.srow * (w.sdtype == SFT_F32 ? 4 : 2);
            sp[r] = w.s + sb, bp[r] = w.b + sb;
        }
    }
    const int cpg = F::Q ? w.group / 32 : 1; // units per quantisation group
    const int gsh = (cpg & (cpg - 1)) == 0 ? __ffs(cpg) - 1 : -1;
    uint32_t wv[P][R][W];
    uint32_t sr[P][R], br[P][R];
    // unit c of every row into ring slot p
#define MVS_LOAD(p, c)                                                                                              \
    do {                                                                                                            \
        _Pragma("unroll") for (int r = 0; r < R; r++) {                                                             \
            const uint4 u0 = __ldg(rowp[r] + (size_t)(c) * (W / 4));                                                \
            wv[p][r][0] = u0.x, wv[p][r][1] = u0.y, wv[p][r][2] = u0.z, wv[p][r][3] = u0.w;                         \
            if constexpr (W == 8) {                                                                                 \
                const uint4 u1 = __ldg(rowp[r] + (size_t)(c) * 2 + 1);                                              \
                wv[p][r][4] = u1.x, wv[p][r][5] = u1.y, wv[p][r][6] = u1.z, wv[p][r][7] = u1.w;                     \
            }                                                                                                       \
            if constexpr (F::Q) {                                                                                   \
                const int gi_ = gsh >= 0 ? (c) >> gsh : (c) / cpg;                                                  \
                sr[p][r] = mvs_ld_raw<SDT>(sp[r], gi_, w.sdtype);                                                   \
                br[p][r] = mvs_ld_raw<SDT>(bp[r], gi_, w.sdtype);                                                   \
            }                                                                                                       \
        }                                                                                                           \
    } while (0)
#pragma unroll
    for (int p = 0; p < P; p++)
        if (lane + 32 * p < nu) MVS_LOAD(p, lane + 32 * p);
    PDL_ENTRY();
    // stage this job's x in shared memory
    const int j = blockIdx.y;
    const int64_t xr = j / a.x_div;
    if constexpr (F::Q) {
        const uint4 *gx = (const uint4 *)a.xq + xr * nu * (2 * XP);
        for (int i = threadIdx.x; i < nu * 2 * XP; i += blockDim.x) mvs_x[(i % (2 * XP)) * nu + i / (2 * XP)] = gx[i];
        const float4 *gs = a.xs + xr * nu;
        float4 *ss = (float4 *)(mvs_x + 2 * XP * nu);
        for (int i = threadIdx.x; i < nu; i += blockDim.x) ss[i] = gs[i];
    } else {
        const float4 *gx = (const float4 *)(a.x + xr * a.ldx);
        float4 *sx = (float4 *)mvs_x;
        for (int i = threadIdx.x; i < 2 * nu; i += blockDim.x) sx[(i & 1) * nu + (i >> 1)] = gx[i];
    }
    __syncthreads();
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    const int n_it = lane < nu ? (nu - lane + 31) / 32 : 0; // units of this lane per row
    for (int i0 = 0; i0 < n_it; i0 += P) {
#pragma unroll
        for (int p = 0; p < P; p++) {
            const int i = i0 + p;
            if (i < n_it) {
                const int c = lane + 32 * i;
                if constexpr (F::Q) {
                    constexpr int MID = 1 << (FMT - 1);
                    const float4 st = ((const float4 *)(mvs_x + 2 * XP * nu))[c];
                    const int qsum = __float_as_int(st.z);
                    uint32_t xh[8], xl[8];
                    {
                        const uint4 u0 = mvs_x[c], u1 = mvs_x[nu + c];
                        xh[0] = u0.x, xh[1] = u0.y, xh[2] = u0.z, xh[3] = u0.w, xh[4] = u1.x, xh[5] = u1.y, xh[6] = u1.z, xh[7] = u1.w;
                    }
                    if constexpr (XP == 2) {
                        const uint4 u2 = mvs_x[2 * nu + c], u3 = mvs_x[3 * nu + c];
                        xl[0] = u2.x, xl[1] = u2.y, xl[2] = u2.z, xl[3] = u2.w, xl[4] = u3.x, xl[5] = u3.y, xl[6] = u3.z, xl[7] = u3.w;
                    }
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const float sc = mvs_cvt<SDT>(sr[p][r], w.sdtype);
                        const float bc = fmaf((float)MID, sc, mvs_cvt<SDT>(br[p][r], w.sdtype));
                        int is = dot32<FMT>(wv[p][r], xh);
                        if constexpr (XP == 2) is = is * 256 + dot32<FMT>(wv[p][r], xl);
                        is -= MID * qsum;
                        acc[r] = fmaf(sc * st.x, (float)is, fmaf(bc, st.y, acc[r]));
                    }
                } else {
                    const float4 x0 = ((const float4 *)mvs_x)[c], x1 = ((const float4 *)mvs_x)[nu + c];
                    const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        float s = acc[r];
#pragma unroll
                        for (int k = 0; k < 4; k++) {
                            const uint32_t u = wv[p][r][k];
                            float lo, hi;
                            if (FMT == MVS_BF16) {
                                lo = __uint_as_float(u << 16);
                                hi = __uint_as_float(u & 0xffff0000u);
                            } else {
                                lo = __half2float(__ushort_as_half((unsigned short)(u & 0xffff)));
                                hi = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
                            }
                            s = fmaf(lo, xv[2 * k], s);
                            s = fmaf(hi, xv[2 * k + 1], s);
                        }
                        acc[r] = s;
                    }
                }
                if (i + P < n_it) MVS_LOAD(p, c + 32 * P);
            }
        }
    }
#undef MVS_LOAD
    float *y = a.y[sg] + (int64_t)j * a.ldy[sg];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && r0 + r < w.rows) y[r0 + r] = v;
    }
}
