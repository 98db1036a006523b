/* main.c — `strata` command-line entry: dispatches to subcommands (src/app/cmd_*.c). */
#include "app.h"
#include "strata/base.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} app_command;

static const app_command g_commands[] = {
    {"eval-golden", cmd_eval_golden, "DIR: check a model against its golden logits (transformers)"},
    {"inspect", cmd_inspect, "MODEL_DIR: print the model descriptor and tensor layout"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: strata COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof g_commands / sizeof g_commands[0]; i++)
        fprintf(f, "  %-14s %s\n", g_commands[i].name, g_commands[i].help);
    fprintf(f, "\nRun 'strata COMMAND --help' for a command's options. Log level: STRATA_LOG=debug|info|warn|error.\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("strata 0.1.0\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof g_commands / sizeof g_commands[0]; i++)
        if (!strcmp(argv[1], g_commands[i].name)) return g_commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "strata: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
