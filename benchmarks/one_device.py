"""Import first in a benchmark: drop forced host devices before JAX starts.

The tests and the book force eight CPU devices through XLA_FLAGS, and a shell
may still export that flag. Eight simulated devices slow XLA's CPU runtime down
for small scan steps (about 25% on vq_attention), so every benchmark measures
one device.
"""

import os

FORCE_DEVICES = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    flag
    for flag in os.environ.get("XLA_FLAGS", "").split()
    if not flag.startswith(FORCE_DEVICES)
)
