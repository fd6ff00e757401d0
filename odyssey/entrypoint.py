"""What `python -m train` and `python -m tune` share: the same flags for a config, overrides and a Ray
address, logging to stderr, a one-line error for anything the user can fix, Ray left cleanly, and one
JSON line on stdout at the end (for scripts and CI)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from odyssey import cluster
from odyssey.errors import OdysseyError


def parser(prog: str, description: str, config_default: str, config_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default=config_default, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    return p


def run(name: str, work: Callable[[], dict]) -> int:
    """Run `work`; print its summary as the last stdout line (once Ray has stopped printing worker logs)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        summary = work()
    except OdysseyError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    finally:
        cluster.disconnect()
    print(json.dumps(summary))
    return 0
