/* forward.c — run state and the generic transformer forward pass (see model.h).
 *
 * One block implementation reads the descriptor: attention with optional per-head or
 * full-width QK-norm and (partial) rotate-half RoPE, then a dense SwiGLU MLP or a routed
 * mixture of experts (softmax top-k or sigmoid with selection-only bias). Everything the pass
 * touches is allocated in model_ctx_init; the per-token path only indexes.
 */
#include "strata/model.h"

#include "backend/cpu/cpu_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct model_ctx {
    const model *m;
    model_ctx_opts o;
    st_pool *pool;
    cpu_scratch scratch;
    double *inv_freq;      /* [n_rot/2]                                                     */
    /* activations for one chunk of B = max_batch tokens */
    float *x;              /* [B, n_embd]        residual stream                            */
    float *xn;             /* [B, n_embd]        normed input                               */
    float *q;              /* [B, n_head*hd]                                                */
    float *k;              /* [B, n_head_kv*hd]                                             */
    float *v;              /* [B, n_head_kv*hd]                                             */
    float *att;            /* [B, n_head*hd]                                                */
    float *tmp;            /* [B, n_embd]                                                   */
    float *ff_gate;        /* [B, ff_max]                                                   */
    float *ff_up;          /* [B, ff_max]                                                   */
    float *cs;             /* [B, n_rot/2, 2]    rope cos/sin                               */
    float *router;         /* [B, n_expert]                                                 */
    int32_t *sel;          /* [B, n_expert_used] chosen experts                             */
    float *selw;           /* [B, n_expert_used] their weights                              */
    int32_t *e_count;      /* [n_expert]                                                    */
    int32_t *e_rows;       /* [n_expert, B]      token rows routed to each expert           */
    float *e_w;            /* [n_expert, B]      matching weights                           */
    float *xe;             /* [B, n_embd]        gathered expert input                      */
    float *ye;             /* [B, n_embd]        expert output                              */
    const float **kp;      /* [B] per-token K cache base for the current layer (f32 cache)  */
    const float **vp;      /* [B]                                                           */
    const uint16_t **kh;   /* [B] the same for a float16 cache                              */
    const uint16_t **vh;   /* [B]                                                           */
    int32_t *pos_tmp;      /* [B]                                                           */
    int32_t *slot_tmp;     /* [B]                                                           */
    /* KV cache: [n_slots][n_local_layers][max_ctx][n_head_kv*hd] of kv_es-byte elements:
     * float32 on the exact path, IEEE float16 on the fast path where cpu_kv_f16_ok (halves the
     * K/V bytes decode attention reads; STRATA_KV_F32=1 keeps float32 for A/B runs) */
    void *kc, *vc;
    int kv_es;             /* 4 (float32) or 2 (float16)                                    */
    size_t kv_layer_stride, kv_slot_stride; /* in elements                                  */
    /* timers */
    uint64_t compute_ns;   /* wall time inside forward chunks (all kernels), since reset    */
    uint64_t n_forward;    /* forward chunks run                                            */
};

static void *xalloc(size_t n, size_t elem, int *fail) {
    size_t b;
    if (st_mul_size(n, elem, &b)) {
        *fail = 1;
        return NULL;
    }
    void *p = st_alloc_aligned(b);
    if (!p) *fail = 1;
    return p;
}

void model_desc_rope_inv_freq(const model_desc *d, double *inv) {
    int half = d->n_rot / 2;
    for (int i = 0; i < half; i++) {
        float f = (float)(1.0 / pow(d->rope_theta, (double)(2 * i) / (double)d->n_rot));
        double fr = f;
        if (d->rope_scaling == ROPE_SCALING_LINEAR) fr = fr / d->rope_factor;
        if (d->rope_scaling == ROPE_SCALING_LLAMA3) {
            double orig = (double)d->rope_orig_max_pos;
            double low_wl = orig / d->rope_low_freq, high_wl = orig / d->rope_high_freq;
            double wl = 2.0 * M_PI / fr;
            double scaled = wl > low_wl ? fr / d->rope_factor : fr;
            if (!(wl < high_wl) && !(wl > low_wl)) {
                double sm = (orig / wl - d->rope_low_freq) / (d->rope_high_freq - d->rope_low_freq);
                scaled = (1.0 - sm) * scaled / d->rope_factor + sm * scaled;
            }
            fr = scaled;
        }
        inv[i] = fr;
    }
}

