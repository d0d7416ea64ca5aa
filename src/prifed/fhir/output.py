"""Output files of the ``prifed data`` commands: checked first, written whole.

Every output is checked before any input is opened: it must not be one of
the inputs, a folder, or in a folder that does not exist. It is then written
to a temporary file in its own folder and renamed over the target only when
the command succeeds, so a failed command leaves no partial file and never
truncates an input.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from prifed.errors import DataError


def check_outputs(outputs: Iterable[tuple[str, Path | None]],
                  inputs: Iterable[Path] = ()) -> None:
    """Raise DataError when an output is an input, a folder or has no folder.

    ``outputs`` pairs each path with the option that names it, for the message.
    Paths are compared after resolving links and ``..``.
    """
    resolved_inputs = {Path(path).resolve(): Path(path) for path in inputs}
    seen: dict[Path, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in resolved_inputs:
            raise DataError(
                f"{option} {path} is also an input ({resolved_inputs[resolved]}); "
                "write the output to another file")
        if resolved in seen:
            raise DataError(
                f"{option} {path} is the same file as {seen[resolved]}; "
                "give each output its own file")
        seen[resolved] = option
        if resolved.is_dir():
            raise DataError(f"{option} {path} is a folder; expected a file name")
        if not resolved.parent.is_dir():
            raise DataError(
                f"{option} {path}: folder {Path(path).parent} does not exist")


def _file_mode() -> int:
    """Return the mode a plain ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_text(path: str | Path, option: str = "output") -> Iterator[IO[str]]:
    """Open a temporary file beside ``path``; rename it to ``path`` on success.

    On any exception the temporary file is deleted and ``path`` is left as it
    was. An OSError from creating or renaming the file becomes a DataError
    that names the option and the path. Exceptions raised inside the block
    pass through unchanged.
    """
    target = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise DataError(f"cannot write {option} {target}: {error.strerror}") from None
    temporary_path = Path(temporary)
    try:
        with os.fdopen(descriptor, "w", newline="", encoding="utf-8") as handle:
            yield handle
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    try:
        os.chmod(temporary_path, _file_mode())
        os.replace(temporary_path, target)
    except OSError as error:
        temporary_path.unlink(missing_ok=True)
        raise DataError(f"cannot write {option} {target}: {error.strerror}") from None
