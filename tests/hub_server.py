"""A loopback Hugging Face Hub for tests: the HTTP endpoints huggingface_hub's upload and download paths use.

It stands in for huggingface.co (not for any kpid-zoo code): the real `huggingface_hub` client talks HTTP to it.
stdlib only (http.server in a thread), bound to 127.0.0.1 on a random port, state in memory.

Implemented, as the client (huggingface_hub 2.x, xet disabled) calls them:
  POST /api/repos/create                               create_repo (409 when it exists -> exist_ok)
  POST /api/validate-yaml                              README front matter check before a commit
  GET  /api/models/{repo}[/revision/{rev}]             repo_info / model_info
  POST /api/models/{repo}/branch/{branch}              create_branch
  POST /api/models/{repo}/preupload/{rev}              upload modes: binary / big / *.safetensors -> "lfs"
  POST /{repo}.git/info/lfs/objects/batch              LFS batch API (basic transfer, verify action)
  PUT  /_lfs/upload/{oid}   POST /_lfs/verify          LFS object upload (sha256 checked) and verify
  POST /api/models/{repo}/commit/{rev}                 ndjson commit: header, file (base64), lfsFile, deletes
  HEAD/GET /{repo}/resolve/{rev}/{path}                hf_hub_download (X-Repo-Commit, ETag, X-Linked-*)
Auth: when `token` is set, writes need `Authorization: Bearer <token>`, and private repos need it to be read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.onnx', '.png', '.jpg', '.npz')
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports and `CommitOperationAdd._local_oid` compares: sha256 for LFS, git sha1 else."""
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    files: dict[str, StoredFile]
    summary: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)


