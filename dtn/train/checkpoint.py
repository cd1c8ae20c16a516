"""Checkpoints and output files: atomic writes, the checkpoint format, fingerprints and their checks.

Writes go to a temp file in the target's folder (created with the user's umask, its name
holding the writer's pid), are fsynced, then renamed over the target: a crash or a full disk
never leaves a torn file, the last good file stays as it was, and a failed write removes its
temp file. Temp files of killed writers are removed by the next run (:func:`clean_stale_temps`).

A checkpoint (format 2) is a dict holding, besides the weights::

    format, dtn_version, code_version   which code wrote it
    model_name, config, schema          what model it is
    encoder, fingerprint.encoder        the fitted feature encoders and their digest
    fingerprint.data                    where the data came from: each file's SHA-256, the
                                        split and schema settings (:func:`dtn.data.source_fingerprint`)

``dtn evaluate``, ``dtn export`` and ``dtn train --resume`` check these and say what differs.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pickle
import secrets
import zipfile
from typing import Any

import torch

CHECKPOINT_FORMAT = 2
# training settings that may change when a run is resumed; every other config key must match
# (the lr schedule's kind and warm-up, train.amp and train.task_weighting may not: the state they left in last.pt
# -- scheduler step, GradScaler scale, learned task weights -- means nothing under other settings)
RESUMABLE = ("train.lr", "train.embedding_lr", "train.weight_decay", "train.grad_clip", "train.epochs", "train.patience", "train.progress",
             "train.num_threads", "train.device", "train.eval_batch_size", "train.min_lr", "train.plateau_factor",
             "train.plateau_patience", "train.log", "data.path", "data.valid_path", "data.test_path",
             # where sharded tables live (not what they compute): a run may resume on another plan
             "model.torchrec.shard", "model.torchrec.sharding", "model.torchrec.memory_budget_mb",
             "model.torchrec.column_shard_dim")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what it is used for; the message names the
    file and what differs."""


class FileWriteError(OSError):
    """An output file that could not be written; the message names the file and the reason."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message, self.errno = message, code

    def __str__(self) -> str:
        return self.message


# ---- fingerprints ----------------------------------------------------------------------------
def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys; tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<12 hex digits>``: the digest of every Python source file of ``dtn`` and
    ``dtn_kernels``, so any change to the code gives another version."""
    import dtn

    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(dtn.__file__)))
    for pkg in ("dtn", "dtn_kernels"):
        for folder, dirs, files in sorted(os.walk(os.path.join(root, pkg))):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return f"{dtn.__version__}+{h.hexdigest()[:12]}"


# config keys that say where the data are or how the run is shown, not what is trained: a run keyed on
# its config (dtn compare's reuse) is the same run whatever they are (the data are keyed on their content)
NOT_IN_RUN_KEY = ("data.path", "data.valid_path", "data.test_path", "train.progress", "train.num_threads", "train.log")


def run_config(config: dict) -> dict:
    """``config`` (a Config.to_dict()) without the keys of :data:`NOT_IN_RUN_KEY`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in NOT_IN_RUN_KEY:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def data_key(fingerprint: dict | None) -> str:
    """Digest of a data source fingerprint without the file paths: the same files moved elsewhere match."""
    if not fingerprint:
        return digest(fingerprint)
    files = [{k: v for k, v in f.items() if k != "path"} for f in fingerprint.get("files", [])]
    return digest({**fingerprint, "files": files})


def run_key(config: dict, data_fingerprint: dict | None, encoder_fp: str | None, code: str | None) -> dict:
    """What ``dtn compare`` keys the reuse of a finished run on: its config (less :data:`NOT_IN_RUN_KEY`),
    its data (:func:`data_key`), its encoders' digest and the code version."""
    return {"config": digest(run_config(config)), "data": data_key(data_fingerprint), "encoder": encoder_fp,
            "code": code}


def encoder_fingerprint(encoder) -> str | None:
    """Digest of a fitted encoder's state (schema, vocabularies, statistics, bucket edges)."""
    return None if encoder is None else digest(encoder.state_dict())


def source_diff(old: dict | None, new: dict | None) -> list[str]:
    """What differs between two data source fingerprints, one phrase per difference."""
    if not old or not new:
        return []
    out = []
    if old.get("dataset") != new.get("dataset"):
        return [f"data set {old.get('dataset')!r} -> {new.get('dataset')!r}"]
    files_old = {(f["role"], f["index"]): f for f in old.get("files", [])}
    files_new = {(f["role"], f["index"]): f for f in new.get("files", [])}
    for key in sorted(set(files_old) | set(files_new)):
        a, b = files_old.get(key), files_new.get(key)
        if a is None:
            out.append(f"{key[0]} file {b['path']} is new")
        elif b is None:
            out.append(f"{key[0]} file {a['path']} is gone")
        elif a["sha256"] != b["sha256"]:
            what = "changed since it was trained on" if a["path"] == b["path"] else f"differs from {a['path']} as trained on"
            out.append(f"{key[0]} file {b['path']} {what} (SHA-256 {a['sha256'][:12]}.. -> {b['sha256'][:12]}.., "
                       f"{a['bytes']:,} -> {b['bytes']:,} bytes)")
    for k in sorted(set(old.get("params", {})) | set(new.get("params", {}))):
        va, vb = old.get("params", {}).get(k), new.get("params", {}).get(k)
        if va != vb:
            out.append(f"{k} {va!r} -> {vb!r}" if not isinstance(va, str) or len(va) < 40 else f"{k} differs")
    return out


