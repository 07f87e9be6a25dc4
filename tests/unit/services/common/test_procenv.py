"""The service processes' environment: allocator settings added, an operator's own kept."""

from __future__ import annotations

import subprocess
import sys

from services.common.procenv import MALLOC_TUNABLES, service_env


def test_the_allocator_settings_are_added_and_an_operators_own_are_kept() -> None:
    env = service_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    assert (
        service_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
        == "glibc.malloc.arena_max=2"
    )


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def once():
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_with_the_settings_a_freed_40_mib_buffer_is_reused_without_page_faults() -> None:
    """40 MiB: eight frames of 576x4096 FP16 features. By default glibc maps such a buffer fresh
    on every malloc (above its 32 MiB dynamic threshold) and unmaps it on free, so writing it
    faults in 10240 pages each time; with the settings the next one reuses the heap."""
    default = faults({k: v for k, v in service_env({}).items() if k != "GLIBC_TUNABLES"})
    tuned = faults(service_env({}))
    assert default > 10 * 5000, default
    assert tuned < 200, tuned
