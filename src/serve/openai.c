/* openai.c — OpenAI API request validation and response/chunk JSON (see serve_internal.h).
 *
 * Requests are parsed with jansson; every rejected field is named in the error's `param` and
 * message. Unknown fields are ignored (clients send vendor extensions). Responses follow the
 * shapes of api.openai.com: chat.completion / chat.completion.chunk / text_completion.
 */
#include "serve_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// buffers

int sbuf_put(sbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int sbuf_printf(sbuf *b, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    if ((size_t)n < sizeof tmp) return sbuf_put(b, tmp, (size_t)n);
    char *big = malloc((size_t)n + 1);
    if (!big) return -1;
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int rc = sbuf_put(b, big, (size_t)n);
    free(big);
    return rc;
}

void sbuf_free(sbuf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

// ---------------------------------------------------------------------------------------------
// errors

int oai_error_set(oai_error *e, int status, const char *type, const char *param, const char *code, const char *fmt,
                  ...) {
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "invalid_request_error");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return status;
}

char *oai_error_json(const oai_error *e) {
    json_t *o = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", e->message, "type", e->type, "param",
                          e->param[0] ? json_string(e->param) : json_null(), "code",
                          e->code[0] ? json_string(e->code) : json_null());
    if (!o) return NULL;
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

#define BAD(param, ...) oai_error_set(e, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// field helpers: each returns 0 (absent or valid), or 400 with e filled

static int get_number(json_t *root, const char *key, double lo, double hi, double *out, oai_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return BAD(key, "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return BAD(key, "'%s' must be in [%g, %g], got %g", key, lo, hi, x);
    *out = x;
    return 0;
}

static int get_int(json_t *root, const char *key, int64_t lo, int64_t hi, int64_t *out, int *given, oai_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) && fabs(json_real_value(v)) < 9e15) {
        *out = (int64_t)json_real_value(v);
    } else if (json_is_integer(v)) {
        *out = json_integer_value(v);
    } else {
        return BAD(key, "'%s' must be an integer", key);
    }
    if (*out < lo || *out > hi) return BAD(key, "'%s' must be in [%lld, %lld], got %lld", key, (long long)lo, (long long)hi,
                                           (long long)*out);
    if (given) *given = 1;
    return 0;
}

static int get_bool(json_t *root, const char *key, int *out, oai_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return BAD(key, "'%s' must be a boolean", key);
    *out = json_is_true(v);
    return 0;
}

/* Flattens a message content (string, null, or an array of {type:"text", text} parts). */
static int content_text(json_t *c, int idx, char **out, oai_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", idx);
    if (!c || json_is_null(c)) {
        *out = strdup("");
        return *out ? 0 : 500;
    }
    if (json_is_string(c)) {
        *out = strdup(json_string_value(c));
        return *out ? 0 : 500;
    }
    if (!json_is_array(c)) return BAD(param, "'%s' must be a string or an array of content parts", param);
    sbuf b = {0};
    sbuf_put(&b, "", 0);
    size_t i;
    json_t *part;
    json_array_foreach(c, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        const char *text = json_string_value(json_object_get(part, "text"));
        if (!type || strcmp(type, "text") || !text) {
            sbuf_free(&b);
            return BAD(param, "'%s[%zu]': only {\"type\": \"text\", \"text\": ...} parts are supported", param, i);
        }
        sbuf_put(&b, text, strlen(text));
    }
    *out = b.p;
    return 0;
}

static int parse_messages(oai_request *r, json_t *root, oai_error *e) {
    json_t *msgs = json_object_get(root, "messages");
    if (!msgs) return BAD("messages", "'messages' is required");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) return BAD("messages", "'messages' must be a non-empty array");
    r->messages = json_array();
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        char param[64];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(m)) return BAD(param, "'%s' must be an object", param);
        const char *role = json_string_value(json_object_get(m, "role"));
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!role) return BAD(param, "'%s' is required and must be a string", param);
        if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant") && strcmp(role, "tool") &&
            strcmp(role, "developer"))
            return BAD(param, "'%s' must be one of system, developer, user, assistant, tool; got '%s'", param, role);
        char *text = NULL;
        int rc = content_text(json_object_get(m, "content"), (int)i, &text, e);
        if (rc) return rc;
        json_t *nm = json_deep_copy(m);
        json_object_set_new(nm, "content", json_string(text));
        if (!strcmp(role, "developer")) json_object_set_new(nm, "role", json_string("system"));
        free(text);
        json_array_append_new(r->messages, nm);
    }
    return 0;
}

