/* run_cluster.c — `strata run MODEL_DIR PROMPT --peers A:P,...`: the coordinator side of a
 * generation on a cluster. The nodes hold the weights; this process only tokenises, renders
 * the chat template, streams the tokens that come back, and detokenises them. */
#include "app.h"
#include "strata/cluster.h"
#include "strata/jinja.h"
#include "strata/stop.h"
#include "strata/tok.h"

#include <stdlib.h>
#include <string.h>

typedef struct run_stream {
    tok_stream *ts;
    st_err *err;
    int failed;
} run_stream;

static void on_token(void *ud, int seq, int32_t id, const float *logits, int n_vocab) {
    (void)seq, (void)logits, (void)n_vocab;
    run_stream *s = ud;
    const char *t;
    size_t n;
    if (!s->failed && !tok_stream_push(s->ts, id, &t, &n, s->err)) {
        fwrite(t, 1, n, stdout);
        fflush(stdout);
    } else {
        s->failed = 1;
    }
}

int run_cluster(const char *dir, const char *peers, const char *prompt, const char *system, int raw, int max_tokens,
                const smp_params *sp, int threads) {
    st_err err = {0};
    tok_tokenizer *tok = NULL;
    chat_template *ct = NULL;
    coord *c = NULL;
    tok_stream *ts = NULL;
    char *text = NULL;
    int32_t *ids = NULL, *out = NULL, eos[16];
    size_t n = 0;
    int n_eos = 0, rc = 1, n_out = 0;
    char *tj = st_path_join(dir, "tokenizer.json"), *tc = st_path_join(dir, "tokenizer_config.json");
    if (!tj || !tc || tok_load(&tok, tj, &err)) goto fail;
    if (!raw && chat_template_load(&ct, tc, &err)) goto fail;
    if (raw) {
        text = strdup(prompt);
    } else {
        json_t *msgs = json_array();
        if (system) json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "system", "content", system));
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", prompt));
        int r = chat_template_render(ct, msgs, 1, NULL, NULL, &text, &err);
        json_decref(msgs);
        if (r) goto fail;
    }
    if (!text || tok_encode(tok, text, strlen(text), raw, &ids, &n, &err)) goto fail;
    if (stop_load_eos(dir, eos, 12, &n_eos, &err)) n_eos = 0;
    const char *ends[] = {"<|im_end|>", "<|eot_id|>"};
    for (int i = 0; i < 2 && n_eos < 16; i++) {
        int32_t id = tok_token_id(tok, ends[i]);
        if (id >= 0) eos[n_eos++] = id;
    }
    coord_opts o = {.model_dir = dir, .peers = peers, .max_ctx = (int)n + max_tokens + 8, .n_slots = 1, .n_threads = threads};
    if (coord_init(&c, &o, &err)) goto fail;
    if (tok_stream_init(&ts, tok, 1, &err)) goto fail;
    out = malloc((size_t)max_tokens * sizeof(int32_t));
    if (!out) goto fail;
    run_stream rs = {ts, &err, 0};
    coord_stats st;
    double t0 = st_time_s();
    if (coord_generate(c, ids, (int)n, sp, max_tokens, eos, n_eos, out, &n_out, on_token, &rs, &st, &err)) goto fail;
    const char *tail;
    size_t tl;
    if (!tok_stream_flush(ts, &tail, &tl, &err)) fwrite(tail, 1, tl, stdout);
    fprintf(stderr, "\nstrata: prompt %zu tokens, %d generated on %d stages (%s) in %.2f s, decode %.1f tok/s, "
                    "orchestration %.1f us/token\n",
            n, n_out, st.n_stages, st.data_link, st_time_s() - t0,
            st.decode_token_ms > 0 ? 1e3 / st.decode_token_ms : 0, st.orch_us_per_token);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "strata: %s\n", err.msg[0] ? err.msg : "out of memory");
done:
    tok_stream_free(ts);
    coord_free(c);
    chat_template_free(ct);
    tok_free(tok);
    free(text), free(ids), free(out), free(tj), free(tc);
    return rc;
}
