"""A fast HTTP/1.1 sink for the benchmark: one process, one thread, epoll, raw sockets.

It answers every POST with ``201`` at once (keep-alive, pipelining tolerated) and
records, per request, the wall-clock receive time plus the ``seq`` and ``sent_ns``
fields found in the body. Nothing else is parsed, so a request costs a few
microseconds of CPU: far below what any client under test spends on it.

Control (same port):
- ``GET /_bench/stats``  -> ``{"count": N, "cpu_s": user+sys seconds of this process}``
- ``GET /_bench/dump``   -> ``[[seq, sent_ns, recv_ns], ...]`` and forgets them
- anything else          -> 201 ``{"status":"ok"}``

    python bench/sink.py --port 0     # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import socket
import sys
import time

OK = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"status":"ok"}'
)
FIELDS = re.compile(rb'"seq":\s*(-?\d+).*?"sent_ns":\s*(\d+)', re.S)
CL = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
MAX_HEAD = 65536


def _answer(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Sink:
    def __init__(self, sock: socket.socket) -> None:
        self.listener = sock
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.bufs: dict[socket.socket, bytearray] = {}
        self.records: list[tuple[int, int, int]] = []
        self.count = 0
        self.running = True

    def serve(self) -> None:
        select = self.sel.select
        while self.running:
            for key, _ in select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                else:
                    self._readable(sock)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.bufs[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, None)

    def _close(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        del self.bufs[sock]
        sock.close()

    def _readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(262144)
        except (ConnectionResetError, BlockingIOError):
            data = b""
        if not data:
            self._close(sock)
            return
        now = time.time_ns()
        buf = self.bufs[sock]
        buf += data
        out = []
        big = False
        pos = 0
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEAD:
                    self._close(sock)
                    return
                break
            m = CL.search(buf, pos, end + 2)
            length = int(m.group(1)) if m else 0
            stop = end + 4 + length
            if len(buf) < stop:
                break
            if buf.startswith(b"GET /_bench/", pos):
                out.append(self._control(bytes(buf[pos + 12 : buf.find(b" ", pos + 12)])))
                big = True
            else:
                self.count += 1
                f = FIELDS.search(buf, end + 4, stop)
                if f is not None:
                    self.records.append((int(f.group(1)), int(f.group(2)), now))
                out.append(OK)
            pos = stop
        del buf[:pos]
        if out:
            try:
                if big:  # a control answer can be megabytes: block until it is out
                    sock.setblocking(True)
                sock.sendall(b"".join(out))  # POST answers are tiny: the socket buffer takes them
                if big:
                    sock.setblocking(False)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                self._close(sock)

    def _control(self, what: bytes) -> bytes:
        if what == b"stats":
            t = os.times()
            return _answer(json.dumps({"count": self.count, "cpu_s": t.user + t.system}).encode())
        if what == b"dump":
            records, self.records = self.records, []
            return _answer(json.dumps(records).encode())
        return _answer(b'{"error":"unknown"}', "404 Not Found")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sock.setblocking(False)
    sink = Sink(sock)

    def stop(*_: object) -> None:
        sink.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    sink.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
