/* strata/jinja.h — chat templates: a Jinja2-subset interpreter.
 *
 * Renders a model's chat template (tokenizer_config.json "chat_template", or chat_template.jinja)
 * byte-for-byte as transformers' apply_chat_template(tokenize=False) does: Jinja2 3.1 in an
 * ImmutableSandboxedEnvironment with trim_blocks=True, lstrip_blocks=True, the loopcontrols
 * extension ({% break %}, {% continue %}), the {% generation %} tag, the globals
 * raise_exception(msg) and strftime_now(fmt), and a tojson filter that is Python's
 * json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
 *
 * Usage:
 *     jinja_template *t;
 *     if (jinja_template_parse(&t, src, len, &err)) return err.code;   // once per model
 *     char *text; size_t n;
 *     rc = jinja_render(t, vars, &text, &n, &err);                      // per request
 *     ...; free(text); jinja_template_free(t);
 *
 * A construct outside the supported subset is an error naming the template position
 * ("chat template 3:15: unsupported filter 'wordwrap'"), never different output. Error codes:
 * ST_ERR_FORMAT   syntax errors and the runtime errors Jinja2 raises (undefined attribute of an
 *                 undefined value, 'str' + 'int', ...);
 * ST_ERR_UNSUPPORTED  valid Jinja2 that strata does not implement;
 * ST_ERR_ARG      the template called raise_exception(msg): msg is in err (the request does not
 *                 fit the template, e.g. roles that do not alternate);
 * ST_ERR_LIMIT    a render exceeded its memory / work bounds; ST_ERR_NOMEM, ST_ERR_IO as usual.
 *
 * A parsed template is immutable: several threads may render it at once.
 */
#ifndef STRATA_JINJA_H
#define STRATA_JINJA_H

#include "strata/base.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* templates                                                                                  */

typedef struct jinja_template jinja_template;

/* Parses src[0, len) (UTF-8) into *out. The source is copied; the caller keeps src. On failure
 * *out is NULL and err says "chat template LINE:COL: problem". */
int jinja_template_parse(jinja_template **out, const char *src, size_t len, st_err *err);

/* Frees a template from jinja_template_parse; NULL is a no-op. */
void jinja_template_free(jinja_template *t);

typedef struct jinja_render_opts {
    int64_t now; /* strftime_now's clock in Unix seconds (local time zone); 0 = the current time */
} jinja_render_opts;

/* Renders t with the template variables in vars (a JSON object; NULL = none). On success *out
 * is a malloc'ed NUL-terminated string the caller frees, and *out_len (if not NULL) its length
 * (the text may hold NULs only if an input string did). On failure *out is NULL. */
int jinja_render(const jinja_template *t, const json_t *vars, char **out, size_t *out_len,
                 st_err *err);

/* jinja_render with options (opts may be NULL). */
int jinja_render_ex(const jinja_template *t, const json_t *vars, const jinja_render_opts *opts,
                    char **out, size_t *out_len, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* a model's chat template                                                                    */

/* The chat template(s) and special tokens of one tokenizer, parsed once. */
typedef struct chat_template chat_template;

/* Loads the chat template of a tokenizer from its tokenizer_config.json: a chat_template.jinja
 * file next to it wins (as in transformers); otherwise "chat_template" is a string, or a list of
 * {"name", "template"} (the "default" one is used, "tool_use" when tools are given). The special
 * tokens (bos_token, eos_token, unk_token, pad_token, ...; strings or AddedToken objects with
 * "content") become template variables. ST_ERR_MISSING if the tokenizer has no chat template. */
int chat_template_load(chat_template **out, const char *tokenizer_config_path, st_err *err);

/* Frees a chat template; NULL is a no-op. */
void chat_template_free(chat_template *ct);

/* Renders the conversation messages (a JSON array of {"role", "content", ...}) as transformers'
 * apply_chat_template(messages, tokenize=False, add_generation_prompt=..., **extra_kwargs)
 * does. extra_kwargs (a JSON object or NULL) become template variables: "tools", "documents",
 * "enable_thinking", ...; "tools" and "documents" default to None. *out is malloc'ed
 * (NUL-terminated); the caller frees it. opts may be NULL. */
int chat_template_render(const chat_template *ct, const json_t *messages, int add_generation_prompt,
                         const json_t *extra_kwargs, const jinja_render_opts *opts, char **out,
                         st_err *err);

/* One-shot convenience: chat_template_load + chat_template_render + chat_template_free. */
int chat_template_render_config(const char *tokenizer_config_json_path, const json_t *messages,
                                int add_generation_prompt, const json_t *extra_kwargs, char **out,
                                st_err *err);

#ifdef __cplusplus
}
#endif
#endif
