"""``xcit-ssl summary``: one table of k-NN and linear-probe results, from the JSON files that
``xcit-ssl knn`` / ``linear`` wrote, with a label per row; written as JSON too.

    xcit-ssl summary --row "raw pixels" runs/raw_pixels/eval/knn_fmnist_pixels.json runs/.../linear_fmnist_pixels.json \\
                     --row "DINO (teacher)" runs/x/eval/knn_fmnist_last.json runs/x/eval/linear_fmnist_last.json \\
                     --k 20 --out runs/x/demo_results.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError


def _read(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a result file of xcit-ssl knn/linear ({err}); run the evaluation first") from None


def _tokens(record: dict[str, Any]) -> str:
    """What the feature is made of: the pooling option, or ``pixels`` for ``--raw_pixels``."""
    if record.get("weights", {}).get("backbone") == "raw_pixels":
        return "pixels"
    return str(record.get("protocol_config", {}).get("features", {}).get("pooling", "cls"))


def summarize(rows: list[tuple[str, list[str]]], k: int) -> list[dict[str, Any]]:
    """``[(label, [result files])]`` -> one dict per row: k-NN top-1 at ``k``, linear top-1 (best)."""
    table = []
    for label, files in rows:
        entry: dict[str, Any] = {"label": label, "knn_top1": None, "linear_top1": None, "files": files}
        for path in files:
            record = _read(path)
            if record.get("command") == "knn":
                result = record["results"].get(str(k))
                if result is None:
                    raise UserError(f"{path} has no k = {k} result (it has k = {', '.join(record['results'])}): pass --k")
                entry.update(knn_top1=result["top1"], protocol=record.get("protocol"),
                             num_test=record.get("num_test"), weights=record["weights"].get("path"),
                             tokens=_tokens(record))  # fmt: skip
            elif record.get("command") == "linear":
                entry["linear_top1"] = record["results"].get("best_top1")
                entry["linear_variant"] = record.get("variant")
        table.append(entry)
    return table


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
    table = summarize(rows, k)
    from rich.console import Console
    from rich.table import Table

    view = Table(title=f"k-NN top-1 (k = {k}) and linear probe top-1, %")
    for col in ("features", "tokens", f"k-NN k={k}", "linear"):
        view.add_column(col, justify="left" if col in ("features", "tokens") else "right")
    for e in table:
        view.add_row(e["label"], e.get("tokens", "-"), "-" if e["knn_top1"] is None else f"{e['knn_top1']:.2f}",
                     "-" if e["linear_top1"] is None else f"{e['linear_top1']:.2f}")  # fmt: skip
    Console().print(view)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"k": k, "rows": table}, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"written: {path}")
    return 0
