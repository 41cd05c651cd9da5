"""``xcit-ssl``: the command table and dispatch. Every command lives in :mod:`xcit_ssl.commands`.

    xcit-ssl fit --recipe dino_nano_fmnist            # train (LightningCLI: --print_config, dotted overrides)
    xcit-ssl fit --config runs/x/config.yaml          # rerun a saved run
    xcit-ssl fit --recipe dino_small_p8 --ckpt_path last   # resume
    xcit-ssl knn / linear / export / validate ...     # evaluation and export (see --help of each)
    xcit-ssl recipes | models | protocols             # what exists
    xcit-ssl --version                                # xcit-ssl, Python, torch and Lightning versions

Exit codes: 0 done; 1 a crash (a bug: the traceback is for a report); 2 a mistake in the input or
an output that cannot be written (read-only, no permission), said in one line before the work
starts; 74 (sysexits ``EX_IOERR``) a full disk: nothing already written was replaced, the message
names the folder, the bytes needed and free, and how to resume; 128 + N a run stopped by signal N
after saving ``last.ckpt``; 130 Ctrl-C; 141 the reader of the output left (``| head``).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Sequence

from .console import configure_logging
from .errors import UserError

COMMANDS = {
    "fit": "train with a recipe (DINO, supervised, distilled): xcit-ssl fit --recipe NAME [--a.b value ...]",
    "knn": "weighted k-NN evaluation of frozen features",
    "linear": "linear-probe evaluation of frozen features",
    "export": "export a frozen backbone (safetensors / pth weights; pt2 / onnx to deploy; torchscript, legacy)",
    "validate": "top-1/top-5 of a classifier checkpoint or weight file on a labelled folder",
    "shard": "write an image folder as WebDataset tar shards or litdata chunks (--data.dataset webdataset|litdata)",
    "summary": "one table (and JSON) of knn/linear results: xcit-ssl summary --row LABEL RESULT.json ...",
    "recipes": "list the training recipes",
    "protocols": "list the evaluation protocols",
    "models": "list every XCiT variant with params and GFLOPs",
    "attention": "class-attention maps (per head, DINO masks) and patch PCA sheets of images",
    "plot": "one PNG of a run's curves from RUN_DIR/metrics.csv",
    "doctor": "plan a run: batch, lr, cost, measured step time/memory, data speed, run time, warnings",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: xcit-ssl COMMAND [options]   (xcit-ssl COMMAND --help for details; xcit-ssl --version)",
             "", "commands:"]  # fmt: skip
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _version() -> str:
    """``xcit-ssl X (Python P, torch T, Lightning L)`` from the installed metadata: no torch import."""
    import platform
    from importlib import metadata

    from . import __version__

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"xcit-ssl {__version__} (Python {platform.python_version()}, torch {installed('torch')}, "
            f"Lightning {installed('lightning')})")  # fmt: skip


def _lazy(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(f"{__package__}.commands.{module}"), func)(argv) or 0)

    return run


# command -> (module under xcit_ssl/commands/, function): imported only when the command runs, so
# `xcit-ssl --help` and a misspelt command answer without loading torch
HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "fit": _lazy("fit", "fit_main"),
    "knn": _lazy("evaluate", "knn_main"),
    "linear": _lazy("evaluate", "linear_main"),
    "export": _lazy("export", "export_main"),
    "validate": _lazy("validate", "validate_main"),
    "shard": _lazy("shard", "shard_main"),
    "summary": _lazy("summary", "summary_main"),
    "recipes": _lazy("listing", "recipes_main"),
    "protocols": _lazy("listing", "protocols_main"),
    "models": _lazy("listing", "models_main"),
    "attention": _lazy("analysis", "attention_main"),
    "plot": _lazy("analysis", "plot_main"),
    "doctor": _lazy("doctor", "doctor_main"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xcit-ssl`` console script; returns the exit code."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `xcit-ssl --help | head -3`: the reader left; no traceback, no flush error at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a reader gone


def _check_recipe_name(args: list[str]) -> None:
    """``--recipe NAME`` resolves (or raises the UserError naming the closest recipes) without the
    seconds that importing the fit command costs; ``fit`` resolves it again, the same way."""
    from .config import recipe_path

    for i, arg in enumerate(args):
        if arg == "--recipe" and i + 1 < len(args):
            recipe_path(args[i + 1])
        elif arg.startswith("--recipe="):
            recipe_path(arg.split("=", 1)[1])


def _dispatch(args: list[str]) -> int:
    configure_logging()
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = args[0], args[1:]
    if command not in HANDLERS:
        close = difflib.get_close_matches(command, [*HANDLERS, "--help", "--version"], n=2)
        close = close or (["--version"] if command == "-v" else [])
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        print(f"xcit-ssl: unknown command '{command}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        from .console import quiet_third_party

        if command == "fit":
            _check_recipe_name(rest)  # a misspelt recipe is answered before torch and Lightning load
        with quiet_third_party():  # our libraries' deprecation notices and advertisements, by message
            return HANDLERS[command](rest)
    except UserError as err:  # bad input (2), an unwritable output (2), a full disk (74)
        if not err.every_rank or _rank() == 0:  # raised by every rank of a run for one cause: said once
            print(f"xcit-ssl {command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"xcit-ssl {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a run stopped by SIGTERM/SIGUSR1/SIGINT after saving last.ckpt
        from .runs.signals import RunInterrupted

        if not isinstance(err, RunInterrupted):
            raise
        if _rank() == 0:  # every rank stops; one says so
            print(f"xcit-ssl {command}: interrupted: {err}", file=sys.stderr)
        return err.exit_code


def _rank() -> int:
    """This process's rank as the launcher set it (imported late: it is only needed on errors)."""
    from .runs.folders import launcher_rank

    return launcher_rank()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
