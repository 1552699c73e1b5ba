"""TLS: dkm on a real `dask scheduler`/`dask worker` started with TLS, and the config checks.

A throwaway CA signs the scheduler's/worker's and the client's certificates; a second CA
signs a client certificate the scheduler must refuse.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import dask
import psutil
import pytest
import yaml
from conftest import _free_port, process_cluster
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dkm.cluster import ClusterError, connect
from dkm.config import (
    AddressClusterConfig,
    ConfigError,
    LocalClusterConfig,
    TLSConfig,
    validate_config,
)
from dkm.models import load_model

DKM = [sys.executable, "-m", "dkm.cli"]

#: Dask's own TLS settings switched off (environment variables override Dask's config
#: files), so that only the job config can supply certificates.
NO_DASK_TLS = {
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "None",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "None",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "None",
}
NO_DASK_TLS_CONFIG = {
    "distributed.comm.tls.ca-file": None,
    "distributed.comm.tls.client.cert": None,
    "distributed.comm.tls.client.key": None,
}


# --------------------------------------------------------------------------- certificates


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, prefix: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    """A self-signed CA; writes ``{prefix}ca.pem``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"dkm test {prefix}CA")
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{prefix}ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, name


def make_cert(directory: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Name], name: str) -> None:
    """A certificate signed by ``ca`` for 127.0.0.1: ``{name}.pem`` and ``{name}-key.pem``."""
    ca_key, ca_name = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"dkm test {name}"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}-key.pem").write_bytes(_pem_key(key))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem signs cluster.pem (scheduler, worker) and client.pem; other-ca.pem signs
    other-client.pem; client-with-key.pem holds the client's certificate and key."""
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca(d, "")
    make_cert(d, ca, "cluster")
    make_cert(d, ca, "client")
    (d / "client-with-key.pem").write_bytes(
        (d / "client.pem").read_bytes() + (d / "client-key.pem").read_bytes()
    )
    make_cert(d, make_ca(d, "other-"), "other-client")
    return d


def client_security(certs: Path) -> dict[str, str]:
    return {
        "ca_file": str(certs / "ca.pem"),
        "cert": str(certs / "client.pem"),
        "key": str(certs / "client-key.pem"),
    }


# --------------------------------------------------------------------------- TLS cluster


def _tls_options(certs: Path) -> list[str]:
    return [
        "--tls-ca-file",
        str(certs / "ca.pem"),
        "--tls-cert",
        str(certs / "cluster.pem"),
        "--tls-key",
        str(certs / "cluster-key.pem"),
    ]


