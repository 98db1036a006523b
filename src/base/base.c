/* base.c — errors, logging, assertions, time, allocation, files, progress (see base.h). */
#define _GNU_SOURCE
#include "strata/base.h"

#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* errors */

int st_err_set(st_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int st_err_prefix(st_err *err, const char *fmt, ...) {
    if (!err) return ST_ERR_INTERNAL;
    char pre[ST_ERR_MSG_MAX], old[ST_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    snprintf(err->msg, sizeof err->msg, "%s: %s", pre, old);
    return err->code;
}

const char *st_status_name(int code) {
    switch (code) {
    case ST_OK: return "ok";
    case ST_ERR_IO: return "I/O error";
    case ST_ERR_FORMAT: return "format error";
    case ST_ERR_NOMEM: return "out of memory";
    case ST_ERR_UNSUPPORTED: return "unsupported";
    case ST_ERR_ARG: return "bad argument";
    case ST_ERR_MISSING: return "missing";
    case ST_ERR_NET: return "network error";
    case ST_ERR_INTERNAL: return "internal error";
    case ST_ERR_LIMIT: return "limit exceeded";
    default: return "error";
    }
}

_Noreturn void st_abort(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "strata: fatal: %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

/* ------------------------------------------------------------------------------------------ */
/* logging */

static int g_log_level = -1;

void st_log_set_level(int level) { g_log_level = level; }

int st_log_get_level(void) {
    if (g_log_level < 0) {
        const char *e = getenv("STRATA_LOG");
        g_log_level = ST_LOG_INFO;
        if (e) {
            if (!strcmp(e, "debug")) g_log_level = ST_LOG_DEBUG;
            else if (!strcmp(e, "warn")) g_log_level = ST_LOG_WARN;
            else if (!strcmp(e, "error")) g_log_level = ST_LOG_ERROR;
            else if (!strcmp(e, "quiet")) g_log_level = ST_LOG_QUIET;
        }
    }
    return g_log_level;
}

void st_log(int level, const char *fmt, ...) {
    if (level < st_log_get_level()) return;
    static const char *tag[] = {"debug: ", "", "warning: ", "error: "};
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "strata: %s%s\n", tag[level < 0 ? 0 : level > 3 ? 3 : level], buf);
}

/* ------------------------------------------------------------------------------------------ */
/* time */

uint64_t st_time_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double st_time_s(void) { return (double)st_time_ns() * 1e-9; }

/* ------------------------------------------------------------------------------------------ */
/* allocation */

void *st_alloc_aligned(size_t n) {
    void *p = NULL;
    if (n == 0) n = 64;
    size_t r = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, r) != 0) return NULL;
    memset(p, 0, r);
    return p;
}

void st_free_aligned(void *p) { free(p); }

int st_mul_size(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* files */

int st_mmap_open(st_mmap *m, const char *path, st_err *err) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return st_err_set(err, ST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return st_err_set(err, ST_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return st_err_set(err, ST_ERR_IO, "%s: not a regular file", path);
    }
    m->size = (size_t)st.st_size;
    if (m->size > 0) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return st_err_set(err, ST_ERR_IO, "%s: mmap failed: %s", path, strerror(e));
        }
        m->data = p;
    }
    close(fd);
    m->path = strdup(path);
    if (!m->path) {
        st_mmap_close(m);
        return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", path);
    }
    return ST_OK;
}

void st_mmap_close(st_mmap *m) {
    if (m->data) munmap(m->data, m->size);
    free(m->path);
    memset(m, 0, sizeof *m);
}

int st_file_read(const char *path, char **out, size_t *len, st_err *err) {
    *out = NULL;
    if (len) *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return st_err_set(err, ST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        fclose(f);
        return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (n == cap) {
            cap *= 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return st_err_set(err, ST_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return st_err_set(err, ST_ERR_IO, "%s: read error", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return ST_OK;
}

char *st_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

int st_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int st_mkdir_p(const char *path, st_err *err) {
    char *p = strdup(path);
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                int e = errno;
                int rc = st_err_set(err, ST_ERR_IO, "%s: cannot create directory: %s", p, strerror(e));
                free(p);
                return rc;
            }
            *s = '/';
        }
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
        int rc = st_err_set(err, ST_ERR_IO, "%s: cannot create directory: %s", p, strerror(errno));
        free(p);
        return rc;
    }
    free(p);
    return ST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* numeric conversions */

uint16_t st_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* NaN */
    uint32_t r = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + r) >> 16);
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        if (man == 0) {
            v.u = sign;
        } else { /* subnormal */
            float f = ldexpf((float)man, -24);
            v.f = f;
            v.u |= sign;
        }
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else {
        v.u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return v.f;
}

uint16_t st_f32_to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000;
    uint32_t a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* overflow -> inf */
    if (a < 0x38800000u) {                                  /* subnormal or zero */
        float af;
        union { uint32_t u; float f; } w = {a};
        af = w.f;
        return (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return (uint16_t)(sign | (r >> 13));
}

const char *st_fmt_bytes(double b, char *buf, size_t cap) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024.0 && i < 4) {
        b /= 1024.0;
        i++;
    }
    if (i == 0) snprintf(buf, cap, "%.0f B", b);
    else snprintf(buf, cap, "%.2f %s", b, u[i]);
    return buf;
}

int st_cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

int st_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int st_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

int st_stderr_is_tty(void) { return isatty(2); }

/* ------------------------------------------------------------------------------------------ */
/* progress */

static void progress_draw(st_progress *p, int final) {
    double el = st_time_s() - p->t_start;
    double rate = el > 0 ? p->done / el : 0;
    char a[32], b[32], r[32];
    int bytes = p->unit && !strcmp(p->unit, "B");
    if (bytes) {
        st_fmt_bytes(p->done, a, sizeof a);
        st_fmt_bytes(p->total, b, sizeof b);
        st_fmt_bytes(rate, r, sizeof r);
    } else {
        snprintf(a, sizeof a, "%.0f", p->done);
        snprintf(b, sizeof b, "%.0f", p->total);
        snprintf(r, sizeof r, "%.1f %s", rate, p->unit ? p->unit : "");
    }
    if (p->tty) {
        if (p->total > 0)
            fprintf(stderr, "\r%s %5.1f%%  %s / %s  %s/s   ", p->label, 100.0 * p->done / p->total, a, b, r);
        else
            fprintf(stderr, "\r%s  %s  %s/s   ", p->label, a, r);
        if (final) fputc('\n', stderr);
    } else if (final) {
        fprintf(stderr, "strata: %s: %s in %.2f s (%s/s)\n", p->label, a, el, r);
    }
    fflush(stderr);
}

void st_progress_begin(st_progress *p, const char *label, double total, const char *unit) {
    memset(p, 0, sizeof *p);
    p->label = label;
    p->total = total;
    p->unit = unit;
    p->t_start = st_time_s();
    p->tty = st_stderr_is_tty() && st_log_get_level() <= ST_LOG_INFO;
    if (!p->tty && st_log_get_level() <= ST_LOG_INFO) fprintf(stderr, "strata: %s ...\n", label);
}

void st_progress_update(st_progress *p, double done) {
    p->done = done;
    if (!p->tty) return;
    double now = st_time_s();
    if (now - p->t_last_draw < 0.1) return;
    p->t_last_draw = now;
    progress_draw(p, 0);
}

void st_progress_end(st_progress *p) {
    if (p->finished) return;
    p->finished = 1;
    if (st_log_get_level() <= ST_LOG_INFO) progress_draw(p, 1);
}
