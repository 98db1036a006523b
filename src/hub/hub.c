/* hub.c — model sources: local directories and Hugging Face hub ids (see strata/hub.h).
 *
 * Online flow for "org/name@rev":
 *   1. GET {endpoint}/api/models/org/name/revision/{rev}?blobs=true -> commit sha + siblings
 *      (rfilename, size, blobId, lfs.sha256).
 *   2. Pick the files strata reads (model.safetensors.index.json first: it names the shards).
 *   3. For each file whose blob is not cached: lock, download
 *      {endpoint}/org/name/resolve/{commit}/{file} into blobs/<id>.incomplete (resuming with a
 *      Range request), verify size + digest, rename to blobs/<id>; symlink the snapshot entry.
 *   4. Write refs/<rev> = commit; return snapshots/<commit>.
 */
#include "strata/hub.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef STRATA_HAVE_CURL
#include <curl/curl.h>
#endif
#ifdef STRATA_HAVE_CRYPTO
#include <openssl/evp.h>
#endif

#define HUB_DEFAULT_ENDPOINT "https://huggingface.co"
#define HUB_DEFAULT_ATTEMPTS 5
#define HUB_API_MAX (64u << 20)   /* cap on an API answer / index.json we hold in memory */
#define HUB_NAME_MAX 1024         /* cap on a repository file name                      */

// ---------------------------------------------------------------------------------------------
// small string helpers

/* printf into a fresh malloc'ed string; NULL on allocation failure. */
__attribute__((format(printf, 1, 2))) static char *str_fmt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) s = NULL;
    va_end(ap);
    return s;
}

/* 1 if s is exactly n lowercase hex digits. */
static int is_hex(const char *s, size_t n) {
    size_t i = 0;
    for (; s[i] && i < n; i++)
        if (!isdigit((unsigned char)s[i]) && !(s[i] >= 'a' && s[i] <= 'f')) return 0;
    return i == n && s[i] == 0;
}

#ifdef STRATA_HAVE_CURL
/* Percent-encodes s (RFC 3986 unreserved characters kept; '/' kept when keep_slash).
 * malloc'ed; NULL on allocation failure. */
static char *url_encode(const char *s, int keep_slash) {
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s);
    char *o = malloc(3 * n + 1), *p = o;
    if (!o) return NULL;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (isalnum(*c) || *c == '-' || *c == '.' || *c == '_' || *c == '~' || (keep_slash && *c == '/')) {
            *p++ = (char)*c;
        } else {
            *p++ = '%';
            *p++ = hex[*c >> 4];
            *p++ = hex[*c & 15];
        }
    }
    *p = 0;
    return o;
}
#endif

/* 1 if name is a safe relative file name inside a repository: non-empty, no leading '/',
 * no backslash or control characters, no empty, "." or ".." component. It becomes a path
 * under snapshots/, so a hostile server must not be able to escape the cache with it. */
static int repo_path_ok(const char *name) {
    size_t n = strlen(name);
    if (!n || n >= HUB_NAME_MAX || name[0] == '/') return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || name[i] == '\\' || name[i] == 0x7f) return 0;
    const char *c = name;
    while (*c) {
        const char *e = strchr(c, '/');
        size_t len = e ? (size_t)(e - c) : strlen(c);
        if (len == 0 || (len == 1 && c[0] == '.') || (len == 2 && c[0] == '.' && c[1] == '.')) return 0;
        c += len;
        if (*c == '/') c++;
        if (e && !*c) return 0; /* trailing slash */
    }
    return 1;
}

// ---------------------------------------------------------------------------------------------
// hub ids

/* 1 if s[0..n) is a valid org or model name (huggingface_hub's repo-id rules). */
static int id_part_ok(const char *s, size_t n) {
    if (n == 0 || n > 96) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.') return 0;
    if (s[0] == '-' || s[0] == '.' || s[n - 1] == '-' || s[n - 1] == '.') return 0;
    for (size_t i = 0; i + 1 < n; i++)
        if ((s[i] == '-' && s[i + 1] == '-') || (s[i] == '.' && s[i + 1] == '.')) return 0;
    return 1;
}

int hub_parse_id(const char *s, hub_id *id, st_err *err) {
    memset(id, 0, sizeof *id);
    const char *at = strchr(s, '@');
    size_t rlen = at ? (size_t)(at - s) : strlen(s);
    const char *slash = memchr(s, '/', rlen);
    if (!slash) return st_err_set(err, ST_ERR_ARG, "'%s': a hub id is org/name[@revision]", s);
    size_t olen = (size_t)(slash - s), nlen = rlen - olen - 1;
    if (!id_part_ok(s, olen) || !id_part_ok(slash + 1, nlen))
        return st_err_set(err, ST_ERR_ARG,
                          "'%s': a hub id is org/name[@revision] with org and name made of letters, digits, '-', "
                          "'_', '.'",
                          s);
    memcpy(id->repo, s, rlen);
    id->repo[rlen] = 0;
    const char *rev = at ? at + 1 : "main";
    size_t vlen = strlen(rev);
    if (vlen == 0 || vlen >= HUB_REV_MAX || rev[0] == '/' || strstr(rev, ".."))
        return st_err_set(err, ST_ERR_ARG, "'%s': bad revision after '@'", s);
    for (size_t i = 0; i < vlen; i++)
        if (!isgraph((unsigned char)rev[i]) || rev[i] == '\\' || rev[i] == '@')
            return st_err_set(err, ST_ERR_ARG, "'%s': bad character in revision", s);
    if (rev[vlen - 1] == '/' || strstr(rev, "//")) return st_err_set(err, ST_ERR_ARG, "'%s': bad revision", s);
    memcpy(id->revision, rev, vlen + 1);
    return ST_OK;
}

// ---------------------------------------------------------------------------------------------
// environment: cache location, endpoint, token, offline switch

/* getenv that treats "" as unset. */
static const char *env_get(const char *k) {
    const char *v = getenv(k);
    return v && *v ? v : NULL;
}

