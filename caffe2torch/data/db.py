"""The record databases of Caffe's Data layer and tools: LMDB (built in) and LevelDB (plyvel).

A reader walks the records in key order and starts again at the first after the last, as
Caffe's ``DataLayer::Next``; a writer builds the database in a temporary folder beside the
target and moves it into place only once it is complete, so a crash never leaves half a DB.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from types import ModuleType

import lmdb

from . import DataError

LEVELDB_HINT = "pip install 'caffe2torch[leveldb]' (or: pip install plyvel)"
BACKENDS = ("lmdb", "leveldb")
_LMDB_MAP_SIZE = 1 << 40   # address space only: the file grows as records are written
_COMMIT_EVERY = 1000       # records per transaction, as Caffe's tools


# py-lmdb refuses to open one environment twice in a process, but a train and a test net often
# read the same database: readers share one read-only environment per data file.
_ENVIRONMENTS: weakref.WeakValueDictionary[tuple[int, int], lmdb.Environment] = \
    weakref.WeakValueDictionary()


def _shared_lmdb(path: Path) -> lmdb.Environment:
    stat = (path / "data.mdb").stat()
    key = (stat.st_dev, stat.st_ino)
    env = _ENVIRONMENTS.get(key)
    if env is None:
        env = _ENVIRONMENTS[key] = lmdb.open(str(path), readonly=True, lock=False)
    return env


def _plyvel(path: Path) -> ModuleType:
    try:
        import plyvel
    except ImportError:
        raise DataError(f"'{path}': LevelDB databases need the optional plyvel package: "
                        f"{LEVELDB_HINT}; or rebuild the database with --backend lmdb") from None
    return plyvel


def detect_backend(path: Path) -> str | None:
    """'lmdb' or 'leveldb' from the files in the folder ``path``; None when it is neither."""
    if (path / "data.mdb").is_file():
        return "lmdb"
    if (path / "CURRENT").is_file():
        return "leveldb"
    return None


class RecordReader:
    """The (key, value) records of a database, in key order, round and round."""

    def __init__(self, path: str | Path, backend: str | None = None):
        """``backend`` is the kind the net declares, or None to take what the folder holds."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"database '{path}' does not exist")
        if not path.is_dir():
            raise DataError(f"database '{path}' is a file; LMDB and LevelDB databases are "
                            "folders (give the folder holding data.mdb)")
        found = detect_backend(path)
        if found is None:
            raise DataError(f"'{path}' is neither an LMDB (no data.mdb) nor a LevelDB (no "
                            "CURRENT) database")
        if backend is not None and backend != found:
            raise DataError(f"'{path}' is a {found} database, but the net declares backend: "
                            f"{backend.upper()}")
        self.path, self.backend = path, found
        try:
            if found == "lmdb":
                self._env = _shared_lmdb(path)
                self._cursor = self._env.begin().cursor()
                empty = not self._cursor.first()
            else:
                self._db = _plyvel(path).DB(str(path), create_if_missing=False)
                self._iter = self._db.iterator()
                self._current = next(self._iter, None)
                empty = self._current is None
        except DataError:
            raise
        except Exception as exc:   # lmdb.Error, plyvel.Error: corrupt or unreadable files
            raise DataError(f"cannot open {found} database '{path}': {exc}") from None
        if empty:
            raise DataError(f"database '{path}' holds no records")

    def peek(self) -> tuple[bytes, bytes]:
        """The record :meth:`next` returns next."""
        return self._cursor.item() if self.backend == "lmdb" else self._current

    def next(self) -> tuple[bytes, bytes]:
        """The current record; then move on, back to the first after the last."""
        record = self.peek()
        if self.backend == "lmdb":
            if not self._cursor.next():
                self._cursor.first()
        else:
            self._current = next(self._iter, None)
            if self._current is None:
                self._iter = self._db.iterator()
                self._current = next(self._iter)
        return record

    def __iter__(self):
        """Every record once, from the current one (for tools such as compute_image_mean)."""
        if self.backend == "lmdb":
            yield from self._cursor.iternext()
        else:
            yield self._current
            yield from self._iter


class RecordWriter:
    """A new database, filled with :meth:`put` and moved to ``path`` by :meth:`close`.

    Like Caffe's tools it refuses to replace an existing database. Use it as a context
    manager: an exception deletes the unfinished temporary folder.
    """

    def __init__(self, path: str | Path, backend: str = "lmdb"):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise DataError(f"unknown backend '{backend}'; use one of {list(BACKENDS)}")
        if self.path.exists():
            raise DataError(f"'{self.path}' already exists; remove it or choose another name "
                            "(a database is never overwritten)")
        if not self.path.parent.resolve().is_dir():
            raise DataError(f"folder '{self.path.parent}' for the new database does not exist")
        self.backend = backend
        plyvel = _plyvel(self.path) if backend == "leveldb" else None
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                          dir=self.path.parent))
        self._pending = 0
        if plyvel is None:
            self._env = lmdb.open(str(self._tmp), map_size=_LMDB_MAP_SIZE, meminit=False)
            self._txn = self._env.begin(write=True)
        else:
            self._db = plyvel.DB(str(self._tmp), create_if_missing=True,
                                 write_buffer_size=268435456)
            self._txn = self._db.write_batch()

    def put(self, key: bytes, value: bytes) -> None:
        """Add one record; a transaction is committed every 1000 records."""
        self._txn.put(key, value)
        self._pending += 1
        if self._pending == _COMMIT_EVERY:
            self._commit(reopen=True)

    def _commit(self, reopen: bool) -> None:
        if self.backend == "lmdb":
            self._txn.commit()
            self._txn = self._env.begin(write=True) if reopen else None
        else:
            self._txn.write()
            self._txn = self._db.write_batch() if reopen else None
        self._pending = 0

    def close(self) -> None:
        """Commit what is left and move the finished database into place."""
        self._commit(reopen=False)
        (self._env if self.backend == "lmdb" else self._db).close()
        os.chmod(self._tmp, 0o755)
        os.rename(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything written so far."""
        if self.backend == "lmdb":
            if self._txn is not None:
                self._txn.abort()
            self._env.close()
        else:
            self._db.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
