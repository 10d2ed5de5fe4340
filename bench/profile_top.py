"""Summarise py-spy collapsed stacks (``bench/run.py --profile DIR``): where each process spent its samples.

    python bench/profile_top.py DIR [--top 15]

For every ``<process>-<phase>.txt`` prints the sample count and the functions with the most samples,
by self time (the frame on top of the stack) and by inclusive time (anywhere on the stack).
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter

_LINE = re.compile(r"\s*\(.*?:\d+\)$")


def frame_name(frame: str) -> str:
    """``write (kvfs/client.py:612)`` -> ``write (kvfs/client.py)``: one entry per function, not per line."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = path.split("/")
    return f"{func} ({'/'.join(parts[-2:])})"


def summarise(path: str, top: int) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [frame_name(fr) for fr in stack.split(";") if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += n
            self_c[frames[-1]] += n
            for name in set(frames):
                incl[name] += n
    if not total:
        return f"{os.path.basename(path)}: no samples\n"
    out = [f"{os.path.basename(path)}: {total} samples"]
    out.append("  self:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_c.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    for name in sorted(os.listdir(args.dir)):
        if name.endswith(".txt"):
            print(summarise(os.path.join(args.dir, name), args.top))


if __name__ == "__main__":
    main()
