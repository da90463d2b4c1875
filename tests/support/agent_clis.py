"""The real agent CLIs, installed from npm at pinned versions into the venv (once; `python -m
tests.support.agent_clis` installs them ahead, as .ci/run does), and run non-interactively against a local API."""

import fcntl
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CLIS = {"claude": ("@anthropic-ai/claude-code", "2.1.197"), "codex": ("@openai/codex", "0.171.0")}
INSTALL_TIMEOUT_S = 600


class NpmUnreachable(RuntimeError):
    """No npm, or no registry: the tests that need the CLIs skip, saying this."""


@dataclass(frozen=True)
class Cli:
    name: str
    package: str
    version: str

    @property
    def prefix(self) -> Path:
        return Path(sys.prefix) / "agent-clis" / f"{self.name}-{self.version}"

    @property
    def binary(self) -> Path:
        return self.prefix / "node_modules" / ".bin" / self.name


def cli(name: str) -> Cli:
    package, version = CLIS[name]
    return Cli(name, package, version)


def install(name: str) -> Path:
    """The CLI's binary, installed first if it is not yet (one installer at a time, across test workers)."""
    wanted = cli(name)
    wanted.prefix.mkdir(parents=True, exist_ok=True)
    with (wanted.prefix / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed(wanted):
            npm_install(wanted)
    return wanted.binary


def installed(wanted: Cli) -> bool:
    if not wanted.binary.exists():
        return False
    done = subprocess.run([str(wanted.binary), "--version"], capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and wanted.version in done.stdout


def npm_install(wanted: Cli) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NpmUnreachable("npm is not installed (.ci/run installs Debian's nodejs and npm)")
    ping = subprocess.run([npm, "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode != 0:
        raise NpmUnreachable(f"the npm registry is unreachable: {ping.stderr.strip()[-300:]}")
    args = [npm, "install", "--prefix", str(wanted.prefix), "--no-audit", "--no-fund", "--no-save",
            "--loglevel=error", f"{wanted.package}@{wanted.version}"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0 or not installed(wanted):
        raise RuntimeError(f"npm install {wanted.package}@{wanted.version} failed: {done.stderr[-2000:]}")


if __name__ == "__main__":
    for each in CLIS:
        print(install(each))