/* 1 if environment variable k is set to a true value (1, true, yes, on). */
static int env_truthy(const char *k) {
    const char *v = env_get(k);
    return v && (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on"));
}

/* $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface. malloc'ed or NULL. */
static char *hf_home(void) {
    const char *v;
    if ((v = env_get("HF_HOME"))) return strdup(v);
    if ((v = env_get("XDG_CACHE_HOME"))) return str_fmt("%s/huggingface", v);
    if ((v = env_get("HOME"))) return str_fmt("%s/.cache/huggingface", v);
    return NULL;
}

char *hub_cache_dir(const hub_opts *o) {
    const char *v;
    if (o && o->cache_dir && *o->cache_dir) return strdup(o->cache_dir);
    if ((v = env_get("HF_HUB_CACHE")) || (v = env_get("HUGGINGFACE_HUB_CACHE"))) return strdup(v);
    char *home = hf_home();
    if (!home) return NULL;
    char *r = str_fmt("%s/hub", home);
    free(home);
    return r;
}

#ifdef STRATA_HAVE_CURL
/* The token: o->token, $HF_TOKEN, then the first line of $HF_TOKEN_PATH or $HF_HOME/token.
 * malloc'ed, whitespace-trimmed; NULL when there is none. */
static char *find_token(const hub_opts *o) {
    const char *v = o && o->token && *o->token ? o->token : env_get("HF_TOKEN");
    char *t = NULL;
    if (!v) v = env_get("HUGGING_FACE_HUB_TOKEN");
    if (v) {
        t = strdup(v);
    } else {
        char *path = env_get("HF_TOKEN_PATH") ? strdup(env_get("HF_TOKEN_PATH")) : NULL;
        if (!path) {
            char *home = hf_home();
            path = home ? str_fmt("%s/token", home) : NULL;
            free(home);
        }
        size_t len;
        if (path && st_path_exists(path) && st_file_read(path, &t, &len, NULL)) t = NULL;
        free(path);
    }
    if (!t) return NULL;
    char *s = t;
    while (isspace((unsigned char)*s)) s++;
    size_t n = strcspn(s, "\r\n");
    while (n && isspace((unsigned char)s[n - 1])) n--;
    memmove(t, s, n);
    t[n] = 0;
    if (!*t) {
        free(t);
        return NULL;
    }
    return t;
}
#endif

// ---------------------------------------------------------------------------------------------
// digests: sha256 (LFS objects) and git blob sha1 (regular files)

typedef struct hub_digest {
#ifdef STRATA_HAVE_CRYPTO
    EVP_MD_CTX *sha256; /* NULL when not wanted */
    EVP_MD_CTX *sha1;   /* git blob sha1, header already fed; NULL when not wanted */
#endif
    int unused;
} hub_digest;

/* Starts the wanted digests; the git sha1 needs the file size up front (its header is
 * "blob <size>\0"). ST_ERR_NOMEM / ST_ERR_UNSUPPORTED (no libcrypto) on failure. */
static int digest_init(hub_digest *d, int want_sha256, int want_gitsha1, int64_t size, st_err *err) {
    memset(d, 0, sizeof *d);
#ifdef STRATA_HAVE_CRYPTO
    if (want_sha256) {
        d->sha256 = EVP_MD_CTX_new();
        if (!d->sha256 || !EVP_DigestInit_ex(d->sha256, EVP_sha256(), NULL))
            return st_err_set(err, ST_ERR_NOMEM, "sha256: cannot initialise libcrypto digest");
    }
    if (want_gitsha1) {
        char hdr[40];
        int n = snprintf(hdr, sizeof hdr, "blob %lld", (long long)size);
        d->sha1 = EVP_MD_CTX_new();
        if (!d->sha1 || !EVP_DigestInit_ex(d->sha1, EVP_sha1(), NULL) ||
            !EVP_DigestUpdate(d->sha1, hdr, (size_t)n + 1))
            return st_err_set(err, ST_ERR_NOMEM, "sha1: cannot initialise libcrypto digest");
    }
    return ST_OK;
#else
    return ST_OK; /* no libcrypto: digests stay empty; callers check sizes only */
#endif
}

static void digest_update(hub_digest *d, const void *p, size_t n) {
#ifdef STRATA_HAVE_CRYPTO
    if (d->sha256) EVP_DigestUpdate(d->sha256, p, n);
    if (d->sha1) EVP_DigestUpdate(d->sha1, p, n);
#endif
}

/* Writes the hex digests that were started into s256 (65 bytes) / s1 (41 bytes). */
static void digest_final(hub_digest *d, char *s256, char *s1) {
#ifdef STRATA_HAVE_CRYPTO
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (d->sha256 && s256 && EVP_DigestFinal_ex(d->sha256, md, &n))
        for (unsigned i = 0; i < n; i++) sprintf(s256 + 2 * i, "%02x", md[i]);
    if (d->sha1 && s1 && EVP_DigestFinal_ex(d->sha1, md, &n))
        for (unsigned i = 0; i < n; i++) sprintf(s1 + 2 * i, "%02x", md[i]);
#endif
}

static void digest_free(hub_digest *d) {
#ifdef STRATA_HAVE_CRYPTO
    EVP_MD_CTX_free(d->sha256);
    EVP_MD_CTX_free(d->sha1);
#endif
    memset(d, 0, sizeof *d);
}

/* Feeds the first n bytes of path into d. ST_ERR_IO when they cannot be read. */
static int digest_file(hub_digest *d, const char *path, int64_t n, st_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return st_err_set(err, ST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = malloc(1 << 20);
    if (!buf) {
        fclose(f);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    int rc = ST_OK;
    while (n > 0) {
        size_t want = n < (1 << 20) ? (size_t)n : (size_t)(1 << 20);
        size_t got = fread(buf, 1, want, f);
        if (got == 0) {
            rc = st_err_set(err, ST_ERR_IO, "%s: short read", path);
            break;
        }
        digest_update(d, buf, got);
        n -= (int64_t)got;
    }
    free(buf);
    fclose(f);
    return rc;
}

int hub_file_digest(const char *path, char *sha256_hex, char *gitsha1_hex, st_err *err) {
#ifndef STRATA_HAVE_CRYPTO
    return st_err_set(err, ST_ERR_UNSUPPORTED, "%s: strata was built without libcrypto: cannot digest", path);
#endif
    struct stat st;
    if (stat(path, &st) != 0) return st_err_set(err, ST_ERR_IO, "%s: %s", path, strerror(errno));
    hub_digest d;
    int rc = digest_init(&d, sha256_hex != NULL, gitsha1_hex != NULL, (int64_t)st.st_size, err);
    if (!rc) rc = digest_file(&d, path, (int64_t)st.st_size, err);
    if (!rc) digest_final(&d, sha256_hex, gitsha1_hex);
    digest_free(&d);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// snapshots in the cache

/* Reads the unique shard names of a model.safetensors.index.json into *names (malloc'ed
 * array of malloc'ed strings; free with free_names). Every name is checked with
 * repo_path_ok. ST_ERR_FORMAT naming path on a malformed index. */
static int index_shards(const char *path, char ***names, size_t *n, st_err *err) {
    *names = NULL;
    *n = 0;
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root)
        return st_err_set(err, ST_ERR_FORMAT, "%s: invalid JSON at line %d column %d: %s", path, je.line, je.column,
                          je.text);
    int rc = ST_OK;
    json_t *wm = json_object_get(root, "weight_map");
    size_t cap = json_object_size(wm);
    if (!json_is_object(wm) || !cap) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: no \"weight_map\" object", path);
        goto out;
    }
    char **v = calloc(cap, sizeof *v);
    if (!v) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    *names = v;
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val) {
        const char *s = json_string_value(val);
        if (!s || !repo_path_ok(s)) {
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: weight_map[\"%s\"] is not a valid file name", path, key);
            goto out;
        }
        size_t i = 0;
        while (i < *n && strcmp(v[i], s)) i++;
        if (i < *n) continue;
        if (!(v[(*n)++] = strdup(s))) {
            rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            goto out;
        }
    }
out:
    json_decref(root);
    return rc;
}