static int parse_stop(oai_request *r, json_t *root, oai_error *e) {
    json_t *v = json_object_get(root, "stop");
    if (!v || json_is_null(v)) return 0;
    if (json_is_string(v)) {
        if (!json_string_length(v)) return BAD("stop", "'stop' must not be empty");
        r->stop[r->n_stop++] = strdup(json_string_value(v));
        return 0;
    }
    if (!json_is_array(v)) return BAD("stop", "'stop' must be a string or an array of strings");
    if (json_array_size(v) > OAI_MAX_STOP) return BAD("stop", "'stop' has more than %d strings", OAI_MAX_STOP);
    size_t i;
    json_t *s;
    json_array_foreach(v, i, s) {
        if (!json_is_string(s) || !json_string_length(s))
            return BAD("stop", "'stop[%zu]' must be a non-empty string", i);
        r->stop[r->n_stop++] = strdup(json_string_value(s));
    }
    return 0;
}

static int parse_logit_bias(oai_request *r, json_t *root, int32_t n_vocab, oai_error *e) {
    json_t *v = json_object_get(root, "logit_bias");
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v)) return BAD("logit_bias", "'logit_bias' must be an object mapping token ids to numbers");
    size_t n = json_object_size(v);
    if (n > (size_t)(n_vocab > 0 ? n_vocab : 1 << 20)) return BAD("logit_bias", "'logit_bias' has too many entries");
    r->bias = calloc(n ? n : 1, sizeof *r->bias);
    if (!r->bias) return oai_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    const char *key;
    json_t *val;
    json_object_foreach(v, key, val) {
        char *end = NULL;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || (n_vocab > 0 && id >= n_vocab))
            return BAD("logit_bias", "'logit_bias' key '%s' is not a token id in [0, %d)", key, n_vocab);
        if (!json_is_number(val)) return BAD("logit_bias", "'logit_bias[%s]' must be a number", key);
        double b = json_number_value(val);
        if (!(b >= -100 && b <= 100)) return BAD("logit_bias", "'logit_bias[%s]' must be in [-100, 100], got %g", key, b);
        /* OpenAI: -100 effectively bans the token */
        r->bias[r->sampling.n_logit_bias].id = (int32_t)id;
        r->bias[r->sampling.n_logit_bias].bias = b <= -100 ? -INFINITY : (float)b;
        r->sampling.n_logit_bias++;
    }
    r->sampling.logit_bias = r->bias;
    return 0;
}

static int parse_prompt(oai_request *r, json_t *root, int32_t n_vocab, oai_error *e) {
    json_t *p = json_object_get(root, "prompt");
    if (!p) return BAD("prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0))) p = json_array_get(p, 0);
    if (json_is_string(p)) {
        r->prompt = strdup(json_string_value(p));
        return 0;
    }
    if (json_is_array(p) && json_array_size(p) > 0) {
        size_t n = json_array_size(p);
        r->prompt_ids = malloc(n * sizeof(int32_t));
        if (!r->prompt_ids) return oai_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *t = json_array_get(p, i);
            if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= n_vocab)
                return BAD("prompt", "'prompt' must be a string, or an array of token ids in [0, %d); element %zu is not",
                           n_vocab, i);
            r->prompt_ids[i] = (int32_t)json_integer_value(t);
        }
        r->n_prompt_ids = n;
        return 0;
    }
    return BAD("prompt", "'prompt' must be a string or an array of token ids (batches of prompts are not supported)");
}

