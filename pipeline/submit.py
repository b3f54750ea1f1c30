"""Submit a tokenmill config to a Ray cluster through the Ray Jobs API.

`submit_job` uploads the project (the runtime_env `working_dir`, minus the virtualenv,
runs, tests and caches) together with the config, runs
`python -m jobs.run <config> --set ...` on the cluster, and, with `wait`, streams the
job's logs here until it ends: exit code 0 for SUCCEEDED, 1 otherwise.

The upload is a temporary directory of symlinks to the project's top-level entries, so
a config that lives outside the project travels too (copied to `_submitted/`) without
copying or touching the project tree; Ray's packager follows the links. A config inside
the project keeps its relative path, so paths relative to it still resolve.

Token authentication: a cluster with token auth answers 401 without a token. Ray 2.60's
client sends its token only when RAY_AUTH_MODE=token is set on the client too
(RAY_AUTH_TOKEN alone is ignored, measured), so this module sends
`Authorization: Bearer <token>` itself whenever it finds one, where Ray looks:
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. The last matters locally: in
Ray 2.60 `ray.init()` turns token auth on by default and writes ~/.ray/auth_token, and
`ray start` without RAY_AUTH_MODE then enables token auth whenever that file exists.

The CLI wires it in one line: `add_submit_arguments(subparsers.add_parser("submit"))`
registers the arguments and sets `func=main`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Not uploaded: top-level paths of the project, and patterns anywhere (gitignore syntax,
# as Ray's `excludes` take them). Ray honours the project's .gitignore as well.
EXCLUDED_TOP_LEVEL = [".venv", "runs", ".git", "benchmarks/.cache", "tests", "build"]
UPLOAD_EXCLUDES = [f"/{p}" for p in EXCLUDED_TOP_LEVEL] + [
    "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]
SUBMITTED_CONFIG_DIR = "_submitted"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class SubmitError(RuntimeError):
    """A submission the user can fix: bad path, unreachable cluster, missing token."""


def submit_job(*, address: str, config_path: str, overrides: list[str], wait: bool = True,
               runtime_env_extra: dict | None = None, job_id: str | None = None,
               project_root: str | Path | None = None) -> int:
    """Submit `python -m jobs.run CONFIG --set ...` to the Jobs API at `address`.

    `address` is the dashboard URL (http://HEAD:8265); it wins over RAY_ADDRESS and
    RAY_API_SERVER_ADDRESS, which Ray's client would otherwise let override it.
    `overrides` are `key=value` strings passed on as `--set`. `runtime_env_extra` is
    merged into the runtime_env (`excludes` are appended; `working_dir` is not allowed:
    use `project_root`, the directory uploaded, default this checkout).
    Returns the exit code: 0 for SUCCEEDED (or submitted, with `wait=False`), 1 otherwise.
    Raises SubmitError for problems the user can fix.
    """
    root = Path(project_root or PROJECT_ROOT).resolve()
    config = Path(config_path).resolve()
    if not config.is_file():
        raise SubmitError(f"config file not found: {config_path}")
    for item in overrides:
        if "=" not in item:
            raise SubmitError(f"--set {item!r}: expected key=value")
    extra = dict(runtime_env_extra or {})
    if "working_dir" in extra:
        raise SubmitError("runtime_env_extra may not set working_dir; pass project_root instead")

    # Ray logs each ignored .gitignore at INFO while packaging; the upload itself is logged.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    client = _connect(address)
    with _upload_dir(root, config) as (upload_dir, config_arg):
        entrypoint = shlex.join(["python", "-m", "jobs.run", config_arg]
                                + [arg for item in overrides for arg in ("--set", item)])
        runtime_env = {**extra, "working_dir": str(upload_dir),
                       "excludes": UPLOAD_EXCLUDES + list(extra.get("excludes", []))}
        submission_id = _call(address, client.submit_job, entrypoint=entrypoint,
                              runtime_env=runtime_env, submission_id=job_id,
                              metadata={"tokenmill_config": config.name})
    print(f"submitted job {submission_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} --follow {submission_id}")
        return 0

    try:
        asyncio.run(_stream_logs(client, submission_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {submission_id} keeps running "
              f"(ray job stop --address {address} {submission_id})", file=sys.stderr)
        return 130
    info = _wait_until_done(client, submission_id)
    # The message of a failed job goes on with its last logs, already streamed above.
    message = (info.message or "").split(", last available logs")[0].split("\n")[0]
    print(f"job {submission_id} {info.status}: {message}", flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def _auth_headers() -> dict[str, str] | None:
    """Bearer header from RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and token_path:
        try:
            token = Path(token_path).read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={token_path}: cannot read the token ({e})") from e
    default_path = Path.home() / ".ray" / "auth_token"
    if not token and default_path.is_file():
        token = default_path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else None


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS, which Ray's client prefers to its argument."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _connect(address: str) -> JobSubmissionClient:
    with _explicit_address():
        return _call(address, JobSubmissionClient, address, headers=_auth_headers())


def _call(address: str, fn, *args, **kwargs):
    """Run a Jobs API call, turning auth and connection failures into SubmitError."""
    try:
        return fn(*args, **kwargs)
    except AuthenticationError as e:
        if "Authentication required" in str(e):  # HTTP 401
            raise SubmitError(
                f"the Ray cluster at {address} requires a token (HTTP 401): set RAY_AUTH_TOKEN "
                "to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it") from e
        raise SubmitError(
            f"the Ray cluster at {address} rejected the token (HTTP 403): check that RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (the first set) holds the cluster's token") from e
    except ConnectionError as e:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: is the head running and its "
            "dashboard port (8265 by default) reachable from here?") from e


