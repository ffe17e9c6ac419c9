"""Reference backend: the HTTP contract of DESIGN.md "Backend contract", stdlib only.

Run it by hand (also what `make demo` does):

    python tests/servers/backend.py --port 8000 [--db alerts.sqlite3] [--token T]
                                    [--empresas cota,tocancipa,funza,madrid]

It prints `listening on http://127.0.0.1:N` once ready, then one line per request.

Contract endpoints (under `/api/`; with `--token` every one needs `Authorization: Bearer T`):
- `POST /api/mqtt-alerts/process`  JSON object + `Idempotency-Key` -> 201 `{"id", "status"}`,
  a repeated key -> 200 `{"duplicate": true, "id"}`; no key or not an object -> 400.
- `GET /api/mqtt-alerts?limit=N&empresa=X` -> newest first (limit default 50);
  `GET /api/mqtt-alerts/<id>` -> one, or 404.
- `GET /api/mqtt-alerts/verify-empresa-sede?empresa=&sede=` -> 200 known, 404 unknown.

Test-only control API under `/_test/` (never needs the token):
- `POST /_test/fault` adds a fault rule; `{}` clears them all. Rule keys:
  `status` (answer this instead), `seconds` (for this long), `count` (for the next N matching
  requests), `empresa` (only requests of that empresa), `retry_after` (Retry-After header),
  `delay` (sleep this long before answering), `body` (JSON body of the faulty answer),
  `target` (`process` = default, `verify`, or `all`). A new rule replaces an older one with the
  same (target, empresa, has status) shape, so `{"delay": 0}` undoes `{"delay": 1}`.
- `GET /_test/faults` the active rules; `GET /_test/requests` every process POST in arrival order
  (refused ones too, with the status answered; `null` while still in flight);
  `GET /_test/alerts` accepted alerts in acceptance order; `POST /_test/reset` forgets everything.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

PROCESS_PATH = "/api/mqtt-alerts/process"
LIST_PATH = "/api/mqtt-alerts"
VERIFY_PATH = "/api/mqtt-alerts/verify-empresa-sede"
DEFAULT_EMPRESAS = ("cota", "tocancipa", "funza", "madrid")
MAX_BODY = 1024 * 1024  # bytes; larger bodies get 413
DEFAULT_LIMIT = 50
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may stay idle

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    idempotency_key TEXT,
    authorization TEXT,
    user_agent TEXT,
    content_type TEXT,
    headers TEXT NOT NULL,
    body TEXT NOT NULL,
    empresa TEXT,
    status INTEGER
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    empresa TEXT,
    tipo_mensaje TEXT,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_empresa ON alerts (empresa, id);
"""


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Store:
    """sqlite behind one lock: simple, and fast enough for bursts of thousands of requests."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def add_request(
        self, method: str, path: str, headers: dict[str, str], body: str, empresa: str | None
    ) -> int:
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO requests (received_at, method, path, idempotency_key, authorization,"
                " user_agent, content_type, headers, body, empresa) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    now_rfc3339(), method, path,
                    headers.get("idempotency-key"), headers.get("authorization"),
                    headers.get("user-agent"), headers.get("content-type"),
                    json.dumps(headers), body, empresa,
                ),
            )  # fmt: skip
            return int(cur.lastrowid or 0)

    def set_status(self, request_id: int, status: int) -> None:
        with self.lock:
            self.db.execute("UPDATE requests SET status=? WHERE id=?", (status, request_id))

    def add_alert(self, key: str, payload: dict[str, Any]) -> tuple[int, bool]:
        """Store an alert once per Idempotency-Key; returns (alert id, duplicate?)."""
        empresa = payload.get("empresa")
        tipo = payload.get("tipo_mensaje")
        with self.lock:
            row = self.db.execute(
                "SELECT id FROM alerts WHERE idempotency_key=?", (key,)
            ).fetchone()
            if row is not None:
                return int(row["id"]), True
            cur = self.db.execute(
                "INSERT INTO alerts (idempotency_key, empresa, tipo_mensaje, received_at, payload)"
                " VALUES (?,?,?,?,?)",
                (
                    key,
                    empresa if isinstance(empresa, str) else None,
                    tipo if isinstance(tipo, str) else None,
                    now_rfc3339(),
                    json.dumps(payload, ensure_ascii=False),
                ),
            )
            return int(cur.lastrowid or 0), False

    def alerts(
        self, *, newest_first: bool, limit: int | None = None, empresa: str | None = None
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM alerts"
        args: list[Any] = []
        if empresa is not None:
            sql += " WHERE empresa=?"
            args.append(empresa)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self.lock:
            rows = self.db.execute(sql, args).fetchall()
        return [_alert(r) for r in rows]

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM alerts WHERE id=?", (alert_id,)).fetchone()
        return None if row is None else _alert(row)

    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM requests ORDER BY id").fetchall()
        out = []
        for r in rows:
            try:
                parsed = json.loads(r["body"])
            except ValueError:
                parsed = None
            out.append({
                "id": r["id"],
                "received_at": r["received_at"],
                "method": r["method"],
                "path": r["path"],
                "idempotency_key": r["idempotency_key"],
                "authorization": r["authorization"],
                "user_agent": r["user_agent"],
                "content_type": r["content_type"],
                "headers": json.loads(r["headers"]),
                "body": r["body"],
                "payload": parsed,
                "empresa": r["empresa"],
                "status": r["status"],
            })  # fmt: skip
        return out

    def reset(self) -> None:
        with self.lock:
            self.db.execute("DELETE FROM requests")
            self.db.execute("DELETE FROM alerts")


def _alert(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "idempotency_key": row["idempotency_key"],
        "empresa": row["empresa"],
        "tipo_mensaje": row["tipo_mensaje"],
        "received_at": row["received_at"],
        "payload": json.loads(row["payload"]),
    }


@dataclass
class Fault:
    target: str = "process"  # process | verify | all
    empresa: str | None = None
    status: int | None = None
    until: float | None = None  # time.monotonic() deadline
    count: int | None = None  # remaining matching requests; None = unlimited
    retry_after: str | None = None
    delay: float = 0.0
    body: Any = None

    def shape(self) -> tuple[str, str | None, bool]:
        return (self.target, self.empresa, self.status is not None)

    def live(self, now: float) -> bool:
        return (self.until is None or now < self.until) and (self.count is None or self.count > 0)

    def matches(self, target: str, empresa: str | None, now: float) -> bool:
        return (
            self.live(now)
            and self.target in (target, "all")
            and (self.empresa is None or self.empresa == empresa)
        )

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "target": self.target,
            "empresa": self.empresa,
            "status": self.status,
            "seconds_left": None if self.until is None else max(0.0, self.until - now),
            "count": self.count,
            "retry_after": self.retry_after,
            "delay": self.delay,
        }


class Faults:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[Fault] = []

    def set(self, spec: dict[str, Any]) -> None:
        """Add one rule from its JSON spec; `{}` clears every rule. Raises ValueError."""
        if not spec:
            with self.lock:
                self.rules.clear()
            return
        known = {"status", "seconds", "count", "empresa", "retry_after", "delay", "body", "target"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        target = spec.get("target", "process")
        if target not in ("process", "verify", "all"):
            raise ValueError("target must be process, verify or all")
        status = spec.get("status")
        if status is not None and not (isinstance(status, int) and 100 <= status <= 599):
            raise ValueError("status must be an HTTP status code")
        seconds = spec.get("seconds")
        count = spec.get("count")
        if count is not None and not (isinstance(count, int) and count >= 0):
            raise ValueError("count must be a non-negative integer")
        retry_after = spec.get("retry_after")
        rule = Fault(
            target=target,
            empresa=spec.get("empresa"),
            status=status,
            until=None if seconds is None else time.monotonic() + float(seconds),
            count=count,
            retry_after=None if retry_after is None else str(retry_after),
            delay=float(spec.get("delay") or 0.0),
            body=spec.get("body"),
        )
        with self.lock:
            self.rules = [r for r in self.rules if r.shape() != rule.shape()]
            self.rules.append(rule)

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self.lock:
            return [r.describe(now) for r in self.rules if r.live(now)]

    def delay(self, target: str, empresa: str | None) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(r.delay for r in self.rules if r.matches(target, empresa, now))

    def take(self, target: str, empresa: str | None) -> Fault | None:
        """The first live status rule matching this request, consuming one of its count."""
        now = time.monotonic()
        with self.lock:
            for r in self.rules:
                if r.status is not None and r.matches(target, empresa, now):
                    if r.count is not None:
                        r.count -= 1
                    return r
        return None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: bursts must not be refused

    def __init__(
        self, port: int, store: Store, *, token: str | None, empresas: frozenset[str], quiet: bool
    ) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.store = store
        self.faults = Faults()
        self.token = token
        self.empresas = empresas
        self.quiet = quiet
        self.log_lock = threading.Lock()


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "botonera-reference-backend/1"
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: Server

    # --- plumbing ---------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request is written by _log, with more context

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self._log(format % args)

    def _log(self, line: str) -> None:
        if self.server.quiet:
            return
        with self.server.log_lock:
            sys.stdout.write(f"{now_rfc3339()} {line}\n")
            sys.stdout.flush()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    self.close_connection = True
                    raise BadRequest(413, "body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(413, "body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _authorized(self) -> bool:
        token = self.server.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _dispatch(self, fn: Any) -> None:
        start = time.perf_counter()
        self._extra = ""
        status = 500
        try:
            status = fn()
        except BadRequest as exc:
            status = exc.status
            self._send(status, {"error": exc.message})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            status = 499
        except Exception as exc:  # a bug here must not kill the connection thread silently
            self.close_connection = True
            self._log(f"ERROR {self.command} {self.path}: {exc!r}")
            try:
                self._send(500, {"error": repr(exc)})
            except OSError:
                pass
        ms = (time.perf_counter() - start) * 1000
        self._log(f"{self.command} {self.path} {status} {ms:.1f}ms{self._extra}")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._post)

    def do_PUT(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._not_allowed)

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._not_allowed)

    def _not_allowed(self) -> int:
        self._read_body()
        self._send(405, {"error": "method not allowed"})
        return 405

    # --- routes -----------------------------------------------------------------------------

    def _get(self) -> int:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        if path == "/_test/requests":
            self._send(200, self.server.store.requests())
            return 200
        if path == "/_test/alerts":
            self._send(200, self.server.store.alerts(newest_first=False))
            return 200
        if path == "/_test/faults":
            self._send(200, self.server.faults.describe())
            return 200
        if path.startswith("/api/") and not self._authorized():
            self._send(401, {"error": "missing or wrong bearer token"})
            return 401
        if path == VERIFY_PATH:
            return self._verify(query)
        if path == LIST_PATH:
            try:
                limit = int(query.get("limit", DEFAULT_LIMIT))
            except ValueError:
                raise BadRequest(400, "limit must be an integer") from None
            if limit < 0:
                raise BadRequest(400, "limit must be >= 0")
            alerts = self.server.store.alerts(
                newest_first=True, limit=limit, empresa=query.get("empresa")
            )
            self._send(200, alerts)
            return 200
        if path.startswith(LIST_PATH + "/"):
            tail = path[len(LIST_PATH) + 1 :]
            alert = self.server.store.alert(int(tail)) if tail.isdigit() else None
            if alert is None:
                self._send(404, {"error": "no such alert", "id": tail})
                return 404
            self._send(200, alert)
            return 200
        self._send(404, {"error": "not found", "path": path})
        return 404

    def _verify(self, query: dict[str, str]) -> int:
        empresa = (query.get("empresa") or "").strip().lower()
        sede = query.get("sede") or None
        if not empresa:
            raise BadRequest(400, "empresa is required")
        faulty = self._fault("verify", empresa)
        if faulty is not None:
            return faulty
        known = empresa in self.server.empresas
        status = 200 if known else 404
        self._send(status, {"empresa": empresa, "sede": sede, "known": known})
        return status

    def _fault(self, target: str, empresa: str | None) -> int | None:
        """Apply injected delay and status for this request; the status if a fault answered."""
        delay = self.server.faults.delay(target, empresa)
        if delay > 0:
            time.sleep(delay)
        rule = self.server.faults.take(target, empresa)
        if rule is None or rule.status is None:
            return None
        headers = {} if rule.retry_after is None else {"Retry-After": rule.retry_after}
        body = rule.body if rule.body is not None else {
            "error": "injected fault", "status": rule.status,
        }  # fmt: skip
        self._send(rule.status, body, headers)
        self._extra += " (fault)"
        return rule.status

    def _post(self) -> int:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/_test/fault":
            spec = self._json_object(self._read_body())
            try:
                self.server.faults.set(spec)
            except (ValueError, TypeError) as exc:
                raise BadRequest(400, str(exc)) from exc
            self._send(200, {"faults": self.server.faults.describe()})
            return 200
        if path == "/_test/reset":
            self._read_body()
            self.server.faults.set({})
            self.server.store.reset()
            self._send(200, {"reset": True})
            return 200
        if path == PROCESS_PATH:
            return self._process()
        self._read_body()
        self._send(404, {"error": "not found", "path": path})
        return 404

    def _json_object(self, raw: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(raw or b"{}")
        except ValueError as exc:
            raise BadRequest(400, f"invalid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise BadRequest(400, "body must be a JSON object")
        return obj

    def _process(self) -> int:
        store = self.server.store
        raw = self._read_body()
        text = raw.decode("utf-8", errors="replace")
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = None
        empresa = payload.get("empresa") if isinstance(payload, dict) else None
        empresa = empresa if isinstance(empresa, str) else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        key = headers.get("idempotency-key")
        self._extra = f" key={key} empresa={empresa}"
        request_id = store.add_request(self.command, self.path, headers, text, empresa)
        status = self._process_answer(payload, key, empresa)
        store.set_status(request_id, status)
        return status

    def _process_answer(self, payload: Any, key: str | None, empresa: str | None) -> int:
        faulty = self._fault("process", empresa)
        if faulty is not None:
            return faulty
        if not self._authorized():
            self._send(401, {"error": "missing or wrong bearer token"})
            return 401
        if not key:
            self._send(400, {"error": "Idempotency-Key header is required"})
            return 400
        if not isinstance(payload, dict):
            self._send(400, {"error": "body must be a JSON object"})
            return 400
        alert_id, duplicate = self.server.store.add_alert(key, payload)
        if duplicate:
            self._extra += " (duplicate)"
            self._send(200, {"duplicate": True, "id": alert_id, "status": "duplicate"})
            return 200
        self._send(201, {"id": alert_id, "status": "created"})
        return 201


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="botonera-bridge reference backend (tests, demo)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--db", default=":memory:", help="sqlite file (default: in memory)")
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    p.add_argument(
        "--empresas",
        default=",".join(DEFAULT_EMPRESAS),
        help="comma-separated known empresas for verify-empresa-sede",
    )
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    empresas = frozenset(e.strip().lower() for e in args.empresas.split(",") if e.strip())
    store = Store(args.db)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with Server(
            args.port, store, token=args.token or None, empresas=empresas, quiet=args.quiet
        ) as server:
            port = server.server_address[1]
            print(f"listening on http://127.0.0.1:{port}", flush=True)
            try:
                server.serve_forever(poll_interval=0.2)
            except KeyboardInterrupt:
                pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