static void free_names(char **v, size_t n) {
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

/* 0 if snapshot directory snap holds everything strata needs (config.json, and
 * model.safetensors or the index plus every shard it names; symlinks must resolve).
 * Otherwise ST_ERR_MISSING naming the first missing file. */
static int snapshot_check(const char *snap, st_err *err) {
    char *p = st_path_join(snap, "config.json");
    int rc = ST_OK;
    if (!p) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (!st_path_exists(p)) rc = st_err_set(err, ST_ERR_MISSING, "%s is missing", p);
    free(p);
    if (rc) return rc;
    char *idx = st_path_join(snap, "model.safetensors.index.json");
    if (!idx) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (st_path_exists(idx)) {
        char **names;
        size_t n;
        rc = index_shards(idx, &names, &n, err);
        for (size_t i = 0; !rc && i < n; i++) {
            char *s = st_path_join(snap, names[i]);
            if (!s) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            else if (!st_path_exists(s)) rc = st_err_set(err, ST_ERR_MISSING, "%s (named by the index) is missing", s);
            free(s);
        }
        free_names(names, n);
    } else {
        char *m = st_path_join(snap, "model.safetensors");
        if (!m) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        else if (!st_path_exists(m))
            rc = st_err_set(err, ST_ERR_MISSING, "%s: no model.safetensors or model.safetensors.index.json", snap);
        free(m);
    }
    free(idx);
    return rc;
}

/* Resolves id from the cache alone: the snapshot of refs/<revision> (or of the revision
 * itself when it is a cached commit), which must be complete (snapshot_check). *out is the
 * malloc'ed snapshot path. ST_ERR_MISSING with a message saying how to fill the cache. */
static int resolve_cached(const char *repo_dir, const hub_id *id, char **out, st_err *err) {
    *out = NULL;
    char commit[128] = "";
    char *snap = NULL;
    int rc = ST_OK;
    if (is_hex(id->revision, 40)) {
        snap = str_fmt("%s/snapshots/%s", repo_dir, id->revision);
        if (snap && st_path_exists(snap)) memcpy(commit, id->revision, 41);
        free(snap);
        snap = NULL;
    }
    if (!commit[0]) {
        char *ref = str_fmt("%s/refs/%s", repo_dir, id->revision), *txt = NULL;
        size_t len = 0;
        if (!ref) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
        if (st_path_exists(ref) && st_file_read(ref, &txt, &len, NULL) == ST_OK) {
            size_t n = strcspn(txt, " \t\r\n");
            if (n < sizeof commit) memcpy(commit, txt, n), commit[n] = 0;
        }
        free(txt);
        free(ref);
        if (!commit[0] || !repo_path_ok(commit) || strchr(commit, '/'))
            return st_err_set(err, ST_ERR_MISSING,
                              "%s@%s is not in the hub cache %s; run 'strata pull %s@%s' with network access first",
                              id->repo, id->revision, repo_dir, id->repo, id->revision);
    }
    snap = str_fmt("%s/snapshots/%s", repo_dir, commit);
    if (!snap) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if ((rc = snapshot_check(snap, err))) {
        st_err_prefix(err, "%s@%s: the cached snapshot is incomplete (run 'strata pull %s@%s' online)", id->repo,
                      id->revision, id->repo, id->revision);
        free(snap);
        return rc;
    }
    *out = snap;
    return ST_OK;
}

// ---------------------------------------------------------------------------------------------
// online: the hub API and downloads (libcurl)

#ifdef STRATA_HAVE_CURL

/* The files strata reads; weights are handled separately (single file or index + shards). */
static const char *const k_required[] = {"config.json"};
static const char *const k_optional[] = {"generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                         "chat_template.jinja"};
#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* One repository file as the API lists it. */
typedef struct hub_file {
    char *name;     /* rfilename, checked with repo_path_ok                                  */
    int64_t size;   /* bytes; -1 when the API does not say                                    */
    char blob[65];  /* lfs: sha256 of the content; else git blob sha1; "" when unknown        */
    int lfs;
    int selected;
} hub_file;

typedef struct hub_ctx {
    hub_id id;
    char *repo_dir;   /* <cache>/models--org--name                                          */
    char *lock_dir;   /* <cache>/.locks/models--org--name                                   */
    char *endpoint;   /* no trailing '/'                                                    */
    struct curl_slist *headers; /* Authorization, when there is a token                     */
    int have_token;
    int max_attempts;
    int no_progress;
    char commit[41];
    hub_file *files;
    size_t n_files;
    st_progress prog; /* one bar over every byte still to download                          */
    int prog_on;
    double prog_base; /* bytes of files finished before the current one                     */
    char label[HUB_ID_MAX + 16];
} hub_ctx;

/* What the header callback remembers of the latest response (redirects reset it). */
typedef struct http_hdr {
    char err_code[64]; /* X-Error-Code, e.g. RepositoryNotFound, RevisionNotFound           */
    char err_msg[200]; /* X-Error-Message                                                   */
} http_hdr;

/* Copies the value of header line b (length n) into dst if its name is `name`. */
static void hdr_take(const char *b, size_t n, const char *name, char *dst, size_t cap) {
    size_t k = strlen(name);
    if (n <= k + 1 || strncasecmp(b, name, k) || b[k] != ':') return;
    const char *v = b + k + 1;
    size_t vn = n - k - 1;
    while (vn && (*v == ' ' || *v == '\t')) v++, vn--;
    while (vn && (v[vn - 1] == '\r' || v[vn - 1] == '\n' || v[vn - 1] == ' ')) vn--;
    if (vn >= cap) vn = cap - 1;
    memcpy(dst, v, vn);
    dst[vn] = 0;
}

static size_t on_header(char *b, size_t size, size_t n, void *ud) {
    http_hdr *h = ud;
    size_t len = size * n;
    if (len >= 5 && !strncmp(b, "HTTP/", 5)) memset(h, 0, sizeof *h);
    hdr_take(b, len, "X-Error-Code", h->err_code, sizeof h->err_code);
    hdr_take(b, len, "X-Error-Message", h->err_msg, sizeof h->err_msg);
    return len;
}

/* A growable in-memory body (API answers, error pages), capped at max bytes. */
typedef struct http_buf {
    char *data;
    size_t len, cap, max;
    int overflow;
} http_buf;

static size_t on_body_mem(char *p, size_t size, size_t n, void *ud) {
    http_buf *b = ud;
    size_t len = size * n;
    if (b->len + len + 1 > b->max) {
        b->overflow = 1;
        return 0;
    }
    if (b->len + len + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 4096;
        while (nc < b->len + len + 1) nc *= 2;
        char *d = realloc(b->data, nc);
        if (!d) return 0;
        b->data = d;
        b->cap = nc;
    }
    memcpy(b->data + b->len, p, len);
    b->len += len;
    b->data[b->len] = 0;
    return len;
}

/* A curl handle with the options every request shares: redirects (http/https only),
 * timeouts that catch dead connections but not slow ones, auth header, error buffer. */
static CURL *http_new(const hub_ctx *c, const char *url, http_hdr *h, char *errbuf) {
    CURL *e = curl_easy_init();
    if (!e) return NULL;
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#endif
    curl_easy_setopt(e, CURLOPT_USERAGENT, "strata/0.1.0");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, 30L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L); /* < 1 byte/s for 60 s: a dead transfer */
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, h);
    if (c->headers) curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->headers);
    errbuf[0] = 0;
    return e;
}

