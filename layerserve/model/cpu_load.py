"""How busy the rest of the machine is, from /proc: cores' worth of CPU that other processes used
over an interval. Kernel timings taken while another process competes for the cores mean little
(on 2 cores every OpenMP call stretches to a scheduler time slice), so the kernel plan is not
cached from such a run; the benchmarks use the same watch to retry contended rounds.
"""

from __future__ import annotations

import os
import time


class CpuWatch:
    """How many cores' worth of CPU other processes used while we measured (from /proc), so a
    benchmark on a shared machine can retry contended runs and say how quiet its figures were."""

    def __init__(self) -> None:
        self.pids: list[int] = [os.getpid()]  # ours; add a peer server's pid while it runs
        self._hz = os.sysconf("SC_CLK_TCK")
        self._start: tuple[int, int, float] | None = None

    def _pid_ticks(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def _sample(self) -> tuple[int, int, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait; steal counts as contention
        return busy, sum(self._pid_ticks(p) for p in self.pids), time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        """Cores used by other processes since start()."""
        busy0, ours0, t0 = self._start
        busy1, ours1, t1 = self._sample()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / self._hz / max(t1 - t0, 1e-9))


class ContentionMonitor:
    """Whether other processes keep a core busy, re-measured at most every `interval` seconds.

    On 2 cores a step split over both threads waits at every barrier for a thread that has no core
    while another process runs: the runner then computes lone tokens on one thread."""

    def __init__(self, threshold: float = 0.3, interval: float = 1.0) -> None:
        self.threshold = threshold  # cores' worth of other processes' CPU that counts as contention
        self.interval = interval
        self._watch = CpuWatch()
        self._watch.start()
        self._since = time.monotonic()
        self.others = 0.0  # cores other processes used over the last interval
        self.contended = False

    def poll(self) -> bool:
        now = time.monotonic()
        if now - self._since >= self.interval:
            self.others = self._watch.stop()
            self.contended = self.others > self.threshold
            self._watch.start()
            self._since = now
        return self.contended
