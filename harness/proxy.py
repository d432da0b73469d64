"""A TCP proxy on 127.0.0.1 for fault injection, in the spirit of asyncpg's
``_testbase/fuzzer.py``: tm connects to the proxy, the proxy to the real server, and a test
breaks the path in between.

- ``cut()``: reset every open connection and every new one (the server looks gone);
- ``blackhole()``: keep connections open but forward nothing, in either direction (the server
  looks hung: queries wait for their timeout);
- ``freeze_on(pattern)``: the first client-to-server chunk containing ``pattern`` is held, and
  that connection and every other one open at that moment stop forwarding for good, with no FIN
  or RST either way (a NAT entry dropped, a cable pulled); later connections pass. Each side sees
  a live peer that never answers;
- ``delay(seconds)``: forward, but hold each chunk that long first, both ways (a slow or
  congested network; 0 ends it);
- ``restore()``: forward again (frozen connections stay frozen).

One thread accepts, one thread per connection pumps both directions with ``select``. Every
socket error ends that one connection quietly; nothing is raised in a thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from types import TracebackType

_OPEN, _CUT, _BLACKHOLE = "open", "cut", "blackhole"
_TICK_S = 0.05
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK_S)
        self.host, self.port = self._listener.getsockname()[:2]
        self._mode = _OPEN
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections forwarded, for the tests' curiosity
        self.refused = 0  # connections reset at once because the proxy was cut
        self._delay_s = 0.0
        self._freeze_pattern: bytes | None = None
        self._frozen: set[tuple[socket.socket, socket.socket]] = set()
        self.frozen = 0  # connections frozen by freeze_on()
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._acceptor.daemon = True
        self._acceptor.start()

    # -- controls ----------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection; reset new ones as soon as they are accepted."""
        with self._lock:
            self._mode = _CUT
            pairs, self._pairs = self._pairs, set()
        for client, server in pairs:
            _reset(client)
            _reset(server)

    def blackhole(self) -> None:
        """Keep every connection open but stop forwarding bytes; new ones connect and hang."""
        with self._lock:
            self._mode = _BLACKHOLE

    def freeze_on(self, pattern: bytes) -> None:
        """Arm a freeze: see the module docstring. ``frozen`` counts the frozen connections."""
        with self._lock:
            self._freeze_pattern = pattern

    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay_s = seconds

    def restore(self) -> None:
        with self._lock:
            self._mode = _OPEN
            self._delay_s = 0.0

    def stuck(self) -> int:
        """While blackholed: how many connections hold bytes that nobody forwarded, a query on
        its way to the server or its answer on its way back."""
        with self._lock:
            pairs = list(self._pairs)
        count = 0
        for pair in pairs:
            try:
                readable, _, _ = select.select(list(pair), [], [], 0)
            except (OSError, ValueError):
                continue
            count += bool(readable)
        return count

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- threads -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode = self._mode
            if mode == _CUT:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._mode == _CUT:  # cut while we were connecting
                    _reset(client)
                    _reset(server)
                    continue
                self._pairs.add((client, server))
                self.accepted += 1
            thread = threading.Thread(
                target=self._pump, args=(client, server), name="proxy-pump", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _should_freeze(self, data: bytes) -> bool:
        """True (and every open connection frozen) if ``data`` fires the armed freeze."""
        with self._lock:
            if self._freeze_pattern is None or self._freeze_pattern not in data:
                return False
            self._freeze_pattern = None
            self._frozen |= self._pairs
            self.frozen = len(self._frozen)
            return True

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        try:
            while not self._closed.is_set():
                with self._lock:
                    if (client, server) not in self._pairs:
                        return  # cut: the sockets are closed already
                    mode = self._mode
                    frozen = (client, server) in self._frozen
                if mode == _BLACKHOLE or frozen:
                    self._closed.wait(_TICK_S)
                    continue
                readable, _, _ = select.select([client, server], [], [], _TICK_S)
                with self._lock:
                    if self._mode == _BLACKHOLE:
                        continue  # leave the bytes where they are
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client and self._should_freeze(data):
                        break  # the chunk is held: never forwarded
                    with self._lock:
                        delay_s = self._delay_s
                    if delay_s:
                        time.sleep(delay_s)
                    peer[sock].sendall(data)
        except (OSError, ValueError):  # reset, or closed by cut() under our feet
            return
        finally:
            with self._lock:
                self._pairs.discard((client, server))
                self._frozen.discard((client, server))
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()


def via(proxy: TcpProxy) -> dict[str, str]:
    """The settings that send tm's PostgreSQL connections through ``proxy``."""
    return {"POSTGRES_HOST": proxy.host, "POSTGRES_PORT": str(proxy.port)}
