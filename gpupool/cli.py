"""The `gpupool` command. Each subcommand is an entry point in the `gpupool.commands` group,
so the packages that provide them are loaded only when that subcommand runs."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    commands = {ep.name: ep for ep in entry_points(group="gpupool.commands")}
    helps = ("-h", "--help", "--help-all", "help")
    if not args or args[0] in helps or args[0] not in commands:
        known = ", ".join(sorted(commands))
        if args and args[0] not in helps:
            print(
                f"gpupool: unknown command {args[0]!r}; the commands are: {known}.", file=sys.stderr
            )
            sys.exit(2)
        print(f"usage: gpupool COMMAND [options]\n\ncommands: {known}\n"
              "Run 'gpupool COMMAND --help' for the options of one command.")  # fmt: skip
        return
    commands[args[0]].load()(args[1:])


if __name__ == "__main__":
    main()
