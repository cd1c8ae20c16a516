"""Checkpoints: the checkpoint format, fingerprints and their checks.

Checkpoints are written whole or not at all by :mod:`dtn.fileio` (whose writers are re-exported
here: ``atomic_save``, ``atomic_write_text``, ``FileWriteError``, ...). Whether a checkpoint can be
resumed under a config is :mod:`dtn.train.resume`'s question (it needs the config's defaults; this
module does not import :mod:`dtn.config`).

A checkpoint (format 2) is a dict holding, besides the weights::

    format, dtn_version, code_version   which code wrote it
    model_name, config, schema          what model it is
    encoder, fingerprint.encoder        the fitted feature encoders and their digest
    fingerprint.data                    where the data came from: each file's SHA-256, the
                                        split and schema settings (:func:`dtn.data.source_fingerprint`)

``dtn evaluate``, ``dtn export`` and ``dtn train --resume`` check these and say what differs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import zipfile
from typing import Any

import torch

# the file writers live in dtn.fileio; imported here under their old names for the callers that use them
from ..fileio import (FileWriteError, atomic_save, atomic_write, atomic_write_bytes, atomic_write_text,  # noqa: F401
                      clean_stale_temps, ensure_writable, open_temp, pid_alive)

CHECKPOINT_FORMAT = 2
class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what it is used for; the message names the
    file and what differs."""


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
        from ..data.table_reader import first_sentence

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


# moved to dtn.train.resume (they need dtn.config, which this module does not import); the old names still
# resolve here, loaded on first use
_MOVED_TO_RESUME = ("RESUMABLE", "with_defaults", "check_resume")


def __getattr__(name: str):
    if name in _MOVED_TO_RESUME:
        from . import resume

        return getattr(resume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
