"""A minimal MQTT 3.1.1 QoS 1 publisher on a raw socket, fast enough not to be measured.

Packets are built by hand and written in batches; a reader thread counts the
4-byte PUBACKs. Every payload carries ``seq`` and ``sent_ns`` (wall clock at the
moment its batch is written), which the sink turns into latencies.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

PAYLOAD = (
    b'{"tipo_mensaje":"alarmas","empresa":"%s","sede":"principal","dispositivo":"panel-1",'
    b'"tipo_alarma":"CRITICA","descripcion":"Boton de panico","seq":%d,"sent_ns":%d}'
)
EMPRESAS = (b"cota", b"tocancipa", b"funza", b"madrid")  # built-in: no warnings, 4 lanes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


class Publisher:
    def __init__(self, port: int, client_id: str, topic: str = "empresas") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # keep-alive 0: the broker never drops this (silent between phases) publisher
        body = _str(b"MQTT") + b"\x04\x02" + struct.pack("!H", 0) + _str(client_id.encode())
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {connack!r}")
        self.topic = _str(topic.encode())
        self.mid = 0
        self.sent = 0
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read(self) -> None:
        pending = 0
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += len(data)
            with self._cond:
                self.acked += pending // 4  # PUBACK = 40 02 mid mid; nothing else arrives
                pending %= 4
                self._cond.notify_all()

    def packet(self, seq: int) -> bytes:
        self.mid = self.mid % 65535 + 1
        payload = PAYLOAD % (EMPRESAS[seq % 4], seq, time.time_ns())
        var = self.topic + struct.pack("!H", self.mid)
        return b"\x32" + _varint(len(var) + len(payload)) + var + payload

    def burst(self, seqs: range, batch: int = 100) -> None:
        """Publish as fast as possible, ``batch`` packets per write."""
        for start in range(0, len(seqs), batch):
            self.sock.sendall(b"".join(self.packet(s) for s in seqs[start : start + batch]))
            self.sent += min(batch, len(seqs) - start)

    def paced(self, seqs: range, rate: float) -> None:
        """One message every 1/rate seconds, on a fixed schedule (no drift)."""
        t0 = time.perf_counter()
        for i, s in enumerate(seqs):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.sock.sendall(self.packet(s))
            self.sent += 1

    def wait_acked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.acked >= self.sent, timeout)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()
        self._reader.join(2)
