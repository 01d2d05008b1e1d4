"""The built-in tools, run through the tool service's domain (no gRPC).

``http_fetch`` talks to a real HTTP server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hivewire.services.runtime.errors import InvalidArgument
from hivewire.services.runtime.values import ErrorInfo
from hivewire.services.tool.builtins.calculator import evaluate
from hivewire.services.tool.domain import ToolCall, ToolOutcome
from hivewire.services.tool.sdk import ToolError
from hivewire.services.tool.service import ToolService, open_tool_service
from hivewire.services.tool.settings import ToolSettings

AGENT = "spiffe://hivewire.local/agent/test"


async def outcome(service: ToolService, name: str, arguments: Mapping[str, Any]) -> Any:
    """The last event of a call (its result, failure or approval request)."""
    last: Any = None
    async for event in service.invoke(ToolCall(tool_name=name, arguments=arguments, caller=AGENT)):
        last = event
    return last


async def result(service: ToolService, name: str, arguments: Mapping[str, Any]) -> ToolOutcome:
    event = await outcome(service, name, arguments)
    assert isinstance(event, ToolOutcome), event
    return event


async def failure(service: ToolService, name: str, arguments: Mapping[str, Any]) -> ErrorInfo:
    event = await outcome(service, name, arguments)
    assert isinstance(event, ErrorInfo), event
    return event


# -- a real loopback HTTP server --------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/json":
            body = json.dumps({"hello": "world", "ua": self.headers.get("User-Agent")}).encode()
            self._send(200, body, "application/json", ETag='"v1"')
        elif self.path == "/big":
            self._send(200, b"a" * 100_000, "text/plain; charset=utf-8")
        elif self.path == "/binary":
            self._send(200, bytes(range(256)), "application/octet-stream")
        elif self.path == "/missing":
            self._send(404, b"not here", "text/plain")
        elif self.path == "/hop":
            self._send(302, b"", "text/plain", Location="/json")
        elif self.path == "/away":
            self._send(302, b"", "text/plain", Location=f"http://localhost:{port}/json")
        elif self.path == "/loop":
            self._send(302, b"", "text/plain", Location="/loop")
        elif self.path == "/stall":
            # Holds the response until the test releases it (bounded, never forever).
            self.release.wait(10)
            self._send(200, b"late", "text/plain")
        else:
            self._send(404, b"?", "text/plain")


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    _Handler.release.clear()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Handler.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
async def service() -> AsyncIterator[ToolService]:
    settings = ToolSettings(
        plugins=[],
        http_allowed_hosts=["127.0.0.1"],
        http_max_bytes=10_000,
        http_timeout=0.5,
        http_max_redirects=3,
        regex_timeout=0.2,
        text_max_chars=100_000,
    )
    async with open_tool_service(settings) as svc:
        yield svc


# -- calculator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("2 ^ 8", 256),
        ("7 // 2 + 7 % 2", 4),
        ("-3 + +4", 1),
        ("sqrt(16) + abs(-2)", 6.0),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("round(pi, 3)", 3.142),
        ("factorial(5)", 120),
        ("1e3 / 4", 250.0),
    ],
)
def test_calculator_evaluates(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os').system('true')", "INVALID_EXPRESSION"),
        ("().__class__", "INVALID_EXPRESSION"),
        ("x + 1", "INVALID_EXPRESSION"),
        ("'a' * 3", "INVALID_EXPRESSION"),
        ("1 < 2", "INVALID_EXPRESSION"),
        ("lambda: 1", "INVALID_EXPRESSION"),
        ("1 +", "INVALID_EXPRESSION"),
        ("1 / 0", "DIVISION_BY_ZERO"),
        ("10 ** 100000", "RESULT_TOO_LARGE"),
        ("9 ** 9 ** 9", "RESULT_TOO_LARGE"),
        ("2 ** 5000", "RESULT_TOO_LARGE"),
        ("factorial(100000)", "INVALID_EXPRESSION"),
        ("10.0 ** 400", "MATH_ERROR"),
        ("log(0)", "MATH_ERROR"),
        ("(-8) ** 0.5", "RESULT_NOT_REAL"),
        ("+".join(["1"] * 150), "EXPRESSION_TOO_LONG"),
    ],
)
def test_calculator_refuses(expression: str, reason: str) -> None:
    with pytest.raises(ToolError) as caught:
        evaluate(expression)
    assert caught.value.reason == reason
    assert caught.value.code == "INVALID_ARGUMENT"


async def test_calculator_tool(service: ToolService) -> None:
    done = await result(service, "calculator", {"expression": "6 * 7"})
    assert done.result == {"value": 42, "expression": "6 * 7"}
    assert done.text == "42"
    huge = await result(service, "calculator", {"expression": "2 ** 100"})
    assert huge.result["value"] == str(2**100)
    failed = await failure(service, "calculator", {"expression": "open('/etc/passwd')"})
    assert failed.reason == "INVALID_EXPRESSION" and failed.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument) as caught:
        await outcome(service, "calculator", {"expression": ""})
    assert [v.field for v in caught.value.violations] == ["arguments.expression"]


# -- json_query -----------------------------------------------------------------------

DOCUMENT = {
    "people": [
        {"name": "ada", "age": 36, "langs": ["en", "fr"]},
        {"name": "bob", "age": 25, "langs": ["en"]},
        {"name": "cy", "age": 41, "langs": []},
    ]
}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("people[0].name", "ada"),
        ("people[?age > `30`].name", ["ada", "cy"]),
        ("length(people)", 3),
        ("sort_by(people, &age)[-1].name", "cy"),
        ("people[*].langs[]", ["en", "fr", "en"]),
        (
            "{names: people[*].name, oldest: max_by(people, &age).age}",
            {"names": ["ada", "bob", "cy"], "oldest": 41},
        ),
        ("nobody", None),
    ],
)
async def test_json_query(service: ToolService, query: str, expected: Any) -> None:
    done = await result(service, "json_query", {"document": DOCUMENT, "query": query})
    assert done.result == {"result": expected}
    assert json.loads(done.text) == expected


async def test_json_query_errors(service: ToolService) -> None:
    bad = await failure(service, "json_query", {"document": DOCUMENT, "query": "people[?"})
    assert bad.reason == "INVALID_QUERY"
    wrong = await failure(service, "json_query", {"document": DOCUMENT, "query": "length(`1`)"})
    assert wrong.reason == "QUERY_FAILED"
    array = await result(service, "json_query", {"document": [1, 2, 3], "query": "[1]"})
    assert array.result == {"result": 2}


# -- text -----------------------------------------------------------------------------


async def test_text_split(service: ToolService) -> None:
    words = await result(service, "text", {"text": " a  b\tc\n", "operation": "split"})
    assert words.result == {"parts": ["a", "b", "c"], "count": 3, "truncated": False}
    csv = await result(
        service, "text", {"text": "a, b,c", "operation": "split", "pattern": r",\s*"}
    )
    assert csv.result["parts"] == ["a", "b", "c"]
    literal = await result(
        service, "text", {"text": "1.2.3", "operation": "split", "pattern": ".", "literal": True}
    )
    assert literal.result["parts"] == ["1", "2", "3"]
    capped = await result(
        service, "text", {"text": "a b c d", "operation": "split", "max_results": 2}
    )
    assert capped.result == {"parts": ["a", "b"], "count": 2, "truncated": True}


async def test_text_count_and_extract(service: ToolService) -> None:
    counted = await result(
        service,
        "text",
        {
            "text": "One fish\nTwo fish\n",
            "operation": "count",
            "pattern": "FISH",
            "ignore_case": True,
        },
    )
    assert counted.result == {"characters": 18, "words": 4, "lines": 2, "matches": 2}
    extracted = await result(
        service,
        "text",
        {
            "text": "mail ada@example.com or bob@example.org",
            "operation": "extract",
            "pattern": r"(?P<user>\w+)@(?P<domain>[\w.]+)",
        },
    )
    assert extracted.result["count"] == 2
    first = extracted.result["matches"][0]
    assert first == {
        "text": "ada@example.com",
        "start": 5,
        "groups": ["ada", "example.com"],
        "named": {"user": "ada", "domain": "example.com"},
    }


async def test_text_regex_safety(service: ToolService) -> None:
    # Catastrophic backtracking is stopped by the engine's time limit, not by luck.
    slow = await failure(
        service,
        "text",
        {"text": "a" * 40 + "!", "operation": "extract", "pattern": r"(a|aa)+$"},
    )
    assert slow.reason == "REGEX_TIMEOUT" and slow.code == "RESOURCE_EXHAUSTED"
    invalid = await failure(service, "text", {"text": "x", "operation": "extract", "pattern": "("})
    assert invalid.reason == "INVALID_PATTERN"
    missing = await failure(service, "text", {"text": "x", "operation": "extract"})
    assert missing.reason == "PATTERN_REQUIRED"
    with pytest.raises(InvalidArgument) as caught:
        await outcome(service, "text", {"text": "x" * 100_001, "operation": "count"})
    assert caught.value.violations[0].field == "arguments.text"
    with pytest.raises(InvalidArgument):
        await outcome(service, "text", {"text": "x", "operation": "count", "pattern": "a" * 501})


# -- http_fetch -----------------------------------------------------------------------


async def test_http_fetch_allowed_host(service: ToolService, http_server: str) -> None:
    done = await result(service, "http_fetch", {"url": f"{http_server}/json"})
    assert done.result["status"] == 200
    assert done.result["content_type"] == "application/json"
    assert json.loads(done.result["body"])["hello"] == "world"
    assert json.loads(done.text)["ua"].startswith("hivewire-tool")
    assert done.result["headers"]["etag"] == '"v1"'
    assert not done.result["truncated"]
    head = await result(service, "http_fetch", {"url": f"{http_server}/json", "method": "HEAD"})
    assert head.result["status"] == 200 and head.result["body"] == ""
    missing = await result(service, "http_fetch", {"url": f"{http_server}/missing"})
    assert missing.result["status"] == 404


async def test_http_fetch_caps_and_binary(service: ToolService, http_server: str) -> None:
    big = await result(service, "http_fetch", {"url": f"{http_server}/big"})
    assert big.result["truncated"] and big.result["bytes"] == 10_000
    smaller = await result(service, "http_fetch", {"url": f"{http_server}/big", "max_bytes": 10})
    assert smaller.result["body"] == "a" * 10
    binary = await result(service, "http_fetch", {"url": f"{http_server}/binary"})
    assert base64.b64decode(binary.result["body_base64"]) == bytes(range(256))
    with pytest.raises(InvalidArgument):
        await outcome(service, "http_fetch", {"url": f"{http_server}/big", "max_bytes": 10_001})


async def test_http_fetch_redirects(service: ToolService, http_server: str) -> None:
    hop = await result(service, "http_fetch", {"url": f"{http_server}/hop"})
    assert hop.result["status"] == 200 and hop.result["url"].endswith("/json")
    # localhost is not on the allow-list: a redirect there is refused like a direct URL.
    away = await failure(service, "http_fetch", {"url": f"{http_server}/away"})
    assert away.reason == "HOST_NOT_ALLOWED" and away.code == "PERMISSION_DENIED"
    loop = await failure(service, "http_fetch", {"url": f"{http_server}/loop"})
    assert loop.reason == "TOO_MANY_REDIRECTS"


async def test_http_fetch_refusals(service: ToolService, http_server: str) -> None:
    port = http_server.rsplit(":", 1)[1]
    other = await failure(service, "http_fetch", {"url": f"http://localhost:{port}/json"})
    assert other.reason == "HOST_NOT_ALLOWED"
    scheme = await failure(service, "http_fetch", {"url": "file:///etc/passwd"})
    assert scheme.reason == "INVALID_URL"
    relative = await failure(service, "http_fetch", {"url": "/json"})
    assert relative.reason == "INVALID_URL"


async def test_http_fetch_upstream_failures(service: ToolService, http_server: str) -> None:
    stalled = await failure(service, "http_fetch", {"url": f"{http_server}/stall"})
    assert stalled.reason == "UPSTREAM_TIMEOUT" and stalled.retryable
    _Handler.release.set()
    # A port nobody listens on: bind one, close it, and use it at once.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = await failure(service, "http_fetch", {"url": f"http://127.0.0.1:{closed_port}/"})
    assert refused.reason == "UPSTREAM_UNAVAILABLE" and refused.code == "UNAVAILABLE"


async def test_http_fetch_with_empty_allow_list_refuses_everything(http_server: str) -> None:
    async with open_tool_service(ToolSettings(plugins=[])) as svc:
        refused = await failure(svc, "http_fetch", {"url": f"{http_server}/json"})
    assert refused.reason == "HOST_NOT_ALLOWED"
