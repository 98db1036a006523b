/* fuzz_config.c — libFuzzer target: model_desc_parse over arbitrary bytes.
 *
 * The input is taken as a config.json text. Rejected inputs must leave the descriptor zeroed
 * with a one-line message naming the source; accepted ones must satisfy the invariants the
 * loader and the forward pass rely on (heads divide, rotary dims even and within the head,
 * experts consistent, quantization in the supported set). Everything is freed before
 * returning (leak checking on).
 *
 *   make fuzz FUZZ_SECONDS=60      (seeds: tests/fuzz/seeds/fuzz_config/)
 */
#include "strata/model.h"

#include <stdint.h>
#include <string.h>

static int bits_ok(int b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }
static int group_ok(int g) { return g == 32 || g == 64 || g == 128; }

/* Checks an accepted descriptor. */
static void check_accepted(const model_desc *d) {
    ST_ASSERT(d->n_layer >= 1 && d->n_embd >= 1 && d->n_vocab >= 1 && d->max_pos >= 1);
    ST_ASSERT(d->n_head >= 1 && d->n_head_kv >= 1 && d->n_head % d->n_head_kv == 0);
    ST_ASSERT(d->head_dim >= 2);
    ST_ASSERT(d->n_rot >= 2 && d->n_rot % 2 == 0 && d->n_rot <= d->head_dim);
    ST_ASSERT(d->rope_theta > 0 && d->norm_eps > 0);
    if (d->rope_scaling == ROPE_SCALING_LLAMA3)
        ST_ASSERT(d->rope_factor > 0 && d->rope_high_freq > d->rope_low_freq && d->rope_orig_max_pos >= 1);
    ST_ASSERT(d->layer_moe && d->moe_prefix && d->expert_names[0] && d->expert_names[1] && d->expert_names[2]);
    int n_moe = 0;
    for (int l = 0; l < d->n_layer; l++) {
        ST_ASSERT(d->layer_moe[l] <= 1);
        n_moe += d->layer_moe[l];
        if (!d->layer_moe[l]) ST_ASSERT(d->n_ff >= 1);
    }
    if (n_moe) {
        ST_ASSERT(d->router != ROUTER_NONE);
        ST_ASSERT(d->n_expert >= 1 && d->n_expert_used >= 1 && d->n_expert_used <= d->n_expert);
        ST_ASSERT(d->n_ff_expert >= 1);
    }
    ST_ASSERT(d->n_eos >= 0 && d->n_eos <= MODEL_MAX_EOS);
    for (int i = 0; i < d->n_eos; i++) ST_ASSERT(d->eos_ids[i] >= 0);
    if (d->q_bits) ST_ASSERT(bits_ok(d->q_bits) && group_ok(d->q_group));
    ST_ASSERT(d->n_q_over >= 0 && (d->n_q_over == 0 || d->q_bits));
    for (int i = 0; i < d->n_q_over; i++) {
        const quant_override *o = &d->q_over[i];
        ST_ASSERT(o->path);
        ST_ASSERT(o->bits == 0 || (bits_ok(o->bits) && group_ok(o->group)));
        int b = -1, g = -1;
        ST_ASSERT(model_desc_quant_override(d, o->path, &b, &g) == 1);
    }
    ST_ASSERT(model_desc_kv_bytes_per_token(d, 2) == (size_t)4 * (size_t)d->n_head_kv * (size_t)d->head_dim);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    model_desc d;
    st_err err = {0};
    int rc = model_desc_parse(&d, (const char *)data, size, "fuzz", &err);
    if (rc == ST_OK) {
        check_accepted(&d);
        model_desc_free(&d);
    } else {
        ST_ASSERT(rc < 0 && err.code == rc && err.msg[0] && !strchr(err.msg, '\n'));
        ST_ASSERT(!strncmp(err.msg, "fuzz: ", 6));
        ST_ASSERT(!d.layer_moe && !d.q_over && !d.n_q_over);
    }
    return 0;
}
