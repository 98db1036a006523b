/* test_cuda_peer.c — the one-shot peer all-reduce's arithmetic and protocol, on the host (no
 * GPU needed). The integer helpers are the kernel's own (src/backend/cuda/cuda_peer_proto.h):
 * the split of a message into blocks covers it exactly with float4-aligned starts, receive rows
 * and flags never overlap, epochs alternate slots and compare correctly across the 2^32 wrap,
 * the error word round-trips. Then the protocol of cuda_peer.cuh — push into the peer's slot of
 * the call's parity, release a flag per (source, block), acquire-wait, sum in rank order,
 * advance the counter — runs with one thread per rank and random timing over thousands of calls
 * (also across the epoch wrap); every call's data differ, so a slot overwritten before its
 * reader finished shows as a wrong sum. A negative control runs the same with ONE slot and a
 * slow reader and must see such corruption: the check can fail. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backend/cuda/cuda_peer_proto.h"
#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_comm.h"
#endif

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------------------------ */
/* arithmetic                                                                                 */

static void check_split(size_t n, int vec, int max_chunks) {
    int c = cuda_peer_n_chunks(n, vec, max_chunks);
    assert_true(c >= 1 && c <= max_chunks);
    size_t q = vec ? 4 : 1, quanta = (n + q - 1) / q;
    /* below the cap, a block carries at most THREADS * PER_THREAD quanta, and one fewer block would not do */
    if (c < max_chunks) {
        assert_true(quanta <= (size_t)c * CUDA_PEER_THREADS * CUDA_PEER_PER_THREAD);
        if (c > 1) assert_true(quanta > (size_t)(c - 1) * CUDA_PEER_THREADS * CUDA_PEER_PER_THREAD);
    }
    size_t next = 0;
    for (int k = 0; k < c; k++) {
        size_t b, e;
        cuda_peer_chunk_range(n, c, k, vec, &b, &e);
        assert_true(b <= e);
        assert_true(e <= n);
        if (b < e) {
            assert_int_equal(b, next); /* contiguous, no overlap, no gap */
            if (vec) assert_int_equal(b % 4, 0);
            if (vec && e < n) assert_int_equal((e - b) % 4, 0);
            next = e;
        } else {
            assert_int_equal(b, n); /* empty chunks only past the data */
        }
    }
    assert_int_equal(next, n);
}

static void test_split(void **state) {
    (void)state;
    for (size_t n = 1; n <= 3000; n++) {
        check_split(n, 1, CUDA_PEER_MAX_CHUNKS);
        check_split(n, 0, CUDA_PEER_MAX_CHUNKS);
        check_split(n, 1, 3);
    }
    const size_t big[] = {1536, 3072, 6144, 12288, 24576, 49152, 49153, 49155, 1u << 20, (1u << 20) + 7, 3072 * 8};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        check_split(big[i], 1, CUDA_PEER_MAX_CHUNKS);
        check_split(big[i], 0, CUDA_PEER_MAX_CHUNKS);
        check_split(big[i], 1, 1);
    }
    /* the kernel always splits with vec = 1, whatever its access width: the grid depends on n only */
    assert_int_equal(cuda_peer_n_chunks(3072, 1, 64), 1);
    assert_int_equal(cuda_peer_n_chunks(49152, 1, 64), 12);
    assert_int_equal(cuda_peer_n_chunks(1u << 22, 1, 64), 64);
}

