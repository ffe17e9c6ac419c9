"""Scratch: run the bridge with BackendSink._post monkeypatched onto Http11Pool.

Benchmark only, never shipped: it shows what the wiring in sinks/backend.py would
buy before anyone edits that file. Same CLI as ``python -m botonera_bridge``.
"""

from __future__ import annotations

from botonera_bridge.errors import TransientDelivery
from botonera_bridge.sinks import backend
from botonera_bridge.sinks.http11 import Http11Pool, HttpError


async def _post(self: backend.BackendSink, body: bytes, headers: dict[str, str]) -> None:
    pool: Http11Pool | None = getattr(self, "_bench_pool", None)
    if pool is None:  # lazily: the scratch patch has no place to open it with `async with`
        s = self.settings
        pool = Http11Pool(
            s.url, max_connections=max(4, s.concurrency * 2),
            connect_timeout=s.timeout, read_timeout=s.timeout,
        )  # fmt: skip
        self._bench_pool = pool  # type: ignore[attr-defined]
    hdrs = [(k.encode(), v.encode()) for k, v in headers.items()]
    try:
        status, text, resp_headers = await pool.post(backend.PROCESS_PATH, body, hdrs)
    except HttpError as exc:
        raise TransientDelivery(str(exc), sink="backend") from exc
    retry_after = resp_headers.get(b"retry-after")
    backend.classify(
        status, text.decode("utf-8", "replace"), retry_after.decode() if retry_after else None
    )


backend.BackendSink._post = _post  # type: ignore[method-assign]

if __name__ == "__main__":
    from botonera_bridge.cli import main

    main()
