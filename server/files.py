"""Local files are private to the user running prunehub.

The embedded default keeps every owner's experiments and the API key hashes in ``$PRUNEHUB_HOME/prunehub.db``
(plus SQLite's ``-wal`` and ``-shm`` files) and the broker's messages under ``$PRUNEHUB_HOME``. With the usual
umask 022 those were 0644 files in a 0755 folder: readable by every local user. The home folder is made 0700 and
the database files 0600, when created and, for files an older version left behind, at every start.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "secure_home", "secure_sqlite"]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def secure_home(home: Path) -> None:
    """Create ``home`` as 0700 (parents as the umask says), or make an existing one 0700."""
    home.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(home, PRIVATE_DIR_MODE)


def secure_sqlite(database: Path) -> None:
    """Create the SQLite file ``database`` as 0600 before SQLite opens it, and make it and its ``-wal``,
    ``-shm`` and ``-journal`` companions 0600 where they exist.

    SQLite creates the companions with the database file's permissions, so a 0600 database keeps them private
    as they come and go. A missing parent folder is created 0700 (it holds nothing but ours).
    """
    if not database.parent.exists():
        database.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(database, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    os.close(fd)
    for path in (database, *(database.with_name(database.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, PRIVATE_FILE_MODE)
