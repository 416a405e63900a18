"""ExportServer.reload: a new configuration's exports and peer identity
rules hold for what readers ask after it, on the connections they already
have too; the listener and its TLS material stay as they are."""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path

import pytest
import trustme

from lazypaged.access import AccessConfig
from lazypaged.config import Config, ExportConfig, RemoteConfig
from lazypaged.peer_server import ExportServer
from lazypaged.sources.base import Extent, SourceError
from lazypaged.sources.registry import SourceRegistry
from lazypaged.sources.remote import PeerPool

PAGE = 4096
SIZE = 1 << 20


def _read(extents: list[Extent]) -> bytes:
    return b"".join(bytes(e.length) if e.address == 0 else ctypes.string_at(e.address, e.length) for e in extents)


def _images(d: Path) -> dict[str, bytes]:
    out = {}
    for k, name in enumerate(("one", "two")):
        data = bytes((k * 7 + i) & 0xFF for i in range(256)) * (SIZE // 256)
        (d / name).write_bytes(data)
        out[name] = data
    return out


def _config(export: ExportConfig, identities: tuple[str, ...] = ()) -> Config:
    return Config(snapshot_dirs=(), export=export, access=AccessConfig(peer_identities=identities))


@pytest.mark.asyncio
async def test_reload_changes_what_is_exported(tmp_path: Path) -> None:
    images = _images(tmp_path)
    reg = SourceRegistry((tmp_path,))
    export = ExportConfig(listen="127.0.0.1:0", snapshots=(Path("one"),))
    server = ExportServer(export, reg)
    await server.start()
    host, port = server.address
    url = f"peer://{host}:{port}"
    pool = PeerPool(RemoteConfig(backoff_max=0.1))
    try:
        one = await pool.acquire_async(f"{url}/one")
        assert _read(await one.fetch_urgent(0, PAGE)) == images["one"][:PAGE]
        with pytest.raises(SourceError, match="unknown_export"):
            await pool.acquire_async(f"{url}/two")

        # "two" in, "one" out; the listen address in the new file is ignored.
        server.reload(_config(ExportConfig(listen="127.0.0.1:1", snapshots=(Path("two"),))))
        assert server.address == (host, port)
        two = await pool.acquire_async(f"{url}/two")
        assert _read(await two.fetch(PAGE, 4 * PAGE)) == images["two"][PAGE : 5 * PAGE]
        # A reader that had "one" open is told it is gone, even on its old connection.
        with pytest.raises(SourceError, match="unknown_export"):
            await asyncio.wait_for(one.fetch_urgent(2 * PAGE, PAGE), 10)
        assert _read(await two.fetch_urgent(0, PAGE)) == images["two"][:PAGE]

        # A name that cannot be opened: refused, and nothing changes.
        with pytest.raises(SourceError):
            server.reload(_config(ExportConfig(listen=export.listen, snapshots=(Path("two"), Path("missing")))))
        assert sorted(server.exports) == ["two"]
        assert _read(await two.fetch(0, PAGE)) == images["two"][:PAGE]
    finally:
        pool.close()
        server.stop_accepting()
        await server.close_connections()
        reg.close()
    assert not reg.open_sources, "every export released"


@pytest.mark.asyncio
async def test_reload_changes_which_certificates_may_read(tmp_path: Path) -> None:
    images = _images(tmp_path)
    ca = trustme.CA()
    d = tmp_path / "pki"
    d.mkdir()

    def dump(cert: trustme.LeafCert, name: str) -> tuple[str, str]:
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        return str(d / f"{name}.crt"), str(d / f"{name}.key")

    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    srv = dump(ca.issue_cert("127.0.0.1"), "server")
    cli = dump(ca.issue_cert("reader-b"), "client")
    export = ExportConfig(
        listen="127.0.0.1:0", snapshots=(Path("one"),), tls_cert=srv[0], tls_key=srv[1], tls_ca=str(d / "ca.crt")
    )
    reg = SourceRegistry((tmp_path,))
    server = ExportServer(export, reg)
    await server.start()
    host, port = server.address
    url = f"peer://{host}:{port}/one"
    remote = RemoteConfig(tls_cert=cli[0], tls_key=cli[1], tls_ca=str(d / "ca.crt"), backoff_max=0.1)
    pool = PeerPool(remote)
    try:
        src = await pool.acquire_async(url)
        assert _read(await src.fetch_urgent(0, PAGE)) == images["one"][:PAGE]
        # Only another identity may read now: the open connections are refused too.
        server.reload(_config(export, ("reader-c",)))
        with pytest.raises(SourceError, match="auth"):
            await asyncio.wait_for(src.fetch_urgent(PAGE, PAGE), 10)
        other = PeerPool(remote)
        try:
            with pytest.raises(SourceError):
                await other.acquire_async(url)
        finally:
            other.close()
        # And back: the same reader reads again (a fresh pool, a fresh first contact).
        server.reload(_config(export, ("reader-b",)))
        again = PeerPool(remote)
        try:
            src2 = await again.acquire_async(url)
            assert _read(await src2.fetch(0, 2 * PAGE)) == images["one"][: 2 * PAGE]
        finally:
            again.close()
    finally:
        pool.close()
        server.stop_accepting()
        await server.close_connections()
        reg.close()
