"""Show that the test support works end to end; prints findings and timings.

Run from the repository root:

    .venv/bin/python -m tests.support.check_support [--bench-mb 600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

from tests.support.hub_mirror import HubMirror, head_commit, publish_model
from tests.support.model_factory import files_for_layers, make_bench_model, make_tiny_model

REPO_ID = "test-org/tiny-llama"
BENCH_REPO_ID = "test-org/bench-llama"
PROMPT = [{"role": "user", "content": "Tell me a story about a fox."}]


@contextmanager
def step(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    print(f"[time] {name}: {time.perf_counter() - started:.2f}s")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_error(action: Callable[[], object]) -> str:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the point is to report whatever is raised
        return f"{type(error).__module__}.{type(error).__qualname__}"
    return "no exception"


def same_files(source: Path, copy: Path, names: list[str]) -> bool:
    return all(sha256_file(source / name) == sha256_file(copy / name) for name in names)


def downloaded_files(local_dir: Path) -> list[str]:
    return sorted(path.name for path in local_dir.iterdir() if path.is_file())


def check_generation(model_dir: Path) -> None:
    import mlx_lm

    # load() is typed as returning 2 or 3 items; without return_config it returns 2.
    model, tokenizer = mlx_lm.load(str(model_dir))[:2]
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    texts = [mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=24) for _ in range(2)]
    print(f"generated text: {texts[0]!r}")
    print(f"greedy generation deterministic: {texts[0] == texts[1]}, non-empty: {bool(texts[0])}")


def check_snapshot(endpoint: str, model_dir: Path, local_dir: Path) -> None:
    wanted = ["config.json", "model.safetensors.index.json", *files_for_layers(model_dir, range(0, 2))]
    snapshot_download(REPO_ID, local_dir=local_dir, allow_patterns=wanted, endpoint=endpoint)
    got = downloaded_files(local_dir)
    print(f"snapshot_download(allow_patterns={wanted}) -> {got}")
    print(
        f"  exactly the requested files: {got == sorted(wanted)}, sha256 match: {same_files(model_dir, local_dir, got)}"
    )


def check_model_info(endpoint: str, model_dir: Path) -> None:
    api = HfApi(endpoint=endpoint)
    info = api.model_info(REPO_ID, revision="main", files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    print(f"model_info(revision='main', files_metadata=True): sha={info.sha} sizes={sizes}")
    print(f"model_info(revision=None) raises: {describe_error(lambda: api.model_info(REPO_ID))}")
    tree = {entry.path: getattr(entry, "size", None) for entry in api.list_repo_tree(REPO_ID, revision="main")}
    sizes_ok = all(tree[name] == (model_dir / name).stat().st_size for name in tree)
    print(f"list_repo_tree sizes: {tree}, match local sizes: {sizes_ok}")


def check_single_file(endpoint: str, model_dir: Path, local_dir: Path) -> None:
    path = Path(hf_hub_download(REPO_ID, "tokenizer.json", local_dir=local_dir, endpoint=endpoint))
    print(f"hf_hub_download -> {path}, sha256 match: {sha256_file(path) == sha256_file(model_dir / 'tokenizer.json')}")


def check_errors(endpoint: str, root: Path) -> None:
    # A fresh local_dir per case: snapshot_download returns an existing local_dir instead of raising.
    def fresh(name: str) -> Path:
        return root / name.replace(" ", "-")

    cases: dict[str, Callable[[Path], object]] = {
        "missing repo": lambda d: hf_hub_download("nobody/none", "config.json", local_dir=d, endpoint=endpoint),
        "missing file": lambda d: hf_hub_download(REPO_ID, "missing.json", local_dir=d, endpoint=endpoint),
        "missing revision": lambda d: hf_hub_download(
            REPO_ID, "config.json", revision="no-such-branch", local_dir=d, endpoint=endpoint
        ),
        "snapshot of missing repo": lambda d: snapshot_download("nobody/none", local_dir=d, endpoint=endpoint),
        "snapshot of missing revision": lambda d: snapshot_download(
            REPO_ID, revision="no-such-branch", local_dir=d, endpoint=endpoint
        ),
        "model_info of missing revision": lambda d: HfApi(endpoint=endpoint).model_info(REPO_ID, revision="nope"),
    }
    for name, action in cases.items():
        print(f"{name} raises: {describe_error(partial(action, fresh(name)))}")
    existing = fresh("existing")
    existing.mkdir(parents=True)
    (existing / "leftover.txt").write_text("from an earlier download\n", encoding="utf-8")
    outcome = describe_error(lambda: snapshot_download("nobody/none", local_dir=existing, endpoint=endpoint))
    print(f"snapshot of missing repo into a non-empty local_dir raises: {outcome}")


ENV_PROBE = """
import os, sys
when = sys.argv[1]
if when == "before":
    os.environ["HF_ENDPOINT"] = sys.argv[2]
import huggingface_hub
from huggingface_hub import constants, hf_hub_download
if when == "after":
    os.environ["HF_ENDPOINT"] = sys.argv[2]
print(constants.ENDPOINT)
if when == "before":
    hf_hub_download(sys.argv[3], "config.json", local_dir=sys.argv[4])
