"""Files on local disk or object storage, through pyarrow filesystems.

Every path in a config may be a local path or a URI (`s3://bucket/key`,
`gs://...`, `file:///...`). Object stores configure themselves the standard way
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... in the environment).

Commits are atomic: a file is written under a temporary name next to its
target and then renamed (a copy + delete on object stores, where readers never
see a partial object). Completion markers are written last, so a reader that
sees a marker sees every file the marker names.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import uuid
from functools import lru_cache

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@lru_cache(maxsize=32)
def _filesystem_for(scheme_and_authority: str, endpoint: str | None = None) -> pafs.FileSystem:
    # Cached per bucket and S3 endpoint: a process whose AWS_ENDPOINT_URL changes (a test
    # session with a new S3 server, say) must not keep talking to the old endpoint.
    if scheme_and_authority.startswith("s3://") and endpoint:
        # pyarrow reads AWS_ENDPOINT_URL itself only in some versions: be explicit.
        scheme, _, host = endpoint.rpartition("://")  # a bare host:port means https, like the AWS SDKs
        return pafs.S3FileSystem(endpoint_override=host, scheme=scheme or "https",
                                 region=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))
    fs, _ = pafs.FileSystem.from_uri(scheme_and_authority + "/")
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
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_input(path: str):
    """A binary, sequential input stream (no decompression: callers choose)."""
    fs, p = resolve(path)
    return fs.open_input_stream(p, compression=None)


def open_random_access(path: str):
    fs, p = resolve(path)
    return fs.open_input_file(p)


def size(path: str) -> int:
    fs, p = resolve(path)
    return fs.get_file_info(p).size


def listdir(path: str) -> list[str]:
    """Base names of the entries in a directory ([] if it is not one)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p)))


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob with `*`, `?`, `[]` and `**`, locally or on object storage."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern] if exists(pattern) else []
    prefix = "" if not is_uri(pattern) else pattern.split("://", 1)[0] + "://"
    fs, p = resolve(pattern)
    parts = p.split("/")
    first_wild = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = "/".join(parts[:first_wild]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    recursive = "**" in parts or len(parts) - first_wild > 1
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    regex = fnmatch.translate(p.replace("**/", "\0").replace("**", "\0")).replace("\x00", ".*")
    matcher = re.compile(regex)
    found = [i.path for i in infos if i.type == pafs.FileType.File and matcher.match(i.path)]
    return sorted(prefix + f for f in found)


def write_atomic(path: str, data: bytes) -> str:
    """Write `data` to `path` atomically; returns its sha256 (hex)."""
    fs, p = resolve(path)
    parent = posixpath.dirname(p)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(p)}")
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
    return hashlib.sha256(data).hexdigest()


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

