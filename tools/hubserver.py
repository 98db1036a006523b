#!/usr/bin/env python3
"""hubserver.py — a tiny stand-in for the Hugging Face hub, for strata's hub tests.

Serves model directories under the hub's API and resolve-URL layout on 127.0.0.1 only
(standard library only, no network beyond loopback):

  GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]
      {"id", "sha", "siblings": [{"rfilename", "size", "blobId", "lfs": {"sha256", "size"}}]}
      (size/blobId/lfs only with blobs=true, as the hub does)
  GET|HEAD /{org}/{name}/resolve/{rev}/{file}
      regular files: 200 with ETag = git blob sha1; LFS files (*.safetensors, *.bin, ...):
      302 to /cdn/{sha256} (like the hub's CDN redirect), X-Linked-Etag / X-Linked-Size
  GET /cdn/{sha256}   the LFS object; honours "Range: bytes=S-[E]" (206, 416 past the end)

rev is the branch name (--revision, default main) or the commit sha, which is derived from the
files' contents. Each repository also lists README.md, .gitattributes and pytorch_model.bin, as
real repositories do, so clients can be checked to download only what they need.
Unknown repositories answer 401 + X-Error-Code: RepositoryNotFound, unknown revisions 404 +
RevisionNotFound, unknown files 404 + EntryNotFound (the hub's codes).

Fault knobs:
  --cut FILE=N     the first transfer of FILE stops after N bytes (connection closed early)
  --corrupt FILE   FILE is served with one byte flipped (the API still publishes the true hashes)
  --token TOK      API and resolve URLs need "Authorization: Bearer TOK" (401 without, 403 wrong)
  --no-range       ignore Range headers (always 200 with the whole body)

The chosen port is written to --port-file (atomically) once the server listens; every request
is appended to --log. The server stops by itself after --lifetime seconds (default 120).
"""
import argparse
import hashlib
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack")


