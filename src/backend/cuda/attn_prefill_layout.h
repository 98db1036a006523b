/* attn_prefill_layout.h — the integer layout of the tiled prefill attention kernel
 * (cuda_attn_prefill.cuh), shared by the kernel and its host emulation (tests/unit/
 * test_attn_prefill_layout.c), so that the index arithmetic the GPU runs is also checked on a
 * machine without one.
 *
 * A CTA owns ATTP_ROWS (query token, q head) rows of one kv head: its G = H / Hkv q heads for
 * ATTP_ROWS / G consecutive tokens (GQA: the G heads share every K/V tile the CTA loads). Row r
 * is token t0 + r / G, head kvh * G + r % G; rows past (ATTP_ROWS / G) * G, or past the last
 * token, compute a copy of token t0 and store nothing. Warp w owns rows [16w, 16w + 16): one
 * m16 tile of mma.m16n8k16 (bf16 x bf16 -> fp32). Keys come in tiles of ATTP_BN positions,
 * K and V each stored [ATTP_BN][hd + ATTP_PAD] bf16 in shared memory (the padding puts the 8
 * rows a fragment load touches on distinct banks).
 *
 * Fragment maps of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16", 16-bit
 * types), lane = 4 * grp + tig:
 *   A 16x16 (row-major): register i (0..3) packs (row, col) and (row, col + 1), lower column in
 *                        the low half: row = grp + 8 * (i & 1), col = 2 * tig + 8 * (i >> 1);
 *   B 16x8 (k x n):      register i (0..1) packs (k, n) and (k + 1, n): k = 2 * tig + 8 * i,
 *                        n = grp;
 *   C/D 16x8 fp32:       register i (0..3) is (row, col): row = grp + 8 * (i >> 1),
 *                        col = 2 * tig + (i & 1).
 * S = Q K^T takes A = Q (rows x hd), B(k = dim, n = key) = K[key][dim]: one 32-bit load of two
 * adjacent dims of one key row. O = P V takes A = P, rebuilt from S's C registers of n-tiles
 * 2j, 2j + 1 (same lane: C(row, col) and A(row, col) share grp and tig), and B(k = key,
 * n = dim) = V[key][dim]: two 16-bit loads (keys k, k + 1 of one dim).
 */
#ifndef STRATA_ATTN_PREFILL_LAYOUT_H
#define STRATA_ATTN_PREFILL_LAYOUT_H

#ifdef __CUDACC__
#define ATTP_FN static __host__ __device__ __forceinline__
#else
#define ATTP_FN static inline
#endif

#define ATTP_WARPS 4
#define ATTP_THREADS (32 * ATTP_WARPS)
#define ATTP_ROWS (16 * ATTP_WARPS) /* (token, head) rows per CTA                          */
#define ATTP_BN 64                  /* key positions per K/V tile                          */
#define ATTP_PAD 8                  /* bf16 elements of padding per shared-memory row      */
#define ATTP_MIN_T 16               /* fewer rows: the decode kernel (k_attn_split)        */

/* tokens per CTA for G q heads per kv head (G <= ATTP_ROWS) */
ATTP_FN int attp_tokens_per_cta(int G) { return ATTP_ROWS / G; }

/* CTAs along x for T rows */
ATTP_FN int attp_blocks(int T, int G) { return (T + attp_tokens_per_cta(G) - 1) / attp_tokens_per_cta(G); }

/* Token block of CTA bx: the last block (most keys under the causal mask) is launched first. */
ATTP_FN int attp_block_t0(int bx, int nblk, int G) { return (nblk - 1 - bx) * attp_tokens_per_cta(G); }

/* Shared-memory row stride (bf16 elements) of a K/V tile and bytes of the double-buffered
 * K and V tiles. */
ATTP_FN int attp_ld(int hd) { return hd + ATTP_PAD; }
ATTP_FN int attp_smem_bytes(int hd) { return 2 * 2 * ATTP_BN * attp_ld(hd) * 2; }

/* Row r (0..ATTP_ROWS-1) of the CTA whose first token is t0: token index (clamped to t0 for a
 * row that stores nothing), q head, and whether the row stores. */
ATTP_FN int attp_row_valid(int r, int t0, int T, int G) {
    return r / G < attp_tokens_per_cta(G) && t0 + r / G < T;
}
ATTP_FN int attp_row_token(int r, int t0, int T, int G) { return attp_row_valid(r, t0, T, G) ? t0 + r / G : t0; }
ATTP_FN int attp_row_head(int r, int kvh, int G) { return kvh * G + r % G; }

/* mma.m16n8k16 fragment maps (see the file comment) */
ATTP_FN int attp_a_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }
ATTP_FN int attp_a_col(int lane, int i) { return 2 * (lane & 3) + 8 * (i >> 1); }
ATTP_FN int attp_b_k(int lane, int i) { return 2 * (lane & 3) + 8 * i; }
ATTP_FN int attp_b_n(int lane) { return lane >> 2; }
ATTP_FN int attp_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
ATTP_FN int attp_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

/* Shared-memory element offsets inside one K / V tile (row stride ld):
 * K fragment of S n-tile nt (keys 8nt..8nt+7), k-tile kk (dims 16kk..16kk+15), register i:
 * the first of the two packed bf16 (the second follows it). */
ATTP_FN int attp_k_off(int lane, int nt, int kk, int i, int ld) {
    return (8 * nt + attp_b_n(lane)) * ld + 16 * kk + attp_b_k(lane, i);
}
/* V fragment of P k-tile kt (keys 16kt..16kt+15), O n-tile nd (dims 8nd..8nd+7), register i:
 * offset of the low half (key k); the high half (key k + 1) is one row (ld) further. */
ATTP_FN int attp_v_off(int lane, int kt, int nd, int i, int ld) {
    return (16 * kt + attp_b_k(lane, i)) * ld + 8 * nd + attp_b_n(lane);
}
/* P's A register i of k-tile kt comes from S n-tile 2kt + (i >> 1), C registers
 * 2 * (i & 1) and 2 * (i & 1) + 1. */
ATTP_FN int attp_p_ntile(int kt, int i) { return 2 * kt + (i >> 1); }
ATTP_FN int attp_p_creg(int i) { return 2 * (i & 1); }

#endif
