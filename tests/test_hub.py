"""--model with a Hugging Face repo id: resolved through huggingface_hub's own cache
and its own errors, never the real network.

The cache is laid out as huggingface_hub lays it out (models--org--name with
blobs, snapshots/<commit> of symlinks, refs/main) from the toy; the error cases
point HF_ENDPOINT at a loopback server that answers like the Hub. Each case runs
the `lvb` command in a fresh process, because huggingface_hub reads HF_HOME,
HF_HUB_OFFLINE and HF_ENDPOINT when it is imported.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lvb.hub import RUNTIME_FILES, is_repo_id

TOY = Path(__file__).resolve().parent.parent / "models" / "toy"
REPO = "lvb-test/toy-vision"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(hf_home: Path, repo: str, files: list[Path]) -> Path:
    """huggingface_hub's cache layout; returns the snapshot folder."""
    storage = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    for file in files:
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def lvb(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "lvb.cli", *args], env=clean | env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("value, expected", [
    ("meta-llama/Llama-3.2-11B-Vision-Instruct", True),
    ("org/name.v2", True),
    ("./org/name", False),
    ("/abs/path", False),
    ("~/checkpoint", False),
    ("a/b/c", False),
    ("toy", False),
    ("org/na--me", False),
    ("org/-name", False),
])
def test_repo_id_or_path(value, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id(value) is expected


def test_an_existing_folder_wins_over_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_id("org/name")


@pytest.fixture
def hf_home(tmp_path):
    """The toy's small files and weights, cached as a Hub download of REPO."""
    home = tmp_path / "hf"
    files = [TOY / name for name in RUNTIME_FILES if (TOY / name).is_file()] + [TOY / "model.safetensors"]
    lay_out_cache(home, REPO, files)
    return home


def test_run_answers_from_the_hub_cache_offline(tmp_path, checkpoint_factory, export_factory):
    """run reads the small files from a cached snapshot; the answer equals the one from the
    checkpoint's own folder (same nets, greedy)."""
    name = "gqa2-cross-last"
    folder, work = checkpoint_factory(name), export_factory(name)
    home = tmp_path / "hf"
    lay_out_cache(home, REPO, [folder / n for n in RUNTIME_FILES if (folder / n).is_file()])
    picture = tmp_path / "picture.png"
    from lvb.tasks import QUESTION, sample

    sample(1, 7)[0][0].save(picture)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    common = ["--prompt", QUESTION, "--image", str(picture), "--onnx", str(work), "--greedy", "--max-new-tokens", "6"]
    from_hub = lvb("run", "--model", REPO, *common, env=env, cwd=tmp_path)
    assert from_hub.returncode == 0, from_hub.stderr
    from_folder = lvb("run", "--model", str(folder), *common, env=env, cwd=tmp_path)
    assert from_folder.returncode == 0, from_folder.stderr
    assert from_hub.stdout.strip() and from_hub.stdout == from_folder.stdout


def test_export_records_the_repo_and_names_the_model_after_it(hf_home, tmp_path):
    """export resolves the id (offline, from the cache) and the manifest names the repo, not the
    snapshot folder (which is named by the commit). A short --seq stops the export right after."""
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = lvb("export", "--model", REPO, "--out", str(tmp_path / "work"), "--seq", "4", env=env, cwd=tmp_path)
    line = one_line_error(result)
    assert "--seq 4 is too short" in line  # the checkpoint was found and read: its prompt was measured

    from lvb.export.exporter import Exporter, ExportSettings
    from lvb.hub import resolve_model

    snapshot = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    source = resolve_model(snapshot)
    assert source.directory == snapshot and source.repo_id is None
    exporter = Exporter(snapshot, tmp_path / "w", ExportSettings(seq=160, chunks=(32,)),
                        source={"name": "toy-vision", "repo_id": REPO, "commit": COMMIT})
    assert exporter.manifest["model"] == {"dir": str(snapshot), "name": "toy-vision", "repo_id": REPO, "commit": COMMIT}


def test_offline_without_the_weights_says_to_download(tmp_path):
    """The cache holds only the runtime's files: run works from it, export says what is missing."""
    home = tmp_path / "hf"
    lay_out_cache(home, REPO, [TOY / name for name in RUNTIME_FILES if (TOY / name).is_file()])
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    line = one_line_error(lvb("export", "--model", REPO, "--out", str(tmp_path / "w"), env=env, cwd=tmp_path))
    assert "lacks the safetensors weights" in line and "HF_HUB_OFFLINE" in line


def test_offline_and_not_cached(tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    line = one_line_error(lvb("run", "--model", REPO, "--prompt", "hi", env=env, cwd=tmp_path))
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


class LoopbackHub(http.server.BaseHTTPRequestHandler):
    """A loopback server answering as the Hub: what the handlers below share."""

    def _answer(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


class FakeHub(LoopbackHub):
    """Answers every API call as the Hub answers for a gated repo or a missing one."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if "/gated" in self.path:
            self._error(403, "GatedRepo", "Access to model lvb-test/gated is restricted.")
        else:
            # The Hub answers 401 for a missing repo to anonymous callers (a private one looks the same).
            self._error(401, "RepoNotFound", "Repository not found")

    do_HEAD = do_GET

    def _error(self, status: int, code: str, message: str) -> None:
        self._answer(status, json.dumps({"error": message}).encode(),
                     {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo, expected", [
    ("lvb-test/gated", "is gated: accept its license"),
    ("lvb-test/missing", "no such repo on the Hugging Face Hub"),
])
def test_hub_errors_are_one_line(repo, expected, fake_hub, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": fake_hub, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    line = one_line_error(lvb("export", "--model", repo, "--out", str(tmp_path / "w"), env=env, cwd=tmp_path))
    assert expected in line and repo in line


def test_no_network_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    line = one_line_error(lvb("run", "--model", REPO, "--prompt", "hi", env=env, cwd=tmp_path))
    assert "cannot reach the Hugging Face Hub" in line and REPO in line


def test_revision_with_a_folder_is_refused(tmp_path):
    line = one_line_error(lvb("run", "--model", str(TOY), "--revision", "v1", "--prompt", "hi",
                              env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")}, cwd=tmp_path))
    assert "--revision" in line


class RepoHub(LoopbackHub):
    """Serves one repo as the Hub's API does for a public one (repo info, file tree, files by
    commit) and records every file it sends: the toy's files and the other files a real repo
    holds besides (other weight formats, Meta's original/ folder, a README, an ONNX export)."""

    files: dict[str, bytes] = {}
    sent: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        api = f"/api/models/{REPO}"
        if path.startswith(f"{api}/revision/"):
            self._json({"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": name} for name in self.files]})
        elif path.startswith(f"{api}/tree/"):
            self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in self.files.items()])
        elif path.startswith(f"/{REPO}/resolve/{COMMIT}/") and (name := path.split(f"/{COMMIT}/", 1)[1]) in self.files:
            data = self.files[name]
            self._answer(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
            if self.command == "GET":
                self.sent.append(name)
        else:
            self._answer(404, b"{}", {"X-Error-Code": "EntryNotFound"})

    do_HEAD = do_GET

    def _json(self, value) -> None:
        self._answer(200, json.dumps(value).encode(), {"Content-Type": "application/json"})


@pytest.mark.parametrize("weights", [False, True], ids=["runtime", "weights"])
def test_the_hub_path_downloads_only_the_files_lvb_reads(weights, tmp_path):
    """From a repo holding far more than lvb reads, the runtime path fetches the small files and
    the export path adds the top-level safetensors, nothing else (huggingface_hub against a
    loopback server that answers as the Hub)."""
    extra = {"README.md": b"# card", "pytorch_model.bin": b"torch" * 100, "original/consolidated.pth": b"meta" * 100,
             "original/params.json": b"{}", "onnx/model.onnx": b"onnx", "model-int4/model.safetensors": b"w4" * 100}
    RepoHub.files = {p.name: p.read_bytes() for p in sorted(TOY.iterdir())} | extra
    RepoHub.sent = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RepoHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                "HF_HUB_DISABLE_XET": "1"}
        code = f"from lvb.hub import resolve_model; print(resolve_model({REPO!r}, weights={weights}).directory)"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    expected = {p.name for p in TOY.iterdir() if p.name in RUNTIME_FILES or (weights and p.name == "model.safetensors")}
    assert "model.safetensors" not in expected or weights
    assert sorted(RepoHub.sent) == sorted(expected)
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == expected
    assert all((folder / name).read_bytes() == RepoHub.files[name] for name in expected)