/* The error for an HTTP failure status on url (`what` names the request for 404s). */
static int http_status_error(const hub_ctx *c, const char *url, long status, const http_hdr *h, int is_file,
                             st_err *err) {
    const char *code = h->err_code;
    if (!strcmp(code, "RepositoryNotFound") || !strcmp(code, "RevisionNotFound") ||
        (status == 404 && !is_file)) {
        return st_err_set(err, ST_ERR_MISSING, "%s: HTTP %ld: no such model or revision '%s@%s'%s", url, status,
                          c->id.repo, c->id.revision,
                          status == 401 && !c->have_token ? " (if it is private or gated: set HF_TOKEN)" : "");
    }
    if (status == 401 || status == 403) {
        if (!c->have_token)
            return st_err_set(err, ST_ERR_ARG, "%s: HTTP %ld: '%s' needs authentication: set HF_TOKEN", url, status,
                              c->id.repo);
        return st_err_set(err, ST_ERR_ARG,
                          "%s: HTTP %ld: HF_TOKEN gives no access to '%s' (gated: accept its terms on the hub; or "
                          "set HF_TOKEN to a token with read access)",
                          url, status, c->id.repo);
    }
    if (status == 404)
        return st_err_set(err, ST_ERR_MISSING, "%s: HTTP 404: no such file in '%s@%s'", url, c->id.repo,
                          c->id.revision);
    return st_err_set(err, ST_ERR_NET, "%s: HTTP %ld%s%s", url, status, h->err_msg[0] ? ": " : "", h->err_msg);
}

/* GETs url into memory (up to HUB_API_MAX). Non-2xx statuses become errors. */
static int http_get_mem(const hub_ctx *c, const char *url, http_buf *body, st_err *err) {
    http_hdr h = {0};
    char eb[CURL_ERROR_SIZE];
    memset(body, 0, sizeof *body);
    body->max = HUB_API_MAX;
    CURL *e = http_new(c, url, &h, eb);
    if (!e) return st_err_set(err, ST_ERR_NOMEM, "curl_easy_init failed");
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body_mem);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, body);
    CURLcode res = curl_easy_perform(e);
    long status = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(e);
    if (res != CURLE_OK) {
        if (body->overflow)
            return st_err_set(err, ST_ERR_LIMIT, "%s: answer larger than %u MiB", url, HUB_API_MAX >> 20);
        return st_err_set(err, ST_ERR_NET, "%s: cannot reach the hub: %s", url, eb[0] ? eb : curl_easy_strerror(res));
    }
    if (status < 200 || status >= 300) return http_status_error(c, url, status, &h, 0, err);
    return ST_OK;
}

/* Asks the API for the revision's commit and file list (c->commit, c->files). */
static int fetch_listing(hub_ctx *c, st_err *err) {
    char *rev = url_encode(c->id.revision, 0);
    char *url = rev ? str_fmt("%s/api/models/%s/revision/%s?blobs=true", c->endpoint, c->id.repo, rev) : NULL;
    free(rev);
    if (!url) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    http_buf body;
    int rc = http_get_mem(c, url, &body, err);
    json_t *root = NULL;
    if (rc) goto out;
    json_error_t je;
    root = json_loadb(body.data ? body.data : "", body.len, 0, &je);
    if (!root) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: invalid JSON answer: %s", url, je.text);
        goto out;
    }
    const char *sha = json_string_value(json_object_get(root, "sha"));
    json_t *sib = json_object_get(root, "siblings");
    if (!sha || !is_hex(sha, 40) || !json_is_array(sib)) {
        rc = st_err_set(err, ST_ERR_FORMAT, "%s: answer lacks a 40-hex \"sha\" or a \"siblings\" array", url);
        goto out;
    }
    memcpy(c->commit, sha, 41);
    c->files = calloc(json_array_size(sib) + 1, sizeof *c->files);
    if (!c->files) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t i;
    json_t *s;
    json_array_foreach(sib, i, s) {
        const char *name = json_string_value(json_object_get(s, "rfilename"));
        if (!name || !repo_path_ok(name)) continue; /* never selected; nothing to download */
        hub_file *f = &c->files[c->n_files];
        f->size = -1;
        json_t *sz = json_object_get(s, "size"), *lfs = json_object_get(s, "lfs");
        if (json_is_integer(sz)) f->size = json_integer_value(sz);
        const char *blob = json_string_value(json_object_get(s, "blobId"));
        if (json_is_object(lfs)) {
            const char *h = json_string_value(json_object_get(lfs, "sha256"));
            json_t *lsz = json_object_get(lfs, "size");
            if (json_is_integer(lsz)) f->size = json_integer_value(lsz);
            f->lfs = 1;
            if (h && !is_hex(h, 64)) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: %s: lfs.sha256 is not 64 hex digits", url, name);
                goto out;
            }
            if (h) memcpy(f->blob, h, 65);
        } else if (blob) {
            if (!is_hex(blob, 40)) {
                rc = st_err_set(err, ST_ERR_FORMAT, "%s: %s: blobId is not 40 hex digits", url, name);
                goto out;
            }
            memcpy(f->blob, blob, 41);
        }
        if (f->size < -1) f->size = -1;
        if (!(f->name = strdup(name))) {
            rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            goto out;
        }
        c->n_files++;
    }
out:
    json_decref(root);
    free(body.data);
    free(url);
    return rc;
}

static hub_file *find_file(hub_ctx *c, const char *name) {
    for (size_t i = 0; i < c->n_files; i++)
        if (!strcmp(c->files[i].name, name)) return &c->files[i];
    return NULL;
}

