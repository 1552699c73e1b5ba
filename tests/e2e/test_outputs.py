"""Every writing command over every kind of existing output path: dkm replaces only what it
wrote itself, only when asked (``--overwrite``), and leaves anything else byte-identical."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from conftest import blobs

from dkm import io
from dkm.cli import main

KINDS = (
    "missing",
    "empty dir",
    "file",
    "foreign dir",
    "foreign zarr group",
    "symlink",
    "read-only dir",
    "dkm output",
    "dkm output + a user's file",
)
COMMANDS = ("run", "recluster", "predict", "make-data", "registry")

#: The outcome table: (kind, --overwrite given) -> exit code, for every command but the
#: registry (which only ever adds versions to a registry of its own).
EXPECTED = {
    ("missing", False): 0,
    ("missing", True): 0,
    ("empty dir", False): 0,
    ("empty dir", True): 0,
    ("dkm output", False): 2,
    ("dkm output", True): 0,
}
#: A registry of dkm's is added to (its other entries, a user's file too, stay as they are).
REGISTRY_EXPECTED = {"missing": 0, "empty dir": 0, "dkm output": 0, "dkm output + a user's file": 0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, scheduler):
    """Points (.npy), a model fitted on them, and a config template, outside every sandbox."""
    root = tmp_path_factory.mktemp("inputs")
    X = blobs(n=600, d=3, k=3)
    np.save(root / "points.npy", X)
    config = {
        "data": {"kind": "npy", "path": str(root / "points.npy"), "chunk_rows": 200},
        "model": {"mode": "kmeans", "n_clusters": 3, "seed": 0, "max_iter": 5},
        "cluster": {"kind": "address", "address": scheduler},
        "output": {"path": str(root / "model-run")},
        "runtime": {"checkpoint_every": 0},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return root


def dkm(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def command_args(command: str, target: Path, sandbox: Path, inputs: Path) -> list[str]:
    """The command line that writes ``target`` (for "registry": the registry's root)."""
    config = str(inputs / "config.yaml")
    if command == "run":
        return ["run", config, "--set", f"output.path={target}", "-q"]
    if command in ("recluster", "registry"):
        location = target.parent if command == "registry" else sandbox / "registry"
        name = target.name if command == "registry" else "r"
        fresh = f"recluster-out-{len(list(sandbox.glob('recluster-out-*')))}"
        output = sandbox / fresh if command == "registry" else target
        return [
            "recluster",
            config,
            "--set",
            f"output.path={output}",
            "--set",
            f"registry={{location: {location}, name: {name}}}",
            "--set",
            "model.n_init=1",
            "-q",
        ]
    if command == "predict":
        return [
            "predict",
            "--model",
            str(inputs / "model-run" / "model"),
            "--data",
            str(inputs / "points.npy"),
            "--out",
            str(target),
        ]
    assert command == "make-data"
    return ["make-data", "--n", "100", "--d", "2", "--k", "2", "--out", str(target)]


def prepare(kind: str, target: Path, command: str, sandbox: Path, inputs: Path) -> None:
    """Put ``kind`` at ``target``."""
    if kind == "missing":
        return
    if kind == "empty dir":
        target.mkdir()
    elif kind == "file":
        target.write_bytes(b"precious data\n")
    elif kind == "foreign dir":
        target.mkdir()
        (target / "notes.txt").write_text("my notes\n")
        (target / "sub").mkdir()
        (target / "sub" / "more.txt").write_text("more\n")
    elif kind == "foreign zarr group":
        group = zarr.open_group(str(target), mode="w", attributes={"owner": "someone else"})
        group.create_array("theirs", data=np.arange(10.0))
    elif kind == "symlink":
        elsewhere = sandbox / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "notes.txt").write_text("behind the link\n")
        target.symlink_to(elsewhere)
    elif kind == "read-only dir":
        target.mkdir()
        target.chmod(0o555)
    else:  # an earlier output of the same command
        code, output = dkm(*command_args(command, target, sandbox, inputs))
        assert code == 0, output
        assert io.inspect_output(str(target)).state == "dkm" or command == "registry"
        if kind == "dkm output + a user's file":
            (target / "notes.txt").write_text("added by the user\n")


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``root``: type, mode and content (files) or target (links)."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if any(path == s or s in path.parents for s in skip):
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[str(path)] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                entries[str(path)] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return entries


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "--overwrite"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_outcome_table(command, kind, overwrite, tmp_path, inputs):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    target = sandbox / ("reg" if command == "registry" else "target")
    prepare(kind, target, command, sandbox, inputs)
    before = snapshot(sandbox)
    inode = target.lstat().st_ino if target.exists() else None
    args = command_args(command, target, sandbox, inputs)
    code, output = dkm(*args, *(["--overwrite"] if overwrite else []))
    try:
        if command == "registry":
            expected = REGISTRY_EXPECTED.get(kind, 2)
        else:
            expected = EXPECTED.get((kind, overwrite), 2)
        assert code == expected, output
        if code == 2:
            assert str(target) in output or str(target.name) in output, output
            assert "Traceback" not in output
            # nothing at all changed in the sandbox, the refused path included
            assert snapshot(sandbox) == before
            return
        if command == "registry":
            assert (target / "current").exists() and (target / "v1" / "model").is_dir()
            # the registry's earlier versions are kept as they were
            untouched = {p: v for p, v in before.items() if "/reg/v1" in p or "notes" in p}
            assert {p: v for p, v in snapshot(sandbox).items() if p in untouched} == untouched
            return
        assert io.inspect_output(str(target)).state == "dkm"
        if kind == "dkm output":
            assert target.lstat().st_ino != inode  # replaced, by a rename
        # everything beside the output (and the registry recluster adds to) is as it was
        skip = (target, sandbox / "registry")
        assert snapshot(sandbox, skip=skip) == {
            p: v for p, v in before.items() if not any(p.startswith(str(s)) for s in skip)
        }
    finally:
        if target.is_dir() and not target.is_symlink():
            target.chmod(0o755)  # let pytest clean up a read-only directory


