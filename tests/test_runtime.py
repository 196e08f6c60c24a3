import json
import subprocess
import sys

PAGE_FAULTS = """
import json, resource, sys
import torch
from pipeline.runtime import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(20):  # a training step's pattern: the same large tensors allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 << 20)  # 64 MB, above glibc's largest mmap threshold
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def page_faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


def test_keep_freed_memory_reuses_a_freed_tensor_without_faulting_its_pages_in_again():
    """In a fresh process (the setting is process-wide): without it every 64 MB tensor
    page-faults all its 16,384 pages again; with it, once the heap's holes have merged into
    a free block of that size (a few allocations, see `keep_freed_memory`), none."""
    pages = (64 << 20) // 4096
    default = page_faults("default")["faults"]
    assert all(f >= pages // 2 for f in default), default
    kept = page_faults("keep")
    assert kept["kept"] is True
    assert all(f < pages // 100 for f in kept["faults"][-5:]), kept["faults"]
