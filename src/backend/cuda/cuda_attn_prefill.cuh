// cuda_attn_prefill.cuh — tiled causal flash attention for prefill on tensor cores (issue #8,
// "prefill: tiled flash attention with causal mask"). Included by cuda_model.cu after
// cuda_kernels.cuh; the integer layout (rows of a CTA, fragment maps, shared-memory offsets)
// lives in attn_prefill_layout.h, which the host test emulates.
//
// One CTA = ATTP_ROWS (token, q head) rows of one kv head (the G q heads of the kv head for
// ATTP_ROWS / G consecutive tokens), 4 warps of 16 rows. It walks the key positions
// [0, max pos of its tokens] of its slot in tiles of ATTP_BN: K and V tiles are copied into
// shared memory with cp.async (double-buffered: tile j + 1 loads while tile j computes), S =
// Q K^T and O += P V run on mma.m16n8k16 (bf16 in, fp32 accumulate), the softmax is online
// (running max and sum per row, in the exp2 domain) and the causal mask is per row (key
// position <= pos of the row's token). q is fp32 [T, H*hd] after RoPE, rounded to bf16 once
// into registers; P is rounded to bf16 for the second product; the output is fp32
// [T, H*hd] (the layout k_attn_combine writes). Error vs the fp32 CPU op: bf16 rounding of q
// and P (~2^-9 relative each), within the bf16 tolerance 1e-2.
//
// Preconditions (checked by the host before choosing this kernel): every row of the call is
// of one slot at consecutive positions (so every cache row up to a row's position was
// written by this call or an earlier one), hd 64 or 128, G = H / Hkv <= ATTP_ROWS.
#pragma once

#include "attn_prefill_layout.h"

#include <cuda_bf16.h>
#include <stdint.h>

struct attp_args {
    float *out;                   // [T, H*hd] fp32
    const float *q;               // [T, H*hd] fp32, after QK-norm and RoPE
    const __nv_bfloat16 *kc, *vc; // the layer's cache: [n_slots][max_ctx][Hkv*hd] bf16
    const int32_t *pos;           // [T] device
    const int32_t *slot;          // [T] device (one slot for all rows)
    size_t slot_stride;           // elements between slots
    int T, H, Hkv;
    float scale_log2;             // 1/sqrt(hd) * log2(e): scores in the exp2 domain
};

