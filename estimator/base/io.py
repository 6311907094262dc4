"""Output files: checked before any work starts, then written atomically.

:func:`check_output_path` is the one rule for every path a command writes (``--trace``,
``--timeline``, plans, profiles, tables); CLIs call it on each output path *before* a run or
search starts, so a bad path costs nothing and never loses results::

    from estimator.base.io import atomic_write_json, check_output_path
    out = check_output_path(args.trace, "--trace")      # ConfigError if it cannot be written
    ...                                                 # the long run
    atomic_write_json(out, trace)

The rules: the path is non-empty and has no NUL byte; symlinks are resolved, so a link is
written through, never replaced; an existing directory, FIFO, socket or block device is
refused (renaming over it would destroy it); a character device (``/dev/null``) is written in
place, as ``cat > /dev/null`` would; otherwise the parent directory must exist and be
writable. A regular file is written to a same-directory temporary file and renamed into
place, so a crash never leaves a half-written plan, profile, timeline or trace behind.
:func:`check_output_dir` is the rule for a directory a command writes into (``--out DIR``): it
may not exist yet, as long as it can be created.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError


def check_output_path(path: str | Path | None, what: str = "output file") -> Path:
    """The resolved path to write ``what`` to, or :class:`ConfigError` naming why it cannot be."""
    if path is None or str(path) == "":
        raise ConfigError(f"{what}: the path is empty; give a file name")
    if "\0" in str(path):
        raise ConfigError(f"{what} {str(path)!r}: the path contains a NUL byte")
    target = Path(os.path.realpath(path))  # follow symlinks: write what the link points at
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{what} {str(path)!r} is a directory; give a file name")
        if stat.S_ISCHR(mode):
            if not os.access(target, os.W_OK):
                raise ConfigError(f"{what} {str(path)!r}: device is not writable")
            return target
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{what} {str(path)!r} is a FIFO, socket or block device, not a regular file; "
                              "refusing to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: directory {str(parent)!r} is not writable")
    return target


def check_output_dir(path: str | Path | None, what: str = "output directory") -> Path:
    """The resolved directory to write ``what`` into: an existing writable directory, or one that
    can be created because its nearest existing ancestor is one. Nothing is created here (the
    caller makes it with ``mkdir(parents=True, exist_ok=True)`` when it writes)."""
    if path is None or str(path) == "":
        raise ConfigError(f"{what}: the path is empty; give a directory")
    if "\0" in str(path):
        raise ConfigError(f"{what} {str(path)!r}: the path contains a NUL byte")
    target = Path(os.path.realpath(path))
    probe = target
    while True:  # up to the nearest part that exists ("/" always does)
        try:
            mode = probe.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            probe = probe.parent
        except OSError as exc:
            raise ConfigError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        where = "" if probe == target else f": {str(probe)!r}"
        raise ConfigError(f"{what} {str(path)!r}{where} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: directory {str(probe)!r} is not writable")
    return target


def atomic_write_text(path: str | Path, text: str, what: str = "output file") -> Path:
    """Write ``text`` to ``path`` (checked by :func:`check_output_path`): a regular file
    atomically (same-directory temp file + rename), a character device in place."""
    target = check_output_path(path, what)
    if target.exists() and stat.S_ISCHR(target.stat().st_mode):
        try:
            with open(target, "w") as fh:
                fh.write(text)
        except OSError as exc:  # /dev/full: ENOSPC
            raise ConfigError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None
        return Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: Any, what: str = "output file") -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", what)