/* Sleeps the backoff before retry number `attempt` (1-based): 0.25 s doubling, at most 8 s. */
static void backoff_sleep(int attempt) {
    double s = 0.25;
    for (int i = 1; i < attempt && s < 8; i++) s *= 2;
    if (s > 8) s = 8;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* State of one transfer into a .incomplete file. */
typedef struct dl_state {
    hub_ctx *c;
    CURL *e;
    FILE *f;
    hub_digest *dig;
    int64_t have;     /* bytes in the file                                          */
    int64_t limit;    /* expected size, -1 unknown                                  */
    int64_t resume;   /* offset this request started from                           */
    http_buf errbody; /* body of a non-2xx answer                                   */
    int too_big, write_errno;
} dl_state;

static size_t on_body_file(char *p, size_t size, size_t n, void *ud) {
    dl_state *d = ud;
    size_t len = size * n;
    long status = 0;
    curl_easy_getinfo(d->e, CURLINFO_RESPONSE_CODE, &status);
    if (status < 200 || status >= 300) {
        on_body_mem(p, 1, len > 4096 ? 4096 : len, &d->errbody); /* keep a little for the message */
        return len;
    }
    if (d->limit >= 0 && d->have + (int64_t)len > d->limit) {
        d->too_big = 1;
        return 0;
    }
    if (fwrite(p, 1, len, d->f) != len) {
        d->write_errno = errno ? errno : EIO;
        return 0;
    }
    digest_update(d->dig, p, len);
    d->have += (int64_t)len;
    return len;
}

static int on_xfer(void *ud, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow) {
    dl_state *d = ud;
    if (d->c->prog_on) st_progress_update(&d->c->prog, d->c->prog_base + (double)d->resume + (double)dlnow);
    return 0;
}

/* 1 for failures worth retrying with a resume: the connection broke or the server hiccuped. */
static int transient(CURLcode res, long status) {
    if (res == CURLE_OK) return status == 408 || status == 429 || (status >= 500 && status <= 599);
    return res == CURLE_PARTIAL_FILE || res == CURLE_RECV_ERROR || res == CURLE_SEND_ERROR ||
           res == CURLE_GOT_NOTHING || res == CURLE_OPERATION_TIMEDOUT || res == CURLE_COULDNT_CONNECT ||
           res == CURLE_SSL_CONNECT_ERROR || res == CURLE_HTTP2 || res == CURLE_HTTP2_STREAM;
}

/* Moves the verified download inc to blobs/<id> (id: f->blob, or the sha256 when unknown). */
static int finish_blob(hub_ctx *c, hub_file *f, const char *inc, const char *sha256, const char *gitsha1,
                       st_err *err) {
    if (f->blob[0]) {
        const char *want = f->blob, *got = f->lfs ? sha256 : gitsha1;
        if (got[0] && strcmp(want, got)) {
            unlink(inc);
            return st_err_set(err, ST_ERR_FORMAT,
                              "%s: %s mismatch: the hub publishes %s, the download has %s; deleted the download",
                              f->name, f->lfs ? "sha256" : "git blob sha1", want, got);
        }
    } else if (sha256[0]) {
        memcpy(f->blob, sha256, 65); /* the API gave no blob id: name the blob by content */
    } else {
        unlink(inc);
        return st_err_set(err, ST_ERR_UNSUPPORTED, "%s: the hub gives no blob id and strata was built without libcrypto",
                          f->name);
    }
    char *blob = str_fmt("%s/blobs/%s", c->repo_dir, f->blob);
    if (!blob) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int rc = ST_OK;
    if (rename(inc, blob) != 0) rc = st_err_set(err, ST_ERR_IO, "%s: cannot rename into place: %s", blob, strerror(errno));
    free(blob);
    return rc;
}

/* Downloads f into inc, resuming what inc already holds, with up to c->max_attempts
 * transfers, then verifies size and digest and moves it to blobs/. Leaves inc in place when
 * a transfer fails (the next call resumes); deletes it when the content is wrong. */
static int download_into(hub_ctx *c, hub_file *f, const char *inc, st_err *err) {
    char *fenc = url_encode(f->name, 1);
    char *url = fenc ? str_fmt("%s/%s/resolve/%s/%s", c->endpoint, c->id.repo, c->commit, fenc) : NULL;
    free(fenc);
    if (!url) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    int want_sha256 = f->lfs || !f->blob[0], want_git = !f->lfs && f->blob[0] && f->size >= 0;
    int rc = ST_OK;
    for (int attempt = 1;; attempt++) {
        /* (re)open the partial file and digest what it already holds */
        FILE *fp = fopen(inc, "ab");
        if (!fp) {
            rc = st_err_set(err, ST_ERR_IO, "%s: cannot open for writing: %s", inc, strerror(errno));
            break;
        }
        struct stat st;
        int64_t have = fstat(fileno(fp), &st) == 0 ? (int64_t)st.st_size : 0;
        if (have > 0 && (f->size < 0 || have > f->size)) { /* cannot resume against an unknown size */
            if (ftruncate(fileno(fp), 0) != 0) {
                rc = st_err_set(err, ST_ERR_IO, "%s: cannot truncate: %s", inc, strerror(errno));
                fclose(fp);
                break;
            }
            have = 0;
        }
        hub_digest dig;
        if ((rc = digest_init(&dig, want_sha256, want_git, f->size, err)) ||
            (have > 0 && (rc = digest_file(&dig, inc, have, err)))) {
            digest_free(&dig);
            fclose(fp);
            break;
        }
        if (have > 0) ST_DEBUG("%s: resuming at byte %lld", f->name, (long long)have);
        dl_state d = {.c = c, .f = fp, .dig = &dig, .have = have, .limit = f->size, .resume = have};
        d.errbody.max = 4097;
        CURLcode res = CURLE_OK;
        long status = 200;
        http_hdr h = {0};
        char eb[CURL_ERROR_SIZE];
        eb[0] = 0;
        if (f->size < 0 || have < f->size) {
            d.e = http_new(c, url, &h, eb);
            if (!d.e) {
                digest_free(&dig);
                fclose(fp);
                rc = st_err_set(err, ST_ERR_NOMEM, "curl_easy_init failed");
                break;
            }
            curl_easy_setopt(d.e, CURLOPT_WRITEFUNCTION, on_body_file);
            curl_easy_setopt(d.e, CURLOPT_WRITEDATA, &d);
            curl_easy_setopt(d.e, CURLOPT_NOPROGRESS, 0L);
            curl_easy_setopt(d.e, CURLOPT_XFERINFOFUNCTION, on_xfer);
            curl_easy_setopt(d.e, CURLOPT_XFERINFODATA, &d);
            if (have > 0) curl_easy_setopt(d.e, CURLOPT_RESUME_FROM_LARGE, (curl_off_t)have);
            res = curl_easy_perform(d.e);
            status = 0;
            curl_easy_getinfo(d.e, CURLINFO_RESPONSE_CODE, &status);
            curl_easy_cleanup(d.e);
        }
        int werr = fflush(fp) != 0 || fsync(fileno(fp)) != 0 ? errno : 0;
        if (fclose(fp) != 0 && !werr) werr = errno;
        free(d.errbody.data);
        if (d.write_errno || werr) {
            digest_free(&dig);
            rc = st_err_set(err, ST_ERR_IO, "%s: write failed: %s", inc, strerror(d.write_errno ? d.write_errno : werr));
            break;
        }
        if (d.too_big) {
            digest_free(&dig);
            unlink(inc);
            rc = st_err_set(err, ST_ERR_FORMAT, "%s: the server sent more than the %lld bytes the hub publishes for %s",
                            url, (long long)f->size, f->name);
            break;
        }
        int retry = 0;
        const char *why = NULL;
        char whybuf[CURL_ERROR_SIZE + 64];
        if (res == CURLE_RANGE_ERROR || (res == CURLE_OK && status == 416)) {
            /* the server will not resume from here: start over */
            if (truncate(inc, 0) != 0) {
                digest_free(&dig);
                rc = st_err_set(err, ST_ERR_IO, "%s: cannot truncate: %s", inc, strerror(errno));
                break;
            }
            retry = 1;
            why = "the server cannot resume there; starting over";
        } else if (transient(res, status)) {
            retry = 1;
            snprintf(whybuf, sizeof whybuf, "%s", res != CURLE_OK ? (eb[0] ? eb : curl_easy_strerror(res)) : "");
            if (res == CURLE_OK) snprintf(whybuf, sizeof whybuf, "HTTP %ld", status);
            why = whybuf;
        } else if (res != CURLE_OK) {
            digest_free(&dig);
            rc = st_err_set(err, ST_ERR_NET, "%s: download failed: %s", url, eb[0] ? eb : curl_easy_strerror(res));
            break;
        } else if (status < 200 || status >= 300) {
            digest_free(&dig);
            rc = http_status_error(c, url, status, &h, 1, err);
            break;
        } else if (f->size >= 0 && d.have < f->size) {
            retry = 1; /* the server ended the body early without an error */
            why = "the body ended early";
        }
        if (retry) {
            digest_free(&dig);
            if (attempt >= c->max_attempts) {
                rc = st_err_set(err, ST_ERR_NET,
                                "%s: download interrupted at %lld of %lld bytes (%s) after %d attempt%s; run again "
                                "to resume",
                                url, (long long)d.have, (long long)f->size, why, attempt, attempt > 1 ? "s" : "");
                break;
            }
            if (c->prog_on && c->prog.tty) fputc('\n', stderr); /* keep the bar's line intact */
            ST_WARN("%s: transfer interrupted at %lld of %lld bytes (%s); retrying", f->name, (long long)d.have,
                    (long long)f->size, why);
            backoff_sleep(attempt);
            continue;
        }
        /* complete: verify and move into place */
        char s256[65] = "", s1[41] = "";
        digest_final(&dig, s256, s1);
        digest_free(&dig);
        rc = finish_blob(c, f, inc, s256, s1, err);
        break;
    }
    free(url);
    return rc;
}

/* Ensures blobs/<id> of f exists and is verified, downloading it when needed, then links
 * snapshots/<commit>/<name> to it. Serialised with other processes by a lock file. */
static int fetch_file(hub_ctx *c, hub_file *f, st_err *err) {
    char *blobs = str_fmt("%s/blobs", c->repo_dir), *blob = NULL, *inc = NULL, *lock = NULL;
    int rc = ST_OK, lfd = -1;
    if (!blobs) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if ((rc = st_mkdir_p(blobs, err)) || (rc = st_mkdir_p(c->lock_dir, err))) goto out;
    /* a blob whose id we do not know yet downloads under a name derived from the file */
    char tmpname[HUB_NAME_MAX + 64];
    if (f->blob[0]) {
        snprintf(tmpname, sizeof tmpname, "%s", f->blob);
    } else {
        snprintf(tmpname, sizeof tmpname, "unknown-%s-%s", c->commit, f->name);
        for (char *p = tmpname; *p; p++)
            if (*p == '/') *p = '_';
    }
    blob = str_fmt("%s/%s", blobs, tmpname);
    inc = str_fmt("%s/%s.incomplete", blobs, tmpname);
    lock = str_fmt("%s/%s.lock", c->lock_dir, tmpname);
    if (!blob || !inc || !lock) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    struct stat st;
    if (f->blob[0] && stat(blob, &st) == 0 && (f->size < 0 || (int64_t)st.st_size == f->size)) goto link;
    lfd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lfd < 0) {
        rc = st_err_set(err, ST_ERR_IO, "%s: cannot create lock file: %s", lock, strerror(errno));
        goto out;
    }
    if (flock(lfd, LOCK_EX | LOCK_NB) != 0) {
        ST_INFO("%s: another process is downloading it; waiting", f->name);
        if (flock(lfd, LOCK_EX) != 0) {
            rc = st_err_set(err, ST_ERR_IO, "%s: cannot lock: %s", lock, strerror(errno));
            goto out;
        }
    }
    if (f->blob[0] && stat(blob, &st) == 0 && (f->size < 0 || (int64_t)st.st_size == f->size)) goto link;
    if ((rc = download_into(c, f, inc, err))) goto out;
link:;
    /* snapshots/<commit>/<name> -> ../../blobs/<id> (one more ../ per directory in name) */
    char *path = str_fmt("%s/snapshots/%s/%s", c->repo_dir, c->commit, f->name);
    if (!path) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    char *slash = strrchr(path, '/');
    *slash = 0;
    rc = st_mkdir_p(path, err);
    *slash = '/';
    if (!rc) {
        char target[HUB_NAME_MAX * 2];
        size_t off = 0;
        for (const char *p = f->name; *p; p++)
            if (*p == '/') off += (size_t)snprintf(target + off, sizeof target - off, "../");
        snprintf(target + off, sizeof target - off, "../../blobs/%s", f->blob);
        char cur[sizeof target];
        ssize_t n = readlink(path, cur, sizeof cur - 1);
        if (n < 0 || (size_t)n != strlen(target) || memcmp(cur, target, (size_t)n)) {
            char *tmp = str_fmt("%s.tmp%ld", path, (long)getpid());
            if (!tmp) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
            else {
                unlink(tmp);
                if (symlink(target, tmp) != 0 || rename(tmp, path) != 0) {
                    rc = st_err_set(err, ST_ERR_IO, "%s: cannot create symlink: %s", path, strerror(errno));
                    unlink(tmp);
                }
                free(tmp);
            }
        }
    }
    free(path);
out:
    if (lfd >= 0) close(lfd); /* releases the lock */
    free(blobs);
    free(blob);
    free(inc);
    free(lock);
    return rc;
}

