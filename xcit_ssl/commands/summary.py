"""``xcit-ssl summary``: one table of k-NN and linear-probe results, from the JSON files that
``xcit-ssl knn`` / ``linear`` wrote, with a label per row; written as JSON too.

    xcit-ssl summary --row "raw pixels" runs/raw_pixels/eval/knn_fmnist_pixels.json runs/.../linear_fmnist_pixels.json \\
                     --row "DINO (teacher)" runs/x/eval/knn_fmnist_last.json runs/x/eval/linear_fmnist_last.json \\
                     --k 20 --out runs/x/demo_results.json
"""

from __future__ import annotations

from pathlib import Path

from ..console import print_table
from ..errors import UserError
from ..evaluation.summary import summarize
from ..files import check_writable, write_json


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
    cells = [(e["label"], e.get("tokens", "-"), "-" if e["knn_top1"] is None else f"{e['knn_top1']:.2f}",
              "-" if e["linear_top1"] is None else f"{e['linear_top1']:.2f}") for e in table]  # fmt: skip
    print_table(f"k-NN top-1 (k = {k}) and linear probe top-1 at its last epoch, %", ("features", "tokens", "k-NN", "linear"),
                cells, wrap=("tokens",))  # fmt: skip
    if out:
        write_json(out, {"k": k, "rows": table})
        print(f"written: {out}")
    return 0
