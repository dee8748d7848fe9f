"""Atomic file writing: a killed run never leaves a half-written file under its final name."""
import contextlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_UMASK = os.umask(0)  # read once at import: os.umask is process-wide and not safe to call from threads
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def folder_problem(path):
    """Why files cannot be written under the folder `path`, or None: a file stands where it or a folder above it
    would be, or the nearest existing folder above it cannot be written."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                return f"{candidate} is a file, not a folder" if candidate.exists() else f"{candidate} is a broken link"
            if not os.access(candidate, os.W_OK | os.X_OK):
                return f"{candidate} cannot be written to"
            return None
    return None


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class BackgroundWriter:
    """Runs file-writing calls on worker threads (PNG encoding releases the GIL) so the device can go on.

    Leaving the `with` block waits for every write and re-raises the first failure.
    """

    def __init__(self, workers=4, max_pending=256):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending, self.max_pending = [], max_pending

    def submit(self, function, *args):
        self.pending.append(self.pool.submit(function, *args))
        if len(self.pending) > self.max_pending:  # bound the memory held by queued images
            self.pending.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)
        return False
