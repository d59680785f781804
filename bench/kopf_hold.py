"""kopf's start-up hold alone, without a cluster: how long it takes to hold back N objects.

    python -m bench.kopf_hold [--objects 250,500,1000,2000]

For a resource with an index handler (``@kopf.index``), kopf's watcher makes one toggle per
object of its first listing (``queueing.watcher``), and each object's worker, once its index
handlers have run, waits until every toggle is on (``processing.process_resource_event``:
handlers are held until every first listing is indexed). Each new toggle notifies every
worker already waiting, and each re-checks every toggle: the hold costs more per object the
more objects are held. This times that alone, on this process's one event loop, as kopf
does it (kopf's own ToggleSet), with one more toggle for the listing still under way.

The operator indexes pods and leases this way (phabmesh.controller.handlers), so its start-up
on a large cluster pays this before its first decision; ``python -m bench.scale`` measures the
restart of the whole operator.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from kopf._cogs.aiokits import aiotoggles


async def hold(objects: int) -> tuple[float, float]:
    """(seconds to list ``objects``, seconds until every worker is released)."""
    toggles = aiotoggles.ToggleSet(all)
    listing = await toggles.make_toggle(False, name="listing")
    workers: list[asyncio.Task[None]] = []

    async def worker(indexed: aiotoggles.Toggle) -> None:
        await toggles.drop_toggle(indexed)  # its index handlers have run
        await toggles.wait_for(True)  # held until every first listing is indexed

    start = time.perf_counter()
    for i in range(objects):
        indexed = await toggles.make_toggle(name=str(i))
        workers.append(asyncio.create_task(worker(indexed)))
        await asyncio.sleep(0)  # the watcher yields between events; the workers run
    listed = time.perf_counter() - start
    await listing.turn_to(True)
    await asyncio.gather(*workers)
    return listed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kopf_hold")
    parser.add_argument("--objects", default="250,500,1000,2000")
    args = parser.parse_args()
    for objects in (int(n) for n in str(args.objects).split(",") if n):
        if not 0 < objects <= 20000:
            parser.error(f"--objects: {objects} is not between 1 and 20000")
        listed, released = asyncio.run(hold(objects))
        print(f"{objects:>6} objects: listed in {listed:.2f} s, all released {released:.2f} s")


if __name__ == "__main__":
    main()
