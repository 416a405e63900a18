"""The ``lazypaged`` command line: a thin front over Config and the daemon.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load
from .demo import size_mib_arg

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lazypaged",
        description="Post-copy memory restore: serve userfaultfd page faults from snapshots.",
    )
    p.add_argument("--version", action="version", version=f"lazypaged {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify)")
    serve.add_argument("--config", "-c", type=Path, help="TOML configuration (default: built-in defaults)")
    serve.add_argument("--handoff-socket", type=Path, help="override daemon.handoff_socket")
    serve.add_argument("--snapshot-dir", type=Path, action="append", help="override daemon.snapshot_dirs")
    serve.add_argument("--log-format", choices=["auto", "json", "console"], help="override daemon.log_format")
    serve.add_argument("--firecracker-socket", type=Path, help="listen for Firecracker's UFFD handshake here")
    serve.add_argument("--mem-file", type=Path, help="guest memory file served to Firecracker")
    serve.add_argument("--check-config", action="store_true",
                       help="validate the configuration (with these overrides), print one line, exit 0 or 1")

    demo = sub.add_parser("demo", help="make a demo image, serve it and restore a process from it")
    demo.add_argument("--size-mib", type=size_mib_arg, default=256, metavar="MIB",
                      help="demo image size (default 256)")
    demo.add_argument("--once", action="store_true", help="exit after the demo restore instead of serving on")

    feats = sub.add_parser("features", help="print the userfaultfd features this kernel offers")
    feats.add_argument("--json", action="store_true")

    from .snapshot.commands import add_parser as add_snapshot_parser

    add_snapshot_parser(sub)
    from .ops_commands import add_parsers as add_ops_parsers

    add_ops_parsers(sub)
    from .criu.cli import add_parser as add_criu_parser

    add_criu_parser(sub)
    return p


def serve_config(args: argparse.Namespace) -> Config:
    """The configuration file with the command line's overrides on top.

    Called again on every reload (SIGHUP), so an override keeps winning over
    the file for the daemon's whole life."""
    from dataclasses import replace

    cfg = load(args.config)
    if args.handoff_socket:
        cfg = replace(cfg, handoff_socket=args.handoff_socket)
    if args.snapshot_dir:
        cfg = replace(cfg, snapshot_dirs=tuple(args.snapshot_dir))
    if args.log_format:
        cfg = replace(cfg, log_format=args.log_format)
    if args.firecracker_socket or args.mem_file:
        fc = cfg.firecracker
        cfg = replace(
            cfg,
            firecracker=replace(
                fc,
                socket=str(args.firecracker_socket or fc.socket),
                mem_file=str(args.mem_file or fc.mem_file),
            ),
        )
    return cfg.validate()


def main(argv: list[str] | None = None) -> int:
    if "criu-lazy-pages" in (argv := sys.argv[1:] if argv is None else argv):
        from .criu.cli import normalize_argv

        argv = normalize_argv(argv)
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .daemon import serve

        try:
            cfg = serve_config(args)
        except ConfigError as e:
            print(f"lazypaged: configuration error: {e}", file=sys.stderr)
            # --check-config answers a question: "no" is its failure, not a usage error.
            return EXIT_FAIL if args.check_config else EXIT_USAGE
        if args.check_config:
            print(f"lazypaged: configuration {args.config or '(built-in defaults)'} is valid")
            return EXIT_OK
        return serve(cfg, lambda: serve_config(args), args.config)
    if args.command == "demo":
        from .demo import run

        return run(args.size_mib, keep_serving=not args.once)
    if args.command == "features":
        import json

        from .uffd import UffdError, abi, kernel_features

        try:
            features, ioctls = kernel_features()
        except UffdError as e:
            print(f"lazypaged: cannot create a userfaultfd: {e}", file=sys.stderr)
            return EXIT_FAIL
        from .features import SINCE, describe

        if args.json:
            since = {name: f"{v[0][0]}.{v[0][1]}" for name, v in SINCE.items()}
            print(json.dumps({"features": abi.feature_names(features), "ioctls": abi.ioctl_names(ioctls),
                              "since": since}))
        else:
            print("features:", " ".join(abi.feature_names(features)))
            print("ioctls:  ", " ".join(abi.ioctl_names(ioctls)))
            print("\n".join(describe(features)))
        return EXIT_OK
    if args.command == "criu-lazy-pages":
        from .criu.cli import run as run_criu

        return run_criu(args)
    if args.command == "snapshot":
        from .snapshot.commands import run as run_snapshot

        return run_snapshot(args)
    if args.command in ("status", "report"):
        from .ops_commands import run as run_ops

        return run_ops(args)
    return EXIT_USAGE  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
