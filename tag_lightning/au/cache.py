"""The AU cache: one AU record per image, keyed by image content and detector settings.

Storage is a single SQLite file (`records.sqlite` in the cache folder): every record is committed
in a transaction as soon as it is computed, so a killed build loses only images in flight, and a
rerun skips every (content, settings) pair already present. A changed image (new content hash)
or a changed setting (new settings key) is recomputed; nothing else is. Reads need no mediapipe:
a JSON text and a float32 landmark blob per record, fast enough for a training dataloader.

Reads default to the settings of the latest build. A cache holding records of several settings
(say, a build with LibreFace weights, then one without) serves a run only the settings it names
(`use_settings`): records of another detector are never swapped in behind a run's back.

Reading needs no write access (caches often sit on shared read-only mounts): readers open the
file read-only, and `immutable` when its folder cannot be written and holds no WAL file, because
SQLite cannot otherwise set up WAL reading there. Building needs write access and says so.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from tag_lightning.au.record import AURecord
from tag_lightning.errors import UserError

DB_NAME = "records.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    content_hash TEXT NOT NULL,
    settings_key TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT NOT NULL,
    landmarks BLOB,
    PRIMARY KEY (content_hash, settings_key)
);
CREATE TABLE IF NOT EXISTS images (name TEXT PRIMARY KEY, content_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS builds (settings_key TEXT PRIMARY KEY, settings TEXT NOT NULL, finished_at REAL);
"""


