"""`keep_freed_memory`: a training step's large blocks reuse the pages the previous step freed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Five steps shaped like the loss of a tiny-model step (300 answer positions x Qwen's 151,936 logits,
# three 182 MB blocks alive at once) after one warm-up step; prints whether the allocator was tuned
# and the page faults of the five.
STEPS = """
import resource, sys, torch
from tag_lightning.commands.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
torch.set_num_threads(1)  # every block from the main thread's heap: the count does not depend on scheduling
def step():
    logits = torch.randn(300, 151_936)
    return float((logits.log_softmax(-1) * 2)[0, 0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    tuned, faults = subprocess.run([sys.executable, "-c", STEPS, mode], env={**clean, **env}, capture_output=True,
                                   text=True, check=True).stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steps_reuse_freed_pages_unless_the_user_set_glibc_himself():
    block_pages = 300 * 151_936 * 4 // os.sysconf("SC_PAGE_SIZE")
    tuned, reusing = page_faults("tune")
    untuned, plain = page_faults("plain")
    assert (tuned, untuned) == ("True", "False")
    assert plain > 5 * block_pages  # every step faults its fresh blocks in
    # Measured, 8 runs: 667,695 faults untuned every time; 89,025-400,613 tuned (this VM reclaims some idle
    # heap pages itself, so the count varies; the SFT step of `tag fit` went from 1M faults to 73k)
    assert reusing < 0.8 * plain
    user_set, _ = page_faults("tune", MALLOC_ARENA_MAX="2")
    assert user_set == "False"  # the user's own MALLOC_ settings win


def test_a_machine_with_a_cuda_device_keeps_glibc_as_it_is():
    """Its large tensors live on the GPU; the process-wide change was never measured there, so it is not made."""
    probe = ("import torch; torch.cuda.is_available = lambda: True\n"
             "from tag_lightning.commands.allocator import keep_freed_memory; print(keep_freed_memory())")
    clean = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    assert subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
