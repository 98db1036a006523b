/* cmd_run.c — `strata run MODEL [PROMPT]`: stream an answer, or chat interactively.
 *
 * With a prompt: renders it through the model's chat template (or --raw: as plain text with
 * the tokenizer's special tokens), streams the answer to stdout, then one stats line on
 * stderr. Without one: an interactive chat keeping the history (line editing via libedit when
 * stdin is a terminal); each turn re-renders the conversation and reuses the cached prefix.
 */
#include "app.h"
#include "strata/cluster.h"
#include "strata/engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef STRATA_HAVE_LIBEDIT
#include <editline/readline.h>
#endif

#define RUN_MAX_STOP 16

static void usage(void) {
    fprintf(stderr,
            "usage: strata run MODEL [PROMPT] [options]\n"
            "  MODEL is a checkpoint directory or a hub id org/name[@rev]; --synthetic PRESET[:QUANT] for random weights\n"
            "  --raw                 no chat template: the prompt is plain text (BOS added as the tokenizer does)\n"
            "  --tokenizer DIR       borrow tokenizer.json / tokenizer_config.json from DIR\n"
            "  --system TEXT         system message\n"
            "  --max-tokens N        (default 256)\n"
            "  --temperature T  --top-k K  --top-p P  --min-p P  --seed S\n"
            "  --repeat-penalty R  --presence-penalty P  --frequency-penalty F\n"
            "  --stop STR            stop string (repeatable)\n"
            "  --no-think            enable_thinking=false for templates that support it\n"
            "  --ctx N               context length (default min(model max, 4096))\n"
            "  --threads N  --offline\n"
            "  --peers A:P,...       generate on a cluster of `strata node` processes (MODEL_DIR on every node)\n"
            "  --discover PORT[:S]   the cluster's nodes from their LAN beacons (`strata node --beacon PORT`), S s\n");
}

static int on_text(void *user, const char *text, size_t len) {
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

/* Collects the assistant's reply for the chat history as well as printing it. */
typedef struct reply_buf {
    char *s;
    size_t n, cap;
} reply_buf;

static int on_text_collect(void *user, const char *text, size_t len) {
    reply_buf *b = user;
    if (b->n + len + 1 > b->cap) {
        size_t nc = (b->cap + len + 1) * 2;
        char *p = realloc(b->s, nc);
        if (!p) return 1;
        b->s = p;
        b->cap = nc;
    }
    memcpy(b->s + b->n, text, len);
    b->n += len;
    b->s[b->n] = 0;
    return on_text(NULL, text, len);
}

static void print_stats(const gen_result *r) {
    fprintf(stderr, "\nstrata: prompt %d tokens (%d cached), prefill %.1f tok/s, decode %.1f tok/s (%d tokens, %s)\n",
            r->n_prompt, r->n_cached, r->prefill_s > 0 ? (r->n_prompt - r->n_cached) / r->prefill_s : 0,
            r->decode_s > 0 && r->n_generated > 1 ? (r->n_generated - 1) / r->decode_s : 0, r->n_generated, r->finish);
}

static char *read_line(const char *prompt) {
#ifdef STRATA_HAVE_LIBEDIT
    if (isatty(0)) {
        char *l = readline(prompt);
        if (l && *l) add_history(l);
        return l;
    }
#endif
    if (isatty(0)) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) {
        free(line);
        return NULL;
    }
    if (n && line[n - 1] == '\n') line[n - 1] = 0;
    return line;
}

