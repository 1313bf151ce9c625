"""Real HTTP servers on 127.0.0.1 standing in for the Hub, Kaggle and GCS in tests.

Each server speaks the subset of its protocol that the client library uses, and carries
a :class:`Faults` switchboard: fail the next request with a status, cut a body halfway,
or stall it until released; and answer with corrupted bytes (right length) or an HTML page; and a log of the requests it
answered::

    with HubServer() as hub:
      hub.add_repo("acme/tiny", checkpoint_folder)
      hub.faults.status(500, match="/resolve/", times=1)
      ...  # point HF_ENDPOINT at hub.url
      assert hub.faults.count("/resolve/") == 2

:class:`GcsProxy` forwards to a ``gcp-storage-emulator`` started by
:func:`start_gcs_emulator`, and injects its faults on the way back.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

import numpy as np
from kagglehub.enum import to_enum
from kagglesdk.models.types.model_enums import ModelFramework
from safetensors.numpy import save_file

LOCALHOST = "127.0.0.1"


def make_checkpoint(folder: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
  """Writes a complete random one-layer Llama checkpoint in the Hub's (transformers 4) spelling.

  Besides config.json, model.safetensors and tokenizer files, it writes files that no
  source may download (pickle weights, a README), so tests can check the allow-list.
  """
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  hidden, heads, kv_heads, head_dim, inter, vocab = 8, 2, 1, 4, 16, 32
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": 1, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32"}
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
            "model.layers.0.input_layernorm.weight": (hidden,),
            "model.layers.0.post_attention_layernorm.weight": (hidden,),
            "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
            "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            "model.layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
            "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
            "model.layers.0.mlp.up_proj.weight": (inter, hidden),
            "model.layers.0.mlp.down_proj.weight": (hidden, inter)}
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  save_file({k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()},
            str(folder / "model.safetensors"))
  (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {
      "type": "BPE", "vocab": {f"t{i}": i for i in range(vocab)}, "merges": []}}))
  (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
  (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled weights are never fetched")
  (folder / "README.md").write_text("# tiny\n")
  return folder


FETCHED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
NOT_FETCHED = ("pytorch_model.bin", "README.md")


def free_port() -> int:
  with socket.socket() as s:
    s.bind((LOCALHOST, 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class _Rule:
  kind: str  # "status", "drop", "stall", "corrupt" or "html"
  match: str
  method: str | None
  status: int
  times: int
  skip: int


class Faults:
  """Thread-safe one-shot faults, matched on a substring of the request path."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._rules: list[_Rule] = []
    self.hits: list[tuple[str, str]] = []
    self.ranges: list[tuple[str, str]] = []  # (path, Range header) of ranged requests
    self.release = threading.Event()  # ends every stall
    self.stalled = threading.Event()  # set once a stalled body is half sent

  def _add(self, kind: str, match: str, method: str | None, status: int, times: int,
           skip: int) -> None:
    with self._lock:
      self._rules.append(_Rule(kind, match, method, status, times, skip))

  def status(self, code: int, *, match: str = "", method: str | None = None,
             times: int = 1, skip: int = 0) -> None:
    """Answers ``times`` matching requests with HTTP ``code``, after ``skip`` pass."""
    self._add("status", match, method, code, times, skip)

  def drop(self, *, match: str = "", times: int = 1, skip: int = 0) -> None:
    """Sends headers and half the body of matching GETs, then closes the connection."""
    self._add("drop", match, "GET", 200, times, skip)

  def stall(self, *, match: str = "", times: int = 1, skip: int = 0) -> None:
    """Sends half the body of matching GETs, then waits for :attr:`release`."""
    self._add("stall", match, "GET", 200, times, skip)

  def corrupt(self, *, match: str = "", times: int = 1, skip: int = 0) -> None:
    """Sends matching GET bodies with one byte changed, at the right length."""
    self._add("corrupt", match, "GET", 200, times, skip)

  def html(self, *, match: str = "", times: int = 1, skip: int = 0) -> None:
    """Answers matching requests 200 with an HTML page, as a captive portal or a proxy's
    login page does."""
    self._add("html", match, None, 200, times, skip)

  def take(self, method: str, path: str, range_header: str | None) -> _Rule | None:
    with self._lock:
      self.hits.append((method, path))
      if range_header:
        self.ranges.append((path, range_header))
      for rule in self._rules:
        if rule.match in path and rule.method in (None, method) and rule.times > 0:
          if rule.skip > 0:
            rule.skip -= 1
            continue
          rule.times -= 1
          return rule
    return None

  def count(self, match: str = "", method: str | None = None) -> int:
    """Requests seen whose path contains ``match``."""
    with self._lock:
      return sum(1 for m, p in self.hits if match in p and method in (None, m))

  def reset(self) -> None:
    with self._lock:
      self._rules.clear()
      self.hits.clear()
      self.ranges.clear()
    self.release.clear()
    self.stalled.clear()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Request plumbing shared by the servers: faults, ranges, error bodies."""

  protocol_version = "HTTP/1.1"
  server: "_Server"

  def log_message(self, *args: Any) -> None:  # keep test output clean
    pass

  def _body(self) -> bytes:
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else b""

  def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body, extra = self.server.error_body(status, message)
    # A body after a HEAD answer would be read as the next response on a kept-alive
    # connection.
    self._send(status, body, {**extra, **(headers or {})}, head=self.command == "HEAD")

  def _dispatch(self, method: str) -> None:
    rule = self.server.faults.take(method, self.path, self.headers.get("Range"))
    if rule is not None and rule.kind == "status":
      self._error(rule.status, f"injected {rule.status}")
      return
    if rule is not None and rule.kind == "html":
      page = b"<!DOCTYPE html><html><body><h1>Sign in to continue</h1></body></html>"
      self._send(200, page, {"Content-Type": "text/html; charset=utf-8"},
                 head=method == "HEAD")
      return
    self._rule = rule
    self.handle_request(method)

  def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
    self._dispatch("GET")

  def do_HEAD(self) -> None:  # noqa: N802
    self._dispatch("HEAD")

  def do_POST(self) -> None:  # noqa: N802
    self._dispatch("POST")

  def do_PUT(self) -> None:  # noqa: N802
    self._dispatch("PUT")

  def _full_body(self) -> bytes:
    """The request body, whether sent with Content-Length or chunked (streamed uploads)."""
    if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
      return self._body()
    chunks = []
    while True:
      size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
          pass  # trailers
        return b"".join(chunks)
      chunks.append(self.rfile.read(size))
      self.rfile.readline()

  def handle_request(self, method: str) -> None:
    raise NotImplementedError

  def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *,
            head: bool = False, ranged: bool = False) -> None:
    """Sends a response; honours ``Range: bytes=N-[M]`` when ``ranged``; applies faults."""
    headers = dict(headers or {})
    range_header = self.headers.get("Range")
    if ranged:
      headers["Accept-Ranges"] = "bytes"
    if ranged and range_header and status == 200:
      m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
      if m:
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1 if m.group(2) else len(body), len(body))
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(body)}"
        status, body = 206, body[start:end]
    self.send_response(status)
    for k, v in headers.items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if head:
      return
    rule = getattr(self, "_rule", None)
    if rule is not None and rule.kind == "corrupt" and body:
      middle = len(body) // 2
      body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
    if rule is not None and rule.kind in ("drop", "stall") and len(body) > 1:
      self.wfile.write(body[: len(body) // 2])
      self.wfile.flush()
      if rule.kind == "stall":
        self.server.faults.stalled.set()
        self.server.faults.release.wait(timeout=60)
      self.close_connection = True
      try:
        self.connection.shutdown(socket.SHUT_RDWR)
      except OSError:  # the client is gone already
        pass
      return
    self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
  """A threaded server on 127.0.0.1 with a :class:`Faults` board; a context manager."""

  daemon_threads = True
  handler: type[_Handler] = _Handler

  def __init__(self, port: int = 0) -> None:
    super().__init__((LOCALHOST, port), self.handler)
    self.faults = Faults()
    self._thread = threading.Thread(target=self.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://{LOCALHOST}:{self.server_address[1]}"

  def error_body(self, status: int, message: str) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"error": message}).encode(), {"Content-Type": "application/json"}

  def handle_error(self, request: Any, client_address: Any) -> None:
    """Stays quiet when a client hangs up mid-response, which tests do on purpose."""
    if not isinstance(sys.exc_info()[1], OSError):
      super().handle_error(request, client_address)

  def __enter__(self) -> "_Server":
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.faults.release.set()
    self.shutdown()
    self.server_close()


def _read_folder(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(folder).as_posix(): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- HF Hub


@dataclasses.dataclass
class _Repo:
  files: dict[str, bytes]
  token: str | None

  @property
  def sha(self) -> str:
    h = hashlib.sha1()
    for name, data in sorted(self.files.items()):
      h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


class _HubHandler(_Handler):

  def handle_request(self, method: str) -> None:
    path = urllib.parse.urlsplit(self.path).path
    if self._upload_route(method, path):
      return
    if path.startswith("/api/models/"):
      self._api(urllib.parse.unquote(path[len("/api/models/"):]))
    elif "/resolve/" in path:
      self._resolve(urllib.parse.unquote(path[1:]), head=method == "HEAD")
    else:
      self._error(404, "no such route")

  def _repo(self, rest: str) -> tuple[str, _Repo, str] | None:
    """Splits ``rest`` into a known repo id, the repo, and what follows it."""
    for repo_id in sorted(self.server.repos, key=len, reverse=True):
      if rest == repo_id or rest.startswith(repo_id + "/"):
        repo = self.server.repos[repo_id]
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
          self._error(401, "Invalid username or password.")
          return None
        return repo_id, repo, rest[len(repo_id) + 1:]
    self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
    return None

  def _revision_ok(self, repo: _Repo, revision: str) -> bool:
    if revision in ("main", repo.sha):
      return True
    self._error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})
    return False

  def _api(self, rest: str) -> None:
    found = self._repo(rest)
    if found is None:
      return
    repo_id, repo, tail = found
    m = re.fullmatch(r"(?:revision/(?P<rev>[^/]+))?|tree/(?P<tree>[^/]+)(?:/.*)?", tail)
    if m is None:
      self._error(404, "no such route")
      return
    revision = m.group("rev") or m.group("tree") or "main"
    if not self._revision_ok(repo, revision):
      return
    if m.group("tree") is not None:
      listing = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha256(d).hexdigest()}
                 for n, d in sorted(repo.files.items())]
      self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
      return
    info = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": bool(repo.token),
            "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

  def _resolve(self, rest: str, head: bool) -> None:
    found = self._repo(rest)
    if found is None:
      return
    _, repo, tail = found
    m = re.fullmatch(r"resolve/(?P<rev>[^/]+)/(?P<file>.+)", tail)
    if m is None:
      self._error(404, "no such route")
      return
    if not self._revision_ok(repo, m.group("rev")):
      return
    data = repo.files.get(m.group("file"))
    if data is None:
      self._error(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
      return
    self._send(200, data, {"X-Repo-Commit": repo.sha,
                           "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Content-Type": "application/octet-stream"}, head=head, ranged=True)


  # -- uploads: what create_repo and create_commit / upload_folder send with Xet off --
  def _upload_route(self, method: str, path: str) -> bool:
    """Answers the upload endpoints; False for any other request."""
    if method == "POST" and path == "/api/repos/create":
      self._create_repo(json.loads(self._body() or b"{}"))
    elif method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
      self._lfs_batch(json.loads(self._body() or b"{}"))
    elif method == "PUT" and path.startswith("/lfs-upload/"):
      self._lfs_upload(path[len("/lfs-upload/"):])
    elif method == "POST" and path.startswith("/lfs-verify/"):
      self._full_body()
      oid = path[len("/lfs-verify/"):]
      if oid in self.server.lfs_objects:
        self._json_reply({"success": True})
      else:
        self._error(404, "Object not found")
    elif method == "POST" and re.fullmatch(r"/api/models/.+/(preupload|commit)/[^/]+", path):
      repo_id, action, _ = urllib.parse.unquote(path[len("/api/models/"):]).rsplit("/", 2)
      if self._may_write(repo_id):
        body = self._full_body()
        if action == "preupload":
          self._preupload(repo_id, json.loads(body or b"{}"))
        else:
          self._commit(repo_id, body)
    else:
      return False
    return True

  def _json_reply(self, payload: Any) -> None:
    self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

  def _may_write(self, repo_id: str) -> bool:
    token = self.server.write_token
    if token and self.headers.get("Authorization") != f"Bearer {token}":
      self._error(401, "Invalid credentials in Authorization header")
      return False
    if repo_id not in self.server.repos:
      self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
      return False
    return True

  def _create_repo(self, body: dict[str, Any]) -> None:
    repo_id = "/".join(p for p in (body.get("organization"), body.get("name")) if p)
    token = self.server.write_token
    if token and self.headers.get("Authorization") != f"Bearer {token}":
      self._error(401, "Invalid credentials in Authorization header")
    elif repo_id in self.server.repos:
      # The Hub names the existing repo's URL, which create_repo(exist_ok=True) returns.
      message = "You already created this model repo"
      self._send(409, json.dumps({"error": message,
                                  "url": f"{self.server.url}/{repo_id}"}).encode(),
                 {"Content-Type": "application/json", "X-Error-Message": message})
    else:
      private = body.get("visibility") == "private" or bool(body.get("private"))
      self.server.repos[repo_id] = _Repo({}, token if private else None)
      self.server.created[repo_id] = {"private": private}
      self._json_reply({"url": f"{self.server.url}/{repo_id}", "name": repo_id})

  def _preupload(self, repo_id: str, body: dict[str, Any]) -> None:
    files = self.server.repos[repo_id].files
    answer = []
    for entry in body.get("files", []):
      lfs = _is_lfs(entry["path"], base64.b64decode(entry.get("sample") or ""))
      old = files.get(entry["path"])
      oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs
                                      else _git_blob_sha1(old))
      answer.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                     "shouldIgnore": False, "oid": oid})
    self._json_reply({"files": answer})

  def _lfs_batch(self, body: dict[str, Any]) -> None:
    objects = []
    for obj in body.get("objects", []):
      if obj["oid"] in self.server.lfs_objects:
        objects.append({"oid": obj["oid"], "size": obj["size"]})  # no actions: present
        continue
      objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True,
                      "actions": {
                          "upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}"},
                          "verify": {"href": f"{self.server.url}/lfs-verify/{obj['oid']}"}}})
    self._json_reply({"transfer": "basic", "objects": objects})

  def _lfs_upload(self, oid: str) -> None:
    data = self._full_body()
    if hashlib.sha256(data).hexdigest() != oid:
      self._error(400, "uploaded bytes do not hash to the object id")
      return
    self.server.lfs_objects[oid] = data
    self._send(200, b"")

  def _commit(self, repo_id: str, body: bytes) -> None:
    """Applies every operation of the ndjson commit, or none of them."""
    repo = self.server.repos[repo_id]
    files = dict(repo.files)
    summary = ""
    for line in body.splitlines():
      if not line.strip():
        continue
      item = json.loads(line)
      key, value = item["key"], item["value"]
      if key == "header":
        summary = value.get("summary", "")
      elif key == "file":
        files[value["path"]] = base64.b64decode(value["content"])
      elif key == "lfsFile":
        data = self.server.lfs_objects.get(value["oid"])
        if data is None or len(data) != value["size"]:
          self._error(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
          return
        files[value["path"]] = data
      elif key == "deletedFile":
        files.pop(value["path"], None)
      elif key == "deletedFolder":
        files = {n: d for n, d in files.items() if not n.startswith(value["path"].rstrip("/") + "/")}
      else:
        self._error(400, f"unsupported commit operation {key!r}")
        return
    new = _Repo(files, repo.token)
    self.server.repos[repo_id] = new
    self.server.commits.append((repo_id, new.sha, summary))
    self._json_reply({"commitUrl": f"{self.server.url}/{repo_id}/commit/{new.sha}",
                      "commitOid": new.sha})


def _git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, sample: bytes) -> bool:
  """As the Hub's default .gitattributes: weights, and anything binary, go to LFS."""
  return path.endswith((".safetensors", ".bin", ".model")) or b"\0" in sample


