/* test_hub.c — model sources (hub.h) without a hub: id parsing, cache location, digests,
 * local directories, offline resolution from a hand-built Hugging Face cache, and the error
 * for an unreachable endpoint. Downloads are tested in tests/integration/test_hub.sh against
 * tools/hubserver.py.
 *
 * Digest expectations come from `git hash-object` and `sha256sum`, not from the code under test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "strata/base.h"
#include "strata/hub.h"

// ----------------------------------------------------------------------------
// helpers

#define COMMIT "0123456789abcdef0123456789abcdef01234567"

static char g_tmp[256]; /* per-test scratch directory */

static int setup_tmp(void **state) {
    snprintf(g_tmp, sizeof g_tmp, "/tmp/strata-test-hub.XXXXXX");
    if (!mkdtemp(g_tmp)) return -1;
    unsetenv("HF_HUB_OFFLINE");
    unsetenv("HF_HUB_CACHE");
    unsetenv("HUGGINGFACE_HUB_CACHE");
    unsetenv("HF_HOME");
    unsetenv("XDG_CACHE_HOME");
    unsetenv("HF_ENDPOINT");
    unsetenv("HF_TOKEN");
    return 0;
}

static int teardown_tmp(void **state) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* mkdir -p for tests */
static void mkdirs(const char *path) {
    st_err err = {0};
    assert_int_equal(st_mkdir_p(path, &err), ST_OK);
}

/* Builds <cache>/models--org--m with blobs, snapshots/COMMIT/{config.json, model.safetensors}
 * as relative symlinks, and refs/main = COMMIT. Returns the malloc'ed snapshot path. */
static char *make_cached_repo(const char *cache) {
    char p[512], q[512];
    snprintf(p, sizeof p, "%s/models--org--m/blobs", cache);
    mkdirs(p);
    snprintf(p, sizeof p, "%s/models--org--m/snapshots/" COMMIT, cache);
    mkdirs(p);
    snprintf(p, sizeof p, "%s/models--org--m/refs", cache);
    mkdirs(p);
    snprintf(p, sizeof p, "%s/models--org--m/blobs/aaaa", cache);
    write_file(p, "{}\n");
    snprintf(p, sizeof p, "%s/models--org--m/blobs/bbbb", cache);
    write_file(p, "weights");
    snprintf(p, sizeof p, "%s/models--org--m/snapshots/" COMMIT "/config.json", cache);
    assert_int_equal(symlink("../../blobs/aaaa", p), 0);
    snprintf(q, sizeof q, "%s/models--org--m/snapshots/" COMMIT "/model.safetensors", cache);
    assert_int_equal(symlink("../../blobs/bbbb", q), 0);
    snprintf(p, sizeof p, "%s/models--org--m/refs/main", cache);
    write_file(p, COMMIT);
    snprintf(p, sizeof p, "%s/models--org--m/snapshots/" COMMIT, cache);
    return strdup(p);
}

// ----------------------------------------------------------------------------
// ids

static void test_parse_id_valid(void **state) {
    hub_id id;
    st_err err = {0};
    assert_int_equal(hub_parse_id("Qwen/Qwen3-0.6B", &id, &err), ST_OK);
    assert_string_equal(id.repo, "Qwen/Qwen3-0.6B");
    assert_string_equal(id.revision, "main");
    assert_int_equal(hub_parse_id("mlx-community/Qwen3-4B-4bit@v1.0", &id, &err), ST_OK);
    assert_string_equal(id.repo, "mlx-community/Qwen3-4B-4bit");
    assert_string_equal(id.revision, "v1.0");
    assert_int_equal(hub_parse_id("meta-llama/Llama-3.2-1B@refs/pr/12", &id, &err), ST_OK);
    assert_string_equal(id.revision, "refs/pr/12");
    assert_int_equal(hub_parse_id("a_b/c.d@" COMMIT, &id, &err), ST_OK);
    assert_string_equal(id.repo, "a_b/c.d");
    assert_string_equal(id.revision, COMMIT);
}

