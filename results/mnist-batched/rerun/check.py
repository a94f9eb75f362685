"""Compare rerun Table 2 records with the committed ones, run id by run id.

Usage: python results/mnist-batched/rerun/check.py RERUN_DIR [COMMITTED_DIR] > table.md

Every field of every record is compared except the timings, the engine's name, the group
size fields, the finishing time and the torch version string. Exit status 0 when every
rerun record equals the committed one.
"""

from __future__ import annotations

import sys

from manifold_nets.experiments.store import ResultStore

#: Fields that say when, how fast or by which code path a run was made, not what it gave.
IGNORED = {"select_time_s", "wall_time_s", "group_wall_time_s", "group_runs", "engine",
           "torch", "finished_at"}


def main(rerun: str, committed: str = "results/mnist-batched") -> int:
    new = {r["run_id"]: r for r in ResultStore(rerun).records()}
    old = {r["run_id"]: r for r in ResultStore(committed).records()}
    print("| run id | selected rate | epochs | test error | equal to the committed record |")
    print("|---|---|---|---|---|")
    equal = 0
    for rid in sorted(new):
        a = {k: v for k, v in new[rid].items() if k not in IGNORED}
        b = {k: v for k, v in old.get(rid, {}).items() if k not in IGNORED}
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        equal += not diff
        print(f"| {rid} | {a['lr']:g} | {a['epochs']} | {a['test_error']:.4f} | "
              + ("yes" if not diff else f"no: {', '.join(diff)}") + " |")
    print(f"\n**{equal} of {len(new)} records are equal**")
    return 0 if new and equal == len(new) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