class HubServer(_Server):
  """The Hub API that ``snapshot_download`` and ``HfApi.model_info`` call, and the upload
  endpoints of ``create_repo`` / ``upload_folder`` (LFS, no Xet).

  ``write_token``, when set, is required to create repos and commit; ``private`` repos
  created through the API then need it to be read too.
  """

  handler = _HubHandler

  def __init__(self) -> None:
    super().__init__()
    self.repos: dict[str, _Repo] = {}
    self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through LFS
    self.commits: list[tuple[str, str, str]] = []  # (repo id, commit sha, summary)
    self.created: dict[str, dict[str, Any]] = {}  # repo id -> create_repo settings
    self.write_token: str | None = None

  def add_repo(self, repo_id: str, folder: pathlib.Path, *, token: str | None = None,
               skip: tuple[str, ...] = ()) -> str:
    """Serves ``folder``'s files as ``repo_id``; returns the commit sha."""
    files = {n: d for n, d in _read_folder(folder).items() if n not in skip}
    self.repos[repo_id] = _Repo(files, token)
    return self.repos[repo_id].sha

  def error_body(self, status: int, message: str) -> tuple[bytes, dict[str, str]]:
    return (json.dumps({"error": message}).encode(),
            {"Content-Type": "application/json", "X-Error-Message": message})