// ---------------------------------------------------------------------------------------------
// request

int oai_request_parse(oai_request *r, int kind, const char *body, size_t len, int32_t n_vocab, oai_error *e) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->sampling = smp_params_default();
    r->sampling.temperature = 1.0f;
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) return BAD(NULL, "invalid JSON in the request body: %s (line %d, column %d)", je.text, je.line, je.column);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = BAD(NULL, "the request body must be a JSON object");
        goto out;
    }
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            rc = BAD("model", "'model' must be a string");
            goto out;
        }
        r->model = strdup(json_string_value(model));
    }
    if (kind == OAI_CHAT) {
        if ((rc = parse_messages(r, root, e))) goto out;
        json_t *kw = json_object_get(root, "chat_template_kwargs");
        if (kw && !json_is_null(kw)) {
            if (!json_is_object(kw)) {
                rc = BAD("chat_template_kwargs", "'chat_template_kwargs' must be an object");
                goto out;
            }
            r->template_kwargs = json_incref(kw);
        }
    } else {
        if ((rc = parse_prompt(r, root, n_vocab, e))) goto out;
        json_t *echo = json_object_get(root, "echo");
        if (json_is_true(echo)) {
            rc = BAD("echo", "'echo' is not supported");
            goto out;
        }
        json_t *suffix = json_object_get(root, "suffix");
        if (suffix && !json_is_null(suffix)) {
            rc = BAD("suffix", "'suffix' is not supported");
            goto out;
        }
        int64_t best_of = 1;
        if ((rc = get_int(root, "best_of", 1, 1, &best_of, NULL, e))) goto out;
    }
    if ((rc = get_bool(root, "stream", &r->stream, e))) goto out;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) {
            rc = BAD("stream_options", "'stream_options' must be an object");
            goto out;
        }
        json_t *iu = json_object_get(so, "include_usage");
        if (iu && !json_is_boolean(iu)) {
            rc = BAD("stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
            goto out;
        }
        r->include_usage = json_is_true(iu);
    }
    int64_t n = 1, mt = 0;
    if ((rc = get_int(root, "n", 1, 1 << 30, &n, NULL, e))) goto out;
    if (n != 1) {
        rc = BAD("n", "'n' must be 1 (only one choice per request is supported), got %lld", (long long)n);
        goto out;
    }
    if ((rc = get_int(root, "max_tokens", 1, 1 << 30, &mt, NULL, e))) goto out;
    if ((rc = get_int(root, "max_completion_tokens", 1, 1 << 30, &mt, NULL, e))) goto out;
    r->max_tokens = (int)mt;
    double x;
    x = r->sampling.temperature;
    if ((rc = get_number(root, "temperature", 0, 2, &x, e))) goto out;
    r->sampling.temperature = (float)x;
    x = 1;
    if ((rc = get_number(root, "top_p", 0, 1, &x, e))) goto out;
    if (x <= 0) {
        rc = BAD("top_p", "'top_p' must be in (0, 1]");
        goto out;
    }
    r->sampling.top_p = (float)x;
    x = 0;
    if ((rc = get_number(root, "min_p", 0, 1, &x, e))) goto out;
    r->sampling.min_p = (float)x;
    x = 0;
    if ((rc = get_number(root, "presence_penalty", -2, 2, &x, e))) goto out;
    r->sampling.presence_penalty = (float)x;
    x = 0;
    if ((rc = get_number(root, "frequency_penalty", -2, 2, &x, e))) goto out;
    r->sampling.frequency_penalty = (float)x;
    x = 1;
    if ((rc = get_number(root, "repetition_penalty", 0.01, 10, &x, e))) goto out;
    r->sampling.repetition_penalty = (float)x;
    int64_t k = 0, seed = 0;
    if ((rc = get_int(root, "top_k", -1, 1 << 30, &k, NULL, e))) goto out;
    r->sampling.top_k = k > 0 ? (int32_t)k : 0;
    if ((rc = get_int(root, "seed", INT64_MIN, INT64_MAX, &seed, &r->seed_given, e))) goto out;
    r->sampling.seed = (uint64_t)seed;
    if ((rc = parse_stop(r, root, e))) goto out;
    if ((rc = parse_logit_bias(r, root, n_vocab, e))) goto out;
    if (kind == OAI_CHAT) {
        if ((rc = get_bool(root, "logprobs", &r->logprobs, e))) goto out;
        int64_t tl = 0;
        int tl_given = 0;
        if ((rc = get_int(root, "top_logprobs", 0, OAI_MAX_TOP_LOGPROBS, &tl, &tl_given, e))) goto out;
        if (tl_given && !r->logprobs && tl > 0) {
            rc = BAD("top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
            goto out;
        }
        r->top_logprobs = (int)tl;
    } else {
        /* legacy completions: logprobs is the number of alternatives (0..5), null = off */
        int64_t lp = -1;
        int given = 0;
        if ((rc = get_int(root, "logprobs", 0, 5, &lp, &given, e))) goto out;
        if (given) {
            r->logprobs = 1;
            r->top_logprobs = (int)lp;
        }
    }
    json_t *tools = json_object_get(root, "tools");
    if (tools && json_is_array(tools) && json_array_size(tools) > 0) {
        rc = BAD("tools", "'tools' (function calling) is not supported");
        goto out;
    }
out:
    json_decref(root);
    if (rc) oai_request_free(r);
    return rc;
}