class Repo:
    """One repository: name -> bytes, plus the hashes the API publishes."""

    def __init__(self, repo_id, directory, revision):
        self.id = repo_id
        self.revision = revision
        self.files = {}
        for root, _, names in os.walk(directory):
            for n in sorted(names):
                path = os.path.join(root, n)
                rel = os.path.relpath(path, directory).replace(os.sep, "/")
                with open(path, "rb") as f:
                    self.files[rel] = f.read()
        self.files.setdefault("README.md", b"# fixture model served by tools/hubserver.py\n")
        self.files.setdefault(".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        self.files.setdefault("pytorch_model.bin", b"not a model: strata must not download this\n" * 64)
        self.meta = {}
        h = hashlib.sha1()
        for name in sorted(self.files):
            data = self.files[name]
            sha256 = hashlib.sha256(data).hexdigest()
            git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.meta[name] = {"sha256": sha256, "git": git, "lfs": name.endswith(LFS_SUFFIXES)}
            h.update(name.encode() + b"\0" + sha256.encode())
        self.commit = h.hexdigest()

    def listing(self, blobs):
        sib = []
        for name in sorted(self.files):
            m = self.meta[name]
            e = {"rfilename": name}
            if blobs:
                e["size"] = len(self.files[name])
                if m["lfs"]:
                    e["blobId"] = hashlib.sha1(("lfs pointer " + m["sha256"]).encode()).hexdigest()
                    e["lfs"] = {"sha256": m["sha256"], "size": len(self.files[name]), "pointerSize": 134}
                else:
                    e["blobId"] = m["git"]
            sib.append(e)
        return {"id": self.id, "modelId": self.id, "sha": self.commit, "private": False, "siblings": sib}


class State:
    def __init__(self, args):
        self.repos = {}
        for spec in args.repo:
            rid, _, d = spec.partition("=")
            self.repos[rid] = Repo(rid, d, args.revision)
        self.by_sha = {}
        for r in self.repos.values():
            for name, m in r.meta.items():
                if m["lfs"]:
                    self.by_sha[m["sha256"]] = (r, name)
        self.cut = {}
        for spec in args.cut:
            name, _, n = spec.rpartition("=")
            self.cut[name] = int(n)
        self.corrupt = set(args.corrupt)
        self.token = args.token
        self.no_range = args.no_range
        self.lock = threading.Lock()
        self.log = open(args.log, "a", buffering=1) if args.log else None

    def content(self, name, data):
        if name in self.corrupt and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x5A
            return bytes(b)
        return data

    def take_cut(self, name):
        """The byte count to stop after for this transfer of name, once; None otherwise."""
        with self.lock:
            return self.cut.pop(name, None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1"

    def log_message(self, fmt, *a):  # quiet on stderr; requests go to --log
        pass

    def note(self, status, extra=""):
        st = self.server.state
        if st.log:
            rng = self.headers.get("Range") or "-"
            auth = "yes" if self.headers.get("Authorization") else "no"
            st.log.write(f"{self.command} {self.path} range={rng} auth={auth} -> {status}{extra}\n")

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.note(status)

    def error(self, status, code, msg):
        hdr = [("X-Error-Message", msg)]
        if code:
            hdr.append(("X-Error-Code", code))
        self.send_json(status, {"error": msg}, hdr)

    def authorised(self):
        st = self.server.state
        if not st.token:
            return True
        auth = self.headers.get("Authorization")
        if not auth:
            self.error(401, None, "Access to this model is restricted. You must be authenticated.")
            return False
        if auth != "Bearer " + st.token:
            self.error(403, None, "Your token has no access to this model.")
            return False
        return True

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        st = self.server.state
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        query = urllib.parse.parse_qs(url.query)
        try:
            if len(parts) == 2 and parts[0] == "cdn":
                return self.serve_lfs(parts[1])
            if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models" and parts[4] == "revision":
                repo = self.find_repo(parts[2] + "/" + parts[3], "/".join(parts[5:]))
                if repo:
                    blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                    self.send_json(200, repo.listing(blobs))
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                # the revision is one path segment (the client percent-encodes any '/')
                repo = self.find_repo(parts[0] + "/" + parts[1], parts[3])
                if repo:
                    self.serve_file(repo, "/".join(parts[4:]))
                return
            self.error(404, None, "not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def find_repo(self, rid, rev):
        st = self.server.state
        repo = st.repos.get(rid)
        if not repo:
            self.error(401, "RepositoryNotFound", "Repository not found")
            return None
        if not self.authorised():
            return None
        if rev not in (repo.revision, repo.commit):
            self.error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo

    def serve_file(self, repo, name):
        if name not in repo.files:
            self.error(404, "EntryNotFound", "Entry not found")
            return
        m = repo.meta[name]
        if m["lfs"]:
            self.send_response(302)
            self.send_header("Location", "/cdn/" + m["sha256"])
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", '"%s"' % m["sha256"])
            self.send_header("X-Linked-Size", str(len(repo.files[name])))
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.note(302)
            return
        self.send_body(name, self.server.state.content(name, repo.files[name]),
                       [("ETag", '"%s"' % m["git"]), ("X-Repo-Commit", repo.commit)])

    def serve_lfs(self, sha):
        st = self.server.state
        if sha not in st.by_sha:
            self.error(404, None, "no such object")
            return
        repo, name = st.by_sha[sha]
        self.send_body(name, st.content(name, repo.files[name]), [("ETag", '"%s"' % sha)])

    def send_body(self, name, data, headers):
        st = self.server.state
        start, end, status = 0, len(data), 200
        rng = self.headers.get("Range")
        if rng and not st.no_range and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a or 0)
            if b:
                end = min(end, int(b) + 1)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % len(data))
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.note(416)
                return
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            self.note(status)
            return
        cut = st.take_cut(name)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.note(status, " cut after %d bytes" % cut)
            return
        self.wfile.write(body)
        self.note(status)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", required=True, metavar="ORG/NAME=DIR")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--port-file")
    ap.add_argument("--log")
    ap.add_argument("--cut", action="append", default=[], metavar="FILE=N")
    ap.add_argument("--corrupt", action="append", default=[], metavar="FILE")
    ap.add_argument("--token")
    ap.add_argument("--no-range", action="store_true")
    ap.add_argument("--lifetime", type=float, default=120.0)
    args = ap.parse_args()

    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    srv.state = State(args)
    port = srv.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.port_file)
    else:
        print(port, flush=True)
    t = threading.Timer(args.lifetime, srv.shutdown)
    t.daemon = True
    t.start()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
