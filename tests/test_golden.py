"""The CPU path's outputs are bitwise those recorded in
``tests/data/golden_cpu.json`` (see ``tests/golden.py``): a refactor that
changes one bit of a loss, gradient, metric, KL estimate or advantage fails
here, naming the case."""

from __future__ import annotations

import json

from golden import PATH, fingerprints


def test_cpu_outputs_are_bitwise_the_recorded_ones():
    want = json.loads(PATH.read_text())
    got = fingerprints()
    assert sorted(got) == sorted(want), "the set of cases changed: regenerate only with a reason"
    changed = [name for name in want if got[name] != want[name]]
    assert not changed, f"{len(changed)} of {len(want)} cases changed, e.g. {changed[:5]}"