static void test_layout(void **state) {
    (void)state;
    const size_t maxes[] = {1, 31, 32, 33, 1536, 3073, 49152};
    for (size_t i = 0; i < sizeof maxes / sizeof maxes[0]; i++) {
        size_t st = cuda_peer_stride(maxes[i]);
        assert_true(st >= maxes[i]);
        assert_true(st < maxes[i] + 32);
        assert_int_equal(st % 32, 0);
        for (int n = 1; n <= 8; n++) {
            /* rows (slot, src) tile [0, 2 n stride) exactly in stride steps */
            unsigned char seen[2 * 8] = {0};
            for (uint32_t s = 0; s < 2; s++)
                for (int p = 0; p < n; p++) {
                    size_t off = cuda_peer_recv_offset(s, p, n, st);
                    assert_int_equal(off % st, 0);
                    assert_true(off + st <= 2 * (size_t)n * st);
                    assert_int_equal(seen[off / st], 0);
                    seen[off / st] = 1;
                }
            /* flags (src, chunk) are distinct indices of [0, n max_chunks) */
            static unsigned char fseen[8 * CUDA_PEER_MAX_CHUNKS];
            memset(fseen, 0, sizeof fseen);
            for (int p = 0; p < n; p++)
                for (int c = 0; c < CUDA_PEER_MAX_CHUNKS; c++) {
                    int ix = cuda_peer_flag_index(p, c, CUDA_PEER_MAX_CHUNKS);
                    assert_true(ix >= 0 && ix < n * CUDA_PEER_MAX_CHUNKS);
                    assert_int_equal(fseen[ix], 0);
                    fseen[ix] = 1;
                }
        }
    }
}

