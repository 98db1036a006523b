/* test_safetensors.c — the safetensors reader/writer (safetensors.h) against bad input.
 *
 * Every malformed image is built here by hand (8-byte little-endian header length, header text,
 * data bytes), written to a temporary file and opened with sft_file_open, and also parsed from
 * memory with sft_file_parse. Each case asserts the status code and that the one-line message
 * starts with the file's name and names the problem. The rules are those of the reference
 * reader (safetensors/src/tensor.rs); the legal corner cases (rank-0 scalars, empty tensors,
 * space-padded headers) must load. The writer is checked by a round trip and by parsing its
 * header independently with jansson.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strata/base.h"
#include "strata/safetensors.h"

// ----------------------------------------------------------------------------
// helpers

static char *g_tmpdirs[64]; /* live temporary directories; a failed test leaves its own here */

/* Creates a fresh temporary directory; the caller removes it with rm_tree (or the group
 * teardown does, when an assertion ended the test early). */
static char *mk_tmpdir(void) {
    const char *t = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/strata-sft-XXXXXX", t && *t ? t : "/tmp");
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    d = strdup(d);
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (!g_tmpdirs[i]) {
            g_tmpdirs[i] = d;
            break;
        }
    return d;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* rm -rf dir (only ever a directory made by mk_tmpdir), then frees the name. */
static void rm_tree(char *dir) {
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (g_tmpdirs[i] == dir) g_tmpdirs[i] = NULL;
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

/* Group teardown: removes directories of tests that failed before cleaning up. */
static int rm_leftovers(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof g_tmpdirs / sizeof g_tmpdirs[0]; i++)
        if (g_tmpdirs[i]) rm_tree(g_tmpdirs[i]);
    return 0;
}

static void write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Reads a whole file (malloc'ed, caller frees). */
static unsigned char *read_all(const char *path, size_t *len) {
    char *b = NULL;
    st_err err = {0};
    if (st_file_read(path, &b, len, &err)) fail_msg("%s", err.msg);
    return (unsigned char *)b;
}

#define HDR_LEN_AUTO UINT64_MAX

/* A safetensors image: header length n (strlen(hdr) unless given), the header text, then
 * data_len data bytes with value (i * 7 + 1) & 0xff. Caller frees. */
static unsigned char *mk_image(const char *hdr, uint64_t n, size_t data_len, size_t *len) {
    size_t hl = strlen(hdr);
    if (n == HDR_LEN_AUTO) n = hl;
    *len = 8 + hl + data_len;
    unsigned char *b = malloc(*len ? *len : 1);
    assert_non_null(b);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, hdr, hl);
    for (size_t i = 0; i < data_len; i++) b[8 + hl + i] = (unsigned char)((i * 7 + 1) & 0xff);
    return b;
}

/* Asserts that msg starts with "<what>: " and contains needle. */
static void check_msg(const char *msg, const char *what, const char *needle, const char *label) {
    size_t wl = strlen(what);
    if (strncmp(msg, what, wl) || strncmp(msg + wl, ": ", 2))
        fail_msg("%s: message does not start with '%s: ': %s", label, what, msg);
    if (!strstr(msg, needle)) fail_msg("%s: message lacks '%s': %s", label, needle, msg);
    if (strchr(msg, '\n')) fail_msg("%s: message is not one line: %s", label, msg);
}

/* Opens an image from a file and from memory; both must fail with `code` and `needle`. */
static void expect_bad(const char *dir, const char *label, const unsigned char *img, size_t len, int code,
                       const char *needle) {
    char *path = malloc(strlen(dir) + strlen(label) + 32);
    assert_non_null(path);
    sprintf(path, "%s/%s.safetensors", dir, label);
    write_file(path, img, len);
    sft_file f;
    memset(&f, 0xab, sizeof f); /* sft_file_open must not depend on f's prior contents */
    st_err err = {0};
    int rc = sft_file_open(&f, path, &err);
    if (rc != code) fail_msg("%s: sft_file_open returned %d, want %d (%s)", label, rc, code, err.msg);
    assert_int_equal(err.code, code);
    check_msg(err.msg, path, needle, label);
    assert_null(f.tensors); /* left zeroed */
    assert_int_equal(f.n_tensors, 0);
    assert_null(f.map.data);
    /* the in-memory parser (used by the fuzzer) reports the same problem */
    sft_file g = {0};
    st_err e2 = {0};
    rc = sft_file_parse(&g, img, len, "mem", &e2);
    if (rc != code) fail_msg("%s: sft_file_parse returned %d, want %d (%s)", label, rc, code, e2.msg);
    check_msg(e2.msg, "mem", needle, label);
    assert_null(g.tensors);
    unlink(path);
    free(path);
}

static void expect_bad_hdr(const char *dir, const char *label, const char *hdr, uint64_t n, size_t data_len, int code,
                           const char *needle) {
    size_t len;
    unsigned char *img = mk_image(hdr, n, data_len, &len);
    expect_bad(dir, label, img, len, code, needle);
    free(img);
}

// ----------------------------------------------------------------------------
// framing: length prefix, header bounds

static void test_short_file(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    static const unsigned char three[3] = {5, 0, 0};
    expect_bad(dir, "short3", three, sizeof three, ST_ERR_FORMAT, "too short");
    expect_bad(dir, "short7", (const unsigned char *)"\x02\0\0\0\0\0\0", 7, ST_ERR_FORMAT, "(7 bytes)");
    expect_bad(dir, "empty", (const unsigned char *)"", 0, ST_ERR_FORMAT, "too short");
    rm_tree(dir);
}

static void test_header_bounds(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    /* 1000-byte header in a 10-byte file */
    expect_bad_hdr(dir, "beyond", "{}", 1000, 0, ST_ERR_FORMAT, "header length 1000 runs past the end of the file (10 bytes)");
    /* one byte too long */
    expect_bad_hdr(dir, "beyond1", "{}", 3, 0, ST_ERR_FORMAT, "runs past the end");
    /* the limit itself is allowed by the limit check, then fails on the file size */
    expect_bad_hdr(dir, "atlimit", "{}", 100000000ull, 0, ST_ERR_FORMAT, "runs past the end");
    expect_bad_hdr(dir, "toobig", "{}", 100000001ull, 0, ST_ERR_FORMAT,
                   "header length 100000001 exceeds the 100000000-byte limit");
    expect_bad_hdr(dir, "huge", "{}", UINT64_MAX - 1, 0, ST_ERR_FORMAT, "exceeds the 100000000-byte limit");
    /* a declared length longer than the JSON swallows data bytes into the header */
    expect_bad_hdr(dir, "hdr-swallows-data", "{}", 8, 6, ST_ERR_FORMAT, "not valid JSON");
    rm_tree(dir);
}

// ----------------------------------------------------------------------------
// data layout: tensors must tile the data buffer exactly

#define F32x8_0_32 "{\"a\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,32]}}"

static void test_layout(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    expect_bad_hdr(dir, "truncated", F32x8_0_32, HDR_LEN_AUTO, 16, ST_ERR_FORMAT,
                   "tensor data ends at 32 but the file holds 16 data bytes (truncated file?)");
    expect_bad_hdr(dir, "trailing", F32x8_0_32, HDR_LEN_AUTO, 40, ST_ERR_FORMAT,
                   "tensor data ends at 32 but the file holds 40 data bytes (trailing bytes)");
    expect_bad_hdr(dir, "no-tensors-data", "{}", HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "(trailing bytes)");
    expect_bad_hdr(dir, "overlap",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                   HDR_LEN_AUTO, 24, ST_ERR_FORMAT, "tensor 'b' begins at 8 but the previous data ends at 16 (overlap)");
    /* same region twice */
    expect_bad_hdr(dir, "alias",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                   "\"b\":{\"dtype\":\"I32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                   HDR_LEN_AUTO, 16, ST_ERR_FORMAT, "begins at 0 but the previous data ends at 16 (overlap)");
    expect_bad_hdr(dir, "gap",
                   "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[20,36]}}",
                   HDR_LEN_AUTO, 36, ST_ERR_FORMAT, "tensor 'b' begins at 20 but the previous data ends at 16 (gap)");
    expect_bad_hdr(dir, "not-at-0", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[4,20]}}", HDR_LEN_AUTO,
                   20, ST_ERR_FORMAT, "tensor 'a' begins at 4 but the previous data ends at 0 (gap)");
    expect_bad_hdr(dir, "end-before-begin", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[16,0]}}",
                   HDR_LEN_AUTO, 16, ST_ERR_FORMAT, "tensor 'a': data_offsets end before begin");
    expect_bad_hdr(dir, "offsets3", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4,8]}}", HDR_LEN_AUTO,
                   4, ST_ERR_FORMAT, "tensor 'a': bad data_offsets");
    expect_bad_hdr(dir, "offsets-neg", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}}", HDR_LEN_AUTO,
                   4, ST_ERR_FORMAT, "tensor 'a': bad data_offsets");
    expect_bad_hdr(dir, "offsets-float", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4.0]}}",
                   HDR_LEN_AUTO, 4, ST_ERR_FORMAT, "tensor 'a': bad data_offsets");
    rm_tree(dir);
}