"""


def check_env_endpoint(endpoint: str, local_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "HF_ENDPOINT"}
    for when in ("before", "after"):
        command = [sys.executable, "-c", ENV_PROBE, when, endpoint, REPO_ID, str(local_dir)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=120)
        seen = result.stdout.strip().splitlines()[:1]
        print(f"HF_ENDPOINT set {when} import: constants.ENDPOINT={seen}, exit code {result.returncode}")
    print(f"  download via HF_ENDPOINT worked: {(local_dir / 'config.json').exists()}")


def check_range(endpoint: str) -> None:
    url = f"{endpoint}/{REPO_ID}/resolve/main/config.json"
    response = httpx.get(url, headers={"Range": "bytes=0-9"}, trust_env=False)
    print(f"Range bytes=0-9 -> HTTP {response.status_code}, {len(response.content)} bytes")


def incomplete_path(local_dir: Path, filename: str, etag: str) -> Path:
    # Mirrors huggingface_hub._local_folder.LocalDownloadFilePaths.incomplete_path.
    metadata_name = f"{filename}.metadata"
    short = base64.urlsafe_b64encode(hashlib.sha1(metadata_name.encode()).digest()).decode()
    return local_dir / ".cache" / "huggingface" / "download" / f"{short}.{etag}.incomplete"


def check_resume(endpoint: str, model_dir: Path, local_dir: Path) -> None:
    filename = files_for_layers(model_dir, range(0, 1))[0]
    url = hf_hub_url(REPO_ID, filename, endpoint=endpoint)
    etag = get_hf_file_metadata(url, endpoint=endpoint).etag
    partial = incomplete_path(local_dir, filename, str(etag))
    partial.parent.mkdir(parents=True, exist_ok=True)
    # Garbage bytes: a download that resumed from them would fail the hash check.
    partial.write_bytes(b"\0" * 4096)
    path = Path(hf_hub_download(REPO_ID, filename, local_dir=local_dir, endpoint=endpoint))
    intact = sha256_file(path) == sha256_file(model_dir / filename)
    print(f"resume: planted {partial.relative_to(local_dir)}")
    print(f"  after download: content intact (partial ignored): {intact}, planted file left behind: {partial.exists()}")


def check_bench(target_mb: int, root: Path, endpoint: str) -> None:
    bench_dir = root / "bench-model"
    with step(f"build bench model (~{target_mb} MB)"):
        make_bench_model(bench_dir, target_mb)
    size = sum(path.stat().st_size for path in bench_dir.iterdir())
    print(f"bench model: {size / 1e6:.0f} MB, config {json.loads((bench_dir / 'config.json').read_text())}")
    with step("publish bench model"):
        publish_model(bench_dir, root / "mirrors", BENCH_REPO_ID)
    local_dir = root / "bench-download"
    with step("snapshot_download bench model"):
        snapshot_download(BENCH_REPO_ID, local_dir=local_dir, endpoint=endpoint)
    names = downloaded_files(bench_dir)
    print(f"bench download sha256 match: {same_files(bench_dir, local_dir, names)}")
    compare_rechunking(root, endpoint, bench_dir)


def describe_command(command: list[str]) -> str:
    shown = ["<rechunking launcher>" if "\n" in part else part for part in command]
    return " ".join(shown)


def time_shard_download(endpoint: str, filename: str, local_dir: Path) -> float:
    started = time.perf_counter()
    hf_hub_download(BENCH_REPO_ID, filename, local_dir=local_dir, endpoint=endpoint)
    return time.perf_counter() - started


def compare_rechunking(root: Path, endpoint: str, bench_dir: Path) -> None:
    filename = files_for_layers(bench_dir, range(1, 2))[0]
    megabytes = (bench_dir / filename).stat().st_size / 1e6
    patched = time_shard_download(endpoint, filename, root / "bench-patched")
    with HubMirror(root / "mirrors", root / "olah-vanilla", rechunk=False) as vanilla:
        plain = time_shard_download(vanilla.endpoint, filename, root / "bench-vanilla")
    print(f"one {megabytes:.0f} MB shard: rechunked olah {megabytes / patched:.0f} MB/s, ", end="")
    print(f"unmodified olah {megabytes / plain:.0f} MB/s")


def run_checks(root: Path, bench_mb: int) -> None:
    model_dir = root / "tiny-model"
    with step("build tiny model"):
        make_tiny_model(model_dir)
    with step("mlx_lm load + 2x greedy generate"):
        check_generation(model_dir)
    with step("publish tiny model"):
        repo = publish_model(model_dir, root / "mirrors", REPO_ID)
    print(f"published {REPO_ID} at {repo} (commit {head_commit(repo)})")
    mirror = HubMirror(root / "mirrors", root / "olah")
    with step("start mirror"):
        mirror.start()
    print(f"mirror at {mirror.endpoint}; olah command: {describe_command(mirror.command())}")
    print(f"olah config:\n{mirror.config_path.read_text(encoding='utf-8')}")
    try:
        run_mirror_checks(mirror.endpoint, model_dir, root, bench_mb)
    finally:
        with step("stop mirror"):
            mirror.stop()


def run_mirror_checks(endpoint: str, model_dir: Path, root: Path, bench_mb: int) -> None:
    with step("snapshot_download (subset)"):
        check_snapshot(endpoint, model_dir, root / "download-snapshot")
    with step("model_info / list_repo_tree"):
        check_model_info(endpoint, model_dir)
    with step("hf_hub_download"):
        check_single_file(endpoint, model_dir, root / "download-single")
    with step("error cases"):
        check_errors(endpoint, root / "download-errors")
    with step("HF_ENDPOINT environment"):
        check_env_endpoint(endpoint, root / "download-env")
    check_range(endpoint)
    check_resume(endpoint, model_dir, root / "download-resume")
    if bench_mb > 0:
        check_bench(bench_mb, root, endpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench-mb", type=int, default=0, help="also build, publish and download a model this big")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run_checks(args.keep.resolve(), args.bench_mb)
        return
    with tempfile.TemporaryDirectory(prefix="shardline-support-") as root:
        run_checks(Path(root), args.bench_mb)


if __name__ == "__main__":
    main()