__device__ __forceinline__ uint32_t attp_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); // .x (low half) = lo
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ void attp_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros (positions past the tile
// end: never read from global, and their V rows are exact zeros, so P = 0 times V cannot make
// a NaN out of stale memory)
__device__ __forceinline__ void attp_cp16(void *smem, const void *gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void attp_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void attp_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// K and V rows [kp0, kp0 + ATTP_BN) of the slot (rows > pmax zero-filled) into one buffer
template <int HD>
__device__ __forceinline__ void attp_load_tile(__nv_bfloat16 *ks, __nv_bfloat16 *vs, const __nv_bfloat16 *kg,
                                               const __nv_bfloat16 *vg, int kvd, int kp0, int pmax) {
    constexpr int CH = HD / 8, LD = HD + ATTP_PAD; // 16-byte chunks per row
    for (int c = threadIdx.x; c < ATTP_BN * CH; c += ATTP_THREADS) {
        const int r = c / CH, ch = c % CH, kp = kp0 + r;
        const bool ok = kp <= pmax;
        const size_t src = (size_t)(ok ? kp : 0) * kvd + (size_t)ch * 8;
        attp_cp16(ks + r * LD + ch * 8, kg + src, ok ? 16 : 0);
        attp_cp16(vs + r * LD + ch * 8, vg + src, ok ? 16 : 0);
    }
}

template <int HD> __global__ void __launch_bounds__(ATTP_THREADS, 2) k_attn_prefill(attp_args a) {
    PDL_ENTRY();
    constexpr int LD = HD + ATTP_PAD, KT = HD / 16, ND = HD / 8, NT = ATTP_BN / 8;
    extern __shared__ __align__(16) unsigned char attp_smem[];
    __nv_bfloat16 *const ks = reinterpret_cast<__nv_bfloat16 *>(attp_smem); // [2][ATTP_BN][LD]
    __nv_bfloat16 *const vs = ks + 2 * ATTP_BN * LD;                          // [2][ATTP_BN][LD]
    __shared__ int s_pmax;

    const int G = a.H / a.Hkv, TM = attp_tokens_per_cta(G), kvh = blockIdx.y, kvd = a.Hkv * HD, qd = a.H * HD;
    const int t0 = attp_block_t0((int)blockIdx.x, (int)gridDim.x, G);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tig = lane & 3;

    // the CTA's key range: [0, max pos of its tokens]
    if (threadIdx.x == 0) s_pmax = 0;
    __syncthreads();
    if ((int)threadIdx.x < TM && t0 + (int)threadIdx.x < a.T) atomicMax(&s_pmax, a.pos[t0 + threadIdx.x]);
    __syncthreads();
    const int pmax = s_pmax, ntiles = pmax / ATTP_BN + 1;
    const size_t sbase = (size_t)a.slot[t0] * a.slot_stride + (size_t)kvh * HD;
    const __nv_bfloat16 *kg = a.kc + sbase, *vg = a.vc + sbase;

    // prefetch tile 0 while q is read
    attp_load_tile<HD>(ks, vs, kg, vg, kvd, 0, pmax);
    attp_cp_commit();

    // this thread's two rows: grp and grp + 8 of the warp's 16 (C registers 0-1 / 2-3)
    int tok[2], head[2], rpos[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = warp * 16 + attp_c_row(lane, 2 * h);
        valid[h] = attp_row_valid(r, t0, a.T, G);
        tok[h] = attp_row_token(r, t0, a.T, G);
        head[h] = attp_row_head(r, kvh, G);
        rpos[h] = a.pos[tok[h]];
    }
    const int rmin = min(rpos[0], rpos[1]);
    // Q fragments (bf16): register i holds row attp_a_row (= grp or grp + 8: h = i & 1)
    uint32_t qf[KT][4];
#pragma unroll
    for (int kk = 0; kk < KT; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int h = i & 1, col = 16 * kk + attp_a_col(lane, i);
            const float2 v = *reinterpret_cast<const float2 *>(a.q + (size_t)tok[h] * qd + (size_t)head[h] * HD + col);
            qf[kk][i] = attp_pack_bf16(v.x, v.y);
        }

    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int j = 0; j < ntiles; j++) {
        const int buf = j & 1;
        if (j + 1 < ntiles) {
            attp_load_tile<HD>(ks + (buf ^ 1) * ATTP_BN * LD, vs + (buf ^ 1) * ATTP_BN * LD, kg, vg, kvd,
                               (j + 1) * ATTP_BN, pmax);
            attp_cp_commit();
            attp_cp_wait<1>();
        } else attp_cp_wait<0>();
        __syncthreads();
        const __nv_bfloat16 *kt_s = ks + buf * ATTP_BN * LD, *vt_s = vs + buf * ATTP_BN * LD;

        // S = Q K^T for this tile: NT n-tiles of 8 keys
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t *>(kt_s + attp_k_off(lane, nt, kk, 0, LD));
                const uint32_t b1 = *reinterpret_cast<const uint32_t *>(kt_s + attp_k_off(lane, nt, kk, 1, LD));
                attp_mma(s[nt], qf[kk], b0, b1);
            }
        }
        // scale, causal mask (only tiles that reach past the smallest position of the rows)
        const int kp0 = j * ATTP_BN;
        const bool need_mask = kp0 + ATTP_BN - 1 > rmin;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = s[nt][i] * a.scale_log2;
                if (need_mask && kp0 + 8 * nt + attp_c_col(lane, i) > rpos[i >> 1]) v = -INFINITY;
                s[nt][i] = v;
                mx[i >> 1] = fmaxf(mx[i >> 1], v);
            }
        // online softmax: the 4 lanes of a quad (same grp) hold one row
        float corr[2], mref[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float mn = fmaxf(m[h], mx[h]);
            mref[h] = mn == -INFINITY ? 0.f : mn; // a fully masked row so far (cannot happen: key 0 is in tile 0)
            corr[h] = exp2f(m[h] - mref[h]);      // m = -inf: 0 (o and l are still 0)
            m[h] = mn;
            l[h] *= corr[h];
        }
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            o[nd][0] *= corr[0], o[nd][1] *= corr[0];
            o[nd][2] *= corr[1], o[nd][3] *= corr[1];
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float p = exp2f(s[nt][i] - mref[i >> 1]);
                s[nt][i] = p;
                l[i >> 1] += p;
            }
        // O += P V: P's A fragments come straight from S's registers
#pragma unroll
        for (int kt = 0; kt < ATTP_BN / 16; kt++) {
            uint32_t pa[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float *c = s[attp_p_ntile(kt, i)] + attp_p_creg(i);
                pa[i] = attp_pack_bf16(c[0], c[1]);
            }
#pragma unroll
            for (int nd = 0; nd < ND; nd++) {
                uint32_t b[2];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const unsigned short *v = reinterpret_cast<const unsigned short *>(vt_s + attp_v_off(lane, kt, nd, i, LD));
                    b[i] = (uint32_t)v[0] | ((uint32_t)v[LD] << 16);
                }
                attp_mma(o[nd], pa, b[0], b[1]);
            }
        }
        __syncthreads(); // the next iteration's prefetch overwrites this buffer
    }

    // finish: the row sums over the quad, O / l, fp32 out
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        l[h] = l[h] > 0.f ? 1.0f / l[h] : 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!valid[h]) continue;
        float *orow = a.out + (size_t)tok[h] * qd + (size_t)head[h] * HD + 2 * tig;
#pragma unroll
        for (int nd = 0; nd < ND; nd++)
            *reinterpret_cast<float2 *>(orow + 8 * nd) = make_float2(o[nd][2 * h] * l[h], o[nd][2 * h + 1] * l[h]);
    }
}
