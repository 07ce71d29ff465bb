"""Durable, atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A written file gets the mode a plain `open(path, "w")` would give (0644 under umask 022), not the
0600 of the temp file it starts as.

Temp files are named `.<target>.sft-<host>-<pid>-<random>.tmp`, so the files a killed writer left
behind can be told from those a live one is writing: `remove_stale_temp_files` deletes those of a
process of this host that is gone (once a minute old: a writer in another PID namespace with the
same host name is not fooled into losing a file it is still writing), and any older than an hour
(another host's writer cannot be asked).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"
_TEMP_RE = re.compile(r"\..+\.sft-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+\.tmp")
STALE_AFTER_SECONDS = 3600  # a temp file of another host's writer is stale after this long
GONE_WRITER_GRACE_SECONDS = 60  # a temp file of a process of this host that is gone, after this long


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (`os.umask` alone must set one)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes | memoryview, tmp_dir: Path | None = None) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp_dir = Path(tmp_dir) if tmp_dir is not None else path.parent
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=f".{path.name}.sft-{_HOST}-{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def give_umask_mode(directory: Path) -> None:
    """Give the files in `directory` the mode the umask gives: for what another library wrote there
    (transformers' `save_pretrained` writes its weights 0600, whatever the umask)."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _writer_is_gone(host: str, pid: int) -> bool:
    if host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # alive (another user's), or no PID at all
        return False
    return False


def remove_stale_temp_files(directory: Path, stale_after: float = STALE_AFTER_SECONDS,
                            only_ours: bool = True) -> list[Path]:
    """Delete the temp files killed writers left in `directory`: a minute after their process (on this host)
    is gone, otherwise once older than `stale_after` seconds. `only_ours=False` (a folder of temp files
    only, such as the store's) also deletes files of other names once that old. Return what was deleted."""
    removed, now = [], time.time()
    for path in Path(directory).iterdir():
        match = _TEMP_RE.fullmatch(path.name)
        if match is None and only_ours:
            continue
        try:  # the writer may rename or delete its file meanwhile
            age = now - path.stat().st_mtime
            gone = match is not None and _writer_is_gone(match["host"], int(match["pid"]))
            if age > stale_after or (gone and age > GONE_WRITER_GRACE_SECONDS):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed
