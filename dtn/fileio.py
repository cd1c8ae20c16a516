"""Output files written whole or not at all, their temp files and write errors; packaged-file lookup
and YAML reading with errors that name the file.

Writes go to a temp file in the target's folder (created with the user's umask, its name holding
the writer's pid), are fsynced, then renamed over the target: a crash or a full disk never leaves a
torn file, the last good file stays as it was, and a failed write removes its temp file. Temp files
of killed writers are removed by the next run (:func:`clean_stale_temps`). An OS error while writing
becomes a :class:`FileWriteError` naming the file and the reason.

This module imports nothing from ``dtn`` (config, checkpoints, export and the analyses all write
through it); torch only inside :func:`atomic_save`, PyYAML only inside :func:`read_yaml`.
"""
from __future__ import annotations

import errno
import os
import secrets
from typing import Any, Callable

__all__ = ["FileWriteError", "open_temp", "atomic_write", "atomic_save", "atomic_write_text", "atomic_write_bytes",
           "atomic_write_all", "pid_alive", "clean_stale_temps", "ensure_writable", "find_named_file", "read_yaml"]


class FileWriteError(OSError):
    """An output file that could not be written; the message names the file and the reason."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message, self.errno = message, code

    def __str__(self) -> str:
        return self.message


# ---- temp files ------------------------------------------------------------------------------
def _temp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def open_temp(path: str):
    """A new temp file beside ``path``, mode 0666 less the umask (as a plain open would create)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return fd, tmp


def _remove_quietly(path: str | None) -> None:
    if path is not None and os.path.exists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str, names=None) -> list[str]:
    """Remove the temp files that killed writers left in ``folder`` (``.<name>.<pid>.<hex>.tmp`` of a
    process that no longer runs, or the older ``.<name>.<random>.tmp``); ``names`` limits it to
    temp files of those targets. Returns the removed paths."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(".") and entry.endswith(".tmp")):
            continue
        if names is not None and not any(entry.startswith(f".{n}.") for n in names):
            continue
        parts = entry[1:-4].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            pid = int(parts[1])
            if pid == os.getpid() or pid_alive(pid):
                continue  # this process or another live one is writing it
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except OSError:
            pass
    return removed


# ---- atomic writes -----------------------------------------------------------------------------
class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a failed write as
    a RuntimeError of its zip writer, which hides the reason (e.g. no space left on device)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, b):
        try:
            return self.fh.write(b)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        return self.fh.flush()


def _write_failed(path: str, exc: OSError) -> FileWriteError:
    reason = exc.strerror or str(exc)
    return FileWriteError(f"{path}: cannot write ({reason})", exc.errno)


def _write_temp(path: str, write: Callable) -> str:
    """``write(fh)`` into a new temp file beside ``path``, flushed and fsynced; returns the temp file's
    path. On failure the temp file is removed and the error raised (the OSError of a failed write
    that ``write`` reported as a RuntimeError, as torch.save does)."""
    fd, tmp = open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            rec = _RecordingWriter(fh)
            try:
                write(rec)
            except RuntimeError:
                if rec.error is not None:
                    raise rec.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def atomic_write(path: str, write: Callable) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync, rename over ``path``. On any failure
    the temp file is removed and ``path`` is left as it was; OS errors become a FileWriteError
    naming ``path``."""
    tmp = None
    try:
        tmp = _write_temp(path, write)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if isinstance(exc, FileWriteError):
            raise
        raise _write_failed(path, exc) from None
    finally:
        _remove_quietly(tmp)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_bytes(data: bytes, path: str) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_all(files: dict[str, bytes]) -> None:
    """Write several files as one step: each to a temp file beside it first; only when every one is
    written are they renamed into place. A failure (e.g. a full disk) removes the temp files and leaves
    the files already there (an earlier export) as they were."""
    staged: list[tuple[str, str]] = []
    current = next(iter(files), "")
    try:
        for path, data in files.items():
            current = path
            staged.append((_write_temp(path, lambda fh, data=data: fh.write(data)), path))
    except BaseException as exc:
        for tmp, _ in staged:
            _remove_quietly(tmp)
        if not isinstance(exc, OSError) or isinstance(exc, FileWriteError):
            raise
        raise FileWriteError(f"{current}: cannot write ({exc.strerror or exc}); the files already in "
                             f"{os.path.dirname(current)} are unchanged", exc.errno) from None
    for tmp, path in staged:
        os.replace(tmp, path)


def ensure_writable(folder: str, what: str = "output folder", keep: bool = True) -> None:
    """Check that a file can be created in ``folder`` (before any work that would otherwise be lost when
    the first write fails). ``keep``: leave the folder created; else the folders this check had to create
    are removed again, so a command refused later (bad data, a bad checkpoint) leaves no empty folder
    behind (the first write creates it)."""
    created = []
    try:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise FileWriteError(f"{what} {folder}: exists and is not a folder", errno.ENOTDIR)
        probe = os.path.abspath(folder)
        while not os.path.exists(probe):
            created.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = open_temp(os.path.join(folder, ".write-check"))
        os.close(fd)
        os.unlink(tmp)
    except FileWriteError:
        raise
    except OSError as exc:
        raise FileWriteError(f"{what} {folder}: cannot write there ({exc.strerror or exc})", exc.errno) from None
    finally:
        if not keep:
            for d in created:  # deepest first
                try:
                    os.rmdir(d)
                except OSError:
                    break


# ---- packaged files ------------------------------------------------------------------------------
def find_named_file(name_or_path: str, folder: str, what: str, packaged: str) -> str:
    """``name_or_path`` if such a file exists, else ``<folder>/<name_or_path>.yaml`` (a file packaged
    with dtn, named without its ending); FileNotFoundError naming both and listing the packaged names
    otherwise. ``what`` names the kind of file ("config"), ``packaged`` the packaged one ("config",
    "one")."""
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(folder, f"{name_or_path}.yaml")
    if os.path.exists(path):
        return path
    known = sorted(p[:-5] for p in os.listdir(folder) if p.endswith(".yaml")) if os.path.isdir(folder) else []
    raise FileNotFoundError(f"no {what} file {name_or_path!r} and no packaged {packaged} of that name; packaged: {known}")


def read_yaml(path: str, error: type[Exception] = ValueError, prefix: str = ""):
    """The YAML document in ``path``, ``{}`` for an empty file; a file that is not valid YAML (or not
    UTF-8) raises ``error("<prefix><path>: not a valid YAML file (<reason>)")``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{prefix}{path}: not a valid YAML file ({' '.join(str(exc).split())})") from None
