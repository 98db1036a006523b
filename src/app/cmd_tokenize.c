/* cmd_tokenize.c — `strata tokenize TOKENIZER_JSON [--add-special] [--decode] [--bench FILE]`.
 *
 *   encode (default)  text on stdin -> the ids as one JSON array on stdout
 *   --decode          a JSON array of ids on stdin -> the text on stdout (no newline added)
 *   --bench FILE      load time and single-thread encode throughput on FILE's text
 */
#include "app.h"
#include "strata/base.h"
#include "strata/tok.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Reads all of f into a malloc'ed buffer (*len bytes, NUL-terminated). NULL on failure. */
static char *read_all(FILE *f, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (cap - n < 4096) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* Prints the command's usage to f. */
static void usage(FILE *f) {
    fprintf(f, "usage: strata tokenize TOKENIZER_JSON [--add-special] [--decode] [--bench FILE]\n"
               "  encodes stdin and prints the ids as a JSON array;\n"
               "  --add-special  apply the post-processor's special tokens (e.g. BOS)\n"
               "  --decode       read a JSON id array on stdin and print the text\n"
               "  --skip-special with --decode: drop special tokens\n"
               "  --bench FILE   print load ms and single-thread encode MB/s on FILE\n");
}

/* CPU seconds used by this process (the dev box is shared: wall time alone misleads). */
static double cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* --bench: load time, then encode FILE repeatedly for at least ~1 s. */
static int run_bench(const char *tok_path, const char *file, int add_special) {
    st_err err = {0};
    char *text;
    size_t len;
    if (st_file_read(file, &text, &len, &err)) {
        fprintf(stderr, "strata: tokenize: %s\n", err.msg);
        return 1;
    }
    tok_tokenizer *tok = NULL;
    double t0 = st_time_s(), c0 = cpu_s();
    if (tok_load(&tok, tok_path, &err)) {
        fprintf(stderr, "strata: tokenize: %s\n", err.msg);
        free(text);
        return 1;
    }
    double load_s = st_time_s() - t0, load_cpu = cpu_s() - c0;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int reps = 0;
    double t1 = st_time_s(), c1 = cpu_s(), el = 0;
    do {
        free(ids);
        if (tok_encode(tok, text, len, add_special, &ids, &n_ids, &err)) {
            fprintf(stderr, "strata: tokenize: %s: %s\n", file, err.msg);
            tok_free(tok);
            free(text);
            return 1;
        }
        reps++;
        el = st_time_s() - t1;
    } while (el < 1.0);
    double per = el / reps, per_cpu = (cpu_s() - c1) / reps;
    printf("load      %.1f ms  (cpu %.1f ms; %s)\n", load_s * 1e3, load_cpu * 1e3, tok_path);
    printf("encode    %.2f MB/s  (cpu %.2f MB/s; %zu bytes -> %zu tokens, %.1f ms per pass, "
           "%d pass%s, 1 thread)\n",
           (double)len / per / 1e6, (double)len / per_cpu / 1e6, len, n_ids, per * 1e3, reps,
           reps == 1 ? "" : "es");
    free(ids);
    tok_free(tok);
    free(text);
    return 0;
}

/* --decode: JSON id array on stdin -> text. */
static int run_decode(const tok_tokenizer *tok, int skip_special) {
    size_t len;
    char *in = read_all(stdin, &len);
    if (!in) {
        fprintf(stderr, "strata: tokenize: cannot read stdin\n");
        return 1;
    }
    json_error_t jerr;
    json_t *arr = json_loadb(in, len, 0, &jerr);
    free(in);
    if (!arr || !json_is_array(arr)) {
        fprintf(stderr, "strata: tokenize: stdin:%d:%d: expected a JSON array of ids%s%s\n",
                arr ? 1 : jerr.line, arr ? 1 : jerr.column, arr ? "" : ": ", arr ? "" : jerr.text);
        json_decref(arr);
        return 1;
    }
    size_t n = json_array_size(arr);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) {
        json_decref(arr);
        fprintf(stderr, "strata: tokenize: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
            fprintf(stderr, "strata: tokenize: stdin: element %zu is not a token id\n", i);
            free(ids);
            json_decref(arr);
            return 1;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    json_decref(arr);
    st_err err = {0};
    char *text;
    size_t tlen;
    int rc = tok_decode(tok, ids, n, skip_special, &text, &tlen, &err);
    free(ids);
    if (rc) {
        fprintf(stderr, "strata: tokenize: %s\n", err.msg);
        return 1;
    }
    fwrite(text, 1, tlen, stdout);
    free(text);
    return 0;
}

/* default: stdin text -> JSON id array. */
static int run_encode(const tok_tokenizer *tok, int add_special) {
    size_t len;
    char *in = read_all(stdin, &len);
    if (!in) {
        fprintf(stderr, "strata: tokenize: cannot read stdin\n");
        return 1;
    }
    st_err err = {0};
    int32_t *ids;
    size_t n;
    int rc = tok_encode(tok, in, len, add_special, &ids, &n, &err);
    free(in);
    if (rc) {
        fprintf(stderr, "strata: tokenize: %s\n", err.msg);
        return 1;
    }
    putchar('[');
    for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("]\n");
    free(ids);
    return 0;
}

/* Entry point (argv[0] is "tokenize"): returns 0 success, 1 failure, 2 usage error. */
int cmd_tokenize(int argc, char **argv) {
    const char *path = NULL, *bench = NULL;
    int add_special = 0, decode = 0, skip_special = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--add-special")) {
            add_special = 1;
        } else if (!strcmp(argv[i], "--decode")) {
            decode = 1;
        } else if (!strcmp(argv[i], "--skip-special")) {
            skip_special = 1;
        } else if (!strcmp(argv[i], "--bench")) {
            if (++i >= argc) {
                usage(stderr);
                return 2;
            }
            bench = argv[i];
        } else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "strata: tokenize: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    if (bench) return run_bench(path, bench, add_special);
    st_err err = {0};
    tok_tokenizer *tok;
    if (tok_load(&tok, path, &err)) {
        fprintf(stderr, "strata: tokenize: %s\n", err.msg);
        return 1;
    }
    int rc = decode ? run_decode(tok, skip_special) : run_encode(tok, add_special);
    tok_free(tok);
    return rc;
}
