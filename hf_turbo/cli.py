"""The ``hf-turbo`` command: ``demo``, ``bench``, ``serve`` and ``eval``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from hf_turbo import __version__, bench, demo
    from hf_turbo import eval as eval_cmd
    from hf_turbo.serve import cli as serve_cli

    parser = argparse.ArgumentParser(
        prog="hf-turbo",
        description="Fast, exact inference for Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"hf-turbo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("demo", help="complete Python prompts with the built-in fixture model",
                       description=demo.__doc__)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    p = sub.add_parser("bench", help="benchmark HF paths and hf_turbo side by side",
                       description=(bench.__doc__ or "").strip().splitlines()[0] if bench.__doc__ else None)
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'serve' extra)",
                       description=(serve_cli.__doc__ or "").strip().splitlines()[0])
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.run)
    p = sub.add_parser("eval", help="check the exactness contract across axes, dtypes and architectures",
                       description=(eval_cmd.__doc__ or "").strip().splitlines()[0])
    eval_cmd.add_arguments(p)
    p.set_defaults(func=eval_cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hf-turbo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
