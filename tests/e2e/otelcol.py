"""A real OpenTelemetry Collector for the trace tests, and a small HTTP receiver behind it.

The collector (core components, built once by ``stack/otelcol/build.sh`` into ``.stack/otelcol``)
receives tm's OTLP/HTTP protobuf exports on its own port and forwards every span, as OTLP/JSON,
to :class:`SpanReceiver`, an HTTP server inside the test process. Tests then read decoded spans
(hex ids, attributes as plain values) and wait for them with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "stack" / "otelcol" / "build.sh"
BUILD_TIMEOUT_S = 20 * 60  # the first build takes about 3 minutes on 2 cores

SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass
class Span:
    """One exported span, as the collector forwarded it."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status_code: int
    resource: dict[str, Any]


def _value(raw: dict[str, Any]) -> Any:
    """An OTLP/JSON AnyValue as a Python value (int64 travels as a string)."""
    if "intValue" in raw:
        return int(raw["intValue"])
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in raw:
            return raw[key]
    return raw


def _attributes(raw: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in raw or ()}


def decode_spans(document: dict[str, Any]) -> list[Span]:
    """The spans of one OTLP/JSON ExportTraceServiceRequest."""
    spans = []
    for resource_spans in document.get("resourceSpans", ()):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes"))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for raw in scope_spans.get("spans", ()):
                spans.append(
                    Span(
                        name=raw["name"],
                        trace_id=raw["traceId"],
                        span_id=raw["spanId"],
                        parent_span_id=raw.get("parentSpanId", ""),
                        kind=SPAN_KINDS.get(raw.get("kind", 0), "UNSPECIFIED"),
                        attributes=_attributes(raw.get("attributes")),
                        links=[(link["traceId"], link["spanId"]) for link in raw.get("links", ())],
                        status_code=raw.get("status", {}).get("code", 0),
                        resource=resource,
                    )
                )
    return spans


@dataclass
class SpanReceiver:
    """Accepts the collector's OTLP/JSON exports on ``/v1/traces``."""

    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    found = decode_spans(json.loads(body))
                    with receiver.lock:
                        receiver.spans.extend(found)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def named(self, name: str) -> list[Span]:
        return [s for s in self.snapshot() if s.name == name]


class Collector:
    """The collector binary on a free OTLP/HTTP port, forwarding to a SpanReceiver."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.receiver = SpanReceiver()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self.receiver.handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        receiver_port = self._server.server_address[1]
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = workdir / "otelcol.yaml"
        config.write_text(
            f"""
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{self.port}
exporters:
  otlp_http:
    endpoint: http://127.0.0.1:{receiver_port}
    encoding: json
    compression: none
    retry_on_failure:
      enabled: false
    sending_queue:
      enabled: false
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [otlp_http]
"""
        )
        self.log_path = workdir / "otelcol.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(binary), "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._answers, timeout_s=30, what=f"the collector on port {self.port}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the collector exited: {self.log_path.read_text(errors='replace')}")
        return self.export_json({"resourceSpans": []})

    def export_json(self, document: dict[str, Any]) -> bool:
        """POST an OTLP/JSON request to the collector, as any client would; True on 2xx."""
        request = urllib.request.Request(  # noqa: S310 (an http URL we built)
            f"{self.endpoint}/v1/traces",
            data=json.dumps(document).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 (loopback)
                return 200 <= int(response.status) < 300
        except OSError:
            return False

    def barrier(self, trace_id: str) -> None:
        """Send a span of our own through the collector and wait for it at the receiver: any
        span tm sent before has then been forwarded too (no queue, no batching on the way)."""
        span = {
            "traceId": trace_id,
            "spanId": "00000000000000aa",
            "name": "test.barrier",
            "kind": 1,
            "startTimeUnixNano": "1",
            "endTimeUnixNano": "2",
        }
        document = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
        assert self.export_json(document)
        wait_for(lambda: self.receiver.named("test.barrier"), what="the barrier span")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        self._server.shutdown()
        self._server.server_close()


def build() -> Path:
    """The collector binary, built when missing (first time: about 3 minutes; see build.sh)."""
    try:
        built = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{BUILD_SCRIPT} took more than {BUILD_TIMEOUT_S} s")
    if built.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT} failed:\n{built.stderr[-4000:]}")
    return Path(built.stdout.strip().splitlines()[-1])
