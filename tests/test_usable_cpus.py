"""The CPUs the Emperor counts as its own (nginx's default worker count is
half of them): its affinity, lowered by a CPU quota on its cgroup or an
ancestor's, as a container limited to 1 CPU on a 64-CPU host has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from psgi_forkserver.procfs import usable_cpus

PRINT_USABLE = "from psgi_forkserver.procfs import usable_cpus; print(usable_cpus())"


def fake_host(root: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A /proc/self and a cgroup tree laid out under `root`."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo.replace("ROOT", str(root)))
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "proc"


def test_a_quota_on_an_ancestor_cgroup_v2_lowers_the_count(tmp_path: Path) -> None:
    proc = fake_host(
        tmp_path, "0::/kubepods/pod1/c1\n",
        "30 25 0:26 / ROOT/sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
        {"sys/fs/cgroup/kubepods/pod1/c1/cpu.max": "max 100000\n",
         "sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n",   # 1.5 CPUs: 2
         "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n"})
    assert usable_cpus(proc, affinity=64) == 2
    assert usable_cpus(proc, affinity=1) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    proc = fake_host(
        tmp_path, "0::/a\n",
        "30 25 0:26 / ROOT/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        {"sys/fs/cgroup/a/cpu.max": "max 100000\n"})
    assert usable_cpus(proc, affinity=64) == 64
    # no cgroup file system at all
    assert usable_cpus(fake_host(tmp_path / "bare", "", "", {}), affinity=3) == 3


def test_a_cgroup_v1_cpu_quota_in_a_namespaced_mount(tmp_path: Path) -> None:
    """cgroup v1's cpu controller (cpu.cfs_quota_us, -1: none), mounted with
    its root at the container's cgroup as a cgroup namespace shows it."""
    proc = fake_host(
        tmp_path, "4:cpu,cpuacct:/docker/abc\n0::/\n",
        "31 25 0:27 /docker/abc ROOT/sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
         "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert usable_cpus(proc, affinity=8) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a cgroup")
def test_this_host_s_cpu_quota_is_seen() -> None:
    """A real cgroup with half a CPU's quota (v1's cpu controller or v2's
    cpu.max, whichever this host has): a process in it counts one CPU."""
    from psgi_forkserver.emperor.cgroup_tree import cgroup2_mount, own_cgroup
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a quota cannot lower it")
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = cgroup2_mount()
    if (v1 / "cpu.cfs_quota_us").exists():
        parent, files = v1, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}
    elif v2 and "cpu" in (v2 / (own_cgroup() or "/").lstrip("/") / "cgroup.controllers").read_text().split():
        parent, files = v2 / (own_cgroup() or "/").lstrip("/"), {"cpu.max": "50000 100000"}
    else:
        pytest.skip("no cpu controller this process may use")
    cg = parent / f"psgi-forkserver-test-cpus-{os.getpid()}"
    cg.mkdir()
    try:
        for name, value in files.items():
            (cg / name).write_text(value)
        out = subprocess.run(
            [sys.executable, "-c", f"open('{cg}/cgroup.procs', 'w').write('0'); {PRINT_USABLE}"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.strip() == "1", out
        assert subprocess.run([sys.executable, "-c", PRINT_USABLE], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip() == str(len(os.sched_getaffinity(0)))
    finally:
        cg.rmdir()
