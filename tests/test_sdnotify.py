"""atlasd.sdnotify: the systemd notify protocol against a real AF_UNIX datagram socket bound by the
test where systemd's NOTIFY_SOCKET would be (a path, or an abstract-namespace ``@name``).

A datagram sent on the local machine is in the receiver's queue when ``sendto`` returns, so
"nothing was sent" is checked with a non-blocking receive right after the call."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from atlasd.sdnotify import Notifier, watchdog_interval_s


class SystemdSocket:
    """The receiving end of sd_notify: a bound SOCK_DGRAM AF_UNIX socket, with SO_PASSCRED so each
    datagram carries the sender's pid (what systemd checks for NotifyAccess=main)."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.dir: str | None = None
        if abstract:
            name = f"atlasd-test-notify-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name  # how systemd spells an abstract socket in NOTIFY_SOCKET
        else:
            self.dir = tempfile.mkdtemp(prefix="atn", dir="/tmp")  # sun_path is limited to ~107 bytes
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float = 5.0) -> tuple[list[str], int]:
        """The next datagram's lines and its sender's pid (fails after ``timeout`` without one)."""
        self.sock.settimeout(timeout)
        data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = next(struct.unpack("3i", d[: struct.calcsize("3i")])[0]
                   for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return data.decode().split("\n"), pid

    def fields(self) -> dict[str, str]:
        lines, _ = self.receive()
        return dict(line.split("=", 1) for line in lines)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def systemd() -> Iterator[SystemdSocket]:
    sock = SystemdSocket()
    yield sock
    sock.close()


@pytest.fixture()
def notifier(systemd: SystemdSocket, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notifier]:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    n = Notifier()
    yield n
    n.close()


def test_ready_is_one_datagram_from_this_process(notifier: Notifier, systemd: SystemdSocket) -> None:
    assert notifier.enabled
    assert notifier.ready() is True
    lines, pid = systemd.receive()
    assert lines == ["READY=1"]
    assert pid == os.getpid()  # NotifyAccess=main: systemd only accepts the main process's messages
    systemd.assert_empty()


def test_ready_and_stopping_carry_a_status_line(notifier: Notifier, systemd: SystemdSocket) -> None:
    assert notifier.ready(status="ready")
    assert systemd.receive()[0] == ["READY=1", "STATUS=ready"]
    assert notifier.stopping()
    assert systemd.receive()[0] == ["STOPPING=1"]
    assert notifier.stopping(status="stopping")
    assert systemd.receive()[0] == ["STOPPING=1", "STATUS=stopping"]


def test_status_is_one_line_whatever_the_text(notifier: Notifier, systemd: SystemdSocket) -> None:
    text = "run 12 default/fast step 140/400; 1 queued; pending default/fast 37/50 = ok"
    assert notifier.status(text)
    assert systemd.fields() == {"STATUS": text}  # '=' in the value is kept (split at the first '=')
    # a newline would end the KEY=VALUE line and start a bogus one: it is flattened
    assert notifier.status("degraded: lock\nREADY=1")
    assert systemd.receive()[0] == ["STATUS=degraded: lock READY=1"]


def test_watchdog_and_extend_timeout(notifier: Notifier, systemd: SystemdSocket) -> None:
    assert notifier.watchdog()
    assert systemd.receive()[0] == ["WATCHDOG=1"]
    assert notifier.extend_timeout(2.5)
    assert systemd.receive()[0] == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_reloading_carries_the_monotonic_clock(notifier: Notifier, systemd: SystemdSocket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = systemd.fields()
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"} and fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_send_upper_cases_keys_one_line_each(notifier: Notifier, systemd: SystemdSocket) -> None:
    assert notifier.send(ready=1, status="x", errno=0)
    assert systemd.receive()[0] == ["READY=1", "STATUS=x", "ERRNO=0"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = SystemdSocket(abstract=True)
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    notifier = Notifier()
    try:
        assert notifier.enabled
        assert notifier.ready(status="ready")
        assert systemd.receive()[0] == ["READY=1", "STATUS=ready"]
        assert notifier.watchdog()
        assert systemd.receive()[0] == ["WATCHDOG=1"]
    finally:
        notifier.close()
        systemd.close()


def test_an_explicit_address_wins_over_the_environment(systemd: SystemdSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    other = SystemdSocket()
    monkeypatch.setenv("NOTIFY_SOCKET", other.address)
    notifier = Notifier(systemd.address)
    try:
        assert notifier.ready()
        assert systemd.receive()[0] == ["READY=1"]
        other.assert_empty()
    finally:
        notifier.close()
        other.close()


@pytest.mark.parametrize("how", ["unset", "empty", "explicit-empty"])
def test_without_notify_socket_every_call_is_a_no_op(how: str, systemd: SystemdSocket,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "unset":
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        notifier = Notifier()
    elif how == "empty":
        monkeypatch.setenv("NOTIFY_SOCKET", "")
        notifier = Notifier()
    else:  # Notifier("") disables it even under systemd (a component that must not notify)
        monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
        notifier = Notifier("")
    assert notifier.enabled is False
    results = [notifier.ready(status="s"), notifier.reloading(), notifier.stopping(status="s"), notifier.status("s"),
               notifier.watchdog(), notifier.extend_timeout(1), notifier.send(ready=1)]
    assert results == [False] * 7
    systemd.assert_empty()
    notifier.close()  # harmless


def test_a_vanished_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's socket gone (or never bound): send reports False instead of raising into the daemon."""
    gone = SystemdSocket()
    address = gone.address
    gone.close()  # the path is removed with its folder
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    try:
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    finally:
        notifier.close()


def test_close_stops_notifying(notifier: Notifier, systemd: SystemdSocket) -> None:
    notifier.close()
    assert notifier.enabled is False
    assert notifier.ready() is False
    systemd.assert_empty()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 1.0),  # half of WatchdogSec
        ("60000000", "self", 30.0),
        ("2000000", "other", None),  # WATCHDOG_PID names another process: not ours to ping
        (None, None, None),  # no watchdog
        ("", None, None),
        ("soon", None, None),  # unreadable: no watchdog rather than a crash
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else str(os.getpid() + 1))
    assert watchdog_interval_s() == expected
