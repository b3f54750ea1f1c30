"""Files on local disk or object storage, through pyarrow filesystems.

Every path in a config may be a local path or a URI (`s3://bucket/key`,
`gs://...`, `file:///...`). Object stores configure themselves the standard way
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... in the environment).

Commits are atomic: a file is written under a temporary name next to its
target and then renamed (a copy + delete on object stores, where readers never
see a partial object). Completion markers are written last, so a reader that
sees a marker sees every file the marker names.

While the executor runs one item, `recording(run_dir)` notes every file the item commits
under run_dir (path relative to run_dir, bytes, sha256) and every run_dir file it reads:
the item's marker carries them, so a re-run verifies what it skips and knows which item
produced a missing input (pipeline/integrity.py).

Errors: a full disk raises `StorageError` (errno ENOSPC) naming the file, after removing the
temporary; object stores retry throttling, 5xx and dropped connections with backoff
(`S3_MAX_ATTEMPTS`), and a permanent refusal (403, a missing bucket) raises `StorageError`
naming the path at once.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import posixpath
import re
import uuid
from functools import lru_cache

import pyarrow.fs as pafs

# Attempts per object-store request (AWS standard retry mode: exponential backoff with jitter,
# retrying throttling such as 503 SlowDown, 500s and dropped connections; not 403 or 404).
S3_MAX_ATTEMPTS = 10


class StorageError(OSError):
    """A storage failure with a message that names the path and what to do (disk full,
    access denied, no such bucket). `errno` as in OSError."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


_PERMANENT = (  # (text in pyarrow's message, what it means) for object-store errors never retried
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("Bucket does not exist", "the bucket does not exist"),
    ("not found. To create buckets", "the bucket does not exist"),
    ("ACCESS_DENIED", "access denied (HTTP 403): check the credentials and the bucket policy"),
    ("HTTP status 403", "access denied (HTTP 403): check the credentials and the bucket policy"),
    ("InvalidAccessKeyId", "access denied: the access key is not known to the store"),
    ("SignatureDoesNotMatch", "access denied: the secret key does not match"),
)


def _storage_errors(path: str):
    """Turn a permanent object-store refusal into a StorageError naming `path`."""
    @contextlib.contextmanager
    def guard():
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            if is_uri(path) and not path.startswith("file://"):  # a missing key, or a missing bucket?
                fs, p = resolve(path)
                bucket = p.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(errno.ENOENT, f"{path}: the bucket {bucket!r} does not exist") from None
            raise
        except OSError as e:
            if is_uri(path):
                for needle, meaning in _PERMANENT:
                    if needle in str(e):
                        raise StorageError(errno.EACCES, f"{path}: {meaning} ({str(e).splitlines()[0][:200]})") from None
            raise
    return guard()


# -- what the running item commits and reads (see the module docstring) ----------------------

class CommitRecord:
    """Files one item wrote (`outputs`: relative path -> {bytes, sha256}) and read (`inputs`)
    under `root`; paths are relative to root, '/'-separated."""

    def __init__(self, root: str):
        fs, p = resolve(root)
        self.prefix = p.rstrip("/") + "/"
        self.outputs: dict[str, dict] = {}
        self.inputs: set[str] = set()

    def relative(self, path: str) -> str | None:
        p = resolve(path)[1]
        return p[len(self.prefix):] if p.startswith(self.prefix) else None

    def to_json(self) -> dict:
        return {"outputs": dict(sorted(self.outputs.items())),
                "inputs": sorted(self.inputs - set(self.outputs))}


_RECORDERS: list[CommitRecord] = []  # process-wide: a worker runs one item at a time


@contextlib.contextmanager
def recording(root: str):
    """Record the files committed and read under `root` until the block ends; yields the record."""
    record = CommitRecord(root)
    _RECORDERS.append(record)
    try:
        yield record
    finally:
        _RECORDERS.remove(record)


def _note_write(path: str, size: int, sha256: str) -> None:
    for r in _RECORDERS:
        rel = r.relative(path)
        if rel is not None:
            r.outputs[rel] = {"bytes": size, "sha256": sha256}


def _note_read(path: str) -> None:
    for r in _RECORDERS:
        rel = r.relative(path)
        if rel is not None:
            r.inputs.add(rel)


def is_uri(path: str) -> bool:
    return "://" in path


