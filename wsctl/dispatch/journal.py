"""A local journal of chunk outcomes: what ran is never forgotten, even when the
database is away for longer than the lease.

Before a chunk's outcomes are recorded, they are appended to this process's
journal file as one JSON line (a write to the page cache: it survives the
dispatcher being killed); when a recording attempt fails, the file is fsynced
at once (it then survives the host too) before the recording is retried.
Once the recording transaction commits, a ``done`` line follows (no fsync
needed: replaying a recorded chunk changes nothing). An fsync before every
recording would cost each pass one disk flush per chunk for the rare case
of the host itself crashing mid-recording. The next pass, of this process or of any later one on the
same host, replays every chunk without its ``done`` line before it claims,
each state only while it is still DISPATCHING under the journaled claim token
*and* at the journaled dispatch generation (fenced: a state claimed again since
is skipped, never overwritten).

Files are ``journal-<pid>-<random>.jsonl`` in the journal directory, each
held under an exclusive ``flock`` by its writer: a replaying pass takes over
only files whose writer is gone, and deletes them once replayed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(slots=True)
class JournaledChunk:
    token: uuid.UUID
    #: outcome name -> columns (see engine._Chunk.to_journal)
    groups: dict[str, dict[str, Any]]
    path: Path


_ROTATE_BYTES = 64 * 1024 * 1024


class Journal:
    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.path = self.dir / f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()
        self._outstanding: set[str] = set()  # tokens written, not yet done

    # -- writing ----------------------------------------------------------

    def _file(self) -> IO[str]:
        if self._fh is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Created under a name replays never look at, locked, then renamed:
            # no other pass can take over a file whose writer is alive.
            tmp = self.dir / f".{self.path.name}.new"
            fh = open(tmp, "a+", encoding="utf-8")  # noqa: SIM115 - held open while alive
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            os.replace(tmp, self.path)
            self._fh = fh
        return self._fh

    def write(
        self, token: uuid.UUID, groups: dict[str, dict[str, Any]], *, sync: bool = False
    ) -> None:
        """Append one chunk's outcomes (before they are recorded); ``sync``: fsync too."""
        line = json.dumps({"token": str(token), "groups": groups}, separators=(",", ":"))
        with self._lock:
            fh = self._file()
            fh.write(line + "\n")
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
            self._outstanding.add(str(token))

    def sync(self) -> None:
        """fsync what was written (a recording failed: the outage may outlast this host)."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())

    def done(self, token: uuid.UUID) -> None:
        """The chunk's outcomes are committed: a ``done`` line (no flush to disk needed).

        The file is emptied only once it is large and nothing is outstanding: a
        truncate per chunk made ext4 flush (its replace-by-truncate heuristic),
        which cost the no-op benchmark pass about a fifth of its time.
        """
        with self._lock:
            self._outstanding.discard(str(token))
            fh = self._file()
            if not self._outstanding and fh.tell() > _ROTATE_BYTES:
                fh.truncate(0)
            else:
                fh.write('{"done":"' + str(token) + '"}\n')
                fh.flush()

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def close(self) -> None:
        """Release the file; remove it when every chunk was recorded."""
        with self._lock:
            if self._fh is None:
                return
            if not self._outstanding:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self._fh.close()
            self._fh = None

    # -- replaying --------------------------------------------------------

    @staticmethod
    def _read(fh: IO[str], path: Path) -> list[JournaledChunk]:
        fh.seek(0)
        chunks: dict[str, JournaledChunk] = {}
        for line in fh:
            if not line.endswith("\n"):
                break  # torn last line: its chunk was never recorded, nor fsynced whole
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "done" in doc:
                chunks.pop(doc["done"], None)
            elif "token" in doc:
                chunks[doc["token"]] = JournaledChunk(
                    uuid.UUID(doc["token"]), doc.get("groups", {}), path
                )
        fh.seek(0, os.SEEK_END)
        return list(chunks.values())

    @contextlib.contextmanager
    def _orphans(self) -> Iterator[list[tuple[Path, IO[str]]]]:
        """Journal files of writers that are gone, each locked by this process meanwhile."""
        taken: list[tuple[Path, IO[str]]] = []
        try:
            for path in sorted(self.dir.glob("journal-*.jsonl")) if self.dir.is_dir() else []:
                if path == self.path:
                    continue
                try:
                    fh: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    fh.close()  # its writer is alive: it replays its own file
                    continue
                if not path.exists():  # replayed and removed by another pass meanwhile
                    fh.close()
                    continue
                taken.append((path, fh))
            yield taken
        finally:
            for _path, fh in taken:
                fh.close()

    def replay(self, apply: Callable[[JournaledChunk], None]) -> int:
        """Apply every chunk not marked done (own file and orphans); returns how many.

        ``apply`` records one chunk (fenced by token and generation) and commits;
        when it raises, the chunks not yet applied stay journaled.
        """
        replayed = 0
        with self._lock:
            if self._outstanding and self._fh is not None:
                for chunk in self._read(self._fh, self.path):
                    apply(chunk)
                    replayed += 1
                    self._outstanding.discard(str(chunk.token))
                    self._fh.write(json.dumps({"done": str(chunk.token)}) + "\n")
                    self._fh.flush()
                if not self._outstanding:
                    self._fh.truncate(0)
        with self._orphans() as orphans:
            for path, fh in orphans:
                for chunk in self._read(fh, path):
                    apply(chunk)
                    replayed += 1
                    fh.write(json.dumps({"done": str(chunk.token)}) + "\n")
                    fh.flush()
                path.unlink()
        return replayed
