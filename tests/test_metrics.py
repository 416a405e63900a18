"""The Prometheus endpoint, scraped over HTTP from a real daemon during real restores."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lazypaged.config import Config, ConfigError, from_dict

from .conftest import MiB
from .ops_helpers import OpsDaemon, running_ops_daemon

PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 8 * MiB
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def ops_daemon(tmp_path: Path) -> Iterator[OpsDaemon]:
    yield from running_ops_daemon(tmp_path)


def scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        assert resp.getheader("content-type", "").startswith("text/plain; version=0.0.4")
    finally:
        conn.close()
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def wait_for(pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition never held")


def test_counters_match_what_the_targets_did(ops_daemon: OpsDaemon) -> None:
    port = ops_daemon.metrics_port()
    ops_daemon.d.image("img", SIZE)
    before = scrape(port)
    assert v(before, "lazypaged_faults_total", kind="native") == 0
    assert v(before, "lazypaged_sessions", kind="native", state="running") == 0

    # A: touches 40 pages, one fault each, then holds its memory.
    a = ops_daemon.target("img", SIZE, 40)
    try:
        a.line()
        assert a.line()["ok"] is True
        mid = scrape(port)
        assert v(mid, "lazypaged_faults_total", kind="native") == 40
        installed = v(mid, "lazypaged_installed_bytes_total", kind="native", method="copy") + v(
            mid, "lazypaged_installed_bytes_total", kind="native", method="zero")
        assert installed == 40 * PAGE
        assert v(mid, "lazypaged_fault_bytes_total", kind="native") == 40 * PAGE
        assert v(mid, "lazypaged_fill_bytes_total", kind="native") == 0
        assert v(mid, "lazypaged_pages_remaining", kind="native") == SIZE // PAGE - 40
        assert v(mid, "lazypaged_sessions", kind="native", state="running") == 1
        assert v(mid, "lazypaged_fault_service_seconds_count", kind="native") == 40
        assert v(mid, "lazypaged_fault_service_seconds_bucket", kind="native", le="+Inf") == 40
        buckets = sorted(
            (float(dict(labels)["le"]), val) for (name, labels), val in mid.items()
            if name == "lazypaged_fault_service_seconds_bucket" and dict(labels)["kind"] == "native"
        )
        assert [b for _, b in buckets] == sorted(b for _, b in buckets)  # cumulative
        assert buckets[0][0] == 1e-6
        assert buckets[-2][0] == 2**24 / 1e6
        assert v(mid, "lazypaged_target_blocked_seconds_total", kind="native") == pytest.approx(
            v(mid, "lazypaged_fault_service_seconds_sum", kind="native"))
    finally:
        assert a.release() == 0

    # A's session leaves the table; its counters stay in the totals.
    wait_for(lambda: v(scrape(port), "lazypaged_sessions_ended_total", kind="native", outcome="target_exited") == 1)
    after = scrape(port)
    assert v(after, "lazypaged_faults_total", kind="native") == 40
    assert v(after, "lazypaged_sessions", kind="native", state="running") == 0
    assert v(after, "lazypaged_pages_remaining", kind="native") == 0

    # B: touches 10 pages, then the fill installs every other page.
    b = ops_daemon.target("img", SIZE, 10, fill=True)
    try:
        b.line()
        assert b.line()["ok"] is True
        assert b.line() == {"complete": SIZE // PAGE}
    finally:
        assert b.release() == 0
    wait_for(lambda: v(scrape(port), "lazypaged_sessions_ended_total", kind="native", outcome="complete") == 1)
    end = scrape(port)
    # The fill races B's touches: each touch faults or finds its page in.
    assert 40 <= v(end, "lazypaged_faults_total", kind="native") <= 50
    assert v(end, "lazypaged_fault_service_seconds_count", kind="native") == v(end, "lazypaged_faults_total",
                                                                                 kind="native")
    installed = v(end, "lazypaged_installed_bytes_total", kind="native", method="copy") + v(
        end, "lazypaged_installed_bytes_total", kind="native", method="zero")
    assert installed == 40 * PAGE + SIZE
    # The demo image has every 8th page zero: B installs those with UFFDIO_ZEROPAGE.
    assert v(end, "lazypaged_installed_bytes_total", kind="native", method="zero") >= SIZE // 8 - 10 * PAGE
    assert v(end, "lazypaged_fill_bytes_total", kind="native") + v(
        end, "lazypaged_fault_bytes_total", kind="native") == installed
    assert v(end, "lazypaged_restore_duration_seconds_count", kind="native") == 1
    assert v(end, "lazypaged_build_info", version=__import__("lazypaged").__version__) == 1
    assert ("process_open_fds", ()) in end


def test_http_behaviour(ops_daemon: OpsDaemon) -> None:
    port = ops_daemon.metrics_port()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # Keep-alive: several requests on one connection.
        for method, path, status in (("GET", "/metrics", 200), ("HEAD", "/metrics", 200), ("GET", "/nope", 404),
                                     ("POST", "/metrics", 405), ("GET", "/", 200), ("GET", "/metrics?x=1", 200)):
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == status, (method, path, body)
            if method == "HEAD":
                assert body == b""
                assert int(resp.getheader("content-length", "0")) > 0
    finally:
        conn.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert "lazypaged_faults_total" in str(scrape(port))


def test_metrics_off_by_default_and_address_checked() -> None:
    assert Config().metrics.enabled is False
    assert from_dict({"metrics": {"address": "[::1]:9100"}}).metrics.address == "[::1]:9100"
    for bad in ("localhost", "::1:9100", "host:99999", "host:"):
        with pytest.raises(ConfigError, match=r"metrics\.address"):
            from_dict({"metrics": {"address": bad}})


def test_address_in_use_is_a_clear_startup_failure(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[daemon]\nhandoff_socket = "{tmp_path / "h.sock"}"\nsnapshot_dirs = ["{tmp_path}"]\n'
                       f'log_format = "json"\n[metrics]\nenabled = true\naddress = "127.0.0.1:{port}"\n')
        r = subprocess.run([sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for metrics" in r.stderr
    assert "Traceback" not in r.stderr


def test_sessions_add_up_and_scrape_cost(ops_daemon: OpsDaemon) -> None:
    """Four live sessions sum up; prints what a scrape costs end to end (pytest -s)."""
    port = ops_daemon.metrics_port()
    ops_daemon.d.image("img", SIZE)
    targets = [ops_daemon.target("img", SIZE, 20) for _ in range(4)]
    try:
        for t in targets:
            t.line()
            t.line()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n, t0 = 50, time.perf_counter()
        for _ in range(n):
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
        per = (time.perf_counter() - t0) / n
        conn.close()
        print(f"\nscrape with 4 live sessions: {per * 1e3:.2f} ms, {len(body)} bytes")
        now = scrape(port)
        assert v(now, "lazypaged_faults_total", kind="native") == 80
        assert v(now, "lazypaged_sessions", kind="native", state="running") == 4
        assert v(now, "lazypaged_pages_remaining", kind="native") == 4 * (SIZE // PAGE - 20)
    finally:
        for t in targets:
            t.release()


def test_slow_clients_do_not_stop_a_scrape(ops_daemon: OpsDaemon) -> None:
    """A slow-loris on the metrics port: many more connections than the
    daemon keeps, each with half a request head. A normal scrape is still
    answered, and each stalled connection is dropped after the header
    deadline with a log line (it used to hold its slot for two minutes,
    and a scrape past the limit was closed with no answer and no log)."""
    from lazypaged.metrics import HEADER_TIMEOUT, MAX_CLIENTS

    port = ops_daemon.metrics_port()
    with contextlib.ExitStack() as stack:
        slow = []
        for _ in range(MAX_CLIENTS * 3):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 20))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: lazypaged\r\n")
            slow.append(s)
        samples = scrape(port)
        assert samples, "an empty scrape"
        # Every stalled connection ends: evicted for newer ones, or timed out with a 408.
        for s in slow:
            rest = b""
            with contextlib.suppress(ConnectionResetError):  # closed with its bytes unread: a reset
                while chunk := s.recv(65536):
                    rest += chunk
            assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]
    dropped = [ln for ln in ops_daemon.d.log_lines() if ln.get("event") == "metrics_client_dropped"]
    assert len(dropped) == len(slow), dropped[-5:]
    assert {ln["reason"] for ln in dropped} <= {"header_timeout", "evicted"}
    assert any(ln["reason"] == "header_timeout" for ln in dropped), dropped[-5:]
