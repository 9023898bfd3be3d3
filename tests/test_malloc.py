"""kvpress_aqua.util.malloc: pinning glibc's thresholds gives freed blocks back to the kernel at once."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_aqua.util.malloc import pin_malloc_thresholds

SCRIPT = """
import sys
from kvpress_aqua.util.malloc import pin_malloc_thresholds

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

if sys.argv[1] == "pin":
    assert pin_malloc_thresholds()
block = b"x" * (16 << 20)  # freeing a mapped 16 MiB block raises glibc's dynamic mmap threshold to 16 MiB
del block
before = rss()
block = b"y" * (8 << 20)
del block
print(rss() - before)
"""


def _kept_after_free(mode):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=root, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_pinned_thresholds_return_freed_blocks():
    assert _kept_after_free("default") >= 7 << 20  # glibc's default kept the freed 8 MiB block resident
    assert _kept_after_free("pin") < 1 << 20


@pytest.mark.parametrize("threshold", [0, -1, 64 << 20])
def test_threshold_out_of_range_is_refused(threshold):
    with pytest.raises(ValueError, match="32 MiB"):
        pin_malloc_thresholds(threshold)
