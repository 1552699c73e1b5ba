"""Where outputs go: the rule for what dkm may replace, its manifest, atomic output
(write aside, move into place) and small files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from dkm.io._paths import InputError, _join, _listing, _local_path, _split, _url_to_fs, _version

#: Where `dkm run` (and `dkm recluster`) write the model inside the output folder.
OUTPUT_MODEL = "model"


class OutputExistsError(InputError):
    """Something is at an output path that this command may not replace."""


#: The manifest dkm writes at the top of every output it moves into place: what wrote it
#: and which top-level entries it wrote. Only a location holding it (or an output of an
#: earlier dkm, recognised by its own layout) may ever be replaced.
OUTPUT_MARKER = ".dkm-output.json"
OUTPUT_MARKER_FORMAT = 1
#: How a user asks to replace an earlier dkm output, for messages.
OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python)"

#: What ``dkm run`` / ``dkm recluster`` wrote into an output folder before the marker.
_LEGACY_RUN_ENTRIES = frozenset(
    {
        "summary.json",
        "metrics.jsonl",
        "model",
        "labels.zarr",
        "responsibilities.zarr",
        "report",
        "drift.json",
        "drift.png",
    }
)

OutputState = Literal["missing", "empty", "dkm", "file", "symlink", "read-only", "foreign"]


@dataclass(frozen=True)
class ExistingOutput:
    """What is at an output location, as :func:`inspect_output` sees it.

    ``state``: ``missing``; ``empty`` (an empty directory); ``dkm`` (an earlier output of
    dkm, which ``what`` names); or something dkm must not replace: ``file``, ``symlink``,
    ``read-only`` (a directory without write permission), ``foreign`` (a directory or
    zarr store dkm did not write, or a dkm output to which other entries were added).
    ``what`` says it in words, for messages.
    """

    state: OutputState
    what: str


def _zarr_attributes(text: str | None) -> dict[str, Any] | None:
    """The attributes of a zarr v3 group's ``zarr.json``, or None if it is not one."""
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes") or {}
    return attrs if isinstance(attrs, dict) else None


def _classify_dkm(
    entries: list[str], read: Callable[[str], str | None], is_dir: Callable[[str], bool]
) -> ExistingOutput:
    """Classify a non-empty directory from its top-level ``entries``.

    ``read(name)`` gives a top-level file's text (None if missing or unreadable),
    ``is_dir(name)`` whether an entry is a directory.
    """
    listed = _listing(sorted(entries))
    names = set(entries)
    if OUTPUT_MARKER in names:
        try:
            manifest = json.loads(read(OUTPUT_MARKER) or "")
            written = set(manifest["entries"]) | {OUTPUT_MARKER}
            command = str(manifest.get("command", "dkm"))
        except (ValueError, KeyError, TypeError):
            return ExistingOutput(
                "foreign", f"a directory with an unreadable {OUTPUT_MARKER} ({listed})"
            )
        added = sorted(names - written)
        if added:
            return ExistingOutput(
                "foreign",
                f"the output of `dkm {command}` with entries dkm did not write: {_listing(added)}",
            )
        return ExistingOutput("dkm", f"the output of an earlier `dkm {command}`")
    attrs = _zarr_attributes(read("zarr.json")) if "zarr.json" in names else None
    if attrs is not None:
        if "dkm_checkpoint" in attrs:
            what = "a dkm checkpoint"
        elif "dkm_format" in attrs:
            what = "a dkm model"
        elif "generator" in attrs and "dkm_version" in attrs:
            what = "a data set written by `dkm make-data`"
        else:
            return ExistingOutput("foreign", f"a zarr group dkm did not write ({listed})")
        members = {"zarr.json", *(attrs.get("points", "points"), "labels_true")}
        if "generator" not in attrs:  # models and checkpoints: arrays and subgroups only
            members = {e for e in names if e == "zarr.json" or is_dir(e)}
        added = sorted(names - members)
        if added:
            return ExistingOutput(
                "foreign", f"{what} with entries dkm did not write: {_listing(added)}"
            )
        return ExistingOutput("dkm", what)
    if "summary.json" in names and names <= _LEGACY_RUN_ENTRIES:
        try:
            summary = json.loads(read("summary.json") or "")
        except ValueError:
            summary = None
        if isinstance(summary, dict) and "dkm_version" in summary and "job" in summary:
            return ExistingOutput("dkm", "the output of an earlier `dkm run` or `dkm recluster`")
    return ExistingOutput("foreign", f"a directory dkm did not write ({listed})")