void oai_request_free(oai_request *r) {
    free(r->model);
    json_decref(r->messages);
    json_decref(r->template_kwargs);
    free(r->prompt);
    free(r->prompt_ids);
    free(r->bias);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    int kind = r->kind;
    memset(r, 0, sizeof *r);
    r->kind = kind;
}

// ---------------------------------------------------------------------------------------------
// responses

json_t *oai_usage_json(const oai_usage *u) {
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", u->prompt_tokens, "completion_tokens",
                     u->completion_tokens, "total_tokens", u->prompt_tokens + u->completion_tokens,
                     "prompt_tokens_details", "cached_tokens", u->cached_tokens);
}

json_t *oai_timings_json(const oai_usage *u) {
    double tps = u->decode_s > 0 && u->completion_tokens > 1 ? (u->completion_tokens - 1) / u->decode_s : 0;
    double pps = u->prefill_s > 0 ? (u->prompt_tokens - u->cached_tokens) / u->prefill_s : 0;
    return json_pack("{s:i, s:i, s:f, s:f, s:i, s:f, s:f, s:f, s:f}", "prompt_n", u->prompt_tokens, "cached_n",
                     u->cached_tokens, "prompt_ms", u->prefill_s * 1e3, "prompt_per_second", pps, "predicted_n",
                     u->completion_tokens, "predicted_ms", u->decode_s * 1e3, "predicted_per_second", tps, "ttft_ms",
                     u->ttft_s * 1e3, "queue_ms", u->queue_s * 1e3);
}

/* Length of the valid UTF-8 sequence at s[i] (1..4), or 0 if the bytes there are not one
 * (bad lead byte, truncated, bad continuation, overlong, surrogate, > U+10FFFF). */
static int utf8_seq_len(const char *s, size_t i, size_t n) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) return 1;
    int len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!len || i + (size_t)len > n) return 0;
    uint32_t cp = len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < len; k++) {
        unsigned char cc = (unsigned char)s[i + (size_t)k];
        if ((cc >> 6) != 2) return 0;
        cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        return 0;
    return len;
}

