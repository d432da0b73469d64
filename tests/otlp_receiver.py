"""A small OTLP/HTTP receiver for tests: decodes ``ExportLogsServiceRequest`` protobuf.

It listens on 127.0.0.1 (a free port), answers every POST to ``/v1/logs`` with an empty
``ExportLogsServiceResponse`` and keeps each log record, flattened into a :class:`ReceivedLog`
with hex trace and span ids, as a collector would show them. :meth:`OtlpReceiver.wait_for` blocks
on a condition variable until the records satisfy a predicate or a deadline passes.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(pairs)
    return {pair.key: _value(pair.value) for pair in items}


@dataclass(frozen=True)
class ReceivedLog:
    resource: dict[str, Any]
    scope: str
    time_unix_nano: int
    severity_number: int
    severity_text: str
    body: Any
    trace_id: str  # hex, "" when the record had none
    span_id: str
    attributes: dict[str, Any]


class OtlpReceiver:
    def __init__(self) -> None:
        self.logs: list[ReceivedLog] = []
        self.requests = 0
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/logs":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._add(ExportLogsServiceRequest.FromString(body))
                reply = ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _add(self, request: ExportLogsServiceRequest) -> None:
        received: list[ReceivedLog] = []
        for resource_logs in request.resource_logs:
            resource = _attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    received.append(
                        ReceivedLog(
                            resource=resource,
                            scope=scope_logs.scope.name,
                            time_unix_nano=record.time_unix_nano,
                            severity_number=record.severity_number,
                            severity_text=record.severity_text,
                            body=_value(record.body),
                            trace_id=record.trace_id.hex(),
                            span_id=record.span_id.hex(),
                            attributes=_attributes(record.attributes),
                        )
                    )
        with self._changed:
            self.requests += 1
            self.logs.extend(received)
            self._changed.notify_all()

    def wait_for(
        self, condition: Callable[[list[ReceivedLog]], bool], *, timeout_s: float = 15.0
    ) -> list[ReceivedLog]:
        """Block until ``condition(logs)`` holds; raise AssertionError at the deadline."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.logs), timeout_s):
                raise AssertionError(f"OTLP receiver: condition not met; got {self.logs!r}")
            return list(self.logs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
