/* ncclink.c — host-side checks of the NCCL data link messages (see ncclink.h). */
#include "ncclink.h"

#include <stdlib.h>
#include <string.h>

int ncl_parse_id(const void *p, size_t len, cp_nccl_id *out, st_err *err) {
    if (len != sizeof *out)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL id message: %zu bytes, expected %zu", len, sizeof *out);
    memcpy(out, p, sizeof *out);
    if (out->version != NCL_VERSION)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL id message: version %d, this node speaks %d", (int)out->version,
                          NCL_VERSION);
    if (out->stage < 0 || out->stage >= CLUSTER_MAX_STAGES || out->n_embd < 1 || out->n_embd > (1 << 20) ||
        out->max_batch < 1 || out->max_batch > 8192)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL id message: fields out of range (stage %d, n_embd %d, batch %d)",
                          (int)out->stage, (int)out->n_embd, (int)out->max_batch);
    return ST_OK;
}

int ncl_check_id(const cp_nccl_id *m, const ncl_self *s, st_err *err) {
    if (!s->loaded && m->epoch == s->epoch && s->epoch)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "stage %d failed to load epoch %llu", s->stage,
                          CP_EPOCH_SEQ(s->epoch));
    if (!s->loaded || !cp_epoch_same_run(m->epoch, s->epoch) || m->epoch > s->epoch) return NCL_LATER; /* a newer LOAD comes */
    if (m->epoch < s->epoch)
        return st_err_set(err, ST_ERR_NET, "stale NCCL offer (epoch %llu, loaded %llu)", CP_EPOCH_SEQ(m->epoch),
                          CP_EPOCH_SEQ(s->epoch));
    if (s->stage == 0)
        return st_err_set(err, ST_ERR_UNSUPPORTED, "stage 0 takes the token hop on the data link, not NCCL");
    if (m->stage != s->stage - 1)
        return st_err_set(err, ST_ERR_ARG, "NCCL offer from stage %d to stage %d", (int)m->stage, s->stage);
    if (!s->gpu) return st_err_set(err, ST_ERR_UNSUPPORTED, "stage %d runs on the CPU", s->stage);
    if (m->n_embd != s->n_embd || m->max_batch != s->max_batch)
        return st_err_set(err, ST_ERR_ARG, "NCCL offer for rows of %d x %d, stage %d has %d x %d", (int)m->max_batch,
                          (int)m->n_embd, s->stage, s->max_batch, s->n_embd);
    return NCL_ACCEPT;
}

int ncl_parse_ack(const void *p, size_t len, uint64_t epoch, cp_nccl_ack *out, st_err *err) {
    if (len != sizeof *out)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL ack message: %zu bytes, expected %zu", len, sizeof *out);
    memcpy(out, p, sizeof *out);
    out->msg[sizeof out->msg - 1] = 0;
    if (out->epoch != epoch)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL ack for epoch %llu, expected %llu", (unsigned long long)out->epoch,
                          (unsigned long long)epoch);
    if (out->status > 0 || out->status < ST_ERR_LIMIT)
        return st_err_set(err, ST_ERR_FORMAT, "NCCL ack: status %d out of range", (int)out->status);
    return ST_OK;
}

int ncl_act_payload(const dp_act *h, size_t len, int n_embd, int nccl_ready, st_err *err) {
    if (h->flags & ACT_NCCL) {
        if (len != sizeof *h)
            return st_err_set(err, ST_ERR_FORMAT, "ACT on NCCL: %zu bytes, expected the %zu-byte header only", len,
                              sizeof *h);
        if (!nccl_ready)
            return st_err_set(err, ST_ERR_FORMAT, "ACT on NCCL but this link has no NCCL communicator");
        return 1;
    }
    size_t want = sizeof *h + (size_t)h->T * (size_t)n_embd * 4;
    if (len != want) return st_err_set(err, ST_ERR_FORMAT, "ACT: %zu bytes, expected %zu", len, want);
    return 0;
}

int ncl_timeout_ms(void) {
    const char *e = getenv("STRATA_NCCL_TIMEOUT_MS");
    long v = e && *e ? strtol(e, NULL, 10) : 10000;
    if (v < 100) v = 100;
    if (v > 600000) v = 600000;
    return (int)v;
}
