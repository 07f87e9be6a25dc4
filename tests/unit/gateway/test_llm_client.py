"""gateway/llm_client.py: the Generate deadline is the least of the gateway's timeout, the
call's own and what is left of the caller's deadline."""

from __future__ import annotations

import time

import pytest

from gateway.llm_client import call_timeout, client_deadline


def test_the_gateway_timeout_without_a_caller_deadline() -> None:
    assert call_timeout(300.0) == 300.0
    assert call_timeout(300.0, 5.0) == 5.0
    with client_deadline(None):
        assert call_timeout(300.0) == 300.0


def test_the_callers_remaining_deadline_shortens_it() -> None:
    with client_deadline(2.0):
        assert 1.5 < call_timeout(300.0) <= 2.0
        assert call_timeout(300.0, 1.0) == 1.0
        assert call_timeout(0.5) == 0.5
    assert call_timeout(300.0) == 300.0  # reset on exit


def test_an_expired_deadline_still_gives_a_positive_timeout() -> None:
    with client_deadline(-3.0):
        assert 0 < call_timeout(300.0) <= 0.001
    with client_deadline(0.01):
        time.sleep(0.02)
        assert call_timeout(300.0) == pytest.approx(0.001)
