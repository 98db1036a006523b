/* cmd_eval_golden.c — `strata eval-golden DIR`: reproduce transformers' logits.
 *
 * DIR is a model directory holding golden.safetensors with, for K = 0, 1, ...:
 *   prompt_K  I32 [T]          token ids
 *   logits_K  F32 [T, vocab]   next-token logits after each prefix (transformers, float64)
 *   greedy_K  I32 [G]          greedy continuation
 * Each prompt is checked three ways: one prefill over the whole prompt (logits of every
 * position), the decode path (one token at a time through the KV cache), and the greedy
 * continuation. A prompt passes when max|dlogit| <= tol * max|logit| on both paths and every
 * greedy token matches.
 *
 * --criteria KEY takes the pass criteria from DIR/golden.json's "tolerance" object instead:
 * "fp32_engine" ("max|dlogit| <= 1e-3 * max|logit| per prompt; greedy identical") or
 * "bf16_activations" ("max|dlogit| <= 3e-2 * max|logit|; top-1 agrees on >= 99% of
 * positions"): the numbers are parsed from that text, so the fixture file stays the one place
 * that states them. With a top-1 criterion, the agreement counts the argmax of every prefill
 * and decode position against transformers' over all prompts, and the greedy continuation is
 * reported but only required when the text says "greedy identical". The fast path's golden
 * tests use bf16_activations (the issue allows quantized activations on the fast path under
 * that tolerance; 4-bit decode linears use int8 activations there).
 */
#include "app.h"
#include "strata/model.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct golden_case {
    const int32_t *prompt; /* [T] */
    const float *logits;   /* [T, V] */
    const int32_t *greedy; /* [G] */
    int T, G;
} golden_case;

static int32_t argmax(const float *x, int n) {
    int32_t b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* max |a-b| and max |b| over n values. */
static void diff_stats(const float *a, const float *b, size_t n, double *max_d, double *max_ref) {
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= *max_d)) *max_d = d; /* NaN propagates as failure */
        if (fabs(b[i]) > *max_ref) *max_ref = fabs(b[i]);
    }
}

static int load_case(const sft_set *g, int k, int vocab, golden_case *c, const char *path, st_err *err) {
    char n1[32], n2[32], n3[32];
    snprintf(n1, sizeof n1, "prompt_%d", k);
    snprintf(n2, sizeof n2, "logits_%d", k);
    snprintf(n3, sizeof n3, "greedy_%d", k);
    const sft_tensor *p = sft_set_find(g, n1), *l = sft_set_find(g, n2), *gr = sft_set_find(g, n3);
    if (!p) return 1; /* no more cases */
    if (!l || !gr) return st_err_set(err, ST_ERR_MISSING, "%s: %s present but %s or %s missing", path, n1, n2, n3);
    if (p->dtype != SFT_I32 || p->ndim != 1 || p->shape[0] < 1)
        return st_err_set(err, ST_ERR_FORMAT, "%s: %s must be I32 [T]", path, n1);
    if (l->dtype != SFT_F32 || l->ndim != 2 || l->shape[0] != p->shape[0] || l->shape[1] != vocab)
        return st_err_set(err, ST_ERR_FORMAT, "%s: %s must be F32 [%lld, %d]", path, n2, (long long)p->shape[0], vocab);
    if (gr->dtype != SFT_I32 || gr->ndim != 1)
        return st_err_set(err, ST_ERR_FORMAT, "%s: %s must be I32 [G]", path, n3);
    c->prompt = p->data;
    c->logits = l->data;
    c->greedy = gr->data;
    c->T = (int)p->shape[0];
    c->G = (int)gr->shape[0];
    return 0;
}


/* Pass criteria of a golden run. */
typedef struct golden_crit {
    double tol;      /* max|dlogit| <= tol * max|logit| on prefill and decode               */
    double top1;     /* required top-1 agreement over all positions (fraction); 0: none     */
    int greedy;      /* 1: every greedy token must match                                    */
    char text[160];  /* the criteria as golden.json states them ("" for the built-in default) */
} golden_crit;

