"""``xcit-ssl recipes``, ``protocols`` and ``models``: what exists, as tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..console import print_table
from ..errors import UserError


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print_table(title, columns, rows, wrap=("description",))  # as wide as the terminal ($COLUMNS; 100 off a tty)


def _no_arguments(command: str, argv: list[str]) -> None:
    if argv and argv[0] not in ("-h", "--help"):
        raise UserError(f"unexpected arguments {' '.join(argv)!r}: `xcit-ssl {command}` takes none")


def recipes_main(argv: list[str]) -> int:
    """``xcit-ssl recipes``: every shipped recipe with its description (``--recipe NAME`` of ``fit``)."""
    from ..config import list_recipes

    _no_arguments("recipes", argv)
    _print_table("xcit-ssl recipes", ["recipe", "description"], list_recipes())
    return 0


def protocols_main(argv: list[str]) -> int:
    """``xcit-ssl protocols``: every shipped evaluation protocol (``--protocol NAME`` of knn/linear)."""
    from ..config import list_protocols

    _no_arguments("protocols", argv)
    _print_table("xcit-ssl evaluation protocols", ["protocol", "description"], list_protocols())
    return 0


def _recipe_backbone(recipe: str) -> tuple[str, dict[str, int]]:
    """The variant name and size overrides (depth, embed_dim, num_heads, img_size) a recipe builds."""
    import yaml

    from ..config import recipe_path
    from ..models.registry import VARIANTS

    path = recipe_path(recipe)
    cfg = yaml.safe_load(path.read_text()) or {}
    args = (((cfg.get("model") or {}).get("init_args") or {}).get("backbone") or {}).get("init_args")
    if not isinstance(args, dict) or args.get("name") not in VARIANTS:
        raise UserError(f"{path}: no XCiT variant at model.init_args.backbone.init_args.name; "
                        "pass a training recipe (xcit-ssl recipes lists them)")  # fmt: skip
    return args["name"], {k: int(args[k]) for k in ("depth", "embed_dim", "num_heads", "img_size") if args.get(k)}


def models_main(argv: list[str]) -> int:
    """``xcit-ssl models`` lists every variant; ``--recipe NAME`` (repeatable) the backbones those
    recipes build, their overrides (fewer blocks, narrower) applied, at the recipe's resolution."""
    from ..models.flops import backbone_row, variant_table

    if argv[:1] in (["-h"], ["--help"]):
        print("usage: xcit-ssl models [--recipe NAME ...]\n\nEvery XCiT variant with params and GFLOPs; with "
              "--recipe (repeatable), the backbones those recipes build, at their resolution.")  # fmt: skip
        return 0
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
