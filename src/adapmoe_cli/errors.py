"""Typed exceptions of the library. Each carries a message a person can act on; the CLI edge
(cli/app.py) turns them into one line and an exit code. Nothing here knows about the terminal."""

from __future__ import annotations


class AdapmoeError(Exception):
    """Base of every error the library raises on purpose. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(AdapmoeError):
    """A flag or argument that cannot be honoured (bad size, unknown device, budget out of range)."""

    exit_code = 2


class CheckpointError(AdapmoeError):
    """A source checkpoint that is missing, incomplete, corrupted or of an unsupported family."""


class StoreError(AdapmoeError):
    """An expert store that is missing, incomplete, of another format version, or fails verification."""


class StoreExistsError(StoreError):
    """The output folder already holds a different store and `--force` was not given."""


class DownloadError(AdapmoeError):
    """A hub download that failed: missing or gated repository, network unreachable, offline mode."""


class ProfileError(AdapmoeError):
    """A profile or plan file that is missing, malformed or made for another model."""


class OutputError(AdapmoeError):
    """A file or folder adapmoe must write cannot be: read-only, a file where a folder should be, no space."""


class PeerError(AdapmoeError):
    """A peer engine (llama.cpp) that is not built, or that could not convert or run the model."""