static void test_epochs(void **state) {
    (void)state;
    /* a fresh group: flags 0, first epoch 1, not yet raised */
    assert_int_equal(cuda_peer_epoch_of(0), 1);
    assert_false(cuda_peer_flag_reached(0, 1));
    /* walk across the wrap: never 0, slots alternate, the previous epoch is "not reached" and
     * the next one "reached" for the current one (the window a waiter can see) */
    uint32_t e = 0xfffffff0u;
    for (int k = 0; k < 40; k++) {
        uint32_t n1 = cuda_peer_epoch_of(e), n2 = cuda_peer_epoch_of(n1);
        assert_int_not_equal(n1, 0);
        assert_int_not_equal(cuda_peer_slot_of(n1), cuda_peer_slot_of(e));
        assert_true(cuda_peer_flag_reached(n1, n1));
        assert_true(cuda_peer_flag_reached(n2, n1));
        assert_false(cuda_peer_flag_reached(e, n1));
        e = n1;
    }
    assert_int_equal(cuda_peer_epoch_of(0xfffffffeu), 0xffffffffu);
    assert_int_equal(cuda_peer_epoch_of(0xffffffffu), 2);
    /* error word */
    for (int p = 0; p < 8; p++)
        for (int c = 0; c < CUDA_PEER_MAX_CHUNKS; c += 7) {
            uint32_t w = cuda_peer_err_encode(p, c);
            assert_true(w & CUDA_PEER_ERR_TIMEOUT);
            assert_int_equal(cuda_peer_err_peer(w), p);
            assert_int_equal(cuda_peer_err_chunk(w), c);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* protocol simulation: a thread per rank                                                     */

#define SIM_MAX_RANKS 4
#define SIM_CHUNKS 5
#define SIM_N 203 /* floats per message: a ragged last chunk */

typedef struct sim {
    int n_ranks, slots, calls, slow_reader;
    uint32_t start_epoch;
    size_t stride;
    /* per rank, as in device memory; data words are relaxed atomics (float bits) */
    _Atomic uint32_t *recv[SIM_MAX_RANKS];  /* [2][n][stride] */
    _Atomic uint32_t flags[SIM_MAX_RANKS][SIM_MAX_RANKS * SIM_CHUNKS];
    uint32_t ctr[SIM_MAX_RANKS];
    atomic_long wrong, timeouts;
} sim;

typedef struct sim_rank {
    sim *s;
    int r;
    uint64_t rng;
} sim_rank;

static float sim_value(int r, uint32_t e, size_t i) { return (float)((int)((i * 7 + (size_t)r * 13 + e * 5) % 23) - 11); }

static uint32_t sim_rand(sim_rank *sr) {
    sr->rng ^= sr->rng << 13, sr->rng ^= sr->rng >> 7, sr->rng ^= sr->rng << 17;
    return (uint32_t)(sr->rng >> 16);
}

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static double sim_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *sim_rank_main(void *arg) {
    sim_rank *sr = arg;
    sim *s = sr->s;
    const int r = sr->r, n = s->n_ranks;
    float x[SIM_N];
    for (int call = 0; call < s->calls; call++) {
        const uint32_t e = cuda_peer_epoch_of(s->ctr[r]);
        const uint32_t slot = s->slots == 2 ? cuda_peer_slot_of(e) : 0;
        for (size_t i = 0; i < SIM_N; i++) x[i] = sim_value(r, e, i);
        /* every block pushes and signals (blocks run concurrently on a GPU: all pushes may
         * precede any wait), in a random order */
        int order[SIM_CHUNKS];
        for (int c = 0; c < SIM_CHUNKS; c++) order[c] = c;
        for (int c = SIM_CHUNKS - 1; c > 0; c--) {
            int j = (int)(sim_rand(sr) % (uint32_t)(c + 1)), t = order[c];
            order[c] = order[j], order[j] = t;
        }
        for (int oc = 0; oc < SIM_CHUNKS; oc++) {
            const int c = order[oc];
            size_t b, end;
            cuda_peer_chunk_range(SIM_N, SIM_CHUNKS, c, 1, &b, &end);
            const size_t row = cuda_peer_recv_offset(slot, r, n, s->stride);
            for (int p = 0; p < n; p++) {
                if (p == r) continue;
                for (size_t i = b; i < end; i++) atomic_store_explicit(&s->recv[p][row + i], f2u(x[i]), memory_order_relaxed);
                atomic_store_explicit(&s->flags[p][cuda_peer_flag_index(r, c, SIM_CHUNKS)], e, memory_order_release);
            }
            if (sim_rand(sr) % 4 == 0) sched_yield();
        }
        /* every block waits for its peers' blocks, then sums in rank order */
        for (int oc = 0; oc < SIM_CHUNKS; oc++) {
            const int c = order[(oc + 2) % SIM_CHUNKS];
            size_t b, end;
            cuda_peer_chunk_range(SIM_N, SIM_CHUNKS, c, 1, &b, &end);
            int bad = 0;
            for (int p = 0; p < n && !bad; p++) {
                if (p == r) continue;
                const double t0 = sim_now();
                while (!cuda_peer_flag_reached(
                    atomic_load_explicit(&s->flags[r][cuda_peer_flag_index(p, c, SIM_CHUNKS)], memory_order_acquire), e)) {
                    if (sim_now() - t0 > 5.0) {
                        atomic_fetch_add(&s->timeouts, 1);
                        bad = 1;
                        break;
                    }
                    sched_yield();
                }
            }
            if (bad) return NULL;
            if (s->slow_reader && r == 1) {
                struct timespec d = {0, 3 * 1000 * 1000};
                nanosleep(&d, NULL);
            }
            for (size_t i = b; i < end; i++) {
                float acc = 0, want = 0;
                for (int p = 0; p < n; p++) {
                    const float t = p == r ? x[i]
                                           : u2f(atomic_load_explicit(
                                                 &s->recv[r][cuda_peer_recv_offset(slot, p, n, s->stride) + i],
                                                 memory_order_relaxed));
                    acc = p == 0 ? t : acc + t;
                    want = p == 0 ? sim_value(p, e, i) : want + sim_value(p, e, i);
                }
                if (acc != want) atomic_fetch_add(&s->wrong, 1);
            }
        }
        s->ctr[r] = e; /* the last block advances the counter; the next call reads it */
    }
    return NULL;
}

/* Runs the simulation; returns the number of wrong sums (timeouts fail the test). */
static long sim_run(int n_ranks, int slots, int calls, int slow_reader, uint32_t start_epoch) {
    sim *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->n_ranks = n_ranks, s->slots = slots, s->calls = calls, s->slow_reader = slow_reader;
    s->stride = cuda_peer_stride(SIM_N);
    for (int r = 0; r < n_ranks; r++) {
        s->recv[r] = calloc(2 * (size_t)n_ranks * s->stride, sizeof(_Atomic uint32_t));
        assert_non_null(s->recv[r]);
        /* as if start_epoch calls had completed everywhere (flags hold the last epoch) */
        s->ctr[r] = start_epoch;
        for (int i = 0; i < SIM_MAX_RANKS * SIM_CHUNKS; i++) atomic_init(&s->flags[r][i], start_epoch);
    }
    atomic_init(&s->wrong, 0);
    atomic_init(&s->timeouts, 0);
    pthread_t th[SIM_MAX_RANKS];
    sim_rank sr[SIM_MAX_RANKS];
    for (int r = 0; r < n_ranks; r++) {
        sr[r].s = s, sr[r].r = r, sr[r].rng = 0x9E3779B97F4A7C15ull * (uint64_t)(r + 1);
        assert_int_equal(pthread_create(&th[r], NULL, sim_rank_main, &sr[r]), 0);
    }
    for (int r = 0; r < n_ranks; r++) pthread_join(th[r], NULL);
    assert_int_equal(atomic_load(&s->timeouts), 0);
    for (int r = 0; r < n_ranks; r++) {
        uint32_t want = start_epoch;
        for (int k = 0; k < calls; k++) want = cuda_peer_epoch_of(want);
        assert_int_equal(s->ctr[r], want); /* every rank completed every call */
    }
    long wrong = atomic_load(&s->wrong);
    for (int r = 0; r < n_ranks; r++) free(s->recv[r]);
    free(s);
    return wrong;
}

static void test_protocol(void **state) {
    (void)state;
    assert_int_equal(sim_run(2, 2, 3000, 0, 0), 0);
    assert_int_equal(sim_run(3, 2, 2000, 0, 0), 0);
    assert_int_equal(sim_run(4, 2, 1000, 0, 0), 0);
    /* across the 2^32 wrap of the epoch */
    assert_int_equal(sim_run(2, 2, 200, 0, 0xffffff80u), 0);
    assert_int_equal(sim_run(3, 2, 200, 0, 0xffffffa0u), 0);
    /* a slow reader: two slots still suffice */
    assert_int_equal(sim_run(2, 2, 30, 1, 0), 0);
}

static void test_one_slot_fails(void **state) {
    (void)state;
    /* negative control: with a single slot the fast rank overwrites the slow reader's data */
    assert_true(sim_run(2, 1, 30, 1, 0) > 0);
}

#ifdef STRATA_HAVE_CUDA
/* The NCCL loader (no GPU needed): a library that is not there gives ST_ERR_UNSUPPORTED with
 * one line naming it, NVLink multicast is forced off even when the environment asked for it,
 * and NCCL-using calls report the same line. (The load result is per process: one case.) */
static void test_nccl_loader(void **state) {
    (void)state;
    setenv("STRATA_NCCL_LIB", "/nonexistent/strata-test/libnccl.so.2", 1);
    setenv("NCCL_NVLS_ENABLE", "1", 1);
    st_err e = {0};
    assert_int_equal(cuda_nccl_load(&e), ST_ERR_UNSUPPORTED);
    assert_non_null(strstr(e.msg, "/nonexistent/strata-test/libnccl.so.2"));
    assert_null(strchr(e.msg, '\n'));
    assert_string_equal(getenv("NCCL_NVLS_ENABLE"), "0");
    assert_int_equal(cuda_nccl_version(), 0);
    uint8_t id[CUDA_NCCL_ID_BYTES];
    st_err e2 = {0};
    assert_int_equal(cuda_nccl_get_id(id, &e2), ST_ERR_UNSUPPORTED);
    assert_string_equal(e2.msg, e.msg);
    /* (also links base.c ahead of libstrata_cuda.a, whose objects need st_err_set) */
    assert_string_equal(st_status_name(e.code), st_status_name(ST_ERR_UNSUPPORTED));
}
#endif

int main(void) {
    const struct CMUnitTest tests[] = {
#ifdef STRATA_HAVE_CUDA
        cmocka_unit_test(test_nccl_loader),
#endif
        cmocka_unit_test(test_split), cmocka_unit_test(test_layout), cmocka_unit_test(test_epochs),
        cmocka_unit_test(test_protocol), cmocka_unit_test(test_one_slot_fails),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
