"""A local Hugging Face hub for tests: git repositories served by olah.

olah serves a model repo `org/name` from `<mirrors-path>/models/org/name`, a
git repository whose `main` branch holds the files as plain blobs (no LFS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tests.support.processes import free_port

GIT_IDENTITY = ("-c", "user.name=shardline-tests", "-c", "user.email=tests@shardline.invalid")
# A fixed date makes the commit hash depend only on the files.
GIT_DATE = "2024-01-01T00:00:00+00:00"
# Level 0 skips zlib work on random weights, which would not compress anyway.
GIT_SETTINGS = ("-c", "core.compression=0", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null")
EXCLUDED_FILES = (".cache", ".git")
# Nothing listens here, so a request olah tries to forward upstream fails fast on loopback.
UNREACHABLE_UPSTREAM = "127.0.0.1:9"


def mirror_repo_path(mirrors_root: Path, repo_id: str, repo_type: str = "models") -> Path:
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    return mirrors_root / repo_type / org / name


def publish_model(model_dir: Path, mirrors_root: Path, repo_id: str) -> Path:
    """Commit the files of `model_dir` to the `main` branch of the mirror repo; return its path.

    The repository is bare and uses `model_dir` as its work tree, so the files are
    stored once (as git objects) rather than copied. Publishing again adds a commit.
    """
    repo = mirror_repo_path(mirrors_root, repo_id)
    if not repo.exists():
        repo.mkdir(parents=True)
        run_git("init", "--quiet", "--bare", "--initial-branch=main", str(repo))
    tree_args = (f"--git-dir={repo}", f"--work-tree={model_dir.resolve()}")
    excludes = [f":(exclude){name}" for name in EXCLUDED_FILES]
    run_git(*tree_args, "add", "--all", "--", ".", *excludes)
    run_git(*tree_args, "commit", "--quiet", "--allow-empty", "-m", f"Publish {repo_id}")
    return repo


def head_commit(repo: Path) -> str:
    """The commit hash of `main` in a mirror repository."""
    return run_git(f"--git-dir={repo}", "rev-parse", "main").strip()


def run_git(*args: str) -> str:
    command = ["git", *GIT_IDENTITY, *GIT_SETTINGS, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=git_env(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    # Ignore the user's and the system's git config (LFS filters, signing, hooks).
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_DATE=GIT_DATE,
        GIT_COMMITTER_DATE=GIT_DATE,
    )
    return env


def toml_string(value: str | Path) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value))


def olah_config(host: str, port: int, mirrors_root: Path, repos_path: Path) -> str:
    netloc = f"{host}:{port}"
    return "\n".join(
        [
            "[basic]",
            f"host = {toml_string(host)}",
            f"port = {port}",
            f"repos-path = {toml_string(repos_path)}",
            f"mirrors-path = [{toml_string(mirrors_root)}]",
            'hf-scheme = "http"',
            f"hf-netloc = {toml_string(UNREACHABLE_UPSTREAM)}",
            f"hf-lfs-netloc = {toml_string(UNREACHABLE_UPSTREAM)}",
            'mirror-scheme = "http"',
            f"mirror-netloc = {toml_string(netloc)}",
            f"mirror-lfs-netloc = {toml_string(netloc)}",
            "",
            "[accessibility]",
            "offline = true",
            "",
        ]
    )


# olah 0.5 streams local-mirror files in 4 KiB chunks, each a threadpool hop in
# starlette, which caps a download near 12 MB/s. Regrouping the chunks into 1 MiB
# pieces lifts that cap; the bytes served are unchanged.
OLAH_RECHUNKED = """
import olah.mirror.repos as repos
from olah.server import cli

CHUNK = 1 << 20
original_get_file = repos.LocalMirrorRepo.get_file


def rechunk(stream):
    buffer = bytearray()
    for piece in stream:
        buffer += piece
        if len(buffer) >= CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def get_file(self, commit_hash, path):
    stream = original_get_file(self, commit_hash, path)
    return None if stream is None else rechunk(stream)


repos.LocalMirrorRepo.get_file = get_file
cli()
"""


class HubMirrorError(RuntimeError):
    pass


class HubMirror:
    """olah serving the repos under `mirrors_root`, as a subprocess on 127.0.0.1.

    Everything olah writes (config, cache, logs) goes under `workdir`. With
    `rechunk=False` olah runs unmodified (about 12 MB/s per download).
    """

    host = "127.0.0.1"

    def __init__(
        self, mirrors_root: Path, workdir: Path, *, rechunk: bool = True, startup_timeout: float = 60.0
    ) -> None:
        self.mirrors_root = mirrors_root.resolve()
        self.workdir = workdir.resolve()
        self.rechunk = rechunk
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise HubMirrorError("the mirror is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "olah.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "olah.toml"

    def command(self) -> list[str]:
        launcher = ["-c", OLAH_RECHUNKED] if self.rechunk else ["-m", "olah.server"]
        args = ["-c", str(self.config_path), "--log-path", str(self.workdir / "logs")]
        return [sys.executable, *launcher, *args]

    def start(self, attempts: int = 3) -> HubMirror:
        if self._process is not None:
            raise HubMirrorError("the mirror is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Another process may grab the free port before olah binds it; retry on a new one.
        for attempt in range(1, attempts + 1):
            try:
                self._launch(free_port(self.host))
                return self
            except HubMirrorError:
                self.stop()
                if attempt == attempts:
                    raise
        return self

    def _launch(self, port: int) -> None:
        self.port = port
        repos_path = self.workdir / "repos"
        self.config_path.write_text(olah_config(self.host, port, self.mirrors_root, repos_path), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise HubMirrorError(f"olah exited during startup:\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        raise HubMirrorError(f"olah did not answer within {self.startup_timeout}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.endpoint}/api/whoami-v2", timeout=1.0, trust_env=False)
        except httpx.HTTPError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        self.port = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> HubMirror:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
