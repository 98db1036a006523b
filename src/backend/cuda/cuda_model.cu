// cuda_model.cu — the CUDA backend (see strata/cuda_backend.h): weights uploaded once, the
// generic block of forward.c as a sequence of kernels on one stream, decode steps captured as
// CUDA graphs, and single-op entry points for the parity harness.
// base.h is C11 (_Noreturn); C++ spells it as an attribute.
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif
#include "strata/cuda_backend.h"
#include "strata/cuda_comm.h"

#include "cuda_kernels.cuh"
#include "cuda_attn_prefill.cuh"
#include "cuda_attn_decode.cuh"
#include "cuda_peer.cuh"
#include "cuda_tp.cuh"
#include "cuda_moe.cuh"

#include <assert.h>
#include <cublas_v2.h>
#include <cuda.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <map>
#include <string>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------------------------
// error helpers

#define CU_TRY(call)                                                                                                \
    do {                                                                                                            \
        cudaError_t e_ = (call);                                                                                    \
        if (e_ != cudaSuccess) {                                                                                    \
            cudaGetLastError();                                                                                     \
            return st_err_set(err, e_ == cudaErrorMemoryAllocation ? ST_ERR_NOMEM : ST_ERR_INTERNAL,                \
                              "CUDA: %s failed: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, __LINE__);    \
        }                                                                                                           \
    } while (0)

static int cu_check(st_err *err, const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) return st_err_set(err, ST_ERR_INTERNAL, "CUDA: %s: %s", what, cudaGetErrorString(e));
    return ST_OK;
}

static unsigned grid_for(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    if (g > 65536) g = 65536;
    return (unsigned)(g < 1 ? 1 : g);
}

// ---------------------------------------------------------------------------------------------
// kernel launches: programmatic dependent launch (see PDL_ENTRY in cuda_kernels.cuh)

static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

// 1: launch with programmatic stream serialization (compute capability >= 9 on the current
// device at the first call, and STRATA_CUDA_NO_PDL unset). One answer per process: the GPUs of
// one process are one model here.
static bool pdl_on() {
    static int on = -1;
    if (on < 0) {
        int dev = 0, major = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        on = major >= 9 && !env_on("STRATA_CUDA_NO_PDL");
    }
    return on == 1;
}

// Launches kernel k (which must begin with PDL_ENTRY / MV_PROLOGUE) on st, as a programmatic
// dependent of the previous kernel when pdl_on(). Errors surface at the next cu_check, as
// with a triple-chevron launch.
template <typename... KA, typename... A>
static void launch_k(void (*k)(KA...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, A... args) {
    if (!pdl_on()) {
        k<<<grid, block, smem, st>>>(args...);
        return;
    }
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = st;
    cfg.attrs = at, cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, k, args...);
}

// ---------------------------------------------------------------------------------------------
// launch context: stream, cuBLAS and the GEMM scratch (bf16 activations and weight tiles)

struct gctx {
    cudaStream_t st;
    cublasHandle_t blas;
    __nv_bfloat16 *xb;  // [xb_elems] activations converted for the GEMM
    size_t xb_elems;
    __nv_bfloat16 *wb;  // [wb_elems] dequantised weight rows for the GEMM
    size_t wb_elems;
    int8_t *xq;         // [xq_elems] x quantised for the dp4a matrix-vector kernels (k_quant_x)
    float4 *xs;         // [xq_elems / 32] their per-block statistics
    size_t xq_elems;    // capacity: rows * cols * planes of one matrix-vector call
    // per-kernel profile (cuda_model_profile_step)
    int fp32_only; // 1: every linear on the fp32 matrix-vector kernel, no bf16 GEMM (MoE models)
    int x16;       // 1: the dp4a kernels take x as two int8 planes by default (MoE models: int8 x
                   // moved near-tied router choices of later layers and failed the golden test)
    // x already quantised into xq / xs by the kernel that wrote it (k_swiglu_q, k_attn_combine
    // with planes): the next mv_launch_n over exactly that x (pointer, rows, planes) skips its
    // k_quant_x, and clears the tag either way (set right before that call; see quant_by_producer)
    const float *xq_of;
    int xq_of_rows, xq_of_planes;
    int prof;
    std::vector<std::pair<const char *, cudaEvent_t>> *marks;
    unsigned *moe_cnt; // [moe_cnt_n] k_moe_router's finished-block counters (zero between launches)
    int moe_cnt_n;     // one per MOE_NT tokens of a launch
};

static void mark(gctx *g, const char *name) {
    if (!g->prof) return;
    cudaEvent_t e;
    cudaEventCreate(&e);
    cudaEventRecord(e, g->st);
    g->marks->push_back({name, e});
}

// Which matrix-vector kernel serves weight w (segments of one launch must agree). MVK_Q + bits:
// k_mv_q (fp32 x); MVK_QD.. + bits: k_mv_qd with x as one / two int8 planes (QD / QD2) and bf16
// (B) or any scales, when the caller quantised x (planes > 0) for 4- and 8-bit rows of 16-byte
// multiples. Every dp4a kind is >= MVK_QD. 5/6-bit weights in the planes layout (w.pk,
// cuda_mv56.cuh): MVK_QP + bits (k_mv_qpf, fp32 x) or MVK_QD.. + 5 / 6 (k_mv_qp, dp4a).
enum {
    MVK_GENERIC, MVK_BF16, MVK_F16, MVK_Q, MVK_QP = MVK_Q + 9,
    MVK_QD = MVK_QP + 9, MVK_QD2 = MVK_QD + 9, MVK_QDB = MVK_QD2 + 9, MVK_QDB2 = MVK_QDB + 9
};
static int mv_kind(const dlin &w, bool xal, int force_generic, int planes) {
    if (force_generic || !xal) return MVK_GENERIC;
    if (w.pk) { // planes: 16-byte aligned W rows by construction (upload_lin / synth_lin)
        if (w.cols % 32 || w.group % 32 || ((uintptr_t)w.w & 15) || w.e_wstride % 16) return MVK_GENERIC;
        if (planes) return (w.sdtype == SFT_BF16 ? (planes == 2 ? MVK_QDB2 : MVK_QDB) : (planes == 2 ? MVK_QD2 : MVK_QD)) + w.qbits;
        return MVK_QP + w.qbits;
    }
    if (w.qbits && planes && (w.qbits == 4 || w.qbits == 8) && w.cols % 32 == 0 && w.group % 32 == 0 &&
        w.row_bytes % 16 == 0) {
        if (w.sdtype == SFT_BF16) return (planes == 2 ? MVK_QDB2 : MVK_QDB) + w.qbits;
        return (planes == 2 ? MVK_QD2 : MVK_QD) + w.qbits;
    }
    if (w.qbits) {
        if (w.cols % 32 == 0 && w.group % 32 == 0 &&
            (w.qbits == 2 || w.qbits == 3 || w.qbits == 4 || w.qbits == 5 || w.qbits == 6 || w.qbits == 8))
            return MVK_Q + w.qbits;
        return MVK_GENERIC;
    }
    if (w.cols % 8 == 0 && w.row_bytes % 16 == 0) {
        if (w.dtype == SFT_BF16) return MVK_BF16;
        if (w.dtype == SFT_F16) return MVK_F16;
    }
    return MVK_GENERIC;
}

#define MV_R 4 // rows per warp of the wide kernels

template <int R, int NT, int KS = 1> static void mv_fire(gctx *g, int kind, dim3 grid, const mv_args &a) {
    dim3 block(MV_WARPS * 32);
    switch (kind) {
    case MVK_BF16: launch_k(k_mv_dense16<SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_F16: launch_k(k_mv_dense16<SFT_F16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 2: launch_k(k_mv_q<2, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 3: launch_k(k_mv_q<3, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 4: launch_k(k_mv_q<4, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 5: launch_k(k_mv_q<5, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 6: launch_k(k_mv_q<6, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_Q + 8: launch_k(k_mv_q<8, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD + 4: launch_k(k_mv_qd<4, 1, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD + 8: launch_k(k_mv_qd<8, 1, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD2 + 4: launch_k(k_mv_qd<4, 2, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD2 + 8: launch_k(k_mv_qd<8, 2, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB + 4: launch_k(k_mv_qd<4, 1, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB + 8: launch_k(k_mv_qd<8, 1, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB2 + 4: launch_k(k_mv_qd<4, 2, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB2 + 8: launch_k(k_mv_qd<8, 2, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QP + 5: launch_k(k_mv_qpf<5, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QP + 6: launch_k(k_mv_qpf<6, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD + 5: launch_k(k_mv_qp<5, 1, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD + 6: launch_k(k_mv_qp<6, 1, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD2 + 5: launch_k(k_mv_qp<5, 2, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QD2 + 6: launch_k(k_mv_qp<6, 2, -1, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB + 5: launch_k(k_mv_qp<5, 1, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB + 6: launch_k(k_mv_qp<6, 1, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB2 + 5: launch_k(k_mv_qp<5, 2, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    case MVK_QDB2 + 6: launch_k(k_mv_qp<6, 2, SFT_BF16, R, NT, KS>, grid, block, 0, g->st, a); return;
    default: launch_k(k_mv_generic, grid, block, 0, g->st, a); return;
    }
}

// The streaming single-row kernel k_mv_s (cuda_mvs.cuh) for launch a of kind `kind` over
// `jobs` x rows (no expert ids), when it applies: 4- / 8-bit rows of the dp4a kinds (x quantised
// by k_quant_x into a.xq / a.xs) or, with
// STRATA_CUDA_MVS_DENSE=1, bf16 / f16 rows (slower than k_mv_dense16 on qwen3-8b bf16: PERF.md
// round 8); x staged in <= 48 KiB of shared memory; rows per warp R = 4 where that still gives
// every SM of an H200 a block (>= 132 blocks: q/k/v of the 8B in 192 blocks, gate/up), else 2
// from ~3200 rows (o / down of the 8B: 256 blocks), else 1 down to ~800 rows. Fills a.blk0,
// launches, returns true; false leaves the launch to the older kernels (small weights such as
// routers keep their split-K variants). STRATA_CUDA_MV_OLD=1 disables it.
static bool mvs_launch(gctx *g, int kind, mv_args &a, int jobs) {
    static const int off = env_on("STRATA_CUDA_MV_OLD"), dense = env_on("STRATA_CUDA_MVS_DENSE");
    if (off) return false;
    int fmt, xp = 1, sdt = -1;
    switch (kind) {
    case MVK_BF16: fmt = MVS_BF16; break;
    case MVK_F16: fmt = MVS_F16; break;
    case MVK_QD + 4: case MVK_QD + 8: fmt = kind - MVK_QD; break;
    case MVK_QD2 + 4: case MVK_QD2 + 8: fmt = kind - MVK_QD2, xp = 2; break;
    case MVK_QDB + 4: case MVK_QDB + 8: fmt = kind - MVK_QDB, sdt = SFT_BF16; break;
    case MVK_QDB2 + 4: case MVK_QDB2 + 8: fmt = kind - MVK_QDB2, xp = 2, sdt = SFT_BF16; break;
    default: return false;
    }
    if ((fmt == MVS_BF16 || fmt == MVS_F16) && !dense) return false;
    const size_t smem = mvs_smem(fmt, xp, a.w[0].cols);
    if (smem > 48 * 1024) return false;
    int64_t b4 = 0, b2 = 0, b1 = 0; // blocks at 4, 2 and 1 rows per warp
    for (int s = 0; s < a.nseg; s++)
        b4 += (a.w[s].rows + 31) / 32, b2 += (a.w[s].rows + 15) / 16, b1 += (a.w[s].rows + 7) / 8;
    const int R = b4 * jobs >= 132 ? 4 : b2 * jobs >= 200 ? 2 : b1 * jobs >= 100 ? 1 : 0;
    if (!R) return false;
    int b = 0;
    for (int s = 0; s < a.nseg; s++) {
        a.blk0[s] = b;
        b += (int)((a.w[s].rows + MVS_WARPS * R - 1) / (MVS_WARPS * R));
    }
    a.blk0[a.nseg] = b;
    const dim3 grid((unsigned)b, (unsigned)jobs), block(MVS_WARPS * 32);
#define MVS_CASE(F, X, S)                                                                                           \
    if (fmt == F && xp == X && sdt == S) {                                                                          \
        if (R == 4) launch_k(k_mv_s<F, X, S, 4>, grid, block, smem, g->st, a);                                      \
        else if (R == 2) launch_k(k_mv_s<F, X, S, 2>, grid, block, smem, g->st, a);                                 \
        else launch_k(k_mv_s<F, X, S, 1>, grid, block, smem, g->st, a);                                             \
        return true;                                                                                                \
    }
    MVS_CASE(MVS_BF16, 1, -1)
    MVS_CASE(MVS_F16, 1, -1)
    MVS_CASE(MVS_Q4, 1, -1)
    MVS_CASE(MVS_Q4, 2, -1)
    MVS_CASE(MVS_Q4, 1, SFT_BF16)
    MVS_CASE(MVS_Q4, 2, SFT_BF16)
    MVS_CASE(MVS_Q8, 1, -1)
    MVS_CASE(MVS_Q8, 2, -1)
    MVS_CASE(MVS_Q8, 1, SFT_BF16)
    MVS_CASE(MVS_Q8, 2, SFT_BF16)
#undef MVS_CASE
    return false;
}

// matrix-vector modes (linear()'s path 3 / 4 / 5 select the last three)
enum { MV_AUTO, MV_GENERIC, MV_FP32, MV_X16 };


// int8 planes of x for the dp4a kernels in mode `mode`: 0 (fp32 kernels), 1 (int8 x, the
// default), 2 (int16 precision as two int8 planes). STRATA_CUDA_NO_DP4A=1 keeps every
// quantized matrix-vector product on the fp32 kernels; STRATA_CUDA_DP4A_X16=1 selects 2.
static int mv_planes(const gctx *g, int mode) {
    if (mode == MV_GENERIC || mode == MV_FP32) return 0;
    if (mode == MV_X16) return 2;
    if (env_on("STRATA_CUDA_NO_DP4A")) return 0;
    if (env_on("STRATA_CUDA_DP4A_X16")) return 2;
    if (env_on("STRATA_CUDA_DP4A_X8")) return 1;
    return g->x16 ? 2 : 1;
}

// int8 planes of x the dp4a kernels of a matrix-vector call over weights ws[0..n) would take
// (0: none; capacity of g->xq for xrows rows checked). Weights of 5 bits and more take x in
// int16 precision (two planes): those bits are bought for accuracy, and int8 x moved the mixed
// 3/6/8-bit fixture's top-1 agreement below 99% (98.55% with int8 x for its 6-bit weight, 98.96%
// under tensor parallelism with int8 x for its 8-bit one); 4-bit weights keep one plane.
static int mv_group_planes(const gctx *g, int n, const dlin *const *ws, int64_t xrows, int mode) {
    const int64_t qcols = ws[0]->cols;
    int planes = mv_planes(g, mode);
    if (planes == 1 && mode == MV_AUTO && !env_on("STRATA_CUDA_DP4A_X8"))
        for (int i = 0; i < n; i++)
            if (ws[i]->qbits >= 5) planes = 2;
    if (planes && (!g->xq || !g->xs || qcols % 32 || (size_t)(xrows * qcols * planes) > g->xq_elems)) planes = 0;
    return planes;
}

// Launches the matrix-vector kernel for n weights ws[i] -> ys[i] (row stride ldys[i]) over the
// same x: jobs x rows each. Weights of different kinds go to separate launches. 4- and 8-bit
// weights whose cols equal ws[0]'s take the dp4a kernels when g has room to quantise the
// (jobs - 1) / x_div + nt rows of x the call reads; x is quantised once, before their first
// launch.
static void mv_launch_n(gctx *g, int n, const dlin *const *ws, float *const *ys, const int64_t *ldys, const float *x,
                        int64_t ldx, int nt, int jobs, int x_div, const int32_t *eid, int mode) {
    const bool xal = ldx % 4 == 0 && ((uintptr_t)x & 15) == 0;
    const int64_t qcols = ws[0]->cols, xrows = (int64_t)(jobs - 1) / x_div + nt;
    const int planes = mv_group_planes(g, n, ws, xrows, mode);
    // quantised by the producer of x (its tag is for this call only)
    bool quantised = planes && g->xq_of == x && g->xq_of_rows == xrows && g->xq_of_planes == planes && ldx == qcols;
    g->xq_of = nullptr;
    int done = 0;
    bool used[8] = {false};
    while (done < n) {
        mv_args a;
        memset(&a, 0, sizeof a);
        a.x = x, a.ldx = ldx, a.nt = nt, a.x_div = x_div, a.eid = eid;
        int kind = -1;
        int64_t rows = 0;
        for (int i = 0; i < n && a.nseg < MV_SEGS; i++) {
            if (used[i]) continue;
            const int k = mv_kind(*ws[i], xal, mode == MV_GENERIC, ws[i]->cols == qcols ? planes : 0);
            if (kind >= 0 && k != kind) continue;
            kind = k;
            a.w[a.nseg] = *ws[i], a.y[a.nseg] = ys[i], a.ldy[a.nseg] = ldys[i];
            a.nseg++;
            rows += ws[i]->rows;
            used[i] = true;
            done++;
        }
        if (kind >= MVK_QD) {
            if (!quantised) {
                const int64_t blocks = xrows * (qcols / 32);
                launch_k(k_quant_x, (unsigned)((blocks + 7) / 8), 256, 0, g->st, x, ldx, (int)xrows, qcols, planes, g->xq,
                         g->xs);
                quantised = true;
            }
            a.xq = g->xq, a.xs = g->xs;
        }
        if (nt == 1 && !eid && mvs_launch(g, kind, a, jobs)) continue;
        // rows per warp: MV_R when that still gives a block per SM (132 on an H200), else 1
        // (small weights: routers, a single k or v)
        int R = kind == MVK_GENERIC ? 1 : MV_R;
        if (R > 1 && (rows / (MV_WARPS * MV_R)) * jobs < 132) R = 1;
        // split-K inside the block (its MV_WARPS warps share R rows, each a quarter of the
        // columns) when the plain grid would not fill the GPU with one wave of resident warps
        // (~132 SMs x 8 blocks): down / o / qkv projections and MoE experts at B = 1
        int64_t blocks1 = 0;
        for (int s = 0; s < a.nseg; s++) blocks1 += (a.w[s].rows + MV_WARPS * R - 1) / (MV_WARPS * R);
        const bool split = kind != MVK_GENERIC && nt == 1 && blocks1 * jobs < 132 * 8 && a.w[0].cols >= 1024 &&
                           !getenv("STRATA_CUDA_NO_SPLITK");
        const int rpb = split ? R : MV_WARPS * R; // rows per block
        int b = 0;
        for (int s = 0; s < a.nseg; s++) {
            a.blk0[s] = b;
            b += (int)((a.w[s].rows + rpb - 1) / rpb);
        }
        a.blk0[a.nseg] = b;
        dim3 grid((unsigned)b, (unsigned)jobs);
        if (R == 1) {
            if (nt == 1) split ? mv_fire<1, 1, MV_WARPS>(g, kind, grid, a) : mv_fire<1, 1>(g, kind, grid, a);
            else mv_fire<1, MV_MAXT>(g, kind, grid, a);
        } else {
            if (nt == 1) split ? mv_fire<MV_R, 1, MV_WARPS>(g, kind, grid, a) : mv_fire<MV_R, 1>(g, kind, grid, a);
            else mv_fire<MV_R, MV_MAXT>(g, kind, grid, a);
        }
    }
}

static void mv_launch(gctx *g, const dlin &w, const float *x, int64_t ldx, float *y, int64_t ldy, int nt, int jobs,
                      int x_div, const int32_t *eid, int mode) {
    const dlin *ws[1] = {&w};
    float *ys[1] = {y};
    int64_t ld[1] = {ldy};
    mv_launch_n(g, 1, ws, ys, ld, x, ldx, nt, jobs, x_div, eid, mode);
}

static void mv_launch2(gctx *g, const dlin &w1, float *y1, int64_t ld1, const dlin &w2, float *y2, int64_t ld2,
                       const float *x, int64_t ldx, int nt, int jobs, int x_div, const int32_t *eid) {
    const dlin *ws[2] = {&w1, &w2};
    float *ys[2] = {y1, y2};
    int64_t ld[2] = {ld1, ld2};
    mv_launch_n(g, 2, ws, ys, ld, x, ldx, nt, jobs, x_div, eid, 0);
}

// Planes of x in which the producer of x[T, cols] should quantise it for the matrix-vector call
// over ws[0..n) that follows (0: leave it to that call's k_quant_x): decode rows (T <= MV_MAXT)
// whose first weight takes a dp4a kernel, with room in g->xq. The caller launches the fused
// producer with these planes into g->xq / g->xs and then tags x with quant_tag. On by default;
// STRATA_CUDA_NO_FUSEQ=1 keeps the separate k_quant_x launches.
static int quant_by_producer(gctx *g, int n, const dlin *const *ws, const float *x, int T) {
    static const int off = env_on("STRATA_CUDA_NO_FUSEQ");
    if (off || T > MV_MAXT || !g->xq || ((uintptr_t)x & 15) || ws[0]->cols % 32) return 0;
    const int planes = mv_group_planes(g, n, ws, T, MV_AUTO);
    return planes && mv_kind(*ws[0], true, 0, planes) >= MVK_QD ? planes : 0;
}
static void quant_tag(gctx *g, const float *x, int T, int planes) {
    g->xq_of = planes ? x : nullptr, g->xq_of_rows = T, g->xq_of_planes = planes;
}

// y[T, rows] (row stride ldy) = x[T, cols] (contiguous) W^T. path: 0 auto, 1 matrix-vector, 2 GEMM,
// 3 the generic matrix-vector kernel, 4 matrix-vector on fp32 x only (no dp4a), 5 matrix-vector
// with dp4a on two int8 planes of x. xb_has_x: g->xb already holds this x in bf16 (the previous
// GEMM of a linear_n group converted it). Returns true if it ran the GEMM (g->xb holds x then).
static bool linear(gctx *g, float *y, int64_t ldy, const float *x, const dlin &w, int T, int path = 0,
                   bool xb_has_x = false) {
    const int64_t cols = w.cols;
    bool gemm = path == 2 || (path == 0 && T > MV_MAXT && !g->fp32_only);
    if (gemm && (size_t)T * cols > g->xb_elems) gemm = false;
    if (gemm && w.qbits && g->wb_elems < (size_t)cols) gemm = false;
    if (!gemm) {
        for (int t0 = 0; t0 < T; t0 += MV_MAXT) {
            int n = std::min(MV_MAXT, T - t0);
            const int mode = path == 3 ? MV_GENERIC : path == 4 ? MV_FP32 : path == 5 ? MV_X16 : MV_AUTO;
            mv_launch(g, w, x + (int64_t)t0 * cols, cols, y + (int64_t)t0 * ldy, ldy, n, 1, 1, nullptr, mode);
        }
        return false;
    }
    int64_t n = (int64_t)T * cols;
    if (!xb_has_x) launch_k(k_f32_to_bf16, grid_for(n, 256), 256, 0, g->st, x, n, g->xb);
    const float one = 1.0f, zero = 0.0f;
    if (!w.qbits && w.dtype == SFT_BF16) {
        cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)w.rows, T, (int)cols, &one, w.w, CUDA_R_16BF, (int)cols,
                     g->xb, CUDA_R_16BF, (int)cols, &zero, y, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        return true;
    }
    int64_t rc = (int64_t)(g->wb_elems / (size_t)cols);
    for (int64_t r0 = 0; r0 < w.rows; r0 += rc) {
        int64_t nr = std::min(rc, w.rows - r0);
        launch_k(k_dequant_bf16, grid_for(nr * cols, 256), 256, 0, g->st, w, r0, nr, g->wb);
        cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, T, (int)cols, &one, g->wb, CUDA_R_16BF, (int)cols,
                     g->xb, CUDA_R_16BF, (int)cols, &zero, y + r0, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
    }
    return true;
}

// n linears over the same x[T, cols]: one matrix-vector launch per MV_MAXT tokens (q/k/v,
// gate/up) for decode and, with fp32_only, for every T; otherwise each through linear(), x
// converted to bf16 once for the group's GEMMs (was once per weight: 2 extra conversions of
// T x n_embd per layer in q/k/v, 1 in gate/up).
static void linear_n(gctx *g, int n, const dlin *const *ws, float *const *ys, const int64_t *ldys, const float *x, int T) {
    if (T > MV_MAXT && !g->fp32_only) {
        bool xb_has_x = false;
        for (int i = 0; i < n; i++) xb_has_x = linear(g, ys[i], ldys[i], x, *ws[i], T, 0, xb_has_x) || xb_has_x;
        return;
    }
    for (int t0 = 0; t0 < T; t0 += MV_MAXT) {
        float *yt[MV_SEGS];
        for (int i = 0; i < n && i < MV_SEGS; i++) yt[i] = ys[i] + (int64_t)t0 * ldys[i];
        mv_launch_n(g, n, ws, yt, ldys, x + (int64_t)t0 * ws[0]->cols, ws[0]->cols, std::min(MV_MAXT, T - t0), 1, 1,
                    nullptr, 0);
    }
}

// threads for the vectorised norm of n-wide rows (0: the vectorised kernel does not apply)
static int norm_v_threads(int n, const void *out, const void *x, const void *y, const void *w) {
    if (n % 4 || n > 4 * NORM_VEC * NORM_THREADS ||
        (((uintptr_t)out | (uintptr_t)x | (uintptr_t)y | (uintptr_t)w) & 15))
        return 0;
    int n4 = n / 4, th = (n4 + NORM_VEC - 1) / NORM_VEC;
    th = std::min(NORM_THREADS, std::max(th, std::min(n4, NORM_THREADS)));
    return (th + 31) / 32 * 32;
}

static void rmsnorm(gctx *g, float *out, const float *x, const float *w, int64_t rows, int n, float eps) {
    if (n >= 512) {
        if (int th = norm_v_threads(n, out, x, nullptr, w))
            launch_k(k_add_rmsnorm_v<false>, (unsigned)rows, th, 0, g->st, out, (float *)x, nullptr, w, n, eps, 0,
                     (int8_t *)nullptr, (float4 *)nullptr);
        else launch_k(k_rmsnorm_block, (unsigned)rows, 256, 0, g->st, out, x, w, n, eps);
    } else launch_k(k_rmsnorm_warp, (unsigned)((rows + 7) / 8), 256, 0, g->st, out, x, w, rows, n, eps);
}

// x += y; out = rmsnorm(x) * w over T rows of n. cons[0..ncons): the weights of the
// matrix-vector call that reads out next (NULL: unknown); the vectorised kernel then also
// quantises out for it (quant_by_producer) and tags it.
static void add_rmsnorm(gctx *g, float *out, float *x, const float *y, const float *w, int T, int n, float eps,
                        const dlin *const *cons = nullptr, int ncons = 0) {
    if (int th = norm_v_threads(n, out, x, y, w)) {
        const int qp = cons && n % 32 == 0 ? quant_by_producer(g, ncons, cons, out, T) : 0;
        launch_k(k_add_rmsnorm_v<true>, (unsigned)T, th, 0, g->st, out, x, y, w, n, eps, qp, g->xq, g->xs);
        quant_tag(g, out, T, qp);
    } else launch_k(k_add_rmsnorm, (unsigned)T, 256, 0, g->st, out, x, y, w, n, eps);
}

// ---------------------------------------------------------------------------------------------
// Attention of T rows over the bf16 KV cache of one layer: out [T, H*hd] from q [T, H*hd].
// Rows of up to MV_MAXT tokens (decode steps) with head_dim 64 / 128 and G = H / Hkv <= 16 run
// the tensor-core GQA kernel (k_attn_gqa_mma: each K/V row read once per kv head, splits chosen
// on the device from the row's length); other shapes and longer batches the per-head
// k_attn_split with the fixed `chunk`. part [T*H, nsplit, hd + 2] holds the splits' partials;
// k_attn_combine merges them. STRATA_CUDA_ATTN_SPLIT=1 forces the per-head kernel.
static void attn_decode(gctx *g, float *out, float *part, const float *q, const __nv_bfloat16 *kl,
                        const __nv_bfloat16 *vl, const int32_t *pos, const int32_t *slot, int T, int H, int Hkv, int hd,
                        float scale, size_t slot_stride, int chunk, int nsplit, int qplanes = 0) {
    // SMs of the current device (GPUs of one process may differ), read once per device; the
    // first call comes from an eager step (graphs are captured after a warm-up step)
    static int force_split = -1, sms_of[64];
    int dev = 0;
    cudaGetDevice(&dev);
    int &sms = sms_of[dev & 63];
    if (!sms && (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)) sms = 132;
    if (force_split < 0) force_split = env_on("STRATA_CUDA_ATTN_SPLIT");
    const int G = H / Hkv;
    if (!force_split && T <= MV_MAXT && (hd == 64 || hd == 128) && H % Hkv == 0 && G <= 16) {
        const dim3 grid((unsigned)(T * Hkv), (unsigned)nsplit);
        if (hd == 128)
            launch_k(k_attn_gqa_mma<128>, grid, AT2_WARPS * 32, 0, g->st, part, q, kl, vl, pos, slot, H, Hkv, scale, slot_stride,
                                                                   nsplit, 2 * sms);
        else
            launch_k(k_attn_gqa_mma<64>, grid, AT2_WARPS * 32, 0, g->st, part, q, kl, vl, pos, slot, H, Hkv, scale, slot_stride,
                                                                  nsplit, 2 * sms);
    } else {
        launch_k(k_attn_split, dim3((unsigned)(T * H), (unsigned)nsplit), ATT_WARPS * 32, 0, g->st, 
            part, q, kl, vl, pos, slot, H, Hkv, hd, scale, slot_stride, chunk, nsplit);
    }
    if (hd % 32) qplanes = 0;
    launch_k(k_attn_combine, T * H, 128, 0, g->st, out, part, hd, nsplit, qplanes, g->xq, g->xs);
}

// ---------------------------------------------------------------------------------------------
// the MoE feed-forward of forward.c's moe_forward (kernels in cuda_moe.cuh). Router logits always
// in fp32 x for every T (a bf16 GEMM or int8 x rounds x and flips near-tied top-k choices against
// the CPU: the T > 8 prefill failures of the first GPU run, the int8 failures of round 4), fused
// with the routing in k_moe_router. The experts: with 4/8-bit weights or 5/6-bit planes
// (moe_fused_planes) and dp4a x (the default)
// two fused launches, k_moe_gateup (gate + up + SwiGLU + quantisation of h) and k_moe_down (down +
// the weighted sum over k, fixed order); otherwise (other bit widths, dense experts,
// STRATA_CUDA_NO_DP4A=1, STRATA_CUDA_MOE_UNFUSED=1) one matrix-vector job per (token, k) for
// gate/up and for down, k_swiglu and k_moe_combine. Both are deterministic (no float atomics).

struct moe_w {
    dlin router, eg, eu, ed; // router [E, D]; experts [E] x [F, D] / [F, D] / [D, F]
    const float *bias;       // [E] selection bias (sigmoid routers) or NULL
    int E, K, F, D, sigmoid, norm;
};
struct moe_buf {
    float *rlog, *selw, *gate, *up, *ye; // [T, E], [T, K], [T*K, F] x 2, [T*K, D]
    int32_t *sel;                        // [T, K]
    // the fused path keeps h = silu(g) * u quantised in these: up as int8 [T*K, F * planes]
    // (<= 2 bytes per value of its 4), gate as float4 [T*K, F / 32] (0.5 bytes per value)
};

// Router logits (b.rlog), routing (b.sel, b.selw) of T rows of xn in k_moe_router launches of
// up to g->moe_cnt_n * MOE_NT rows; planes > 0 (D % 32 == 0): also xn quantised into g->xq /
// g->xs for the fused experts. MLX 4/8-bit routers with 32-multiple groups take the k_mv_q
// arithmetic, every other format the element-wise path.
static void moe_router(gctx *g, const moe_w &m, const moe_buf &b, const float *xn, int T, int planes) {
    const dlin &w = m.router;
    const int D = m.D, E = m.E, K = m.K;
    const bool fast = (w.qbits == 4 || w.qbits == 8) && D % 32 == 0 && w.group % 32 == 0 && w.row_bytes % 16 == 0 &&
                      ((uintptr_t)w.w & 15) == 0 && ((uintptr_t)xn & 15) == 0;
    assert(g->moe_cnt && g->moe_cnt_n > 0); // every context that runs moe_ffn allocates them
    const int S = moe_rt_slices((D + 31) / 32), per = std::max(1, g->moe_cnt_n) * MOE_NT;
    for (int t0 = 0; t0 < T; t0 += per) {
        const int n = std::min(per, T - t0);
        moe_rt_args a;
        memset(&a, 0, sizeof a);
        a.w = w, a.x = xn + (int64_t)t0 * D, a.bias = m.bias;
        a.logits = b.rlog + (int64_t)t0 * E, a.sel = b.sel + (int64_t)t0 * K, a.selw = b.selw + (int64_t)t0 * K;
        a.cnt = g->moe_cnt;
        if (planes) a.xq = g->xq + (int64_t)t0 * D * planes, a.xs = g->xs + (int64_t)t0 * (D / 32);
        a.T = n, a.E = E, a.K = K, a.S = S, a.sigmoid = m.sigmoid, a.norm = m.norm, a.planes = planes;
        const dim3 grid((unsigned)moe_rt_blocks(E, S), (unsigned)((n + MOE_NT - 1) / MOE_NT));
        if (!fast) launch_k(k_moe_router<0>, grid, MOE_RT_WARPS * 32, 0, g->st, a);
        else if (w.qbits == 8) launch_k(k_moe_router<8>, grid, MOE_RT_WARPS * 32, 0, g->st, a);
        else launch_k(k_moe_router<4>, grid, MOE_RT_WARPS * 32, 0, g->st, a);
    }
}

// Planes of x (1 or 2) for the fused expert kernels of layer m at T rows, 0 when the experts
// take the unfused path: the dp4a mode of mv_planes, experts (gate and up alike) either 4/8-bit
// MLX rows (16-byte rows and base) or 5/6-bit planes (pk, moe_pk_fits: 16-byte aligned base and
// expert stride) with 32-multiple groups, F and D multiples of 32, K <= MOE_DN_MAXP, room in
// g->xq for T rows of x. 5/6-bit experts take two planes, as mv_launch_n gives them on the
// unfused path; with STRATA_CUDA_DP4A_X8=1 (one plane asked for) they stay unfused (the fused
// kernels are built for two planes only at 5/6 bits).
static int moe_fused_planes(const gctx *g, const moe_w &m, int T) {
    const bool unfused = env_on("STRATA_CUDA_MOE_UNFUSED");
    int planes = mv_planes(g, MV_AUTO);
    if (unfused || !planes) return 0;
    const dlin *ws[3] = {&m.eg, &m.eu, &m.ed};
    bool pk = false;
    for (const dlin *w : ws) {
        if (w->pk) {
            if (!moe_pk_fits(w->qbits, w->rows, w->cols, w->group, (uintptr_t)w->w, w->e_wstride)) return 0;
            pk = true;
        } else if ((w->qbits != 4 && w->qbits != 8) || w->group % 32 || w->cols % 32 || w->row_bytes % 16 ||
                   ((uintptr_t)w->w & 15))
            return 0;
    }
    if (pk && planes == 1) {
        if (env_on("STRATA_CUDA_DP4A_X8")) return 0;
        planes = 2;
    }
    if (!g->xq || !g->xs || (size_t)T * m.D * planes > g->xq_elems) return 0;
    if (m.eg.qbits != m.eu.qbits || m.eg.pk != m.eu.pk || m.F % 32 || m.D % 32 || m.K > MOE_DN_MAXP) return 0;
    return planes;
}

// k_moe_gateup / k_moe_down for the experts' bit width (5/6: planes, two planes of x only)
template <int XP, int SDT> static void moe_gateup_fire(cudaStream_t st, int bits, dim3 grid, const moe_gu_args &a) {
    if constexpr (XP == 2) {
        if (bits == 5) return (void)(launch_k(k_moe_gateup<5, XP, SDT>, grid, MOE_GU_WARPS * 32, 0, st, a));
        if (bits == 6) return (void)(launch_k(k_moe_gateup<6, XP, SDT>, grid, MOE_GU_WARPS * 32, 0, st, a));
    }
    assert(bits == 4 || bits == 8); // moe_fused_planes admits nothing else
    if (bits == 8) launch_k(k_moe_gateup<8, XP, SDT>, grid, MOE_GU_WARPS * 32, 0, st, a);
    else launch_k(k_moe_gateup<4, XP, SDT>, grid, MOE_GU_WARPS * 32, 0, st, a);
}

template <int XP, int SDT> static void moe_down_fire(cudaStream_t st, int bits, dim3 grid, const moe_dn_args &a) {
    if constexpr (XP == 2) {
        if (bits == 5) return (void)(launch_k(k_moe_down<5, XP, SDT>, grid, MOE_DN_WARPS * 32, 0, st, a));
        if (bits == 6) return (void)(launch_k(k_moe_down<6, XP, SDT>, grid, MOE_DN_WARPS * 32, 0, st, a));
    }
    assert(bits == 4 || bits == 8);
    if (bits == 8) launch_k(k_moe_down<8, XP, SDT>, grid, MOE_DN_WARPS * 32, 0, st, a);
    else launch_k(k_moe_down<4, XP, SDT>, grid, MOE_DN_WARPS * 32, 0, st, a);
}

// out[T, D] = the MoE feed-forward of xn[T, D] (enqueue only). b's buffers hold T rows (gate / up
// T*K*F floats). Writes every row of out.
static void moe_ffn(gctx *g, const moe_w &m, const moe_buf &b, const float *xn, int T, float *out) {
    cudaStream_t st = g->st;
    const int K = m.K, F = m.F, D = m.D;
    const int planes = moe_fused_planes(g, m, T);
    mark(g, "moe router");
    moe_router(g, m, b, xn, T, planes);
    if (planes) {
        int8_t *hq = (int8_t *)b.up;
        float4 *hs = (float4 *)b.gate;
        mark(g, "moe experts gate/up");
        moe_gu_args ga = {m.eg, m.eu, g->xq, g->xs, b.sel, K, hq, hs};
        const bool gbf = m.eg.sdtype == SFT_BF16 && m.eu.sdtype == SFT_BF16;
        const dim3 gg((unsigned)(F / 32), (unsigned)(T * K));
        if (planes == 2) gbf ? moe_gateup_fire<2, SFT_BF16>(st, m.eg.qbits, gg, ga) : moe_gateup_fire<2, -1>(st, m.eg.qbits, gg, ga);
        else gbf ? moe_gateup_fire<1, SFT_BF16>(st, m.eg.qbits, gg, ga) : moe_gateup_fire<1, -1>(st, m.eg.qbits, gg, ga);
        mark(g, "moe experts down");
        moe_dn_args da = {m.ed, hq, hs, b.sel, b.selw, K, moe_dn_slices(K), out};
        const bool dbf = m.ed.sdtype == SFT_BF16;
        const dim3 dg((unsigned)((D + MOE_DN_R - 1) / MOE_DN_R), (unsigned)T);
        if (planes == 2) dbf ? moe_down_fire<2, SFT_BF16>(st, m.ed.qbits, dg, da) : moe_down_fire<2, -1>(st, m.ed.qbits, dg, da);
        else dbf ? moe_down_fire<1, SFT_BF16>(st, m.ed.qbits, dg, da) : moe_down_fire<1, -1>(st, m.ed.qbits, dg, da);
        return;
    }
    mark(g, "moe experts gate/up");
    mv_launch2(g, m.eg, b.gate, F, m.eu, b.up, F, xn, D, 1, T * K, K, b.sel);
    mark(g, "swiglu");
    launch_k(k_swiglu, grid_for((int64_t)T * K * F, 256), 256, 0, st, b.gate, b.gate, b.up, (int64_t)T * K * F);
    mark(g, "moe experts down");
    mv_launch(g, m.ed, b.gate, F, b.ye, D, 1, T * K, 1, b.sel, 0);
    launch_k(k_moe_combine, T, 256, 0, st, out, b.ye, b.selw, K, D);
}

// ---------------------------------------------------------------------------------------------
// the model on the device

struct dlayer {
    float *attn_norm, *ffn_norm, *q_norm, *k_norm; // fp32
    dlin wq, wk, wv, wo, w_gate, w_up, w_down;
    dlin router, eg, eu, ed;                      // experts packed [E, ...]
    float *router_bias;
    int moe;
};

struct cuda_model {
    const model *m;          // NULL for a model synthesised on the device
    const model_desc *d;     // m->desc, or the caller's descriptor (cuda_model_init_synthetic)
    size_t active_bytes;     // weight bytes one B = 1 decode step reads
    cuda_model_opts o;
    char devname[128];
    gctx g;
    std::vector<void *> allocs;
    size_t weight_bytes, kv_bytes, act_bytes;
    dlin embed, output;
    float *out_norm;
    std::vector<dlayer> L;
    double *inv_freq;        // [n_rot/2]
    // activations, B = max_batch rows
    float *x, *xn, *q, *k, *v, *att, *tmp; // [B, n_embd] / [B, qd] / [B, kvd]
    float *gate, *up;        // [max(B*n_ff, B*K*F)]
    float *rlog, *selw, *ye; // [B, E] / [B, K] / [B*K, D]
    int32_t *sel;            // [B, K]
    float *logits;           // [B, V]
    float *part;             // attention partials [B*H, nsplit, hd+2]
    int att_chunk, att_nsplit;
    int nop_per_layer;       // STRATA_CUDA_NOP: empty kernels per layer (a measurement, k_nop)
    int l0, l1;              // the layer range this model runs [l0, l1)
    int has_embed;           // 1: rows enter as token ids; 0: as hidden states in x
    int has_output;          // 1: ends with norm + lm_head; 0: hands x on (a pipeline stage)
    __nv_bfloat16 *kc, *vc;  // [n_slots][l1 - l0][max_ctx][kvd]
    size_t kv_layer_stride, kv_slot_stride;
    int32_t *io;             // [3, B] tokens, positions, slots
    int32_t *next;           // [B] argmax ids
    int32_t *gen_log, *gen_counter; // [max_ctx + 8], [1]
    int32_t *h_io;           // pinned [3 * B + 8]
    cudaGraphExec_t graph[MV_MAXT + 1];
    // asynchronous stage steps (cuda_stage_submit): pinned staging and a completion flag the
    // stream writes into mapped host memory; graphs per (output kind, T <= MV_MAXT)
    float *h_x;              // pinned [B, D] hidden states in
    float *h_out;            // pinned [max(B * D, V)] hidden states / logits out
    int32_t *h_tok;          // pinned [B] greedy ids out
    volatile uint32_t *h_flag; // mapped pinned: 0 submitted, 1 complete
    void *d_flag;            // its device address
    void *write_value;       // cuStreamWriteValue32 (driver entry point), NULL: a kernel writes
    cudaGraphExec_t sgraph[3][MV_MAXT + 1];
    int s_T, s_kind, s_pending;
    // NCCL links (cuda_stage_set_nccl): borrowed communicators of the hops in (rank 1) and out
    // (rank 0); steps with io != 0 use graphs without the host copies, keyed [kind][io][T]
    // (captured on the second use: the first runs eagerly behind the receive), and four events
    // (before the receive, the layers, the send, after it) time the step's parts
    cuda_nccl_comm *nc_in, *nc_out;
    cudaGraphExec_t ngraph[3][4][MV_MAXT + 1];
    unsigned char nwarm[3][4][MV_MAXT + 1];
    cudaEvent_t nev[4];
    int nev_ok, s_io;
    int nc_graph;            // STRATA_NCCL_GRAPH=1: the receive / send are captured into the graph too
    int s_split;             // the step's events split receive / layers / send (0: one graph did all)
    // STRATA_STAGE_DIAG=1: events around each step; cuda_stage_diag reports the split of a
    // step's host-seen time into GPU execution and the tail after the flag
    int diag;
    cudaEvent_t ev0, ev1;
    double d_gpu_ms, d_tail_us;
    // tensor parallelism (struct cuda_tp): rank tp_rank of tp_n (1: none). d points at dloc,
    // the descriptor with this rank's share of the heads, KV heads and FFN / expert widths; pv
    // is this rank's view of the group's peer all-reduce
    int tp_rank, tp_n;
    model_desc dloc;
    cuda_peer_view pv;
    float *tp_scr;           // [B, 2] full-width QK-norm sums of squares
    int qd_all, kvd_all;     // full q / k widths (the full-width QK-norm's divisors)
    long d_n;
};

template <class T> static int dalloc(cuda_model *c, T **p, size_t n, size_t *acct, st_err *err) {
    size_t bytes = (n ? n : 1) * sizeof(T);
    void *q = nullptr;
    cudaError_t e = cudaMalloc(&q, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        char b1[32], b2[32];
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return st_err_set(err, ST_ERR_NOMEM, "CUDA: cannot allocate %s on the device (%s free)",
                          st_fmt_bytes((double)bytes, b1, sizeof b1), st_fmt_bytes((double)fr, b2, sizeof b2));
    }
    c->allocs.push_back(q);
    if (acct) *acct += bytes;
    *p = (T *)q;
    return ST_OK;
}

static size_t sdt_size(int dt) { return dt == SFT_F32 ? 4 : 2; }

static int upload(cuda_model *c, const void *src, size_t bytes, const char **dst, st_err *err) {
    char *p = nullptr;
    int rc = dalloc(c, &p, bytes, &c->weight_bytes, err);
    if (rc) return rc;
    CU_TRY(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
    *dst = p;
    return ST_OK;
}

static int upload_f32(cuda_model *c, const float *src, size_t n, float **dst, st_err *err) {
    if (!src) {
        *dst = nullptr;
        return ST_OK;
    }
    const char *p = nullptr;
    int rc = upload(c, src, n * 4, &p, err);
    *dst = (float *)p;
    return rc;
}

static void dlin_from(const wt_linear *w, dlin *d) {
    memset(d, 0, sizeof *d);
    d->qbits = w->qbits, d->group = w->group, d->dtype = (int)w->dtype, d->sdtype = (int)w->sdtype;
    d->rows = w->rows, d->cols = w->cols, d->row_bytes = w->row_bytes, d->srow = w->srow_elems;
}

// Whether a quantized weight is kept on the device in the planes layout of mv56_layout.h (5/6-bit
// MLX rows of whole 32-value blocks), read by the dp4a kernels of cuda_mv56.cuh. With
// STRATA_CUDA_NO_DP4A set when the weight is uploaded or synthesised it stays MLX (round 4's
// k_mv_q), so one build A/B-tests both; a planes weight still runs fp32 x when a launch asks
// for it (k_mv_qpf).
static bool lin_planes(int qbits, int64_t cols, int group, size_t row_bytes) {
    return (qbits == 5 || qbits == 6) && cols % 32 == 0 && group % 32 == 0 && row_bytes == (size_t)cols * qbits / 8 &&
           !env_on("STRATA_CUDA_NO_DP4A");
}

// Copies one weight's (expert's) MLX rows from the host into dst (device, 16-byte aligned) in the
// planes layout: chunks of whole rows of at most stg_bytes (at least one row) through the device
// staging buffer stg, each repacked by k_mv56_pack. Copies and kernels run on the legacy default
// stream, so a copy into stg waits for the previous chunk's kernel; the caller synchronises before
// another stream reads dst. Returns the first CUDA error.
static cudaError_t put_planes(char *dst, const wt_linear *w, char *stg, size_t stg_bytes) {
    const int64_t chunk = std::max<int64_t>(1, (int64_t)(stg_bytes / w->row_bytes));
    for (int64_t r0 = 0; r0 < w->rows; r0 += chunk) {
        const int64_t n = std::min(chunk, w->rows - r0);
        cudaError_t e = cudaMemcpy(stg, (const char *)w->w + (size_t)r0 * w->row_bytes, (size_t)n * w->row_bytes,
                                   cudaMemcpyHostToDevice);
        if (e != cudaSuccess) return e;
        launch_k(k_mv56_pack, grid_for(n * (w->cols / 32), 256), 256, 0, 0, (const uint32_t *)stg, r0, n, w->rows, w->cols, w->qbits, dst);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    return cudaSuccess;
}

// a device buffer freed when it goes out of scope (staging of put_planes)
struct dev_tmp {
    void *p = nullptr;
    ~dev_tmp() {
        if (p) cudaFree(p);
    }
};

// Uploads E weights of identical shape (E = 1: a plain linear) contiguously; 5/6-bit ones
// repacked into planes (lin_planes), E experts mv56_expert_stride apart.
static int upload_lin(cuda_model *c, const wt_linear *w, int E, dlin *d, st_err *err) {
    memset(d, 0, sizeof *d);
    if (!w || !w[0].w) return ST_OK;
    dlin_from(&w[0], d);
    const bool pl = w[0].qbits && lin_planes(w[0].qbits, w[0].cols, w[0].group, w[0].row_bytes);
    const size_t wb = (size_t)w[0].rows * w[0].row_bytes;
    const size_t ws = pl ? mv56_expert_stride(w[0].qbits, w[0].rows, w[0].cols) : wb; // bytes between experts
    const size_t sn = w[0].qbits ? (size_t)w[0].rows * w[0].srow_elems : 0, sb = sn * sdt_size(w[0].sdtype);
    char *pw, *ps = nullptr, *pb = nullptr;
    int rc = dalloc(c, &pw, ws * E, &c->weight_bytes, err);
    if (!rc && sn) rc = dalloc(c, &ps, sb * E, &c->weight_bytes, err);
    if (!rc && sn) rc = dalloc(c, &pb, sb * E, &c->weight_bytes, err);
    if (rc) return rc;
    dev_tmp stg; // MLX rows on their way to the planes: one expert, at most 64 MiB
    const size_t stg_bytes = std::max((size_t)w[0].row_bytes, std::min(wb, (size_t)64 << 20));
    if (pl) CU_TRY(cudaMalloc(&stg.p, stg_bytes));
    for (int e = 0; e < E; e++) {
        if (w[e].rows != w[0].rows || w[e].cols != w[0].cols || w[e].qbits != w[0].qbits || w[e].dtype != w[0].dtype ||
            w[e].group != w[0].group || w[e].sdtype != w[0].sdtype)
            return st_err_set(err, ST_ERR_UNSUPPORTED, "CUDA: experts of one layer differ in shape or quantization");
        if (pl) CU_TRY(put_planes(pw + ws * e, &w[e], (char *)stg.p, stg_bytes));
        else CU_TRY(cudaMemcpy(pw + wb * e, w[e].w, wb, cudaMemcpyHostToDevice));
        if (sn) {
            CU_TRY(cudaMemcpy(ps + sb * e, w[e].scales, sb, cudaMemcpyHostToDevice));
            CU_TRY(cudaMemcpy(pb + sb * e, w[e].biases, sb, cudaMemcpyHostToDevice));
        }
    }
    if (pl) CU_TRY(cudaDeviceSynchronize()); // the repack ran on the legacy stream
    d->w = pw, d->s = ps, d->b = pb, d->pk = pl;
    d->e_wstride = ws, d->e_sstride = sn;
    return ST_OK;
}

static int device_ok(int dev, char *name, size_t cap, st_err *err) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        return st_err_set(err, ST_ERR_UNSUPPORTED, "no CUDA device: %s",
                          e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    }
    if (dev < 0 || dev >= n) return st_err_set(err, ST_ERR_ARG, "CUDA device %d does not exist (%d devices)", dev, n);
    CU_TRY(cudaSetDevice(dev));
    if (name) {
        cudaDeviceProp p;
        CU_TRY(cudaGetDeviceProperties(&p, dev));
        snprintf(name, cap, "%s (sm_%d%d, %d SMs)", p.name, p.major, p.minor, p.multiProcessorCount);
    }
    return ST_OK;
}

extern "C" void cuda_model_free(cuda_model *c) {
    if (!c) return;
    cudaDeviceSynchronize();
    for (int b = 0; b <= MV_MAXT; b++) {
        if (c->graph[b]) cudaGraphExecDestroy(c->graph[b]);
        for (int k = 0; k < 3; k++) {
            if (c->sgraph[k][b]) cudaGraphExecDestroy(c->sgraph[k][b]);
            for (int io = 0; io < 4; io++)
                if (c->ngraph[k][io][b]) cudaGraphExecDestroy(c->ngraph[k][io][b]);
        }
    }
    if (c->nev_ok)
        for (int i = 0; i < 4; i++) cudaEventDestroy(c->nev[i]);
    if (c->h_x) cudaFreeHost(c->h_x);
    if (c->h_out) cudaFreeHost(c->h_out);
    if (c->h_tok) cudaFreeHost(c->h_tok);
    if (c->h_flag) cudaFreeHost((void *)c->h_flag);
    if (c->diag) cudaEventDestroy(c->ev0), cudaEventDestroy(c->ev1);
    for (void *p : c->allocs) cudaFree(p);
    if (c->h_io) cudaFreeHost(c->h_io);
    if (c->g.blas) cublasDestroy(c->g.blas);
    if (c->g.st) cudaStreamDestroy(c->g.st);
    delete c;
}

// bytes of one expert (or the one weight) of w: packed/dense rows plus scales and biases
static size_t dlin_bytes(const dlin &w) {
    if (!w.w) return 0;
    return (size_t)w.rows * w.row_bytes + (w.qbits ? 2 * (size_t)w.rows * w.srow * sdt_size(w.sdtype) : 0);
}

// A weight of E experts [rows, cols] generated on the device: MLX affine `bits`/`group` with bf16
// scales (zero-mean values of standard deviation 1/sqrt(fan_in)), or dense bf16 (bits 0). 5/6-bit
// weights are generated directly in the planes layout (lin_planes; random bits are uniform codes
// in either layout), so benchmarks run the kernels a loaded checkpoint runs.
static int synth_lin(cuda_model *c, int64_t rows, int64_t cols, int bits, int group, int E, double fan_in, uint64_t seed,
                     dlin *d, st_err *err) {
    memset(d, 0, sizeof *d);
    d->qbits = bits, d->group = bits ? group : 0, d->dtype = SFT_BF16, d->sdtype = SFT_BF16;
    d->rows = rows, d->cols = cols;
    d->row_bytes = bits ? (size_t)cols * bits / 8 : (size_t)cols * 2;
    d->srow = bits ? (size_t)(cols / group) : 0;
    const size_t sn = (size_t)rows * d->srow;
    d->pk = bits && lin_planes(bits, cols, group, d->row_bytes);
    const size_t wb = d->pk ? mv56_expert_stride(bits, rows, cols) : (size_t)rows * d->row_bytes; // expert stride
    const float sd = (float)(1.0 / sqrt(fan_in));
    char *pw = nullptr, *ps = nullptr, *pb = nullptr;
    int rc = dalloc(c, &pw, wb * E, &c->weight_bytes, err);
    if (rc) return rc;
    if (bits) {
        if ((rc = dalloc(c, &ps, sn * 2 * E, &c->weight_bytes, err)) || (rc = dalloc(c, &pb, sn * 2 * E, &c->weight_bytes, err)))
            return rc;
        const double levels = (double)(1u << bits);
        const float s0 = (float)(sd / sqrt((levels * levels - 1.0) / 12.0)), qmid = (float)((levels - 1.0) / 2.0);
        size_t nw = wb * E / 4;
        launch_k(k_synth_u32, grid_for((int64_t)nw, 256), 256, 0, c->g.st, (uint32_t *)pw, nw, seed);
        launch_k(k_synth_scales, grid_for((int64_t)(sn * E), 256), 256, 0, c->g.st, (__nv_bfloat16 *)ps, (__nv_bfloat16 *)pb,
                                                                                sn * E, seed ^ 0x5CA1E5ull, s0, qmid);
    } else {
        size_t n = wb * E / 2;
        launch_k(k_synth_bf16, grid_for((int64_t)n, 256), 256, 0, c->g.st, (__nv_bfloat16 *)pw, n, seed, 0.f, sd * 1.7320508f);
    }
    CU_TRY(cudaGetLastError());
    d->w = pw, d->s = ps, d->b = pb, d->e_wstride = wb, d->e_sstride = sn;
    return ST_OK;
}

static int synth_f32(cuda_model *c, size_t n, uint64_t seed, float center, float amp, float **dst, st_err *err) {
    int rc = dalloc(c, dst, n, &c->weight_bytes, err);
    if (rc) return rc;
    launch_k(k_synth_f32, grid_for((int64_t)n, 256), 256, 0, c->g.st, *dst, n, seed, center, amp);
    CU_TRY(cudaGetLastError());
    return ST_OK;
}

// Tensor parallelism: this rank's descriptor: heads, KV heads, FFN and expert widths divided
// by n (each must divide; with quantized weights the split widths must stay whole groups).
static int tp_local_desc(const model_desc *d, int n, model_desc *out, st_err *err) {
    const int hd = d->head_dim;
    if (d->n_head % n || d->n_head_kv % n)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "tensor parallel %d: %d heads / %d KV heads do not divide", n,
                          d->n_head, d->n_head_kv);
    if ((d->n_ff > 0 && d->n_ff % n) || (d->n_ff_expert > 0 && d->n_ff_expert % n))
        return st_err_set(err, ST_ERR_UNSUPPORTED, "tensor parallel %d: FFN width %d / expert width %d do not divide", n,
                          d->n_ff, d->n_ff_expert);
    if (d->q_bits && d->q_group > 0 &&
        ((d->n_head / n * hd) % d->q_group || (d->n_ff > 0 && (d->n_ff / n) % d->q_group) ||
         (d->n_ff_expert > 0 && (d->n_ff_expert / n) % d->q_group)))
        return st_err_set(err, ST_ERR_UNSUPPORTED,
                          "tensor parallel %d: a split width (q %d, FFN %d, expert %d) is not a multiple of the "
                          "quantization group %d",
                          n, d->n_head / n * hd, d->n_ff / n, d->n_ff_expert / n, d->q_group);
    *out = *d; // shallow: the arrays (layer_moe, ...) stay the caller's
    out->n_head = d->n_head / n, out->n_head_kv = d->n_head_kv / n;
    if (d->n_ff > 0) out->n_ff = d->n_ff / n;
    if (d->n_ff_expert > 0) out->n_ff_expert = d->n_ff_expert / n;
    return ST_OK;
}

// Uploads rank c->tp_rank's share of E weights: dim 0 splits the rows (q/k/v, gate/up: whole
// heads / FFN rows), dim 1 the columns (o, down: the matching inputs), copied row by row through
// a host buffer. Without tensor parallelism: upload_lin. Column splits of quantized weights must
// keep whole groups (and 32-bit words).
static int upload_lin_tp(cuda_model *c, const wt_linear *w, int E, int dim, dlin *d, st_err *err) {
    if (c->tp_n <= 1 || !w || !w[0].w) return upload_lin(c, w, E, d, err);
    const int N = c->tp_n, r = c->tp_rank;
    std::vector<wt_linear> v((size_t)E);
    std::vector<std::vector<char>> bufs((size_t)E * 3);
    for (int e = 0; e < E; e++) {
        wt_linear s = w[e];
        const size_t sb = s.qbits ? sdt_size(s.sdtype) : 0;
        if (dim == 0) {
            if (s.rows % N) return st_err_set(err, ST_ERR_UNSUPPORTED, "tensor parallel %d: %lld rows do not divide", N, (long long)s.rows);
            const int64_t nr = s.rows / N;
            s.w = (const char *)s.w + (size_t)(r * nr) * s.row_bytes;
            if (s.qbits) {
                s.scales = (const char *)s.scales + (size_t)(r * nr) * s.srow_elems * sb;
                s.biases = (const char *)s.biases + (size_t)(r * nr) * s.srow_elems * sb;
            }
            s.rows = nr;
        } else {
            const int64_t nc = s.cols / N;
            if (s.cols % N || s.row_bytes % N || (s.qbits && (nc % s.group || (nc * s.qbits) % 32 || s.srow_elems % N)))
                return st_err_set(err, ST_ERR_UNSUPPORTED,
                                  "tensor parallel %d: %lld columns (%d-bit, group %d) do not split into whole groups", N,
                                  (long long)s.cols, s.qbits, s.group);
            const size_t rb = s.row_bytes / N, se = s.qbits ? s.srow_elems / N : 0;
            std::vector<char> &bw = bufs[(size_t)e * 3], &bs = bufs[(size_t)e * 3 + 1], &bb = bufs[(size_t)e * 3 + 2];
            bw.resize((size_t)s.rows * rb);
            for (int64_t i = 0; i < s.rows; i++)
                memcpy(&bw[(size_t)i * rb], (const char *)s.w + (size_t)i * s.row_bytes + (size_t)r * rb, rb);
            if (s.qbits) {
                bs.resize((size_t)s.rows * se * sb), bb.resize((size_t)s.rows * se * sb);
                for (int64_t i = 0; i < s.rows; i++) {
                    const size_t off = ((size_t)i * s.srow_elems + (size_t)r * se) * sb;
                    memcpy(&bs[(size_t)i * se * sb], (const char *)s.scales + off, se * sb);
                    memcpy(&bb[(size_t)i * se * sb], (const char *)s.biases + off, se * sb);
                }
                s.scales = bs.data(), s.biases = bb.data(), s.srow_elems = se;
            }
            s.w = bw.data(), s.cols = nc, s.row_bytes = rb;
        }
        v[(size_t)e] = s;
    }
    return upload_lin(c, v.data(), E, d, err);
}

static int model_init(cuda_model **out, const model *m, const model_desc *d, uint64_t seed, const cuda_model_opts *opts,
                      st_err *err);

extern "C" int cuda_model_init(cuda_model **out, const model *m, const cuda_model_opts *opts, st_err *err) {
    *out = nullptr;
    cuda_model_opts o = opts ? *opts : cuda_model_opts{};
    o.layer_begin = m->layer_begin, o.layer_end = m->layer_end; // the stage the host model binds
    o.with_embed = m->holds_embed, o.with_output = m->holds_output;
    return model_init(out, m, &m->desc, 0, &o, err);
}

extern "C" int cuda_model_init_synthetic(cuda_model **out, const model_desc *d, const cuda_model_opts *opts,
                                         uint64_t seed, st_err *err) {
    *out = nullptr;
    return model_init(out, nullptr, d, seed, opts, err);
}

static int model_init(cuda_model **out, const model *m, const model_desc *d, uint64_t seed, const cuda_model_opts *opts,
                      st_err *err) {
    *out = nullptr;
    cuda_model_opts o = opts ? *opts : cuda_model_opts{};
    if (getenv("STRATA_CUDA_NO_GRAPH")) o.no_graph = 1;
    char name[128] = "";
    int rc = device_ok(o.device, name, sizeof name, err);
    if (rc) return rc;
    if (d->head_dim > 32 * ATT_MAXJ || d->n_head % d->n_head_kv)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "CUDA: head_dim %d / heads %d:%d not supported", d->head_dim,
                          d->n_head, d->n_head_kv);
    if (d->n_expert > MOE_MAXE)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "CUDA: %d experts (at most %d)", d->n_expert, MOE_MAXE);
    if (o.max_batch <= 0) o.max_batch = 256;
    if (o.n_slots <= 0) o.n_slots = 1;
    if (o.max_ctx <= 0) o.max_ctx = (int)(d->max_pos < 4096 ? d->max_pos : 4096);
    if (o.max_ctx > d->max_pos)
        return st_err_set(err, ST_ERR_ARG, "context %d exceeds the model's max_position_embeddings %lld", o.max_ctx,
                          (long long)d->max_pos);
    if (o.layer_begin == 0 && o.layer_end == 0) o.layer_end = d->n_layer, o.with_embed = o.with_output = 1;
    if (o.layer_begin < 0 || o.layer_end > d->n_layer || o.layer_begin >= o.layer_end)
        return st_err_set(err, ST_ERR_ARG, "CUDA: layer range %d..%d outside the model's %d layers", o.layer_begin,
                          o.layer_end, d->n_layer);
    cuda_model *c = new cuda_model();
    c->l0 = o.layer_begin, c->l1 = o.layer_end, c->has_embed = o.with_embed != 0, c->has_output = o.with_output != 0;
    c->m = m;
    c->d = d;
    c->o = o;
    c->tp_n = 1;
    if (o.tp_size > 1) { // this rank's share of the heads and widths from here on
        if ((rc = tp_local_desc(d, o.tp_size, &c->dloc, err))) {
            cuda_model_free(c);
            return rc;
        }
        c->tp_n = o.tp_size, c->tp_rank = o.tp_rank;
        c->qd_all = d->n_head * d->head_dim, c->kvd_all = d->n_head_kv * d->head_dim;
        d = c->d = &c->dloc;
    }
    snprintf(c->devname, sizeof c->devname, "%s", name);
    if (cudaStreamCreateWithFlags(&c->g.st, cudaStreamNonBlocking) != cudaSuccess ||
        cublasCreate(&c->g.blas) != CUBLAS_STATUS_SUCCESS) {
        cuda_model_free(c);
        return st_err_set(err, ST_ERR_INTERNAL, "CUDA: cannot create a stream / cuBLAS handle");
    }
    cublasSetStream(c->g.blas, c->g.st);
    cublasSetMathMode(c->g.blas, CUBLAS_DEFAULT_MATH);
    { // PDL trigger placement of this device's kernels (PDL_ENTRY)
        const int early = pdl_on() && env_on("STRATA_CUDA_PDL_EARLY");
        cudaMemcpyToSymbol(c_pdl_early, &early, sizeof early);
    }
    // MoE models: prefill linears stay fp32 like decode. The expert choice is discontinuous in
    // the router input, so the bf16 rounding of the GEMM path (fine for dense models, ~5e-3)
    // flips near-tied top-k choices against the CPU reference and the logits jump (the T > 8
    // failures of the first GPU run). STRATA_CUDA_MOE_GEMM=1 takes the GEMM path anyway.
    c->g.fp32_only = d->n_expert > 0 && !getenv("STRATA_CUDA_MOE_GEMM");
    c->g.x16 = d->n_expert > 0;
#define TRY(x)                                                                                                      \
    do {                                                                                                            \
        if ((rc = (x))) {                                                                                           \
            cuda_model_free(c);                                                                                     \
            return rc;                                                                                              \
        }                                                                                                           \
    } while (0)
    // weights
    const int D = d->n_embd, H = d->n_head, Hkv = d->n_head_kv, hd = d->head_dim, qd = H * hd, kvd = Hkv * hd;
    const int E = d->n_expert, K = d->n_expert_used > 0 ? d->n_expert_used : 1, F = d->n_ff_expert;
    // synthetic: MLX layout of synth.h (every linear and the embedding at q_bits/q_group, routers
    // at 8 bits group 64) or bf16; norms 1, router bias ~ 0.05
    const int qb = d->q_bits, qg = d->q_group, rb = d->q_bits ? 8 : 0;
    uint64_t sid = seed * 0x9E3779B97F4A7C15ull + 12345;
    auto next_seed = [&]() { return sid += 0xD1B54A32D192ED03ull; };
    // weights split over tensor-parallel ranks: rank 0 draws the seeds of the unsplit model
    auto shard_seed = [&]() { return next_seed() ^ ((uint64_t)c->tp_rank * 0xA24BAED4963EE407ull); };
    if (m) {
        if (c->has_embed) TRY(upload_lin(c, &m->embed, 1, &c->embed, err));
        if (c->has_output) {
            if (c->has_embed && m->output.w == m->embed.w) c->output = c->embed;
            else TRY(upload_lin(c, &m->output, 1, &c->output, err));
            TRY(upload_f32(c, m->out_norm, (size_t)d->n_embd, &c->out_norm, err));
        }
    } else { // every stage draws the same seeds in the same order, so stages compose exactly
        const uint64_t se = next_seed(), so = d->tie_embeddings ? se : next_seed(), sn = next_seed();
        if (c->has_embed) TRY(synth_lin(c, d->n_vocab, D, qb, qg, 1, D, se, &c->embed, err));
        if (c->has_output) {
            if (c->has_embed && d->tie_embeddings) c->output = c->embed;
            else TRY(synth_lin(c, d->n_vocab, D, qb, qg, 1, D, so, &c->output, err));
            TRY(synth_f32(c, (size_t)D, sn, 1.f, 0.f, &c->out_norm, err));
        }
    }
    c->L.resize((size_t)d->n_layer);
    size_t max_cols = (size_t)std::max(std::max(D, qd), std::max(d->n_ff, F)), max_w = 0;
    for (int l = 0; l < d->n_layer; l++) {
        dlayer *dl = &c->L[(size_t)l];
        memset(dl, 0, sizeof *dl);
        dl->moe = d->layer_moe[l];
        if (l < c->l0 || l >= c->l1) { // another stage's layer: draw its seeds, allocate nothing
            if (!m) {
                const int n_seeds = 4 + (dl->moe ? 1 + (d->router == ROUTER_SIGMOID_BIAS) + 3 : 3);
                for (int i = 0; i < n_seeds; i++) next_seed();
            }
            continue;
        }
        if (!m) {
            size_t qn = d->qk_norm == QK_NORM_FULL ? (size_t)qd : (size_t)hd, kn = d->qk_norm == QK_NORM_FULL ? (size_t)kvd : (size_t)hd;
            TRY(synth_f32(c, (size_t)D, 0, 1.f, 0.f, &dl->attn_norm, err));
            TRY(synth_f32(c, (size_t)D, 0, 1.f, 0.f, &dl->ffn_norm, err));
            if (d->qk_norm != QK_NORM_NONE) {
                TRY(synth_f32(c, qn, 0, 1.f, 0.f, &dl->q_norm, err));
                TRY(synth_f32(c, kn, 0, 1.f, 0.f, &dl->k_norm, err));
            }
            TRY(synth_lin(c, qd, D, qb, qg, 1, D, shard_seed(), &dl->wq, err));
            TRY(synth_lin(c, kvd, D, qb, qg, 1, D, shard_seed(), &dl->wk, err));
            TRY(synth_lin(c, kvd, D, qb, qg, 1, D, shard_seed(), &dl->wv, err));
            TRY(synth_lin(c, D, qd, qb, qg, 1, qd * c->tp_n, shard_seed(), &dl->wo, err));
            if (dl->moe) {
                TRY(synth_lin(c, E, D, rb, 64, 1, D, next_seed(), &dl->router, err));
                if (d->router == ROUTER_SIGMOID_BIAS)
                    TRY(synth_f32(c, (size_t)E, next_seed(), 0.f, 0.0866f, &dl->router_bias, err));
                TRY(synth_lin(c, F, D, qb, qg, E, D, shard_seed(), &dl->eg, err));
                TRY(synth_lin(c, F, D, qb, qg, E, D, shard_seed(), &dl->eu, err));
                TRY(synth_lin(c, D, F, qb, qg, E, F * c->tp_n, shard_seed(), &dl->ed, err));
            } else {
                TRY(synth_lin(c, d->n_ff, D, qb, qg, 1, D, shard_seed(), &dl->w_gate, err));
                TRY(synth_lin(c, d->n_ff, D, qb, qg, 1, D, shard_seed(), &dl->w_up, err));
                TRY(synth_lin(c, D, d->n_ff, qb, qg, 1, d->n_ff * c->tp_n, shard_seed(), &dl->w_down, err));
            }
        } else {
        const layer_weights *lw = &m->layers[l];
        TRY(upload_f32(c, lw->attn_norm, (size_t)D, &dl->attn_norm, err));
        TRY(upload_f32(c, lw->ffn_norm, (size_t)D, &dl->ffn_norm, err));
        size_t qn = d->qk_norm == QK_NORM_FULL ? (size_t)qd : (size_t)hd, kn = d->qk_norm == QK_NORM_FULL ? (size_t)kvd : (size_t)hd;
        if (d->qk_norm != QK_NORM_NONE) { // full width: this rank's slice of the heads
            const size_t rq = d->qk_norm == QK_NORM_FULL ? (size_t)c->tp_rank * qn : 0;
            const size_t rk = d->qk_norm == QK_NORM_FULL ? (size_t)c->tp_rank * kn : 0;
            TRY(upload_f32(c, lw->q_norm + rq, qn, &dl->q_norm, err));
            TRY(upload_f32(c, lw->k_norm + rk, kn, &dl->k_norm, err));
        }
        TRY(upload_lin_tp(c, &lw->wq, 1, 0, &dl->wq, err));
        TRY(upload_lin_tp(c, &lw->wk, 1, 0, &dl->wk, err));
        TRY(upload_lin_tp(c, &lw->wv, 1, 0, &dl->wv, err));
        TRY(upload_lin_tp(c, &lw->wo, 1, 1, &dl->wo, err));
        if (dl->moe) {
            TRY(upload_lin(c, &lw->router, 1, &dl->router, err));
            TRY(upload_f32(c, lw->router_bias, (size_t)E, &dl->router_bias, err));
            TRY(upload_lin_tp(c, lw->exp_gate, E, 0, &dl->eg, err));
            TRY(upload_lin_tp(c, lw->exp_up, E, 0, &dl->eu, err));
            TRY(upload_lin_tp(c, lw->exp_down, E, 1, &dl->ed, err));
        } else {
            TRY(upload_lin_tp(c, &lw->w_gate, 1, 0, &dl->w_gate, err));
            TRY(upload_lin_tp(c, &lw->w_up, 1, 0, &dl->w_up, err));
            TRY(upload_lin_tp(c, &lw->w_down, 1, 1, &dl->w_down, err));
        }
        }
        c->active_bytes += dlin_bytes(dl->wq) + dlin_bytes(dl->wk) + dlin_bytes(dl->wv) + dlin_bytes(dl->wo) +
                           dlin_bytes(dl->router) + (size_t)K * (dlin_bytes(dl->eg) + dlin_bytes(dl->eu) + dlin_bytes(dl->ed)) +
                           dlin_bytes(dl->w_gate) + dlin_bytes(dl->w_up) + dlin_bytes(dl->w_down);
        const dlin *all[] = {&dl->wq, &dl->wk, &dl->wv, &dl->wo, &dl->w_gate, &dl->w_up, &dl->w_down, &dl->router};
        for (const dlin *w : all)
            if (w->w && (w->qbits || w->dtype != SFT_BF16)) max_w = std::max(max_w, (size_t)(w->rows * w->cols));
    }
    if (c->has_output) c->active_bytes += dlin_bytes(c->output);
    if (c->has_output && c->output.qbits || c->output.dtype != SFT_BF16) max_w = std::max(max_w, (size_t)(c->output.rows * c->output.cols));
    {
        std::vector<double> inv((size_t)std::max(1, d->n_rot / 2));
        model_desc_rope_inv_freq(d, inv.data());
        const char *p = nullptr;
        TRY(upload(c, inv.data(), inv.size() * sizeof(double), &p, err));
        c->inv_freq = (double *)p;
    }
    // activations
    const size_t B = (size_t)o.max_batch, V = (size_t)d->n_vocab;
    size_t *A = &c->act_bytes;
    TRY(dalloc(c, &c->x, B * D, A, err));
    TRY(dalloc(c, &c->xn, B * D, A, err));
    TRY(dalloc(c, &c->q, B * qd, A, err));
    TRY(dalloc(c, &c->k, B * kvd, A, err));
    TRY(dalloc(c, &c->v, B * kvd, A, err));
    TRY(dalloc(c, &c->att, B * qd, A, err));
    TRY(dalloc(c, &c->tmp, B * D, A, err));
    size_t ffn = std::max(B * (size_t)std::max(d->n_ff, 1), B * K * (size_t)std::max(F, 1));
    TRY(dalloc(c, &c->gate, ffn, A, err));
    TRY(dalloc(c, &c->up, ffn, A, err));
    TRY(dalloc(c, &c->rlog, B * (size_t)std::max(E, 1), A, err));
    TRY(dalloc(c, &c->selw, B * K, A, err));
    TRY(dalloc(c, &c->sel, B * K, A, err));
    TRY(dalloc(c, &c->ye, B * K * D, A, err));
    TRY(dalloc(c, &c->logits, B * V, A, err));
    if (c->tp_n > 1) TRY(dalloc(c, &c->tp_scr, 2 * B, A, err));
    // split-K attention: chunks of >= 32 positions, up to 64 splits (8 positions per warp and
    // split; the old 128-position chunks left a decode step at pos 512 with 4 busy splits per head)
    c->nop_per_layer = getenv("STRATA_CUDA_NOP") ? std::max(0, std::min(64, atoi(getenv("STRATA_CUDA_NOP")))) : 0;
    c->att_nsplit = std::min(ATT_MAXSPLIT, std::max(1, (o.max_ctx + 31) / 32));
    c->att_chunk = (o.max_ctx + c->att_nsplit - 1) / c->att_nsplit;
    TRY(dalloc(c, &c->part, B * H * (size_t)c->att_nsplit * (hd + 2), A, err));
    c->g.xb_elems = B * std::max(max_cols, (size_t)D);
    TRY(dalloc(c, &c->g.xb, c->g.xb_elems, A, err));
    c->g.wb_elems = std::min(max_w, (size_t)64 << 20);
    if (c->g.wb_elems < max_cols && max_w) c->g.wb_elems = max_cols;
    TRY(dalloc(c, &c->g.wb, c->g.wb_elems, A, err));
    // x of one matrix-vector call quantised for the dp4a kernels (two int8 planes at most):
    // up to B rows of any linear input, or the B * K rows of the MoE down projection
    c->g.xq_elems = 2 * std::max(B * std::max(max_cols, (size_t)D), B * K * (size_t)std::max(F, 1));
    TRY(dalloc(c, &c->g.xq, c->g.xq_elems, A, err));
    TRY(dalloc(c, &c->g.xs, c->g.xq_elems / 32, A, err));
    // k_moe_router's finished-block counters: one per MOE_NT rows of a batch, zero between launches
    c->g.moe_cnt_n = (int)((B + MOE_NT - 1) / MOE_NT);
    TRY(dalloc(c, &c->g.moe_cnt, (size_t)c->g.moe_cnt_n, A, err));
    if (cudaMemset(c->g.moe_cnt, 0, (size_t)c->g.moe_cnt_n * sizeof(unsigned)) != cudaSuccess) {
        cuda_model_free(c);
        return st_err_set(err, ST_ERR_INTERNAL, "CUDA: memset failed");
    }
    TRY(dalloc(c, &c->io, 3 * B, A, err));
    TRY(dalloc(c, &c->next, B, A, err));
    TRY(dalloc(c, &c->gen_log, (size_t)o.max_ctx + 8, A, err));
    TRY(dalloc(c, &c->gen_counter, 1, A, err));
    if (cudaMallocHost(&c->h_io, (3 * B + 8) * sizeof(int32_t)) != cudaSuccess) {
        cuda_model_free(c);
        return st_err_set(err, ST_ERR_NOMEM, "CUDA: cannot allocate pinned host memory");
    }
    // KV cache
    c->kv_layer_stride = (size_t)o.max_ctx * kvd;
    c->kv_slot_stride = (size_t)(c->l1 - c->l0) * c->kv_layer_stride;
    size_t kvn = c->kv_slot_stride * (size_t)o.n_slots;
    TRY(dalloc(c, &c->kc, kvn, &c->kv_bytes, err));
    TRY(dalloc(c, &c->vc, kvn, &c->kv_bytes, err));
    if (cudaMemset(c->kc, 0, kvn * 2) != cudaSuccess || cudaMemset(c->vc, 0, kvn * 2) != cudaSuccess) {
        cuda_model_free(c);
        return st_err_set(err, ST_ERR_INTERNAL, "CUDA: memset failed");
    }
#undef TRY
    *out = c;
    return ST_OK;
}

// ---------------------------------------------------------------------------------------------
// prefill attention (cuda_attn_prefill.cuh): when it applies, and its launch

// True if the tiled tensor-core kernel serves T rows of attention: head_dim 64 or 128,
// G = H / Hkv <= ATTP_ROWS q heads per kv head, and every row of one slot at consecutive
// positions (hpos / hslot: host copies of the rows). Anything else (rows of several sequences,
// gaps) stays on the decode kernels, which handle any rows. STRATA_CUDA_NO_ATTP=1 disables it
// for the forward pass (and cuda_op_attention's automatic choice).
static bool attn_prefill_ok(int T, int H, int Hkv, int hd, const int32_t *hpos, const int32_t *hslot, bool forced = false) {
    static const bool off = env_on("STRATA_CUDA_NO_ATTP");
    if ((off && !forced) || T < 1 || (hd != 64 && hd != 128) || Hkv < 1 || H % Hkv || H / Hkv > ATTP_ROWS) return false;
    for (int t = 1; t < T; t++)
        if (hslot[t] != hslot[0] || hpos[t] != hpos[0] + t) return false;
    return true;
}

// Enqueues k_attn_prefill on g->st: out[T, H*hd] fp32 = causal attention of q[T, H*hd] fp32
// over the layer's bf16 cache kl / vl ([n_slots][max_ctx][Hkv*hd], slot_stride elements per
// slot) with pos[T] / slot[T] in device memory. Precondition: attn_prefill_ok. Borrows every
// pointer; a launch failure surfaces at the caller's next cu_check. The kernel needs more than
// the default 48 KB of shared memory (double-buffered K/V tiles: 69.6 KB at hd 128): the limit
// is raised on every call (a host call per layer, whichever device is current).
static void attn_prefill(gctx *g, float *out, const float *q, const __nv_bfloat16 *kl, const __nv_bfloat16 *vl,
                         const int32_t *pos, const int32_t *slot, int T, int H, int Hkv, int hd, float scale,
                         size_t slot_stride) {
    attp_args a = {out, q, kl, vl, pos, slot, slot_stride, T, H, Hkv, scale * 1.4426950408889634f};
    const int smem = attp_smem_bytes(hd);
    const dim3 grid((unsigned)attp_blocks(T, H / Hkv), (unsigned)Hkv);
    if (hd == 64) {
        cudaFuncSetAttribute(k_attn_prefill<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        launch_k(k_attn_prefill<64>, grid, ATTP_THREADS, smem, g->st, a);
    } else {
        cudaFuncSetAttribute(k_attn_prefill<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        launch_k(k_attn_prefill<128>, grid, ATTP_THREADS, smem, g->st, a);
    }
}

// ---------------------------------------------------------------------------------------------
// the forward pass (enqueue only): rows in c->io, T <= max_batch

enum { OUT_NONE, OUT_LAST, OUT_ALL, OUT_GREEDY };

// The residual update of T rows: x += tmp — summed over the tensor-parallel ranks first (each
// holds a partial sum) — then xn = rmsnorm(x) * w; w NULL: the add only.
static void residual_add(cuda_model *c, float *xn, const float *w, int T, const dlin *const *cons = nullptr,
                         int ncons = 0) {
    gctx *g = &c->g;
    const int D = c->d->n_embd;
    const float eps = c->d->norm_eps;
    if (c->tp_n > 1) {
        const unsigned grid = (unsigned)std::min(T, c->pv.max_chunks);
        if (w) launch_k(k_tp_add_rmsnorm<true>, grid, TP_THREADS, 0, g->st, c->pv, xn, c->x, c->tmp, w, T, D, eps);
        else launch_k(k_tp_add_rmsnorm<false>, grid, TP_THREADS, 0, g->st, c->pv, nullptr, c->x, c->tmp, nullptr, T, D, eps);
        return;
    }
    if (w) add_rmsnorm(g, xn, c->x, c->tmp, w, T, D, eps, cons, ncons);
    else launch_k(k_add, grid_for((int64_t)T * D, 256), 256, 0, g->st, c->x, c->tmp, (int64_t)T * D);
}

static void enqueue(cuda_model *c, int T, int outm) {
    const model_desc *d = c->d;
    gctx *g = &c->g;
    cudaStream_t st = g->st;
    const int D = d->n_embd, H = d->n_head, Hkv = d->n_head_kv, hd = d->head_dim, qd = H * hd, kvd = Hkv * hd;
    const int B = c->o.max_batch;
    const int32_t *tok = c->io, *pos = c->io + B, *slot = c->io + 2 * B;
    const float eps = d->norm_eps, scale = 1.0f / sqrtf((float)hd);
    g->xq_of = nullptr;
    if (c->has_embed) { // else x already holds the previous stage's hidden states
        mark(g, "embed");
        launch_k(k_embed, T, 256, 0, st, c->x, tok, T, c->embed);
    }
    for (int l = c->l0; l < c->l1; l++) {
        const dlayer &L = c->L[(size_t)l];
        if (l == c->l0) { // later layers: fused into the previous layer's residual add
            mark(g, "rmsnorm");
            rmsnorm(g, c->xn, c->x, L.attn_norm, T, D, eps);
        }
        mark(g, "linear qkv");
        {
            const dlin *ws[3] = {&L.wq, &L.wk, &L.wv};
            float *ys[3] = {c->q, c->k, c->v};
            const int64_t ld[3] = {qd, kvd, kvd};
            linear_n(g, 3, ws, ys, ld, c->xn, T);
        }
        mark(g, "qk-norm + rope + kv store");
        if (d->qk_norm == QK_NORM_FULL && c->tp_n > 1) { // the norm spans every rank's heads
            launch_k(k_tp_qk_norm_full, (unsigned)std::min(T, c->pv.max_chunks), TP_THREADS, 0, st, 
                c->pv, c->q, qd, c->k, kvd, L.q_norm, L.k_norm, c->tp_scr, T, c->qd_all, c->kvd_all, eps);
        } else if (d->qk_norm == QK_NORM_FULL) {
            rmsnorm(g, c->q, c->q, L.q_norm, T, qd, eps);
            rmsnorm(g, c->k, c->k, L.k_norm, T, kvd, eps);
        }
        __nv_bfloat16 *kl = c->kc + (size_t)(l - c->l0) * c->kv_layer_stride;
        __nv_bfloat16 *vl = c->vc + (size_t)(l - c->l0) * c->kv_layer_stride;
        {   // per-head QK-norm + RoPE + K/V store: one warp per q / k / v head row
            const bool hn = d->qk_norm == QK_NORM_HEAD;
            const int64_t warps = (int64_t)T * (H + 2 * Hkv);
            launch_k(k_qk_rope_kv, (unsigned)((warps + 3) / 4), 128, 0, st, c->q, H, c->k, Hkv, c->v, hn ? L.q_norm : nullptr,
                                                                      hn ? L.k_norm : nullptr, eps, pos, hd, d->n_rot,
                                                                      c->inv_freq, kl, vl, slot, c->kv_slot_stride, T);
        }
        mark(g, "attention");
        if (T >= ATTP_MIN_T && attn_prefill_ok(T, H, Hkv, hd, c->h_io + B, c->h_io + 2 * B)) {
            attn_prefill(g, c->att, c->q, kl, vl, pos, slot, T, H, Hkv, hd, scale, c->kv_slot_stride);
        } else {
            const dlin *wo[1] = {&L.wo};
            const int qp = quant_by_producer(g, 1, wo, c->att, T);
            attn_decode(g, c->att, c->part, c->q, kl, vl, pos, slot, T, H, Hkv, hd, scale, c->kv_slot_stride, c->att_chunk,
                        c->att_nsplit, qp);
            if (hd % 32 == 0) quant_tag(g, c->att, T, qp);
        }
        mark(g, "linear o");
        linear(g, c->tmp, D, c->att, L.wo, T);
        mark(g, "add + rmsnorm");
        {
            const dlin *gu[2] = {&L.w_gate, &L.w_up};
            residual_add(c, c->xn, L.ffn_norm, T, L.moe ? nullptr : gu, 2);
        }
        if (L.moe) {
            moe_w mw = {L.router, L.eg, L.eu, L.ed, L.router_bias, d->n_expert, d->n_expert_used, d->n_ff_expert, D,
                        d->router == ROUTER_SIGMOID_BIAS, d->norm_topk_prob};
            moe_buf mb = {c->rlog, c->selw, c->gate, c->up, c->ye, c->sel};
            moe_ffn(g, mw, mb, c->xn, T, c->tmp);
        } else {
            mark(g, "linear gate/up");
            {
                const dlin *ws[2] = {&L.w_gate, &L.w_up};
                float *ys[2] = {c->gate, c->up};
                const int64_t ld[2] = {d->n_ff, d->n_ff};
                linear_n(g, 2, ws, ys, ld, c->xn, T);
            }
            mark(g, "swiglu");
            const dlin *wd[1] = {&L.w_down};
            const int64_t nf = (int64_t)T * d->n_ff;
            if (const int qp = quant_by_producer(g, 1, wd, c->gate, T)) {
                launch_k(k_swiglu_q, (unsigned)std::min<int64_t>((nf / 32 + 7) / 8, 1024), 256, 0, st, c->gate, c->gate, c->up, nf,
                         qp, g->xq, g->xs);
                quant_tag(g, c->gate, T, qp);
            } else launch_k(k_swiglu, grid_for(nf, 256), 256, 0, st, c->gate, c->gate, c->up, nf);
            mark(g, "linear down");
            linear(g, c->tmp, D, c->gate, L.w_down, T);
        }
        for (int i = 0; i < c->nop_per_layer; i++) launch_k(k_nop, 1, 32, 0, st);
        if (l + 1 < c->l1) {
            mark(g, "add + rmsnorm");
            const dlayer &N = c->L[(size_t)l + 1];
            const dlin *qkv[3] = {&N.wq, &N.wk, &N.wv};
            residual_add(c, c->xn, N.attn_norm, T, qkv, 3);
        } else {
            mark(g, "add");
            residual_add(c, nullptr, nullptr, T);
        }
    }
    if (outm == OUT_NONE || !c->has_output) return;
    const int V = d->n_vocab;
    mark(g, "output norm");
    if (outm == OUT_LAST) {
        rmsnorm(g, c->xn, c->x + (size_t)(T - 1) * D, c->out_norm, 1, D, eps);
        mark(g, "logits");
        linear(g, c->logits, V, c->xn, c->output, 1);
        return;
    }
    rmsnorm(g, c->xn, c->x, c->out_norm, T, D, eps);
    mark(g, "logits");
    linear(g, c->logits, V, c->xn, c->output, T);
    if (outm == OUT_GREEDY) {
        mark(g, "argmax");
        launch_k(k_argmax, T, 1024, 0, st, c->logits, V, c->next);
        launch_k(k_advance, 1, 32, 0, st, c->io, c->next, c->io + B, T, c->gen_log, c->gen_counter);
    }
}

static int check_rows(const cuda_model *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                      st_err *err) {
    const model_desc *d = c->d;
    for (int t = 0; t < T; t++) {
        if (tokens && (tokens[t] < 0 || tokens[t] >= d->n_vocab))
            return st_err_set(err, ST_ERR_ARG, "token id %d at index %d is outside the vocabulary (%d)", tokens[t], t,
                              d->n_vocab);
        if (pos[t] < 0 || pos[t] >= c->o.max_ctx)
            return st_err_set(err, ST_ERR_ARG, "position %d is beyond the context of %d tokens", pos[t], c->o.max_ctx);
        if (slot[t] < 0 || slot[t] >= c->o.n_slots)
            return st_err_set(err, ST_ERR_ARG, "slot %d does not exist (%d slots)", slot[t], c->o.n_slots);
    }
    return ST_OK;
}

static int put_rows(cuda_model *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T, st_err *err) {
    const int B = c->o.max_batch;
    if (tokens) memcpy(c->h_io, tokens, (size_t)T * 4); // NULL: a stage fed hidden states
    else memset(c->h_io, 0, (size_t)T * 4);
    memcpy(c->h_io + B, pos, (size_t)T * 4);
    memcpy(c->h_io + 2 * B, slot, (size_t)T * 4);
    CU_TRY(cudaMemcpyAsync(c->io, c->h_io, 3 * (size_t)B * 4, cudaMemcpyHostToDevice, c->g.st));
    return ST_OK;
}

static int need_whole(const cuda_model *c, const char *what, st_err *err) {
    if (c->has_embed && c->has_output) return ST_OK;
    return st_err_set(err, ST_ERR_ARG, "CUDA: %s needs the whole model (this is a stage of layers %d..%d)", what, c->l0,
                      c->l1 - 1);
}

extern "C" int cuda_model_forward(cuda_model *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                                  float *logits, logits_mode mode, st_err *err) {
    int rc = need_whole(c, "cuda_model_forward", err);
    if (rc) return rc;
    rc = check_rows(c, tokens, pos, slot, T, err);
    if (rc) return rc;
    const int B = c->o.max_batch, V = c->d->n_vocab;
    for (int t0 = 0; t0 < T; t0 += B) {
        int n = std::min(B, T - t0);
        if ((rc = put_rows(c, tokens + t0, pos + t0, slot + t0, n, err))) return rc;
        int outm = OUT_NONE;
        if (mode == LOGITS_ALL) outm = OUT_ALL;
        if (mode == LOGITS_LAST && t0 + n == T) outm = OUT_LAST;
        enqueue(c, n, outm);
        if (outm == OUT_ALL)
            CU_TRY(cudaMemcpyAsync(logits + (size_t)t0 * V, c->logits, (size_t)n * V * 4, cudaMemcpyDeviceToHost, c->g.st));
        if (outm == OUT_LAST) CU_TRY(cudaMemcpyAsync(logits, c->logits, (size_t)V * 4, cudaMemcpyDeviceToHost, c->g.st));
        CU_TRY(cudaStreamSynchronize(c->g.st));
        if ((rc = cu_check(err, "forward"))) return rc;
    }
    return ST_OK;
}

extern "C" int cuda_model_forward_stage(cuda_model *c, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                                        const int32_t *slot, int T, float *hidden_out, float *logits, logits_mode mode,
                                        st_err *err) {
    if (c->has_embed != (tokens != nullptr) || (!c->has_embed && !hidden_in))
        return st_err_set(err, ST_ERR_ARG, "CUDA stage: %s", c->has_embed ? "the first stage takes token ids"
                                                                          : "a later stage takes hidden states");
    if (!c->has_output && !hidden_out)
        return st_err_set(err, ST_ERR_ARG, "CUDA stage: a stage without the output needs hidden_out");
    if (c->has_output && mode != LOGITS_NONE && !logits)
        return st_err_set(err, ST_ERR_ARG, "CUDA stage: logits requested without a buffer");
    int rc = check_rows(c, tokens, pos, slot, T, err);
    if (rc) return rc;
    const int B = c->o.max_batch, V = c->d->n_vocab, D = c->d->n_embd;
    for (int t0 = 0; t0 < T; t0 += B) {
        int n = std::min(B, T - t0);
        if ((rc = put_rows(c, tokens ? tokens + t0 : nullptr, pos + t0, slot + t0, n, err))) return rc;
        if (!c->has_embed)
            CU_TRY(cudaMemcpyAsync(c->x, hidden_in + (size_t)t0 * D, (size_t)n * D * 4, cudaMemcpyHostToDevice, c->g.st));
        int outm = OUT_NONE;
        if (c->has_output && mode == LOGITS_ALL) outm = OUT_ALL;
        if (c->has_output && mode == LOGITS_LAST && t0 + n == T) outm = OUT_LAST;
        enqueue(c, n, outm);
        if (!c->has_output)
            CU_TRY(cudaMemcpyAsync(hidden_out + (size_t)t0 * D, c->x, (size_t)n * D * 4, cudaMemcpyDeviceToHost, c->g.st));
        if (outm == OUT_ALL)
            CU_TRY(cudaMemcpyAsync(logits + (size_t)t0 * V, c->logits, (size_t)n * V * 4, cudaMemcpyDeviceToHost, c->g.st));
        if (outm == OUT_LAST) CU_TRY(cudaMemcpyAsync(logits, c->logits, (size_t)V * 4, cudaMemcpyDeviceToHost, c->g.st));
        CU_TRY(cudaStreamSynchronize(c->g.st));
        if ((rc = cu_check(err, "stage forward"))) return rc;
    }
    return ST_OK;
}

extern "C" void cuda_model_stage(const cuda_model *c, int *layer_begin, int *layer_end, int *has_embed, int *has_output) {
    if (layer_begin) *layer_begin = c->l0;
    if (layer_end) *layer_end = c->l1;
    if (has_embed) *has_embed = c->has_embed;
    if (has_output) *has_output = c->has_output;
}

// ---------------------------------------------------------------------------------------------
// asynchronous stage steps: the host fills pinned staging, launches (a graph for T <= MV_MAXT)
// and returns; the stream copies the inputs in, runs the layers, copies the outputs out and
// writes 1 into a mapped host flag. The host polls the flag (no cudaStreamSynchronize).

typedef CUresult (*write_value_fn)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

__global__ void k_write_flag(volatile uint32_t *flag, uint32_t v) {
    PDL_ENTRY();
    __threadfence_system();
    *flag = v;
    __threadfence_system();
}

static int stage_async_init(cuda_model *c, st_err *err) {
    if (c->h_flag) return ST_OK;
    const size_t B = (size_t)c->o.max_batch, D = (size_t)c->d->n_embd, V = (size_t)c->d->n_vocab;
    CU_TRY(cudaMallocHost(&c->h_x, B * D * 4));
    CU_TRY(cudaMallocHost(&c->h_out, std::max(B * D, V) * 4));
    CU_TRY(cudaMallocHost(&c->h_tok, B * 4));
    void *f = nullptr;
    CU_TRY(cudaHostAlloc(&f, 64, cudaHostAllocMapped | cudaHostAllocPortable));
    c->h_flag = (volatile uint32_t *)f;
    *c->h_flag = 1;
    CU_TRY(cudaHostGetDevicePointer(&c->d_flag, f, 0));
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (!getenv("STRATA_CUDA_FLAG_KERNEL") &&
        cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        c->write_value = fn;
    cudaGetLastError();
    if (getenv("STRATA_STAGE_DIAG")) {
        c->diag = 1;
        CU_TRY(cudaEventCreate(&c->ev0));
        CU_TRY(cudaEventCreate(&c->ev1));
    }
    return ST_OK;
}

// The step's body. kind: 0 hidden out, 1 logits of the last row, 2 greedy id per row. io:
// CUDA_STAGE_IN_NCCL: the rows are already in c->x (a receive precedes the body), no copy in;
// CUDA_STAGE_OUT_NCCL: the hidden rows stay in c->x for the send that follows, no copy out.
static void stage_body(cuda_model *c, int T, int kind, int io) {
    cudaStream_t st = c->g.st;
    const int B = c->o.max_batch, D = c->d->n_embd, V = c->d->n_vocab;
    cudaMemcpyAsync(c->io, c->h_io, 3 * (size_t)B * 4, cudaMemcpyHostToDevice, st);
    if (!c->has_embed && !(io & CUDA_STAGE_IN_NCCL))
        cudaMemcpyAsync(c->x, c->h_x, (size_t)T * D * 4, cudaMemcpyHostToDevice, st);
    enqueue(c, T, kind == 0 ? OUT_NONE : kind == 1 ? OUT_LAST : OUT_ALL);
    if (kind == 0) {
        if (!(io & CUDA_STAGE_OUT_NCCL)) cudaMemcpyAsync(c->h_out, c->x, (size_t)T * D * 4, cudaMemcpyDeviceToHost, st);
    } else if (kind == 1) cudaMemcpyAsync(c->h_out, c->logits, (size_t)V * 4, cudaMemcpyDeviceToHost, st);
    else {
        launch_k(k_argmax, T, 1024, 0, st, c->logits, V, c->next);
        cudaMemcpyAsync(c->h_tok, c->next, (size_t)T * 4, cudaMemcpyDeviceToHost, st);
    }
}

// The last node of a step: the stream writes 1 into the mapped host flag.
static void stage_flag(cuda_model *c) {
    cudaStream_t st = c->g.st;
    if (c->write_value) ((write_value_fn)c->write_value)((CUstream)st, (CUdeviceptr)c->d_flag, 1, 0);
    else launch_k(k_write_flag, 1, 1, 0, st, (volatile uint32_t *)c->d_flag, 1);
}

static void stage_enqueue(cuda_model *c, int T, int kind) {
    stage_body(c, T, kind, 0);
    stage_flag(c);
}

extern "C" int cuda_stage_set_nccl(cuda_model *c, cuda_nccl_comm *in, cuda_nccl_comm *out, st_err *err) {
    if (c->s_pending) return st_err_set(err, ST_ERR_INTERNAL, "CUDA stage: a step is still in flight");
    if ((in && c->has_embed) || (out && c->has_output))
        return st_err_set(err, ST_ERR_ARG, "CUDA stage: an NCCL %s link on the %s stage", in && c->has_embed ? "input" : "output",
                          in && c->has_embed ? "first" : "last");
    if ((in || out) && !c->nev_ok) {
        CU_TRY(cudaSetDevice(c->o.device));
        for (int i = 0; i < 4; i++) CU_TRY(cudaEventCreate(&c->nev[i]));
        c->nev_ok = 1;
    }
    const char *g = getenv("STRATA_NCCL_GRAPH");
    c->nc_graph = g && !strcmp(g, "1");
    if (c->nc_graph && (in != c->nc_in || out != c->nc_out)) // graphs holding the old communicators
        for (int k = 0; k < 3; k++)
            for (int io = 0; io < 4; io++)
                for (int b = 0; b <= MV_MAXT; b++) {
                    if (c->ngraph[k][io][b]) cudaGraphExecDestroy(c->ngraph[k][io][b]);
                    c->ngraph[k][io][b] = nullptr, c->nwarm[k][io][b] = 0;
                }
    c->nc_in = in, c->nc_out = out;
    return ST_OK;
}

// The receive, body and send of an NCCL step, as STRATA_NCCL_GRAPH=1 captures them.
static int stage_nccl_ops(cuda_model *c, int T, int kind, int io, int with_nccl, st_err *err) {
    cudaStream_t st = c->g.st;
    const size_t n = (size_t)T * (size_t)c->d->n_embd;
    int rc;
    if (with_nccl && (io & CUDA_STAGE_IN_NCCL) &&
        (rc = cuda_nccl_recv_f32(c->nc_in, c->x, n, 0, (cuda_comm_stream)st, err)))
        return rc;
    stage_body(c, T, kind, io);
    if (with_nccl && (io & CUDA_STAGE_OUT_NCCL) &&
        (rc = cuda_nccl_send_f32(c->nc_out, c->x, n, 1, (cuda_comm_stream)st, err)))
        return rc;
    return ST_OK;
}

// A step with an NCCL receive before and/or a send after its layers (io != 0): all on the
// stage's stream, the flag last. By default the NCCL calls stay outside the captured graph (the
// graph is the layers and the small host copies), so a link that falls back to the host path
// reuses the same graphs and a failed capture cannot leave NCCL half-captured.
static int stage_submit_nccl(cuda_model *c, int T, int kind, int io, st_err *err) {
    cudaStream_t st = c->g.st;
    const size_t n = (size_t)T * (size_t)c->d->n_embd;
    const int ing = c->nc_graph; // NCCL calls inside the graph (else right before / after it)
    int rc = ST_OK;
    cudaGraphExec_t *ge = T <= MV_MAXT ? &c->ngraph[kind][io][T] : nullptr;
    if (ge && !*ge && !c->o.no_graph && c->nwarm[kind][io][T]) {
        // second use: capture first, while the stream is idle (the previous step has been
        // finished), then enqueue the receive and launch the graph behind it
        cudaGraph_t graph = nullptr;
        st_err ce = {0};
        cudaError_t e = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
        if (e == cudaSuccess) {
            int r2 = stage_nccl_ops(c, T, kind, io, ing, &ce);
            e = cudaStreamEndCapture(st, &graph);
            if (r2 && e == cudaSuccess) e = cudaErrorStreamCaptureInvalidated;
        }
        if (e == cudaSuccess) e = cudaGraphInstantiate(ge, graph, 0);
        if (graph) cudaGraphDestroy(graph);
        if (e != cudaSuccess) {
            *ge = nullptr;
            c->o.no_graph = 1;
            cudaGetLastError();
            ST_WARN("CUDA: graph capture of a stage step%s failed (%s%s%s); launching kernels eagerly",
                    ing ? " with its NCCL calls" : "", cudaGetErrorString(e), ce.msg[0] ? ": " : "", ce.msg);
        }
    }
    const int ops_in_graph = ing && ge && *ge;
    cudaEventRecord(c->nev[0], st);
    if (!ops_in_graph && (io & CUDA_STAGE_IN_NCCL) &&
        (rc = cuda_nccl_recv_f32(c->nc_in, c->x, n, 0, (cuda_comm_stream)st, err)))
        goto fail;
    cudaEventRecord(c->nev[1], st);
    if (ge && *ge) CU_TRY(cudaGraphLaunch(*ge, st));
    else {
        stage_body(c, T, kind, io); // first use (loads every kernel), T > MV_MAXT, or no graphs
        if (ge) c->nwarm[kind][io][T] = 1;
        CU_TRY(cudaGetLastError());
    }
    cudaEventRecord(c->nev[2], st);
    if (!ops_in_graph && (io & CUDA_STAGE_OUT_NCCL) &&
        (rc = cuda_nccl_send_f32(c->nc_out, c->x, n, 1, (cuda_comm_stream)st, err)))
        goto fail;
    cudaEventRecord(c->nev[3], st);
    stage_flag(c);
    CU_TRY(cudaGetLastError());
    // with the NCCL calls inside the graph the events only bracket the whole graph: no split
    c->s_T = T, c->s_kind = kind, c->s_io = io, c->s_pending = 1, c->s_split = !ops_in_graph;
    return ST_OK;
fail:
    // what was enqueued before the failed call still runs and no flag follows it; the caller
    // treats the link as broken and aborts its communicators (which ends a pending receive)
    *c->h_flag = 1;
    return rc;
}

extern "C" int cuda_stage_submit(cuda_model *c, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                                 const int32_t *slot, int T, int kind, int io, st_err *err) {
    if (c->s_pending) return st_err_set(err, ST_ERR_INTERNAL, "CUDA stage: a step is still in flight");
    const int in_nccl = (io & CUDA_STAGE_IN_NCCL) != 0, out_nccl = (io & CUDA_STAGE_OUT_NCCL) != 0;
    if (kind < 0 || kind > 2 || (kind > 0 && !c->has_output) || (kind == 0 && c->has_output) ||
        (c->has_embed != (tokens != nullptr)) || (!c->has_embed && !hidden_in && !in_nccl) || T < 1 ||
        T > c->o.max_batch || (kind == 2 && T > MV_MAXT) || io < 0 || io > 3 || (in_nccl && (!c->nc_in || hidden_in)) ||
        (out_nccl && (!c->nc_out || kind != 0)))
        return st_err_set(err, ST_ERR_ARG, "CUDA stage: bad step (T %d, output kind %d, %s input, NCCL io %d)", T, kind,
                          tokens ? "token" : "hidden", io);
    int rc = stage_async_init(c, err);
    if (rc) return rc;
    if ((rc = check_rows(c, tokens, pos, slot, T, err))) return rc;
    const int B = c->o.max_batch, D = c->d->n_embd;
    memset(c->h_io, 0, 3 * (size_t)B * 4);
    if (tokens) memcpy(c->h_io, tokens, (size_t)T * 4);
    memcpy(c->h_io + B, pos, (size_t)T * 4);
    memcpy(c->h_io + 2 * B, slot, (size_t)T * 4);
    if (!c->has_embed && !in_nccl) memcpy(c->h_x, hidden_in, (size_t)T * D * 4);
    *c->h_flag = 0;
    __sync_synchronize();
    if (io) return stage_submit_nccl(c, T, kind, io, err);
    c->s_io = 0;
    cudaGraphExec_t *ge = T <= MV_MAXT ? &c->sgraph[kind][T] : nullptr;
    if (ge && !*ge && !c->o.no_graph) { // first use: run eagerly (loads every kernel), then capture
        stage_enqueue(c, T, kind);
        CU_TRY(cudaStreamSynchronize(c->g.st));
        if ((rc = cu_check(err, "stage warm-up"))) return rc;
        cudaGraph_t graph = nullptr;
        cudaError_t e = cudaStreamBeginCapture(c->g.st, cudaStreamCaptureModeThreadLocal);
        if (e == cudaSuccess) {
            stage_enqueue(c, T, kind);
            e = cudaStreamEndCapture(c->g.st, &graph);
        }
        if (e == cudaSuccess) e = cudaGraphInstantiate(ge, graph, 0);
        if (graph) cudaGraphDestroy(graph);
        if (e != cudaSuccess) {
            *ge = nullptr;
            c->o.no_graph = 1;
            cudaGetLastError();
            ST_WARN("CUDA: graph capture of a stage step failed (%s); launching kernels eagerly", cudaGetErrorString(e));
        }
        // the warm-up already computed this step's outputs (and wrote its K/V): done
        c->s_T = T, c->s_kind = kind, c->s_pending = 1;
        return ST_OK;
    }
    if (c->diag) cudaEventRecord(c->ev0, c->g.st);
    if (ge && *ge) CU_TRY(cudaGraphLaunch(*ge, c->g.st));
    else {
        stage_enqueue(c, T, kind);
        CU_TRY(cudaGetLastError());
    }
    if (c->diag) cudaEventRecord(c->ev1, c->g.st);
    c->s_T = T, c->s_kind = kind, c->s_pending = 1 + c->diag;
    return ST_OK;
}

extern "C" int cuda_stage_done(const cuda_model *c) { return !c->s_pending || *c->h_flag == 1; }

extern "C" int cuda_stage_finish(cuda_model *c, int spin, st_err *err) {
    if (!c->s_pending) return st_err_set(err, ST_ERR_INTERNAL, "CUDA stage: no step in flight");
    if (spin) {
        uint64_t n = 0;
        while (*c->h_flag != 1) {
            if ((++n & 0xFFFFF) == 0 && cudaStreamQuery(c->g.st) != cudaErrorNotReady && *c->h_flag != 1) break;
        }
    } else CU_TRY(cudaStreamSynchronize(c->g.st));
    // The flag is the last node of the step, but the stream still retires the graph for a few
    // microseconds after it. Hand-offs wait for that tail (cheap: a query spin), because a GPU
    // shared by several stage processes does not switch to the next stage's context while this
    // one still has work: handing off inside the tail cost a whole time slice (~1.8 ms per hop
    // measured on an H200 with two stage processes).
    if (spin && !c->diag)
        while (cudaStreamQuery(c->g.st) == cudaErrorNotReady) {
        }
    if (c->s_pending == 2) { // a diagnosed step: how long the stream ran on after the flag
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        cudaEventSynchronize(c->ev1);
        clock_gettime(CLOCK_MONOTONIC, &b);
        float ms = 0;
        cudaEventElapsedTime(&ms, c->ev0, c->ev1);
        c->d_gpu_ms += ms, c->d_tail_us += (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3, c->d_n++;
    }
    c->s_pending = 0;
    if (*c->h_flag != 1) { // the stream ended without writing the flag: it failed
        cudaError_t e = cudaStreamSynchronize(c->g.st);
        return st_err_set(err, ST_ERR_INTERNAL, "CUDA stage step failed: %s", cudaGetErrorString(e));
    }
    return ST_OK;
}

extern "C" int cuda_stage_diag(cuda_model *c, double *gpu_ms, double *tail_us) {
    if (!c->d_n) return 0;
    *gpu_ms = c->d_gpu_ms / (double)c->d_n, *tail_us = c->d_tail_us / (double)c->d_n;
    int n = (int)c->d_n;
    c->d_gpu_ms = c->d_tail_us = 0, c->d_n = 0;
    return n;
}

extern "C" int cuda_stage_nccl_times(const cuda_model *c, double *recv_us, double *compute_us, double *send_us) {
    if (!c->s_io || c->s_pending || !c->nev_ok || !c->s_split) return 0;
    float a = 0, b = 0, d = 0;
    if (cudaEventElapsedTime(&a, c->nev[0], c->nev[1]) != cudaSuccess ||
        cudaEventElapsedTime(&b, c->nev[1], c->nev[2]) != cudaSuccess ||
        cudaEventElapsedTime(&d, c->nev[2], c->nev[3]) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    *recv_us = a * 1e3, *compute_us = b * 1e3, *send_us = d * 1e3;
    return 1;
}

extern "C" int cuda_stage_nccl_stalled(const cuda_model *c) {
    if (!c->s_pending || !c->s_io) return 0;
    if ((c->s_io & CUDA_STAGE_IN_NCCL) && cudaEventQuery(c->nev[0]) == cudaSuccess &&
        cudaEventQuery(c->nev[1]) == cudaErrorNotReady)
        return CUDA_STAGE_IN_NCCL;
    if ((c->s_io & CUDA_STAGE_OUT_NCCL) && cudaEventQuery(c->nev[2]) == cudaSuccess &&
        cudaEventQuery(c->nev[3]) == cudaErrorNotReady)
        return CUDA_STAGE_OUT_NCCL;
    cudaGetLastError();
    return 0;
}

extern "C" const float *cuda_stage_output(const cuda_model *c) { return c->h_out; }
extern "C" const int32_t *cuda_stage_tokens(const cuda_model *c) { return c->h_tok; }

// Captures the greedy decode step for B rows (after one eager run that loads every kernel).
static int ensure_graph(cuda_model *c, int B, st_err *err) {
    if (c->graph[B] || c->o.no_graph) return ST_OK;
    enqueue(c, B, OUT_GREEDY); // warm-up: same rows, same K/V writes as the replay that follows
    CU_TRY(cudaStreamSynchronize(c->g.st));
    int rc = cu_check(err, "decode warm-up");
    if (rc) return rc;
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamBeginCapture(c->g.st, cudaStreamCaptureModeThreadLocal);
    if (e == cudaSuccess) {
        enqueue(c, B, OUT_GREEDY);
        e = cudaStreamEndCapture(c->g.st, &graph);
    }
    if (e == cudaSuccess) e = cudaGraphInstantiate(&c->graph[B], graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess) { /* run eagerly from now on rather than fail */
        c->graph[B] = nullptr;
        c->o.no_graph = 1;
        cudaGetLastError();
        ST_WARN("CUDA: graph capture of the decode step failed (%s); launching kernels eagerly",
                cudaGetErrorString(e));
    }
    return ST_OK;
}

static void launch_step(cuda_model *c, int B) {
    if (c->graph[B]) cudaGraphLaunch(c->graph[B], c->g.st);
    else enqueue(c, B, OUT_GREEDY);
}

extern "C" int cuda_model_decode_greedy(cuda_model *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot,
                                        int B, int32_t *next, st_err *err) {
    if (B < 1 || B > MV_MAXT || B > c->o.max_batch)
        return st_err_set(err, ST_ERR_ARG, "CUDA: greedy decode takes 1..%d rows, not %d", MV_MAXT, B);
    int rc = need_whole(c, "greedy decode", err);
    if (rc) return rc;
    rc = check_rows(c, tokens, pos, slot, B, err);
    if (rc) return rc;
    if ((rc = put_rows(c, tokens, pos, slot, B, err))) return rc;
    if (!c->graph[B] && !c->o.no_graph) {
        CU_TRY(cudaMemsetAsync(c->gen_counter, 0, 4, c->g.st));
        if ((rc = ensure_graph(c, B, err))) return rc;
        if ((rc = put_rows(c, tokens, pos, slot, B, err))) return rc;
    }
    CU_TRY(cudaMemsetAsync(c->gen_counter, 0, 4, c->g.st));
    launch_step(c, B);
    CU_TRY(cudaMemcpyAsync(c->h_io + 3 * c->o.max_batch, c->next, (size_t)B * 4, cudaMemcpyDeviceToHost, c->g.st));
    CU_TRY(cudaStreamSynchronize(c->g.st));
    if ((rc = cu_check(err, "decode step"))) return rc;
    memcpy(next, c->h_io + 3 * c->o.max_batch, (size_t)B * 4);
    return ST_OK;
}

extern "C" int cuda_model_generate_greedy(cuda_model *c, int32_t token, int pos0, int slot, int n, int32_t *out,
                                          float *step_ms, st_err *err) {
    if (n < 1 || pos0 < 0 || pos0 + n > c->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "CUDA: %d steps from position %d exceed the context %d", n, pos0, c->o.max_ctx);
    int rc = need_whole(c, "greedy generation", err);
    if (rc) return rc;
    rc = check_rows(c, &token, &pos0, &slot, 1, err);
    if (rc) return rc;
    if ((rc = put_rows(c, &token, &pos0, &slot, 1, err))) return rc;
    CU_TRY(cudaMemsetAsync(c->gen_counter, 0, 4, c->g.st));
    if (!c->graph[1] && !c->o.no_graph) {
        if ((rc = ensure_graph(c, 1, err))) return rc;
        if ((rc = put_rows(c, &token, &pos0, &slot, 1, err))) return rc;
        CU_TRY(cudaMemsetAsync(c->gen_counter, 0, 4, c->g.st));
    }
    std::vector<cudaEvent_t> ev;
    if (step_ms) {
        ev.resize((size_t)n + 1);
        for (auto &e : ev) cudaEventCreate(&e);
        cudaEventRecord(ev[0], c->g.st);
    }
    for (int i = 0; i < n; i++) {
        launch_step(c, 1);
        if (step_ms) cudaEventRecord(ev[(size_t)i + 1], c->g.st);
    }
    CU_TRY(cudaStreamSynchronize(c->g.st));
    if ((rc = cu_check(err, "greedy generation"))) return rc;
    CU_TRY(cudaMemcpy(out, c->gen_log, (size_t)n * 4, cudaMemcpyDeviceToHost));
    if (step_ms) {
        for (int i = 0; i < n; i++) cudaEventElapsedTime(&step_ms[i], ev[(size_t)i], ev[(size_t)i + 1]);
        for (auto &e : ev) cudaEventDestroy(e);
    }
    return ST_OK;
}

extern "C" int cuda_model_kv_fill_synthetic(cuda_model *c, int slot, int n_tokens, st_err *err) {
    if (slot < 0 || slot >= c->o.n_slots || n_tokens < 0 || n_tokens > c->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "cannot fill %d tokens of slot %d", n_tokens, slot);
    size_t n = c->kv_slot_stride;
    launch_k(k_fill_kv, grid_for((int64_t)n, 256), 256, 0, c->g.st, c->kc + (size_t)slot * n, c->vc + (size_t)slot * n, n, 7);
    return cu_check(err, "kv fill");
}

extern "C" void cuda_model_get_info(const cuda_model *c, cuda_model_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->device, sizeof info->device, "%s", c->devname);
    info->weight_bytes = c->weight_bytes;
    info->kv_bytes = c->kv_bytes;
    info->act_bytes = c->act_bytes;
    info->active_bytes = c->active_bytes;
    cudaMemGetInfo(&info->mem_free, &info->mem_total);
}

extern "C" double cuda_measure_copy_bandwidth(int device, size_t bytes, int reps) {
    if (cudaSetDevice(device) != cudaSuccess) return 0;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
        cudaGetLastError();
        cudaFree(a);
        return 0;
    }
    cudaMemset(a, 1, bytes);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    float best = 1e30f;
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(e0);
        cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        best = std::min(best, ms);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return best > 0 && best < 1e29f ? 2.0 * (double)bytes / (best * 1e-3) : 0;
}

// bf16 values in [-0.5, 0.5) from a hash of the index (operands of the GEMM rate probe: not
// zeros, whose products some hardware paths could make cheaper)
__global__ void k_fill_bf16_hash(__nv_bfloat16 *p, size_t n, uint32_t seed) {
    PDL_ENTRY();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 0x9E3779B1u ^ seed;
        h ^= h >> 15, h *= 0x85EBCA77u, h ^= h >> 13;
        p[i] = __float2bfloat16((float)(h >> 8) * (1.0f / 16777216.0f) - 0.5f);
    }
}

extern "C" double cuda_measure_gemm_tflops_shape(int device, int64_t m, int64_t n, int64_t k, int reps) {
    if (m < 1 || n < 1 || k < 1 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || cudaSetDevice(device) != cudaSuccess)
        return 0;
    __nv_bfloat16 *w = nullptr, *x = nullptr;
    float *y = nullptr;
    cublasHandle_t h = nullptr;
    cudaStream_t st = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    double rate = 0;
    float best = 1e30f;
    const float one = 1.0f, zero = 0.0f;
    if (cudaMalloc(&w, (size_t)m * k * 2) != cudaSuccess || cudaMalloc(&x, (size_t)n * k * 2) != cudaSuccess ||
        cudaMalloc(&y, (size_t)m * n * 4) != cudaSuccess || cudaStreamCreate(&st) != cudaSuccess ||
        cublasCreate(&h) != CUBLAS_STATUS_SUCCESS || cudaEventCreate(&e0) != cudaSuccess ||
        cudaEventCreate(&e1) != cudaSuccess)
        goto done;
    cublasSetStream(h, st);
    launch_k(k_fill_bf16_hash, 1024, 256, 0, st, w, (size_t)m * k, 1);
    launch_k(k_fill_bf16_hash, 1024, 256, 0, st, x, (size_t)n * k, 2);
    for (int r = -1; r < reps; r++) { // r = -1: warm-up (heuristics, clocks)
        cudaEventRecord(e0, st);
        cublasStatus_t bs = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, w, CUDA_R_16BF, (int)k,
                                         x, CUDA_R_16BF, (int)k, &zero, y, CUDA_R_32F, (int)m, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
        cudaEventRecord(e1, st);
        if (bs != CUBLAS_STATUS_SUCCESS || cudaEventSynchronize(e1) != cudaSuccess) goto done;
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (r >= 0 && ms > 0) best = std::min(best, ms);
    }
    if (best < 1e29f) rate = 2.0 * (double)m * (double)n * (double)k / (best * 1e-3) / 1e12;
done:
    cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (h) cublasDestroy(h);
    if (st) cudaStreamDestroy(st);
    cudaFree(w), cudaFree(x), cudaFree(y);
    return rate;
}

extern "C" double cuda_measure_gemm_tflops(int device) { return cuda_measure_gemm_tflops_shape(device, 8192, 8192, 8192, 5); }

// Runs one eager forward of T staged rows (output mode outm) with events between its kernel
// groups and prints the per-group table titled `title` to f.
static int profile_run(cuda_model *c, int T, int outm, const char *title, FILE *f, st_err *err) {
    std::vector<std::pair<const char *, cudaEvent_t>> marks;
    c->g.marks = &marks;
    c->g.prof = 1;
    enqueue(c, T, outm);
    mark(&c->g, "end");
    c->g.prof = 0;
    CU_TRY(cudaStreamSynchronize(c->g.st));
    int rc = cu_check(err, "profile");
    if (rc) return rc;
    std::map<std::string, std::pair<int, double>> agg;
    double total = 0;
    for (size_t i = 0; i + 1 < marks.size(); i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, marks[i].second, marks[i + 1].second);
        auto &a = agg[marks[i].first];
        a.first++, a.second += ms * 1e3;
        total += ms * 1e3;
    }
    for (auto &m : marks) cudaEventDestroy(m.second);
    std::vector<std::pair<double, std::string>> rows;
    for (auto &a : agg) rows.push_back({a.second.second, a.first});
    std::sort(rows.rbegin(), rows.rend());
    fprintf(f, "| kernel group (%s) | calls | us | share |\n|---|---|---|---|\n", title);
    for (auto &r : rows)
        fprintf(f, "| %s | %d | %.1f | %.1f%% |\n", r.second.c_str(), agg[r.second].first, r.first, 100.0 * r.first / total);
    fprintf(f, "| total (eager launches, event overhead included) | | %.1f | |\n", total);
    return ST_OK;
}

extern "C" int cuda_model_profile_step(cuda_model *c, int pos, void *fp, st_err *err) {
    FILE *f = (FILE *)fp;
    int32_t tok = 1, slot = 0;
    int rc = check_rows(c, &tok, &pos, &slot, 1, err);
    if (rc) return rc;
    if ((rc = put_rows(c, &tok, &pos, &slot, 1, err))) return rc;
    char title[160];
    snprintf(title, sizeof title, "one decode step, B=1, pos %d, events between launches", pos);
    return profile_run(c, 1, OUT_GREEDY, title, f, err);
}

extern "C" int cuda_model_profile_prefill(cuda_model *c, int T, void *fp, st_err *err) {
    FILE *f = (FILE *)fp;
    if (T < 1 || T > c->o.max_batch || T > c->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "CUDA: a prefill profile of %d rows (max_batch %d, context %d)", T,
                          c->o.max_batch, c->o.max_ctx);
    std::vector<int32_t> tok((size_t)T, 1), pos((size_t)T), slot((size_t)T, 0);
    for (int t = 0; t < T; t++) pos[(size_t)t] = t;
    int rc = check_rows(c, tok.data(), pos.data(), slot.data(), T, err);
    if (rc) return rc;
    if ((rc = put_rows(c, tok.data(), pos.data(), slot.data(), T, err))) return rc;
    char title[160];
    snprintf(title, sizeof title, "one prefill chunk of %d tokens from position 0, events between launches", T);
    fputc('\n', f);
    return profile_run(c, T, OUT_LAST, title, f, err);
}

// ---------------------------------------------------------------------------------------------
// single ops for the parity harness

struct opctx {
    gctx g;
    std::vector<void *> bufs;
    opctx() {
        memset(&g, 0, sizeof g);
        cudaStreamCreate(&g.st);
        cublasCreate(&g.blas);
        cublasSetStream(g.blas, g.st);
    }
    ~opctx() {
        cudaDeviceSynchronize();
        for (void *p : bufs) cudaFree(p);
        cublasDestroy(g.blas);
        cudaStreamDestroy(g.st);
    }
    template <class T> T *put(const T *src, size_t n) {
        void *p = nullptr;
        if (cudaMalloc(&p, (n ? n : 1) * sizeof(T)) != cudaSuccess) return nullptr;
        bufs.push_back(p);
        if (src) cudaMemcpy(p, src, n * sizeof(T), cudaMemcpyHostToDevice);
        else cudaMemset(p, 0, (n ? n : 1) * sizeof(T));
        return (T *)p;
    }
};

#define OP_BEGIN()                                                                                                  \
    int rc_ = device_ok(0, nullptr, 0, err);                                                                       \
    if (rc_) return rc_;                                                                                            \
    opctx oc;

static int op_end(opctx &oc, void *dst, const void *src, size_t bytes, st_err *err) {
    int rc = cu_check(err, "op");
    if (rc) return rc;
    CU_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    (void)oc;
    return ST_OK;
}

// room to quantise x of `elems` values (two planes) for the dp4a kernels; without it (failed
// allocation) the matrix-vector calls fall back to the fp32 kernels
static void oc_xq(opctx &oc, size_t elems) {
    oc.g.xq_elems = 2 * elems;
    oc.g.xq = oc.put<int8_t>(nullptr, oc.g.xq_elems);
    oc.g.xs = oc.put<float4>(nullptr, oc.g.xq_elems / 32 + 1);
    if (!oc.g.xq || !oc.g.xs) oc.g.xq = nullptr, oc.g.xs = nullptr, oc.g.xq_elems = 0;
}

static int op_weight(opctx &oc, const wt_linear *w, dlin *d) {
    dlin_from(w, d);
    size_t wb = (size_t)w->rows * w->row_bytes;
    if (w->qbits && lin_planes(w->qbits, w->cols, w->group, w->row_bytes)) { // 5/6-bit: planes, as upload_lin
        char *pw = oc.put<char>(nullptr, wb), *stg = oc.put<char>(nullptr, wb);
        if (!pw || !stg || put_planes(pw, w, stg, wb) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return -1;
        d->w = pw, d->pk = 1;
    } else d->w = oc.put((const char *)w->w, wb);
    if (w->qbits) {
        size_t sb = (size_t)w->rows * w->srow_elems * sdt_size(w->sdtype);
        d->s = oc.put((const char *)w->scales, sb);
        d->b = oc.put((const char *)w->biases, sb);
    }
    return d->w ? 0 : -1;
}

extern "C" int cuda_op_linear(const wt_linear *w, const float *x, int T, float *out, int path, st_err *err) {
    OP_BEGIN();
    dlin d;
    if (op_weight(oc, w, &d)) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    const float *dx = oc.put(x, (size_t)T * w->cols);
    float *dy = oc.put<float>(nullptr, (size_t)T * w->rows);
    oc.g.xb_elems = (size_t)T * w->cols;
    oc.g.xb = oc.put<__nv_bfloat16>(nullptr, oc.g.xb_elems);
    oc.g.wb_elems = std::max((size_t)w->cols, std::min((size_t)(w->rows * w->cols), (size_t)1 << 20));
    oc.g.wb = oc.put<__nv_bfloat16>(nullptr, oc.g.wb_elems);
    oc_xq(oc, (size_t)std::min(T, MV_MAXT) * w->cols);
    linear(&oc.g, dy, w->rows, dx, d, T, path);
    return op_end(oc, out, dy, (size_t)T * w->rows * 4, err);
}

extern "C" int cuda_op_embed(const wt_linear *table, const int32_t *tokens, int T, float *out, st_err *err) {
    OP_BEGIN();
    dlin d;
    if (op_weight(oc, table, &d)) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    const int32_t *dt = oc.put(tokens, (size_t)T);
    float *dy = oc.put<float>(nullptr, (size_t)T * table->cols);
    launch_k(k_embed, T, 256, 0, oc.g.st, dy, dt, T, d);
    return op_end(oc, out, dy, (size_t)T * table->cols * 4, err);
}

extern "C" int cuda_op_rmsnorm(const float *x, const float *w, int64_t n_rows, int n, float eps, float *out, st_err *err) {
    OP_BEGIN();
    const float *dx = oc.put(x, (size_t)n_rows * n), *dw = oc.put(w, (size_t)n);
    float *dy = oc.put<float>(nullptr, (size_t)n_rows * n);
    rmsnorm(&oc.g, dy, dx, dw, n_rows, n, eps);
    return op_end(oc, out, dy, (size_t)n_rows * n * 4, err);
}

extern "C" int cuda_op_rope(float *x, const int32_t *pos, int T, int n_heads, int hd, int n_rot, const double *inv_freq,
                            st_err *err) {
    OP_BEGIN();
    float *dx = oc.put(x, (size_t)T * n_heads * hd);
    const int32_t *dp = oc.put(pos, (size_t)T);
    const double *di = oc.put(inv_freq, (size_t)std::max(1, n_rot / 2));
    // the decode path's fused kernel (no norm, no K/V store)
    const int64_t warps = (int64_t)T * n_heads;
    launch_k(k_qk_rope_kv, (unsigned)((warps + 3) / 4), 128, 0, oc.g.st, dx, n_heads, nullptr, 0, nullptr, nullptr, nullptr, 0.f,
                                                                   dp, hd, n_rot, di, nullptr, nullptr, nullptr, 0, T);
    return op_end(oc, x, dx, (size_t)T * n_heads * hd * 4, err);
}

extern "C" int cuda_op_attention(const float *q, const float *k, const float *v, int n_ctx, const int32_t *pos, int T,
                                 int H, int Hkv, int hd, float scale, float *out, st_err *err) {
    return cuda_op_attention_path(q, k, v, n_ctx, pos, T, H, Hkv, hd, scale, 0, out, err);
}

// path 0: the forward pass's choice (the prefill kernel for >= ATTP_MIN_T consecutive rows of
// a supported shape, else the decode kernels); 1: the decode kernels; 2: the prefill kernel
// (ST_ERR_UNSUPPORTED where attn_prefill_ok says no, for any T)
extern "C" int cuda_op_attention_path(const float *q, const float *k, const float *v, int n_ctx, const int32_t *pos,
                                      int T, int H, int Hkv, int hd, float scale, int path, float *out, st_err *err) {
    OP_BEGIN();
    if (hd > 32 * ATT_MAXJ) return st_err_set(err, ST_ERR_UNSUPPORTED, "head_dim %d", hd);
    for (int t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= n_ctx)
            return st_err_set(err, ST_ERR_ARG, "position %d outside the %d cached rows", pos[t], n_ctx);
    std::vector<int32_t> hs((size_t)T, 0);
    const bool pf_ok = attn_prefill_ok(T, H, Hkv, hd, pos, hs.data(), path == 2);
    if (path == 2 && !pf_ok)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "prefill attention kernel: T %d, %d/%d heads, head_dim %d", T, H, Hkv, hd);
    const bool prefill = path == 2 || (path == 0 && T >= ATTP_MIN_T && pf_ok);
    size_t kvn = (size_t)n_ctx * Hkv * hd;
    std::vector<__nv_bfloat16> kb(kvn), vb(kvn);
    for (size_t i = 0; i < kvn; i++) kb[i] = __float2bfloat16(k[i]), vb[i] = __float2bfloat16(v[i]);
    const __nv_bfloat16 *dk = oc.put(kb.data(), kvn), *dv = oc.put(vb.data(), kvn);
    const float *dq = oc.put(q, (size_t)T * H * hd);
    const int32_t *dp = oc.put(pos, (size_t)T);
    std::vector<int32_t> zs((size_t)T, 0);
    const int32_t *ds = oc.put(zs.data(), (size_t)T);
    // the model's split rule (chunks of >= 32 positions, up to ATT_MAXSPLIT splits)
    int nsplit = std::min(ATT_MAXSPLIT, std::max(1, (n_ctx + 31) / 32)), chunk = (n_ctx + nsplit - 1) / nsplit;
    float *part = oc.put<float>(nullptr, (size_t)T * H * nsplit * (hd + 2));
    float *dy = oc.put<float>(nullptr, (size_t)T * H * hd);
    if (prefill) attn_prefill(&oc.g, dy, dq, dk, dv, dp, ds, T, H, Hkv, hd, scale, kvn);
    else attn_decode(&oc.g, dy, part, dq, dk, dv, dp, ds, T, H, Hkv, hd, scale, kvn, chunk, nsplit);
    return op_end(oc, out, dy, (size_t)T * H * hd * 4, err);
}

// The fused quantisations against the separate launches, on the GPU: which = 0: k_swiglu_q vs
// k_swiglu + k_quant_x over rows x cols; which = 1: k_attn_combine with planes vs without +
// k_quant_x over rows = T * H rows of hd = cols (nsplit 5, split 3 empty); which = 2:
// k_add_rmsnorm_v (add) with planes vs without + k_quant_x over rows of cols. Inputs from seed.
// *diff = bytes that differ in the output, the codes or the statistics (0: bitwise equal).
extern "C" int cuda_op_fused_quant_check(int which, int rows, int cols, int planes, uint64_t seed, int64_t *diff,
                                         st_err *err) {
    OP_BEGIN();
    const int nsplit = 5;
    const int64_t n = (int64_t)rows * cols;
    if (cols % 32 || planes < 1 || planes > 2) return st_err_set(err, ST_ERR_ARG, "fused quant check: cols %d planes %d", cols, planes);
    std::vector<float> in(which == 1 ? (size_t)rows * nsplit * (cols + 2) : (size_t)3 * n);
    uint64_t z = seed | 1;
    for (size_t i = 0; i < in.size(); i++) {
        z ^= z << 13, z ^= z >> 7, z ^= z << 17;
        in[i] = (float)((double)(z >> 11) / 9007199254740992.0 * 8.0 - 4.0);
    }
    if (which == 1) // partials: m per split (split 3 empty: -inf), l > 0
        for (int r = 0; r < rows; r++)
            for (int sp = 0; sp < nsplit; sp++) {
                float *p = &in[((size_t)r * nsplit + sp) * (cols + 2)];
                p[cols] = sp == 3 ? -INFINITY : p[cols];
                p[cols + 1] = fabsf(p[cols + 1]) + 0.5f;
            }
    float *din = oc.put(in.data(), in.size());
    float *o1 = oc.put<float>(nullptr, (size_t)n), *o2 = oc.put<float>(nullptr, (size_t)n);
    const size_t nq = (size_t)n * planes;
    int8_t *q1 = oc.put<int8_t>(nullptr, nq), *q2 = oc.put<int8_t>(nullptr, nq);
    float4 *s1 = oc.put<float4>(nullptr, (size_t)n / 32), *s2 = oc.put<float4>(nullptr, (size_t)n / 32);
    if (!din || !o1 || !o2 || !q1 || !q2 || !s1 || !s2) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    if (which == 2) { // x (two copies: the add writes it), y, then w = the first cols of x's copy
        const int th = norm_v_threads(cols, o1, din, din + n, din + 2 * n);
        float *x2 = oc.put(in.data(), (size_t)n);
        if (!th || !x2) return st_err_set(err, ST_ERR_ARG, "fused quant check: norm width %d", cols);
        launch_k(k_add_rmsnorm_v<true>, (unsigned)rows, th, 0, oc.g.st, o1, din, (const float *)din + n,
                 (const float *)din + 2 * n, cols, 1e-6f, 0, (int8_t *)nullptr, (float4 *)nullptr);
        launch_k(k_add_rmsnorm_v<true>, (unsigned)rows, th, 0, oc.g.st, o2, x2, (const float *)din + n,
                 (const float *)din + 2 * n, cols, 1e-6f, planes, q2, s2);
    } else if (which == 0) {
        launch_k(k_swiglu, grid_for(n, 256), 256, 0, oc.g.st, o1, (const float *)din, (const float *)din + n, n);
        launch_k(k_swiglu_q, (unsigned)std::min<int64_t>((n / 32 + 7) / 8, 1024), 256, 0, oc.g.st, o2, (const float *)din,
                 (const float *)din + n, n, planes, q2, s2);
    } else {
        launch_k(k_attn_combine, rows, 128, 0, oc.g.st, o1, (const float *)din, cols, nsplit, 0, (int8_t *)nullptr,
                 (float4 *)nullptr);
        launch_k(k_attn_combine, rows, 128, 0, oc.g.st, o2, (const float *)din, cols, nsplit, planes, q2, s2);
    }
    const int64_t blocks = n / 32;
    launch_k(k_quant_x, (unsigned)((blocks + 7) / 8), 256, 0, oc.g.st, (const float *)o1, (int64_t)cols, rows, (int64_t)cols,
             planes, q1, s1);
    if (int rc = cu_check(err, "fused quant check")) return rc;
    std::vector<char> a((size_t)n * 4), b((size_t)n * 4);
    int64_t d = 0;
    const void *pairs[3][2] = {{o1, o2}, {q1, q2}, {s1, s2}};
    const size_t bytes[3] = {(size_t)n * 4, nq, (size_t)n / 32 * 16};
    for (int k = 0; k < 3; k++) {
        a.resize(bytes[k]), b.resize(bytes[k]);
        CU_TRY(cudaMemcpy(a.data(), pairs[k][0], bytes[k], cudaMemcpyDeviceToHost));
        CU_TRY(cudaMemcpy(b.data(), pairs[k][1], bytes[k], cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < bytes[k]; i++) d += a[i] != b[i];
    }
    *diff = d;
    return ST_OK;
}

extern "C" int cuda_op_swiglu(const float *gate, const float *up, int64_t n, float *out, st_err *err) {
    OP_BEGIN();
    float *dg = oc.put(gate, (size_t)n);
    const float *du = oc.put(up, (size_t)n);
    launch_k(k_swiglu, grid_for(n, 256), 256, 0, oc.g.st, dg, dg, du, n);
    return op_end(oc, out, dg, (size_t)n * 4, err);
}

extern "C" int cuda_op_moe_route(const float *logits, const float *bias, int T, int E, int K, int sigmoid, int norm_topk,
                                 int32_t *sel, float *w, st_err *err) {
    OP_BEGIN();
    if (E > MOE_MAXE) return st_err_set(err, ST_ERR_UNSUPPORTED, "%d experts", E);
    const float *dl = oc.put(logits, (size_t)T * E);
    const float *db = bias ? oc.put(bias, (size_t)E) : nullptr;
    int32_t *ds = oc.put<int32_t>(nullptr, (size_t)T * K);
    float *dw = oc.put<float>(nullptr, (size_t)T * K);
    launch_k(k_moe_route, (T + 3) / 4, 128, 0, oc.g.st, dl, db, T, E, K, sigmoid, norm_topk, ds, dw);
    int rc = op_end(oc, sel, ds, (size_t)T * K * 4, err);
    if (rc) return rc;
    CU_TRY(cudaMemcpy(w, dw, (size_t)T * K * 4, cudaMemcpyDeviceToHost));
    return ST_OK;
}

// E experts of identical shape packed contiguously (as upload_lin does for a model)
static int op_weights_e(opctx &oc, const wt_linear *w, int E, dlin *d) {
    dlin_from(&w[0], d);
    const bool pl = w[0].qbits && lin_planes(w[0].qbits, w[0].cols, w[0].group, w[0].row_bytes); // as upload_lin
    const size_t wb = (size_t)w[0].rows * w[0].row_bytes;
    const size_t ws = pl ? mv56_expert_stride(w[0].qbits, w[0].rows, w[0].cols) : wb;
    const size_t sn = w[0].qbits ? (size_t)w[0].rows * w[0].srow_elems : 0, sb = sn * sdt_size(w[0].sdtype);
    char *pw = oc.put<char>(nullptr, ws * E), *ps = sn ? oc.put<char>(nullptr, sb * E) : nullptr,
         *pb = sn ? oc.put<char>(nullptr, sb * E) : nullptr, *stg = pl ? oc.put<char>(nullptr, wb) : nullptr;
    if (!pw || (sn && (!ps || !pb)) || (pl && !stg)) return -1;
    for (int e = 0; e < E; e++) {
        if (w[e].rows != w[0].rows || w[e].cols != w[0].cols || w[e].qbits != w[0].qbits) return -1;
        if (pl) {
            if (put_planes(pw + ws * e, &w[e], stg, wb) != cudaSuccess) return -1;
        } else cudaMemcpy(pw + wb * e, w[e].w, wb, cudaMemcpyHostToDevice);
        if (sn) {
            cudaMemcpy(ps + sb * e, w[e].scales, sb, cudaMemcpyHostToDevice);
            cudaMemcpy(pb + sb * e, w[e].biases, sb, cudaMemcpyHostToDevice);
        }
    }
    if (pl && cudaDeviceSynchronize() != cudaSuccess) return -1;
    d->w = pw, d->s = ps, d->b = pb, d->e_wstride = ws, d->e_sstride = sn, d->pk = pl;
    return 0;
}

// k_moe_router's counters for an op context: 4 (32 rows per launch, fewer than a model's 256),
// so that T > 32 also runs moe_router's launch loop. 0, or -1 when the allocation failed.
static int oc_moe_cnt(opctx &oc) {
    oc.g.moe_cnt_n = 4;
    oc.g.moe_cnt = oc.put<unsigned>(nullptr, (size_t)oc.g.moe_cnt_n);
    return oc.g.moe_cnt ? 0 : -1;
}

extern "C" int cuda_op_moe_router(const wt_linear *router, const float *router_bias, int E, int K, int sigmoid,
                                  int norm_topk, const float *x, int T, float *logits, int32_t *sel, float *w,
                                  st_err *err) {
    OP_BEGIN();
    if (E > MOE_MAXE) return st_err_set(err, ST_ERR_UNSUPPORTED, "%d experts", E);
    moe_w m;
    memset(&m, 0, sizeof m);
    if (op_weight(oc, router, &m.router)) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    const int D = (int)router->cols;
    m.bias = router_bias ? oc.put(router_bias, (size_t)E) : nullptr;
    m.E = E, m.K = K, m.D = D, m.sigmoid = sigmoid, m.norm = norm_topk;
    moe_buf b;
    memset(&b, 0, sizeof b);
    b.rlog = oc.put<float>(nullptr, (size_t)T * E);
    b.selw = oc.put<float>(nullptr, (size_t)T * K);
    b.sel = oc.put<int32_t>(nullptr, (size_t)T * K);
    const float *dx = oc.put(x, (size_t)T * D);
    if (!b.rlog || !b.selw || !b.sel || !dx || oc_moe_cnt(oc)) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    // x quantised on the side as for the fused experts (two planes), when the shape allows
    const int planes = D % 32 == 0 ? 2 : 0;
    if (planes) {
        oc_xq(oc, (size_t)T * D);
        if (!oc.g.xq) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    }
    moe_router(&oc.g, m, b, dx, T, planes);
    int rc = op_end(oc, logits, b.rlog, (size_t)T * E * 4, err);
    if (rc) return rc;
    CU_TRY(cudaMemcpy(sel, b.sel, (size_t)T * K * 4, cudaMemcpyDeviceToHost));
    CU_TRY(cudaMemcpy(w, b.selw, (size_t)T * K * 4, cudaMemcpyDeviceToHost));
    return ST_OK;
}

extern "C" int cuda_op_moe_ffn(const wt_linear *router, const float *router_bias, const wt_linear *exp_gate,
                               const wt_linear *exp_up, const wt_linear *exp_down, int E, int K, int sigmoid,
                               int norm_topk, const float *x, int T, float *out, int32_t *sel_out, st_err *err) {
    OP_BEGIN();
    if (E > MOE_MAXE) return st_err_set(err, ST_ERR_UNSUPPORTED, "%d experts", E);
    moe_w m;
    memset(&m, 0, sizeof m);
    if (op_weight(oc, router, &m.router) || op_weights_e(oc, exp_gate, E, &m.eg) || op_weights_e(oc, exp_up, E, &m.eu) ||
        op_weights_e(oc, exp_down, E, &m.ed))
        return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    const int D = (int)router->cols, F = (int)exp_gate[0].rows;
    m.bias = router_bias ? oc.put(router_bias, (size_t)E) : nullptr;
    m.E = E, m.K = K, m.F = F, m.D = D, m.sigmoid = sigmoid, m.norm = norm_topk;
    moe_buf b;
    b.rlog = oc.put<float>(nullptr, (size_t)T * E);
    b.selw = oc.put<float>(nullptr, (size_t)T * K);
    b.gate = oc.put<float>(nullptr, (size_t)T * K * F);
    b.up = oc.put<float>(nullptr, (size_t)T * K * F);
    b.ye = oc.put<float>(nullptr, (size_t)T * K * D);
    b.sel = oc.put<int32_t>(nullptr, (size_t)T * K);
    const float *dx = oc.put(x, (size_t)T * D);
    float *dy = oc.put<float>(nullptr, (size_t)T * D);
    if (!b.rlog || !b.selw || !b.gate || !b.up || !b.ye || !b.sel || !dx || !dy)
        return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    oc_xq(oc, std::max((size_t)T * D, (size_t)T * K * F));
    oc.g.x16 = 1; // as in a MoE model
    if (oc_moe_cnt(oc)) return st_err_set(err, ST_ERR_NOMEM, "CUDA: op alloc");
    // the parity asks (STRATA_CUDA_MOE_EXPECT_FUSED=1) that shapes it expects on the fused
    // kernels really take them: a case that silently fell back to the unfused path would pass
    if (env_on("STRATA_CUDA_MOE_EXPECT_FUSED") && !moe_fused_planes(&oc.g, m, T))
        return st_err_set(err, ST_ERR_UNSUPPORTED, "CUDA: these experts (q%d/q%d) took the unfused path", m.eg.qbits, m.ed.qbits);
    cudaMemset(dy, 0xff, (size_t)T * D * 4); // NaN: a row the kernels leave unwritten fails the comparison
    moe_ffn(&oc.g, m, b, dx, T, dy);
    int rc = op_end(oc, out, dy, (size_t)T * D * 4, err);
    if (rc) return rc;
    if (sel_out) CU_TRY(cudaMemcpy(sel_out, b.sel, (size_t)T * K * 4, cudaMemcpyDeviceToHost));
    return ST_OK;
}

extern "C" int cuda_op_argmax(const float *x, int rows, int n, int32_t *out, st_err *err) {
    OP_BEGIN();
    const float *dx = oc.put(x, (size_t)rows * n);
    int32_t *dy = oc.put<int32_t>(nullptr, (size_t)rows);
    launch_k(k_argmax, rows, 1024, 0, oc.g.st, dx, n, dy);
    return op_end(oc, out, dy, (size_t)rows * 4, err);
}

// ---------------------------------------------------------------------------------------------
// tensor parallelism over the GPUs of this process (strata/cuda_backend.h: cuda_tp_*)

struct cuda_tp {
    int n;
    int dev[CUDA_PEER_MAX_RANKS];
    cuda_model *r[CUDA_PEER_MAX_RANKS];
    cuda_peer_group *pg;
};

extern "C" void cuda_tp_free(cuda_tp *tp) {
    if (!tp) return;
    for (int i = 0; i < tp->n; i++)
        if (tp->r[i]) cudaSetDevice(tp->dev[i]), cuda_model_free(tp->r[i]);
    if (tp->pg) cuda_peer_group_free(tp->pg);
    delete tp;
}

// Builds the group: validates the split (tp_local_desc) before allocating, creates the peer
// all-reduce group over devices[0..n) (peer access), then one cuda_model per GPU with its share
// of the weights (from m's host tensors, sliced, or generated on the device when m is NULL).
// *out owns everything (cuda_tp_free); m and d are borrowed and must outlive it. Fails with the
// first error (ST_ERR_UNSUPPORTED for widths that do not split, ST_ERR_NOMEM, CUDA errors),
// leaving *out NULL and nothing allocated.
static int tp_init(cuda_tp **out, const model *m, const model_desc *d, uint64_t seed, const cuda_model_opts *opts,
                   const int *devices, int n, st_err *err) {
    *out = nullptr;
    if (n < 2 || n > CUDA_PEER_MAX_RANKS)
        return st_err_set(err, ST_ERR_ARG, "tensor parallel: %d GPUs (2..%d)", n, CUDA_PEER_MAX_RANKS);
    model_desc loc;
    int rc = tp_local_desc(d, n, &loc, err); // refuse early, before any allocation
    if (rc) return rc;
    cuda_model_opts o = opts ? *opts : cuda_model_opts{};
    if (o.max_batch <= 0) o.max_batch = 256;
    if (m) o.layer_begin = m->layer_begin, o.layer_end = m->layer_end, o.with_embed = m->holds_embed,
           o.with_output = m->holds_output;
    cuda_tp *tp = new cuda_tp();
    tp->n = n;
    // the all-reduce moves up to max_batch rows of the residual stream (or 2 sums per row)
    const size_t max_floats = (size_t)o.max_batch * (size_t)std::max(d->n_embd, 2);
    if ((rc = cuda_peer_group_init(&tp->pg, n, devices, max_floats, err))) {
        cuda_tp_free(tp);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        tp->dev[i] = devices[i];
        cuda_model_opts oi = o;
        oi.device = devices[i], oi.tp_rank = i, oi.tp_size = n;
        if ((rc = model_init(&tp->r[i], m, d, seed, &oi, err))) {
            cuda_tp_free(tp);
            return rc;
        }
        tp->r[i]->pv = cuda_peer_group_view(tp->pg, i);
        // the ranks' host threads enqueue independently (a first cuBLAS call alone can hold one
        // rank's stream for hundreds of ms while the others wait in an all-reduce): bound the
        // waits at 10 s unless STRATA_PEER_TIMEOUT_MS says otherwise
        if (!getenv("STRATA_PEER_TIMEOUT_MS")) tp->r[i]->pv.timeout_ns = 10000000000ull;
    }
    *out = tp;
    return ST_OK;
}

extern "C" int cuda_tp_init(cuda_tp **out, const model *m, const cuda_model_opts *o, const int *devices, int n,
                            st_err *err) {
    return tp_init(out, m, &m->desc, 0, o, devices, n, err);
}

extern "C" int cuda_tp_init_synthetic(cuda_tp **out, const model_desc *d, const cuda_model_opts *o, const int *devices,
                                      int n, uint64_t seed, st_err *err) {
    return tp_init(out, nullptr, d, seed, o, devices, n, err);
}

// Runs f(rank) for every rank, each on its own host thread with the rank's device current.
// Returns the first nonzero result.
template <class F> static int tp_each(cuda_tp *tp, F f) {
    std::vector<std::thread> th;
    std::vector<int> rcs((size_t)tp->n, 0);
    for (int i = 0; i < tp->n; i++)
        th.emplace_back([&, i]() {
            cudaSetDevice(tp->dev[i]);
            rcs[(size_t)i] = f(i);
        });
    for (auto &t : th) t.join();
    for (int r : rcs)
        if (r) return r;
    return 0;
}

// Waits for every rank's stream, then reports the first CUDA error or stalled all-reduce.
static int tp_sync(cuda_tp *tp, const char *what, st_err *err) {
    int rc = ST_OK;
    for (int i = 0; i < tp->n; i++) {
        cudaSetDevice(tp->dev[i]);
        cudaError_t e = cudaStreamSynchronize(tp->r[i]->g.st);
        if (e != cudaSuccess && !rc) {
            cudaGetLastError();
            rc = st_err_set(err, ST_ERR_INTERNAL, "CUDA %s on GPU %d: %s", what, tp->dev[i], cudaGetErrorString(e));
        }
    }
    for (int i = 0; i < tp->n && !rc; i++) rc = cuda_peer_error(tp->pg, i, err);
    return rc;
}

extern "C" int cuda_tp_forward(cuda_tp *tp, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                               float *logits, logits_mode mode, st_err *err) {
    cuda_model *c0 = tp->r[0];
    int rc = need_whole(c0, "cuda_tp_forward", err);
    if (!rc) rc = check_rows(c0, tokens, pos, slot, T, err);
    if (rc) return rc;
    const int B = c0->o.max_batch, V = c0->d->n_vocab;
    for (int t0 = 0; t0 < T; t0 += B) {
        const int n = std::min(B, T - t0);
        int outm = OUT_NONE;
        if (mode == LOGITS_ALL) outm = OUT_ALL;
        if (mode == LOGITS_LAST && t0 + n == T) outm = OUT_LAST;
        // every rank enqueues from its own thread, so no rank's launches wait behind another's
        // (the all-reduces pair up on the GPUs)
        if (tp_each(tp, [&](int i) -> int {
                const int r2 = put_rows(tp->r[i], tokens + t0, pos + t0, slot + t0, n, nullptr);
                if (!r2) enqueue(tp->r[i], n, i == 0 ? outm : OUT_NONE);
                return r2;
            }))
            return st_err_set(err, ST_ERR_INTERNAL, "CUDA: staging the rows of a tensor-parallel step failed");
        cudaSetDevice(tp->dev[0]);
        if (outm == OUT_ALL)
            CU_TRY(cudaMemcpyAsync(logits + (size_t)t0 * V, c0->logits, (size_t)n * V * 4, cudaMemcpyDeviceToHost, c0->g.st));
        if (outm == OUT_LAST) CU_TRY(cudaMemcpyAsync(logits, c0->logits, (size_t)V * 4, cudaMemcpyDeviceToHost, c0->g.st));
        if ((rc = tp_sync(tp, "tensor-parallel forward", err))) return rc;
    }
    return ST_OK;
}

extern "C" int cuda_tp_generate_greedy(cuda_tp *tp, int32_t token, int pos0, int slot, int n, int32_t *out,
                                       float *step_ms, st_err *err) {
    cuda_model *c0 = tp->r[0];
    if (n < 1 || pos0 < 0 || pos0 + n > c0->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "CUDA: %d steps from position %d exceed the context %d", n, pos0, c0->o.max_ctx);
    int rc = need_whole(c0, "greedy generation", err);
    if (!rc) rc = check_rows(c0, &token, &pos0, &slot, 1, err);
    if (rc) return rc;
    auto arm = [&]() -> int { // rows and the generation counter on every rank
        for (int i = 0; i < tp->n; i++) {
            cudaSetDevice(tp->dev[i]);
            int r2 = put_rows(tp->r[i], &token, &pos0, &slot, 1, err);
            if (r2) return r2;
            CU_TRY(cudaMemsetAsync(tp->r[i]->gen_counter, 0, 4, tp->r[i]->g.st));
        }
        return ST_OK;
    };
    if ((rc = arm())) return rc;
    const bool graphs = !c0->o.no_graph;
    if (graphs && !c0->graph[1]) {
        // warm-up step on every rank (the same K/V writes as the replay that follows), then one
        // graph per rank; the ranks' graphs pair up all-reduce by all-reduce when replayed
        tp_each(tp, [&](int i) -> int {
            enqueue(tp->r[i], 1, OUT_GREEDY);
            return 0;
        });
        if ((rc = tp_sync(tp, "tensor-parallel warm-up", err))) return rc;
        for (int i = 0; i < tp->n; i++) {
            cuda_model *c = tp->r[i];
            cudaSetDevice(tp->dev[i]);
            cudaGraph_t graph = nullptr;
            cudaError_t e = cudaStreamBeginCapture(c->g.st, cudaStreamCaptureModeThreadLocal);
            if (e == cudaSuccess) {
                enqueue(c, 1, OUT_GREEDY);
                e = cudaStreamEndCapture(c->g.st, &graph);
            }
            if (e == cudaSuccess) e = cudaGraphInstantiate(&c->graph[1], graph, 0);
            if (graph) cudaGraphDestroy(graph);
            if (e != cudaSuccess) {
                cudaGetLastError();
                return st_err_set(err, ST_ERR_INTERNAL, "CUDA: capture of the tensor-parallel step on GPU %d: %s",
                                  tp->dev[i], cudaGetErrorString(e));
            }
        }
        if ((rc = arm())) return rc;
    }
    std::vector<cudaEvent_t> ev;
    cudaSetDevice(tp->dev[0]);
    if (step_ms) {
        ev.resize((size_t)n + 1);
        for (auto &e : ev) cudaEventCreate(&e);
        cudaEventRecord(ev[0], c0->g.st);
    }
    for (int s = 0; s < n; s++) {
        for (int i = 0; i < tp->n; i++) {
            cudaSetDevice(tp->dev[i]);
            if (tp->r[i]->graph[1]) cudaGraphLaunch(tp->r[i]->graph[1], tp->r[i]->g.st);
            else enqueue(tp->r[i], 1, OUT_GREEDY);
        }
        // rank 0's step ends after its last all-reduce, i.e. after every rank's layers
        if (step_ms) cudaSetDevice(tp->dev[0]), cudaEventRecord(ev[(size_t)s + 1], c0->g.st);
    }
    rc = tp_sync(tp, "tensor-parallel generation", err);
    cudaSetDevice(tp->dev[0]);
    if (!rc) {
        cudaError_t e = cudaMemcpy(out, c0->gen_log, (size_t)n * 4, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) rc = st_err_set(err, ST_ERR_INTERNAL, "CUDA: %s", cudaGetErrorString(e));
    }
    if (!rc && tp->n > 1) { // every rank must have produced the same tokens
        std::vector<int32_t> other((size_t)n);
        for (int i = 1; i < tp->n && !rc; i++) {
            cudaSetDevice(tp->dev[i]);
            if (cudaMemcpy(other.data(), tp->r[i]->gen_log, (size_t)n * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
                memcmp(other.data(), out, (size_t)n * 4))
                rc = st_err_set(err, ST_ERR_INTERNAL, "tensor parallel: GPU %d generated other tokens than GPU %d",
                                tp->dev[i], tp->dev[0]);
        }
        cudaSetDevice(tp->dev[0]);
    }
    if (step_ms) {
        for (int s = 0; s < n && !rc; s++) cudaEventElapsedTime(&step_ms[s], ev[(size_t)s], ev[(size_t)s + 1]);
        for (auto &e : ev) cudaEventDestroy(e);
    }
    return rc;
}

// Captures the greedy decode step of B rows on every rank (graph[B] of each rank), after one
// eager warm-up step enqueued from each rank's own thread (the same K/V writes as the replay
// that follows). The rows must be staged on every rank; on return they must be staged again
// (the warm-up advanced them on the device). On a failed capture no rank keeps a graph for B
// (a half-captured group would mix a replay with eager launches from one thread) and the error
// names the GPU.
static int tp_capture_decode(cuda_tp *tp, int B, st_err *err) {
    tp_each(tp, [&](int i) -> int {
        enqueue(tp->r[i], B, OUT_GREEDY);
        return 0;
    });
    int rc = tp_sync(tp, "tensor-parallel decode warm-up", err);
    if (rc) return rc;
    for (int i = 0; i < tp->n && !rc; i++) {
        cuda_model *c = tp->r[i];
        cudaSetDevice(tp->dev[i]);
        cudaGraph_t graph = nullptr;
        cudaError_t e = cudaStreamBeginCapture(c->g.st, cudaStreamCaptureModeThreadLocal);
        if (e == cudaSuccess) {
            enqueue(c, B, OUT_GREEDY);
            e = cudaStreamEndCapture(c->g.st, &graph);
        }
        if (e == cudaSuccess) e = cudaGraphInstantiate(&c->graph[B], graph, 0);
        if (graph) cudaGraphDestroy(graph);
        if (e != cudaSuccess) {
            cudaGetLastError();
            c->graph[B] = nullptr;
            rc = st_err_set(err, ST_ERR_INTERNAL, "CUDA: capture of the tensor-parallel decode step (%d rows) on GPU %d: %s",
                            B, tp->dev[i], cudaGetErrorString(e));
        }
    }
    if (rc)
        for (int i = 0; i < tp->n; i++)
            if (tp->r[i]->graph[B]) {
                cudaSetDevice(tp->dev[i]);
                cudaGraphExecDestroy(tp->r[i]->graph[B]);
                tp->r[i]->graph[B] = nullptr;
            }
    cudaSetDevice(tp->dev[0]);
    return rc;
}

// cuda_model_decode_greedy over the group: B rows (B <= 8, at most max_batch) staged on every
// rank, one replay of each rank's graph for B (captured on first use by tp_capture_decode;
// launched from this thread one rank after the other, as cuda_tp_generate_greedy does: the
// replays pair up all-reduce by all-reduce on the GPUs), then every rank's B ids are copied back
// and compared: next[B] receives rank 0's. Borrows tokens/pos/slot (host, [B]); allocates
// nothing. Fails with ST_ERR_ARG on bad rows (nothing launched), ST_ERR_INTERNAL on a CUDA error,
// a stalled all-reduce, or ranks that picked different ids (the message names both GPUs and the
// first row that differs).
extern "C" int cuda_tp_decode_greedy(cuda_tp *tp, const int32_t *tokens, const int32_t *pos, const int32_t *slot,
                                     int B, int32_t *next, st_err *err) {
    cuda_model *c0 = tp->r[0];
    const int maxb = std::min(MV_MAXT, c0->o.max_batch);
    if (B < 1 || B > maxb)
        return st_err_set(err, ST_ERR_ARG, "CUDA: tensor-parallel greedy decode takes 1..%d rows, not %d", maxb, B);
    int rc = need_whole(c0, "tensor-parallel greedy decode", err);
    if (!rc) rc = check_rows(c0, tokens, pos, slot, B, err);
    if (rc) return rc;
    auto arm = [&]() -> int { // the rows and the generation counter on every rank
        for (int i = 0; i < tp->n; i++) {
            cudaSetDevice(tp->dev[i]);
            int r2 = put_rows(tp->r[i], tokens, pos, slot, B, err);
            if (r2) return r2;
            CU_TRY(cudaMemsetAsync(tp->r[i]->gen_counter, 0, 4, tp->r[i]->g.st));
        }
        return ST_OK;
    };
    if ((rc = arm())) return rc;
    if (!c0->o.no_graph && !c0->graph[B]) {
        if ((rc = tp_capture_decode(tp, B, err)) || (rc = arm())) return rc;
    }
    if (c0->graph[B]) {
        for (int i = 0; i < tp->n && !rc; i++) {
            cudaSetDevice(tp->dev[i]);
            cudaError_t e = cudaGraphLaunch(tp->r[i]->graph[B], tp->r[i]->g.st);
            if (e != cudaSuccess)
                rc = st_err_set(err, ST_ERR_INTERNAL, "CUDA: tensor-parallel decode replay on GPU %d: %s", tp->dev[i],
                                cudaGetErrorString(e));
        }
    } else { // STRATA_CUDA_NO_GRAPH: eager, each rank from its own thread
        tp_each(tp, [&](int i) -> int {
            enqueue(tp->r[i], B, OUT_GREEDY);
            return 0;
        });
    }
    for (int i = 0; i < tp->n && !rc; i++) {
        cuda_model *c = tp->r[i];
        cudaSetDevice(tp->dev[i]);
        cudaError_t e = cudaMemcpyAsync(c->h_io + 3 * c->o.max_batch, c->next, (size_t)B * 4, cudaMemcpyDeviceToHost, c->g.st);
        if (e != cudaSuccess)
            rc = st_err_set(err, ST_ERR_INTERNAL, "CUDA: tensor-parallel decode copy on GPU %d: %s", tp->dev[i],
                            cudaGetErrorString(e));
    }
    const int rs = tp_sync(tp, "tensor-parallel decode", rc ? nullptr : err); // always drain the streams
    cudaSetDevice(tp->dev[0]);
    if (rc || (rc = rs)) return rc;
    const int32_t *ids0 = c0->h_io + 3 * c0->o.max_batch;
    for (int i = 1; i < tp->n; i++) { // every rank must have picked the same ids
        const int32_t *ids = tp->r[i]->h_io + 3 * tp->r[i]->o.max_batch;
        for (int b = 0; b < B; b++)
            if (ids[b] != ids0[b])
                return st_err_set(err, ST_ERR_INTERNAL,
                                  "tensor parallel: GPU %d picked token %d for row %d (slot %d), GPU %d picked %d",
                                  tp->dev[i], ids[b], b, slot[b], tp->dev[0], ids0[b]);
    }
    memcpy(next, ids0, (size_t)B * 4);
    return ST_OK;
}

extern "C" int cuda_tp_kv_fill_synthetic(cuda_tp *tp, int slot, int n_tokens, st_err *err) {
    for (int i = 0; i < tp->n; i++) {
        cudaSetDevice(tp->dev[i]);
        int rc = cuda_model_kv_fill_synthetic(tp->r[i], slot, n_tokens, err);
        if (rc) return rc;
    }
    return tp_sync(tp, "kv fill", err);
}

extern "C" int cuda_tp_size(const cuda_tp *tp) { return tp->n; }

extern "C" void cuda_tp_get_info(const cuda_tp *tp, int rank, cuda_model_info *info) {
    cudaSetDevice(tp->dev[rank]);
    cuda_model_get_info(tp->r[rank], info);
}

extern "C" int cuda_tp_profile_step(cuda_tp *tp, int pos, void *fp, st_err *err) {
    // rank 0 runs the eager step with events between its kernel groups while the other ranks run
    // the same step eagerly from their own threads (their all-reduces pair up with rank 0's)
    std::vector<st_err> errs((size_t)tp->n);
    int rc = tp_each(tp, [&](int i) -> int {
        st_err *e = &errs[(size_t)i];
        memset(e, 0, sizeof *e);
        if (i == 0) return cuda_model_profile_step(tp->r[0], pos, fp, e);
        int32_t tok = 1, slot = 0;
        const int r2 = put_rows(tp->r[i], &tok, &pos, &slot, 1, e);
        if (!r2) enqueue(tp->r[i], 1, OUT_GREEDY);
        return r2;
    });
    const int rs = tp_sync(tp, "tensor-parallel profile", err);
    if (rc) {
        for (auto &e : errs)
            if (e.code) return st_err_set(err, e.code, "%s", e.msg);
        return st_err_set(err, ST_ERR_INTERNAL, "tensor-parallel profile failed");
    }
    return rs;
}
