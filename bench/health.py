"""Can a measurement be trusted? The health check behind the report's "!" column.

On a loaded machine a threaded step waits for worker threads the scheduler has parked:
on 2 busy cores every provider, traffic twin included, read ≈12 ms for 2^14 elements,
and ``--threads 1`` gave sane numbers (bench/NOTES.md, entry 15). Each group's
measurement says three things about the machine, and each row two about itself:

- its traffic twin ran far slower than the twin's calibration, the same twin on one
  thread (best of a few steps): the twin only moves bytes, and on more threads it can
  only be faster, short of the cost of waking them;
- our threads spent much of the time they wanted a CPU waiting for one (Linux reports
  both per thread in ``/proc/self/task/*/schedstat``). The twin runs one parallel
  region a step and hides most of that; torch fused opens one per tensor (161 a step
  on ResNet-50), waits at each, and read 244 ms against fastmomentum's 31;
- the row's repeats spread so widely that their median is not a stable number, or
  most of them are far slower than its best one.

The report measures a group with an unhealthy row again with fewer threads
(`thread_counts_to_try`); what stays unhealthy is marked, never dropped.
"""

import statistics
from dataclasses import dataclass
from pathlib import Path

#: A twin slower than this many times its calibration (plus the launch allowance) is
#: flagged. On the 2-core machine the 2-thread twin read 0.1-0.5× its one-thread
#: calibration (2^12 to 2^22 elements) when our threads did not wait for a CPU; with
#: the cores oversubscribed 8× (2^22: 11 ms instead of 1), 120× (2^18) and 300× (2^12,
#: 6.6 ms instead of 3 µs). 3× sits between, well above the few tens of percent that
#: noise moves a twin between steps.
TWIN_SLOWDOWN_LIMIT = 3.0
#: Added to the calibration: waking a thread pool costs ≈2 µs on 2 cores (NOTES entry
#: 2) and tens of µs on many-core machines, where a one-thread twin pays nothing.
LAUNCH_ALLOWANCE_S = 20e-6
#: `cpu_wait_share` above which a group is flagged. Whenever the 2-core machine had a
#: core to spare it read 0.00-0.01; groups whose timings were visibly distorted read
#: 0.44-0.75 (2^22 Adam on 2 threads at 2× its one-thread time, torch fused on ResNet-50
#: at 8×, one thread beside two busy loops at 4×); one thread on ResNet-50 beside other
#: work 0.30. A fifth of the time waiting is far from both ends of a quiet machine.
CPU_WAIT_LIMIT = 0.2
#: Interquartile range of the repeats over their median above which a row is flagged.
#: Committed runs on the shared 2-core machine reach 0.75 (torch foreach on
#: ResNet-50), most rows 0.02-0.15; loaded runs read 1.1-340 (a few steps stalled
#: for a whole scheduler slice).
SPREAD_LIMIT = 1.0
#: A row's median over its best repeat (plus the launch allowance, so that steps of a
#: few µs are not judged on jitter) above which it is flagged. Committed runs reach 1.54
#: (torch foreach on a 2^24 Adam tensor); on a loaded machine torch fused on ResNet-50
#: read 316 ms against a best of 121 ms (2.6), 2^22 tensors 2.9-4.0, while their
#: interquartile ranges looked ordinary: most steps were slow, not a few.
MEDIAN_VS_BEST_LIMIT = 2.0


@dataclass(frozen=True)
class GroupConditions:
    """What one group's measurement says about the machine, shared by its rows."""

    #: the twin's median step in the group, seconds
    twin_s: float
    #: the twin's best step on one thread, seconds
    calibration_s: float
    #: share of the time our threads wanted a CPU that they waited for one (None: unknown)
    cpu_wait: float | None


@dataclass(frozen=True)
class Health:
    """The verdict on one measured row, from four numbers."""

    #: the group's twin median over (its one-thread calibration + launch allowance)
    twin_vs_calibration: float
    #: the group's `cpu_wait_share`, or None
    cpu_wait: float | None
    #: interquartile range over median of this row's repeats
    spread: float
    #: median over (best + launch allowance) of this row's repeats
    median_vs_best: float

    @property
    def twin_too_slow(self):
        return self.twin_vs_calibration > TWIN_SLOWDOWN_LIMIT

    @property
    def waited_for_cpu(self):
        return self.cpu_wait is not None and self.cpu_wait > CPU_WAIT_LIMIT

    @property
    def too_spread(self):
        return self.spread > SPREAD_LIMIT

    @property
    def mostly_slow(self):
        return self.median_vs_best > MEDIAN_VS_BEST_LIMIT

    @property
    def problems(self):
        problems = _machine_problems(self)
        if self.too_spread:
            problems.append(f"repeats spread {_times(self.spread)} their median (IQR)")
        if self.mostly_slow:
            problems.append(f"median {_times(self.median_vs_best)} the best repeat")
        return problems

    @property
    def ok(self):
        return not self.problems

    def to_json(self):
        return {
            "ok": self.ok,
            "twin_vs_calibration": round(self.twin_vs_calibration, 3),
            "cpu_wait": None if self.cpu_wait is None else round(self.cpu_wait, 3),
            "spread": round(self.spread, 3),
            "median_vs_best": round(self.median_vs_best, 3),
            "problems": self.problems,
        }


