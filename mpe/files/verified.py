"""Which files' content has been verified, and in what state, so that checking a large corpus (data and
cache shards) or hashing a large model folder at every stage start reads only what changed.

A folder's record ``.mpe-verified`` maps a file name to the digest it was verified to hold and the
file's stat signature at that moment: size, mtime, ctime and inode (on an object store: size, ETag and
modification time). Any write to a file or its replacement changes the signature (ctime cannot be set back
from user space), so a file whose signature is unchanged is not read again and any other one is.

The record is this machine's knowledge, not data: DVC ignores it (``.dvcignore``), nothing else lists it,
and a copy of the folder (new inodes) is verified again once. A change below the file system that leaves
the signature as it was (bit rot) is not seen here; the cache's per-caption checksums catch it when the
rows are read, and :func:`forget` then drops the file's entry so that the next check reads it again.
"""

from __future__ import annotations

import json
import os

from mpe.files import storage

# no ``.json`` suffix: img2dataset reads every ``*.json`` of its output folder as a shard's stats
RECORD = ".mpe-verified"
_REMOTE_KEYS = ("size", "ETag", "etag", "LastModified", "last_modified", "mtime", "generation", "md5Hash")


def signature(url: str) -> str:
    """The stat signature of a file (see the module docstring)."""
    if storage.is_local(url):
        st = os.stat(storage.local_path(url))
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
    info = storage.info(url)
    return json.dumps({k: str(info[k]) for k in _REMOTE_KEYS if k in info}, sort_keys=True)


class Record:
    """The record of one folder: what was verified there, and since when."""

    def __init__(self, folder: str):
        self.url = storage.join(folder, RECORD)
        self.changed = False
        try:
            self.entries = json.loads(storage.read_bytes(self.url)) if storage.exists(self.url) else {}
        except (OSError, ValueError):  # unreadable: everything is verified again
            self.entries = {}

    def holds(self, url: str, digest: str) -> bool:
        """Whether ``url`` was verified to hold ``digest`` and has not changed since."""
        return self.digest_of(url) == digest

    def digest_of(self, url: str) -> str | None:
        """The digest ``url`` was found to hold, if it has not changed since."""
        entry = self.entries.get(storage.name(url))
        return entry.get("digest") if entry is not None and entry.get("signature") == signature(url) else None

    def add(self, url: str, digest: str, before: str) -> None:
        """``url`` was verified to hold ``digest``; ``before`` is its signature from before it was read, so a
        file that changed while it was being read is not recorded."""
        if signature(url) == before:
            self.entries[storage.name(url)] = {"digest": digest, "signature": before}
            self.changed = True

    def drop(self, url: str) -> None:
        if self.entries.pop(storage.name(url), None) is not None:
            self.changed = True

    def save(self) -> None:
        """Write the record if it changed; a folder that cannot be written keeps no record (every check
        then reads the files again)."""
        if not self.changed:
            return
        try:
            with storage.atomic_local_copy(self.url, ".json") as tmp:
                tmp.write_text(json.dumps(self.entries, sort_keys=True))
        except OSError:
            return
        self.changed = False


def forget(url: str) -> None:
    """Drop ``url`` from its folder's record: the next check reads it again."""
    record = Record(storage.parent(url))
    record.drop(url)
    record.save()
