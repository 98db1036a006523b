/* strata/safetensors.h — validated, mmapped safetensors files and multi-shard tensor sets.
 *
 * Validation follows the reference reader (safetensors/src/tensor.rs): header length
 * <= 100,000,000; the header is UTF-8 JSON without duplicate keys; every entry has a known
 * dtype, a shape and data_offsets; sorted by offset the tensors tile the data buffer exactly
 * (first begins at 0, each begins where the previous ended, the last ends at the file's end);
 * end - begin == numel * bits / 8. Tensors point into the read-only mapping (no copies).
 */
#ifndef STRATA_SAFETENSORS_H
#define STRATA_SAFETENSORS_H

#include "strata/base.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SFT_MAX_HEADER 100000000ull
#define SFT_MAX_DIMS 8

typedef enum sft_dtype {
    SFT_BOOL, SFT_F4, SFT_F6_E2M3, SFT_F6_E3M2, SFT_U8, SFT_I8, SFT_F8_E5M2, SFT_F8_E4M3,
    SFT_F8_E8M0, SFT_F8_E4M3FNUZ, SFT_F8_E5M2FNUZ, SFT_I16, SFT_U16, SFT_F16, SFT_BF16,
    SFT_I32, SFT_U32, SFT_F32, SFT_C64, SFT_F64, SFT_I64, SFT_U64,
    SFT_DTYPE_COUNT
} sft_dtype;

/* Name ("BF16") and size in bits of a dtype. */
const char *sft_dtype_name(sft_dtype dt);
int sft_dtype_bits(sft_dtype dt);
/* Parses a dtype name; returns -1 if unknown. */
int sft_dtype_from_name(const char *s);

typedef struct sft_tensor {
    char *name;                   /* owned                                               */
    sft_dtype dtype;
    int ndim;
    int64_t shape[SFT_MAX_DIMS];
    int64_t numel;
    uint64_t begin, end;          /* data_offsets, relative to the data buffer           */
    const void *data;             /* borrowed: points into the file mapping (or buffer)   */
    size_t nbytes;
    int file;                     /* index of the owning file in an sft_set (0 otherwise) */
} sft_tensor;

typedef struct sft_file {
    st_mmap map;                  /* owned mapping (empty when parsed from a buffer)      */
    sft_tensor *tensors;          /* owned, in header order                               */
    size_t n_tensors;
    uint64_t header_len;
    char *metadata_format;        /* __metadata__.format if present ("pt", "mlx"), owned  */
    void *owned_buf;              /* in-memory sets: tensor data block, freed on close    */
} sft_file;

/* Opens, maps and validates path. On failure returns ST_ERR_IO/FORMAT with
 * "<path>: <problem>" in err and leaves f zeroed. */
int sft_file_open(sft_file *f, const char *path, st_err *err);

/* Validates an in-memory image of a safetensors file (borrowed; must outlive f).
 * `what` names the source in error messages. Used by sft_file_open and the fuzzer. */
int sft_file_parse(sft_file *f, const void *buf, size_t size, const char *what, st_err *err);

void sft_file_close(sft_file *f);

/* Linear lookup by name within one file; NULL if absent. */
const sft_tensor *sft_file_find(const sft_file *f, const char *name);

/* A set of shards with a name -> tensor hash index: a model's weights. */
typedef struct sft_set {
    sft_file *files;              /* owned                                                */
    char **file_names;            /* owned, basenames                                     */
    int n_files;
    const sft_tensor **slots;     /* open-addressing hash table of borrowed tensors       */
    size_t n_slots;
    size_t n_tensors;
} sft_set;

/* Opens the weights of a model directory: model.safetensors.index.json (every shard it
 * names; every tensor must live in the shard the weight_map says), or model.safetensors.
 * Duplicate tensor names across shards are an error. */
int sft_set_open_dir(sft_set *s, const char *dir, st_err *err);

/* Opens a single file as a set (golden files, tools). */
int sft_set_open_file(sft_set *s, const char *path, st_err *err);

void sft_set_close(sft_set *s);

/* Builds a one-file set over tensors already in memory (synthetic models, tests). Takes
 * ownership of `tensors` (a malloc'ed array of n entries whose `name` fields are malloc'ed and
 * whose `data` point into `buf`) and of `buf` (malloc'ed or st_alloc_aligned'ed; freed with
 * free()) on success and on failure. `label` names the set in messages. */
int sft_set_from_memory(sft_set *s, sft_tensor *tensors, size_t n, void *buf, const char *label, st_err *err);

/* Hash lookup; NULL if absent. */
const sft_tensor *sft_set_find(const sft_set *s, const char *name);

/* Iteration over all tensors: calls fn for each; stops early if fn returns non-zero. */
void sft_set_each(const sft_set *s, int (*fn)(void *ctx, const sft_tensor *t), void *ctx);

/* Writer: writes tensors (name, dtype, shape, data) into path with the reference layout
 * (header padded with spaces to a multiple of 8, data in the given order). Used by
 * `strata synth` and tests. `metadata_format` may be NULL. */
typedef struct sft_write_tensor {
    const char *name;
    sft_dtype dtype;
    int ndim;
    int64_t shape[SFT_MAX_DIMS];
    const void *data;             /* numel * bits / 8 bytes                                */
} sft_write_tensor;

int sft_write(const char *path, const sft_write_tensor *t, size_t n, const char *metadata_format,
              st_err *err);

#ifdef __cplusplus
}
#endif
#endif