class HubServer:
    """`with HubServer(token=...) as hub: hub.url ...`; `hub.requests` logs (method, path, headers) of every call."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread = threading.Thread(target=self._httpd.serve_forever, name='loopback-hub', daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    # helpers for tests
    def file(self, repo_id: str, path: str, rev: str = 'main') -> StoredFile:
        return self.repos[repo_id].resolve(rev).files[path]

    def new_commit(self, repo: Repo, branch: str, files: dict[str, StoredFile], summary: str) -> Commit:
        oid = hashlib.sha1(f'{repo.repo_id}{branch}{summary}{time.time_ns()}{len(repo.commits)}'.encode()).hexdigest()
        commit = Commit(oid, files, summary)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


class _Reply(Exception):
    def __init__(self, status: int, body: dict | None = None, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body or {}, headers or {}


def _error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> _Reply:
    h = {'X-Error-Message': message, **(headers or {})}
    if code:
        h['X-Error-Code'] = code
    return _Reply(status, {'error': message}, h)


_REPO = r'(?P<repo>[^/]+/[^/]+?)'


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'  # the client keeps connections alive: every reply carries Content-Length

        def log_message(self, fmt, *args) -> None:  # keep pytest output quiet
            pass

        # -- plumbing -----------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get('Content-Length') or 0))

        def _send(
            self,
            status: int,
            body: bytes = b'',
            headers: dict[str, str] | None = None,
            content_type: str = 'application/json',
            head: bool = False,
        ) -> None:
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if 'Content-Length' not in (headers or {}):
                self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get('Authorization') == f'Bearer {hub.token}'

        def _require_auth(self) -> None:
            if not self._authorized():
                raise _error(401, None, 'Invalid credentials in Authorization header')

        def _repo(self, repo_id: str, write: bool = False) -> Repo:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                raise _error(404 if self._authorized() else 401, 'RepoNotFound', f'Repository not found: {repo_id}')
            if write:
                self._require_auth()
            return repo

        def _dispatch(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((method, path, dict(self.headers)))
            body = self._body() if method in ('POST', 'PUT') else b''
            try:
                with hub._lock:
                    self._route(method, path, body)
            except _Reply as r:
                self._send(r.status, json.dumps(r.body).encode(), r.headers, head=method == 'HEAD')

        def do_GET(self):  # noqa: N802
            self._dispatch('GET')

        def do_HEAD(self):  # noqa: N802
            self._dispatch('HEAD')

        def do_POST(self):  # noqa: N802
            self._dispatch('POST')

        def do_PUT(self):  # noqa: N802
            self._dispatch('PUT')

        # -- routes -------------------------------------------------------------------------------------------
        def _route(self, method: str, path: str, body: bytes) -> None:
            routes = [
                ('POST', r'/api/repos/create', self.create_repo),
                ('POST', r'/api/validate-yaml', self.validate_yaml),
                ('GET', rf'/api/models/{_REPO}(?:/revision/(?P<rev>.+))?', self.repo_info),
                ('POST', rf'/api/models/{_REPO}/branch/(?P<rev>.+)', self.create_branch),
                ('POST', rf'/api/models/{_REPO}/preupload/(?P<rev>.+)', self.preupload),
                ('POST', rf'/api/models/{_REPO}/commit/(?P<rev>.+)', self.commit),
                ('POST', rf'/{_REPO}\.git/info/lfs/objects/batch', self.lfs_batch),
                ('PUT', r'/_lfs/upload/(?P<oid>[0-9a-f]{64})', self.lfs_upload),
                ('POST', r'/_lfs/verify', self.lfs_verify),
                ('HEAD', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
                ('GET', rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.resolve),
            ]
            for m, pattern, fn in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    return fn(body=body, head=method == 'HEAD', **match.groupdict())
            hub.unhandled.append(f'{method} {path}')
            raise _error(404, None, f'loopback hub: no route for {method} {path}')

        def _json(
            self, status: int, obj: dict, headers: dict[str, str] | None = None, content_type: str = 'application/json'
        ) -> None:
            self._send(status, json.dumps(obj).encode(), headers, content_type)

        def create_repo(self, body: bytes, **_) -> None:
            self._require_auth()
            req = json.loads(body)
            if req.get('type', 'model') not in (None, 'model'):
                raise _error(400, None, 'loopback hub: model repos only')
            repo_id = f'{req["organization"]}/{req["name"]}' if req.get('organization') else f'user/{req["name"]}'
            url = f'{hub.url}/{repo_id}'
            if repo_id in hub.repos:
                raise _Reply(409, {'error': 'You already created this model repo', 'url': url})
            repo = Repo(repo_id, private=req.get('visibility') == 'private' or bool(req.get('private')))
            hub.repos[repo_id] = repo
            hub.new_commit(
                repo,
                'main',
                {'.gitattributes': StoredFile(b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n', False)},
                'initial commit',
            )
            self._json(200, {'url': url, 'name': repo_id})

        def validate_yaml(self, body: bytes, **_) -> None:
            content = json.loads(body)['content']
            match = re.match(r'^---\n(.*?)\n---\n', content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as e:
                raise _Reply(400, {'errors': [{'message': f'invalid YAML: {e}'}], 'warnings': []})
            warnings = [] if meta else [{'message': 'empty or missing yaml metadata in repo card'}]
            self._json(200, {'errors': [], 'warnings': warnings})

        def repo_info(self, repo: str, rev: str | None = None, **_) -> None:
            r = self._repo(repo)
            commit = r.resolve(rev or 'main')
            if commit is None:
                raise _error(404, 'RevisionNotFound', f'Invalid rev id: {rev}')
            self._json(
                200,
                {
                    'id': repo,
                    'modelId': repo,
                    'sha': commit.oid,
                    'private': r.private,
                    'siblings': [{'rfilename': p} for p in sorted(commit.files)],
                    'tags': [],
                },
            )

        def create_branch(self, repo: str, rev: str, body: bytes, **_) -> None:
            r = self._repo(repo, write=True)
            if rev in r.branches:
                raise _error(409, None, f'Reference already exists: {rev}')
            r.branches[rev] = r.branches['main']
            self._json(200, {})

        def preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
            r = self._repo(repo, write=True)
            commit = r.resolve(rev)
            if commit is None:
                raise _error(404, 'RevisionNotFound', f'Invalid rev id: {rev}')
            files = []
            for f in json.loads(body)['files']:
                sample = base64.b64decode(f['sample'])
                lfs = f['path'].endswith(LFS_SUFFIXES) or f['size'] >= LFS_MIN_SIZE or b'\0' in sample
                existing = commit.files.get(f['path'])
                files.append(
                    {
                        'path': f['path'],
                        'uploadMode': 'lfs' if lfs else 'regular',
                        'shouldIgnore': False,
                        'oid': existing.oid if existing is not None and existing.lfs == lfs else None,
                    }
                )
            self._json(200, {'files': files, 'commitOid': commit.oid})

        def lfs_batch(self, repo: str, body: bytes, **_) -> None:
            self._repo(repo, write=True)
            req = json.loads(body)
            objects = []
            for o in req['objects']:
                stored = hub.lfs_objects.get(o['oid'])
                if stored is not None and len(stored) == o['size']:
                    objects.append({'oid': o['oid'], 'size': o['size']})  # no actions: already there
                else:
                    objects.append(
                        {
                            'oid': o['oid'],
                            'size': o['size'],
                            'authenticated': True,
                            'actions': {
                                'upload': {'href': f'{hub.url}/_lfs/upload/{o["oid"]}', 'header': {}},
                                'verify': {'href': f'{hub.url}/_lfs/verify', 'header': {}},
                            },
                        }
                    )
            self._json(200, {'transfer': 'basic', 'objects': objects}, content_type='application/vnd.git-lfs+json')

        def lfs_upload(self, oid: str, body: bytes, **_) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                raise _error(400, None, f'LFS object {oid}: content does not hash to its oid')
            hub.lfs_objects[oid] = body
            self._send(200, b'', content_type='text/plain')

        def lfs_verify(self, body: bytes, **_) -> None:
            self._require_auth()
            req = json.loads(body)
            if len(hub.lfs_objects.get(req['oid'], b'')) != req['size'] or req['oid'] not in hub.lfs_objects:
                raise _error(404, None, f'LFS object {req["oid"]} not uploaded')
            self._json(200, {})

        def commit(self, repo: str, rev: str, body: bytes, **_) -> None:
            r = self._repo(repo, write=True)
            parent = r.resolve(rev)
            if parent is None or rev not in r.branches:
                raise _error(404, 'RevisionNotFound', f'Invalid rev id: {rev}')
            files = dict(parent.files)
            summary = ''
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item['key'], item['value']
                if key == 'header':
                    summary = value['summary']
                    if value.get('parentCommit') not in (None, parent.oid):
                        raise _error(412, None, 'A commit has happened since. Please refresh and try again.')
                elif key == 'file':
                    if value.get('encoding') != 'base64':
                        raise _error(400, None, f'file {value["path"]}: unsupported encoding {value.get("encoding")}')
                    files[value['path']] = StoredFile(base64.b64decode(value['content']), lfs=False)
                elif key == 'lfsFile':
                    data = hub.lfs_objects.get(value['oid'])
                    if data is None:
                        raise _error(422, None, f'lfsFile {value["path"]}: object {value["oid"]} was never uploaded')
                    files[value['path']] = StoredFile(data, lfs=True)
                elif key == 'deletedFile':
                    if files.pop(value['path'], None) is None:
                        raise _error(404, 'EntryNotFound', f"A file with this name doesn't exist: {value['path']}")
                elif key == 'deletedFolder':
                    prefix = value['path'].rstrip('/') + '/'
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise _error(400, None, f'loopback hub: unknown commit item {key!r}')
            commit = hub.new_commit(r, rev, files, summary)
            self._json(
                200, {'success': True, 'commitOid': commit.oid, 'commitUrl': f'{hub.url}/{repo}/commit/{commit.oid}'}
            )

        def resolve(self, repo: str, rev: str, file: str, head: bool, **_) -> None:
            r = self._repo(repo)
            commit = r.resolve(rev)
            if commit is None:
                raise _error(404, 'RevisionNotFound', f'Invalid rev id: {rev}')
            stored = commit.files.get(file)
            if stored is None:
                raise _error(404, 'EntryNotFound', f'Entry not found: {file}', {'X-Repo-Commit': commit.oid})
            headers = {
                'X-Repo-Commit': commit.oid,
                'Accept-Ranges': 'bytes',
                'Content-Length': str(len(stored.content)),
            }
            if stored.lfs:
                # the Hub serves LFS files from a CDN; these headers carry the blob's identity through
                headers.update(
                    {
                        'ETag': f'"{stored.sha256}"',
                        'X-Linked-Etag': f'"{stored.sha256}"',
                        'X-Linked-Size': str(len(stored.content)),
                    }
                )
            else:
                headers['ETag'] = f'"{git_blob_sha1(stored.content)}"'
            self._send(200, stored.content, headers, content_type='application/octet-stream', head=head)

    return Handler