def inspect_output(url: str, *, storage_options: dict[str, Any] | None = None) -> ExistingOutput:
    """What is at the output location ``url`` (see :class:`ExistingOutput`)."""
    local = _local_path(url)
    if local is not None:
        path = os.path.abspath(local)
        if os.path.islink(path):
            return ExistingOutput("symlink", f"a symbolic link to {os.readlink(path)}")
        if not os.path.lexists(path):
            return ExistingOutput("missing", "nothing")
        if not os.path.isdir(path):
            return ExistingOutput("file", f"a file of {os.path.getsize(path):,} bytes")
        if not os.stat(path).st_mode & 0o222:
            return ExistingOutput("read-only", "a read-only directory")
        entries = os.listdir(path)
        if not entries:
            return ExistingOutput("empty", "an empty directory")

        def read_local(name: str) -> str | None:
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    return f.read(1 << 20)
            except (OSError, UnicodeDecodeError):
                return None

        return _classify_dkm(
            entries, read_local, lambda name: os.path.isdir(os.path.join(path, name))
        )
    fs, root = _url_to_fs(url, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        return ExistingOutput("missing", "nothing")
    if fs.isfile(root):
        return ExistingOutput("file", "an object")
    listing = fs.ls(root, detail=True)
    kinds = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("type") for p in listing}
    kinds.pop("", None)
    if not kinds:
        return ExistingOutput("empty", "an empty directory")

    def read_remote(name: str) -> str | None:
        try:
            return bytes(fs.cat_file(f"{root}/{name}")).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    return _classify_dkm(list(kinds), read_remote, lambda name: kinds.get(name) == "directory")


def claim_output(
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    hint: str = OVERWRITE_HINT,
) -> ExistingOutput:
    """Raise :class:`OutputExistsError` unless dkm may write ``url``; check it can.

    dkm writes where nothing is, over an empty directory, and over its own earlier output
    if ``overwrite`` (``hint`` says how the user asks for that). Anything else (a file, a
    symbolic link, a read-only or foreign directory, a zarr store with arrays dkm did not
    write) is refused whatever ``overwrite`` says. Then :func:`check_writable` creates
    missing parent directories and writes a probe where the output will go.
    """
    existing = _refuse_unless_allowed(url, overwrite, storage_options, hint)
    check_writable(url, storage_options=storage_options, create_parents=True)
    return existing


def _refuse_unless_allowed(
    url: str, overwrite: bool, storage_options: dict[str, Any] | None, hint: str
) -> ExistingOutput:
    """What is at ``url``, if dkm may write there; else :class:`OutputExistsError`."""
    existing = inspect_output(url, storage_options=storage_options)
    if existing.state == "dkm" and not overwrite:
        raise OutputExistsError(
            f"{url} holds {existing.what}; {hint} to replace it, or choose another path"
        )
    if existing.state not in ("missing", "empty", "dkm"):
        advice = {
            "symlink": "dkm does not write through or over links: give the real path",
            "read-only": "dkm does not replace it: make it writable or choose another path",
        }.get(existing.state, "dkm never replaces what it did not write: choose another path")
        raise OutputExistsError(f"cannot write {url}: it is {existing.what}; {advice}")
    return existing


