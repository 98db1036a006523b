/* fuzz_safetensors.c — libFuzzer target: sft_file_parse over arbitrary bytes.
 *
 * The input is taken as a whole safetensors file image. Rejected inputs must leave the
 * sft_file zeroed with a message; accepted ones must satisfy the reader's contract: every
 * tensor lies inside the data buffer, the tensors tile it exactly, sizes match dtype x shape,
 * names are unique. ASan checks every byte of every accepted tensor is readable (the fuzzer's
 * buffer is exactly `size` bytes). Everything is freed before returning (leak checking on).
 *
 *   make fuzz FUZZ_SECONDS=60      (seeds: tests/fuzz/seeds/fuzz_safetensors/)
 */
#include "strata/safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Orders (begin, end) pairs. */
static int cmp_span(const void *a, const void *b) {
    const uint64_t *x = a, *y = b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* Checks the accepted file's invariants against the raw buffer [data, data + size). */
static void check_accepted(const sft_file *f, const uint8_t *data, size_t size) {
    ST_ASSERT(size >= 8 + f->header_len);
    const uint8_t *base = data + 8 + f->header_len;
    const size_t data_size = size - 8 - (size_t)f->header_len;
    uint64_t *spans = malloc(2 * (f->n_tensors ? f->n_tensors : 1) * sizeof *spans);
    ST_ASSERT(spans);
    volatile uint8_t sink = 0;
    size_t total = 0;
    for (size_t i = 0; i < f->n_tensors; i++) {
        const sft_tensor *t = &f->tensors[i];
        ST_ASSERT(t->name && sft_file_find(f, t->name) == t); /* unique names */
        ST_ASSERT((unsigned)t->dtype < SFT_DTYPE_COUNT && t->ndim >= 0 && t->ndim <= SFT_MAX_DIMS);
        int64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            ST_ASSERT(t->shape[d] >= 0);
            numel *= t->shape[d];
        }
        ST_ASSERT(numel == t->numel);
        ST_ASSERT((uint64_t)numel * (uint64_t)sft_dtype_bits(t->dtype) == (uint64_t)t->nbytes * 8);
        ST_ASSERT(t->end - t->begin == t->nbytes && t->end <= data_size);
        ST_ASSERT((const uint8_t *)t->data == base + t->begin);
        const uint8_t *p = t->data;
        for (size_t k = 0; k < t->nbytes; k++) sink ^= p[k];
        spans[2 * i] = t->begin;
        spans[2 * i + 1] = t->end;
        total += t->nbytes;
    }
    (void)sink;
    /* exact tiling: sorted by offset, each span starts where the previous ended */
    qsort(spans, f->n_tensors, 2 * sizeof *spans, cmp_span);
    uint64_t at = 0;
    for (size_t i = 0; i < f->n_tensors; i++) {
        ST_ASSERT(spans[2 * i] == at);
        at = spans[2 * i + 1];
    }
    ST_ASSERT(at == data_size && total == data_size);
    free(spans);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sft_file f;
    memset(&f, 0, sizeof f);
    st_err err = {0};
    int rc = sft_file_parse(&f, data, size, "fuzz", &err);
    if (rc == ST_OK) {
        check_accepted(&f, data, size);
        sft_file_close(&f);
    } else {
        ST_ASSERT(rc < 0 && err.code == rc && err.msg[0] && !strchr(err.msg, '\n'));
        ST_ASSERT(!f.tensors && !f.n_tensors && !f.metadata_format);
        ST_ASSERT(!strncmp(err.msg, "fuzz: ", 6));
    }
    return 0;
}
