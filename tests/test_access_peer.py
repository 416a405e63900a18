"""Peer exports admit only the certificate identities listed in
``[access] peer_identities``; a reader with a certificate (from the right
CA) for another name, is refused with an ``auth`` error. (A reader
without any certificate: tests/test_peer_source.py::test_tls_mutual_auth.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme

from lazypaged.access import AccessConfig, AccessError
from lazypaged.config import ExportConfig, RemoteConfig
from lazypaged.peer_server import ExportServer
from lazypaged.sources.base import SourceError
from lazypaged.sources.registry import SourceRegistry
from lazypaged.sources.remote import PeerPool

from .test_peer_source import _read

MiB = 1 << 20


def _pem(d: Path, cert: trustme.LeafCert, name: str) -> tuple[str, str]:
    cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
    cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return str(d / f"{name}.crt"), str(d / f"{name}.key")


@pytest.mark.asyncio
async def test_only_listed_identities_read(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    image = os.urandom(2 * MiB)
    (snaps / "img").write_bytes(image)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    server_pem = _pem(tmp_path, ca.issue_cert("127.0.0.1", "exporter"), "server")
    allowed = _pem(tmp_path, ca.issue_cert("reader-a"), "a")
    other = _pem(tmp_path, ca.issue_cert("reader-b"), "b")  # same CA, not listed
    cfg = ExportConfig(listen="127.0.0.1:0", snapshots=(Path("img"),), tls_cert=server_pem[0],
                       tls_key=server_pem[1], tls_ca=str(tmp_path / "ca.crt"))
    reg = SourceRegistry((snaps,))
    server = ExportServer(cfg, reg, allowed=("reader-a",))
    await server.start()
    host, port = server.address
    url = f"peer://{host}:{port}/img"
    ca_path = str(tmp_path / "ca.crt")
    good = PeerPool(RemoteConfig(tls_cert=allowed[0], tls_key=allowed[1], tls_ca=ca_path))
    bad = PeerPool(RemoteConfig(tls_cert=other[0], tls_key=other[1], tls_ca=ca_path))
    try:
        src = await good.acquire_async(url)
        assert _read(await src.fetch_urgent(0, MiB), 0, MiB) == image[:MiB]
        with pytest.raises(SourceError, match="auth"):
            await bad.acquire_async(url)
        assert _read(await src.fetch(MiB, MiB), MiB, MiB) == image[MiB:]  # the listed reader goes on
    finally:
        for p in (good, bad):
            p.close()
        server.stop_accepting()
        await server.close_connections()
        reg.close()


def test_peer_identities_setting() -> None:
    cfg = AccessConfig.from_table({"peer_identities": ["reader-a", "DNS:x.example"]}, "access.")
    assert cfg.peer_identities == ("reader-a", "DNS:x.example")
    with pytest.raises(AccessError, match=r"access\.peer_identities"):
        AccessConfig.from_table({"peer_identities": [""]}, "access.")