@pytest.fixture(scope="module")
def tls_scheduler(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[int]:
    """A TLS scheduler and one TLS worker as processes on 127.0.0.1; yields the port."""
    from distributed.security import Security

    security = Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_client_cert=str(certs / "client.pem"),
        tls_client_key=str(certs / "client-key.pem"),
        require_encryption=True,
    )
    workdir = tmp_path_factory.mktemp("dask-tls")
    with process_cluster(
        workdir, 1, protocol="tls", extra_args=_tls_options(certs), security=security
    ) as cluster:
        yield int(cluster.address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small zarr store made by ``dkm make-data``."""
    store = tmp_path_factory.mktemp("tls-data") / "data.zarr"
    args = ["--n", "4000", "--d", "3", "--k", "3", "--chunk-rows", "1000", "--seed", "2"]
    subprocess.run(
        [*DKM, "make-data", *args, "--out", str(store)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return store


def dkm_run(tmp_path: Path, data: Path, cluster: dict) -> subprocess.CompletedProcess[str]:
    """``dkm run`` as a subprocess, with Dask's own TLS settings switched off."""
    config = {
        # the workers read the data and write the labels: absolute paths
        "data": {"kind": "zarr", "url": str(data), "array": "points"},
        "model": {"mode": "kmeans", "n_clusters": 3, "seed": 0},
        "cluster": cluster,
        "output": {"path": str(tmp_path / "out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run(
        [*DKM, "run", "c.yaml"],
        cwd=tmp_path,
        env={**os.environ, **NO_DASK_TLS},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- dkm run


@pytest.mark.distributed
def test_run_on_tls_scheduler_with_config_security(tmp_path, certs, tls_scheduler, data):
    cluster = {
        "kind": "address",
        "address": f"tls://127.0.0.1:{tls_scheduler}",
        "security": client_security(certs),
    }
    result = dkm_run(tmp_path, data, cluster)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_samples"] == 4000 and summary["n_clusters"] == 3
    model = load_model(str(tmp_path / "out" / "model"))
    assert model.cluster_centers_.shape == (3, 3)
    assert f"tls://127.0.0.1:{tls_scheduler}" in result.stderr  # the job's start line


@pytest.mark.distributed
def test_run_on_tls_scheduler_without_security_exits_2(tmp_path, tls_scheduler, data):
    cluster = {"kind": "address", "address": f"tls://127.0.0.1:{tls_scheduler}"}
    result = dkm_run(tmp_path, data, cluster)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"tls://127.0.0.1:{tls_scheduler} uses TLS" in result.stderr
    assert "cluster.security" in result.stderr and "distributed.comm.tls" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.distributed
def test_plain_tcp_client_cannot_talk_to_tls_scheduler(tmp_path, tls_scheduler, data):
    cluster = {"kind": "address", "address": f"tcp://127.0.0.1:{tls_scheduler}"}
    result = dkm_run(tmp_path, data, cluster)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"tcp://127.0.0.1:{tls_scheduler} failed in the handshake" in result.stderr
    assert "tls:// address" in result.stderr and "cluster.security" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# --------------------------------------------------------------------------- connect


def _address_config(port: int, **security: str) -> AddressClusterConfig:
    return AddressClusterConfig(
        kind="address",
        address=f"tls://127.0.0.1:{port}",
        security=TLSConfig(**security) if security else None,
    )


@pytest.mark.distributed
def test_key_inside_the_cert_file(certs, tls_scheduler):
    config = _address_config(
        tls_scheduler, ca_file=str(certs / "ca.pem"), cert=str(certs / "client-with-key.pem")
    )
    with connect(config) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert client.scheduler_info()["address"] == f"tls://127.0.0.1:{tls_scheduler}"


@pytest.mark.distributed
def test_dask_config_supplies_the_certificates(certs, tls_scheduler):
    tls = client_security(certs)
    settings = {
        "distributed.comm.tls.ca-file": tls["ca_file"],
        "distributed.comm.tls.client.cert": tls["cert"],
        "distributed.comm.tls.client.key": tls["key"],
    }
    with dask.config.set(settings), connect(_address_config(tls_scheduler)) as client:
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.mark.distributed
@pytest.mark.parametrize(
    "files, message",
    [
        # the scheduler's certificate is not signed by the client's ca_file
        (
            {"ca_file": "other-ca.pem", "cert": "other-client.pem", "key": "other-client-key.pem"},
            "certificate verify failed",
        ),
        # the scheduler does not trust the CA of the client's certificate
        (
            {"ca_file": "ca.pem", "cert": "other-client.pem", "key": "other-client-key.pem"},
            "failed in the handshake",
        ),
    ],
    ids=["scheduler-not-trusted", "client-not-trusted"],
)
def test_handshake_failure_is_a_cluster_error(certs, tls_scheduler, files, message):
    config = _address_config(tls_scheduler, **{k: str(certs / v) for k, v in files.items()})
    with pytest.raises(ClusterError) as e, connect(config):
        pass
    text = str(e.value)
    assert f"tls://127.0.0.1:{tls_scheduler}" in text and message in text
    assert "ca_file of cluster.security" in text


@pytest.mark.parametrize(
    "files, message",
    [
        ({"ca_file": "ca.pem", "cert": "client.pem", "key": "other-client-key.pem"}, "mismatch"),
        ({"ca_file": "ca.pem", "cert": "client.pem"}, "PEM lib"),  # no key in client.pem
        (
            {"ca_file": "client-key.pem", "cert": "client.pem", "key": "client-key.pem"},
            "no certificate or crl found",
        ),
    ],
    ids=["key-of-another-cert", "missing-key", "ca-file-not-a-certificate"],
)
def test_unusable_certificate_files_are_a_cluster_error(certs, files, message):
    # the files are loaded before connecting: no scheduler is needed at this port
    config = _address_config(_free_port(), **{k: str(certs / v) for k, v in files.items()})
    with pytest.raises(ClusterError) as e, connect(config):
        pass
    assert "cannot use the TLS certificates for tls://127.0.0.1:" in str(e.value)
    assert message in str(e.value) and "cluster.security are PEM files" in str(e.value)


def test_tls_address_without_any_certificates_is_a_cluster_error():
    config = _address_config(_free_port())
    with dask.config.set(NO_DASK_TLS_CONFIG), pytest.raises(ClusterError) as e, connect(config):
        pass
    assert "uses TLS, but no certificates are configured" in str(e.value)
    assert "cluster.security" in str(e.value)


def test_tls_hints_for_an_address_from_the_command_line():
    from dkm.cluster import Hints

    config = _address_config(_free_port())
    hints = Hints.command_line("--scheduler")
    with (
        dask.config.set(NO_DASK_TLS_CONFIG),
        pytest.raises(ClusterError) as e,
        connect(config, hints=hints),
    ):
        pass
    assert "no certificates are configured: set distributed.comm.tls.ca-file" in str(e.value)
    assert "cluster.security" not in str(e.value)


# --------------------------------------------------------------------------- config

MINIMAL = {"data": {"kind": "synthetic"}, "output": {"path": "out"}}


def _with_cluster(cluster: dict) -> dict:
    return {**MINIMAL, "cluster": {"kind": "address", **cluster}}


def test_security_config_is_valid_with_or_without_key(certs):
    tls = client_security(certs)
    cfg = validate_config(_with_cluster({"address": "tls://h:8786", "security": tls}))
    assert isinstance(cfg.cluster, AddressClusterConfig) and cfg.cluster.security is not None
    assert cfg.cluster.security.key == tls["key"]
    assert validate_config(cfg.to_dict()) == cfg  # round trip
    del tls["key"]
    cfg = validate_config(_with_cluster({"address": "tls://h:8786", "security": tls}))
    assert isinstance(cfg.cluster, AddressClusterConfig) and cfg.cluster.security is not None
    assert cfg.cluster.security.key is None
    # a tls:// address alone is a valid config: Dask's own settings may provide the files
    assert validate_config(_with_cluster({"address": "tls://h:8786"})).cluster.kind == "address"


def test_security_with_a_tcp_address_is_a_config_error(certs):
    raw = _with_cluster({"address": "tcp://h:8786", "security": client_security(certs)})
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "test.yaml")
    assert "cluster.security: TLS certificates need a tls:// scheduler address" in str(e.value)
    assert "'tcp://h:8786'" in str(e.value)


def test_missing_certificate_file_names_the_key_and_the_path(certs, tmp_path):
    missing = str(tmp_path / "nope" / "client.pem")
    security = {**client_security(certs), "cert": missing}
    with pytest.raises(ConfigError) as e:
        validate_config(_with_cluster({"address": "tls://h:8786", "security": security}))
    assert "cluster.security.cert: file not found" in str(e.value) and missing in str(e.value)
    assert "ca_file" not in str(e.value)  # only the missing file is reported


@pytest.mark.parametrize(
    "security, message",
    [
        ({"cert": "x"}, "cluster.security.ca_file: Field required"),
        ({"ca_file": "x", "cert": "x", "keyfile": "x"}, "cluster.security.keyfile: unknown key"),
        ("ca.pem", "cluster.security: expected {ca_file, cert, key}, or null, got 'ca.pem'"),
    ],
)
def test_bad_security_section_names_the_key(security, message):
    with pytest.raises(ConfigError) as e:
        validate_config(_with_cluster({"address": "tls://h:8786", "security": security}))
    assert message in str(e.value)


# --------------------------------------------------------------------------- dashboard


def test_embedded_cluster_dashboard_is_on_localhost_by_default():
    default = LocalClusterConfig().dashboard_address
    host = default.rpartition(":")[0]
    assert host == "127.0.0.1"
    config = LocalClusterConfig(n_workers=1, processes=False, dashboard_address=f"{host}:0")
    with connect(config) as client:
        link = urlparse(client.dashboard_link)
        assert link.hostname == "127.0.0.1" and link.port
        listening = {
            c.laddr.ip
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == link.port
        }
        assert listening == {"127.0.0.1"}