/* Reads tolerance[key] of DIR/golden.json and parses its numbers: "max|dlogit| <= X * ..."
 * gives tol, "top-1 ... >= Y%" top1 = Y/100, "greedy identical" greedy = 1. Fails with
 * ST_ERR_MISSING / ST_ERR_FORMAT naming the file and key when it is absent or unparsable. */
static int golden_crit_load(const char *dir, const char *key, golden_crit *c, st_err *err) {
    char *path = st_path_join(dir, "golden.json");
    if (!path) return st_err_set(err, ST_ERR_NOMEM, "eval-golden: out of memory");
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    int rc = 0;
    const char *txt = NULL;
    if (!root) rc = st_err_set(err, ST_ERR_IO, "%s: %s (line %d)", path, je.text, je.line);
    else {
        json_t *v = json_object_get(json_object_get(root, "tolerance"), key);
        txt = json_string_value(v);
        if (!txt) rc = st_err_set(err, ST_ERR_MISSING, "%s: no string tolerance.%s", path, key);
    }
    if (!rc) {
        memset(c, 0, sizeof *c);
        snprintf(c->text, sizeof c->text, "%s", txt);
        const char *a = strstr(txt, "max|dlogit| <=");
        char *end = NULL;
        if (a) c->tol = strtod(a + strlen("max|dlogit| <="), &end);
        if (!a || end == a + strlen("max|dlogit| <=") || !(c->tol > 0 && c->tol < 1))
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: tolerance.%s: no 'max|dlogit| <= X' in \"%s\"", path, key, txt);
        const char *t = strstr(txt, "top-1");
        if (!rc && t) {
            const char *ge = strstr(t, ">=");
            double pct = ge ? strtod(ge + 2, &end) : 0;
            if (!ge || end == ge + 2 || *end != '%' || !(pct > 0 && pct <= 100))
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: tolerance.%s: no 'top-1 ... >= Y%%' in \"%s\"", path, key, txt);
            c->top1 = pct / 100;
        }
        c->greedy = strstr(txt, "greedy identical") != NULL;
    }
    json_decref(root);
    free(path);
    return rc;
}

#ifdef STRATA_HAVE_CUDA
#include "strata/cuda_backend.h"

/* --device cuda: the same three checks on the GPU with the bf16 criteria of golden.json
 * (max|dlogit| <= tol * max|logit| on prefill and decode, top-1 agreement >= 99% of all
 * positions); the greedy continuation runs on the device and is reported, not required. */
/* One forward pass on the single GPU or over the tensor-parallel group. */
static int cuda_fwd(cuda_model *cm, cuda_tp *ct, const int32_t *tok, const int32_t *pos, const int32_t *slot, int T,
                    float *logits, logits_mode mode, st_err *err) {
    return ct ? cuda_tp_forward(ct, tok, pos, slot, T, logits, mode, err)
              : cuda_model_forward(cm, tok, pos, slot, T, logits, mode, err);
}

