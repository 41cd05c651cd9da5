"""``xcit-ssl summary``: one table of k-NN and linear-probe results, from the JSON files that
``xcit-ssl knn`` / ``linear`` wrote, with a label per row; written as JSON too. A row may hold the
results of several features of its weights (``--features.pooling``): the table has a k-NN and a
linear column per feature, in the order the files name them (CLS first for DINO's protocol).

    xcit-ssl summary --row "raw pixels" runs/raw_pixels/eval/knn_fmnist_pixels.json runs/.../linear_fmnist_pixels.json \\
                     --row "DINO (teacher)" runs/x/eval/knn_fmnist_last.json runs/x/eval/linear_fmnist_last.json \\
                     --k 20 --out runs/x/demo_results.json
"""

from __future__ import annotations

from pathlib import Path

from ..console import print_table
from ..errors import UserError
from ..evaluation.summary import cell_of, feature_columns, summarize
from ..files import check_writable, write_json


_POOLING_NOTES = {
    "cls": "CLS = the CLS token (DINO's protocol)",
    "cls+mean_patch": "cls+mean_patch = CLS + the mean patch token",
    "cls+pyramid": "cls+pyramid = CLS + the mean and the quadrant means of the patch tokens",
    "cls+pyramid3": "cls+pyramid3 = CLS + a 3-level spatial pyramid of the patch tokens (an extra, not DINO's protocol)",
}


def _name(tokens: str) -> str:
    return "CLS" if tokens == "cls" else tokens


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_main(argv: list[str]) -> int:
    """Parse ``--row LABEL FILE...`` groups, print the table, write ``--out``. Returns 0."""
    rows: list[tuple[str, list[str]]] = []
    k, out = 20, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            return 0
        if arg == "--row":
            if i + 1 >= len(argv):
                raise UserError("--row needs a label, then result files")
            rows.append((argv[i + 1], []))
            i += 2
            continue
        if arg in ("--k", "--out"):
            if i + 1 >= len(argv):
                raise UserError(f"{arg} needs a value")
            k, out = (int(argv[i + 1]), out) if arg == "--k" else (k, argv[i + 1])
            i += 2
            continue
        if not rows:
            raise UserError(f"{arg}: result files follow a --row LABEL")
        rows[-1][1].append(arg)
        i += 1
    if not rows:
        raise UserError("nothing to summarise: pass --row LABEL RESULT.json [...] (see xcit-ssl summary --help)")
    if out:
        check_writable(Path(out).expanduser().parent, "--out", out)
    table = summarize(rows, k)
    groups = feature_columns(table)
    columns = ["features"] + [f"{what} {_name(g)}" for g in groups for what in ("k-NN", "linear")]
    cells = [[e["label"]] + [_pct(cell_of(e, g)[key]) for g in groups for key in ("knn_top1", "linear_top1")]
             for e in table]  # fmt: skip
    footer = "; ".join(_POOLING_NOTES.get(g, g) for g in groups if g != "pixels") or None
    print_table(f"top-1 %: weighted k-NN (k = {k}) and linear probe (its last epoch)", columns, cells,
                footer=footer and f"features: {footer}; the raw pixels' row is the same in every group")  # fmt: skip
    if out:
        write_json(out, {"k": k, "rows": table})
        print(f"written: {out}")
    return 0
