"""The child process that moves a download's bytes (`python -m activities.fetch` < spec.json).

A separate process so that cancel can stop a transfer at once (a thread cannot be killed), and so
that it dies with the node worker: it exits when its parent does, leaving only resumable partials.
"""

import json
import os
import sys

from shardline.lifeline import hold


def main() -> int:
    spec = json.load(sys.stdin)
    hold(os.getppid())  # first: importing the hub client takes a while

    from huggingface_hub import snapshot_download

    from activities.hub import DEFAULT_TIMEOUT_S, bound_hub_calls

    bound_hub_calls(spec.get("timeout_s", DEFAULT_TIMEOUT_S))

    try:
        snapshot_download(
            spec["repo_id"],
            revision=spec["revision"],
            local_dir=spec["local_dir"],
            allow_patterns=spec["files"],
            max_workers=spec.get("max_workers", 8),
        )
    except Exception as exc:  # noqa: BLE001 - every failure goes to the parent as (kind, sentence)
        from activities.errors import classify  # only now: it imports temporalio, 0.2 s a transfer need not pay

        kind, message = classify(exc, spec["repo_id"])
        print(json.dumps({"kind": kind, "message": message}), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
