"""DBOS Transact for Python on the workload hodei's benches measure (benches/common/mod.rs):
workflows of 10 sequential no-op steps, each step returning 100 bytes, run in a closed loop of
C concurrent workflows on PostgreSQL. Run by benches/dbos.rs, which compares it with hodei on
the same server in the same run; usable alone:

    python3 bench.py --url postgres://user:pw@host:port/any_db --workflows 200 --concurrency 16

DBOS's system database is `--database` (default `hodei_bench_dbos`) on the server of `--url`,
created by DBOS if missing; each run gets a fresh system schema there (`--schema`, dropped at
the end) so that no run reads another's rows and none collides with hodei's schemas.

Prints one JSON line on stdout: {"workflows": N, "concurrency": C, "seconds": S,
"workflows_per_second": R, "dbos_version": V}. DBOS's own logs go to stderr.

The loop is DBOS.start_workflow + handle.get_result from C client threads, each starting its
next workflow as soon as its last one's result is in: the same closed loop as hodei's
(`closed_loop` + `Engine::start` + `outcome`), so both are offered the same load. A DBOS queue
with concurrency C, the other idiomatic way to bound concurrency, is not used: its dispatcher
polls the queue table (1 s by default), which would measure the poll interval, not the engine.
get_result on a handle from start_workflow waits on the in-process future, not on a poll.

DBOS's settings are its defaults. Its system-database pool (20 connections) was tried at 64
for 64 concurrent workflows, with no difference beyond the run-to-run noise: on a 2-core machine
the interpreter, not the pool, is what DBOS waits on (its CPU time is about its wall time).
"""

import argparse
import json
import os
import sys
import threading
import time
from importlib.metadata import version

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig

STEPS = 10
OUTPUT_BYTES = 100


@DBOS.step()
def noop_step(n: int) -> bytes:
    return bytes([n % 256]) * OUTPUT_BYTES


@DBOS.workflow()
def noop_workflow(n: int) -> int:
    for _ in range(STEPS):
        out = noop_step(n)
        if len(out) != OUTPUT_BYTES:
            raise RuntimeError(f"a step returned {len(out)} bytes")
    return n


def closed_loop(concurrency: int, total: int, first: int) -> tuple[float, int]:
    """Runs workflows first..first+total from `concurrency` threads; returns the wall time
    from the first start to the last result, and how many completed with the right result."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "error": None}

    def worker() -> None:
        while True:
            with lock:
                n = state["next"]
                if n >= total or state["error"] is not None:
                    return
                state["next"] = n + 1
            try:
                result = DBOS.start_workflow(noop_workflow, first + n).get_result()
                if result != first + n:
                    raise RuntimeError(f"workflow {first + n} returned {result!r}")
            except BaseException as e:  # re-raised in the main thread after the join
                with lock:
                    state["error"] = e
                return
            with lock:
                state["done"] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if state["error"] is not None:
        raise state["error"]
    return elapsed, state["done"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a postgres:// URL of the server")
    parser.add_argument("--database", default="hodei_bench_dbos")
    parser.add_argument("--schema", default=f"dbos_bench_{os.getpid()}")
    parser.add_argument("--workflows", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=None, help="default: max(concurrency, 10)")
    args = parser.parse_args()
    if args.workflows < 1 or args.concurrency < 1:
        parser.error("--workflows and --concurrency must be at least 1")
    warmup = max(args.concurrency, 10) if args.warmup is None else args.warmup

    # SQLAlchemy wants the driver in the scheme; libpq-style URLs (as hodei's) name none.
    server = sa.engine.make_url(args.url).set(drivername="postgresql+psycopg")
    system_url = server.set(database=args.database)
    config: DBOSConfig = {
        "name": "hodei-bench",
        "system_database_url": system_url.render_as_string(hide_password=False),
        "dbos_system_schema": args.schema,
        # A bench of the engine's durable path: its INFO lines per launch would bury the table.
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        if warmup > 0:
            closed_loop(args.concurrency, warmup, 0)
        seconds, done = closed_loop(args.concurrency, args.workflows, warmup)
    finally:
        DBOS.destroy()
        engine = sa.create_engine(system_url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{args.schema}" CASCADE'))
        finally:
            engine.dispose()
    print(
        json.dumps(
            {
                "workflows": done,
                "concurrency": args.concurrency,
                "seconds": seconds,
                "workflows_per_second": done / seconds,
                "dbos_version": version("dbos"),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
