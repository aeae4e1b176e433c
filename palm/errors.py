"""The project's exceptions: one base, `PalmError`, whose message is one line naming the file or
setting at fault and the fix.

Library code raises these and never exits; `palm.cli.run` turns them into exit codes: a
`ConfigError` (bad command line or config) is 2, every other `PalmError` is 1. What palm works
around instead of failing is said in one `warning:` line (`warn`).
"""

from __future__ import annotations

import sys


class PalmError(Exception):
    """A failure the user can fix; the message says what is wrong, where, and how to fix it."""

    exit_code = 1


class ConfigError(PalmError, ValueError):
    """A bad command-line value or config key (also a ValueError, for library callers)."""

    exit_code = 2


class DataError(PalmError):
    """Bad input data or a failed preparation step (download, tokenize, pack, load)."""


class TokenizerError(PalmError):
    """A tokenizer that cannot be trained, loaded or used with this data."""


class CheckpointError(PalmError, RuntimeError):
    """A checkpoint that cannot be written, found or used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files fail verification; a run folder falls back to an older one."""


class ConversionError(PalmError, ValueError):
    """Weights that cannot be converted to or from a peer's format (palm.interop)."""


class PretrainedError(PalmError):
    """A published checkpoint that cannot be fetched or converted."""


class TrainingError(PalmError, RuntimeError):
    """A run that cannot go on (repeated loss spikes, non-finite gradients)."""


class BusyError(PalmError):
    """A server at capacity: its request queue is full (HTTP 429); the client retries later."""


def warn(message: str) -> None:
    """A problem palm worked around (e.g. a corrupt checkpoint skipped): one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
