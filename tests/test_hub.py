"""Hub push and pull through the real huggingface_hub client, offline.

(a) a pre-populated cache read with `HF_HUB_OFFLINE=1`; (b) a small Hub-compatible HTTP server on
127.0.0.1 serving exactly the endpoints huggingface_hub 2.4 calls to create a repo, commit
(preupload, validate-yaml, ndjson commit), read repo info and trees, and resolve files.
"""

import base64
import hashlib
import importlib.util
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from PIL import Image

import sepme_adapter
from sepme_adapter import cli
from sepme_adapter.hub import export_lora
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.text import encode_prompts

from .helpers import CONCEPTS, make_eraser

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """An in-memory Hub on 127.0.0.1: model repos, branches, regular (non-LFS) files, one thread per request."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.validated: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------ state
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][self._resolve(repo, revision)]

    @staticmethod
    def _resolve(repo: dict, revision: str) -> str | None:
        if revision in repo["refs"]:
            return repo["refs"][revision]
        return revision if revision in repo["commits"] else None

    def _commit(self, repo: dict, branch: str, files: dict[str, bytes], summary: str) -> str:
        parent = repo["refs"].get(branch, "")
        sha = hashlib.sha1(f"{parent}\n{summary}\n{sorted((p, git_blob_id(d)) for p, d in files.items())}".encode())
        repo["commits"][sha.hexdigest()] = files
        repo["refs"][branch] = sha.hexdigest()
        return sha.hexdigest()

    # ------------------------------------------------------------ HTTP
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def reply(self, status, body=b"", headers=None, head=False):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def fail(self, status, code, message, head=False, headers=None):
                self.reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message,
                                                        **(headers or {})}, head=head)

            def body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def route(self, method):
                url = urlsplit(self.path)
                path = unquote(url.path)
                with hub.lock:
                    hub.requests.append((method, path))
                    if method == "POST" and self.headers.get("Authorization"):
                        hub.authorizations.add(self.headers["Authorization"])
                    if method == "POST" and path == "/api/repos/create":
                        return self.create(json.loads(self.body()))
                    if method == "POST" and path == "/api/validate-yaml":
                        return self.validate_yaml(json.loads(self.body()))
                    match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?",
                                         path)
                    if match:
                        repo_id, action, revision, sub = match.groups()
                        repo = hub.repos.get(repo_id)
                        if repo is None:
                            return self.fail(404, "RepoNotFound", f"Repository {repo_id} not found")
                        if method == "POST" and action == "preupload":
                            return self.preupload(json.loads(self.body()))
                        if method == "POST" and action == "commit":
                            return self.commit(repo, repo_id, revision, self.body())
                        if method == "GET" and action in (None, "revision"):
                            return self.info(repo, repo_id, revision or "main")
                        if method == "GET" and action == "tree":
                            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                            return self.tree(repo, revision, (sub or "").strip("/"), recursive)
                    match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                    if match and method in ("GET", "HEAD"):
                        return self.resolve(*match.groups(), head=method == "HEAD")
                    return self.fail(404, "NotFound", f"no route for {method} {path}", head=method == "HEAD")

            def do_GET(self):
                self.route("GET")

            def do_HEAD(self):
                self.route("HEAD")

            def do_POST(self):
                self.route("POST")

            # -------------------------------------------------------- endpoints
            def create(self, payload):
                if not self.headers.get("Authorization"):
                    return self.fail(401, "Unauthorized", "Invalid credentials in Authorization header")
                repo_id = f"{payload['organization']}/{payload['name']}"
                body = {"url": f"{hub.url}/{repo_id}", "name": repo_id}
                if repo_id in hub.repos:
                    return self.reply(409, {**body, "error": "You already created this model repo"})
                repo = hub.repos[repo_id] = {"refs": {}, "commits": {}, "private": payload.get("visibility") == "private"}
                hub._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                            "initial commit")
                return self.reply(200, body)

            def validate_yaml(self, payload):
                content = payload["content"]
                hub.validated.append(content)
                match = re.match(r"---\n(.*?)\n---\n", content, re.S)
                try:
                    data = yaml.safe_load(match.group(1)) if match else None
                except yaml.YAMLError as error:
                    return self.reply(400, {"errors": [{"message": str(error)}]})
                if not isinstance(data, dict):
                    return self.reply(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                return self.reply(200, {"errors": [], "warnings": []})

            def preupload(self, payload):
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in payload["files"]]
                return self.reply(200, {"files": files})

            def commit(self, repo, repo_id, revision, body):
                if not self.headers.get("Authorization"):
                    return self.fail(401, "Unauthorized", "Invalid credentials in Authorization header")
                if revision not in repo["refs"]:
                    return self.fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                files = dict(repo["commits"][repo["refs"][revision]])
                summary = ""
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"]["summary"]
                    elif item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                    else:
                        return self.fail(400, "BadRequest", f"unsupported commit operation {item['key']}")
                sha = hub._commit(repo, revision, files, summary)
                return self.reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})

            def info(self, repo, repo_id, revision):
                sha = hub._resolve(repo, revision)
                if sha is None:
                    return self.fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                siblings = [{"rfilename": p} for p in sorted(repo["commits"][sha])]
                return self.reply(200, {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": siblings})

            def tree(self, repo, revision, folder, recursive):
                sha = hub._resolve(repo, revision)
                if sha is None:
                    return self.fail(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                prefix = f"{folder}/" if folder else ""
                entries, folders = [], set()
                for path, data in sorted(repo["commits"][sha].items()):
                    if not path.startswith(prefix):
                        continue
                    parts = path[len(prefix):].split("/")
                    for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                        folders.add(prefix + "/".join(parts[:depth]))
                    if recursive or len(parts) == 1:
                        entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)})
                entries += [{"type": "directory", "path": f, "size": 0, "oid": git_blob_id(f.encode())}
                            for f in sorted(folders)]
                return self.reply(200, entries)

            def resolve(self, repo_id, revision, path, head):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self.fail(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                sha = hub._resolve(repo, revision)
                if sha is None:
                    return self.fail(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                data = repo["commits"][sha].get(path)
                if data is None:
                    return self.fail(404, "EntryNotFound", f"{path} does not exist", head=head,
                                     headers={"X-Repo-Commit": sha})
                return self.reply(200, data, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": sha,
                                              "Content-Type": "application/octet-stream"}, head=head)

        return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, selected the way HF_ENDPOINT would (huggingface_hub read its constants at import)."""
    server = FakeHub()
    for name, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                        "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_TOKEN": "hf_fake_token"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    yield server
    server.stop()


