/* cmd_synth.c — `strata synth`: write a synthetic checkpoint of a real published shape.
 *
 *   strata synth --preset NAME [--quant Q] OUT_DIR [--seed N] [--threads N]
 *   strata synth --list
 */
#include "app.h"
#include "strata/synth.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char *const g_quants[] = {"bf16", "q2g64", "q3g64", "q4g64", "q5g64", "q6g64", "q8g64"};
#define N_QUANTS ((int)(sizeof g_quants / sizeof g_quants[0]))

static void synth_usage(FILE *f) {
    fprintf(f,
            "usage: strata synth --preset NAME [--quant Q] OUT_DIR [--seed N] [--threads N]\n"
            "       strata synth --list\n\n"
            "Writes a loadable model directory with the published shape of NAME and random weights\n"
            "(config.json, generation_config.json, safetensors shards <= 5 GiB, the family's tokenizer\n"
            "when it is in $STRATA_CACHE/tokenizers). Q is bf16 (default) or q2g64, q3g64, q4g64, q5g64,\n"
            "q6g64, q8g64 (MLX affine layout, routers at 8 bits). The same seed gives identical bytes.\n"
            "To run a preset without disk use --synthetic NAME[:Q] on the commands that take a model.\n");
}

/* Prints the preset table: parameters and checkpoint bytes for every quantization. */
static int synth_list(void) {
    st_err err = {0};
    char b[32];
    printf("%-16s %-11s %7s %9s", "preset", "arch", "layers", "params");
    for (int q = 0; q < N_QUANTS; q++) printf(" %10s", g_quants[q]);
    printf("\n");
    for (int i = 0; synth_preset_name(i); i++) {
        const char *name = synth_preset_name(i);
        model_desc d;
        if (synth_preset_desc(name, &d, &err)) {
            fprintf(stderr, "strata: %s\n", err.msg);
            return 1;
        }
        uint64_t np = 0, nb = 0;
        if (synth_preset_size(name, &np, &nb, &err)) {
            model_desc_free(&d);
            fprintf(stderr, "strata: %s\n", err.msg);
            return 1;
        }
        char ps[32];
        if (np >= 1000000000ull) snprintf(ps, sizeof ps, "%.2fB", (double)np / 1e9);
        else snprintf(ps, sizeof ps, "%.2fM", (double)np / 1e6);
        printf("%-16s %-11s %7d %9s", name, d.model_type, d.n_layer, ps);
        for (int q = 0; q < N_QUANTS; q++) {
            char spec[96];
            snprintf(spec, sizeof spec, "%s:%s", name, g_quants[q]);
            if (synth_preset_size(spec, &np, &nb, &err)) printf(" %10s", "-");
            else printf(" %10s", st_fmt_bytes((double)nb, b, sizeof b));
        }
        printf("\n");
        model_desc_free(&d);
    }
    return 0;
}

int cmd_synth(int argc, char **argv) {
    const char *preset = NULL, *quant = "bf16", *out = NULL;
    uint64_t seed = 1;
    synth_write_opts o = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            synth_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--list")) {
            return synth_list();
        } else if ((!strcmp(a, "--preset") || !strcmp(a, "--quant") || !strcmp(a, "--seed") || !strcmp(a, "--threads")) &&
                   i + 1 < argc) {
            const char *v = argv[++i];
            if (!strcmp(a, "--preset")) preset = v;
            else if (!strcmp(a, "--quant")) quant = v;
            else {
                char *end = NULL;
                errno = 0;
                unsigned long long n = strtoull(v, &end, 10);
                if (errno || !*v || *end || v[0] == '-') {
                    fprintf(stderr, "strata: %s wants a non-negative integer, got '%s'\n", a, v);
                    return 2;
                }
                if (!strcmp(a, "--seed")) seed = n;
                else o.n_threads = (int)(n > 1024 ? 1024 : n);
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "strata: synth: unknown or incomplete option '%s'\n", a);
            synth_usage(stderr);
            return 2;
        } else if (!out) {
            out = a;
        } else {
            fprintf(stderr, "strata: synth: more than one output directory ('%s', '%s')\n", out, a);
            return 2;
        }
    }
    if (!preset || !out) {
        synth_usage(stderr);
        return 2;
    }
    char spec[160];
    if (strchr(preset, ':')) snprintf(spec, sizeof spec, "%s", preset); /* --preset NAME:Q */
    else snprintf(spec, sizeof spec, "%s:%s", preset, quant);
    st_err err = {0};
    int rc = synth_write_ex(spec, out, seed, &o, &err);
    if (rc) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return rc == ST_ERR_ARG ? 2 : 1;
    }
    return 0;
}