int model_ctx_init(model_ctx **out, const model *m, const model_ctx_opts *opts, st_err *err) {
    *out = NULL;
    const model_desc *d = &m->desc;
    model_ctx *c = calloc(1, sizeof *c);
    if (!c) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    c->m = m;
    c->o = *opts;
    if (c->o.max_batch <= 0) c->o.max_batch = 256;
    if (c->o.n_slots <= 0) c->o.n_slots = 1;
    if (c->o.max_ctx <= 0) c->o.max_ctx = (int)(d->max_pos < 4096 ? d->max_pos : 4096);
    if (c->o.max_ctx > d->max_pos) {
        int rc = st_err_set(err, ST_ERR_ARG, "context %d exceeds the model's max_position_embeddings %lld", c->o.max_ctx,
                            (long long)d->max_pos);
        free(c);
        return rc;
    }
    const size_t B = (size_t)c->o.max_batch, D = (size_t)d->n_embd, hd = (size_t)d->head_dim;
    const size_t qd = (size_t)d->n_head * hd, kvd = (size_t)d->n_head_kv * hd;
    size_t ffmax = (size_t)(d->n_ff > d->n_ff_expert ? d->n_ff : d->n_ff_expert);
    if (ffmax < 1) ffmax = 1;
    const size_t E = (size_t)(d->n_expert > 0 ? d->n_expert : 1), K = (size_t)(d->n_expert_used > 0 ? d->n_expert_used : 1);
    int fail = 0;
    c->pool = st_pool_init(c->o.n_threads);
    if (!c->pool) fail = 1;
    size_t row_cap = D;
    if (qd > row_cap) row_cap = qd;
    if (ffmax > row_cap) row_cap = ffmax;
    if ((size_t)c->o.max_ctx > row_cap) row_cap = (size_t)c->o.max_ctx;
    if (!fail && cpu_scratch_init(&c->scratch, st_pool_threads(c->pool), row_cap, c->o.max_batch, c->o.exact)) fail = 1;
    /* MoE: int16, not int8, activations for 4-bit weights: int8's error reaches the routers of
     * later layers and flips near-tied expert choices (qwen3_moe-mlx-q4g64's golden; PERF.md) */
    if (d->n_expert > 0) c->scratch.actq8 = 0;
    c->inv_freq = xalloc((size_t)d->n_rot / 2, sizeof(double), &fail);
    c->x = xalloc(B * D, 4, &fail);
    c->xn = xalloc(B * D, 4, &fail);
    c->q = xalloc(B * qd, 4, &fail);
    c->k = xalloc(B * kvd, 4, &fail);
    c->v = xalloc(B * kvd, 4, &fail);
    c->att = xalloc(B * qd, 4, &fail);
    c->tmp = xalloc(B * D, 4, &fail);
    c->ff_gate = xalloc(B * ffmax, 4, &fail);
    c->ff_up = xalloc(B * ffmax, 4, &fail);
    c->cs = xalloc(B * (size_t)d->n_rot, 4, &fail);
    c->router = xalloc(B * E, 4, &fail);
    c->sel = xalloc(B * K, 4, &fail);
    c->selw = xalloc(B * K, 4, &fail);
    c->e_count = xalloc(E, 4, &fail);
    c->e_rows = xalloc(E * B, 4, &fail);
    c->e_w = xalloc(E * B, 4, &fail);
    c->xe = xalloc(B * D, 4, &fail);
    c->ye = xalloc(B * D, 4, &fail);
    c->kp = xalloc(B, sizeof(float *), &fail);
    c->vp = xalloc(B, sizeof(float *), &fail);
    c->kh = xalloc(B, sizeof(uint16_t *), &fail);
    c->vh = xalloc(B, sizeof(uint16_t *), &fail);
    c->pos_tmp = xalloc(B, 4, &fail);
    c->slot_tmp = xalloc(B, 4, &fail);
    size_t n_local = (size_t)(m->layer_end - m->layer_begin);
    c->kv_layer_stride = (size_t)c->o.max_ctx * kvd;
    c->kv_slot_stride = n_local * c->kv_layer_stride;
    size_t kv_elems = 0;
    if (!fail && st_mul_size(c->kv_slot_stride, (size_t)c->o.n_slots, &kv_elems)) fail = 1;
    const char *kv32 = getenv("STRATA_KV_F32");
    c->kv_es = !fail && cpu_kv_f16_ok(&c->scratch, d->head_dim) && !(kv32 && *kv32 && strcmp(kv32, "0")) ? 2 : 4;
    if (!fail) {
        c->kc = xalloc(kv_elems, (size_t)c->kv_es, &fail);
        c->vc = xalloc(kv_elems, (size_t)c->kv_es, &fail);
    }
    if (fail) {
        char b[32];
        int rc = st_err_set(err, ST_ERR_NOMEM, "cannot allocate run state (KV cache %s for %d tokens x %d slots)",
                            st_fmt_bytes(2.0 * (double)kv_elems * c->kv_es, b, sizeof b), c->o.max_ctx, c->o.n_slots);
        model_ctx_free(c);
        return rc;
    }
    model_desc_rope_inv_freq(d, c->inv_freq);
    *out = c;
    return ST_OK;
}

