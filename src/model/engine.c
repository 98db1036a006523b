/* engine.c — model + tokenizer + chat template + generation loop (see strata/engine.h). */
#include "strata/engine.h"

#include "strata/gpu.h"
#include "strata/hub.h"
#include "strata/jinja.h"
#include "strata/stop.h"
#include "strata/synth.h"
#include "strata/tok.h"

#include <stdlib.h>
#include <string.h>

struct engine {
    model *m;
    model_ctx *ctx;
    tok_tokenizer *tok;        /* NULL if the model has none                                 */
    chat_template *tmpl;       /* NULL if none                                               */
    char *dir;                 /* resolved model directory (NULL for synthetic)              */
    int32_t eos[16];
    int n_eos;
    int max_ctx, n_slots;
    int32_t *slot_tokens;      /* [n_slots, max_ctx] tokens whose K/V each slot holds         */
    int *slot_len;             /* [n_slots]                                                   */
    float *logits;             /* [n_vocab]                                                   */
};

const model *engine_model(const engine *e) { return e->m; }
model_ctx *engine_ctx(engine *e) { return e->ctx; }
int engine_has_tokenizer(const engine *e) { return e->tok != NULL; }
int engine_has_template(const engine *e) { return e->tmpl != NULL; }
int engine_max_ctx(const engine *e) { return e->max_ctx; }

static void add_eos(engine *e, int32_t id) {
    if (id < 0 || id >= e->m->desc.n_vocab) return;
    for (int i = 0; i < e->n_eos; i++)
        if (e->eos[i] == id) return;
    if (e->n_eos < (int)(sizeof e->eos / sizeof e->eos[0])) e->eos[e->n_eos++] = id;
}

int engine_open(engine **out, const char *spec, const engine_opts *opts, st_err *err) {
    *out = NULL;
    engine_opts o = {0};
    if (opts) o = *opts;
    engine *e = calloc(1, sizeof *e);
    if (!e) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int rc = ST_OK;
    if (o.synthetic) {
        rc = synth_model(&e->m, o.synthetic, 1, NULL, err);
    } else {
        hub_opts ho = {0};
        ho.offline = o.offline;
        rc = hub_resolve(spec, &ho, &e->dir, err);
        if (!rc) rc = model_load(&e->m, e->dir, NULL, err);
    }
    if (rc) goto fail;
    const model_desc *d = &e->m->desc;
    /* tokenizer and chat template: from --tokenizer DIR, else the model directory */
    const char *tdir = o.tokenizer_dir ? o.tokenizer_dir : e->dir;
    if (tdir) {
        char *tj = st_path_join(tdir, "tokenizer.json"), *tc = st_path_join(tdir, "tokenizer_config.json");
        if (!tj || !tc) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        if (!rc && st_path_exists(tj)) rc = tok_load(&e->tok, tj, err);
        if (!rc && st_path_exists(tc)) {
            st_err terr = {0};
            int r = chat_template_load(&e->tmpl, tc, &terr);
            if (r && r != ST_ERR_MISSING) {
                rc = r;
                *err = terr;
            }
        }
        free(tj);
        free(tc);
        if (rc) goto fail;
    }
    /* EOS: config.json + generation_config.json (+ the tokenizer's end-of-turn tokens) */
    for (int i = 0; i < d->n_eos; i++) add_eos(e, d->eos_ids[i]);
    if (e->dir) {
        int32_t ids[16];
        int n = 0;
        if (!stop_load_eos(e->dir, ids, 16, &n, err))
            for (int i = 0; i < n; i++) add_eos(e, ids[i]);
    }
    if (e->tok && e->tmpl) {
        const char *turn_ends[] = {"<|im_end|>", "<|eot_id|>", "[e~[", NULL};
        for (int i = 0; turn_ends[i]; i++) add_eos(e, tok_token_id(e->tok, turn_ends[i]));
    }
    e->n_slots = o.n_slots > 0 ? o.n_slots : 1;
    e->max_ctx = o.max_ctx > 0 ? o.max_ctx : (int)(d->max_pos < 4096 ? d->max_pos : 4096);
    if (e->max_ctx > d->max_pos) {
        rc = st_err_set(err, ST_ERR_ARG, "context %d exceeds the model's max_position_embeddings %lld", e->max_ctx,
                        (long long)d->max_pos);
        goto fail;
    }
    model_ctx_opts co = {.max_ctx = e->max_ctx, .n_slots = e->n_slots, .max_batch = 256, .n_threads = o.n_threads, .exact = o.exact};
    if ((rc = model_ctx_init(&e->ctx, e->m, &co, err))) goto fail;
    st_backend_announce(st_pool_threads(model_ctx_pool(e->ctx)));
    e->slot_tokens = calloc((size_t)e->n_slots * (size_t)e->max_ctx, sizeof(int32_t));
    e->slot_len = calloc((size_t)e->n_slots, sizeof(int));
    e->logits = malloc((size_t)d->n_vocab * sizeof(float));
    if (!e->slot_tokens || !e->slot_len || !e->logits) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto fail;
    }
    *out = e;
    return ST_OK;
