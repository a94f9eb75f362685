"""Turn the committed ``manifold-nets check`` outputs into group x update verdict tables.

Reads every ``docs/audit/*.txt`` (the output of ``manifold-nets check``) and writes a CSV
beside each: one row per check (the loss, the gradient's orthogonality to the orbit,
every update rule), one column per group, each cell the measured verdict and gap, marked
when it disagrees with the theory's prediction. Run from the repository root::

    manifold-nets check --arch arch1 --depth 2 > docs/audit/arch1_depth2.txt
    .venv/bin/python docs/audit/make_matrix.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROW = re.compile(r"^(Arch\d L=\d+)\s{2,}(.+?)\s{2,}(.+?)\s{2,}(\S+)\s{2,}(\S+)\s{2,}"
                 r"(.+?)\s{2,}(yes|no|-)\b")


def parse(path: Path) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    groups: list[str] = []
    checks: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        _, group, check, gap, expected, measured, ok = (x.strip() for x in m.groups())
        if check == "dimension":
            continue
        check = check.removeprefix("update ")
        if group not in groups:
            groups.append(group)
        if check not in checks:
            checks.append(check)
        cell = f"{measured} ({float(gap):.0e})"
        if expected == "-":
            cell += ", no prediction"
        elif ok != "yes":
            cell += f" ✗ theory: {expected}"
        cells[(check, group)] = cell
    return groups, checks, cells


def main() -> None:
    for path in sorted(HERE.glob("*.txt")):
        groups, checks, cells = parse(path)
        with path.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["check", *groups])
            for check in checks:
                writer.writerow([check, *(cells.get((check, g), "") for g in groups)])
        wrong = sum("✗" in c for c in cells.values())
        print(f"{path.name}: {len(checks)} checks x {len(groups)} groups, "
              f"{wrong} disagree with the theory")


if __name__ == "__main__":
    main()
