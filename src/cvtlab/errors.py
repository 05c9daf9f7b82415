"""The exception types cvtlab raises for user mistakes and for a run stopped on request, and
the output-path check that the commands which write files share.

The CLI prints these as a single line (no traceback); library users catch them as ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path


class CvtLabError(ValueError):
    """A problem with the user's input: a name, a file, a flag or a value."""

    exit_code = 2


class RunInterrupted(CvtLabError):
    """Training stopped on a signal (Ctrl-C, ``kill``, a scheduler's preemption) after saving
    the step it was on; the message says how to continue. The CLI exits with the shell's status
    for that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.quiet = quiet  # another DDP process than the first says it already


def check_creatable(path: Path, flag: str = "--out") -> None:
    """A one-line error when ``path`` cannot be created because a file stands where one of its
    folders would go (mkdir would fail later with a bare ``FileExistsError``)."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CvtLabError(f"{flag} {path}: cannot be created, {blocker} is a file")
