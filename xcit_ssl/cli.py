"""``xcit-ssl``: parse, dispatch, print. No training logic lives here.

    xcit-ssl fit --recipe dino_nano_fmnist            # train (LightningCLI: --print_config, dotted overrides)
    xcit-ssl fit --config runs/x/config.yaml          # rerun a saved run
    xcit-ssl fit --recipe dino_small_p8 --ckpt_path last   # resume
    xcit-ssl knn / linear / export / validate ...     # evaluation and export (see --help of each)
    xcit-ssl recipes | models | protocols             # what exists
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

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
    lines = ["usage: xcit-ssl COMMAND [options]   (xcit-ssl COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from .console import print_table  # as wide as the terminal ($COLUMNS; 100 when not a tty)

    print_table(title, columns, rows, wrap=("description",))


def _cmd_recipes(argv: list[str]) -> int:
    from .config import list_recipes

    _print_table("xcit-ssl recipes", ["recipe", "description"], list_recipes())
    return 0


def _cmd_protocols(argv: list[str]) -> int:
    from .config import list_protocols

    _print_table("xcit-ssl evaluation protocols", ["protocol", "description"], list_protocols())
    return 0


def _recipe_backbone(recipe: str) -> tuple[str, dict[str, int]]:
    """The variant name and size overrides (depth, embed_dim, num_heads, img_size) a recipe builds."""
    import yaml

    from .config import recipe_path
    from .models.registry import VARIANTS

    path = recipe_path(recipe)
    cfg = yaml.safe_load(path.read_text()) or {}
    args = (((cfg.get("model") or {}).get("init_args") or {}).get("backbone") or {}).get("init_args")
    if not isinstance(args, dict) or args.get("name") not in VARIANTS:
        raise UserError(f"{path}: no XCiT variant at model.init_args.backbone.init_args.name; "
                        "pass a training recipe (xcit-ssl recipes lists them)")  # fmt: skip
    return args["name"], {k: int(args[k]) for k in ("depth", "embed_dim", "num_heads", "img_size") if args.get(k)}


def _cmd_models(argv: list[str]) -> int:
    """``xcit-ssl models`` lists every variant; ``--recipe NAME`` (repeatable) the backbones those
    recipes build, their overrides (fewer blocks, narrower) applied, at the recipe's resolution."""
    from .models.flops import backbone_row, variant_table

    names = argv[1::2]
    if len(argv) % 2 or any(flag != "--recipe" for flag in argv[0::2]):
        raise UserError(f"unexpected arguments {' '.join(argv)!r}: "
                        "use `xcit-ssl models` or `xcit-ssl models --recipe dino_nano_fmnist`")  # fmt: skip
    if names:
        rows = []
        for recipe in names:
            name, overrides = _recipe_backbone(recipe)
            row = backbone_row(name, **overrides)
            changed = ", ".join(f"{k} {v}" for k, v in overrides.items() if k != "img_size")
            rows.append(row | {"name": f"{Path(recipe).stem}: {name}" + (f" with {changed}" if changed else "")})
        title = "backbones of the recipes (params with a 1000-class head; GFLOPs at batch 1, recipe size)"
    else:
        rows = variant_table()
        title = "XCiT variants (params with a 1000-class head; GFLOPs = multiply-adds at batch 1, native size)"
    digits = 3 if names else 2  # the recipes' small models: 0.024 GFLOPs, not 0.02
    _print_table(
        title,
        ["name", "img_size", "patch", "params (M)", "GFLOPs"],
        [(r["name"], r["img_size"], r["patch"], f"{r['params_m']:.2f}", f"{r['gflops']:.{digits}f}") for r in rows],
    )
    return 0


def _cmd_fit(argv: list[str]) -> int:
    from .fit import run_fit

    return run_fit(argv)


def _lazy(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(module, __package__), func)(argv) or 0)

    return run


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "fit": _cmd_fit,
    "knn": _lazy(".evaluation.commands", "knn_main"),
    "linear": _lazy(".evaluation.commands", "linear_main"),
    "export": _lazy(".export", "export_main"),
    "validate": _lazy(".methods.validate", "validate_main"),
    "shard": _lazy(".shard", "shard_main"),
    "summary": _lazy(".evaluation.summary", "summary_main"),
    "recipes": _cmd_recipes,
    "protocols": _cmd_protocols,
    "models": _cmd_models,
    "attention": _lazy(".analysis.commands", "attention_main"),
    "plot": _lazy(".analysis.commands", "plot_main"),
    "doctor": _lazy(".doctor", "doctor_main"),
}


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """While a progress bar is drawn (tqdm: Lightning's bars, ours), write through ``tqdm.write``,
        which clears the bar, prints the line and redraws it: otherwise the line is glued to the
        bar's last redraw, which has no newline (a log file, SLURM's output, a pipe)."""
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Route Lightning's loggers through our one handler (they add their own when imported before
    ours exists, and every INFO line would be printed twice, or to a stream that was closed)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", "torchmetrics"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:
                lib.removeHandler(handler)
        lib.propagate = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xcit-ssl`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU build it probes
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in HANDLERS:
        close = difflib.get_close_matches(command, HANDLERS, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        print(f"xcit-ssl: unknown command '{command}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        from .console import quiet_third_party

        with quiet_third_party():  # our libraries' deprecation notices and advertisements, by message
            return HANDLERS[command](rest)
    except UserError as err:
        print(f"xcit-ssl {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xcit-ssl {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a run stopped by SIGTERM/SIGUSR1/SIGINT after saving last.ckpt
        from .runs.signals import RunInterrupted

        if not isinstance(err, RunInterrupted):
            raise
        from .runs.folders import launcher_rank

        if launcher_rank() == 0:  # every rank stops; one says so
            print(f"xcit-ssl {command}: interrupted: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
