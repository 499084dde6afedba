"""Fixtures shared by the lobby tests."""

from tests.lobbies.test_consumers import connect  # noqa: F401 (a fixture: join a lobby as a person)
