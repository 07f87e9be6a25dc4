"""Fixtures of these tests, shared with the tests of the services that use the same models (see tests/helpers/fixtures_*)."""

from tests.helpers.fixtures_decoders import decoder_folders, decoders  # noqa: F401
