"""The error boundary of the ``dtn`` command: an expected failure (bad input, config, checkpoint,
files, the environment) is one line on stderr and exit status 2; ``--debug`` (or DTN_DEBUG=1) shows
the traceback instead; an interruption is exit status 130.
"""
from __future__ import annotations

import os
import sys


# what a user can cause (bad input, config, checkpoint, files, the environment): one line, exit 2;
# anything else is a bug in dtn and keeps its traceback
EXPECTED = (ValueError, OSError, KeyError, RuntimeError, ImportError)


def describe_error(exc: BaseException) -> str:
    """One line for an expected failure: its kind, then the message that names the file, key or value."""
    from ..compare import StaleRunError
    from ..config import ConfigError
    from ..data import DataError, SchemaError
    from ..train import TrainingDivergedError
    from ..train.checkpoint import CheckpointError, FileWriteError

    kinds = ((TrainingDivergedError, "training diverged"), (ConfigError, "config error"), (StaleRunError, "stale run"),
             (SchemaError, "data schema error"), (DataError, "data error"), (CheckpointError, "checkpoint error"),
             (FileWriteError, "write error"), (FileNotFoundError, "not found"), (PermissionError, "permission denied"))
    # never an exception's class name: a failure without a kind of its own is an "error" (a missing optional
    # package says which one to install)
    generic = ((ImportError, "missing package"), (OSError, "file error"), (Exception, "error"))
    kind = next((k for cls, k in kinds + generic if isinstance(exc, cls)), "error")
    if isinstance(exc, OSError) and not isinstance(exc, FileWriteError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        msg = f"{where}{exc.strerror}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]
    else:
        msg = str(exc) or "failed without a message (rerun with --debug for the traceback)"
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the original error's own line
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return f"{kind}: {' '.join(msg.split())}"


def run_command(args) -> int:
    """Run the parsed command ``args.func``; an expected failure is one line and exit status 2."""
    debug = getattr(args, "debug", False) or bool(os.environ.get("DTN_DEBUG"))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"dtn {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as exc:
        if debug:
            raise
        print(f"dtn {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 2