def check_writable(
    url: str, *, storage_options: dict[str, Any] | None = None, create_parents: bool = False
) -> None:
    """Raise InputError unless ``url`` could be created or replaced.

    A probe is written where ``url`` and its siblings (temporary outputs, checkpoints) go,
    and removed. Local paths: the parent directory must exist (``create_parents``: it is
    created, like ``mkdir -p``) and be writable, and a directory with no write permission
    at all is refused even for root. Other URLs: a tiny probe object is written next to the
    target and removed (object stores have no directories to check).
    """
    parent, name = _split(url)
    if not name:
        raise InputError(f"cannot write {url!r}: it names no file or directory")
    if _local_path(url) is not None:
        if create_parents and not os.path.lexists(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise InputError(
                    f"cannot write {url}: cannot create the directory {parent} "
                    f"({e.strerror or e}); create it first or choose another path"
                ) from None
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise InputError(f"cannot write {url}: the directory {parent} {what}; create it first")
        if not os.stat(parent).st_mode & 0o222 or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {url}: the directory {parent} is not writable")
        probe = os.path.join(parent, f".dkm-write-check-{uuid.uuid4().hex}")
        try:
            os.mkdir(probe)
            with open(os.path.join(probe, "probe"), "wb") as f:
                f.write(b"dkm")
        except OSError as e:
            raise InputError(
                f"cannot write {url}: creating a file in {parent} failed ({e.strerror or e}); "
                "choose a directory on a writable file system"
            ) from None
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        return
    probe = _join(parent, f".dkm-write-check-{uuid.uuid4().hex}")
    try:
        fs, path = _url_to_fs(probe, storage_options)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as e:  # each fsspec backend raises its own errors
        raise InputError(
            f"cannot write {url} ({type(e).__name__}: {e}): check the URL and credentials"
        ) from e


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class AtomicOutput:
    """Write to a temporary sibling of ``url``; move it into place only on success.

    ``with AtomicOutput(url, command=…) as tmp:`` claims ``url`` (:func:`claim_output`:
    nothing there, an empty directory, or with ``overwrite`` an earlier dkm output;
    anything else is :class:`OutputExistsError`, and untouched), then yields ``tmp`` =
    ``<parent>/.<name>.tmp-<uuid>`` to write into: a directory (created empty for local
    paths; a prefix on object stores), so that outputs can be nested in it. On success
    the manifest :data:`OUTPUT_MARKER` (the command and the top-level entries written) is
    added to ``tmp``, the claim checked again, an existing target renamed aside
    (``.<name>.old-<uuid>``), ``tmp`` renamed to the target and the old one deleted; if
    nothing was written (``tmp`` missing or empty) the target is left alone. On an
    exception ``tmp`` is deleted, the target untouched, and the exception propagates.
    Local renames are atomic; on object stores (fsspec ``mv``: copy, then delete) the
    move is not, but a failed write still never touches the target.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        command: str = "save",
        overwrite: bool = False,
        hint: str = OVERWRITE_HINT,
    ) -> None:
        self.url = url
        self.storage_options = storage_options
        self.command, self.overwrite, self.hint = command, overwrite, hint
        parent, name = _split(url)
        token = uuid.uuid4().hex
        self._local = _local_path(url) is not None
        self.target = _join(parent, name)
        self.temporary = _join(parent, f".{name}.tmp-{token}")
        self._old = _join(parent, f".{name}.old-{token}")

    def _recheck(self) -> None:
        """Before the rename: refuse what is there now if dkm may not replace it (the
        location was probed on entry)."""
        _refuse_unless_allowed(self.url, self.overwrite, self.storage_options, self.hint)

    def __enter__(self) -> str:
        claim_output(
            self.url, overwrite=self.overwrite, storage_options=self.storage_options, hint=self.hint
        )
        if self._local:
            os.mkdir(self.temporary)
        return self.temporary

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                self._discard()
                raise
        else:
            self._discard()
        return False

    def _manifest(self, entries: list[str]) -> bytes:
        from datetime import UTC, datetime

        manifest = {
            "dkm_output": OUTPUT_MARKER_FORMAT,
            "command": self.command,
            "dkm_version": _version(),
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "entries": sorted(e for e in entries if e != OUTPUT_MARKER),
        }
        return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")

    def _commit(self) -> None:
        if self._local:
            if not os.path.lexists(self.temporary):
                return
            entries = os.listdir(self.temporary) if os.path.isdir(self.temporary) else None
            if entries == []:
                os.rmdir(self.temporary)
                return
            if entries is not None:
                with open(os.path.join(self.temporary, OUTPUT_MARKER), "wb") as f:
                    f.write(self._manifest(entries))
            self._recheck()  # what is there may have changed while the output was written
            if os.path.lexists(self.target):
                os.replace(self.target, self._old)
                try:
                    os.replace(self.temporary, self.target)
                except BaseException:
                    os.replace(self._old, self.target)
                    raise
                _remove_local(self._old)
            else:
                os.replace(self.temporary, self.target)
            return
        fs, tmp = _url_to_fs(self.temporary, self.storage_options)
        target = _url_to_fs(self.target, self.storage_options)[1]
        old = _url_to_fs(self._old, self.storage_options)[1]
        if not fs.exists(tmp):
            return
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(tmp, detail=False)]
        fs.pipe_file(f"{tmp.rstrip('/')}/{OUTPUT_MARKER}", self._manifest(entries))
        self._recheck()
        if fs.exists(target):
            fs.mv(target, old, recursive=True)
            try:
                fs.mv(tmp, target, recursive=True)
            except BaseException:
                fs.mv(old, target, recursive=True)
                raise
            fs.rm(old, recursive=True)
        else:
            fs.mv(tmp, target, recursive=True)

    def _discard(self) -> None:
        try:
            if self._local:
                _remove_local(self.temporary)
            else:
                fs, tmp = _url_to_fs(self.temporary, self.storage_options)
                if fs.exists(tmp):
                    fs.rm(tmp, recursive=True)
        except OSError as e:  # never hide the error that made us discard
            warnings.warn(
                f"could not remove the temporary output {self.temporary}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )


def remove(url: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Delete an output dkm wrote at ``url`` (e.g. a finished run's checkpoint).

    Anything else there (see :func:`inspect_output`) is left alone.
    """
    if inspect_output(url, storage_options=storage_options).state != "dkm":
        return
    local = _local_path(url)
    if local is not None:
        _remove_local(os.path.abspath(local))
        return
    fs, path = _url_to_fs(url, storage_options)
    fs.rm(path, recursive=True)


# --------------------------------------------------------------------------- small files


def text_writer(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> Callable[[str, str], None]:
    """A function ``write(name, text)`` that writes UTF-8 text to ``<url>/<name>``.

    ``url`` is a directory: a local path (created if missing) or an fsspec URL.
    """
    local = _local_path(url)
    if local is not None:
        root = os.path.abspath(local)

        def write_local(name: str, text: str) -> None:
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

        return write_local
    fs, root = _url_to_fs(url, storage_options)

    def write_remote(name: str, text: str) -> None:
        fs.pipe_file(f"{root.rstrip('/')}/{name}", text.encode("utf-8"))

    return write_remote


@contextmanager
def local_dir(url: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local directory for tools that only write local files, copied to ``url`` on success.

    For a local ``url`` it is ``url`` itself (created if missing). For other URLs it is a
    temporary directory whose files are uploaded under ``url`` when the block succeeds,
    and which is deleted either way.
    """
    local = _local_path(url)
    if local is not None:
        path = os.path.abspath(local)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    fs, root = _url_to_fs(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="dkm-") as staging:
        yield staging
        for folder, _, files in os.walk(staging):
            for name in files:
                source = os.path.join(folder, name)
                relative = os.path.relpath(source, staging).replace(os.sep, "/")
                fs.put_file(source, f"{root.rstrip('/')}/{relative}")
