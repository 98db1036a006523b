/* cuda_moe_plan.h — the index arithmetic of the MoE decode kernels (cuda_moe.cuh), in plain C so
 * that tests/unit/test_cuda_moe_plan.c checks on the host exactly what the kernels compute:
 * how a router row's columns and the down projection's (expert, column slice) pairs are split
 * over warps, and the int8 layout of quantised activations (the one k_quant_x writes).
 * Every function is pure (no memory, no failure). */
#ifndef STRATA_CUDA_MOE_PLAN_H
#define STRATA_CUDA_MOE_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "mv56_layout.h"

#ifdef __CUDACC__
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD static inline
#endif

#define MOE_NT 8       /* token rows per router block (= MV_MAXT)                          */
#define MOE_RT_WARPS 4 /* warps per router block: MOE_RT_WARPS / S rows of S warps each   */
#define MOE_GU_WARPS 8 /* gate/up block: 8 warps x MOE_GU_R rows = one 32-row block of h  */
#define MOE_GU_R 4
#define MOE_DN_WARPS 8 /* down block: MOE_DN_R output rows, warps over (expert, slice)      */
#define MOE_DN_R 4
#define MOE_DN_MAXP 64 /* (expert, slice) pairs of one down block: K <= 64                  */

/* Warps per router row (1, 2 or 4): enough that a lane holds about one 32-value chunk of the
 * row (nch chunks), never more than the block's warps. */
MOE_HD int moe_rt_slices(int nch) {
    return nch > 64 ? 4 : nch > 32 ? 2 : 1;
}

/* Router blocks (grid.x) for E rows of S warps each. */
MOE_HD int moe_rt_blocks(int E, int S) { return (E * S + MOE_RT_WARPS - 1) / MOE_RT_WARPS; }

/* Column slices per expert in the down block: the block's warps are spread over K experts
 * (K >= 8: one warp per expert, warps loop over experts past 8). */
MOE_HD int moe_dn_slices(int K) { return K >= MOE_DN_WARPS ? 1 : MOE_DN_WARPS / K; }

/* Chunk loop of slice sl of S over nch chunks of 32 values, lane `lane`: chunks
 * c = moe_chunk0(sl, lane), c += moe_chunk_step(S) while c < nch (interleaved, as k_mv_q's
 * split-K). */
MOE_HD int moe_chunk0(int sl, int lane) { return sl * 32 + lane; }
MOE_HD int moe_chunk_step(int S) { return 32 * S; }

/* Byte of a quantised 32-value block that holds value `lane` (per 8 values: the 4 even ones,
 * then the 4 odd ones), the layout k_mv_qd's dot32 expects. */
MOE_HD int moe_xq_pos(int lane) {
    const int k = lane >> 3, i = lane & 7;
    return 8 * k + 4 * (i & 1) + (i >> 1);
}

/* 5/6-bit experts in the planes layout of mv56_layout.h (dlin.pk = 1), experts e_wstride bytes
 * apart: byte offsets from the weight's base of row r of expert e in the W plane (block c of the
 * row at + 16 c) and in the H plane (block c at + 4 (bits - 4) c). What k_moe_gateup /
 * k_moe_down add to dlin.w for their rows. */
MOE_HD size_t moe_pk_w_row(size_t e_wstride, int e, int64_t cols, int64_t r) {
    return (size_t)e * e_wstride + mv56_w_off(cols, r, 0);
}
MOE_HD size_t moe_pk_h_row(int bits, size_t e_wstride, int e, int64_t rows, int64_t cols, int64_t r) {
    return (size_t)e * e_wstride + mv56_h_off(bits, rows, cols, r, 0);
}

/* Whether a planes expert weight (base address `base`, rows x cols, groups of `group`, experts
 * e_wstride bytes apart) suits the fused kernels' loads: whole 32-value blocks and groups, 16-byte
 * W blocks (base and expert stride 16-byte aligned; W rows are cols / 2 bytes, so aligned when
 * cols % 32 == 0), 4- / 8-byte H blocks (H rows cols (bits - 4) / 8 bytes after rows * cols / 2),
 * and a stride that holds a whole expert, below 2^31 bytes (k_moe_gateup keeps the H row as an
 * int offset from the W row). 1 or 0. */
MOE_HD int moe_pk_fits(int bits, int64_t rows, int64_t cols, int group, uintptr_t base, size_t e_wstride) {
    return (bits == 5 || bits == 6) && rows > 0 && cols > 0 && cols % 32 == 0 && group > 0 && group % 32 == 0 &&
           (base & 15) == 0 && e_wstride % 16 == 0 && e_wstride >= mv56_bytes(bits, rows, cols) &&
           e_wstride < ((size_t)1 << 31);
}

/* Two-plane split of a code |q| <= 32512: q = 256 * hi + lo, hi in [-127, 127], lo in [-128, 127]. */
MOE_HD int moe_xq_hi(int q) { return (q + 128) >> 8; }

#endif
