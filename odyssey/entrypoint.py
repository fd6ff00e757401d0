"""What `python -m train` and `python -m tune` share: the same flags for a config, overrides and a Ray
address, logging to stderr, a one-line error for anything the user can fix, Ray left cleanly, and one
JSON line on stdout at the end (for scripts and CI)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from odyssey import cluster
from odyssey.errors import OdysseyError


def parser(prog: str, description: str, kind: str, config_dir: Path, default: str) -> argparse.ArgumentParser:
    """Flags shared by the entry points; --help lists the named configs of `config_dir` and the default."""
    names = ", ".join(sorted(p.stem for p in config_dir.glob("*.yaml")))
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"{kind}s ({config_dir.parent.name}/{config_dir.name}/): {names}",
    )
    p.add_argument(
        "--config",
        metavar="NAME|PATH",
        help=f"a {kind} by name (listed below) or a YAML file (default: {default})",
    )
    add_set(p, "--set steps=200 --set optim.lr=3e-3")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    p.set_defaults(kind=kind, default_config=default)
    return p


def add_set(p: argparse.ArgumentParser, example: str) -> None:
    """--set KEY=VALUE, repeatable: what every command that reads a config takes."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field of the config, dotted (e.g. {example}); repeatable. "
        "An unknown field is an error naming the closest one",
    )


def config_name(args: argparse.Namespace) -> str:
    """--config, or the default, said out loud."""
    if args.config is None:
        print(
            f"no --config given: using the {args.kind} {args.default_config!r} (--help lists the others)",
            file=sys.stderr,
        )
        return args.default_config
    return args.config


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
