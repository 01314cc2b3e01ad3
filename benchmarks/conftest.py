"""The benchmark process runs as `fastdarts search` does, with fastdarts.tune_cpu_allocator() (glibc keeps freed
tensor memory): every benchmark, fastdarts and reference alike. A benchmark that selects a backend must not leak
its choice into the next one: the tests' fixture is reused."""

import fastdarts
from tests.conftest import _restore_backend  # noqa: F401

fastdarts.tune_cpu_allocator()
