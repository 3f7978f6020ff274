"""The one error tree of stork. Messages are written for the person reading CLI output.

Code never branches on message text: it catches a type.
"""

from __future__ import annotations


class StorkError(Exception):
    """Root of every error stork raises on purpose; its message is one line for the user."""


class ConfigError(StorkError):
    """The cluster config file (or an environment override) is wrong."""


class InvalidName(StorkError):
    """A volume id, volume name, storage id, guest id, size or format does not parse."""


class NotFound(StorkError):
    """A storage, volume or guest that was named does not exist."""


class AlreadyExists(StorkError):
    """A guest id or volume that should be new exists already."""


class Refused(StorkError):
    """The operation is understood but not allowed in the object's current state."""


class FeatureUnsupported(Refused):
    """The backend cannot do this with a volume in this state or format."""


class StorageUnavailable(StorkError):
    """A storage that cannot be used now but may be later (a mount point with nothing mounted):
    not a decision that stands, so an undo meeting it is tried again."""


class LockTimeout(StorkError):
    """A storage or guest lock could not be had in time."""


class ToolFailed(StorkError):
    """An external tool (qemu-img, ...) exited non-zero."""


class JobCancelled(StorkError):
    """The job was cancelled by a user; raised inside long steps to stop them."""


class Corrupt(StorkError):
    """Stored backup data does not match its checksum or does not parse."""


class UnknownFormat(Refused):
    """Stored backup data of a format version this stork does not read (a newer stork's): not damage."""