def test_readme_states_the_rule():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "--overwrite" in readme and "output.overwrite" in readme and io.OUTPUT_MARKER in readme


def test_checkpoint_path_is_claimed_too(tmp_path, inputs):
    out = tmp_path / "out"
    Path(f"{out}.checkpoint").write_bytes(b"not a checkpoint\n")
    code, output = dkm(
        "run", str(inputs / "config.yaml"), "--set", f"output.path={out}", "--overwrite"
    )
    assert code == 2 and "out.checkpoint" in output and "file" in output
    assert Path(f"{out}.checkpoint").read_bytes() == b"not a checkpoint\n"
    assert not out.exists()


def test_unwritable_location_fails_before_the_fit(tmp_path, inputs):
    """/proc accepts no new entries even for root: the probe, not os.access, tells."""
    code, output = dkm("run", str(inputs / "config.yaml"), "--set", "output.path=/proc/dkm-out")
    assert code == 2, output
    assert "/proc/dkm-out" in output and "not writable" in output
    assert "iteration" not in output and "Traceback" not in output


def test_probe_fails_where_permissions_say_yes(tmp_path, monkeypatch, inputs):
    """A parent that looks writable but refuses files is caught by the probe."""
    real_mkdir = os.mkdir

    def refusing(path, *args, **kwargs):
        if ".dkm-write-check-" in str(path):
            raise OSError(30, "Read-only file system")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing)
    with pytest.raises(io.InputError, match=r"creating a file in .* failed \(Read-only file sys"):
        io.check_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["run", "recluster"])
def test_config_key_overwrite_is_the_flag(command, tmp_path, inputs):
    """``output.overwrite: true`` in the config replaces a dkm output as --overwrite does,
    and still refuses anything else."""
    target = tmp_path / "target"
    args = command_args(command, target, tmp_path, inputs)
    assert dkm(*args)[0] == 0
    assert dkm(*args)[0] == 2
    assert dkm(*args, "--set", "output.overwrite=true")[0] == 0
    (target / "notes.txt").write_text("mine\n")
    code, output = dkm(*args, "--set", "output.overwrite=true")
    assert code == 2 and "notes.txt" in output
    assert (target / "notes.txt").read_text() == "mine\n"


def test_remove_deletes_only_what_dkm_wrote(tmp_path):
    """io.remove (a finished run's checkpoint) leaves anything else at the path as it was."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    (tmp_path / "file").write_bytes(b"precious\n")
    before = snapshot(tmp_path)
    io.remove(str(foreign))
    io.remove(str(tmp_path / "file"))
    assert snapshot(tmp_path) == before
    with io.AtomicOutput(str(tmp_path / "ours")) as tmp:
        (Path(tmp) / "a.txt").write_text("dkm's\n")
    io.remove(str(tmp_path / "ours"))
    assert not (tmp_path / "ours").exists() and snapshot(tmp_path) == before
