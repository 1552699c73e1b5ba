"""A model registry: numbered versions of one model and a ``current`` pointer.

Layout under ``<location>/<name>/`` (a local path or an fsspec URL)::

    v1/  v2/  v3/ …      one directory per version: model/ (a dkm model, zarr), drift.json,
                         drift.png, summary.json, metrics.jsonl and version.json
    current              JSON: {"version": N, "previous": [...], "updated": ISO time}
    .dkm-registry.json   the marker: dkm writes only into a directory that has it (or a
                         pointer or a version, as registries of earlier dkm versions do)

A directory is a version only once its ``version.json`` exists. ``current`` names the
version that serves; ``previous`` lists the versions that were current before it, most
recent last, which is what ``rollback`` goes back to.

Atomicity. Locally a version is written into a hidden temporary directory and renamed
to ``vN`` (one ``rename``), and ``current`` is written to a temporary file, flushed and
renamed over the old one: readers see the old or the new pointer, never a partial one,
and a run that fails leaves neither a half-written version nor a moved pointer. On
object stores (fsspec URLs) there is no rename: a version is copied into place first
and its ``version.json`` written last, so an incomplete copy is never listed; the
pointer is one small object written with a single PUT, which S3, GCS and Azure Blob
make visible atomically (old or new content, never a mix). Neither offers
compare-and-swap, so two runs changing the same registry at the same time are not
supported (locally, two runs never take the same version number).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dkm import io
from dkm.errors import UserError
from dkm.io._paths import _join, _listing, _local_path, _url_to_fs

VERSION_FILE = "version.json"
POINTER_FILE = "current"
#: Written at the root of every registry dkm creates: only such a directory is used.
MARKER = ".dkm-registry.json"
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
#: What a registry of an earlier dkm (before the marker) holds: versions, the pointer,
#: and the temporary names of versions and pointers being written or deleted.
_OWN_ENTRY = re.compile(
    r"^(v[1-9][0-9]*|current|\.v-new\.tmp-.*|\.current\.tmp-.*|\.v[0-9]+\.deleted-.*)$"
)


class RegistryError(UserError, ValueError):
    """A registry operation that cannot be done; the message says what to do."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Version:
    number: int
    url: str
    info: dict[str, Any]

    @property
    def model_url(self) -> str:
        return f"{self.url}/model"


