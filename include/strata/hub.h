/* strata/hub.h — model sources: a local directory, or a Hugging Face hub id downloaded into the
 * Hugging Face cache.
 *
 * A MODEL argument is either a directory (used as is) or a hub id `org/name[@revision]`
 * (revision: branch, tag or commit; default "main"). A hub id is resolved into a snapshot
 * directory of the standard Hugging Face cache, so models pulled by strata and by
 * huggingface_hub / transformers share one copy:
 *
 *   <cache>/models--org--name/blobs/<sha256 (LFS files) or git blob id (others)>
 *   <cache>/models--org--name/snapshots/<commit>/<file>   -> symlink to ../../blobs/<id>
 *   <cache>/models--org--name/refs/<revision>              the commit the revision named
 *
 * <cache> is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
 * ~/.cache/huggingface/hub. Only the files strata reads are downloaded: config.json,
 * generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja, and
 * model.safetensors or model.safetensors.index.json plus every shard the index names (the
 * optional ones when the repository has them), plus any `include` patterns.
 *
 * Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (else the file
 * $HF_TOKEN_PATH or $HF_HOME/token, as `huggingface-cli login` writes it), HF_HUB_OFFLINE=1.
 *
 * Downloads go to blobs/<id>.incomplete and resume from there (HTTP Range) after an
 * interrupted transfer — within one call (up to `max_attempts`) and across calls. A file is
 * renamed into blobs/ only after its size and digest match what the hub's API publishes
 * (sha256 for LFS files, git blob sha1 for the others); a mismatch deletes the download.
 * Concurrent pulls of one blob serialise on <cache>/.locks/models--org--name/<id>.lock.
 */
#ifndef STRATA_HUB_H
#define STRATA_HUB_H

#include "strata/base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Options for hub_resolve. A zeroed struct (or NULL) means: environment defaults, online
 * unless HF_HUB_OFFLINE is set, progress bar on a TTY, 5 attempts per file. */
typedef struct hub_opts {
    const char *endpoint;          /* NULL: $HF_ENDPOINT or https://huggingface.co          */
    const char *token;             /* NULL: $HF_TOKEN, then the token file (see above)       */
    const char *cache_dir;         /* NULL: the Hugging Face hub cache (see above)           */
    int offline;                   /* 1: never touch the network (also HF_HUB_OFFLINE=1)     */
    int no_progress;               /* 1: no progress output                                  */
    int max_attempts;              /* transfer attempts per file; 0: default (5)             */
    const char *const *include;    /* NULL-terminated fnmatch patterns of extra repo files  */
} hub_opts;

/* Resolves MODEL into a local model directory.
 *   model      a directory, or a hub id "org/name[@revision]"
 *   o          options (NULL: defaults)
 *   local_dir  out: malloc'ed path (the directory itself, or the cache snapshot); caller frees
 * Online, downloads what is missing and returns the snapshot of the revision's commit. When
 * the hub cannot be reached at all, a complete cached snapshot of the revision is used with a
 * warning. Offline, only the cache is consulted. Errors: ST_ERR_ARG (neither a directory nor
 * a hub id), ST_ERR_NET (unreachable; the message names the URL), ST_ERR_MISSING (no such
 * model/revision/file, or not in the cache offline), ST_ERR_ARG for 401/403 ("set HF_TOKEN"),
 * ST_ERR_FORMAT (size/digest mismatch, bad API answer), ST_ERR_IO (cache not writable). */
int hub_resolve(const char *model, const hub_opts *o, char **local_dir, st_err *err);

/* ------------------------------------------------------------------------------------------ */
/* helpers, public for tests and tools                                                        */

#define HUB_ID_MAX 128  /* "org/name" incl. NUL; the hub allows 96 characters */
#define HUB_REV_MAX 256

typedef struct hub_id {
    char repo[HUB_ID_MAX];      /* "org/name"                                              */
    char revision[HUB_REV_MAX]; /* "main" when none was given                              */
} hub_id;

/* Parses "org/name[@revision]". org and name: [A-Za-z0-9._-], not starting or ending with
 * '.' or '-', no ".." or "--"; revision: non-empty, printable, no "..", no leading '/'.
 * ST_ERR_ARG with the reason when s is not such an id. */
int hub_parse_id(const char *s, hub_id *id, st_err *err);

/* The hub cache root for o (o->cache_dir, else the environment). malloc'ed; NULL if no
 * location can be derived (no HOME) or on allocation failure. */
char *hub_cache_dir(const hub_opts *o);

/* Digests of a file: lowercase hex sha256 (65 bytes with NUL) and git blob sha1 (41 bytes:
 * sha1("blob <size>\0" + content)); either output may be NULL. ST_ERR_IO if unreadable,
 * ST_ERR_UNSUPPORTED when strata was built without libcrypto. */
int hub_file_digest(const char *path, char *sha256_hex, char *gitsha1_hex, st_err *err);

#ifdef __cplusplus
}
#endif
#endif
