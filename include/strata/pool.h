/* strata/pool.h — a persistent thread pool for parallel-for over a fixed number of tasks.
 *
 * Created once (per process or per model), reused for every op: no thread creation and no
 * allocation per call. Workers spin briefly between calls (decode issues hundreds of short
 * parallel regions per token) and then sleep on a futex-backed condition variable.
 */
#ifndef STRATA_POOL_H
#define STRATA_POOL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct st_pool st_pool;

/* fn is called once per task index in [0, n_tasks), from any thread (the caller included).
 * ctx is borrowed for the duration of st_pool_run. */
typedef void (*st_pool_fn)(void *ctx, int task, int n_tasks, int thread);

/* Starts n_threads-1 workers (the caller is thread 0). n_threads <= 0 means all online CPUs.
 * Returns NULL on failure (out of memory / pthread_create). */
st_pool *st_pool_init(int n_threads);
void st_pool_free(st_pool *p);

int st_pool_threads(const st_pool *p);

/* Runs fn for tasks 0..n_tasks-1 across the pool and returns when all have finished.
 * Tasks are handed out dynamically (atomic counter). Not re-entrant: fn must not call
 * st_pool_run on the same pool. p may be NULL (runs serially on the caller). */
void st_pool_run(st_pool *p, st_pool_fn fn, void *ctx, int n_tasks);

/* Nanoseconds the pool's threads spent inside fn since the last reset, summed over threads,
 * and wall nanoseconds spent inside st_pool_run (for device-residency figures). */
void st_pool_stats(const st_pool *p, uint64_t *busy_ns, uint64_t *run_wall_ns);
void st_pool_stats_reset(st_pool *p);

#ifdef __cplusplus
}
#endif
#endif
