"""taxiway.fsutil (atomic writes, safe reads) and taxiway.process (is a pid alive)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from taxiway.fsutil import (
    FileProblem,
    TooLarge,
    atomic_path,
    atomic_write,
    read_regular,
    same_file,
    sweep_temp_files,
    write_bytes_atomic,
)
from taxiway.process import pid_alive, start_time


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_replaces_with_mode_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "key.pem"
    write_bytes_atomic(p, b"old")
    with atomic_write(p, mode=0o600, fsync_dir=True) as f:
        f.write(b"new")
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert _names(p.parent) == ["key.pem"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(p, binary=False, fsync=False) as f:
        f.write("half")
        raise RuntimeError("stop")
    assert p.read_text() == "old"
    assert _names(tmp_path) == ["a.json"]


def test_the_temp_file_is_never_more_open_than_its_mode(tmp_path):
    p = tmp_path / "secret"
    with atomic_write(p, mode=0o600) as f:
        (tmp,) = [q for q in tmp_path.iterdir() if q.name != "secret"]
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
        assert tmp.name.startswith(".secret.") and tmp.name.endswith(".tmp")
        f.write(b"x")


def test_exclusive_keeps_the_first_writer(tmp_path):
    p = tmp_path / "secret.key"
    with atomic_write(p, mode=0o600, exclusive=True) as f:
        f.write(b"first")
    with pytest.raises(FileExistsError), atomic_write(p, exclusive=True) as f:
        f.write(b"second")
    assert p.read_bytes() == b"first"
    assert _names(tmp_path) == ["secret.key"]


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    import sqlite3

    dest = tmp_path / "db.sqlite"
    with atomic_path(dest) as tmp:
        con = sqlite3.connect(tmp)
        con.execute("create table t (x)")
        con.commit()
        con.close()
        assert not dest.exists()
    assert sqlite3.connect(dest).execute("select count(*) from t").fetchone() == (0,)
    with pytest.raises(ValueError), atomic_path(dest):
        raise ValueError
    assert _names(tmp_path) == ["db.sqlite"]


def test_sweep_removes_only_our_temp_names(tmp_path):
    p = tmp_path / "k.pem"
    (tmp_path / ".k.pem.abcdefgh.tmp").write_bytes(b"crash")
    (tmp_path / ".other.abcdefgh.tmp").write_bytes(b"not ours")
    assert sweep_temp_files(p) == 1
    assert _names(tmp_path) == [".other.abcdefgh.tmp"]


def test_read_regular_refuses_what_is_not_a_small_regular_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f") == b"x" * 100
    with pytest.raises(TooLarge, match="larger than 10 bytes"):  # a FileProblem too
        read_regular(tmp_path / "f", 10)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileProblem, match="not a regular file"):
        read_regular(tmp_path / "fifo")  # and does not hang
    with pytest.raises(FileProblem, match="a directory"):
        read_regular(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(FileProblem, match="symbolic link"):
        read_regular(tmp_path / "link", nofollow=True)
    assert same_file([tmp_path / "f", None, tmp_path / "link"]) == (tmp_path / "f", tmp_path / "link")
    assert same_file([tmp_path / "f", tmp_path / "g"]) is None


def test_read_regular_below_a_folder_fd(tmp_path):
    """dir_fd: the name is looked up in that folder (as safefs walks a build's tree link by link)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"data")
    (tmp_path / "d" / "link").symlink_to(tmp_path / "d" / "f")
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_regular("f", nofollow=True, dir_fd=fd) == b"data"
        assert read_regular("link", dir_fd=fd) == b"data"
        with pytest.raises(FileProblem, match="symbolic link"):
            read_regular("link", nofollow=True, dir_fd=fd)
        with pytest.raises(FileNotFoundError):
            read_regular("gone", nofollow=True, dir_fd=fd)
    finally:
        os.close(fd)


def test_pid_alive_counts_a_zombie_as_dead():
    assert pid_alive(os.getpid())
    assert pid_alive(os.getpid(), start_time(os.getpid()))
    assert not pid_alive(os.getpid(), "1")  # another process that had this pid
    assert not pid_alive(None) and not pid_alive(0) and not pid_alive(-1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # exited, not yet reaped: a zombie
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the child never became a zombie")
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(1)  # another user's process exists: alive
