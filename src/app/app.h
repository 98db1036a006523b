/* app.h — the `strata` command's subcommands. Each lives in src/app/cmd_<name>.c and returns
 * the process exit status (0 success, 1 failure, 2 usage error). Only main() calls exit(). */
#ifndef STRATA_APP_H
#define STRATA_APP_H

#include <stdint.h>

/* Parses a whole decimal string as an int in [lo, hi]: 0, or -1 leaving *out as it was (the
 * option parsers then print their one-line error). main.c. */
int app_parse_int(const char *s, int lo, int hi, int *out);

int cmd_eval_golden(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_synth(int argc, char **argv);
int cmd_pull(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_plan(int argc, char **argv);
int cmd_node(int argc, char **argv);
int cmd_cluster_gen(int argc, char **argv);
int cmd_chat_template(int argc, char **argv);
int cmd_cuda_parity(int argc, char **argv);
int cmd_comm_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);

/* bench_cluster.c: the bench table on a running cluster (fills r; prints stage/hop table);
 * ctx > 0: also the stable context at ctx positions (a second placement with one slot; its
 * failure is reported in r->max_ctx_note, not returned). */
struct bench_result;
struct st_err;
int bench_cluster(const char *model_dir, const char *peers, int prompt, int gen, int conc, int threads, int nccl,
                  int64_t ctx, struct bench_result *r, struct st_err *err);

/* run_cluster.c: strata run --peers (tokenise here, generate on the nodes, stream text). */
struct smp_params;
int run_cluster(const char *dir, const char *peers, const char *prompt, const char *system, int raw, int max_tokens,
                const struct smp_params *sp, int threads);

#endif