/* A JSON string from bytes that may hold invalid UTF-8 (each bad byte becomes U+FFFD). */
static json_t *json_text(const char *s, size_t n) {
    json_t *j = json_stringn(s, n);
    if (j) return j;
    sbuf clean = {0};
    for (size_t i = 0; i < n;) {
        int len = utf8_seq_len(s, i, n);
        if (len) {
            sbuf_put(&clean, s + i, (size_t)len);
            i += (size_t)len;
        } else {
            sbuf_put(&clean, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
    j = json_stringn(clean.p ? clean.p : "", clean.len);
    sbuf_free(&clean);
    return j;
}

json_t *oai_chunk_json(int kind, const char *id, const char *model, int64_t created, const char *text, size_t len,
                       int first, const char *finish, json_t *logprobs) {
    json_t *choice;
    if (kind == OAI_CHAT) {
        json_t *delta = json_object();
        if (first) json_object_set_new(delta, "role", json_string("assistant"));
        if (len || first) json_object_set_new(delta, "content", json_text(text ? text : "", len));
        choice = json_pack("{s:i, s:o}", "index", 0, "delta", delta);
    } else {
        choice = json_pack("{s:o, s:i}", "text", json_text(text ? text : "", len), "index", 0);
    }
    json_object_set_new(choice, "logprobs", logprobs ? json_incref(logprobs) : json_null());
    json_object_set_new(choice, "finish_reason", finish ? json_string(finish) : json_null());
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:[o]}", "id", id, "object",
                     kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)created,
                     "model", model, "system_fingerprint", "strata", "choices", choice);
}

json_t *oai_response_json(int kind, const char *id, const char *model, int64_t created, const char *text, size_t len,
                          const char *finish, json_t *logprobs, const oai_usage *u) {
    json_t *choice;
    if (kind == OAI_CHAT) {
        choice = json_pack("{s:i, s:{s:s, s:o}}", "index", 0, "message", "role", "assistant", "content",
                           json_text(text ? text : "", len));
    } else {
        choice = json_pack("{s:o, s:i}", "text", json_text(text ? text : "", len), "index", 0);
    }
    json_object_set_new(choice, "logprobs", logprobs ? json_incref(logprobs) : json_null());
    json_object_set_new(choice, "finish_reason", json_string(finish ? finish : "stop"));
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:[o], s:o, s:o}", "id", id, "object",
                     kind == OAI_CHAT ? "chat.completion" : "text_completion", "created", (json_int_t)created,
                     "model", model, "system_fingerprint", "strata", "choices", choice, "usage", oai_usage_json(u),
                     "timings", oai_timings_json(u));
}

json_t *oai_logprobs_legacy(const json_t *content, size_t text_offset0) {
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    size_t off = text_offset0, i;
    json_t *ent;
    json_array_foreach(content, i, ent) {
        json_t *tok = json_object_get(ent, "token");
        json_array_append(tokens, tok);
        json_array_append(lps, json_object_get(ent, "logprob"));
        json_t *map = json_object();
        size_t j;
        json_t *alt;
        json_array_foreach(json_object_get(ent, "top_logprobs"), j, alt)
            json_object_set(map, json_string_value(json_object_get(alt, "token")), json_object_get(alt, "logprob"));
        json_array_append_new(tops, map);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += json_string_length(tok);
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps, "top_logprobs", tops,
                     "text_offset", offs);
}

int oai_sse_event(sbuf *b, const json_t *obj) {
    char *s = json_dumps(obj, JSON_COMPACT);
    if (!s) return -1;
    int rc = sbuf_put(b, "data: ", 6) || sbuf_put(b, s, strlen(s)) || sbuf_put(b, "\n\n", 2) ? -1 : 0;
    free(s);
    return rc;
}

int oai_json_escape(sbuf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char t[2] = {'\\', (char)c};
            if (sbuf_put(b, t, 2)) return -1;
            i++;
        } else if (c < 0x20) {
            char t[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            const char *shortf = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r" : NULL;
            if (shortf ? sbuf_put(b, shortf, 2) : sbuf_put(b, t, 6)) return -1;
            i++;
        } else if (c < 0x80) {
            if (sbuf_put(b, (const char *)&s[i], 1)) return -1;
            i++;
        } else {
            int len = utf8_seq_len(s, i, n);
            if (len) {
                if (sbuf_put(b, s + i, (size_t)len)) return -1;
                i += (size_t)len;
            } else {
                if (sbuf_put(b, "\xEF\xBF\xBD", 3)) return -1;
                i++;
            }
        }
    }
    return 0;
}
