"""`python -m daemon.simulator [--host H] [--port P] [--token T] [--timings Q,R,E | --instant]`:
a simulated Cloudgene server in the foreground (what `imputationd simulate-server` runs)."""

from __future__ import annotations

import argparse
import sys

from daemon.simulator.model import Timings
from daemon.simulator.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--token", help="API token to accept (generated and printed when omitted)")
    parser.add_argument("--user", default="demo", help="username behind the token")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--timings", help="queue,run,export seconds (default 0.3,0.3,0.3)")
    speed.add_argument("--instant", action="store_true", help="jobs finish immediately (benchmarks)")
    parser.add_argument("--max-jobs", type=int, default=3, help="per-user limit of waiting+running jobs")
    parser.add_argument("--download-limit", type=int, default=10, help="downloads per file (-1: unlimited)")
    args = parser.parse_args(argv)
    timings = None
    if args.instant:
        timings = Timings.instant()
    elif args.timings:
        try:
            queue, run, export = (float(x) for x in args.timings.split(","))
        except ValueError:
            parser.error("--timings wants three numbers: queue,run,export")
        timings = Timings(queue=queue, run=run, export=export)
    return serve(args.host, args.port, args.token, username=args.user, timings=timings,
                 max_jobs_per_user=args.max_jobs, download_limit=args.download_limit)


if __name__ == "__main__":
    sys.exit(main())
