"""PreviewStore: the tile-preview PNG files of one UI process, and when they go away.

The files live in one folder inside Gradio's cache folder, so Gradio serves them as they are
(no copy of its own). A file is named by the image's content and its plan (the same picture is
reused), and owned by the chat sessions that showed it: a session's files are deleted when its
chat is cleared or its tab is closed (unless another session shows the same file), every file
`ttl_s` after it was written, and the whole folder when the UI stops. Folders left behind by a UI
process that was killed are removed when the next one starts. Thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "ivl-ui-previews-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(root: Path) -> int:
    """Preview folders of UI processes that no longer run (named ivl-ui-previews-<pid>-...)."""
    removed = 0
    for folder in root.glob(f"{PREFIX}*"):
        pid = folder.name.removeprefix(PREFIX).split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class PreviewStore:
    def __init__(self, root: Path, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        root.mkdir(parents=True, exist_ok=True)
        if remove_stale_folders(root):
            log.info("removed tile-preview folders of UI processes that are gone")
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._owners: dict[str, set[str]] = {}  # file name -> sessions that showed it
        self._written: dict[str, float] = {}  # file name -> when
        self._last_sweep = clock()

    def _path(self, key: str) -> Path:
        return self.folder / f"tiles-{key}.png"

    def get(self, key: str, session: str) -> str | None:
        """The file for key if it is still there (now also owned by session)."""
        self.sweep_if_due()
        path = self._path(key)
        with self._lock:
            if path.name not in self._written or not path.exists():
                return None
            self._owners.setdefault(path.name, set()).add(session)
        return str(path)

    def put(self, key: str, png: bytes, session: str) -> str:
        """Write the picture for key (atomically) and return its path."""
        path = self._path(key)
        partial = path.with_suffix(f".{threading.get_ident()}.tmp")
        partial.write_bytes(png)
        partial.replace(path)
        with self._lock:
            self._written[path.name] = self._clock()
            self._owners.setdefault(path.name, set()).add(session)
        return str(path)

    def release(self, session: str) -> int:
        """The chat of `session` was cleared or closed: delete the files no other session shows."""
        with self._lock:
            gone = []
            for name, owners in self._owners.items():
                if session in owners:
                    owners.discard(session)
                    if not owners:
                        gone.append(name)
            for name in gone:
                self._forget(name)
        return len(gone)

    def sweep_if_due(self) -> int:
        now = self._clock()
        if now - self._last_sweep < min(60.0, self.ttl_s / 4):
            return 0
        return self.sweep()

    def sweep(self) -> int:
        """Delete every file written more than ttl_s ago."""
        now = self._clock()
        with self._lock:
            self._last_sweep = now
            old = [name for name, written in self._written.items() if now - written > self.ttl_s]
            for name in old:
                self._forget(name)
        return len(old)

    def _forget(self, name: str) -> None:  # with the lock held
        self._owners.pop(name, None)
        self._written.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("tiles-*.png"))

    def close(self) -> None:
        """The UI stops: the whole folder goes."""
        with self._lock:
            self._owners.clear()
            self._written.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