static void test_parse_id_invalid(void **state) {
    static const char *bad[] = {
        "gpt2",         "/abs/path",   "a/b/c",       "org/",       "/name",      "org/name@",
        "org/-x",       "org/x-",      "org/a..b",    "org/a--b",   "org/.hidden", "org/na me",
        "org/name@../x", "org/name@a b", "org/name@/x", "org/name@x/", "./org/name", "org/name@a@b",
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        hub_id id;
        st_err err = {0};
        if (hub_parse_id(bad[i], &id, &err) != ST_ERR_ARG) fail_msg("'%s' parsed as a hub id", bad[i]);
        assert_true(strlen(err.msg) > 0);
    }
}

// ----------------------------------------------------------------------------
// cache location

static void test_cache_dir_precedence(void **state) {
    char *d;
    setenv("HOME", "/home/u", 1);
    d = hub_cache_dir(NULL);
    assert_string_equal(d, "/home/u/.cache/huggingface/hub");
    free(d);
    setenv("XDG_CACHE_HOME", "/xdg", 1);
    d = hub_cache_dir(NULL);
    assert_string_equal(d, "/xdg/huggingface/hub");
    free(d);
    setenv("HF_HOME", "/hfhome", 1);
    d = hub_cache_dir(NULL);
    assert_string_equal(d, "/hfhome/hub");
    free(d);
    setenv("HF_HUB_CACHE", "/hubcache", 1);
    d = hub_cache_dir(NULL);
    assert_string_equal(d, "/hubcache");
    free(d);
    hub_opts o = {.cache_dir = "/explicit"};
    d = hub_cache_dir(&o);
    assert_string_equal(d, "/explicit");
    free(d);
    setenv("HF_HUB_CACHE", "", 1); /* empty counts as unset */
    d = hub_cache_dir(NULL);
    assert_string_equal(d, "/hfhome/hub");
    free(d);
}

// ----------------------------------------------------------------------------
// digests

static void test_file_digest(void **state) {
#ifndef STRATA_HAVE_CRYPTO
    skip(); /* built without libcrypto: hub_file_digest reports ST_ERR_UNSUPPORTED */
#endif
    char p[300], s256[65], s1[41];
    st_err err = {0};
    snprintf(p, sizeof p, "%s/hello", g_tmp);
    write_file(p, "hello\n");
    assert_int_equal(hub_file_digest(p, s256, s1, &err), ST_OK);
    assert_string_equal(s256, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
    assert_string_equal(s1, "ce013625030ba8dba906f756967f9e9ca394464a");
    snprintf(p, sizeof p, "%s/empty", g_tmp);
    write_file(p, "");
    assert_int_equal(hub_file_digest(p, s256, NULL, &err), ST_OK);
    assert_string_equal(s256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_int_equal(hub_file_digest(p, NULL, s1, &err), ST_OK);
    assert_string_equal(s1, "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
    snprintf(p, sizeof p, "%s/missing", g_tmp);
    assert_int_equal(hub_file_digest(p, s256, s1, &err), ST_ERR_IO);
    assert_non_null(strstr(err.msg, p));
}

// ----------------------------------------------------------------------------
// local directories

static void test_resolve_local_dir(void **state) {
    char *dir = NULL;
    st_err err = {0};
    assert_int_equal(hub_resolve(g_tmp, NULL, &dir, &err), ST_OK);
    assert_string_equal(dir, g_tmp);
    free(dir);
    /* an org/name that exists as a directory is a directory, not a hub id */
    char cwd[512], p[300];
    assert_non_null(getcwd(cwd, sizeof cwd));
    snprintf(p, sizeof p, "%s/org/name", g_tmp);
    mkdirs(p);
    assert_int_equal(chdir(g_tmp), 0);
    hub_opts o = {.offline = 1};
    assert_int_equal(hub_resolve("org/name", &o, &dir, &err), ST_OK);
    assert_string_equal(dir, "org/name");
    free(dir);
    assert_int_equal(chdir(cwd), 0);
    /* a file is not a model directory */
    snprintf(p, sizeof p, "%s/file", g_tmp);
    write_file(p, "x");
    assert_int_equal(hub_resolve(p, NULL, &dir, &err), ST_ERR_ARG);
    assert_null(dir);
    assert_non_null(strstr(err.msg, "not a directory"));
    /* neither a directory nor an id */
    snprintf(p, sizeof p, "%s/nope", g_tmp);
    assert_int_equal(hub_resolve(p, NULL, &dir, &err), ST_ERR_ARG);
    assert_non_null(strstr(err.msg, "not a hub id"));
}

// ----------------------------------------------------------------------------
// offline resolution from the cache

static void test_resolve_offline(void **state) {
    char cache[300], *dir = NULL;
    st_err err = {0};
    snprintf(cache, sizeof cache, "%s/hub", g_tmp);
    char *snap = make_cached_repo(cache);
    hub_opts o = {.cache_dir = cache, .offline = 1};
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_OK);
    assert_string_equal(dir, snap);
    free(dir);
    assert_int_equal(hub_resolve("org/m@" COMMIT, &o, &dir, &err), ST_OK);
    assert_string_equal(dir, snap);
    free(dir);
    /* HF_HUB_OFFLINE=1 forces offline even with an endpoint that would fail */
    setenv("HF_HUB_OFFLINE", "1", 1);
    hub_opts o2 = {.cache_dir = cache, .endpoint = "http://127.0.0.1:1"};
    assert_int_equal(hub_resolve("org/m", &o2, &dir, &err), ST_OK);
    assert_string_equal(dir, snap);
    free(dir);
    unsetenv("HF_HUB_OFFLINE");
    /* unknown revision / model: a message that says how to fill the cache */
    assert_int_equal(hub_resolve("org/m@dev", &o, &dir, &err), ST_ERR_MISSING);
    assert_null(dir);
    assert_non_null(strstr(err.msg, "offline"));
    assert_non_null(strstr(err.msg, "not in the hub cache"));
    assert_non_null(strstr(err.msg, "strata pull org/m@dev"));
    assert_int_equal(hub_resolve("org/other", &o, &dir, &err), ST_ERR_MISSING);
    /* a snapshot without its weights is incomplete */
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", snap);
    assert_int_equal(unlink(p), 0);
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_ERR_MISSING);
    assert_non_null(strstr(err.msg, "incomplete"));
    /* sharded: the index must find every shard it names */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", snap);
    write_file(p, "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
                  "\"b\": \"model-00002-of-00002.safetensors\"}}");
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", snap);
    write_file(p, "x");
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_ERR_MISSING);
    assert_non_null(strstr(err.msg, "model-00002-of-00002.safetensors"));
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", snap);
    write_file(p, "x");
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_OK);
    free(dir);
    /* an index naming a path outside the snapshot is malformed */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", snap);
    write_file(p, "{\"weight_map\": {\"a\": \"../../escape.safetensors\"}}");
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_ERR_FORMAT);
    free(snap);
}