fail:
    engine_free(e);
    return rc;
}

void engine_free(engine *e) {
    if (!e) return;
    model_ctx_free(e->ctx);
    model_free(e->m);
    tok_free(e->tok);
    chat_template_free(e->tmpl);
    free(e->dir);
    free(e->slot_tokens);
    free(e->slot_len);
    free(e->logits);
    free(e);
}

int engine_render_chat(const engine *e, const json_t *messages, int add_generation_prompt, const json_t *extra,
                       char **out, st_err *err) {
    *out = NULL;
    if (!e->tmpl) return st_err_set(err, ST_ERR_MISSING, "the model has no chat template (use --raw, or --tokenizer DIR)");
    return chat_template_render(e->tmpl, messages, add_generation_prompt, extra, NULL, out, err);
}

int engine_tokenize(const engine *e, const char *text, int add_special, int32_t **ids, size_t *n, st_err *err) {
    *ids = NULL;
    *n = 0;
    if (!e->tok) return st_err_set(err, ST_ERR_MISSING, "the model has no tokenizer.json (use --tokenizer DIR)");
    return tok_encode(e->tok, text, strlen(text), add_special, ids, n, err);
}

void engine_slot_reset(engine *e, int slot) {
    if (slot >= 0 && slot < e->n_slots) e->slot_len[slot] = 0;
}

