import json
import logging

from services.common.log import (
    JsonFormatter,
    TextFormatter,
    bound_request_id,
    request_id_from_metadata,
    request_id_var,
)


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("services.x", logging.INFO, __file__, 1, msg, args, None)


def test_json_lines_carry_service_and_the_bound_request_id():
    fmt = JsonFormatter("llm")
    with bound_request_id("req-7"):
        entry = json.loads(fmt.format(_record("generated %s tokens", 5)))
    assert entry["service"] == "llm" and entry["msg"] == "generated 5 tokens"
    assert entry["request_id"] == "req-7" and entry["level"] == "INFO"
    assert "request_id" not in json.loads(fmt.format(_record("idle")))


def test_binding_is_undone_after_the_block_even_on_error():
    try:
        with bound_request_id("a"):
            raise ValueError
    except ValueError:
        pass
    assert request_id_var.get() is None


def test_text_lines_and_exceptions():
    with bound_request_id("r1"):
        assert TextFormatter("gateway").format(_record("hi")).endswith("gateway services.x: hi [req=r1]")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(JsonFormatter("s").format(record))["exc"]


def test_request_id_from_grpc_metadata():
    assert request_id_from_metadata([("a", "1"), ("x-request-id", "abc")]) == "abc"
    assert request_id_from_metadata([("x-request-id", b"bin")]) == "bin"
    assert request_id_from_metadata(None) is None
