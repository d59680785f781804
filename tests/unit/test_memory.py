"""The trimmer gives memory back once a burst of work is over, and never during one."""

from __future__ import annotations

from phabmesh import memory


class _Trimmer(memory.Trimmer):
    def look(self) -> bool:
        """One period: True if it trimmed."""
        if self.due():
            self.run_trim()
            return True
        return False


class _Cpu:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_it_trims_once_after_a_burst_and_not_while_busy_or_idle() -> None:
    cpu, trims = _Cpu(), []
    trimmer = _Trimmer(period=5, quiet=0.05, worth=1.0, cpu=cpu, trim=lambda: trims.append(1))
    assert not trimmer.look()  # idle from the start: nothing to give back
    cpu.seconds += 4.0  # a busy period (80 % of a core)
    assert not trimmer.look() and trims == []
    cpu.seconds += 3.0  # still busy
    assert not trimmer.look()
    cpu.seconds += 0.1  # quiet (2 % of a core): the burst is over
    assert trimmer.look() and trims == [1]
    cpu.seconds += 0.1
    assert not trimmer.look()  # quiet again, but nothing worked since
    looks = []
    for _ in range(6):  # a little work spread over quiet periods adds up...
        cpu.seconds += 0.25
        looks.append(trimmer.look())
    assert looks == [False, False, False, True, False, False]  # ...to a trim once worth it
    assert trims == [1, 1]


def test_without_glibc_it_does_nothing() -> None:
    cpu = _Cpu()
    trimmer = _Trimmer(cpu=cpu)
    trimmer.trim = None
    cpu.seconds += 10
    trimmer.look()
    cpu.seconds += 0.01
    assert not trimmer.look() and trimmer.trims == 0


def test_glibcs_trim_is_found_and_runs() -> None:
    trim = memory._malloc_trim()
    assert trim is not None  # the images and CI run on glibc
    trim()
