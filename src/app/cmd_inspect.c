/* cmd_inspect.c — `strata inspect MODEL_DIR`: descriptor, tensor layout and sizes. */
#include "app.h"
#include "strata/model.h"

#include <string.h>

static const char *qk_name(qk_norm_kind k) {
    return k == QK_NORM_HEAD ? "per-head" : k == QK_NORM_FULL ? "full-width" : "none";
}

int cmd_inspect(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        fprintf(stderr, "usage: strata inspect MODEL_DIR\n");
        return argc < 2 ? 2 : 0;
    }
    st_err err = {0};
    model *m = NULL;
    if (model_load(&m, argv[1], NULL, &err)) {
        fprintf(stderr, "strata: %s\n", err.msg);
        return 1;
    }
    const model_desc *d = &m->desc;
    char b[32];
    printf("model_type      %s\n", d->model_type);
    printf("layers          %d (%d MoE)\n", d->n_layer, ({
               int n = 0;
               for (int l = 0; l < d->n_layer; l++) n += d->layer_moe[l];
               n;
           }));
    printf("hidden          %d, heads %d, kv heads %d, head_dim %d\n", d->n_embd, d->n_head, d->n_head_kv, d->head_dim);
    printf("ffn             dense %d, experts %d x %d (top-%d, %s)\n", d->n_ff, d->n_expert, d->n_ff_expert,
           d->n_expert_used, d->router == ROUTER_SIGMOID_BIAS ? "sigmoid+bias" : d->router == ROUTER_SOFTMAX_TOPK ? "softmax" : "-");
    printf("rope            theta %g, rotary dims %d/%d, scaling %s\n", d->rope_theta, d->n_rot, d->head_dim,
           d->rope_scaling == ROPE_SCALING_LLAMA3 ? "llama3" : d->rope_scaling == ROPE_SCALING_LINEAR ? "linear" : "none");
    printf("qk-norm         %s\n", qk_name(d->qk_norm));
    printf("vocab           %d, tied embeddings %s, max positions %lld\n", d->n_vocab, d->tie_embeddings ? "yes" : "no",
           (long long)d->max_pos);
    if (d->q_bits) printf("quantization    MLX affine %d-bit group %d, %d overrides\n", d->q_bits, d->q_group, d->n_q_over);
    printf("weights         %s in %d file(s), %zu tensors\n", st_fmt_bytes((double)m->weight_bytes, b, sizeof b),
           m->weights.n_files, m->weights.n_tensors);
    printf("kv cache        %s per token (bf16)\n",
           st_fmt_bytes((double)model_desc_kv_bytes_per_token(d, 2) * d->n_layer, b, sizeof b));
    model_free(m);
    return 0;
}
