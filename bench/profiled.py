"""Run a module under cProfile timed in CPU seconds of this process (not wall time, which on
a shared machine counts the time others ran): ``python -m bench.profiled OUT -m MODULE ...``
writes the profile to OUT when the module returns or the process is told to stop."""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.profiled OUT -m MODULE [ARGS...]")
    sys.argv = [module, *rest]
    profile = cProfile.Profile(time.process_time)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # replaced by the module's own
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