/* Writes refs/<revision> = commit (atomically), unless the revision is the commit itself. */
static int write_ref(hub_ctx *c, st_err *err) {
    if (!strcmp(c->id.revision, c->commit)) return ST_OK;
    char *ref = str_fmt("%s/refs/%s", c->repo_dir, c->id.revision);
    char *tmp = ref ? str_fmt("%s.tmp%ld", ref, (long)getpid()) : NULL;
    int rc = ST_OK;
    if (!tmp) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    char *slash = strrchr(ref, '/');
    *slash = 0;
    rc = st_mkdir_p(ref, err);
    *slash = '/';
    if (rc) goto out;
    FILE *f = fopen(tmp, "wb");
    if (!f || fputs(c->commit, f) < 0 || fclose(f) != 0 || rename(tmp, ref) != 0) {
        rc = st_err_set(err, ST_ERR_IO, "%s: cannot write: %s", ref, strerror(errno));
        unlink(tmp);
    }
out:
    free(tmp);
    free(ref);
    return rc;
}

/* Marks the files to download: the required, the optional ones present, the weights, and
 * the include patterns. Downloads the index first (it names the shards). */
static int select_files(hub_ctx *c, const hub_opts *o, st_err *err) {
    for (size_t i = 0; i < N_ELEMS(k_required); i++) {
        hub_file *f = find_file(c, k_required[i]);
        if (!f)
            return st_err_set(err, ST_ERR_MISSING, "%s@%s: the repository has no %s", c->id.repo, c->id.revision,
                              k_required[i]);
        f->selected = 1;
    }
    for (size_t i = 0; i < N_ELEMS(k_optional); i++) {
        hub_file *f = find_file(c, k_optional[i]);
        if (f) f->selected = 1;
    }
    if (!find_file(c, "tokenizer.json"))
        ST_WARN("%s@%s: the repository has no tokenizer.json (text commands will need --tokenizer)", c->id.repo,
                c->id.revision);
    hub_file *idx = find_file(c, "model.safetensors.index.json");
    if (idx) {
        idx->selected = 1;
        int rc = fetch_file(c, idx, err);
        if (rc) return rc;
        char *path = str_fmt("%s/snapshots/%s/%s", c->repo_dir, c->commit, idx->name);
        if (!path) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
        char **names;
        size_t n;
        rc = index_shards(path, &names, &n, err);
        for (size_t i = 0; !rc && i < n; i++) {
            hub_file *f = find_file(c, names[i]);
            if (!f)
                rc = st_err_set(err, ST_ERR_MISSING, "%s: names shard %s, which %s@%s does not have", path, names[i],
                                c->id.repo, c->id.revision);
            else f->selected = 1;
        }
        free_names(names, n);
        free(path);
        if (rc) return rc;
    } else {
        hub_file *f = find_file(c, "model.safetensors");
        if (!f)
            return st_err_set(err, ST_ERR_UNSUPPORTED,
                              "%s@%s: no model.safetensors or model.safetensors.index.json (strata reads safetensors "
                              "checkpoints only)",
                              c->id.repo, c->id.revision);
        f->selected = 1;
    }
    for (const char *const *p = o ? o->include : NULL; p && *p; p++) {
        int hit = 0;
        for (size_t i = 0; i < c->n_files; i++)
            if (fnmatch(*p, c->files[i].name, 0) == 0) c->files[i].selected = hit = 1;
        if (!hit) ST_WARN("%s@%s: no file matches --include '%s'", c->id.repo, c->id.revision, *p);
    }
    return ST_OK;
}