void model_ctx_free(model_ctx *c) {
    if (!c) return;
    st_pool_free(c->pool);
    cpu_scratch_free(&c->scratch);
    void *bufs[] = {c->inv_freq, c->x, c->xn, c->q, c->k, c->v, c->att, c->tmp, c->ff_gate, c->ff_up, c->cs, c->router,
                    c->sel, c->selw, c->e_count, c->e_rows, c->e_w, c->xe, c->ye, (void *)c->kp, (void *)c->vp,
                    (void *)c->kh, (void *)c->vh, c->pos_tmp, c->slot_tmp, c->kc, c->vc};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) st_free_aligned(bufs[i]);
    free(c);
}

st_pool *model_ctx_pool(model_ctx *c) { return c->pool; }
const model *model_ctx_model(const model_ctx *c) { return c->m; }

/* ------------------------------------------------------------------------------------------ */
/* mixture of experts                                                                          */

/* Chooses experts for each of T tokens from router logits c->router[T, E] into sel/selw.
 * Softmax router: p = softmax(logits) (float32), top-k of p, renormalised if norm_topk_prob.
 * Sigmoid router: s = sigmoid(logits); top-k of s + bias (bias only selects); weights are the
 * unbiased s of the chosen experts divided by their sum. */
static void moe_route(model_ctx *c, const layer_weights *L, int T) {
    const model_desc *d = &c->m->desc;
    const int E = d->n_expert, K = d->n_expert_used;
    for (int t = 0; t < T; t++) {
        float *lg = c->router + (size_t)t * E;
        float *score = c->ye; /* [E] scratch (ye is free during routing) */
        float *key = c->ye + E;
        if (d->router == ROUTER_SOFTMAX_TOPK) {
            float mx = -INFINITY;
            for (int e = 0; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
            double sum = 0;
            for (int e = 0; e < E; e++) sum += (score[e] = expf(lg[e] - mx));
            for (int e = 0; e < E; e++) {
                score[e] = (float)(score[e] / sum);
                key[e] = score[e];
            }
        } else {
            for (int e = 0; e < E; e++) {
                score[e] = 1.0f / (1.0f + expf(-lg[e]));
                key[e] = score[e] + (L->router_bias ? L->router_bias[e] : 0.0f);
            }
        }
        int32_t *sel = c->sel + (size_t)t * K;
        float *w = c->selw + (size_t)t * K;
        for (int k = 0; k < K; k++) { /* top-k by selection key; ties -> lower index (torch.topk order) */
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int j = 0; j < k && !taken; j++) taken = sel[j] == e;
                if (!taken && (best < 0 || key[e] > key[best])) best = e;
            }
            sel[k] = best;
            w[k] = score[best];
        }
        if (d->norm_topk_prob) {
            double s = 0;
            for (int k = 0; k < K; k++) s += w[k];
            for (int k = 0; k < K; k++) w[k] = (float)(w[k] / (s + (d->router == ROUTER_SIGMOID_BIAS ? 1e-20 : 0)));
        }
    }
}