class AUCache:
    """Read (or, with `create`, build) AU records in a cache folder.

    Safe to use after `fork` (reconnects per process).
    """

    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        self._writer = create
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            if not all(os.access(path, os.W_OK) for path in (self.root, self.path) if path.exists()):
                raise UserError(f"cannot build the AU cache {self.path}: building a cache needs write access to "
                                "its folder and files")
        elif not self.path.is_file():
            raise FileNotFoundError(
                f"no AU cache at {self.root} (missing {DB_NAME}); build one with `tag prepare au-cache`"
            )
        self._connection: sqlite3.Connection | None = None
        self._pid = None
        try:
            self.settings_key = self._latest_settings_key()
        except sqlite3.DatabaseError as err:
            raise UserError(f"cannot {'build' if create else 'read'} the AU cache {self.path}: {err}") from None

    @property
    def db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            self._connection = self._connect()
            self._pid = os.getpid()
        return self._connection

    def _connect(self) -> sqlite3.Connection:
        if not self._writer:
            folder_read_only = not os.access(self.root, os.W_OK)
            wal_absent = not self.path.with_name(DB_NAME + "-wal").exists()
            immutable = "&immutable=1" if folder_read_only and wal_absent else ""
            return sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro{immutable}", uri=True, timeout=60)
        connection = sqlite3.connect(self.path, timeout=60)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(SCHEMA)
        return connection

    def __getstate__(self) -> dict:  # dataloader workers reopen their own connection
        return {**self.__dict__, "_connection": None, "_pid": None}

    def _latest_settings_key(self) -> str | None:
        row = self.db.execute("SELECT settings_key FROM builds ORDER BY rowid DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # -- writing ---------------------------------------------------------------------------
    def register_build(self, settings_key: str, settings: dict) -> None:
        """Make `settings_key` the cache's current settings (the ones reads default to)."""
        with self.db:
            self.db.execute("DELETE FROM builds WHERE settings_key = ?", (settings_key,))
            self.db.execute(
                "INSERT INTO builds (settings_key, settings, finished_at) VALUES (?, ?, NULL)",
                (settings_key, json.dumps(settings, sort_keys=True)),
            )
        self.settings_key = settings_key

    def finish_build(self, settings_key: str) -> None:
        with self.db:
            self.db.execute("UPDATE builds SET finished_at = ? WHERE settings_key = ?", (time.time(), settings_key))

    def put_many(self, records: Iterable[AURecord], settings_key: str) -> None:
        """Store records atomically (all or none)."""
        rows = [
            (
                r.content_hash,
                settings_key,
                r.status,
                json.dumps(r.metadata(), separators=(",", ":")),
                None if r.landmarks is None else np.asarray(r.landmarks, dtype=np.float32).tobytes(),
            )
            for r in records
        ]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)", rows)
            self.db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?)", [(r.image, r.content_hash) for r in records]
            )

    def name_images(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Remember which content an image name holds now (for lookups by name)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?)", list(pairs))

    # -- reading ---------------------------------------------------------------------------
    def status_of(self, content_hash: str, settings_key: str | None = None) -> str | None:
        """The cached record's status, or None when the image is not cached under these settings."""
        row = self.db.execute(
            "SELECT status FROM records WHERE content_hash = ? AND settings_key = ?",
            (content_hash, settings_key or self.settings_key),
        ).fetchone()
        return None if row is None else row[0]

    def get(self, content_hash: str, settings_key: str | None = None) -> AURecord | None:
        row = self.db.execute(
            "SELECT metadata, landmarks FROM records WHERE content_hash = ? AND settings_key = ?",
            (content_hash, settings_key or self.settings_key),
        ).fetchone()
        if row is None:
            return None
        points = None if row[1] is None else np.frombuffer(row[1], dtype=np.float32).reshape(-1, 2)
        return AURecord.from_metadata(json.loads(row[0]), points)

    def get_by_name(self, name: str, settings_key: str | None = None) -> AURecord | None:
        """The record of the content that `name` held when it was last cached."""
        row = self.db.execute("SELECT content_hash FROM images WHERE name = ?", (name,)).fetchone()
        return None if row is None else self.get(row[0], settings_key)

    def builds(self) -> dict[str, dict]:
        """The settings of every build the cache holds records of, by settings key, oldest first."""
        rows = self.db.execute("SELECT settings_key, settings FROM builds ORDER BY rowid")
        return {key: json.loads(settings) for key, settings in rows}

    def use_settings(self, wanted: str | None) -> str:
        """Read the records of the `wanted` settings key from now on; None: the one the cache holds
        (refused when it holds several). Returns the key read."""
        builds = self.builds()
        if wanted is None and len(builds) > 1:
            raise UserError(f"the AU cache {self.root} holds records of {len(builds)} AU detector settings "
                            f"({describe_builds(builds)}); name the one this run uses with au_settings "
                            "(e.g. --data.au_settings KEY)")
        if wanted is not None and wanted not in builds:
            raise UserError(f"the AU cache {self.root} holds no records of AU settings {wanted} (it holds "
                            f"{describe_builds(builds) or 'none'}); build them with `tag prepare au-cache` "
                            "and that detector's options, or name one it holds")
        self.settings_key = wanted if wanted is not None else next(iter(builds), None)
        return self.settings_key

    def content_hashes(self, settings_key: str | None = None) -> list[str]:
        rows = self.db.execute(
            "SELECT content_hash FROM records WHERE settings_key = ?", (settings_key or self.settings_key,)
        )
        return [r[0] for r in rows]

    def __len__(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM records WHERE settings_key = ?", (self.settings_key,)
        ).fetchone()[0]


def describe_builds(builds: dict[str, dict]) -> str:
    """``KEY (libreface + blendshape), KEY (blendshape)``: each settings key with its AU sources."""
    return ", ".join(f"{key} ({' + '.join(source.split('-')[0] for source in settings['sources'])})"
                     for key, settings in builds.items())


@dataclass
class BuildSummary:
    total: int = 0
    cached: int = 0  # already in the cache, not recomputed
    computed: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)
    settings_key: str = ""

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        counts = ", ".join(f"{status} {self.statuses.get(status, 0)}" for status in ("ok", "low_quality", "no_face", "unreadable"))
        return (
            f"{self.total} images: {self.computed} computed, {self.cached} already cached | {counts} | "
            f"{self.images_per_second:.1f} images/s | AU sources: {', '.join(self.sources)} | "
            f"AU settings {self.settings_key}"
        )
