"""A local stand-in for the Hugging Face Hub's HTTP API, enough for `dataselect push`.

It serves, on 127.0.0.1, just the endpoints huggingface_hub 2.4.0 calls for
`create_repo` + `create_commit` (read from its hf_api.py and _commit_api.py):

    POST /api/repos/create                          create_repo: JSON {name, organization, visibility, type}
    POST /api/validate-yaml                         create_commit, when README.md is in the commit
    POST /api/{type}s/{ns}/{name}/preupload/{rev}   asks "regular or lfs?" per file; always "regular" here,
                                                    so files travel base64 inside the commit (no LFS/xet)
    POST /api/{type}s/{ns}/{name}/commit/{rev}      NDJSON: a header line, then one line per file
    GET  /api/{type}s/{ns}/{name}                   repo info (dataset_info); dataselect reads `private`
                                                    to refuse pushing a private mixture into a public repo

and, for reading a repo's files as `datasets.load_dataset(repo_id, streaming=True)` does
(huggingface_hub's HfFileSystem):

    GET  /api/{type}s/{ns}/{name}/revision/{rev}    repo info at a revision (`main` or the repo's sha)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]      the files and folders below a path
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}  the entries of the paths asked for
    HEAD, GET /{type}s/{ns}/{name}/resolve/{rev}/{path}   a file's bytes, whole or a `Range` of them

and records what arrived: `repos` (repo id -> type and private flag), `files` (repo id -> path ->
bytes), `commits` and every `requests` entry (method, path, headers), and `bytes_served` (repo id
-> file bytes sent by `resolve`). Anything else is a 404, so a client that starts needing another
endpoint fails loudly instead of passing by accident.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import yaml

STANDIN_USER = "standin-user"  # the namespace of repos created without an organization


@dataclass
class Request:
    """One HTTP request as the stand-in received it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased: HTTP header names are case-insensitive
    body: bytes = field(repr=False)


