"""Whether two runs of one experiment computed the same thing: the figures of their
summary.json (LDS of every method, the LDS-against-models curve, the counts; compute seconds
left out) and the column digests that every Parquet file carries, for the columns that do not
hold times, hosts or the code version (ledger units are matched by unit, since their names
digest those too). Used to show that moving code changed nothing (bench/RESULTS.md).

    .venv/bin/python bench/same_results.py RUN_DIR_A RUN_DIR_B
"""
from __future__ import annotations

import json
import os
import sys

import pyarrow.parquet as pq

VOLATILE = {"seconds", "host", "code_version"}
FIGURES = ("lds", "lds_curve", "models", "eval_masks", "models_failed", "duplicate_rows")


def without_seconds(d):
    if isinstance(d, dict):
        return {k: without_seconds(v) for k, v in d.items() if k not in ("seconds", "seconds_parts")}
    return d


def digests(root: str) -> dict[str, dict[str, str]]:
    """{file (a ledger unit by its unit name): {column: digest}} of every Parquet file, the
    quarantine and records left out."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if "/_" in dirpath:
            continue
        for f in files:
            if not f.endswith(".parquet"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            meta = pq.read_schema(os.path.join(dirpath, f)).metadata or {}
            key = "ledger/" + f.rsplit("-", 1)[0] if rel.startswith("ledger/") else rel
            out[key] = {c: v for c, v in json.loads(meta.get(b"datamodels.digests", b"{}")).items()
                        if c not in VOLATILE}
    return out


def main(a: str, b: str) -> int:
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (a, b))
    same = True
    for key in FIGURES:
        equal = without_seconds(sa.get(key)) == without_seconds(sb.get(key))
        same &= equal
        print(f"summary {key:15s} {'equal' if equal else 'DIFFERENT'}")
    for name, s in (("A", sa), ("B", sb)):
        print(f"LDS {name}  ", {m: r["mean"] for m, r in s["lds"].items()})
        print(f"curve {name}", {m: r["mean"] for m, r in s.get("lds_curve", {}).items()})
    da, db = digests(a), digests(b)
    differing = [k for k in da if k in db and da[k] != db[k]]
    print(f"parquet files: A {len(da)}, B {len(db)}; the same names: {sorted(da) == sorted(db)}")
    print(f"column digests compared: {sum(len(v) for v in da.values())}; files with a differing column: "
          f"{len(differing)}")
    for k in differing[:10]:
        print("  differs:", k, [c for c in da[k] if da[k][c] != db[k].get(c)])
    same &= sorted(da) == sorted(db) and not differing
    print("the same results" if same else "DIFFERENT results")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
