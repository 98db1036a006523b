/* mv56_layout.h — the device layout of MLX affine 5- and 6-bit weights for the integer
 * dot-product (dp4a) matrix-vector kernels of cuda_mv56.cuh: the repack from MLX, the code of one
 * value, and the kernels' integer dot product of a 32-value block. Plain C17 with every function
 * `static inline` (host + device under nvcc), so tests/unit/test_mv56.c checks on the host the
 * same code the GPU runs (dp4a is emulated there as four byte products).
 *
 * Why a different layout: MLX packs a row as one little-endian bit stream, so 5- and 6-bit values
 * straddle words and the fp32 kernel spends ~4 instructions per value unpacking them. Here the
 * 40 (48) bits of every 8 values are rearranged so that plain masks give dp4a operands whose bytes
 * line up with the int8 x words of k_quant_x, which hold per 8 values [x0 x2 x4 x6][x1 x3 x5 x7]:
 *
 *   W plane, one 32-bit word per 8 values (k = 0..3 in a block of 32), byte j (values e = 8k+2j,
 *   o = 8k+2j+1):
 *       5-bit: bits 0-4 = q_e, bits 5-7 = q_o >> 2          (W & 0x1F1F1F1F: the even codes)
 *       6-bit: bits 0-5 = q_e, bits 6-7 = q_o >> 4          (W & 0x3F3F3F3F: the even codes)
 *   H plane, the rest of the odd codes, per block of 32 values:
 *       5-bit: one word; byte j, bits 2k..2k+1 = q_o & 3 of value 8k+2j+1
 *       6-bit: two words; word k/2, byte j, bits 4(k%2)..4(k%2)+3 = q_o & 15 of value 8k+2j+1
 *
 * Planes of one weight (one expert) at a 16-byte aligned base: the W plane first, rows of
 * cols/2 bytes (block c of row r at r*cols/2 + 16c: one 16-byte load), then the H plane, rows of
 * cols*(bits-4)/8 bytes (block c at 4(bits-4)c: one 4- or 8-byte load). Bytes per row stay
 * cols*bits/8, exactly MLX's; experts are mv56_expert_stride apart (rounded up to 16 bytes).
 * Needs cols % 32 == 0 (MLX groups are 32/64/128, so every quantized row qualifies).
 */
#ifndef STRATA_MV56_LAYOUT_H
#define STRATA_MV56_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MV56_FN static __host__ __device__ __forceinline__
#else
#define MV56_FN static inline
#endif

/* bytes of one weight (expert) of rows x cols at `bits`: the same as MLX's packed rows */
MV56_FN size_t mv56_bytes(int bits, int64_t rows, int64_t cols) { return (size_t)rows * (size_t)cols * (size_t)bits / 8; }

/* bytes between experts: mv56_bytes rounded up to 16, so every expert's W plane is aligned */
MV56_FN size_t mv56_expert_stride(int bits, int64_t rows, int64_t cols) {
    return (mv56_bytes(bits, rows, cols) + 15) & ~(size_t)15;
}

/* byte offsets (from the expert's base) of block c of row r in the W and H planes */
MV56_FN size_t mv56_w_off(int64_t cols, int64_t r, int64_t c) { return (size_t)r * (size_t)(cols / 2) + 16 * (size_t)c; }
MV56_FN size_t mv56_h_off(int bits, int64_t rows, int64_t cols, int64_t r, int64_t c) {
    return (size_t)rows * (size_t)(cols / 2) + (size_t)r * (size_t)(cols * (bits - 4) / 8) + 4 * (size_t)(bits - 4) * (size_t)c;
}

/* value v (0..31) of an MLX block: the `bits` words holding 32 values as one little-endian bit
 * stream (value v at bit v * bits) */
MV56_FN uint32_t mv56_mlx_get(const uint32_t *blk, int bits, int v) {
    const int bit = v * bits, wi = bit >> 5, sh = bit & 31;
    uint32_t x = blk[wi] >> sh;
    if (sh + bits > 32) x |= blk[wi + 1] << (32 - sh);
    return x & ((1u << bits) - 1u);
}

/* Repacks one block of 32 values from MLX (`bits` words at mlx) into its 4 W-plane words (w) and
 * bits - 4 H-plane words (h). bits: 5 or 6. */
MV56_FN void mv56_pack_block(int bits, const uint32_t *mlx, uint32_t *w, uint32_t *h) {
    h[0] = 0;
    if (bits == 6) h[1] = 0;
    for (int k = 0; k < 4; k++) {
        uint32_t wk = 0;
        for (int j = 0; j < 4; j++) {
            const uint32_t qe = mv56_mlx_get(mlx, bits, 8 * k + 2 * j), qo = mv56_mlx_get(mlx, bits, 8 * k + 2 * j + 1);
            uint32_t byte;
            if (bits == 5) {
                byte = qe | (qo >> 2) << 5;
                h[0] |= (qo & 3u) << (8 * j + 2 * k);
            } else {
                byte = qe | (qo >> 4) << 6;
                h[k >> 1] |= (qo & 15u) << (8 * j + 4 * (k & 1));
            }
            wk |= byte << (8 * j);
        }
        w[k] = wk;
    }
}

/* Repacks block c of row r (of rows x cols) from its `bits` MLX words at src into the planes
 * of the expert whose base is dst. What the device repack kernel runs per thread. */
