"""The hostile-world suite's figures: counters the tests add to, printed at the end.

``SMTPRELAY_TORTURE=long`` (``tox -e torture``) makes the suite run its long
form; the default is the bounded form CI runs.  The figures the issue asks for
are always shown once anything was counted (a 0 is a result too); a duplicate is
a message a provider received more than once, and the ambiguous outcomes beside
it are the attempts whose answer was lost after the message went out, the only
thing allowed to cause one.
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
    always = ("sessions fuzzed", "messages sent", "faults injected", "crashes survived",
              "messages lost", "messages forged", "duplicates", "ambiguous outcomes",
              "secrets leaked")
    keys = order + sorted(k for k in figures if k not in order)
    width = max(len(k) for k in keys)
    lines = [f"hostile world ({'long' if LONG else 'bounded'} form)"]
    for k in keys:
        if k in figures or k in always:
            value = f"{figures.get(k, 0)}"
            if k == "duplicates":
                ambiguous = figures.get("ambiguous outcomes", 0)
                value += f"  ({ambiguous} ambiguous outcomes explain them)"
            lines.append(f"  {k:<{width}}  {value}")
    return lines
