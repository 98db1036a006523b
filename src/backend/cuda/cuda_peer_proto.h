/* cuda_peer_proto.h — the integer arithmetic of the one-shot peer all-reduce (cuda_peer.cuh):
 * epochs, slots, buffer offsets, the split of a message into blocks and the error word. Plain
 * C so that the host unit test (tests/unit/test_cuda_peer.c) checks the very functions the
 * kernel uses; under nvcc they are __host__ __device__.
 *
 * Per rank, in that rank's device memory:
 *   recv  [2][n_ranks][stride] fp32   slot s, source rank p: what p pushed in a call of parity s
 *   flags [n_ranks][max_chunks] u32   epoch of the last call whose block `chunk` p has pushed
 *   state [4] u32                     [0] epoch of the last completed call (0: none), [1] blocks
 *                                     done in the current call, [2] error word (0: none)
 * Call k (k = 0, 1, ...) of a rank has epoch e = k + 1 (after 2^32 - 1 calls the sequence goes
 * on at 2, see cuda_peer_epoch_of; e is never 0, the flags' initial value) and uses slot e & 1.
 */
#ifndef STRATA_CUDA_PEER_PROTO_H
#define STRATA_CUDA_PEER_PROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define CUDA_PEER_HD static inline __host__ __device__
#else
#define CUDA_PEER_HD static inline
#endif

#define CUDA_PEER_THREADS 512   /* threads per block of the all-reduce kernel               */
#define CUDA_PEER_PER_THREAD 2  /* quanta (4 floats when vectorised) per thread per block    */
#define CUDA_PEER_MAX_CHUNKS 64 /* blocks (= flags per source) of one call                   */

#define CUDA_PEER_STATE_CTR 0
#define CUDA_PEER_STATE_DONE 1
#define CUDA_PEER_STATE_ERR 2
#define CUDA_PEER_STATE_WORDS 4

/* The epoch of the call after the one of epoch `last` (0 before the first call): last + 1,
 * except that after 0xffffffff comes 2, not 0 (0 means "poisoned" to cuda_peer_begin and is the
 * flags' initial value) and not 1 (the slot parity must keep alternating). */
CUDA_PEER_HD uint32_t cuda_peer_epoch_of(uint32_t last) {
    uint32_t e = last + 1u;
    return e ? e : 2u;
}

/* Receive slot of epoch e: consecutive calls alternate. */
CUDA_PEER_HD uint32_t cuda_peer_slot_of(uint32_t e) { return e & 1u; }

/* Whether a flag holding `flag` shows that epoch e has been pushed: flag >= e modulo 2^32 (a
 * peer is never more than one call ahead, so the signed distance never overflows). */
CUDA_PEER_HD int cuda_peer_flag_reached(uint32_t flag, uint32_t e) { return (int32_t)(flag - e) >= 0; }

/* Floats per (slot, source) row of the receive buffer: max_floats rounded up to 32 floats
 * (128 bytes), so every row starts 16-byte aligned for float4 stores. */
CUDA_PEER_HD size_t cuda_peer_stride(size_t max_floats) { return (max_floats + 31) & ~(size_t)31; }

/* Offset in floats of row (slot, src) in a receive buffer. */
CUDA_PEER_HD size_t cuda_peer_recv_offset(uint32_t slot, int src, int n_ranks, size_t stride) {
    return ((size_t)slot * (size_t)n_ranks + (size_t)src) * stride;
}

/* Index of flag (src, chunk) in a flags array. */
CUDA_PEER_HD int cuda_peer_flag_index(int src, int chunk, int max_chunks) { return src * max_chunks + chunk; }

/* Blocks (chunks) for a message of n floats: one per CUDA_PEER_THREADS * CUDA_PEER_PER_THREAD
 * quanta (4 floats each when vec), at least 1, at most max_chunks. Depends only on n, so every
 * rank launches the same grid. */
CUDA_PEER_HD int cuda_peer_n_chunks(size_t n, int vec, int max_chunks) {
    size_t q = vec ? 4 : 1, quanta = (n + q - 1) / q, per = (size_t)CUDA_PEER_THREADS * CUDA_PEER_PER_THREAD;
    size_t c = (quanta + per - 1) / per;
    if (c < 1) c = 1;
    if (c > (size_t)max_chunks) c = (size_t)max_chunks;
    return (int)c;
}

/* Elements [*begin, *end) of chunk `chunk` of n_chunks: whole quanta of 4 floats when vec (so
 * begin is a multiple of 4 and float4 accesses from 16-byte aligned bases stay aligned), the
 * remainder of n in the last non-empty chunk; chunks past the data are empty. */
CUDA_PEER_HD void cuda_peer_chunk_range(size_t n, int n_chunks, int chunk, int vec, size_t *begin, size_t *end) {
    size_t q = vec ? 4 : 1, quanta = (n + q - 1) / q;
    size_t per = (quanta + (size_t)n_chunks - 1) / (size_t)n_chunks;
    size_t b = (size_t)chunk * per * q, e = ((size_t)chunk + 1) * per * q;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

/* The error word: bit 0 timeout, bits 8..15 the rank waited for, bits 16..31 the block. */
#define CUDA_PEER_ERR_TIMEOUT 1u
CUDA_PEER_HD uint32_t cuda_peer_err_encode(int peer, int chunk) {
    return CUDA_PEER_ERR_TIMEOUT | ((uint32_t)(peer & 0xff) << 8) | ((uint32_t)(chunk & 0xffff) << 16);
}
CUDA_PEER_HD int cuda_peer_err_peer(uint32_t w) { return (int)((w >> 8) & 0xff); }
CUDA_PEER_HD int cuda_peer_err_chunk(uint32_t w) { return (int)(w >> 16); }

#endif