# ----------------------------------------------------------------------------- Kaggle


@dataclasses.dataclass
class _KaggleModel:
  versions: dict[int, dict[str, bytes]]
  token: str | None


class _KaggleHandler(_Handler):
  """``POST /api/v1/models.ModelApiService/<Method>``, and ``GET /blobs/...`` for bytes.

  Downloads answer with a redirect to a blob URL, as Kaggle redirects to signed GCS
  URLs; the blob carries ``Accept-Ranges`` and the ``X-Goog-Hash`` md5 kagglehub checks.
  """

  def handle_request(self, method: str) -> None:
    path = urllib.parse.urlsplit(self.path).path
    prefix = "/api/v1/models.ModelApiService/"
    if method == "POST" and path.startswith(prefix):
      self._api(path[len(prefix):], json.loads(self._body() or b"{}"))
    elif method in ("GET", "HEAD") and path.startswith("/blobs/"):
      self._blob(urllib.parse.unquote(path[len("/blobs/"):]), head=method == "HEAD")
    else:
      self._error(404, "no such route")

  def _model(self, body: dict[str, Any]) -> tuple[str, _KaggleModel] | None:
    for handle, model in self.server.models.items():
      owner, name, framework, variation = handle.split("/")
      if (body.get("ownerSlug"), body.get("modelSlug"), body.get("instanceSlug")) == (
          owner, name, variation) and body.get("framework") == to_enum(
              ModelFramework, framework).name:
        if model.token and self.headers.get("Authorization") != f"Bearer {model.token}":
          self._error(401, "Unauthenticated")
          return None
        return handle, model
    self._error(404, "Not found")
    return None

  def _api(self, method: str, body: dict[str, Any]) -> None:
    found = self._model(body)
    if found is None:
      return
    handle, model = found
    if method == "GetModelInstance":
      self._json({"slug": body["instanceSlug"], "versionNumber": max(model.versions)})
      return
    files = model.versions.get(int(body.get("versionNumber") or 0))
    if files is None:
      self._error(404, "Not found")
    elif method == "ListModelInstanceVersionFiles":
      start = int(body.get("pageToken") or 0)
      size = int(body.get("pageSize") or 25)
      names = sorted(files)[start:start + size]
      more = start + size < len(files)
      self._json({"files": [{"name": n, "size": len(files[n])} for n in names],
                  "nextPageToken": str(start + size) if more else ""})
    elif method == "DownloadModelInstanceVersion" and body.get("path") in files:
      location = f"/blobs/{handle}/{body['versionNumber']}/{body['path']}"
      self._send(302, b"", {"Location": urllib.parse.quote(location)})
    else:
      self._error(404, "Not found")

  def _json(self, payload: dict[str, Any]) -> None:
    self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

  def _blob(self, rest: str, head: bool) -> None:
    parts = rest.split("/", 5)
    model = self.server.models.get("/".join(parts[:4]))
    files = model.versions.get(int(parts[4])) if model and parts[4].isdigit() else None
    data = files.get(parts[5]) if files and len(parts) == 6 else None
    if data is None:
      self._error(404, "Not found")
      return
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    self._send(200, data, {"Content-Type": "application/octet-stream",
                           "X-Goog-Hash": f"crc32c=AAAAAA==,md5={md5}"}, head=head, ranged=True)


