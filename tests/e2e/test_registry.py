"""The model registry: versions, the atomic ``current`` pointer, promote, rollback, prune."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from dkm import io
from dkm.estimators import KMeans
from dkm.io._paths import _url_to_fs
from dkm.models import load_model, save_model
from dkm.registry import MARKER, Registry, RegistryError


def _writer(payload: str):
    def write(url: str) -> None:
        io.text_writer(url)("payload.txt", payload)

    return write


def _fail(url: str) -> None:
    io.text_writer(url)("half.txt", "half-written")
    raise RuntimeError("the fit failed")


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    if request.param == "local":
        yield Registry(str(tmp_path / "reg"), "demo")
        return
    root = f"memory://reg-{uuid.uuid4().hex}"
    yield Registry(root, "demo")
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def _read(registry: Registry, number: int, name: str) -> str:
    fs, path = _url_to_fs(f"{registry.version_url(number)}/{name}", None)
    return bytes(fs.cat_file(path)).decode()


def test_versions_pointer_promote_rollback(registry):
    assert registry.versions() == [] and registry.current() is None
    v1 = registry.add_version(_writer("one"), {"decision": "first"})
    assert v1.number == 1 and registry.current() is None  # adding does not promote
    registry.promote(1)
    v2 = registry.add_version(_writer("two"), {"decision": "promoted"})
    registry.promote(v2.number)
    v3 = registry.add_version(_writer("three"), {"decision": "refused"})
    assert [v.number for v in registry.versions()] == [1, 2, 3]
    assert registry.current() == 2 and registry.pointer()["previous"] == [1]
    assert _read(registry, 3, "payload.txt") == "three"
    assert registry.get(3).info["decision"] == "refused" and "created" in v3.info
    # promote a candidate by hand, then roll back twice
    assert registry.promote(3) == 2 and registry.current() == 3
    assert registry.rollback() == (3, 2) and registry.current() == 2
    assert registry.rollback() == (2, 1) and registry.current() == 1
    with pytest.raises(RegistryError, match="no earlier current version"):
        registry.rollback()
    with pytest.raises(RegistryError, match="no version v9"):
        registry.promote(9)


def test_a_failed_write_leaves_no_version(registry):
    registry.add_version(_writer("one"), {})
    registry.promote(1)
    with pytest.raises(RuntimeError, match="the fit failed"):
        registry.add_version(_fail, {})
    assert [v.number for v in registry.versions()] == [1] and registry.current() == 1
    fs, root = _url_to_fs(registry.root, None)
    leftovers = [p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != "v1"]
    # no temporary left
    assert sorted(p.rsplit("/", 1)[-1] for p in leftovers) == [MARKER, "current"]


def test_incomplete_version_is_not_listed_and_not_reused(tmp_path):
    registry = Registry(str(tmp_path), "m")
    os.makedirs(registry.version_url(1))  # a copy that never finished: no version.json
    assert registry.versions() == []
    assert registry.add_version(_writer("x"), {}).number == 2


def test_prune_keeps_the_newest_and_the_current(registry):
    for i in range(5):
        registry.add_version(_writer(str(i)), {})
    registry.promote(1)
    registry.promote(2)
    assert registry.prune(2) == [1, 3]  # the newest two and the current v2 stay
    assert [v.number for v in registry.versions()] == [2, 4, 5]
    assert registry.current() == 2 and registry.pointer()["previous"] == []


def test_prune_drops_pruned_versions_from_the_rollback_history(tmp_path):
    registry = Registry(str(tmp_path), "m")
    for i in range(4):
        registry.add_version(_writer(str(i)), {})
        registry.promote(i + 1)
    assert registry.pointer()["previous"] == [1, 2, 3]
    assert registry.prune(2) == [1, 2]
    assert registry.pointer() == {**registry.pointer(), "version": 4, "previous": [3]}
    assert sorted(os.listdir(registry.root)) == [MARKER, "current", "v3", "v4"]


def test_the_current_version_survives_pruning_however_old(tmp_path):
    registry = Registry(str(tmp_path), "m")
    for i in range(5):
        registry.add_version(_writer(str(i)), {})
    registry.promote(1)
    assert registry.prune(2) == [2, 3]
    assert [v.number for v in registry.versions()] == [1, 4, 5]


def test_pointer_is_replaced_atomically(tmp_path, monkeypatch):
    registry = Registry(str(tmp_path), "m")
    registry.add_version(_writer("a"), {})
    registry.add_version(_writer("b"), {})
    registry.promote(1)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        registry.promote(2)
    monkeypatch.undo()
    assert registry.current() == 1  # the old pointer, whole
    # no temporary left
    assert sorted(os.listdir(registry.root)) == [MARKER, "current", "v1", "v2"]


def test_corrupt_pointer_is_a_clear_error(tmp_path):
    registry = Registry(str(tmp_path), "m")
    os.makedirs(registry.root)
    Path(registry.root, "current").write_text("{not json")
    with pytest.raises(RegistryError, match=r"not readable.*dkm models promote"):
        registry.current()


def test_bad_name_is_refused(tmp_path):
    with pytest.raises(RegistryError, match="registry name"):
        Registry(str(tmp_path), "../x")


def test_models_in_a_memory_registry_round_trip():
    root = f"memory://reg-{uuid.uuid4().hex}"
    registry = Registry(root, "km")
    X = np.random.default_rng(0).normal(size=(200, 2))
    km = KMeans(3, random_state=0).fit(X)
    v = registry.add_version(lambda url: save_model(km, f"{url}/model"), {"decision": "first"})
    registry.promote(v.number)
    back = load_model(registry.model_url(registry.current()))
    np.testing.assert_array_equal(back.predict(X), km.predict(X))
    fs = fsspec.filesystem("memory")
    pointer = json.loads(fs.cat_file(f"{root.removeprefix('memory://')}/km/current"))
    assert pointer["version"] == 1
    fs.rm(root.removeprefix("memory://"), recursive=True)


def test_readme_documents_the_registry_keys():
    from dkm import config as c

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    keys = {*c.RegistryConfig.model_fields, *c.GuardsConfig.model_fields, "registry"}
    missing = {name for name in keys if f"`{name}" not in readme}
    assert not missing, f"README's config reference lacks {sorted(missing)}"
    assert "dkm recluster" in readme and "dkm models" in readme
