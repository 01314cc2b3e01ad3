"""A benchmark that selects a backend must not leak its choice into the next one: reuse the tests' fixture."""

from tests.conftest import _restore_backend  # noqa: F401
