/* app.h — the `strata` command's subcommands. Each lives in src/app/cmd_<name>.c and returns
 * the process exit status (0 success, 1 failure, 2 usage error). Only main() calls exit(). */
#ifndef STRATA_APP_H
#define STRATA_APP_H

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
int cmd_serve(int argc, char **argv);

#endif