// ----------------------------------------------------------------------------
// header entries: dtype, shape, size

static void test_entries(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    /* BF16 [4,4] needs 4*4*2 = 32 bytes */
    expect_bad_hdr(dir, "size-mismatch", "{\"w\":{\"dtype\":\"BF16\",\"shape\":[4,4],\"data_offsets\":[0,30]}}",
                   HDR_LEN_AUTO, 30, ST_ERR_FORMAT, "tensor 'w': 30 bytes in data_offsets but dtype BF16 x shape needs 32");
    expect_bad_hdr(dir, "unknown-dtype", "{\"w\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}",
                   HDR_LEN_AUTO, 16, ST_ERR_FORMAT, "tensor 'w': unknown dtype 'F128'");
    expect_bad_hdr(dir, "dtype-case", "{\"w\":{\"dtype\":\"bf16\",\"shape\":[1],\"data_offsets\":[0,2]}}",
                   HDR_LEN_AUTO, 2, ST_ERR_FORMAT, "unknown dtype 'bf16'");
    expect_bad_hdr(dir, "neg-dim", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4,-1],\"data_offsets\":[0,0]}}", HDR_LEN_AUTO,
                   0, ST_ERR_FORMAT, "tensor 'w': bad shape");
    expect_bad_hdr(dir, "float-dim", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}",
                   HDR_LEN_AUTO, 8, ST_ERR_FORMAT, "tensor 'w': bad shape");
    /* F4 is 4 bits: 3 elements are 12 bits, not whole bytes */
    expect_bad_hdr(dir, "f4-odd", "{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", HDR_LEN_AUTO, 2,
                   ST_ERR_FORMAT, "tensor 'w': F4 x 3 elements is not a whole number of bytes");
    /* F6 x 5 = 30 bits */
    expect_bad_hdr(dir, "f6-odd", "{\"w\":{\"dtype\":\"F6_E2M3\",\"shape\":[5],\"data_offsets\":[0,4]}}", HDR_LEN_AUTO,
                   4, ST_ERR_FORMAT, "F6_E2M3 x 5 elements is not a whole number of bytes");
    expect_bad_hdr(dir, "too-many-dims",
                   "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", HDR_LEN_AUTO, 1,
                   ST_ERR_FORMAT, "tensor 'w': 9 dimensions (max 8)");
    expect_bad_hdr(dir, "numel-overflow",
                   "{\"w\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,1]}}",
                   HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "tensor 'w': shape overflows");
    expect_bad_hdr(dir, "no-offsets", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", HDR_LEN_AUTO, 1, ST_ERR_FORMAT,
                   "tensor 'w': needs dtype, shape and data_offsets");
    expect_bad_hdr(dir, "dtype-not-string", "{\"w\":{\"dtype\":8,\"shape\":[1],\"data_offsets\":[0,1]}}",
                   HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "tensor 'w': needs dtype, shape and data_offsets");
    expect_bad_hdr(dir, "entry-not-object", "{\"w\":[1,2]}", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "tensor 'w': header entry is not an object");
    rm_tree(dir);
}

