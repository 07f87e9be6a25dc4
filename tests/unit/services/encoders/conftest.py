"""Fixtures of these tests, shared with the tests of the services that use the same models (see tests/helpers/fixtures_*)."""

from tests.helpers.fixtures_backbones import tiny_preset, twins  # noqa: F401