// ----------------------------------------------------------------------------
// online failures that need no server

static void test_unreachable_endpoint(void **state) {
#ifdef STRATA_HAVE_CURL
    char cache[300], *dir = NULL;
    st_err err = {0};
    snprintf(cache, sizeof cache, "%s/hub", g_tmp);
    /* nothing listens on 127.0.0.1:1: the error names the URL */
    hub_opts o = {.cache_dir = cache, .endpoint = "http://127.0.0.1:1/", .no_progress = 1};
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_ERR_NET);
    assert_null(dir);
    assert_non_null(strstr(err.msg, "http://127.0.0.1:1/api/models/org/m/revision/main"));
    /* a revision with '/' is percent-encoded in the API URL */
    assert_int_equal(hub_resolve("org/m@refs/pr/1", &o, &dir, &err), ST_ERR_NET);
    assert_non_null(strstr(err.msg, "/revision/refs%2Fpr%2F1"));
    /* with a complete cached snapshot the cache serves (with a warning) */
    char *snap = make_cached_repo(cache);
    assert_int_equal(hub_resolve("org/m", &o, &dir, &err), ST_OK);
    assert_string_equal(dir, snap);
    free(dir);
    free(snap);
#else
    skip();
#endif
}

int main(void) {
    st_log_set_level(ST_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_id_valid),
        cmocka_unit_test(test_parse_id_invalid),
        cmocka_unit_test_setup_teardown(test_cache_dir_precedence, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_file_digest, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_resolve_local_dir, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_resolve_offline, setup_tmp, teardown_tmp),
        cmocka_unit_test_setup_teardown(test_unreachable_endpoint, setup_tmp, teardown_tmp),
    };
    return cmocka_run_group_tests_name("hub", tests, NULL, NULL);
}
