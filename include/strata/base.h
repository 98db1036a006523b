/* strata/base.h — errors, logging, assertions, timing, files.
 *
 * Every library function that can fail for reasons outside the program's control (bad files,
 * bad input, missing resources) returns an int status: 0 (ST_OK) or a negative ST_ERR_* code,
 * and describes the failure in a caller-supplied st_err (one line, names the file and the
 * problem). Violated invariants are bugs: ST_ASSERT aborts with file:line. Nothing below main()
 * calls exit().
 */
#ifndef STRATA_BASE_H
#define STRATA_BASE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* status codes                                                                               */

enum st_status {
    ST_OK = 0,
    ST_ERR_IO = -1,          /* open/read/mmap failed                                  */
    ST_ERR_FORMAT = -2,      /* a file or message is malformed                         */
    ST_ERR_NOMEM = -3,       /* allocation failed                                      */
    ST_ERR_UNSUPPORTED = -4, /* well-formed but not something strata implements        */
    ST_ERR_ARG = -5,         /* bad argument from the user (CLI flag, request field)   */
    ST_ERR_MISSING = -6,     /* a required file, field or tensor is absent             */
    ST_ERR_NET = -7,         /* network failure                                        */
    ST_ERR_INTERNAL = -8,    /* should not happen; still reported, not aborted         */
    ST_ERR_LIMIT = -9,       /* a size or capacity limit was exceeded                  */
};

#define ST_ERR_MSG_MAX 512

/* A failure description. Zero-initialise; functions fill it when they fail. */
typedef struct st_err {
    int code;                  /* last ST_ERR_* or ST_OK                                   */
    char msg[ST_ERR_MSG_MAX];  /* one line, no trailing newline                            */
} st_err;

/* Records code + printf-style message in err (err may be NULL) and returns code, so callers
 * write `return st_err_set(err, ST_ERR_FORMAT, "%s: bad header", path);`. */
int st_err_set(st_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to an existing message (for adding context as an error propagates). */
int st_err_prefix(st_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Short name of a status code ("format error", ...). Never NULL. */
const char *st_status_name(int code);

/* ------------------------------------------------------------------------------------------ */
/* assertions (bugs, not input errors)                                                       */

_Noreturn void st_abort(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define ST_ASSERT(x)                                                                       \
    do {                                                                                   \
        if (!(x)) st_abort(__FILE__, __LINE__, "assertion failed: %s", #x);               \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* logging: to stderr, "strata: " prefix for info and above; level from STRATA_LOG or flags  */

enum st_log_level { ST_LOG_DEBUG = 0, ST_LOG_INFO = 1, ST_LOG_WARN = 2, ST_LOG_ERROR = 3, ST_LOG_QUIET = 4 };

void st_log_set_level(int level);
int st_log_get_level(void);
void st_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define ST_DEBUG(...) st_log(ST_LOG_DEBUG, __VA_ARGS__)
#define ST_INFO(...) st_log(ST_LOG_INFO, __VA_ARGS__)
#define ST_WARN(...) st_log(ST_LOG_WARN, __VA_ARGS__)
#define ST_ERROR(...) st_log(ST_LOG_ERROR, __VA_ARGS__)

/* ------------------------------------------------------------------------------------------ */
/* time                                                                                       */

/* Monotonic clock in nanoseconds / seconds. */
uint64_t st_time_ns(void);
double st_time_s(void);

/* ------------------------------------------------------------------------------------------ */
/* allocation: checked helpers. They return NULL on failure (callers report ST_ERR_NOMEM).   */

/* 64-byte aligned, zeroed allocation of n bytes; free with st_free_aligned. */
void *st_alloc_aligned(size_t n);
void st_free_aligned(void *p);

/* Overflow-checked a*b; returns 0 and sets *out, or -1 on overflow. */
int st_mul_size(size_t a, size_t b, size_t *out);

/* ------------------------------------------------------------------------------------------ */
/* files                                                                                      */

/* A read-only memory map of a whole file. Owned by the caller; release with st_mmap_close. */
typedef struct st_mmap {
    void *data;   /* NULL for an empty file */
    size_t size;
    char *path;   /* owned copy */
} st_mmap;

/* Maps path read-only. On failure returns ST_ERR_IO with "path: reason" in err. */
int st_mmap_open(st_mmap *m, const char *path, st_err *err);
void st_mmap_close(st_mmap *m);

/* Reads a whole file into a malloc'ed NUL-terminated buffer (*out, *len without the NUL).
 * The caller frees *out. ST_ERR_IO on failure. */
int st_file_read(const char *path, char **out, size_t *len, st_err *err);

/* Joins dir and name into a malloc'ed path ("dir/name"); NULL on allocation failure. */
char *st_path_join(const char *dir, const char *name);

/* 1 if path exists (any type). */
int st_path_exists(const char *path);

/* Creates directory path and parents (mkdir -p). */
int st_mkdir_p(const char *path, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                              */

static inline float st_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
/* Round-to-nearest-even float -> bf16 (NaN preserved). */
uint16_t st_f32_to_bf16(float f);
float st_f16_to_f32(uint16_t h);
uint16_t st_f32_to_f16(float f);

/* Human-readable byte size into buf ("1.50 GiB"); returns buf. */
const char *st_fmt_bytes(double bytes, char *buf, size_t cap);

/* Number of online CPUs (>= 1). */
int st_cpu_count(void);

/* 1 if the CPU and OS support AVX2+FMA / AVX-512F (runtime check). */
int st_cpu_has_avx2(void);
int st_cpu_has_avx512(void);

/* 1 if stderr is a terminal (progress bars only draw there). */
int st_stderr_is_tty(void);

/* A progress line on stderr for long operations: "label  42% 1.2 GB/4.0 GB  310 MB/s".
 * Draws in place on a TTY (rate-limited), prints start/end lines otherwise. */
typedef struct st_progress {
    const char *label;
    double total;       /* units of work (bytes, tokens ...) ; 0 = unknown */
    double done;
    double t_start;
    double t_last_draw;
    const char *unit;   /* "B" formats as bytes; anything else printed raw */
    int tty;
    int finished;
} st_progress;

void st_progress_begin(st_progress *p, const char *label, double total, const char *unit);
void st_progress_update(st_progress *p, double done);
void st_progress_end(st_progress *p);

#ifdef __cplusplus
}
#endif
#endif