@lru_cache(maxsize=32)
def _filesystem_for(scheme_and_authority: str, endpoint: str | None = None) -> pafs.FileSystem:
    # Cached per bucket and S3 endpoint: a process whose AWS_ENDPOINT_URL changes (a test
    # session with a new S3 server, say) must not keep talking to the old endpoint.
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    if scheme_and_authority.startswith("s3://") and endpoint:
        # pyarrow reads AWS_ENDPOINT_URL itself only in some versions: be explicit.
        scheme, _, host = endpoint.rpartition("://")  # a bare host:port means https, like the AWS SDKs
        return pafs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", retry_strategy=retry,
                                 region=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))
    with _storage_errors(scheme_and_authority):
        fs, _ = pafs.FileSystem.from_uri(scheme_and_authority + "/")
    if isinstance(fs, pafs.S3FileSystem):  # from_uri found the bucket's region; add the retries
        return pafs.S3FileSystem(region=fs.region, retry_strategy=retry)
    return fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if is_uri(path) and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        bucket = rest.split("/", 1)[0]
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None
        return _filesystem_for(f"{scheme}://{bucket}", endpoint), rest.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    with _storage_errors(path):
        return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    with _storage_errors(path):
        fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    _note_read(path)
    with _storage_errors(path), fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_input(path: str):
    """A binary, sequential input stream (no decompression: callers choose)."""
    fs, p = resolve(path)
    _note_read(path)
    with _storage_errors(path):
        return fs.open_input_stream(p, compression=None)


def open_random_access(path: str):
    fs, p = resolve(path)
    _note_read(path)
    with _storage_errors(path):
        return fs.open_input_file(p)


def file_size(path: str) -> int:
    """Size in bytes of one file (local or object storage)."""
    fs, p = resolve(path)
    return fs.get_file_info(p).size


def remove(path: str) -> None:
    fs, p = resolve(path)
    fs.delete_file(p)


def listdir(path: str) -> list[str]:
    """Base names of the entries in a directory ([] if it is not one)."""
    fs, p = resolve(path)
    with _storage_errors(path):
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p)))


def file_sizes(root: str) -> dict[str, int]:
    """{path relative to root ('/'-separated): bytes} of every file under root, one listing."""
    fs, p = resolve(root)
    with _storage_errors(root):
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return {}
        prefix = p.rstrip("/") + "/"
        return {i.path[len(prefix):]: i.size for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
                if i.type == pafs.FileType.File}


def remove_tree(path: str) -> None:
    """Delete a directory and everything under it (nothing if it does not exist)."""
    fs, p = resolve(path)
    with _storage_errors(path):
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob with `*`, `?`, `[]` and `**`, locally or on object storage."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern] if exists(pattern) else []
    prefix = "" if not is_uri(pattern) else pattern.split("://", 1)[0] + "://"
    fs, p = resolve(pattern)
    parts = p.split("/")
    first_wild = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = "/".join(parts[:first_wild]) or "/"
    recursive = "**" in parts or len(parts) - first_wild > 1
    with _storage_errors(pattern):
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    regex = fnmatch.translate(p.replace("**/", "\0").replace("**", "\0")).replace("\x00", ".*")
    matcher = re.compile(regex)
    found = [i.path for i in infos if i.type == pafs.FileType.File and matcher.match(i.path)]
    return sorted(prefix + f for f in found)


def write_atomic(path: str, data: bytes) -> str:
    """Write `data` to `path` atomically; returns its sha256 (hex).

    On failure the temporary is removed and `path` is untouched; a full disk raises
    StorageError(ENOSPC) naming `path` and the size."""
    fs, p = resolve(path)
    parent = posixpath.dirname(p)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(p)}")
    try:
        with _storage_errors(path):
            fs.create_dir(parent, recursive=True)
            if isinstance(fs, pafs.LocalFileSystem):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
                _fsync_dir(parent)
            else:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                fs.move(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(e.errno, f"no space left on the device writing {path} ({len(data):,} bytes); "
                                        f"free space and run again: finished work is kept") from None
        raise
    sha256 = hashlib.sha256(data).hexdigest()
    _note_write(path, len(data), sha256)
    return sha256


def write_text_atomic(path: str, text: str) -> str:
    return write_atomic(path, text.encode("utf-8"))


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(root: str) -> int:
    """Delete `.tmp-*` files left under root by a killed writer; returns how many."""
    fs, p = resolve(root)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return 0
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
             if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith(".tmp-")]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open_input(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