class HubStandIn:
    """A real HTTP server in a thread that answers like the Hub for repo creation and commits."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[Request] = []
        self.bytes_served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the endpoints, each returning (status, JSON body) ---

    def add_dataset(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> None:
        """A dataset repo that already holds `files` (path -> bytes), as if pushed before."""
        self.repos[repo_id] = {"type": "dataset", "private": private}
        self.files[repo_id] = dict(files)

    def handle(self, request: Request) -> tuple[int, dict | bytes, dict[str, str]]:
        """(status, a JSON body or raw bytes, extra headers)."""
        with self._lock:
            self.requests.append(request)
            parts = [urllib.parse.unquote(p) for p in request.path.split("?")[0].strip("/").split("/")]
            if len(parts) > 4 and parts[0] in ("datasets", "spaces") and parts[3] == "resolve":
                return self._resolve(request, f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]))
            status, body = self._api(request, parts)
            return status, body, {}

    def _api(self, request: Request, parts: list[str]) -> tuple[int, dict | list]:
        if parts[:1] != ["api"]:
            return self._not_served(request)
        if request.method == "POST" and parts[1:] == ["repos", "create"]:
            return self._create_repo(json.loads(request.body))
        if request.method == "POST" and parts[1:] == ["validate-yaml"]:
            return self._validate_yaml(json.loads(request.body))
        if len(parts) < 4 or parts[1] not in ("models", "datasets", "spaces"):
            return self._not_served(request)
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        if repo_id not in self.repos or self.repos[repo_id]["type"] != parts[1][:-1]:
            return 404, {"error": f"Repository not found: {repo_id}"}
        if request.method == "GET" and (rest == [] or rest[:1] == ["revision"] and self._known(repo_id, rest[1])):
            return 200, self._repo_info(repo_id)
        if request.method == "GET" and len(rest) >= 2 and rest[0] == "tree" and self._known(repo_id, rest[1]):
            return self._tree(repo_id, "/".join(rest[2:]), "recursive=true" in request.path.lower())
        if request.method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            asked = urllib.parse.parse_qs(request.body.decode()).get("paths", [])
            return 200, [e for e in self._entries(repo_id, "", True) if e["path"] in asked]
        if request.method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(json.loads(request.body))
        if request.method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(repo_id, request.body)
        return self._not_served(request)

    @staticmethod
    def _not_served(request: Request) -> tuple[int, dict]:
        return 404, {"error": f"stand-in does not serve {request.method} {request.path}"}

    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or STANDIN_USER}/{payload['name']}"
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this repo", "url": url}
        self.repos[repo_id] = {"type": repo_type, "private": payload.get("visibility") == "private"}
        self.files[repo_id] = {}
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _sha(self, repo_id: str) -> str:
        """The repo's revision: its last commit's oid, else a hash of what it holds."""
        last = next((c["oid"] for c in reversed(self.commits) if c["repo_id"] == repo_id), None)
        return last or hashlib.sha1(repr(sorted(self.files[repo_id].items())).encode()).hexdigest()

    def _known(self, repo_id: str, revision: str) -> bool:
        return revision in ("main", self._sha(repo_id))

    def _entries(self, repo_id: str, folder: str, recursive: bool) -> list[dict]:
        """The files (and folders) below `folder`, as the Hub's tree API lists them: every file and
        folder under it when `recursive`, else its own files and subfolders."""
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(self.files[repo_id].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            folders = [prefix + "/".join(parts[:depth]) for depth in range(1, len(parts))]
            for sub in folders if recursive else folders[:1]:
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": hashlib.sha1(sub.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        return list(entries.values())

    def _tree(self, repo_id: str, folder: str, recursive: bool) -> tuple[int, dict | list]:
        entries = self._entries(repo_id, folder, recursive)
        if folder and not entries:
            return 404, {"error": f"Entry not found: {folder}"}
        return 200, entries

    def _resolve(self, request: Request, repo_id: str, revision: str, path: str) -> tuple[int, dict | bytes, dict]:
        if repo_id not in self.repos or not self._known(repo_id, revision):
            return 404, {"error": f"Repository not found: {repo_id}"}, {}
        if path not in self.files[repo_id]:
            return 404, {"error": f"Entry not found: {path}"}, {}
        data = self.files[repo_id][path]
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": self._sha(repo_id),
                   "Accept-Ranges": "bytes"}
        status, body = 200, data
        if (ranged := request.headers.get("range", "")).startswith("bytes="):
            first, _, last = ranged[len("bytes="):].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if request.method == "GET":
            self.bytes_served[repo_id] = self.bytes_served.get(repo_id, 0) + len(body)
        return status, body, headers

    def _repo_info(self, repo_id: str) -> dict:
        sha = self._sha(repo_id)
        siblings = [{"rfilename": path} for path in sorted(self.files[repo_id])]
        return {"id": repo_id, "author": repo_id.split("/")[0], "private": self.repos[repo_id]["private"],
                "sha": sha, "siblings": siblings}

    @staticmethod
    def _validate_yaml(payload: dict) -> tuple[int, dict]:
        """Like the Hub: the README's front matter must be a YAML mapping."""
        content = payload["content"]
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            metadata = yaml.safe_load(content[4:].split("\n---\n", 1)[0])
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata is not a mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    @staticmethod
    def _preupload(payload: dict) -> tuple[int, dict]:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload["files"]]
        return 200, {"files": files, "commitOid": None}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "commit payload must start with a header line"}
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 422, {"error": f"stand-in only takes regular base64 files, got {line['key']}"}
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.files[repo_id].update(added)
        oid = hashlib.sha1(body).hexdigest()
        repo_type = self.repos[repo_id]["type"]
        self.commits.append({"repo_id": repo_id, "oid": oid, **lines[0]["value"], "paths": sorted(added)})
        commit_url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Request(self.command, self.path, headers, self._read_body())
        status, payload, extra = self.hub.handle(request)
        raw = isinstance(payload, bytes)
        data = payload if raw else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        if status == 404:
            self.send_header("X-Error-Code", "RepoNotFound" if "Repository" in payload["error"] else "EntryNotFound")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass
