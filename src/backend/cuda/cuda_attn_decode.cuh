// cuda_attn_decode.cuh — decode attention on tensor cores: one CTA per (row t, kv head, split)
// computes the G = H / Hkv query heads that share the kv head together, so each K/V row is read
// from DRAM once per step (k_attn_split read it G times), with bf16 mma.sync m16n8k16 for both
// Q K^T and P V. Included by cuda_model.cu after cuda_kernels.cuh (uses its warp helpers and the
// partial layout of k_attn_combine).
//
// Layout of one warp's work (a tile of 16 positions p .. p+15 of the CTA's chunk):
//   S[16 x 16]  = Q[16 x HD] * K^T: M = query heads (rows >= G are zero), N = positions, K = dims.
//                 The dims are visited in a permuted order so that lane (g = lane/4, t = lane%4)
//                 feeds its B fragment from one 16-byte load K[pos][32s + 8t .. +7]; the Q (A)
//                 fragments are built once per CTA in the same order (a dot product does not
//                 care about the order of its terms).
//   O[16 x HD] += P[16 x 16] * V[16 x HD]: P comes straight from S's accumulator registers
//                 (bf16), V's B fragments from 16-byte loads V[pos][64h + 8g .. +7] of two
//                 positions merged with byte permutes; n-tile J = 8h + j holds the dims
//                 64h + 8n + j (n = 0..7), undone when O is written.
// Online softmax per warp in fp32 (l kept per lane, reduced once at the end); the 4 warps of a
// CTA merge through shared memory and write one partial (o unnormalised, m, l) per query head
// in k_attn_combine's layout. Positions at or beyond the row's length are masked (-inf) and
// their loads clamped to the last valid position (finite values, never NaN * 0).
//
// Splits are chosen on the device from the row's length n = pos[t] + 1 (a captured graph
// serves every position): about `target` CTAs over the grid's T * Hkv units, chunks of >= 64
// positions in multiples of 16; CTAs of unused splits write the -inf marker k_attn_combine
// stops at.
#pragma once

#define AT2_WARPS 4

__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

