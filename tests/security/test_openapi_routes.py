"""The OpenAPI description and the gateway's handler table say the same thing: every route and
method is described, every described path is served, and each path parameter is declared (a
fuzzer cannot reach an operation whose parameters it does not know)."""

from __future__ import annotations

import re
from typing import Any

from kernel_gateway.base import allowed_methods
from kernel_gateway.handlers import NotFoundHandler, routes
from kernel_gateway.openapi import OPENAPI

NAMED_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>")
LITERALS = re.compile(r"^[a-z]+(\|[a-z]+)*$")


def _group_end(pattern: str, start: int) -> int:
    """The index just past the group that opens at `start`."""
    depth = 0
    for i in range(start, len(pattern)):
        if pattern[i] == "\\":
            continue
        if pattern[i] == "(" and (i == 0 or pattern[i - 1] != "\\"):
            depth += 1
        elif pattern[i] == ")" and pattern[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i + 1
    raise AssertionError(f"unbalanced group in {pattern}")


def spec_paths(pattern: str) -> list[str]:
    """The OpenAPI paths a route's regex serves: `(?P<x>...)` is `{x}`, and a group of plain
    words (`interrupt|restart`) is one literal path each."""
    match = NAMED_GROUP.search(pattern)
    if match is None:
        return [pattern.removesuffix("/?")]
    end = _group_end(pattern, match.start())
    body = pattern[match.end() : end - 1]
    head, tail = pattern[: match.start()], pattern[end:]
    words = body.split("|") if LITERALS.match(body) else ["{" + match["name"] + "}"]
    return [path for word in words for path in spec_paths(head + word + tail)]


def served() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for pattern, handler in routes():
        if handler is NotFoundHandler:
            continue
        methods = {m.lower() for m in allowed_methods(handler)}
        for path in spec_paths(pattern):
            table.setdefault(path, set()).update(methods)
    return table


def path_parameters(item: dict[str, Any], operation: dict[str, Any]) -> set[str]:
    declared = [*item.get("parameters", []), *operation.get("parameters", [])]
    for parameter in declared:
        if parameter["in"] == "path":
            assert parameter["required"] is True, parameter
            assert parameter["schema"]["type"] == "string", parameter
    return {p["name"] for p in declared if p["in"] == "path"}


def test_every_route_is_described_and_every_description_is_served():
    described = {
        path: {m for m in item if m != "parameters"} for path, item in OPENAPI["paths"].items()
    }
    assert served() == described


def test_every_path_parameter_is_declared():
    for path, item in OPENAPI["paths"].items():
        in_path = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert path_parameters(item, operation) == in_path, (method, path)


def test_spec_paths_reads_the_route_patterns():
    assert spec_paths(r"/api/kernels/?") == ["/api/kernels"]
    assert spec_paths(r"/api/x/(?P<kid>[0-9a-f]{8})/(?P<action>interrupt|restart)/?") == [
        "/api/x/{kid}/interrupt",
        "/api/x/{kid}/restart",
    ]
