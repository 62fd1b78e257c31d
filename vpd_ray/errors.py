"""The one-line form of an exception, for the one-line errors every entry point prints."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, else its type's name (libraries' messages
    run to many lines: omegaconf adds the key and object type, the hub its request details)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__