def _machine_problems(verdict):
    """The group-wide problems: a slow twin, threads waiting for a CPU."""
    problems = []
    if verdict.twin_too_slow:
        problems.append(f"twin {_times(verdict.twin_vs_calibration)} slower than on one thread")
    if verdict.waited_for_cpu:
        problems.append(f"threads waited for a CPU {verdict.cpu_wait:.0%} of the time")
    return problems


def _times(ratio):
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def relative_spread(times):
    """Interquartile range over median of ``times`` (0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    lower, _, upper = statistics.quantiles(times, n=4, method="inclusive")
    return (upper - lower) / statistics.median(times)


def median_vs_best(times):
    """Median of ``times`` over their best plus the launch allowance."""
    return statistics.median(times) / (min(times) + LAUNCH_ALLOWANCE_S)


def assess(row, conditions):
    """The `Health` of a result ``row`` (the report's dict; this reads its ``times_s``)
    measured under its group's `GroupConditions`."""
    slowdown = conditions.twin_s / (conditions.calibration_s + LAUNCH_ALLOWANCE_S)
    times = row["times_s"]
    return Health(slowdown, conditions.cpu_wait, relative_spread(times), median_vs_best(times))


def group_problems(rows, verdicts):
    """One group's problems in a few words: the machine's once, the rest per provider."""
    problems = _machine_problems(verdicts[0]) if verdicts else []
    for flagged, measure, what in [
        ("too_spread", "spread", "repeats spread (IQR / median)"),
        ("mostly_slow", "median_vs_best", "median over best repeat"),
    ]:
        providers = [
            f"{row['provider']} {getattr(verdict, measure):.1f}"
            for row, verdict in zip(rows, verdicts)
            if getattr(verdict, flagged)
        ]
        if providers:
            problems.append(f"{what}: " + ", ".join(providers))
    return problems


def thread_cpu_times():
    """Per thread of this process, nanoseconds on a CPU and runnable but waiting for one
    (the first two fields of Linux's ``/proc/self/task/<id>/schedstat``); {} elsewhere."""
    times = {}
    try:
        paths = list(Path("/proc/self/task").glob("*/schedstat"))
    except OSError:
        return times
    for path in paths:
        try:
            running, waiting = map(int, path.read_text().split()[:2])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile, or no schedstat in this kernel
        times[path.parent.name] = (running, waiting)
    return times


def cpu_wait_share(before, after):
    """Of the time our threads wanted a CPU between two `thread_cpu_times` readings, the
    share they spent waiting for one; None when nothing was read."""
    running = waiting = 0
    for thread, (run_after, wait_after) in after.items():
        run_before, wait_before = before.get(thread, (0, 0))
        running += run_after - run_before
        waiting += wait_after - wait_before
    if running + waiting <= 0:
        return None
    return waiting / (running + waiting)


def thread_counts_to_try(threads):
    """Thread counts for a group's attempts: as asked, then half, then one (the fix
    for oversubscription), each count once; a single thread is simply tried twice."""
    if threads == 1:
        return [1, 1]
    return list(dict.fromkeys([threads, max(1, threads // 2), 1]))


def pick_attempt(attempts):
    """Index of the attempt to report, each attempt a list of `Health`: the first healthy
    one, else the one with the fewest unhealthy rows (the later one on a tie)."""
    for index, verdicts in enumerate(attempts):
        if all(verdict.ok for verdict in verdicts):
            return index
    unhealthy = [sum(not verdict.ok for verdict in verdicts) for verdicts in attempts]
    return max(range(len(attempts)), key=lambda index: (-unhealthy[index], index))


def limits():
    """The thresholds, as recorded in a report's JSON."""
    return {
        "twin_vs_calibration": TWIN_SLOWDOWN_LIMIT,
        "launch_allowance_s": LAUNCH_ALLOWANCE_S,
        "cpu_wait": CPU_WAIT_LIMIT,
        "spread": SPREAD_LIMIT,
        "median_vs_best": MEDIAN_VS_BEST_LIMIT,
    }
