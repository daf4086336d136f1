"""Where a training step's time goes: waiting for the data loader, forward, backward, optimizer.

Marks are `time.perf_counter()` reads on the host, nothing else: no device synchronization is
added. On a CPU the operators run as they are called, so the marks split the step truthfully. On
a GPU the host only queues kernels and runs ahead, so forward, backward and optimizer would be
the time to launch them: there the three are reported together as `compute` (the step's time
minus the data wait; the host waits for the GPU wherever the loop already reads a value).
"""

from __future__ import annotations

import time

PHASES = ("data", "forward", "backward", "optimizer", "other")
COMPUTE = ("forward", "backward", "optimizer")


class StepTimer:
    def __init__(self, split_compute: bool = True) -> None:
        self.split_compute = split_compute
        self.totals: dict[str, float] = {}
        self.steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        """The clock starts (the first data wait counts from here)."""
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        now = time.perf_counter()
        if not self.split_compute and phase in COMPUTE:
            phase = "compute"
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
        self._last = now

    def step_done(self) -> None:
        self.mark("other")  # losses summed, lines shown and logged
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase measured, and `total`."""
        steps = max(1, self.steps)
        order = PHASES if self.split_compute else ("data", "compute", "other")
        means = {phase: round(1000 * self.totals[phase] / steps, 2) for phase in order if phase in self.totals}
        means["total"] = round(sum(self.totals.values()) * 1000 / steps, 2)
        return means


def breakdown_text(step_ms: dict[str, float]) -> str:
    """`step 812 ms: data 3%, forward 38%, backward 52%, optimizer 6%, other 1%`."""
    total = step_ms.get("total", 0.0)
    shares = ", ".join(f"{phase} {100 * ms / total:.0f}%" for phase, ms in step_ms.items()
                       if phase != "total" and total > 0)
    return f"step {total:.0f} ms: {shares}" if shares else f"step {total:.0f} ms"
