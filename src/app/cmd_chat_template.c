/* cmd_chat_template.c — `strata chat-template TOKENIZER_CONFIG_JSON MESSAGES_JSON
 * [--add-generation-prompt] [--kwargs JSON]`: prints a conversation rendered by the model's chat
 * template, byte-for-byte what transformers' apply_chat_template(tokenize=False) returns (no
 * newline is added). */
#include "app.h"
#include "strata/base.h"
#include "strata/jinja.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints the command's usage to f. */
static void chat_template_usage(FILE *f) {
    fprintf(f,
            "usage: strata chat-template TOKENIZER_CONFIG_JSON MESSAGES_JSON [--add-generation-prompt] [--kwargs JSON]\n"
            "  MESSAGES_JSON  a file, '-' for stdin, or inline JSON: an array of {\"role\", \"content\", ...}\n"
            "                 or an object {\"messages\": [...], \"tools\": [...]} (other keys become kwargs)\n"
            "  --kwargs JSON  extra template variables, e.g. '{\"enable_thinking\": false}'\n");
}

/* Loads MESSAGES_JSON: inline JSON if it starts with '[' or '{', stdin for "-", else a file.
 * Returns a new reference or NULL (message printed). */
static json_t *load_json_arg(const char *arg) {
    json_error_t je;
    json_t *j;
    const char *p = arg, *what;
    while (*p == ' ' || *p == '\t' || *p == '\n') p++;
    if (*p == '[' || *p == '{') {
        what = "MESSAGES_JSON";
        j = json_loads(arg, JSON_ALLOW_NUL, &je);
    } else if (!strcmp(arg, "-")) {
        what = "stdin";
        j = json_loadf(stdin, JSON_ALLOW_NUL, &je);
    } else {
        what = arg;
        j = json_load_file(arg, JSON_ALLOW_NUL, &je);
    }
    if (!j) fprintf(stderr, "strata: %s: %s (line %d)\n", what, je.text, je.line);
    return j;
}

/* The subcommand (see app.h): 0 printed, 1 failed, 2 usage error. */
int cmd_chat_template(int argc, char **argv) {
    const char *cfg = NULL, *msgs_arg = NULL, *kwargs_arg = NULL;
    int agp = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            chat_template_usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--add-generation-prompt")) {
            agp = 1;
        } else if (!strcmp(argv[i], "--kwargs") && i + 1 < argc) {
            kwargs_arg = argv[++i];
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "strata: chat-template: unknown option '%s'\n", argv[i]);
            chat_template_usage(stderr);
            return 2;
        } else if (!cfg) {
            cfg = argv[i];
        } else if (!msgs_arg) {
            msgs_arg = argv[i];
        } else {
            chat_template_usage(stderr);
            return 2;
        }
    }
    if (!cfg || !msgs_arg) {
        chat_template_usage(stderr);
        return 2;
    }
    int status = 1;
    json_t *input = NULL, *kwargs = NULL, *messages = NULL;
    char *out = NULL;
    st_err err = {0};
    if (!(input = load_json_arg(msgs_arg))) goto done;
    kwargs = json_object();
    if (json_is_object(input)) { /* {"messages": [...], "tools": [...], ...} */
        const char *key;
        json_t *val;
        json_object_foreach(input, key, val) {
            if (!strcmp(key, "messages")) messages = val;
            else json_object_set(kwargs, key, val);
        }
    } else {
        messages = input;
    }
    if (!json_is_array(messages)) {
        fprintf(stderr, "strata: chat-template: MESSAGES_JSON must be an array of messages (or {\"messages\": [...]})\n");
        status = 2;
        goto done;
    }
    if (kwargs_arg) {
        json_error_t je;
        json_t *extra = json_loads(kwargs_arg, 0, &je);
        if (!json_is_object(extra)) {
            fprintf(stderr, "strata: chat-template: --kwargs must be a JSON object (%s)\n", extra ? "wrong type" : je.text);
            json_decref(extra);
            status = 2;
            goto done;
        }
        json_object_update(kwargs, extra);
        json_decref(extra);
    }
    if (chat_template_render_config(cfg, messages, agp, kwargs, &out, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        goto done;
    }
    fputs(out, stdout);
    status = fflush(stdout) ? 1 : 0;
done:
    free(out);
    json_decref(kwargs);
    json_decref(input);
    return status;
}
