"""The embtier error tree.

Every failure a caller can cause or see is one of these; each class names
the gRPC status code it maps to, so the service layer maps errors in one
table and messages stay free of transport details.
"""

from __future__ import annotations

import errno
import os


class EmbtierError(Exception):
    """Base of all embtier errors."""

    status = "INTERNAL"


class InvalidArgumentError(EmbtierError):
    """Bad shape, dtype, mode, out-of-range id, lengths that do not add up."""

    status = "INVALID_ARGUMENT"


class NotFoundError(EmbtierError):
    """Unknown (or dropped) table."""

    status = "NOT_FOUND"


class PermissionDeniedError(EmbtierError):
    """The caller may not do this."""

    status = "PERMISSION_DENIED"


class AlreadyExistsError(EmbtierError):
    """A table of that name exists."""

    status = "ALREADY_EXISTS"


class TierFullError(EmbtierError):
    """No tier has room for what was asked."""

    status = "RESOURCE_EXHAUSTED"


class KeyspaceFullError(EmbtierError):
    """A managed table has no row for a new id: every live id is protected (written or read within
    the current or the previous epoch), so none may be evicted; nothing was written."""

    status = "RESOURCE_EXHAUSTED"


class OverloadedError(EmbtierError):
    """A tenant over its max_in_flight, or the scheduler's queue full: nothing was run."""

    status = "RESOURCE_EXHAUSTED"


class RequestTooLargeError(EmbtierError):
    """A request over the configured limits (ids per request, message size, shared-memory regions)."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(EmbtierError):
    """The caller's deadline passed before the work started."""

    status = "DEADLINE_EXCEEDED"


class UnavailableError(EmbtierError):
    """The daemon is shutting down."""

    status = "UNAVAILABLE"


class FailedPreconditionError(EmbtierError):
    """The operation is valid but the store is not in a state to run it."""

    status = "FAILED_PRECONDITION"


class StorageError(EmbtierError):
    """An SCM read or write failed at the operating-system level."""

    status = "INTERNAL"


class NoSpaceError(StorageError):
    """The device under a file the daemon writes (log, checkpoint, SCM file) is full or over quota;
    what failed changed nothing, and the same call works again once there is room."""

    status = "RESOURCE_EXHAUSTED"


class ScmReadError(StorageError):
    """A row could not be read from the SCM file (a device error): the request that needed it fails,
    naming the table and the id; requests that do not need it are served."""

    status = "DATA_LOSS"


def storage_error(e: OSError, path: os.PathLike | str, what: str) -> StorageError:
    """The StorageError for an OSError met while doing what on path: NoSpaceError for ENOSPC and
    EDQUOT (naming the path, so that an operator knows which device to free), else StorageError."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{what}: no space left on the device of {path} ({os.strerror(e.errno)})")
    return StorageError(f"{what}: {path}: {e.strerror or e}")


class LogFailedError(StorageError):
    """An fdatasync of the write-ahead log failed: Linux may have dropped the pages it could not write
    and report the next fdatasync clean, so the records appended since the last durable one may be
    gone.  No write is taken or acknowledged any more; the daemon stops, and its restart replays the
    log from its files.  Under fsync "always" the log is first cut back to its last durable record, so
    the write whose fdatasync failed replays only if that cut cannot be made durable either (the ones
    refused after it did nothing).  Either may be sent again to the restarted daemon."""

    status = "UNAVAILABLE"


class ConfigError(EmbtierError):
    """A configuration value is missing, malformed or inconsistent."""

    status = "INVALID_ARGUMENT"


class CorruptCheckpointError(EmbtierError):
    """A checkpoint's manifest or data files fail their checks (or a checkpoint its chain needs is gone)."""

    status = "DATA_LOSS"


class RecoveryError(StorageError):
    """At start, the checkpoints and the log cannot rebuild every table: the message names the
    files, the tables and what to do (restore the files, or start with --salvage)."""

    status = "DATA_LOSS"


class InstallError(StorageError):
    """Restored tables could not be placed after the old ones were dropped: the store matches no
    durable state any more, and the daemon must restart from its checkpoints and log."""