/* out[T, D] = sum over each token's chosen experts of weight * expert(xn). Tokens are grouped
 * per expert so each expert's weights are read once per chunk (matrix-matrix in prefill). */
static void moe_forward(model_ctx *c, const layer_weights *L, float *out, const float *xn, int T) {
    const model_desc *d = &c->m->desc;
    const int E = d->n_expert, K = d->n_expert_used, D = d->n_embd, F = d->n_ff_expert;
    const size_t B = (size_t)c->o.max_batch;
    cpu_linear(c->pool, &c->scratch, c->router, xn, &L->router, T);
    moe_route(c, L, T);
    memset(c->e_count, 0, (size_t)E * sizeof(int32_t));
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = c->sel[(size_t)t * K + k];
            int n = c->e_count[e]++;
            c->e_rows[(size_t)e * B + n] = t;
            c->e_w[(size_t)e * B + n] = c->selw[(size_t)t * K + k];
        }
    memset(out, 0, (size_t)T * D * sizeof(float));
    for (int e = 0; e < E; e++) {
        int n = c->e_count[e];
        if (!n) continue;
        const int32_t *rows = c->e_rows + (size_t)e * B;
        for (int i = 0; i < n; i++) memcpy(c->xe + (size_t)i * D, xn + (size_t)rows[i] * D, (size_t)D * sizeof(float));
        cpu_linear(c->pool, &c->scratch, c->ff_gate, c->xe, &L->exp_gate[e], n);
        cpu_linear(c->pool, &c->scratch, c->ff_up, c->xe, &L->exp_up[e], n);
        cpu_swiglu_p(c->pool, &c->scratch, c->ff_gate, c->ff_gate, c->ff_up, (int64_t)n * F);
        cpu_linear(c->pool, &c->scratch, c->ye, c->ff_gate, &L->exp_down[e], n);
        for (int i = 0; i < n; i++) {
            float w = c->e_w[(size_t)e * B + i];
            float *o = out + (size_t)rows[i] * D;
            const float *y = c->ye + (size_t)i * D;
            for (int j = 0; j < D; j++) o[j] += w * y[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* one chunk                                                                                  */

static void forward_chunk(model_ctx *c, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                          const int32_t *slot, int T, float *hidden_out, float *logits, logits_mode mode) {
    const model *m = c->m;
    const model_desc *d = &m->desc;
    const int D = d->n_embd, H = d->n_head, Hkv = d->n_head_kv, hd = d->head_dim;
    const int qd = H * hd, kvd = Hkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    st_pool *P = c->pool;
    cpu_scratch *S = &c->scratch;

    if (tokens) cpu_embed(c->x, tokens, T, &m->embed);
    else memcpy(c->x, hidden_in, (size_t)T * D * sizeof(float));
    cpu_rope_table(c->cs, pos, T, c->inv_freq, d->n_rot);
    for (int l = m->layer_begin; l < m->layer_end; l++) {
        const layer_weights *L = &m->layers[l];
        const size_t lo = (size_t)(l - m->layer_begin) * c->kv_layer_stride;
        /* attention */
        cpu_rmsnorm_s(P, S, c->xn, c->x, L->attn_norm, T, D, d->norm_eps);
        cpu_linear(P, S, c->q, c->xn, &L->wq, T);
        cpu_linear(P, S, c->k, c->xn, &L->wk, T);
        cpu_linear(P, S, c->v, c->xn, &L->wv, T);
        if (d->qk_norm == QK_NORM_HEAD) {
            cpu_rmsnorm_s(P, S, c->q, c->q, L->q_norm, (int64_t)T * H, hd, d->norm_eps);
            cpu_rmsnorm_s(P, S, c->k, c->k, L->k_norm, (int64_t)T * Hkv, hd, d->norm_eps);
        } else if (d->qk_norm == QK_NORM_FULL) {
            cpu_rmsnorm_s(P, S, c->q, c->q, L->q_norm, T, qd, d->norm_eps);
            cpu_rmsnorm_s(P, S, c->k, c->k, L->k_norm, T, kvd, d->norm_eps);
        }
        cpu_rope_s(S, c->q, c->cs, T, H, hd, d->n_rot);
        cpu_rope_s(S, c->k, c->cs, T, Hkv, hd, d->n_rot);
        if (c->kv_es == 2) {
            for (int t = 0; t < T; t++) {
                const size_t base = (size_t)slot[t] * c->kv_slot_stride + lo, row = base + (size_t)pos[t] * kvd;
                cpu_kv_store_f16(S, (uint16_t *)c->kc + row, c->k + (size_t)t * kvd, kvd);
                cpu_kv_store_f16(S, (uint16_t *)c->vc + row, c->v + (size_t)t * kvd, kvd);
                c->kh[t] = (const uint16_t *)c->kc + base;
                c->vh[t] = (const uint16_t *)c->vc + base;
            }
            cpu_attention_f16(P, S, c->att, c->q, c->kh, c->vh, pos, T, H, Hkv, hd, scale);
        } else {
            for (int t = 0; t < T; t++) {
                const size_t base = (size_t)slot[t] * c->kv_slot_stride + lo;
                memcpy((float *)c->kc + base + (size_t)pos[t] * kvd, c->k + (size_t)t * kvd, (size_t)kvd * 4);
                memcpy((float *)c->vc + base + (size_t)pos[t] * kvd, c->v + (size_t)t * kvd, (size_t)kvd * 4);
                c->kp[t] = (const float *)c->kc + base;
                c->vp[t] = (const float *)c->vc + base;
            }
            cpu_attention(P, S, c->att, c->q, c->kp, c->vp, pos, T, H, Hkv, hd, scale);
        }
        cpu_linear(P, S, c->tmp, c->att, &L->wo, T);
        cpu_add_p(P, c->x, c->tmp, (int64_t)T * D);
        /* feed-forward */
        cpu_rmsnorm_s(P, S, c->xn, c->x, L->ffn_norm, T, D, d->norm_eps);
        if (d->layer_moe[l]) {
            moe_forward(c, L, c->tmp, c->xn, T);
        } else {
            cpu_linear(P, S, c->ff_gate, c->xn, &L->w_gate, T);
            cpu_linear(P, S, c->ff_up, c->xn, &L->w_up, T);
            cpu_swiglu_p(P, S, c->ff_gate, c->ff_gate, c->ff_up, (int64_t)T * d->n_ff);
            cpu_linear(P, S, c->tmp, c->ff_gate, &L->w_down, T);
        }
        cpu_add_p(P, c->x, c->tmp, (int64_t)T * D);
    }
    if (hidden_out) memcpy(hidden_out, c->x, (size_t)T * D * sizeof(float));
    if (mode == LOGITS_NONE) return;
    if (mode == LOGITS_LAST) {
        cpu_rmsnorm_s(P, S, c->xn, c->x + (size_t)(T - 1) * D, m->out_norm, 1, D, d->norm_eps);
        cpu_linear(P, S, logits, c->xn, &m->output, 1);
    } else {
        cpu_rmsnorm_s(P, S, c->xn, c->x, m->out_norm, T, D, d->norm_eps);
        cpu_linear(P, S, logits, c->xn, &m->output, T);
    }
}

/* Checks token ids (when given), positions and slots of T rows. */
static int check_rows(const model_ctx *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T,
                      st_err *err) {
    const model_desc *d = &c->m->desc;
    for (int t = 0; t < T; t++) {
        if (tokens && (tokens[t] < 0 || tokens[t] >= d->n_vocab))
            return st_err_set(err, ST_ERR_ARG, "token id %d at index %d is outside the vocabulary (%d)", tokens[t], t,
                              d->n_vocab);
        if (pos[t] < 0 || pos[t] >= c->o.max_ctx)
            return st_err_set(err, ST_ERR_ARG, "position %d is beyond the context of %d tokens", pos[t], c->o.max_ctx);
        if (slot[t] < 0 || slot[t] >= c->o.n_slots)
            return st_err_set(err, ST_ERR_ARG, "slot %d does not exist (%d slots)", slot[t], c->o.n_slots);
    }
    return ST_OK;
}

int model_forward_stage(model_ctx *c, const int32_t *tokens, const float *hidden_in, const int32_t *pos,
                        const int32_t *slot, int T, float *hidden_out, float *logits, logits_mode mode, st_err *err) {
    const model *m = c->m;
    const int D = m->desc.n_embd, V = m->desc.n_vocab;
    if (!tokens == !hidden_in)
        return st_err_set(err, ST_ERR_ARG, "a stage takes either token ids or hidden states, not both");
    if (tokens && !m->holds_embed)
        return st_err_set(err, ST_ERR_ARG, "this stage (layers %d..%d) holds no embedding: it needs hidden states",
                          m->layer_begin, m->layer_end - 1);
    if (mode != LOGITS_NONE && !m->holds_output)
        return st_err_set(err, ST_ERR_ARG, "this stage (layers %d..%d) holds no output layer", m->layer_begin,
                          m->layer_end - 1);
    int rc = check_rows(c, tokens, pos, slot, T, err);
    if (rc) return rc;
    const int B = c->o.max_batch;
    for (int t0 = 0; t0 < T; t0 += B) {
        int n = T - t0 < B ? T - t0 : B;
        logits_mode lm = mode;
        float *lg = logits;
        if (mode == LOGITS_LAST) lm = t0 + n == T ? LOGITS_LAST : LOGITS_NONE;
        if (mode == LOGITS_ALL) lg = logits + (size_t)t0 * V;
        uint64_t t_start = st_time_ns();
        forward_chunk(c, tokens ? tokens + t0 : NULL, hidden_in ? hidden_in + (size_t)t0 * D : NULL, pos + t0,
                      slot + t0, n, hidden_out ? hidden_out + (size_t)t0 * D : NULL, lg, lm);
        c->compute_ns += st_time_ns() - t_start;
        c->n_forward++;
    }
    return ST_OK;
}

int model_forward(model_ctx *c, const int32_t *tokens, const int32_t *pos, const int32_t *slot, int T, float *logits,
                  logits_mode mode, st_err *err) {
    const model *m = c->m;
    const model_desc *d = &m->desc;
    if (!m->holds_embed || (mode != LOGITS_NONE && !m->holds_output))
        return st_err_set(err, ST_ERR_ARG, "model_forward needs the whole model (this one holds layers %d..%d)",
                          m->layer_begin, m->layer_end - 1);
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= d->n_vocab)
            return st_err_set(err, ST_ERR_ARG, "token id %d at index %d is outside the vocabulary (%d)", tokens[t], t,
                              d->n_vocab);
        if (pos[t] < 0 || pos[t] >= c->o.max_ctx)
            return st_err_set(err, ST_ERR_ARG, "position %d is beyond the context of %d tokens", pos[t], c->o.max_ctx);
        if (slot[t] < 0 || slot[t] >= c->o.n_slots)
            return st_err_set(err, ST_ERR_ARG, "slot %d does not exist (%d slots)", slot[t], c->o.n_slots);
    }
    const int B = c->o.max_batch;
    for (int t0 = 0; t0 < T; t0 += B) {
        int n = T - t0 < B ? T - t0 : B;
        logits_mode lm = mode;
        float *lg = logits;
        if (mode == LOGITS_LAST) lm = t0 + n == T ? LOGITS_LAST : LOGITS_NONE;
        if (mode == LOGITS_ALL) lg = logits + (size_t)t0 * d->n_vocab;
        uint64_t t_start = st_time_ns();
        forward_chunk(c, tokens + t0, NULL, pos + t0, slot + t0, n, NULL, lg, lm);
        c->compute_ns += st_time_ns() - t_start;
        c->n_forward++;
    }
    return ST_OK;
}

int model_forward_seq(model_ctx *c, const int32_t *tokens, int T, int start, float *logits, logits_mode mode,
                      st_err *err) {
    const int B = c->o.max_batch;
    for (int t0 = 0; t0 < T; t0 += B) {
        int n = T - t0 < B ? T - t0 : B;
        for (int i = 0; i < n; i++) {
            c->pos_tmp[i] = start + t0 + i;
            c->slot_tmp[i] = 0;
        }
        logits_mode lm = mode;
        float *lg = logits;
        if (mode == LOGITS_LAST) lm = t0 + n == T ? LOGITS_LAST : LOGITS_NONE;
        if (mode == LOGITS_ALL) lg = logits + (size_t)t0 * c->m->desc.n_vocab;
        int rc = model_forward(c, tokens + t0, c->pos_tmp, c->slot_tmp, n, lg, lm, err);
        if (rc) return rc;
    }
    return ST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* instrumentation and cache tools                                                            */

void model_ctx_timers(const model_ctx *c, uint64_t *compute_ns, uint64_t *n_forward) {
    if (compute_ns) *compute_ns = c->compute_ns;
    if (n_forward) *n_forward = c->n_forward;
}

void model_ctx_timers_reset(model_ctx *c) {
    c->compute_ns = 0;
    c->n_forward = 0;
    st_pool_stats_reset(c->pool);
}

const model_ctx_opts *model_ctx_get_opts(const model_ctx *c) { return &c->o; }

size_t model_ctx_kv_bytes(const model_ctx *c) { return 2 * c->kv_slot_stride * (size_t)c->o.n_slots * (size_t)c->kv_es; }

size_t model_ctx_kv_elem_bytes(const model_ctx *c) { return (size_t)c->kv_es; }

int model_ctx_kv_fill_synthetic(model_ctx *c, int slot, int n_tokens, uint64_t seed, st_err *err) {
    if (slot < 0 || slot >= c->o.n_slots || n_tokens < 0 || n_tokens > c->o.max_ctx)
        return st_err_set(err, ST_ERR_ARG, "cannot fill %d tokens of slot %d (context %d, %d slots)", n_tokens, slot,
                          c->o.max_ctx, c->o.n_slots);
    const model_desc *d = &c->m->desc;
    const size_t kvd = (size_t)d->n_head_kv * d->head_dim, n_local = (size_t)(c->m->layer_end - c->m->layer_begin);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t l = 0; l < n_local; l++) {
        const size_t off = (size_t)slot * c->kv_slot_stride + l * c->kv_layer_stride;
        for (size_t i = 0; i < (size_t)n_tokens * kvd; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            float r = (float)((x >> 40) & 0xffff) / 65536.0f - 0.5f;
            if (c->kv_es == 2) {
                ((uint16_t *)c->kc)[off + i] = st_f32_to_f16(r);
                ((uint16_t *)c->vc)[off + i] = st_f32_to_f16(-r);
            } else {
                ((float *)c->kc)[off + i] = r;
                ((float *)c->vc)[off + i] = -r;
            }
        }
    }
    return ST_OK;
}