class KaggleServer(_Server):
  """Kaggle's model API as kagglehub calls it with ``KAGGLE_API_ENVIRONMENT=TEST``.

  That environment sends every call to localhost:7777, so this server binds
  127.0.0.1:7777 and only one can run at a time.
  """

  handler = _KaggleHandler
  PORT = 7777
  # Another test process (a run beside this one) may hold the fixed port for a while.
  BIND_WAIT_S = 120.0

  def __init__(self) -> None:
    deadline = time.monotonic() + self.BIND_WAIT_S
    while True:
      try:
        super().__init__(self.PORT)
        break
      except OSError as e:
        if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
          raise
        time.sleep(0.5)
    self.models: dict[str, _KaggleModel] = {}

  def add_model(self, handle: str, version: int, folder: pathlib.Path, *,
                token: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Serves ``folder`` as ``owner/model/framework/variation`` at ``version``."""
    model = self.models.setdefault(handle, _KaggleModel({}, token))
    model.versions[version] = {n: d for n, d in _read_folder(folder).items() if n not in skip}

  def error_body(self, status: int, message: str) -> tuple[bytes, dict[str, str]]:
    return (json.dumps({"code": status, "message": message}).encode(),
            {"Content-Type": "application/json"})


# ----------------------------------------------------------------------------- GCS


def start_gcs_emulator(port: int) -> subprocess.Popen[bytes]:
  """Starts ``gcp-storage-emulator`` (in memory) on 127.0.0.1:``port``; waits until ready."""
  exe = shutil.which("gcp-storage-emulator") or str(
      pathlib.Path(sys.executable).with_name("gcp-storage-emulator"))
  proc = subprocess.Popen([exe, "start", f"--host={LOCALHOST}", f"--port={port}", "--in-memory"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}")
    try:
      with socket.create_connection((LOCALHOST, port), timeout=0.5):
        return proc
    except OSError:
      time.sleep(0.1)
  proc.kill()
  raise RuntimeError("gcp-storage-emulator did not start within 30 s")


class _ProxyHandler(_Handler):
  """Forwards each request to the emulator; faults apply to the way back."""

  def handle_request(self, method: str) -> None:
    body = self._body()
    not_match = re.search(r"[?&]ifGenerationNotMatch=(\d+)", self.path)
    if not_match and "alt=media" in self.path:
      # GCS answers a conditional read of an unchanged object with 304 and no body (the
      # emulator ignores the condition); tensorstore revalidates this way.
      generation = self._generation_headers({}).get("x-goog-generation")
      if generation == not_match.group(1):
        self._send(304, b"", {"x-goog-generation": generation}, head=True)
        return
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("host", "connection", "keep-alive", "accept-encoding")}
    conn = http.client.HTTPConnection(LOCALHOST, self.server.upstream_port, timeout=30)
    try:
      conn.request(method, self.path, body=body or None, headers=headers)
      response = conn.getresponse()
      data = response.read()
    finally:
      conn.close()
    skip = ("content-length", "transfer-encoding", "connection", "keep-alive", "date", "server")
    headers = {k: v for k, v in response.getheaders() if k.lower() not in skip}
    if response.status in (200, 206) and "alt=media" in self.path:
      headers.update(self._generation_headers(headers))
    self._send(response.status, data, headers, head=method == "HEAD")

  def _generation_headers(self, headers: dict[str, str]) -> dict[str, str]:
    """``x-goog-generation`` / ``-metageneration``, which GCS sends with every media
    download and the emulator does not (tensorstore refuses a read without them)."""
    if any(k.lower() == "x-goog-generation" for k in headers):
      return {}
    path = self.path.partition("?")[0]
    path = path[len("/download"):] if path.startswith("/download/") else path
    conn = http.client.HTTPConnection(LOCALHOST, self.server.upstream_port, timeout=30)
    try:
      conn.request("GET", path)
      response = conn.getresponse()
      meta = json.loads(response.read() or b"{}") if response.status == 200 else {}
    finally:
      conn.close()
    return {f"x-goog-{name}": str(meta[name]) for name in ("generation", "metageneration")
            if name in meta}


class GcsProxy(_Server):
  """A fault-injecting proxy in front of a ``gcp-storage-emulator`` on ``upstream_port``."""

  handler = _ProxyHandler

  def __init__(self, upstream_port: int) -> None:
    super().__init__()
    self.upstream_port = upstream_port

  def error_body(self, status: int, message: str) -> tuple[bytes, dict[str, str]]:
    return (json.dumps({"error": {"code": status, "message": message}}).encode(),
            {"Content-Type": "application/json"})


# ----------------------------------------------------------------------------- helpers


def assert_fetched(folder: pathlib.Path, checkpoint: pathlib.Path) -> None:
  """The allow-listed files arrived byte for byte; pickles and READMEs did not."""
  for name in FETCHED:
    assert (folder / name).read_bytes() == (checkpoint / name).read_bytes(), name
  for name in NOT_FETCHED:
    assert not (folder / name).exists(), name


_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def fetch_in_subprocess(kwargs: dict[str, Any], prelude: str = "") -> subprocess.Popen[bytes]:
  """Runs ``tunix_zoo.sources.fetch(**kwargs)`` in a child process the test can kill."""
  script = (f"import json, sys\n{prelude}\nfrom tunix_zoo.sources import fetch\n"
            "fetch(**json.loads(sys.argv[1]))\n")
  env = {**os.environ, "PYTHONPATH": str(_REPO_ROOT)}
  return subprocess.Popen([sys.executable, "-c", script, json.dumps(kwargs)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when_stalled(proc: subprocess.Popen[bytes], faults: Faults) -> None:
  """Kills ``proc`` once the server has sent half of a stalled body, like a crash would."""
  try:
    assert faults.stalled.wait(timeout=60), proc.stderr.read().decode() if proc.poll() else ""
  finally:
    proc.kill()
    proc.wait()
    faults.release.set()
