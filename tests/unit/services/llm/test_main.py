"""The command line: flags parse, unset flags leave the MODALMESH_* settings alone."""

from __future__ import annotations

from services.llm.__main__ import parse_args


def test_flags() -> None:
    args = parse_args(["--preset", "tiny", "--host", "0.0.0.0", "--port", "0"])
    assert (args.preset, args.host, args.port) == ("tiny", "0.0.0.0", 0)


def test_unset_flags_are_none() -> None:
    args = parse_args([])
    assert (args.preset, args.host, args.port) == (None, None, None)