class Registry:
    """The versions of the model ``name`` at ``location``."""

    def __init__(
        self, location: str, name: str, *, storage_options: dict[str, Any] | None = None
    ) -> None:
        if not name or "/" in name or name.startswith("."):
            raise RegistryError(f"registry name {name!r}: use letters, digits, '.', '_', '-'")
        self.location, self.name = location, name
        self.storage_options = storage_options or {}
        local = _local_path(location)
        self._local = local is not None
        self.root = (
            os.path.join(os.path.abspath(local), name)
            if local is not None
            else _join(location.rstrip("/"), name)
        )

    # ------------------------------------------------------------------ paths

    def __str__(self) -> str:
        return self.root

    def _fs(self) -> tuple[Any, str]:
        return _url_to_fs(self.root, self.storage_options)

    def version_url(self, number: int) -> str:
        return f"{self.root}/v{number}"

    def model_url(self, number: int) -> str:
        return f"{self.version_url(number)}/model"

    # ------------------------------------------------------------------ reading

    def _read_text(self, relative: str) -> str | None:
        if self._local:
            try:
                with open(os.path.join(self.root, relative), encoding="utf-8") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        fs, root = self._fs()
        path = f"{root}/{relative}"
        if not fs.exists(path):
            return None
        return bytes(fs.cat_file(path)).decode("utf-8")

    def _children(self) -> list[str]:
        if self._local:
            return os.listdir(self.root) if os.path.isdir(self.root) else []
        fs, root = self._fs()
        if not fs.exists(root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]

    def _numbers(self) -> list[int]:
        """Every vN directory, complete or not (what the next number must avoid)."""
        found = (_VERSION_DIR.match(c) for c in self._children())
        return sorted(int(m.group(1)) for m in found if m)

    def versions(self) -> list[Version]:
        """The complete versions, oldest first."""
        out = []
        for number in self._numbers():
            text = self._read_text(f"v{number}/{VERSION_FILE}")
            if text is None:
                continue  # being written, or left by a copy that did not finish
            try:
                info = json.loads(text)
            except json.JSONDecodeError:
                continue
            out.append(Version(number, self.version_url(number), info))
        return out

    def get(self, number: int) -> Version:
        for v in self.versions():
            if v.number == number:
                return v
        have = ", ".join(f"v{v.number}" for v in self.versions()) or "none"
        raise RegistryError(f"registry {self.root} has no version v{number} (versions: {have})")

    def pointer(self) -> dict[str, Any]:
        """The ``current`` pointer: {"version": N or None, "previous": [...]}."""
        text = self._read_text(POINTER_FILE)
        if text is None:
            return {"version": None, "previous": []}
        try:
            data = json.loads(text)
            version = data["version"]
            previous = [int(p) for p in data.get("previous", [])]
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError("version is not an integer")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RegistryError(
                f"the pointer {self.root}/{POINTER_FILE} is not readable ({e}); set it again "
                "with `dkm models promote CONFIG VERSION`"
            ) from None
        return {**data, "version": version, "previous": previous}

    def current(self) -> int | None:
        version = self.pointer()["version"]
        return None if version is None else int(version)

    # ------------------------------------------------------------------ writing

    def _foreign(self) -> str | None:
        """What is at the root if it is not a registry (None: a registry, empty or missing).

        A registry is a directory holding :data:`MARKER`, the pointer or a complete
        version; dkm adds versions only there, so nothing of anybody else's is mixed in.
        """
        if self._local:
            if os.path.islink(self.root) and not os.path.isdir(self.root):
                return f"a symbolic link to {os.readlink(self.root)}"
            if os.path.lexists(self.root) and not os.path.isdir(self.root):
                return "a file"
            if os.path.isdir(self.root) and not os.stat(self.root).st_mode & 0o222:
                return "a read-only directory"
        else:
            fs, root = self._fs()
            if fs.exists(root) and fs.isfile(root):
                return "an object"
        children = self._children()
        if MARKER in children or all(_OWN_ENTRY.match(c) for c in children):
            return None
        return f"a directory dkm did not write ({_listing(sorted(children))})"

    def check_writable(self) -> None:
        """Refuse a root that is not a registry; create it (with its marker) if missing."""
        foreign = self._foreign()
        if foreign is not None:
            raise RegistryError(
                f"cannot use {self.root} as a model registry: it is {foreign}; dkm never "
                "writes into what it did not create: choose another registry.path or name"
            )
        if self._local:
            io.check_writable(self.root, create_parents=True)
            os.makedirs(self.root, exist_ok=True)
            marker = os.path.join(self.root, MARKER)
            if not os.path.exists(marker):
                with open(marker, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"dkm_registry": 1, "name": self.name}) + "\n")
        else:
            io.check_writable(self.root, storage_options=self.storage_options)
            fs, root = self._fs()
            if not fs.exists(f"{root}/{MARKER}"):
                text = json.dumps({"dkm_registry": 1, "name": self.name}) + "\n"
                fs.pipe_file(f"{root}/{MARKER}", text.encode("utf-8"))

    def add_version(self, write: Callable[[str], None], info: dict[str, Any]) -> Version:
        """A new version: ``write(url)`` fills a temporary directory, which becomes vN.

        ``info`` (with ``version`` and ``created`` added) is its ``version.json``. If
        ``write`` raises, nothing is left behind and the exception propagates.
        """
        self.check_writable()
        token = uuid.uuid4().hex
        tmp = f"{self.root}/.v-new.tmp-{token}"
        if self._local:
            os.mkdir(tmp)
        try:
            write(tmp)
            for _ in range(100):
                number = max(self._numbers(), default=0) + 1
                full = {**info, "version": number, "created": info.get("created") or now()}
                text = json.dumps(full, indent=2, default=str) + "\n"
                if self._local:
                    with open(os.path.join(tmp, VERSION_FILE), "w", encoding="utf-8") as f:
                        f.write(text)
                    try:
                        os.rename(tmp, self.version_url(number))  # fails if vN is not empty
                    except OSError:
                        if os.path.isdir(self.version_url(number)):
                            continue  # another run took this number
                        raise
                else:
                    fs, _ = self._fs()
                    source = _url_to_fs(tmp, self.storage_options)[1]
                    target = _url_to_fs(self.version_url(number), self.storage_options)[1]
                    if fs.exists(target):
                        continue
                    fs.mv(source, target, recursive=True)
                    fs.pipe_file(f"{target}/{VERSION_FILE}", text.encode("utf-8"))  # last
                return Version(number, self.version_url(number), full)
            raise RegistryError(f"could not find a free version number in {self.root}")
        except BaseException:
            self._remove(tmp)
            raise

    def _remove(self, url: str) -> None:
        if self._local:
            if os.path.isdir(url):
                shutil.rmtree(url, ignore_errors=True)
            return
        fs, path = _url_to_fs(url, self.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def _write_pointer(self, version: int, previous: list[int]) -> None:
        text = json.dumps({"version": version, "previous": previous, "updated": now()}) + "\n"
        if self._local:
            os.makedirs(self.root, exist_ok=True)
            tmp = os.path.join(self.root, f".{POINTER_FILE}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(self.root, POINTER_FILE))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        fs, root = self._fs()
        fs.pipe_file(f"{root}/{POINTER_FILE}", text.encode("utf-8"))  # one PUT

    def promote(self, number: int) -> int | None:
        """Make version ``number`` current; returns the version that was current."""
        self.get(number)  # must exist and be complete
        pointer = self.pointer()
        old = pointer["version"]
        if old == number:
            return old
        previous = [p for p in pointer["previous"] if p != number]
        if old is not None:
            previous.append(old)
        self._write_pointer(number, previous)
        return None if old is None else int(old)

    def rollback(self) -> tuple[int, int]:
        """Make the previously current version current again: (from, to)."""
        pointer = self.pointer()
        current = pointer["version"]
        if current is None:
            raise RegistryError(f"registry {self.root} has no current version to roll back")
        existing = {v.number for v in self.versions()}
        previous = [p for p in pointer["previous"] if p in existing and p != current]
        if not previous:
            raise RegistryError(
                f"registry {self.root}: v{current} is current and no earlier current version "
                "is kept; promote one explicitly with `dkm models promote CONFIG VERSION`"
            )
        target = previous.pop()
        self._write_pointer(target, previous)
        return int(current), target

    def remove_version(self, number: int) -> None:
        """Delete version ``number`` (it disappears from listings first)."""
        if number == self.current():
            raise RegistryError(f"v{number} is current in {self.root}; promote another first")
        url = self.version_url(number)
        if self._local:
            hidden = f"{self.root}/.v{number}.deleted-{uuid.uuid4().hex}"
            os.rename(url, hidden)  # gone from listings at once
            shutil.rmtree(hidden, ignore_errors=True)
        else:
            fs, path = _url_to_fs(url, self.storage_options)
            fs.rm_file(f"{path}/{VERSION_FILE}")  # unlisted first
            fs.rm(path, recursive=True)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the current one)."""
        versions = self.versions()
        current = self.current()
        newest = {v.number for v in versions[-keep:]} if keep > 0 else set()
        doomed = [v.number for v in versions if v.number not in newest and v.number != current]
        for number in doomed:
            self.remove_version(number)
        if doomed and current is not None:
            pointer = self.pointer()
            kept = [p for p in pointer["previous"] if p not in doomed]
            if kept != pointer["previous"]:
                self._write_pointer(int(current), kept)
        return doomed