/* 1 if f's verified blob is already cached. */
static int blob_cached(const hub_ctx *c, const hub_file *f) {
    if (!f->blob[0]) return 0;
    char *blob = str_fmt("%s/blobs/%s", c->repo_dir, f->blob);
    struct stat st;
    int ok = blob && stat(blob, &st) == 0 && (f->size < 0 || (int64_t)st.st_size == f->size);
    free(blob);
    return ok;
}

/* The online path of hub_resolve: list, select, download, link, write the ref. */
static int resolve_online(hub_ctx *c, const hub_opts *o, char **out, st_err *err) {
    int rc = fetch_listing(c, err);
    if (rc) return rc;
    if ((rc = select_files(c, o, err))) return rc;
    double total = 0;
    int n_missing = 0, unknown = 0;
    for (size_t i = 0; i < c->n_files; i++) {
        hub_file *f = &c->files[i];
        if (!f->selected || blob_cached(c, f)) continue;
        n_missing++;
        if (f->size < 0) unknown = 1;
        else total += (double)f->size;
    }
#ifndef STRATA_HAVE_CRYPTO
    if (n_missing) ST_WARN("strata was built without libcrypto: downloads are checked by size only");
#endif
    if (n_missing && !c->no_progress) {
        snprintf(c->label, sizeof c->label, "pulling %s", c->id.repo);
        st_progress_begin(&c->prog, c->label, unknown ? 0 : total, "B");
        c->prog_on = 1;
    }
    for (size_t i = 0; i < c->n_files && !rc; i++) {
        hub_file *f = &c->files[i];
        if (!f->selected) continue;
        int cached = blob_cached(c, f);
        rc = fetch_file(c, f, err);
        if (!cached && f->size > 0) c->prog_base += (double)f->size;
        if (c->prog_on) st_progress_update(&c->prog, c->prog_base);
    }
    if (c->prog_on) {
        if (!rc) st_progress_end(&c->prog);
        else if (c->prog.tty) fputc('\n', stderr);
    }
    if (rc) return rc;
    if ((rc = write_ref(c, err))) return rc;
    char *snap = str_fmt("%s/snapshots/%s", c->repo_dir, c->commit);
    if (!snap) return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if ((rc = snapshot_check(snap, err))) {
        free(snap);
        return rc;
    }
    *out = snap;
    return ST_OK;
}

#endif /* STRATA_HAVE_CURL */

// ---------------------------------------------------------------------------------------------
// entry point

int hub_resolve(const char *model, const hub_opts *o, char **local_dir, st_err *err) {
    *local_dir = NULL;
    struct stat st;
    if (stat(model, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) return st_err_set(err, ST_ERR_ARG, "%s: not a directory", model);
        *local_dir = strdup(model);
        return *local_dir ? ST_OK : st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    hub_id id;
    st_err perr = {0};
    if (hub_parse_id(model, &id, &perr))
        return st_err_set(err, ST_ERR_ARG, "%s: no such directory, and not a hub id (%s)", model, perr.msg);
    char *cache = hub_cache_dir(o);
    if (!cache) return st_err_set(err, ST_ERR_ARG, "no hub cache location: set HF_HUB_CACHE, HF_HOME or HOME");
    char *folder = strdup(id.repo);
    if (!folder) {
        free(cache);
        return st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    *strchr(folder, '/') = 0;
    char *repo_dir = str_fmt("%s/models--%s--%s", cache, folder, folder + strlen(folder) + 1);
    char *lock_dir = str_fmt("%s/.locks/models--%s--%s", cache, folder, folder + strlen(folder) + 1);
    free(folder);
    int rc = ST_OK;
    if (!repo_dir || !lock_dir) {
        rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
        goto out;
    }
    int offline = (o && o->offline) || env_truthy("HF_HUB_OFFLINE");
    if (offline) {
        rc = resolve_cached(repo_dir, &id, local_dir, err);
        if (rc) st_err_prefix(err, "offline");
        goto out;
    }
#ifdef STRATA_HAVE_CURL
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        rc = st_err_set(err, ST_ERR_INTERNAL, "curl_global_init failed");
        goto out;
    }
    hub_ctx c = {.id = id, .repo_dir = repo_dir, .lock_dir = lock_dir};
    const char *ep = o && o->endpoint && *o->endpoint ? o->endpoint : env_get("HF_ENDPOINT");
    c.endpoint = strdup(ep ? ep : HUB_DEFAULT_ENDPOINT);
    c.max_attempts = o && o->max_attempts > 0 ? o->max_attempts : HUB_DEFAULT_ATTEMPTS;
    c.no_progress = o && o->no_progress;
    char *token = find_token(o);
    if (token) {
        char *h = str_fmt("Authorization: Bearer %s", token);
        c.headers = h ? curl_slist_append(NULL, h) : NULL;
        c.have_token = 1;
        free(h);
        free(token);
        if (!c.headers) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    }
    if (!c.endpoint) rc = st_err_set(err, ST_ERR_NOMEM, "out of memory");
    if (!rc) {
        size_t n = strlen(c.endpoint);
        while (n && c.endpoint[n - 1] == '/') c.endpoint[--n] = 0;
        rc = resolve_online(&c, o, local_dir, err);
        if (rc == ST_ERR_NET && !c.commit[0]) {
            /* the hub is unreachable: a complete cached snapshot still serves */
            st_err cerr = {0};
            if (resolve_cached(repo_dir, &id, local_dir, &cerr) == ST_OK) {
                ST_WARN("%s; using the cached snapshot %s", err ? err->msg : "hub unreachable", *local_dir);
                rc = ST_OK;
            }
        }
    }
    for (size_t i = 0; i < c.n_files; i++) free(c.files[i].name);
    free(c.files);
    free(c.endpoint);
    curl_slist_free_all(c.headers);
    curl_global_cleanup();
#else
    rc = resolve_cached(repo_dir, &id, local_dir, err);
    if (rc) st_err_prefix(err, "strata was built without libcurl, so only the hub cache is available");
#endif
out:
    free(cache);
    free(repo_dir);
    free(lock_dir);
    return rc;
}