@contextlib.contextmanager
def _upload_dir(root: Path, config: Path) -> Iterator[tuple[Path, str]]:
    """Yield (directory to upload, config path relative to it)."""
    if not (root / "jobs").is_dir():
        raise SubmitError(f"{root} has no jobs/ package: run from a tokenmill checkout")
    with tempfile.TemporaryDirectory(prefix="tokenmill-submit-") as tmp:
        upload = Path(tmp)
        for entry in root.iterdir():
            (upload / entry.name).symlink_to(entry)
        relative = config.relative_to(root).as_posix() if config.is_relative_to(root) else None
        if relative and not any(relative.startswith(f"{p}/") for p in EXCLUDED_TOP_LEVEL):
            config_arg = relative
        else:
            (upload / SUBMITTED_CONFIG_DIR).mkdir()
            shutil.copyfile(config, upload / SUBMITTED_CONFIG_DIR / config.name)
            config_arg = f"{SUBMITTED_CONFIG_DIR}/{config.name}"
        yield upload, config_arg


async def _stream_logs(client: JobSubmissionClient, submission_id: str) -> None:
    try:
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except RuntimeError as e:  # the log websocket dropped; the status poll below still works
        print(f"log stream ended early ({e}); waiting for the job to finish", file=sys.stderr)


def _wait_until_done(client: JobSubmissionClient, submission_id: str, poll_s: float = 1.0):
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def add_submit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `CONFIG [--address URL] [--set key=value ...] [--no-wait] [--job-id ID]`; func=main."""
    parser.add_argument("config", help="pipeline config YAML (inside or outside the project)")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                        help="Ray Jobs API address, http://HEAD:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set run_dir=s3://bucket/runs/x)")
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="print the job id and return instead of streaming the logs")
    parser.add_argument("--job-id", help="submission id (default: generated by Ray)")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        return submit_job(address=args.address, config_path=args.config, overrides=args.overrides,
                          wait=args.wait, job_id=args.job_id)
    except SubmitError as e:
        print(f"tokenmill submit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(add_submit_arguments(argparse.ArgumentParser(prog="tokenmill submit")).parse_args()))