# ---- writing ---------------------------------------------------------------------------------
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


def atomic_write(path: str, write) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync, rename over ``path``. On any failure
    the temp file is removed and ``path`` is left as it was; OS errors become a FileWriteError
    naming ``path``."""
    tmp = None
    try:
        fd, tmp = open_temp(path)
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
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if isinstance(exc, FileWriteError):
            raise
        raise _write_failed(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_save(obj: Any, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_bytes(data: bytes, path: str) -> None:
    atomic_write(path, lambda fh: fh.write(data))


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


# ---- reading ---------------------------------------------------------------------------------
def read_torch_file(path: str, map_location="cpu"):
    """torch.load with errors that name the file: a missing, empty, truncated or foreign file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (a run folder holds best.pt and last.pt)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: an empty file (0 bytes), not a checkpoint (cut off while being written?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        raise
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError, KeyError,
            AttributeError, ImportError, IndexError, UnicodeDecodeError) as exc:
        from ..data.tabular import first_sentence

        raise CheckpointError(f"{path}: not a readable checkpoint ({size:,} bytes; truncated, damaged or another kind "
                              f"of file: {first_sentence(exc)})") from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A dtn checkpoint written by ``dtn train`` / ``compare`` / ``trim``, checked to be one."""
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_name" not in ckpt or "config" not in ckpt:
        held = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path}: a PyTorch file but not a dtn checkpoint (it holds {held}; a checkpoint has "
                              "model_name, config, model_state)")
    fmt = ckpt.get("format", 1)
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is newer than this dtn reads ({CHECKPOINT_FORMAT}); "
                              f"it was written by dtn {ckpt.get('dtn_version', '?')}")
    ckpt["_path"] = path
    return ckpt


def checkpoint_origin(ckpt: dict) -> str:
    """Which code wrote a checkpoint, for messages."""
    if ckpt.get("format", 1) < 2:
        return "an older dtn (checkpoint format 1, no fingerprints)"
    here = code_version()
    there = ckpt.get("code_version")
    return f"dtn code {there}" + (" (this code)" if there == here else f" (this is {here})")


def check_encoder(ckpt: dict) -> None:
    """The stored encoders must be the ones the checkpoint's fingerprint names."""
    want = (ckpt.get("fingerprint") or {}).get("encoder")
    if want and ckpt.get("encoder") is not None and digest(ckpt["encoder"]) != want:
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')}: its encoder state does not match its fingerprint "
                              "(the file was altered after it was written)")


def with_defaults(config: dict) -> dict:
    """A checkpoint's config dict with the keys that this code added since it was written set to their
    defaults (a new option left at its default is no change to the old run)."""
    from ..config import Config

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for section, defaults in Config().to_dict().items():
        if isinstance(out.get(section), dict):
            for key, value in defaults.items():
                out[section].setdefault(key, value)
    return out


def check_resume(ckpt: dict, model_name: str, config: dict, source: dict | None = None,
                 encoder_fp: str | None = None) -> list[tuple[str, Any, Any]]:
    """Check that ``ckpt`` (a last.pt) can be resumed as ``model_name`` with ``config`` on the data
    ``source`` (both optional: the data are checked once read). Returns the settings that change
    (key, old, new), all in :data:`RESUMABLE`; raises CheckpointError naming what may not change."""
    from ..config import config_diff

    path = ckpt.get("_path", "last.pt")
    if ckpt.get("format", 1) < 2:
        raise CheckpointError(f"{path}: written by {checkpoint_origin(ckpt)}, so what it was trained on cannot be "
                              "checked; start a new run (another --out, or without --resume)")
    if "optimizer_state" not in ckpt:
        raise CheckpointError(f"{path}: holds a model but no training state (a best.pt or trimmed.pt?); "
                              "--resume continues from last.pt")
    if ckpt["model_name"] != model_name:
        raise CheckpointError(f"{path}: holds a {ckpt['model_name']!r} run; it cannot be resumed as {model_name!r} "
                              "(use another --out, or the same --model)")
    diff = config_diff(with_defaults(ckpt["config"]), config)
    fixed = [(k, a, b) for k, a, b in diff if k not in RESUMABLE and k != "model.name"]
    if fixed:
        shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in fixed[:6])
        raise CheckpointError(f"{path}: cannot resume with other settings: {shown}{' ...' if len(fixed) > 6 else ''} "
                              f"(on resume only {', '.join(k for k in RESUMABLE if k.startswith('train.'))} may change; "
                              "use another --out to train with these)")
    if source is not None:
        changed = source_diff((ckpt.get("fingerprint") or {}).get("data"), source)
        if changed:
            raise CheckpointError(f"{path}: cannot resume on other data: {'; '.join(changed[:4])} (a resumed run must "
                                  "see the data it started on; use another --out to train on this data)")
    if encoder_fp is not None:
        want = (ckpt.get("fingerprint") or {}).get("encoder")
        if want and want != encoder_fp:
            raise CheckpointError(f"{path}: the feature encoders differ from the ones it was trained with (ids would "
                                  "mean other values); resume with the checkpoint's encoders")
    return [(k, a, b) for k, a, b in diff if k in RESUMABLE and not k.startswith("data.")]
