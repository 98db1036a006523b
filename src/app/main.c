/* main.c — `strata` command-line entry: dispatches to subcommands (src/app/cmd_*.c). */
#include "app.h"
#include "strata/base.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int app_parse_int(const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

typedef struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} app_command;

static const app_command g_commands[] = {
    {"eval-golden", cmd_eval_golden, "DIR: check a model against its golden logits (transformers)"},
    {"run", cmd_run, "MODEL [PROMPT]: stream an answer (interactive chat without PROMPT)"},
    {"bench", cmd_bench, "MODEL|--synthetic PRESET[:QUANT]: latency, TPS, orchestration, residency, max context, MBU"},
    {"inspect", cmd_inspect, "MODEL_DIR: print the model descriptor and tensor layout"},
    {"synth", cmd_synth, "--preset NAME --quant Q OUT_DIR: write a random-weight checkpoint of a real shape"},
    {"pull", cmd_pull, "org/name[@rev]: download a model from the Hugging Face hub into its cache"},
    {"tokenize", cmd_tokenize, "TOKENIZER_JSON: encode stdin to ids (--decode, --add-special, --bench FILE)"},
    {"plan", cmd_plan, "MODEL_DIR|--config F|--synthetic P --cluster C.json: place layers, budget memory, predict tok/s"},
    {"node", cmd_node, "--listen HOST:PORT: run a cluster node daemon (stages of a model)"},
    {"cluster-gen", cmd_cluster_gen, "MODEL_DIR --peers A:P,...: generate ids on a cluster (tests, figures)"},
    {"chat-template", cmd_chat_template, "TOKENIZER_CONFIG_JSON MESSAGES_JSON: render a conversation with the model's chat template"},
    {"cuda-parity", cmd_cuda_parity, "check every CUDA op against the CPU reference op (random inputs, all dtypes/bits)"},
    {"comm-bench", cmd_comm_bench, "[--gpus N] [--sizes 6K,12K,...]: NCCL and peer all-reduce latency between GPUs"},
    {"serve", cmd_serve, "MODEL: OpenAI-compatible HTTP API with streaming, dashboard and metrics"},
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
