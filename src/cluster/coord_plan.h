/* coord_plan.h — the coordinator's use of the placement solver (private to src/cluster).
 *
 * coord_init gathers each node's devices (cp_info) and, unless the split is even, the
 * measured link matrix (lp_survey_links); cplan_solve turns that into a plan_cluster (one
 * CPU device per live node) and asks plan_solve for stages with the coordinator's context,
 * slots and prefill chunk, pipeline-only (the runtime has no tensor parallelism). After the
 * LOADs, cplan_check compares what each node reports against its planned budget. */
#ifndef STRATA_COORD_PLAN_H
#define STRATA_COORD_PLAN_H

#include "linkprobe.h"
#include "strata/model.h"

typedef struct cplan cplan;

/* One planned stage: survey node index and layer range [layer_begin, layer_end). */
typedef struct cplan_stage {
    int node;
    int layer_begin, layer_end;
} cplan_stage;

/* Model figures (safetensors headers of o->model_dir, else the descriptor d) and the request
 * (context o->max_ctx, o->n_slots, chunk o->max_batch, float32 KV and activations). */
int cplan_init(cplan **out, const coord_opts *o, const model_desc *d, size_t ctrl_payload, st_err *err);
void cplan_free(cplan *p);

/* Plans on the survey's nodes alive[0..n_alive): fills st[0..*n_stages) in pipeline order and
 * logs the plan, its budgets and predicted tok/s. Nothing fits: ST_ERR_LIMIT with the
 * solver's binding line and max context in err. */
int cplan_solve(cplan *p, const lp_survey *sv, const int *alive, int n_alive, cplan_stage *st, int *n_stages, st_err *err);

/* Records stage `stage`'s reported allocation against its budget and logs the comparison.
 * Returns 1 if over budget (also counted in the info), else 0. */
int cplan_check(cplan *p, int stage, const char *addr, uint64_t weights, uint64_t kv, uint64_t rss);

/* The last plan's predictions and budget checks (zeroed when p is NULL: even split). */
void cplan_get_info(const cplan *p, coord_plan_info *out);

#endif
