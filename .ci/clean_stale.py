"""Remove what killed runs left on this machine, before CI runs.

- network namespaces of labs (`<prefix><pid>-<n>-<name>`, lb.lab.Lab):
  lb.lab.cleanup_stale() kills their processes and deletes them;
- BPF pin directories `/sys/fs/bpf/xdplb-<kind>-<pid>[-<n>]` (tests,
  benchmarks, the demo): maps, programs and links, which hold kernel memory
  (a Maglev pool is 64 MiB) and would be reused if the pid came back;
- the benchmark's memory cgroups (bench.memcg.cleanup_stale()).

Only what belongs to a process that is gone is touched: the labs and pins
of live runs (another job, a developer's tests) stay. Prints what it removed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyroute2 import netns  # noqa: E402

from bench import memcg  # noqa: E402
from lb.lab import cleanup_stale, pid_alive  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
LAB = re.compile(r"^(x[a-z]*?)(\d+)-\d+-")
PIN = re.compile(r"^xdplb-[a-z]+-(\d+)(-\d+)?$")


def main() -> int:
    removed: list[str] = []
    prefixes = {m.group(1) for name in netns.listnetns() if (m := LAB.match(name))}
    for prefix in sorted(prefixes):
        removed += cleanup_stale(prefix)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if BPFFS.is_dir():
        for d in sorted(BPFFS.iterdir()):
            m = PIN.match(d.name)
            if m and d.is_dir() and int(m.group(1)) <= pid_max and not pid_alive(int(m.group(1))):
                shutil.rmtree(d)        # unpinning the links detaches their programs
                removed.append(str(d))
    memcg.cleanup_stale()
    print(f"clean_stale: removed {len(removed)}" + "".join(f"\n  {r}" for r in removed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