// ----------------------------------------------------------------------------
// header text: UTF-8, JSON, duplicates, metadata

static void test_header_text(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    expect_bad_hdr(dir, "non-utf8-key", "{\"w\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                   HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "header is not valid UTF-8");
    /* a truncated 2-byte sequence inside a string */
    expect_bad_hdr(dir, "non-utf8-value", "{\"w\":{\"dtype\":\"U8\xc3\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                   HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "header is not valid UTF-8");
    /* overlong encoding of '/' */
    expect_bad_hdr(dir, "overlong", "{\"\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                   HDR_LEN_AUTO, 1, ST_ERR_FORMAT, "header is not valid UTF-8");
    expect_bad_hdr(dir, "invalid-json", "{\"w\":{\"dtype\":\"U8\",", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "header is not valid JSON");
    expect_bad_hdr(dir, "trailing-garbage", "{} x", HDR_LEN_AUTO, 0, ST_ERR_FORMAT, "header is not valid JSON");
    expect_bad_hdr(dir, "not-object", "[1,2]", HDR_LEN_AUTO, 0, ST_ERR_FORMAT, "header is not a JSON object");
    expect_bad_hdr(dir, "duplicate",
                   "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                   "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                   HDR_LEN_AUTO, 2, ST_ERR_FORMAT, "duplicate object key");
    expect_bad_hdr(dir, "meta-int", "{\"__metadata__\":{\"format\":\"pt\",\"n\":1}}", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "__metadata__.n is not a string");
    expect_bad_hdr(dir, "meta-nested", "{\"__metadata__\":{\"format\":{\"x\":\"y\"}}}", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "__metadata__.format is not a string");
    /* names from the file cannot break the one-line message: an escaped newline shows as '?' */
    expect_bad_hdr(dir, "meta-newline", "{\"__metadata__\":{\"a\\nb\\u001b[31m\":1}}", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "__metadata__.a?b?[31m is not a string");
    expect_bad_hdr(dir, "meta-string", "{\"__metadata__\":\"pt\"}", HDR_LEN_AUTO, 0, ST_ERR_FORMAT,
                   "__metadata__ is not an object");
    rm_tree(dir);
}

// ----------------------------------------------------------------------------
// legal corner cases

static void test_legal_corners(void **state) {
    (void)state;
    /* scalar F32 at [0,4], two empty tensors, F4 x 4 = 2 bytes; header padded with spaces */
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"x\"},"
                      "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                      "\"e\":{\"dtype\":\"BF16\",\"shape\":[0,7],\"data_offsets\":[4,4]},"
                      "\"e0\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
                      "\"q\":{\"dtype\":\"F4\",\"shape\":[2,2],\"data_offsets\":[4,6]}}     ";
    size_t len;
    unsigned char *img = mk_image(hdr, HDR_LEN_AUTO, 6, &len);
    const float one_half = 1.5f;
    memcpy(img + 8 + strlen(hdr), &one_half, 4);
    sft_file f = {0};
    st_err err = {0};
    int rc = sft_file_parse(&f, img, len, "mem", &err);
    if (rc) fail_msg("legal file rejected: %s", err.msg);
    assert_int_equal(f.n_tensors, 4);
    assert_int_equal(f.header_len, strlen(hdr));
    assert_string_equal(f.metadata_format, "pt");
    const sft_tensor *s = sft_file_find(&f, "s"), *e = sft_file_find(&f, "e"), *e0 = sft_file_find(&f, "e0"),
                     *q = sft_file_find(&f, "q");
    assert_non_null(s);
    assert_non_null(e);
    assert_non_null(e0);
    assert_non_null(q);
    assert_null(sft_file_find(&f, "__metadata__"));
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_int_equal(s->nbytes, 4);
    assert_int_equal(s->dtype, SFT_F32);
    float v;
    memcpy(&v, s->data, 4);
    assert_true(v == 1.5f);
    assert_ptr_equal(s->data, img + 8 + strlen(hdr));
    assert_int_equal(e->ndim, 2);
    assert_int_equal(e->shape[0], 0);
    assert_int_equal(e->shape[1], 7);
    assert_int_equal(e->numel, 0);
    assert_int_equal(e->nbytes, 0);
    assert_int_equal(e0->numel, 0);
    assert_int_equal(q->dtype, SFT_F4);
    assert_int_equal(q->numel, 4);
    assert_int_equal(q->nbytes, 2);
    assert_ptr_equal(q->data, img + 8 + strlen(hdr) + 4);
    /* header order is kept */
    assert_string_equal(f.tensors[0].name, "s");
    assert_string_equal(f.tensors[3].name, "q");
    sft_file_close(&f);
    free(img);

    /* an empty header with no data is a valid (empty) file */
    img = mk_image("{}      ", HDR_LEN_AUTO, 0, &len);
    rc = sft_file_parse(&f, img, len, "mem", &err);
    assert_int_equal(rc, ST_OK);
    assert_int_equal(f.n_tensors, 0);
    assert_null(f.metadata_format);
    sft_file_close(&f);
    free(img);
    /* null __metadata__ is accepted (the reference's Option<HashMap>) */
    img = mk_image("{\"__metadata__\":null}", HDR_LEN_AUTO, 0, &len);
    rc = sft_file_parse(&f, img, len, "mem", &err);
    assert_int_equal(rc, ST_OK);
    sft_file_close(&f);
    free(img);
}

static void test_dtype_table(void **state) {
    (void)state;
    /* sizes from the reference's Dtype::bitsize */
    static const struct { const char *n; int bits; } want[] = {
        {"BOOL", 8}, {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8}, {"I8", 8}, {"F8_E5M2", 8},
        {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"I16", 16}, {"U16", 16}, {"F16", 16}, {"BF16", 16}, {"I32", 32},
        {"U32", 32}, {"F32", 32}, {"F64", 64}, {"I64", 64}, {"U64", 64}, {"C64", 64},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int dt = sft_dtype_from_name(want[i].n);
        if (dt < 0) fail_msg("dtype %s unknown", want[i].n);
        assert_int_equal(sft_dtype_bits((sft_dtype)dt), want[i].bits);
        assert_string_equal(sft_dtype_name((sft_dtype)dt), want[i].n);
    }
    assert_int_equal(sft_dtype_from_name("F128"), -1);
    assert_int_equal(sft_dtype_from_name(""), -1);
}

// ----------------------------------------------------------------------------
// shard sets (model.safetensors.index.json)

/* Writes DIR/NAME holding U8 [4] tensors with the given names (data = index + 1). */
static void write_shard(const char *dir, const char *name, const char *const *tensors, int n) {
    char hdr[1024] = "{", ent[128];
    for (int i = 0; i < n; i++) {
        snprintf(ent, sizeof ent, "%s\"%s\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[%d,%d]}", i ? "," : "",
                 tensors[i], 4 * i, 4 * i + 4);
        strcat(hdr, ent);
    }
    strcat(hdr, "}");
    size_t len;
    unsigned char *img = mk_image(hdr, HDR_LEN_AUTO, (size_t)(4 * n), &len);
    char *p = st_path_join(dir, name);
    write_file(p, img, len);
    free(p);
    free(img);
}

static void write_index(const char *dir, const char *weight_map) {
    char *p = st_path_join(dir, "model.safetensors.index.json");
    char buf[1024];
    snprintf(buf, sizeof buf, "{\"metadata\":{\"total_size\":12},\"weight_map\":{%s}}", weight_map);
    write_file(p, buf, strlen(buf));
    free(p);
}

/* sft_set_open_dir must fail with code and a message starting with `what` containing needle. */
static void expect_set_bad(const char *dir, const char *what, int code, const char *needle, const char *label) {
    sft_set s;
    st_err err = {0};
    int rc = sft_set_open_dir(&s, dir, &err);
    if (rc != code) fail_msg("%s: sft_set_open_dir returned %d, want %d (%s)", label, rc, code, err.msg);
    check_msg(err.msg, what, needle, label);
    assert_null(s.files);
    assert_int_equal(s.n_files, 0);
}

static void test_sharded(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    char *ipath = st_path_join(dir, "model.safetensors.index.json");
    static const char *const a[] = {"x", "y"}, *const b[] = {"z"};
    write_shard(dir, "a.safetensors", a, 2);
    write_shard(dir, "b.safetensors", b, 1);

    /* the good case */
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"a.safetensors\",\"z\":\"b.safetensors\"");
    sft_set s;
    st_err err = {0};
    if (sft_set_open_dir(&s, dir, &err)) fail_msg("%s", err.msg);
    assert_int_equal(s.n_files, 2);
    assert_int_equal(s.n_tensors, 3);
    const sft_tensor *z = sft_set_find(&s, "z"), *y = sft_set_find(&s, "y");
    assert_non_null(z);
    assert_non_null(y);
    assert_string_equal(s.file_names[z->file], "b.safetensors");
    assert_string_equal(s.file_names[y->file], "a.safetensors");
    assert_int_equal(((const unsigned char *)y->data)[0], (4 * 7 + 1) & 0xff); /* data byte 4 of a */
    assert_null(sft_set_find(&s, "w"));
    sft_set_close(&s);

    /* a shard the index names does not exist */
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"a.safetensors\",\"z\":\"c.safetensors\"");
    char *cpath = st_path_join(dir, "c.safetensors");
    expect_set_bad(dir, cpath, ST_ERR_IO, "cannot open", "missing shard");
    free(cpath);

    /* a tensor the index places in a shard that does not hold it */
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"a.safetensors\",\"z\":\"b.safetensors\",\"w\":\"a.safetensors\"");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "tensor 'w' is listed in the index but not in a.safetensors",
                   "tensor missing from shard");

    /* a tensor in the other shard than the index says */
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"z\":\"b.safetensors\"");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "tensor 'y' is in a.safetensors, the index says b.safetensors",
                   "wrong shard");

    /* paths leaving the directory */
    write_index(dir, "\"x\":\"../a.safetensors\",\"y\":\"a.safetensors\",\"z\":\"b.safetensors\"");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "weight_map[\"x\"] names a path outside the directory", "dotdot path");
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"sub/a.safetensors\",\"z\":\"b.safetensors\"");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "weight_map[\"y\"] names a path outside the directory", "slash path");
    write_index(dir, "\"x\":\"/etc/passwd\"");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "names a path outside the directory", "absolute path");

    /* malformed index files */
    write_index(dir, "\"x\":3");
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "weight_map[\"x\"] is not a file name", "non-string shard");
    write_file(ipath, "{\"weight_map\": [1]}", 19);
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "no \"weight_map\" object", "weight_map list");
    write_file(ipath, "{\n\"weight_map\": {\n", 18);
    expect_set_bad(dir, ipath, ST_ERR_FORMAT, "invalid JSON at line 3", "index json");

    /* the same tensor in two shards */
    static const char *const b2[] = {"z", "x"};
    write_shard(dir, "b.safetensors", b2, 2);
    write_index(dir, "\"x\":\"a.safetensors\",\"y\":\"a.safetensors\",\"z\":\"b.safetensors\"");
    expect_set_bad(dir, dir, ST_ERR_FORMAT, "tensor 'x' appears in both a.safetensors and b.safetensors",
                   "duplicate across shards");

    /* a directory without weights */
    unlink(ipath);
    expect_set_bad(dir, dir, ST_ERR_MISSING, "no model.safetensors or model.safetensors.index.json", "no weights");
    free(ipath);
    rm_tree(dir);
}

