/* pool.c — persistent parallel-for thread pool (see pool.h).
 *
 * A job is published through one 64-bit word: generation (24 bits) | n_tasks (20 bits) |
 * next task (20 bits). Threads claim tasks by compare-and-swap on that word, so a claim is
 * valid only in the generation it was made in: a worker that wakes late can never run a task of
 * a newer job with a stale view, and the caller never waits for idle workers to check in — only
 * for the tasks that were actually claimed. Workers spin briefly for the next generation, then
 * sleep on a condition variable; waits yield the CPU so an oversubscribed machine (tests in
 * parallel, several processes) does not burn quanta spinning on descheduled threads.
 */
#include "strata/pool.h"

#include "strata/base.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define POOL_SPIN_ITERS 20000
#define POOL_YIELD_AFTER 256
#define POOL_TASK_BITS 20
#define POOL_TASK_MASK ((1ull << POOL_TASK_BITS) - 1)

struct st_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t job;       /* gen:24 | n_tasks:20 | next:20                           */
    _Atomic int done_tasks;     /* tasks of the current job finished                       */
    _Atomic int stop;
    _Atomic int sleepers;
    st_pool_fn fn;              /* valid while a claimed task of the current job runs     */
    void *ctx;
    _Atomic uint64_t busy_ns;
    uint64_t run_wall_ns;
};

typedef struct {
    st_pool *p;
    int id;
} worker_arg;

static inline uint64_t job_gen(uint64_t w) { return w >> (2 * POOL_TASK_BITS); }
static inline int job_n(uint64_t w) { return (int)((w >> POOL_TASK_BITS) & POOL_TASK_MASK); }
static inline int job_next(uint64_t w) { return (int)(w & POOL_TASK_MASK); }

/* Claims and runs tasks of generation gen until none are left. */
static void pool_work(st_pool *p, uint64_t gen, int tid) {
    uint64_t t0 = 0;
    int did = 0;
    uint64_t w = atomic_load_explicit(&p->job, memory_order_acquire);
    for (;;) {
        if (job_gen(w) != gen || job_next(w) >= job_n(w)) break;
        if (!atomic_compare_exchange_weak_explicit(&p->job, &w, w + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        if (!did++) t0 = st_time_ns();
        p->fn(p->ctx, job_next(w), job_n(w), tid);
        atomic_fetch_add_explicit(&p->done_tasks, 1, memory_order_release);
        w = atomic_load_explicit(&p->job, memory_order_acquire);
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
        while ((g = job_gen(atomic_load_explicit(&p->job, memory_order_acquire))) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_acquire)) {
            if (++spins < POOL_SPIN_ITERS) {
                if (spins % POOL_YIELD_AFTER == 0) sched_yield();
                else __builtin_ia32_pause();
                continue;
            }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (job_gen(atomic_load(&p->job)) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
            spins = 0;
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        pool_work(p, g, id);
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
        if (wa) {
            wa->p = p;
            wa->id = i;
        }
        if (!wa || pthread_create(&p->threads[i], NULL, pool_main, wa) != 0) {
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
    ST_ASSERT((uint64_t)n_tasks <= POOL_TASK_MASK);
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
    atomic_store_explicit(&p->done_tasks, 0, memory_order_relaxed);
    uint64_t gen = job_gen(atomic_load(&p->job)) + 1;
    /* seq_cst store: pairs with the sleepers check below and in the workers */
    atomic_store(&p->job, (gen << (2 * POOL_TASK_BITS)) | ((uint64_t)n_tasks << POOL_TASK_BITS));
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    pool_work(p, gen, 0);
    int spins = 0;
    while (atomic_load_explicit(&p->done_tasks, memory_order_acquire) < n_tasks) {
        if (++spins % POOL_YIELD_AFTER == 0) sched_yield();
        else __builtin_ia32_pause();
    }
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
