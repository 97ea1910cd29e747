"""The hostile-world suite's figures: counters the tests add to, printed at the end.

``SMTPRELAY_TORTURE=long`` (``tox -e torture``) makes the suite run its long
form; the default is the bounded form CI runs.
"""

import collections
import os

LONG = os.environ.get("SMTPRELAY_TORTURE") == "long"

figures = collections.Counter()


def scale(bounded, long):
    return long if LONG else bounded


def report_lines():
    if not figures:
        return []
    order = ["sessions fuzzed", "commands sent", "messages sent", "messages accepted",
             "messages delivered", "faults injected", "crashes survived",
             "messages lost", "messages forged", "duplicates", "ambiguous outcomes",
             "secrets leaked", "tracebacks to clients"]
    keys = order + sorted(k for k in figures if k not in order)
    width = max(len(k) for k in keys)
    lines = [f"hostile world ({'long' if LONG else 'bounded'} form)"]
    for k in keys:
        if k in figures or k in ("messages lost", "messages forged", "secrets leaked"):
            lines.append(f"  {k:<{width}}  {figures.get(k, 0)}")
    return lines