/* The fixture's real two-shard checkpoint opens and every tensor sits where the index says. */
static void test_sharded_fixture(void **state) {
    (void)state;
    const char *fx = getenv("STRATA_FIXTURES");
    if (!fx) skip();
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/qwen3_moe-bf16-sharded", fx);
    sft_set s;
    st_err err = {0};
    if (sft_set_open_dir(&s, dir, &err)) fail_msg("%s", err.msg);
    assert_int_equal(s.n_files, 2);
    /* independent count: entries in the index's weight_map */
    char *ipath = st_path_join(dir, "model.safetensors.index.json");
    json_error_t je;
    json_t *root = json_load_file(ipath, 0, &je);
    assert_non_null(root);
    json_t *wm = json_object_get(root, "weight_map");
    assert_int_equal(s.n_tensors, json_object_size(wm));
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        const sft_tensor *t = sft_set_find(&s, k);
        if (!t) fail_msg("%s missing", k);
        assert_string_equal(s.file_names[t->file], json_string_value(v));
    }
    json_decref(root);
    free(ipath);
    sft_set_close(&s);
}

// ----------------------------------------------------------------------------
// writer round trip

static void test_write_roundtrip(void **state) {
    (void)state;
    char *dir = mk_tmpdir();
    uint16_t bf[6] = {0x3f80, 0x4000, 0xbf80, 0x0000, 0x7f80, 0x3e80};
    float sc = -2.25f;
    int32_t none[1] = {0};
    uint8_t u8[5] = {1, 2, 3, 4, 5};
    uint8_t f4[2] = {0x21, 0x43};
    /* name lengths 1..8 shift the header length through every padding amount */
    for (int pad = 1; pad <= 8; pad++) {
        char name[16];
        memset(name, 'n', (size_t)pad);
        name[pad] = 0;
        sft_write_tensor t[5] = {
            {.name = "bf", .dtype = SFT_BF16, .ndim = 2, .shape = {2, 3}, .data = bf},
            {.name = "scalar", .dtype = SFT_F32, .ndim = 0, .data = &sc},
            {.name = "empty", .dtype = SFT_I32, .ndim = 2, .shape = {0, 4}, .data = none},
            {.name = name, .dtype = SFT_U8, .ndim = 1, .shape = {5}, .data = u8},
            {.name = "f4", .dtype = SFT_F4, .ndim = 1, .shape = {4}, .data = f4},
        };
        char *path = st_path_join(dir, "rt.safetensors");
        st_err err = {0};
        if (sft_write(path, t, 5, pad % 2 ? "pt" : NULL, &err)) fail_msg("sft_write: %s", err.msg);
        /* raw layout, checked without the reader */
        size_t len;
        unsigned char *raw = read_all(path, &len);
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = (n << 8) | raw[i];
        assert_int_equal(n % 8, 0);
        assert_int_equal(len, 8 + n + 12 + 4 + 0 + 5 + 2);
        size_t jl = n;
        while (jl > 0 && raw[8 + jl - 1] == ' ') jl--;
        assert_true(n - jl < 8);           /* at most 7 pad bytes ... */
        assert_int_equal(raw[8 + jl - 1], '}'); /* ... all spaces after the JSON */
        json_error_t je;
        json_t *root = json_loadb((const char *)raw + 8, jl, JSON_REJECT_DUPLICATES, &je);
        if (!root) fail_msg("writer header is not JSON: %s", je.text);
        json_t *e = json_object_get(root, "bf");
        assert_string_equal(json_string_value(json_object_get(e, "dtype")), "BF16");
        assert_int_equal(json_integer_value(json_array_get(json_object_get(e, "data_offsets"), 1)), 12);
        e = json_object_get(root, "scalar");
        assert_int_equal(json_array_size(json_object_get(e, "shape")), 0);
        assert_int_equal(json_integer_value(json_array_get(json_object_get(e, "data_offsets"), 0)), 12);
        json_t *m = json_object_get(root, "__metadata__");
        if (pad % 2) assert_string_equal(json_string_value(json_object_get(m, "format")), "pt");
        else assert_null(m);
        json_decref(root);
        /* data in the order given */
        assert_memory_equal(raw + 8 + n, bf, 12);
        assert_memory_equal(raw + 8 + n + 12, &sc, 4);
        assert_memory_equal(raw + 8 + n + 16, u8, 5);
        assert_memory_equal(raw + 8 + n + 21, f4, 2);
        free(raw);

        /* and the reader agrees */
        sft_file f;
        if (sft_file_open(&f, path, &err)) fail_msg("reopen: %s", err.msg);
        assert_int_equal(f.n_tensors, 5);
        assert_int_equal(f.header_len, n);
        if (pad % 2) assert_string_equal(f.metadata_format, "pt");
        else assert_null(f.metadata_format);
        for (int i = 0; i < 5; i++) {
            const sft_tensor *r = sft_file_find(&f, t[i].name);
            if (!r) fail_msg("tensor %s lost", t[i].name);
            assert_int_equal(r->dtype, t[i].dtype);
            assert_int_equal(r->ndim, t[i].ndim);
            for (int d = 0; d < t[i].ndim; d++) assert_int_equal(r->shape[d], t[i].shape[d]);
            if (r->nbytes) assert_memory_equal(r->data, t[i].data, r->nbytes);
        }
        assert_int_equal(sft_file_find(&f, "bf")->nbytes, 12);
        assert_int_equal(sft_file_find(&f, "empty")->nbytes, 0);
        assert_int_equal(sft_file_find(&f, "f4")->nbytes, 2);
        sft_file_close(&f);
        unlink(path);
        free(path);
    }
    /* an unwritable path is an I/O error naming the path */
    char *bad = st_path_join(dir, "no/such/dir/x.safetensors");
    st_err err = {0};
    sft_write_tensor one = {.name = "a", .dtype = SFT_U8, .ndim = 1, .shape = {1}, .data = u8};
    assert_int_equal(sft_write(bad, &one, 1, NULL, &err), ST_ERR_IO);
    check_msg(err.msg, bad, "cannot create", "unwritable");
    free(bad);
    rm_tree(dir);
}

/* A missing file is an I/O error naming it. */
static void test_open_missing(void **state) {
    (void)state;
    sft_file f;
    st_err err = {0};
    assert_int_equal(sft_file_open(&f, "/nonexistent/strata/x.safetensors", &err), ST_ERR_IO);
    check_msg(err.msg, "/nonexistent/strata/x.safetensors", "cannot open", "missing file");
    assert_null(f.tensors);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_short_file),      cmocka_unit_test(test_header_bounds),
        cmocka_unit_test(test_layout),          cmocka_unit_test(test_entries),
        cmocka_unit_test(test_header_text),     cmocka_unit_test(test_legal_corners),
        cmocka_unit_test(test_dtype_table),     cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_sharded_fixture), cmocka_unit_test(test_write_roundtrip),
        cmocka_unit_test(test_open_missing),
    };
    return cmocka_run_group_tests(tests, NULL, rm_leftovers);
}
