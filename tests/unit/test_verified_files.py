"""The verification record (mpe/files/verified.py): a file is trusted again only while its stat signature
is the one it had when it was read; any write, a restored mtime included, or a replacement is seen."""

import json
import os
import shutil

from mpe.files import hashing
from mpe.files.verified import RECORD, Record, forget, signature


def test_a_same_size_write_is_seen_even_with_its_mtime_set_back(tmp_path):
    f = tmp_path / "shard.tar"
    f.write_bytes(b"a" * 1000)
    before, stat = signature(str(f)), f.stat()
    with open(f, "r+b") as fh:
        fh.seek(500)
        fh.write(b"b")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime as it was: ctime still moves
    assert f.stat().st_size == stat.st_size and f.stat().st_mtime_ns == stat.st_mtime_ns
    assert signature(str(f)) != before


def test_a_copy_or_a_replacement_is_another_file(tmp_path):
    f = tmp_path / "shard.tar"
    f.write_bytes(b"a" * 100)
    before = signature(str(f))
    shutil.copy2(f, tmp_path / "copy.tar")  # same bytes, same mtime, another inode
    assert signature(str(tmp_path / "copy.tar")) != before
    os.replace(tmp_path / "copy.tar", f)  # and in the place of the original
    assert signature(str(f)) != before


def test_a_record_holds_a_digest_until_the_file_changes_and_survives_a_reload(tmp_path):
    f = tmp_path / "shard.tar"
    f.write_bytes(b"a" * 100)
    record = Record(str(tmp_path))
    assert not record.holds(str(f), "d1")
    record.add(str(f), "d1", signature(str(f)))
    record.save()
    again = Record(str(tmp_path))
    assert again.holds(str(f), "d1") and not again.holds(str(f), "d2")  # another digest: not verified
    f.write_bytes(b"b" * 100)
    assert not Record(str(tmp_path)).holds(str(f), "d1")
    forget(str(f))
    assert json.loads((tmp_path / RECORD).read_text()) == {}


def test_a_file_that_changed_while_it_was_read_is_not_recorded(tmp_path):
    f = tmp_path / "shard.tar"
    f.write_bytes(b"a" * 100)
    before = signature(str(f))
    f.write_bytes(b"b" * 100)  # written between the stat and the end of the read
    record = Record(str(tmp_path))
    record.add(str(f), "d1", before)
    assert record.entries == {}


def test_an_unreadable_record_is_an_empty_one(tmp_path):
    (tmp_path / RECORD).write_text("{ not json")
    assert Record(str(tmp_path)).entries == {}


def test_a_model_folder_is_read_once_while_unchanged_and_again_when_a_file_is_replaced(tmp_path, monkeypatch):
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "notes.md").write_text("not a model file")
    read = []
    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda p, *a: read.append(p.name) or real(p, *a))
    first = hashing.model_folder_sha256(folder)
    assert sorted(read) == ["config.json", "model.safetensors"] and (folder / RECORD).exists()
    read.clear()
    assert hashing.model_folder_sha256(folder) == first and read == []  # the record is not content either
    (folder / "model.safetensors").write_bytes(b"v" * 1000)  # new weights, same name and size
    assert hashing.model_folder_sha256(folder) != first and read == ["model.safetensors"]
