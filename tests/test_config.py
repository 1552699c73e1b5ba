"""Configs: every shipped config validates; bad ones name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkm.config import ConfigError, JobConfig, apply_overrides, load_config, validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = {"data": {"kind": "synthetic"}, "output": {"path": "out"}}


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"kmeans.yaml", "gmm.yaml", "zarr.yaml", "scheduler.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert validate_config(cfg.to_dict()) == cfg  # round trip


def test_defaults_follow_the_mode():
    km = validate_config(MINIMAL)
    assert km.model.resolved("covariance_type") == "identity"
    assert km.model.resolved("assignment") == "hard"
    assert km.model.resolved("tol") == 1e-4 and km.cluster.kind == "local"
    gm = validate_config({**MINIMAL, "model": {"mode": "gmm"}})
    assert gm.model.resolved("covariance_type") == "full"
    assert gm.model.resolved("init") == "kmeans" and gm.model.resolved("max_iter") == 100


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {**MINIMAL, "model": {"mode": "gmm", "covariance_type": "ful"}},
            "model.covariance_type: expected one of identity, full, tied, diag, spherical, "
            "got 'ful'",
        ),
        ({**MINIMAL, "model": {"n_clusters": "many"}}, "model.n_clusters: "),
        ({**MINIMAL, "model": {"n_clusters": 0}}, "model.n_clusters: "),
        ({**MINIMAL, "modle": {}}, "modle: unknown key"),
        ({**MINIMAL, "model": {"n_cluster": 3}}, "model.n_cluster: unknown key"),
        ({"data": {"kind": "synthetic"}}, "output: Field required"),
        ({**MINIMAL, "data": {"kind": "zar"}}, "data.kind: expected one of synthetic, zarr"),
        ({**MINIMAL, "data": {"kind": "zarr"}}, "data.url: Field required"),
        ({**MINIMAL, "data": {"n": 5}}, "data: needs a 'kind' key"),
        (
            {**MINIMAL, "cluster": {"kind": "address", "address": "localhost"}},
            "cluster.address: expected a scheduler address",
        ),
        ({**MINIMAL, "model": {"mode": "kmeans", "covariance_type": "full"}}, "needs mode: gmm"),
        ({**MINIMAL, "runtime": {"split_every": 1}}, "runtime.split_every"),
        ({**MINIMAL, "runtime": {"persist": "sometimes"}}, "runtime.persist: expected one of"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "test.yaml")
    assert message in str(e.value)


def test_overrides():
    raw = apply_overrides(
        MINIMAL,
        [
            "model.n_clusters=32",
            "model.tol=1e-3",
            "runtime.persist=never",
            "cluster.kind=address",
            "cluster.address=tcp://h:1",
        ],
    )
    cfg = validate_config(raw)
    assert cfg.model.n_clusters == 32 and cfg.model.tol == 1e-3
    assert cfg.runtime.persist == "never" and cfg.cluster.kind == "address"
    assert MINIMAL["data"] == {"kind": "synthetic"}  # not modified in place
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides(MINIMAL, ["model.n_clusters"])
    with pytest.raises(ConfigError, match=r"output\.path is not a section"):
        apply_overrides(MINIMAL, ["output.path.x=1"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  kind: synthetic\n  n: [1, 2\noutput: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo owned']\noutput: {path: x}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_readme_documents_every_config_key():
    from dkm import config as c

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    models = [
        c.SyntheticData,
        c.ZarrData,
        c.NpyData,
        c.ParquetData,
        c.ModelConfig,
        c.LocalClusterConfig,
        c.AddressClusterConfig,
        c.JobQueueClusterConfig,
        c.KubernetesClusterConfig,
        c.TLSConfig,
        c.ModelInit,
        c.KRange,
        c.OutputConfig,
        c.RuntimeConfig,
    ]
    missing = {name for m in models for name in m.model_fields if f"`{name}" not in readme}
    assert not missing, f"README's config reference lacks {sorted(missing)}"
