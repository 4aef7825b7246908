"""retain_freed_memory: a large tensor allocated again after being freed costs no fresh page faults.

Each check runs in its own interpreter, as the switch changes the whole process's allocator.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys
import torch
from car_med.engines import retain_freed_memory
changed = retain_freed_memory(sys.argv[1] == "on")
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32_000_000)  # 128 MB, 4x glibc's largest mmap threshold (32 MB)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"changed": changed, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two interpreters that import car_med.engines (MONAI): about 8 s on 2 cores
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_new_page_faults():
    pages = 128e6 / 4096
    default = _faults("off")
    retained = _faults("on")
    assert default["changed"] is False and retained["changed"] is True
    # without it, every 128 MB tensor is a fresh mapping: each page faults in again
    assert all(f > 0.9 * pages for f in default["faults"]), default
    # with it, the pages are faulted in at most twice, by the first three allocations (a small allocation can
    # land right after a freed block, which then no longer fits the aligned request), and reused from then on
    assert retained["faults"][0] > 0.9 * pages, retained
    assert sum(retained["faults"]) < 2.1 * pages, retained
    assert all(f < 0.01 * pages for f in retained["faults"][3:]), retained


def test_disabled_is_a_no_op():
    from car_med.engines import retain_freed_memory

    assert retain_freed_memory(False) is False