static int eval_cuda(const model *m, golden_case *cases, int n_cases, int max_len, int batch, double tol, float *logits,
                     int tp) {
    st_err err = {0};
    cuda_model *cm = NULL;
    cuda_tp *ct = NULL;
    const int V = m->desc.n_vocab;
    cuda_model_opts o = {.max_ctx = max_len + 1, .n_slots = 1, .max_batch = batch};
    if (o.max_ctx > m->desc.max_pos) o.max_ctx = (int)m->desc.max_pos;
    int devs[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    if (tp > 1 ? cuda_tp_init(&ct, m, &o, devs, tp, &err) : cuda_model_init(&cm, m, &o, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return 1;
    }
    cuda_model_info info;
    if (ct) cuda_tp_get_info(ct, 0, &info);
    else cuda_model_get_info(cm, &info);
    printf("device: %s%s (weights %.1f MB%s)\n", info.device, tp > 1 ? ", tensor parallel" : "", info.weight_bytes / 1e6,
           tp > 1 ? " on GPU 0" : "");
    int32_t *gen = malloc((size_t)max_len * 4 + 4);
    int failed = 0, passed = 0;
    long top1 = 0, npos = 0;
    int32_t *pos = malloc((size_t)max_len * 4), *slot = calloc((size_t)max_len, 4);
    for (int i = 0; i < max_len; i++) pos[i] = i;
    for (int k = 0; k < n_cases; k++) {
        golden_case *c = &cases[k];
        double pre_d = 0, pre_ref = 0, dec_d = 0, dec_ref = 0;
        int ok = !cuda_fwd(cm, ct, c->prompt, pos, slot, c->T, logits, LOGITS_ALL, &err);
        int pre_top = 0, dec_top = 0;
        if (ok) {
            diff_stats(logits, c->logits, (size_t)c->T * V, &pre_d, &pre_ref);
            for (int t = 0; t < c->T; t++)
                pre_top += argmax(logits + (size_t)t * V, V) == argmax(c->logits + (size_t)t * V, V);
        }
        for (int t = 0; t < c->T && ok; t++) {
            if (cuda_fwd(cm, ct, &c->prompt[t], &pos[t], slot, 1, logits, LOGITS_LAST, &err)) ok = 0;
            else {
                diff_stats(logits, c->logits + (size_t)t * V, (size_t)V, &dec_d, &dec_ref);
                dec_top += argmax(logits, V) == argmax(c->logits + (size_t)t * V, V);
            }
        }
        int match = 0;
        if (ok && c->G > 0 && ct) { /* the whole continuation as graph-replayed steps on every GPU */
            int32_t tok = argmax(logits, V);
            int n = c->G - 1 < o.max_ctx - c->T ? c->G - 1 : o.max_ctx - c->T;
            if (tok == c->greedy[0]) {
                match = 1;
                if (n > 0 && cuda_tp_generate_greedy(ct, tok, c->T, 0, n, gen, NULL, &err)) ok = 0;
                for (int i = 0; ok && i < n && gen[i] == c->greedy[i + 1]; i++) match++;
            }
        } else if (ok && c->G > 0) {
            int32_t tok = argmax(logits, V), p = c->T, z = 0;
            for (int i = 0; i < c->G && ok; i++) {
                if (tok != c->greedy[i]) break;
                match++;
                if (i + 1 < c->G && cuda_model_decode_greedy(cm, &tok, &p, &z, 1, &tok, &err)) ok = 0;
                p++;
            }
        }
        if (!ok) {
            fprintf(stderr, "strata: prompt %d: %s\n", k, err.msg);
            failed++;
            continue;
        }
        top1 += pre_top + dec_top;
        npos += 2L * c->T;
        double pre_rel = pre_ref > 0 ? pre_d / pre_ref : pre_d, dec_rel = dec_ref > 0 ? dec_d / dec_ref : dec_d;
        int pass = pre_rel <= tol && dec_rel <= tol;
        printf("prompt %d (%3d tokens): prefill max|dlogit|/max|logit| %.2e, decode %.2e, top-1 %d/%d + %d/%d, "
               "greedy %d/%d  %s\n",
               k, c->T, pre_rel, dec_rel, pre_top, c->T, dec_top, c->T, match, c->G, pass ? "PASS" : "FAIL");
        if (pass) passed++;
        else failed++;
    }
    double agree = npos ? (double)top1 / (double)npos : 0;
    int top_ok = agree >= 0.99;
    printf("golden (cuda, bf16 criteria: tol %.0e, top-1 >= 99%%): %d passed, %d failed; top-1 agreement %.2f%% %s\n",
           tol, passed, failed, 100 * agree, top_ok ? "PASS" : "FAIL");
    free(pos);
    free(slot);
    free(gen);
    cuda_model_free(cm);
    cuda_tp_free(ct);
    return failed || !top_ok ? 1 : 0;
}
#endif

static void usage(void) {
    fprintf(stderr, "usage: strata eval-golden DIR [--exact] [--threads N] [--tol X] [--batch N]\n"
                    "  Checks DIR's model against DIR/golden.safetensors (prefill, decode and greedy).\n"
                    "  --exact      float32 reference kernels (default: the SIMD fast path, also float32)\n"
                    "  --tol X      relative tolerance on logits (default 1e-3)\n"
                    "  --criteria KEY  pass criteria from DIR/golden.json's tolerance.KEY (fp32_engine,\n"
                    "               bf16_activations: max|dlogit| and top-1 agreement; greedy reported)\n"
                    "  --batch N    prefill chunk size (default 64; smaller exercises chunking)\n"
                    "  --device cuda  run on the GPU (bf16 criteria: --tol default 3e-2, top-1 >= 99%%)\n"
                    "  --tp N       with --device cuda: tensor parallel over GPUs 0..N-1\n");
}

int cmd_eval_golden(int argc, char **argv) {
    const char *dir = NULL;
    double tol = 1e-3;
    int threads = 0, batch = 64, cuda = 0, tol_set = 0, exact = 0, tp = 1;
    const char *crit_key = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--exact")) exact = 1;
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) cuda = !strcmp(argv[++i], "cuda");
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tol") && i + 1 < argc) tol = atof(argv[++i]), tol_set = 1;
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--criteria") && i + 1 < argc) crit_key = argv[++i];
        else if (!strcmp(argv[i], "--tp") && i + 1 < argc) tp = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage();
            return 0;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "strata eval-golden: unknown option '%s'\n", argv[i]);
            usage();
            return 2;
        } else if (!dir) dir = argv[i];
        else {
            usage();
            return 2;
        }
    }
    if (!dir || batch < 1) {
        usage();
        return 2;
    }
    if (tp < 1 || tp > 8 || (tp > 1 && !cuda)) {
        fprintf(stderr, "strata eval-golden: --tp N (2..8) needs --device cuda\n");
        return 2;
    }
    st_err err = {0};
    golden_crit crit = {.tol = tol, .top1 = 0, .greedy = 1};
    if (crit_key) {
        if (tol_set || cuda) {
            fprintf(stderr, "strata eval-golden: --criteria replaces --tol and is for the CPU path\n");
            return 2;
        }
        if (golden_crit_load(dir, crit_key, &crit, &err)) {
            fprintf(stderr, "strata: %s\n", err.msg);
            return 1;
        }
    }
    model *m = NULL;
    sft_set g = {0};
    model_ctx *ctx = NULL;
    float *logits = NULL;
    int rc = 1, passed = 0, failed = 0;
    char *gpath = st_path_join(dir, "golden.safetensors");
    if (!gpath) goto out;
    if (model_load(&m, dir, NULL, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        goto out;
    }
    if (sft_set_open_file(&g, gpath, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        goto out;
    }
    const int V = m->desc.n_vocab;
    golden_case cases[64];
    int n_cases = 0, max_len = 0;
    for (int k = 0; k < 64; k++) {
        int r = load_case(&g, k, V, &cases[n_cases], gpath, &err);
        if (r == 1) break;
        if (r < 0) {
            fprintf(stderr, "strata: %s\n", err.msg);
            goto out;
        }
        int len = cases[n_cases].T + cases[n_cases].G;
        if (len > max_len) max_len = len;
        n_cases++;
    }
    if (!n_cases) {
        fprintf(stderr, "strata: %s: no prompt_0 / logits_0 / greedy_0 tensors\n", gpath);
        goto out;
    }
    if (cuda) {
#ifdef STRATA_HAVE_CUDA
        logits = malloc((size_t)max_len * V * sizeof(float));
        if (!logits) goto out;
        printf("model %s: %s, %d layers, %d-dim, vocab %d; %d prompts\n", dir, m->desc.model_type, m->desc.n_layer,
               m->desc.n_embd, V, n_cases);
        rc = eval_cuda(m, cases, n_cases, max_len, batch, tol_set ? tol : 3e-2, logits, tp);
#else
        (void)tol_set;
        fprintf(stderr, "strata: --device cuda: built without CUDA\n");
#endif
        goto out;
    }
    model_ctx_opts o = {.max_ctx = max_len + 1, .n_slots = 1, .max_batch = batch, .n_threads = threads, .exact = exact};
    if (o.max_ctx > m->desc.max_pos) o.max_ctx = (int)m->desc.max_pos;
    if (model_ctx_init(&ctx, m, &o, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        goto out;
    }
    logits = malloc((size_t)max_len * V * sizeof(float));
    if (!logits) goto out;
    printf("model %s: %s, %d layers, %d-dim, vocab %d; %d prompts\n", dir, m->desc.model_type, m->desc.n_layer,
           m->desc.n_embd, V, n_cases);
    if (crit_key) printf("criteria: golden.json tolerance.%s: \"%s\"\n", crit_key, crit.text);
    long top1 = 0, npos = 0;
    for (int k = 0; k < n_cases; k++) {
        golden_case *c = &cases[k];
        double pre_d = 0, pre_ref = 0, dec_d = 0, dec_ref = 0;
        int pre_top = 0, dec_top = 0;
        /* 1. prefill: every position's logits in one pass */
        if (model_forward_seq(ctx, c->prompt, c->T, 0, logits, LOGITS_ALL, &err)) {
            fprintf(stderr, "strata: prompt %d: %s\n", k, err.msg);
            failed++;
            continue;
        }
        diff_stats(logits, c->logits, (size_t)c->T * V, &pre_d, &pre_ref);
        for (int t = 0; t < c->T; t++) pre_top += argmax(logits + (size_t)t * V, V) == argmax(c->logits + (size_t)t * V, V);
        /* 2. decode path: token by token through the KV cache */
        int ok = 1;
        for (int t = 0; t < c->T && ok; t++) {
            if (model_forward_seq(ctx, &c->prompt[t], 1, t, logits, LOGITS_LAST, &err)) ok = 0;
            else {
                diff_stats(logits, c->logits + (size_t)t * V, (size_t)V, &dec_d, &dec_ref);
                dec_top += argmax(logits, V) == argmax(c->logits + (size_t)t * V, V);
            }
        }
        /* 3. greedy continuation from the decode path's last logits */
        int match = 0;
        for (int i = 0; i < c->G && ok; i++) {
            int32_t tok = argmax(logits, V);
            if (tok != c->greedy[i]) break;
            match++;
            if (i + 1 < c->G && model_forward_seq(ctx, &tok, 1, c->T + i, logits, LOGITS_LAST, &err)) ok = 0;
        }
        if (!ok) {
            fprintf(stderr, "strata: prompt %d: %s\n", k, err.msg);
            failed++;
            continue;
        }
        top1 += pre_top + dec_top;
        npos += 2L * c->T;
        double pre_rel = pre_ref > 0 ? pre_d / pre_ref : pre_d, dec_rel = dec_ref > 0 ? dec_d / dec_ref : dec_d;
        int pass = pre_rel <= crit.tol && dec_rel <= crit.tol && (!crit.greedy || match == c->G);
        printf("prompt %d (%3d tokens): prefill max|dlogit|/max|logit| %.2e, decode %.2e, top-1 %d/%d + %d/%d, "
               "greedy %d/%d  %s\n",
               k, c->T, pre_rel, dec_rel, pre_top, c->T, dec_top, c->T, match, c->G, pass ? "PASS" : "FAIL");
        if (pass) passed++;
        else failed++;
    }
    const double agree = npos ? (double)top1 / (double)npos : 0;
    const int top_ok = !crit.top1 || agree >= crit.top1;
    printf("golden: %d passed, %d failed (%s: tol %.0e%s); top-1 agreement %.2f%%%s\n", passed, failed,
           crit_key ? crit_key : "default", crit.tol, crit.greedy ? ", greedy identical" : "", 100 * agree,
           crit.top1 ? (top_ok ? " PASS" : " FAIL") : "");
    rc = failed || !top_ok ? 1 : 0;
out:
    free(logits);
    model_ctx_free(ctx);
    sft_set_close(&g);
    model_free(m);
    free(gpath);
    return rc;
}