def populate_cache(cache, repo_id, files, commit, ref="main"):
    """Lay files out as huggingface_hub's cache does: refs/<ref>, blobs/<id>, snapshots/<commit>/<path> links."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    for path, data in files.items():
        blob = storage / "blobs" / git_blob_id(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def file_bytes(eraser, tmp_path, lora=False):
    path = tmp_path / "bytes" / ("lora" if lora else "") / f"{eraser.name}.safetensors"
    return (export_lora(eraser, path)[0] if lora else eraser.save(path)).read_bytes()


def unet_output(pipe):
    text = encode_prompts(pipe, list(CONCEPTS.values()))
    with torch.no_grad():
        return pipe.unet(torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 500, text).sample


# ------------------------------------------------------------------ (a) offline cache
def test_load_sepme_reads_a_hub_repo_from_the_offline_cache(pipe, erasers, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {f"{n}.safetensors": file_bytes(e, tmp_path) for n, e in erasers.items()}
    files["lora/vangogh.safetensors"] = file_bytes(erasers["vangogh"], tmp_path, lora=True)
    files["README.md"] = b"---\nlibrary_name: sepme-adapter\n---\n"
    populate_cache(cache, "org/erasers", files, "a" * 40)
    populate_cache(cache, "org/erasers", {"vangogh.safetensors": files["vangogh.safetensors"]}, "b" * 40, ref="v1")

    assert pipe.load_sepme("org/erasers", weight_name="picasso.safetensors") == "picasso"
    pipe.unload_sepme()
    assert sorted(pipe.load_sepme("org/erasers")) == sorted(CONCEPTS)  # whole repo; lora/ copies skipped
    pipe.unload_sepme()
    assert pipe.load_sepme("org/erasers", revision="v1") == ["vangogh"]
    pipe.unload_sepme()
    assert pipe.load_sepme("org/erasers", subfolder="lora", weight_name="vangogh.safetensors") == "vangogh"
    assert torch.equal(pipe.unet._sepme_runtime.erasers["vangogh"].basis, erasers["vangogh"].basis)
    with pytest.raises(FileNotFoundError, match="local cache"):
        pipe.load_sepme("org/erasers", weight_name="monet.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors eraser files"):
        pipe.load_sepme("org/erasers", subfolder="nothing-here")


# ------------------------------------------------------------------ (b) a local Hub server
def test_push_then_pull_through_a_hub_server(hub, pipe, erasers, tmp_path):
    erasers["vangogh"].metadata.update(training={"method": "sepme", "config": {"lr": 0.001}}, stats={"iterations": 120})
    picasso_file = erasers["picasso"].save(tmp_path / "picasso.safetensors")
    first = sepme_adapter.push_to_hub([erasers["vangogh"], picasso_file], "org/erasers", commit_message="first")
    files = hub.files("org/erasers")
    assert sorted(files) == [".gitattributes", "README.md", "lora/picasso.safetensors", "lora/vangogh.safetensors",
                             "picasso.safetensors", "vangogh.safetensors"]
    assert files["picasso.safetensors"] == picasso_file.read_bytes()  # uploaded unchanged
    assert sum(1 for method, path in hub.requests if "/commit/" in path) == 1  # one commit
    assert hub.authorizations == {"Bearer hf_fake_token"} and len(hub.validated) == 1

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "sepme-adapter"
    assert {"sepme", "concept-erasure", "diffusers"} <= set(card.data.tags)
    for name in ("vangogh", "picasso"):
        assert CONCEPTS[name] in card.text and f"weight_name='{name}.safetensors'" in card.text
    assert "known concept 'cezanne': 'a painting by cezanne'" in card.text and "watermark" in card.text
    assert "| config.lr | 0.001 |" in card.text and "| iterations | 120 |" in card.text  # training settings, stats
    for snippet in ("sepme_adapter.attach(", "pipe.load_sepme('org/erasers')", "pipe.set_erased(",
                    "pipe.load_lora_weights('org/erasers', subfolder='lora'", "pipe.set_adapters(", "disable_lora()"):
        assert snippet in card.text, snippet

    assert sorted(pipe.load_sepme("org/erasers")) == ["picasso", "vangogh"]
    loaded = pipe.unet._sepme_runtime.erasers["picasso"]
    assert all(torch.equal(loaded.weights[k], w) for k, w in erasers["picasso"].weights.items())

    sepme_adapter.push_to_hub([erasers["cezanne"]], "org/erasers")  # a second push: the card covers all three
    card = ModelCard(hub.files("org/erasers")["README.md"].decode())
    assert all(CONCEPTS[name] in card.text for name in CONCEPTS)
    pipe.unload_sepme()
    assert sorted(pipe.load_sepme("org/erasers")) == sorted(CONCEPTS)
    pipe.unload_sepme()
    assert sorted(pipe.load_sepme("org/erasers", revision=first.oid)) == ["picasso", "vangogh"]

    pipe.set_erased(["vangogh"])
    plain = tiny_pipeline()  # vanilla diffusers, through the same Hub
    plain.load_lora_weights("org/erasers", subfolder="lora", weight_name="vangogh.safetensors", adapter_name="vangogh")
    expected = unet_output(pipe)
    assert torch.allclose(unet_output(plain), expected, rtol=0, atol=2e-5 * float(expected.abs().max()))

    second_cezanne = erasers["cezanne"].save(tmp_path / "cezanne-v2.safetensors")
    with pytest.raises(ValueError, match="already holds an eraser for 'cezanne' in 'cezanne.safetensors'"):
        sepme_adapter.push_to_hub(second_cezanne, "org/erasers")


def test_the_push_and_export_lora_commands(hub, erasers, tmp_path, monkeypatch, capsys):
    files = [str(e.save(tmp_path / f"{n}.safetensors")) for n, e in erasers.items()]
    assert cli.main(["export-lora", *files, "-o", str(tmp_path / "lora")]) == 0
    assert sorted(os.listdir(tmp_path / "lora")) == sorted(f"{n}.safetensors" for n in CONCEPTS)
    assert cli.main(["export-lora", files[0], "-o", str(tmp_path)]) == 2
    assert "would overwrite the eraser itself" in capsys.readouterr().err
    assert cli.main(["export-lora", *files, "-o", str(tmp_path / "one.safetensors")]) == 2
    assert "pass a folder" in capsys.readouterr().err

    assert cli.main(["push", *files[:2], "org/cli-erasers", "--no-lora", "-m", "from the command line"]) == 0
    assert "org/cli-erasers" in capsys.readouterr().out
    pushed = hub.files("org/cli-erasers")
    assert sorted(pushed) == [".gitattributes", "README.md", "picasso.safetensors", "vangogh.safetensors"]
    assert "load_lora_weights" not in pushed["README.md"].decode()  # no lora/ exports, no LoRA snippet


def test_the_example_script_pushes_pulls_and_matches_plain_diffusers(hub, pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path / "model")  # the base model, as a local folder
    files = [str(make_eraser(pipe, name, seed=i).save(tmp_path / f"{name}.safetensors"))
             for i, name in enumerate(("vangogh", "picasso"))]
    spec = importlib.util.spec_from_file_location("push_and_pull", EXAMPLES / "push_and_pull.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    example.main([*files, "--repo", "org/example", "--model", str(tmp_path / "model"), "--steps", "2"])
    sepme_image, plain_image = (np.asarray(Image.open(tmp_path / f"erased-{kind}.png"), dtype=np.int16)
                                for kind in ("sepme", "plain-diffusers"))
    assert np.abs(sepme_image - plain_image).max() <= 1