__device__ __forceinline__ uint32_t u4w(const uint4 &v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Active splits and chunk length for a row of n positions: ~target CTAs over `units` rows x kv
// heads, chunks >= 64 positions (one 16-position tile per warp) in multiples of 16.
__device__ __forceinline__ int at2_splits(int n, int nsplit, int units, int target, int *chunk) {
    int s = min(nsplit, max(1, (target + units - 1) / units));
    int c = (n + s - 1) / s;
    c = max(64, (c + 15) & ~15);
    *chunk = c;
    return (n + c - 1) / c;
}

// part [T*H, nsplit, HD + 2] (row = t*H + h): per split o (unnormalised), m, l. q [T, H*HD] fp32
// after RoPE; kc/vc the bf16 caches of this layer ([slots][max_ctx][Hkv*HD] at slot_stride).
// Grid (T * Hkv, nsplit), AT2_WARPS * 32 threads; requires H % Hkv == 0 and G = H / Hkv <= 16.
template <int HD>
__global__ void __launch_bounds__(AT2_WARPS * 32)
    k_attn_gqa_mma(float *part, const float *q, const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, const int32_t *pos,
                   const int32_t *slot, int H, int Hkv, float scale, size_t slot_stride, int nsplit, int target) {
    static_assert(HD % 64 == 0 && HD <= 128, "head_dim 64 or 128");
    constexpr int KS = HD / 16, NT = HD / 8, HV = HD / 64;
    __shared__ float so[AT2_WARPS][16][HD + 1];
    __shared__ float sm[AT2_WARPS][16], sl[AT2_WARPS][16];
    const int G = H / Hkv;
    const int t = blockIdx.x / Hkv, kvh = blockIdx.x % Hkv, split = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    // pos / slot were written before the previous kernel started (the step's input, or the last
    // step's k_advance), so they may be read before the PDL wait: the chunk's K/V rows are
    // prefetched into L2 while the previous kernel (RoPE + KV store) drains. L2 is the point of
    // coherence, so the row that kernel is writing cannot be seen stale through the prefetch.
    const int n = pos[t] + 1;
    int chunk;
    const int s_act = at2_splits(n, nsplit, gridDim.x, target, &chunk);
    if (split < s_act) {
        constexpr int LPR = HD * 2 / 128; // 128-byte lines per position and kv head
        const int a0 = split * chunk, a1 = min(n, a0 + chunk);
        const size_t kvd = (size_t)Hkv * HD, sb = (size_t)slot[t] * slot_stride + (size_t)kvh * HD;
        for (int i = threadIdx.x; i < 2 * (a1 - a0) * LPR; i += blockDim.x) {
            const int which = i & 1, li = i >> 1, p = a0 + li / LPR;
            prefetch_l2((which ? vc : kc) + sb + (size_t)p * kvd + (size_t)(li % LPR) * 64);
        }
    }
    PDL_ENTRY();
    const size_t row0 = (size_t)t * H + (size_t)kvh * G; // first query head row of this kv head
    if (split >= s_act) {
        for (int r = threadIdx.x; r < G; r += blockDim.x) part[((row0 + r) * nsplit + split) * (HD + 2) + HD] = -INFINITY;
        return;
    }
    const int p0 = split * chunk, p1 = min(n, p0 + chunk);
    const size_t kvd = (size_t)Hkv * HD;

    // Q fragments (scaled, bf16) in the permuted dim order
    uint32_t qa[KS][4];
    {
        const float *q0 = q + row0 * HD;
#pragma unroll
        for (int s = 0; s < HD / 32; s++) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int d = 32 * s + 8 * tq + 4 * u;
                float4 r0 = make_float4(0.f, 0.f, 0.f, 0.f), r1 = r0;
                if (g < G) r0 = *(const float4 *)(q0 + (size_t)g * HD + d);
                if (g + 8 < G) r1 = *(const float4 *)(q0 + (size_t)(g + 8) * HD + d);
                qa[2 * s + u][0] = pack_bf16(r0.x * scale, r0.y * scale);
                qa[2 * s + u][1] = pack_bf16(r1.x * scale, r1.y * scale);
                qa[2 * s + u][2] = pack_bf16(r0.z * scale, r0.w * scale);
                qa[2 * s + u][3] = pack_bf16(r1.z * scale, r1.w * scale);
            }
        }
    }
    const __nv_bfloat16 *kb = kc + (size_t)slot[t] * slot_stride + (size_t)kvh * HD;
    const __nv_bfloat16 *vb = vc + (size_t)slot[t] * slot_stride + (size_t)kvh * HD;
    float oc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) oc[j][0] = oc[j][1] = oc[j][2] = oc[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f; // rows g and g + 8

    for (int pt = p0 + warp * 16; pt < p1; pt += AT2_WARPS * 16) {
        // all loads of the tile first: K rows pt + g, pt + 8 + g; V rows pt + 2tq + {0, 1, 8, 9}
        uint4 kr[2][HD / 32], vr[4][HV];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const int pp = min(pt + 8 * nt + g, n - 1);
#pragma unroll
            for (int s = 0; s < HD / 32; s++) kr[nt][s] = __ldg((const uint4 *)(kb + (size_t)pp * kvd + 32 * s + 8 * tq));
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int pp = min(pt + 2 * tq + (i & 1) + 8 * (i >> 1), n - 1);
#pragma unroll
            for (int h = 0; h < HV; h++) vr[i][h] = __ldg((const uint4 *)(vb + (size_t)pp * kvd + 64 * h + 8 * g));
        }
        // S = Q K^T
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
            for (int s = 0; s < HD / 32; s++) {
                mma_bf16_16816(sc[nt], qa[2 * s], kr[nt][s].x, kr[nt][s].y);
                mma_bf16_16816(sc[nt], qa[2 * s + 1], kr[nt][s].z, kr[nt][s].w);
            }
        }
        // mask, online softmax (rows g: sc[.][0..1], g + 8: sc[.][2..3])
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool ok = pt + 8 * nt + 2 * tq + e < p1;
                sc[nt][e] = ok ? sc[nt][e] : -INFINITY;
                sc[nt][2 + e] = ok ? sc[nt][2 + e] : -INFINITY;
                mx0 = fmaxf(mx0, sc[nt][e]);
                mx1 = fmaxf(mx1, sc[nt][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1); // finite: every tile has >= 1 valid position
        const float c0 = __expf(m0 - n0), c1 = __expf(m1 - n1);
        m0 = n0, m1 = n1;
        l0 *= c0, l1 *= c1;
#pragma unroll
        for (int j = 0; j < NT; j++) oc[j][0] *= c0, oc[j][1] *= c0, oc[j][2] *= c1, oc[j][3] *= c1;
        float pe[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            pe[nt][0] = __expf(sc[nt][0] - n0), pe[nt][1] = __expf(sc[nt][1] - n0);
            pe[nt][2] = __expf(sc[nt][2] - n1), pe[nt][3] = __expf(sc[nt][3] - n1);
            l0 += pe[nt][0] + pe[nt][1], l1 += pe[nt][2] + pe[nt][3];
        }
        uint32_t pa[4] = {pack_bf16(pe[0][0], pe[0][1]), pack_bf16(pe[0][2], pe[0][3]), pack_bf16(pe[1][0], pe[1][1]),
                          pack_bf16(pe[1][2], pe[1][3])};
        // O += P V
#pragma unroll
        for (int h = 0; h < HV; h++) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const unsigned sel = (j & 1) ? 0x7632u : 0x5410u;
                const uint32_t b0 = __byte_perm(u4w(vr[0][h], j >> 1), u4w(vr[1][h], j >> 1), sel);
                const uint32_t b1 = __byte_perm(u4w(vr[2][h], j >> 1), u4w(vr[3][h], j >> 1), sel);
                mma_bf16_16816(oc[8 * h + j], pa, b0, b1);
            }
        }
    }
    // per-warp results to shared memory (rows < G only), then merge the warps
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if (tq == 0) {
        sm[warp][g] = m0, sl[warp][g] = l0;
        sm[warp][g + 8] = m1, sl[warp][g + 8] = l1;
    }
#pragma unroll
    for (int h = 0; h < HV; h++) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int d0 = 64 * h + 8 * (2 * tq) + j, d1 = d0 + 8;
            so[warp][g][d0] = oc[8 * h + j][0], so[warp][g][d1] = oc[8 * h + j][1];
            so[warp][g + 8][d0] = oc[8 * h + j][2], so[warp][g + 8][d1] = oc[8 * h + j][3];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        const int r = i / HD, d = i % HD;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++) M = fmaxf(M, sm[w][r]);
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < AT2_WARPS; w++)
            if (sm[w][r] != -INFINITY) acc += so[w][r][d] * __expf(sm[w][r] - M);
        part[((row0 + r) * nsplit + split) * (HD + 2) + d] = acc;
    }
    if (threadIdx.x < G) {
        const int r = threadIdx.x;
        float M = -INFINITY, L = 0.f;
        for (int w = 0; w < AT2_WARPS; w++) M = fmaxf(M, sm[w][r]);
        for (int w = 0; w < AT2_WARPS; w++)
            if (sm[w][r] != -INFINITY) L += sl[w][r] * __expf(sm[w][r] - M);
        float *o = part + ((row0 + r) * nsplit + split) * (HD + 2);
        o[HD] = M, o[HD + 1] = L;
    }
}
