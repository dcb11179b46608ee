"""``python -m examples.predict {demo,serve,sample,client} ...`` (run from the repo root)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import client, demo, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.predict",
        description="Batch predictions against a fleet of flaky HTTP servers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser(
        "demo", help="start 4 flaky servers, score a 100,000-row sample, print the report"))
    server.add_arguments(commands.add_parser("serve", help="run one prediction server"))
    sample = commands.add_parser("sample", help="write a sample CSV (a few bad rows in it)")
    sample.add_argument("output", type=Path)
    sample.add_argument("--rows", type=int, default=100_000)
    sample.add_argument("--seed", type=int, default=0)
    client.add_arguments(commands.add_parser("client", help="score a CSV on the servers"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.main(args)
    if args.command == "serve":
        server.main(args)
        return 0
    if args.command == "sample":
        bad = client.write_sample(args.output, args.rows, args.seed)
        print(f"wrote {args.rows:,} rows to {args.output} ({len(bad)} bad rows)")
        return 0
    return client.main(args)


if __name__ == "__main__":
    sys.exit(main())
