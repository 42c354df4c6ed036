"""benchmarks/benchmark_loss.py's tail percentiles and its competing busy processes (--busy N)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from recipes import load_tool

tool = load_tool("benchmark_loss", "benchmarks")


def cpu_ticks(pid):
    """User plus system CPU time of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 37) ** 3)])
def test_percentiles_interpolate_linearly_as_numpy(values):
    for q in (0, 50, 90, 99, 100):
        assert tool.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_busy_processes_spin_during_the_block_and_are_stopped_after_it_even_on_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        with tool.busy_processes(2) as spinners:
            assert len(spinners) == 2
            assert wait_until(lambda: all(cpu_ticks(spinner.pid) > 10 for spinner in spinners)), "not spinning"
            assert all(spinner.poll() is None for spinner in spinners)
            raise KeyboardInterrupt
    assert all(spinner.poll() is not None for spinner in spinners)
    with tool.busy_processes(0) as none:
        assert none == []


def test_a_spinner_ends_by_itself_when_the_benchmark_dies_first():
    """The benchmark killed (no cleanup): its spinner notices it has a new parent and stops."""
    parent = ("import os, subprocess, sys\n"
              "spinner = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())],\n"
              "                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "print(spinner.pid, flush=True)\n"
              "os._exit(0)\n")
    output = subprocess.run([sys.executable, "-c", parent, tool.SPINNER], capture_output=True, text=True, timeout=60)
    pid = int(output.stdout)

    def gone():
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped by init
        except FileNotFoundError:
            return True

    if not gone():
        assert wait_until(gone), "the orphaned spinner kept running"


def test_busy_needs_a_count_of_zero_or_more(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--busy", "-1"])
    assert exit_info.value.code == 2 and "--busy must be 0 or more" in capsys.readouterr().err
