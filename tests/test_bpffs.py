"""lb/bpffs.py's two paths that the CLI tests cannot reach without
unmounting the host's bpffs: a new bpffs mounted in the host's mount
namespace, and a refusal where the host has none either. Each runs in mount
namespaces of its own (unshare), with bpffs unmounted there only; which
process counts as the host is set by the snippet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lb.lab import REPO_ROOT
from lbtest import pin_dir

UNMOUNT = "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; "


def run(script: str, python: str) -> subprocess.CompletedProcess:
    p = subprocess.run(["unshare", "--mount", "sh", "-c", UNMOUNT + script, "sh", sys.executable, "-c", python],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_a_new_bpffs_is_mounted_in_the_hosts_namespace():
    marker = Path(pin_dir())             # on the host's bpffs, so not on a new one
    marker.mkdir()
    try:
        p = run('exec "$@"', f"""
import os
import lb.bpffs as b
b.host_process = lambda: os.getpid()     # this namespace is the host's
print(b.ensure_bpffs("{marker}/pins"))
print(b.is_bpffs("/sys/fs/bpf"), os.path.exists("{marker}"))
print(b.ensure_bpffs("{marker}/pins"))
""")
    finally:
        marker.rmdir()
    assert p.stdout.splitlines() == [
        "bpffs was not mounted: mounted it at /sys/fs/bpf",
        "True False",                            # a new instance: not the host's
        "None",                                  # there now: nothing more to do
    ], p.stdout


def test_no_bpffs_here_nor_on_the_host_is_refused():
    """A fresh bpffs in a namespace of our own would vanish with it: refused,
    with what to run on the host."""
    p = run('unshare --mount "$@"', """
import os
import lb.bpffs as b
b.host_process = lambda: os.getppid()    # the shell: another namespace, without bpffs
for create in (True, False):
    try:
        print(b.ensure_bpffs("/sys/fs/bpf/xdplb-x", create=create))
    except b.BpffsError as e:
        print(e)
print(b.is_bpffs("/sys/fs/bpf"))
""")
    lines = p.stdout.splitlines()
    assert len(lines) == 3, p.stdout
    for line in lines[:2]:
        assert line.startswith("bpffs is mounted neither at /sys/fs/bpf in this mount namespace nor "
                               "on the host (pid "), line
        assert "mount it on the host: `mount -t bpf bpf /sys/fs/bpf`" in line, line
    assert lines[2] == "False"                   # nothing was mounted
