/* pool.c — persistent parallel-for thread pool (see pool.h).
 *
 * A generation counter publishes each job; workers spin on it for a short while, then sleep on
 * a condition variable. Tasks are claimed with an atomic counter; the caller participates and
 * then waits until all tasks are finished and every worker has acknowledged the generation.
 */
#define _GNU_SOURCE
#include "strata/pool.h"

#include "strata/base.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#define POOL_SPIN_ITERS 200000

struct st_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t gen;     /* incremented per job                            */
    _Atomic int next_task;    /* next task index to claim                       */
    _Atomic int done_tasks;   /* tasks finished                                 */
    _Atomic int stop;
    _Atomic int sleepers;
    _Atomic int acked;        /* workers that finished the current generation  */
    st_pool_fn fn;
    void *ctx;
    int n_tasks;
    _Atomic uint64_t busy_ns;
    uint64_t run_wall_ns;
};

typedef struct {
    st_pool *p;
    int id;
} worker_arg;

static void pool_work(st_pool *p, int tid) {
    int n = p->n_tasks;
    uint64_t t0 = st_time_ns();
    int did = 0;
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_acq_rel);
        if (t >= n) break;
        p->fn(p->ctx, t, n, tid);
        did++;
        atomic_fetch_add_explicit(&p->done_tasks, 1, memory_order_release);
    }
    if (did) atomic_fetch_add_explicit(&p->busy_ns, st_time_ns() - t0, memory_order_relaxed);
}

static void *pool_main(void *arg) {
    worker_arg *wa = arg;
    st_pool *p = wa->p;
    int id = wa->id;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_acquire)) {
            if (++spins < POOL_SPIN_ITERS) {
                __builtin_ia32_pause();
                continue;
            }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
            spins = 0;
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        pool_work(p, id);
        atomic_fetch_add_explicit(&p->acked, 1, memory_order_acq_rel);
    }
    return NULL;
}

st_pool *st_pool_init(int n_threads) {
    if (n_threads <= 0) n_threads = st_cpu_count();
    st_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) {
            p->n_threads = i;
            st_pool_free(p);
            return NULL;
        }
        wa->p = p;
        wa->id = i;
        if (pthread_create(&p->threads[i], NULL, pool_main, wa) != 0) {
            free(wa);
            p->n_threads = i;
            st_pool_free(p);
            return NULL;
        }
    }
    return p;
}

void st_pool_free(st_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int st_pool_threads(const st_pool *p) { return p ? p->n_threads : 1; }

void st_pool_run(st_pool *p, st_pool_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0) return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        uint64_t t0 = st_time_ns();
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, n_tasks, 0);
        if (p) {
            uint64_t d = st_time_ns() - t0;
            atomic_fetch_add(&p->busy_ns, d);
            p->run_wall_ns += d;
        }
        return;
    }
    uint64_t t0 = st_time_ns();
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&p->done_tasks, 0, memory_order_relaxed);
    atomic_store_explicit(&p->acked, 0, memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: pairs with the sleepers check */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    pool_work(p, 0);
    /* Wait for every worker to leave this generation: only then may the next call rewrite
     * fn/ctx/n_tasks without a late worker reading a half-updated job. */
    while (atomic_load_explicit(&p->done_tasks, memory_order_acquire) < n_tasks ||
           atomic_load_explicit(&p->acked, memory_order_acquire) < p->n_threads - 1)
        __builtin_ia32_pause();
    p->run_wall_ns += st_time_ns() - t0;
}

void st_pool_stats(const st_pool *p, uint64_t *busy_ns, uint64_t *run_wall_ns) {
    if (busy_ns) *busy_ns = p ? atomic_load(&p->busy_ns) : 0;
    if (run_wall_ns) *run_wall_ns = p ? p->run_wall_ns : 0;
}

void st_pool_stats_reset(st_pool *p) {
    if (!p) return;
    atomic_store(&p->busy_ns, 0);
    p->run_wall_ns = 0;
}