MV56_FN void mv56_pack_at(int bits, int64_t rows, int64_t cols, const uint32_t *src, char *dst, int64_t r, int64_t c) {
    mv56_pack_block(bits, src, (uint32_t *)(dst + mv56_w_off(cols, r, c)), (uint32_t *)(dst + mv56_h_off(bits, rows, cols, r, c)));
}

/* Work item i of repacking rows [r0, r0 + n) of an expert of rows x cols whose MLX rows (row r0
 * first, cols * bits / 32 words each) are at mlx: block i % (cols / 32) of row r0 + i / (cols / 32),
 * written into the planes of the expert at dst. k_mv56_pack runs one per thread. */
MV56_FN void mv56_pack_item(int bits, int64_t rows, int64_t cols, const uint32_t *mlx, int64_t r0, int64_t i, char *dst) {
    const int64_t nb = cols / 32, r = i / nb, c = i % nb;
    mv56_pack_at(bits, rows, cols, mlx + (size_t)r * (size_t)(cols * bits / 32) + (size_t)c * (size_t)bits, dst, r0 + r, c);
}

/* Host: repacks a whole expert (rows of cols * bits / 32 MLX words at mlx) into dst
 * (mv56_bytes bytes). */
MV56_FN void mv56_pack(int bits, int64_t rows, int64_t cols, const uint32_t *mlx, char *dst) {
    for (int64_t i = 0; i < rows * (cols / 32); i++) mv56_pack_item(bits, rows, cols, mlx, 0, i, dst);
}

/* The code of value v (0..31) of a block from its W words (w[4]) and H words (h[bits - 4]). */
MV56_FN uint32_t mv56_code(int bits, const uint32_t *w, const uint32_t *h, int v) {
    const int k = v >> 3, j = (v & 7) >> 1;
    const uint32_t byte = (w[k] >> (8 * j)) & 0xFFu;
    if (!(v & 1)) return byte & (bits == 5 ? 0x1Fu : 0x3Fu);
    if (bits == 5) return (byte >> 5) << 2 | ((h[0] >> (8 * j + 2 * k)) & 3u);
    return (byte >> 6) << 4 | ((h[k >> 1] >> (8 * j + 4 * (k & 1))) & 15u);
}

/* c + the dot product of the 4 unsigned bytes of a with the 4 signed bytes of b (PTX
 * dp4a.u32.s32 on the device; four byte products on the host) */
MV56_FN int32_t mv56_dp4a(uint32_t a, uint32_t b, int32_t c) {
#ifdef __CUDA_ARCH__
    int32_t d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    int32_t s = c;
    for (int i = 0; i < 4; i++) {
        const int32_t ab = (int32_t)((a >> (8 * i)) & 0xFFu), bb = (int32_t)((b >> (8 * i)) & 0xFFu);
        s += ab * (bb >= 128 ? bb - 256 : bb);
    }
    return s;
#endif
}

/* sum over a block of 32 values of q_v * x_v, x as k_quant_x stores it (8 words: per 8 values
 * [x0 x2 x4 x6] then [x1 x3 x5 x7], int8). 5-bit: the even codes dot their x words directly; the
 * odd codes' top 3 bits come 32x too large (>> 3 gives their weight 4) and the H fields of group
 * k come 4^k too large; every partial sum is an exact multiple of its scale, so the arithmetic
 * shifts are exact (nvcc and the host compilers shift signed ints arithmetically). 12 masks,
 * 12 dp4a and ~6 to combine: ~30 instructions per 32 values (4-bit: 18). */
MV56_FN int32_t mv56_dot32_5(const uint32_t *w, uint32_t h, const uint32_t *x) {
    int32_t e = 0, t8 = 0;
    for (int k = 0; k < 4; k++) {
        e = mv56_dp4a(w[k] & 0x1F1F1F1Fu, x[2 * k], e);
        t8 = mv56_dp4a(w[k] & 0xE0E0E0E0u, x[2 * k + 1], t8);
    }
    e = mv56_dp4a(h & 0x03030303u, x[1], e);
    const int32_t a4 = mv56_dp4a(h & 0x0C0C0C0Cu, x[3], 0), a16 = mv56_dp4a(h & 0x30303030u, x[5], 0),
                  a64 = mv56_dp4a(h & 0xC0C0C0C0u, x[7], 0);
    return e + (t8 >> 3) + (a4 >> 2) + (a16 >> 4) + (a64 >> 6);
}

/* 6-bit: the odd codes' top 2 bits come 4x too large (64 q / 16), the high nibbles of the H
 * words 16x; 12 masks, 12 dp4a and 3 to combine: ~27 instructions per 32 values. */
MV56_FN int32_t mv56_dot32_6(const uint32_t *w, const uint32_t *h, const uint32_t *x) {
    int32_t e = 0, t4 = 0;
    for (int k = 0; k < 4; k++) {
        e = mv56_dp4a(w[k] & 0x3F3F3F3Fu, x[2 * k], e);
        t4 = mv56_dp4a(w[k] & 0xC0C0C0C0u, x[2 * k + 1], t4);
    }
    e = mv56_dp4a(h[0] & 0x0F0F0F0Fu, x[1], e);
    e = mv56_dp4a(h[1] & 0x0F0F0F0Fu, x[5], e);
    int32_t s16 = mv56_dp4a(h[0] & 0xF0F0F0F0u, x[3], 0);
    s16 = mv56_dp4a(h[1] & 0xF0F0F0F0u, x[7], s16);
    return e + (t4 >> 2) + (s16 >> 4);
}

#endif
