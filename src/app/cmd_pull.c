/* cmd_pull.c — `strata pull org/name[@revision]`: download a model from the Hugging Face hub
 * into the hub cache (see strata/hub.h) and print the local snapshot path on stdout. */
#include "app.h"
#include "strata/hub.h"

#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f, "usage: strata pull org/name[@revision] [--offline] [--include PATTERN]... [--cache-dir DIR]\n"
               "                  [--retries N] [--quiet]\n"
               "  Downloads the files strata needs (config, tokenizer, safetensors weights) into the Hugging\n"
               "  Face cache and prints the snapshot directory. Interrupted downloads resume.\n"
               "  --offline          use the cache only, never the network (also HF_HUB_OFFLINE=1)\n"
               "  --include PATTERN  also download repository files matching PATTERN (fnmatch, repeatable)\n"
               "  --cache-dir DIR    hub cache directory (default $HF_HUB_CACHE, $HF_HOME/hub,\n"
               "                     ~/.cache/huggingface/hub)\n"
               "  --retries N        resume an interrupted file up to N times (default 4)\n"
               "  --quiet            no progress output\n"
               "  Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (private/gated models).\n");
}

int cmd_pull(int argc, char **argv) {
    const char *model = NULL;
    hub_opts o = {0};
    const char **include = calloc((size_t)argc + 1, sizeof *include);
    int n_include = 0, rc = 2;
    if (!include) {
        fprintf(stderr, "strata: out of memory\n");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--offline")) o.offline = 1;
        else if (!strcmp(argv[i], "--quiet") || !strcmp(argv[i], "-q")) o.no_progress = 1;
        else if (!strcmp(argv[i], "--include") && i + 1 < argc) include[n_include++] = argv[++i];
        else if (!strcmp(argv[i], "--cache-dir") && i + 1 < argc) o.cache_dir = argv[++i];
        else if (!strcmp(argv[i], "--retries") && i + 1 < argc) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 0 || n > 1000) {
                fprintf(stderr, "strata pull: --retries wants a number 0..1000, got '%s'\n", argv[i]);
                goto out;
            }
            o.max_attempts = (int)n + 1;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            rc = 0;
            goto out;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "strata pull: unknown option '%s'\n", argv[i]);
            usage(stderr);
            goto out;
        } else if (!model) model = argv[i];
        else {
            usage(stderr);
            goto out;
        }
    }
    if (!model) {
        usage(stderr);
        goto out;
    }
    o.include = n_include ? include : NULL;
    st_err err = {0};
    char *dir = NULL;
    if (hub_resolve(model, &o, &dir, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        rc = 1;
        goto out;
    }
    printf("%s\n", dir);
    free(dir);
    rc = 0;
out:
    free(include);
    return rc;
}