int cmd_run(int argc, char **argv) {
    const char *model_spec = NULL, *prompt = NULL, *system = NULL, *peers = NULL, *discover = NULL;
    const char *stops[RUN_MAX_STOP];
    int n_stop = 0, raw = 0, max_tokens = 256, no_think = 0;
    engine_opts eo = {0};
    smp_params sp = smp_params_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--raw")) raw = 1;
        else if (!strcmp(a, "--no-think")) no_think = 1;
        else if (!strcmp(a, "--offline")) eo.offline = 1;
        else if (!strcmp(a, "--exact")) eo.exact = 1;
        else if (!strcmp(a, "--tokenizer") && more) eo.tokenizer_dir = argv[++i];
        else if (!strcmp(a, "--synthetic") && more) eo.synthetic = argv[++i];
        else if (!strcmp(a, "--system") && more) system = argv[++i];
        else if (!strcmp(a, "--peers") && more) peers = argv[++i];
        else if (!strcmp(a, "--discover") && more) discover = argv[++i];
        else if (!strcmp(a, "--max-tokens") && more) max_tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--temperature") && more) sp.temperature = (float)atof(argv[++i]);
        else if (!strcmp(a, "--top-k") && more) sp.top_k = atoi(argv[++i]);
        else if (!strcmp(a, "--top-p") && more) sp.top_p = (float)atof(argv[++i]);
        else if (!strcmp(a, "--min-p") && more) sp.min_p = (float)atof(argv[++i]);
        else if (!strcmp(a, "--seed") && more) sp.seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--repeat-penalty") && more) sp.repetition_penalty = (float)atof(argv[++i]);
        else if (!strcmp(a, "--presence-penalty") && more) sp.presence_penalty = (float)atof(argv[++i]);
        else if (!strcmp(a, "--frequency-penalty") && more) sp.frequency_penalty = (float)atof(argv[++i]);
        else if (!strcmp(a, "--ctx") && more) eo.max_ctx = atoi(argv[++i]);
        else if (!strcmp(a, "--threads") && more) eo.n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--stop") && more) {
            if (n_stop == RUN_MAX_STOP) {
                fprintf(stderr, "strata run: at most %d stop strings\n", RUN_MAX_STOP);
                return 2;
            }
            stops[n_stop++] = argv[++i];
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "strata run: unknown or incomplete option '%s'\n", a);
            usage();
            return 2;
        } else if (!model_spec && !eo.synthetic) model_spec = a;
        else if (!prompt) prompt = a;
        else {
            usage();
            return 2;
        }
    }
    if (!model_spec && !eo.synthetic) {
        usage();
        return 2;
    }
    char found[CLUSTER_MAX_PEERS * 64];
    if (discover && !peers) { /* peers from the nodes' LAN beacons */
        st_err derr = {0};
        if (beacon_discover(discover, NULL, found, sizeof found, NULL, &derr)) {
            fprintf(stderr, "strata: %s\n", derr.msg);
            return 1;
        }
        peers = found;
    }
    if (peers) {
        if (!model_spec || !prompt) {
            fprintf(stderr, "strata run: --peers needs MODEL_DIR and a PROMPT\n");
            return 2;
        }
        return run_cluster(model_spec, peers, prompt, system, raw, max_tokens, &sp, eo.n_threads);
    }
    st_err err = {0};
    engine *e = NULL;
    if (engine_open(&e, model_spec, &eo, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return 1;
    }
    if (!engine_has_tokenizer(e)) {
        fprintf(stderr, "strata: %s has no tokenizer.json: pass --tokenizer DIR\n", model_spec ? model_spec : eo.synthetic);
        engine_free(e);
        return 1;
    }
    if (!raw && !engine_has_template(e)) {
        fprintf(stderr, "strata: the model has no chat template; using --raw\n");
        raw = 1;
    }
    json_t *extra = no_think ? json_pack("{s:b}", "enable_thinking", 0) : NULL;
    json_t *messages = json_array();
    if (system) json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "system", "content", system));
    int rc = 0, interactive = prompt == NULL;
    if (interactive && isatty(0))
        fprintf(stderr, "strata: chat with the model; /reset clears the history, /exit or Ctrl-D leaves\n");
    for (;;) {
        char *line = NULL;
        const char *user = prompt;
        if (interactive) {
            line = read_line("> ");
            if (!line) break;
            if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) {
                free(line);
                break;
            }
            if (!strcmp(line, "/reset")) {
                json_array_clear(messages);
                if (system) json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "system", "content", system));
                engine_slot_reset(e, 0);
                free(line);
                continue;
            }
            if (!*line) {
                free(line);
                continue;
            }
            user = line;
        }
        char *text = NULL;
        int32_t *ids = NULL;
        size_t n = 0;
        if (raw) {
            text = strdup(user);
        } else {
            json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "user", "content", user));
            if (engine_render_chat(e, messages, 1, extra, &text, &err)) {
                fprintf(stderr, "strata: %s\n", err.msg);
                rc = 1;
                free(line);
                break;
            }
        }
        if (!text || engine_tokenize(e, text, raw, &ids, &n, &err)) {
            fprintf(stderr, "strata: %s\n", text ? err.msg : "out of memory");
            free(text);
            free(line);
            rc = 1;
            break;
        }
        reply_buf rb = {0};
        gen_request req = {.prompt = ids, .n_prompt = n, .slot = 0, .max_tokens = max_tokens, .sampling = sp,
                           .stop = stops, .n_stop = n_stop, .on_text = on_text_collect, .user = &rb};
        gen_result res;
        int g = engine_generate(e, &req, &res, &err);
        if (g) {
            fprintf(stderr, "\nstrata: %s\n", err.msg);
            rc = 1;
        } else {
            print_stats(&res);
            if (!raw) json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "assistant", "content", rb.s ? rb.s : ""));
        }
        free(rb.s);
        free(ids);
        free(text);
        free(line);
        if (!interactive || g) break;
    }
    json_decref(messages);
    json_decref(extra);
    engine_free(e);
    return rc;
}
