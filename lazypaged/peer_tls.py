"""Addresses and TLS for the peer protocol: who may talk to whom, and how.

Both directions use mutual verification: the exporting daemon requires a
client certificate chaining to its ``tls_ca``; the reading daemon requires
the exporter's certificate to chain to its own ``tls_ca`` and to name the
host it dialled (or ``server_name``). Plaintext is only allowed on loopback,
or where the configuration says ``insecure = true`` in so many words.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ExportConfig, RemoteConfig

SCHEME = "peer://"


class AddressError(ValueError):
    """A HOST:PORT or peer:// URL that cannot be used."""


def split_host_port(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``"10.0.0.1:7070"`` or ``"[::1]:7070"`` → (host, port); port 0 only with ``any_port``."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise AddressError(f"{text!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError(f"{text!r}: unbalanced brackets")
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"{text!r}: write IPv6 addresses in brackets, like [::1]:7070")
    port = int(port_s)
    if not (0 if any_port else 1) <= port < 65536:
        raise AddressError(f"{text!r}: port out of range")
    return host, port


def parse_peer_url(url: str) -> tuple[str, int, str]:
    """``peer://HOST:PORT/NAME`` → (host, port, export name)."""
    if not url.startswith(SCHEME):
        raise AddressError(f"{url!r} does not start with {SCHEME}")
    rest = url[len(SCHEME) :]
    addr, slash, name = rest.partition("/")
    if not slash or not name:
        raise AddressError(f"{url!r} names no export (peer://HOST:PORT/NAME)")
    host, port = split_host_port(addr)
    return host, port, name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_files(section: str, cert: str, key: str, ca: str) -> None:
    from .config import ConfigError

    if bool(cert) != bool(key):
        raise ConfigError(f"{section}.tls_cert and {section}.tls_key go together")
    for what, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{section}.{what}: no such file {path!r}")


def check_export(cfg: ExportConfig) -> None:
    from .config import ConfigError

    if not cfg.listen:
        return
    try:
        host, _ = split_host_port(cfg.listen, any_port=True)
    except AddressError as e:
        raise ConfigError(f"export.listen: {e}") from None
    _tls_files("export", cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
    if cfg.tls_cert and not cfg.tls_ca:
        raise ConfigError("export.tls_ca is needed to verify client certificates")
    if cfg.tls_ca and not cfg.tls_cert:
        raise ConfigError("export.tls_cert and export.tls_key are needed for TLS")
    if not cfg.tls_cert and not cfg.insecure and not is_loopback(host):
        raise ConfigError(
            f"export.listen = {cfg.listen!r} is not a loopback address: configure export.tls_cert, "
            "tls_key and tls_ca, or set export.insecure = true to serve snapshots to anyone who connects"
        )
    if not 0 <= cfg.compress_level <= 22:
        raise ConfigError("export.compress_level must be 0…22")
    if not 1 <= cfg.max_inflight <= 65536 or cfg.max_connections < 1:
        raise ConfigError("export.max_inflight must be 1…65536 and export.max_connections ≥ 1")


def check_remote(cfg: RemoteConfig) -> None:
    from .config import ConfigError

    _tls_files("remote", cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
    if cfg.tls_cert and not cfg.tls_ca:
        raise ConfigError("remote.tls_ca is needed to verify the peers' certificates")
    for what in ("connect_timeout", "stall_timeout", "reconnect_deadline", "backoff_max"):
        if getattr(cfg, what) <= 0:
            raise ConfigError(f"remote.{what} must be positive")
    if not 0 <= cfg.bulk_window <= 1 << 30:
        raise ConfigError("remote.bulk_window must be 0 (autotuning) … 1 GiB")


def server_context(cfg: ExportConfig) -> ssl.SSLContext | None:
    """The exporter's TLS context (None: plaintext), requiring client certificates."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.load_verify_locations(cfg.tls_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cfg: RemoteConfig) -> ssl.SSLContext | None:
    """The reader's TLS context (None: plaintext)."""
    if not cfg.tls_ca:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cfg.tls_ca)
    if cfg.tls_cert:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


def plaintext_allowed(cfg: RemoteConfig, host: str) -> bool:
    return cfg.insecure or is_loopback(host)
