/* app.h — the `strata` command's subcommands. Each lives in src/app/cmd_<name>.c and returns
 * the process exit status (0 success, 1 failure, 2 usage error). Only main() calls exit(). */
#ifndef STRATA_APP_H
#define STRATA_APP_H

int cmd_eval_golden(int argc, char **argv);
int cmd_inspect(int argc, char **argv);

#endif
