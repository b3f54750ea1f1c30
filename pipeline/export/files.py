"""Where one export's files go, and how each is committed (local disk or object storage).

Big files are streamed to a local temporary file (token and mask streams by a `BackgroundFile`
thread, so writing overlaps decoding) and committed whole:

* local output: the temporary sits next to its target (`.tmp-<uuid>-<name>`, so a killed
  export leaves only names that `storage.remove_stale_temporaries` deletes); it is fsynced
  and renamed over the target, then the directory is fsynced;
* object storage: the temporary is in the local temp directory; it is uploaded to a
  temporary key and moved onto the target key, as `storage.write_atomic` does.

Small files (`export.json`, `state.json`, ...) go through `storage.write_atomic`. The export's
own manifest is written last, so a reader that finds it finds every file it names.
"""
from __future__ import annotations

import os
import posixpath
import queue
import shutil
import tempfile
import threading
import uuid

import pyarrow.fs as pafs

from pipeline import storage


class OutputDir:
    """One export's output directory (local path or URI); use as a context manager."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = storage.resolve(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._staging = None if self.is_local else tempfile.mkdtemp(prefix="tokenmill-export-")
        self.files: list[dict] = []  # committed so far: {file, bytes}

    def __enter__(self) -> "OutputDir":
        self.fs.create_dir(self.root, recursive=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    def path(self, name: str) -> str:
        """The final location of `name` (a relative path with `/`)."""
        return storage.join(self.uri, *name.split("/"))

    def temp(self, name: str) -> str:
        """A local path to stream `name` into before `commit`."""
        if self.is_local:
            target = os.path.join(self.root, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            return os.path.join(os.path.dirname(target), f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
        local = os.path.join(self._staging, uuid.uuid4().hex, *name.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return local

    def commit(self, temp_path: str, name: str) -> dict:
        """Move a finished temporary onto `name` atomically; returns {file, bytes}."""
        nbytes = os.path.getsize(temp_path)
        if self.is_local:
            target = os.path.join(self.root, *name.split("/"))
            with open(temp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temp_path, target)
            _fsync_dir(os.path.dirname(target))
        else:
            target = posixpath.join(self.root, name)
            tmp_key = posixpath.join(posixpath.dirname(target), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
            pafs.copy_files(temp_path, tmp_key, destination_filesystem=self.fs)
            self.fs.move(tmp_key, target)
            os.remove(temp_path)
        entry = {"file": name, "bytes": nbytes}
        self.files.append(entry)
        return entry

    def write_small(self, name: str, data: bytes) -> dict:
        storage.write_atomic(self.path(name), data)
        entry = {"file": name, "bytes": len(data)}
        self.files.append(entry)
        return entry

    def remove(self, name: str) -> None:
        path = posixpath.join(self.root, name)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)


class BackgroundFile:
    """A local file written by a thread: `write(buffer)` queues the buffer (no copy; the caller
    must not change it afterwards) and returns, so the page-cache copy of one batch overlaps
    the decoding of the next (file writes release the GIL). At most `depth` buffers wait.
    `close()` waits for the last write and raises the thread's error, if any."""

    def __init__(self, path: str, depth: int = 4):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"export-write-{os.path.basename(path)}")
        self._thread.start()

    def _run(self) -> None:
        while (buffer := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                view = memoryview(buffer).cast("B")
                while view:
                    view = view[os.write(self._fd, view):]
            except BaseException as e:  # raised in the producer by write() or close()
                self._error = e

    def write(self, buffer) -> None:
        if self._error is not None:
            raise OSError(f"{self.path}: write failed: {self._error}") from self._error
        if len(memoryview(buffer)):
            self._queue.put(buffer)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._error is not None:
            raise OSError(f"{self.path}: write failed: {self._error}") from self._error

    def __enter__(self) -> "BackgroundFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