int engine_generate(engine *e, const gen_request *req, gen_result *res, st_err *err) {
    memset(res, 0, sizeof *res);
    res->finish = "stop";
    const int V = e->m->desc.n_vocab, slot = req->slot;
    if (slot < 0 || slot >= e->n_slots) return st_err_set(err, ST_ERR_ARG, "slot %d does not exist", slot);
    if (!req->n_prompt) return st_err_set(err, ST_ERR_ARG, "empty prompt");
    if ((int64_t)req->n_prompt >= e->max_ctx)
        return st_err_set(err, ST_ERR_ARG, "prompt of %zu tokens does not fit the context of %d tokens", req->n_prompt,
                          e->max_ctx);
    if (req->on_text && !e->tok) return st_err_set(err, ST_ERR_MISSING, "the model has no tokenizer.json (use --tokenizer DIR)");
    int rc = ST_OK;
    smp_sampler *smp = NULL;
    stop_matcher *sm = NULL;
    tok_stream *ts = NULL;
    char *emit = NULL;
    smp = smp_init(&req->sampling, V, (size_t)e->max_ctx, err);
    if (!smp) return err->code ? err->code : ST_ERR_NOMEM;
    if (req->on_text) {
        sm = stop_matcher_init(req->stop, req->n_stop, err);
        if (!sm || (rc = tok_stream_init(&ts, e->tok, 1, err))) {
            rc = rc ? rc : err->code;
            goto out;
        }
    }
    size_t emit_cap = 4096 + (sm ? stop_matcher_hold_max(sm) : 0);
    emit = malloc(emit_cap);
    if (!emit) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    smp_accept_prompt(smp, req->prompt, req->n_prompt);
    /* prefix reuse: keep the cached tokens that match, always recompute at least the last */
    int32_t *cached = e->slot_tokens + (size_t)slot * e->max_ctx;
    int keep = 0, have = e->slot_len[slot];
    while (keep < have && keep < (int)req->n_prompt - 1 && cached[keep] == req->prompt[keep]) keep++;
    res->n_prompt = (int)req->n_prompt;
    res->n_cached = keep;
    double t0 = st_time_s();
    int32_t posbuf[256], slotbuf[256];
    for (int p = keep; p < (int)req->n_prompt; p += 256) {
        int n = (int)req->n_prompt - p < 256 ? (int)req->n_prompt - p : 256;
        for (int i = 0; i < n; i++) posbuf[i] = p + i, slotbuf[i] = slot;
        rc = model_forward(e->ctx, req->prompt + p, posbuf, slotbuf, n, e->logits,
                           p + n == (int)req->n_prompt ? LOGITS_LAST : LOGITS_NONE, err);
        if (rc) goto out;
    }
    memcpy(cached, req->prompt, req->n_prompt * sizeof(int32_t));
    e->slot_len[slot] = (int)req->n_prompt;
    double t1 = st_time_s();
    res->prefill_s = t1 - t0;
    int pos = (int)req->n_prompt;
    int limit = req->max_tokens > 0 ? req->max_tokens : e->max_ctx;
    for (;;) {
        int32_t id = smp_sample(smp, e->logits);
        smp_accept(smp, id);
        if (res->n_generated == 0) res->ttft_s = st_time_s() - t0;
        res->n_generated++;
        int r = stop_check_token(e->eos, e->n_eos, id, res->n_generated, limit);
        size_t k = 0;
        if (r == STOP_EOS) {
            if (sm && !stop_matcher_flush(sm, emit, emit_cap, &k) && k && req->on_text) req->on_text(req->user, emit, k);
            res->finish = "stop";
            break;
        }
        if (req->on_text) {
            const char *txt;
            size_t len;
            if ((rc = tok_stream_push(ts, id, &txt, &len, err))) goto out;
            int fr = STOP_NONE;
            while (len > 0) { /* pieces are short; chunk only to bound the emit buffer */
                size_t chunk = len < 4096 ? len : 4096;
                fr = stop_matcher_feed(sm, txt, chunk, emit, emit_cap, &k);
                if (k && req->on_text(req->user, emit, k)) {
                    res->finish = "cancelled";
                    goto done;
                }
                txt += chunk;
                len -= chunk;
                if (fr == STOP_STRING) break;
            }
            if (fr == STOP_STRING) {
                res->finish = "stop";
                break;
            }
        }
        if (r == STOP_LENGTH || pos + 1 >= e->max_ctx) {
            res->finish = "length";
            if (req->on_text) {
                const char *txt;
                size_t len;
                if (!tok_stream_flush(ts, &txt, &len, err) && len) {
                    stop_matcher_feed(sm, txt, len < 4096 ? len : 4096, emit, emit_cap, &k);
                    if (k) req->on_text(req->user, emit, k);
                }
                if (!stop_matcher_flush(sm, emit, emit_cap, &k) && k) req->on_text(req->user, emit, k);
            }
            break;
        }
        int32_t sl = slot;
        if ((rc = model_forward(e->ctx, &id, &pos, &sl, 1, e->logits, LOGITS_LAST, err))) goto out;
        cached[pos] = id;
        e->slot_len[slot] = ++pos;
    }
done:
    res->decode_s = st_time_s() - t1;
out:
    free(emit);
    tok_stream_free(ts);
    stop_matcher_free(sm);
    smp_free(smp);
    return rc;
}
