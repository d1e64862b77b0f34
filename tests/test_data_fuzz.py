"""Fuzz `perceptcore validate` with structured mutations of a study's data files (the cases table and
the observers' prediction tables; strategies in tests/spec_fuzz.py): every example exits 0 or 1,
prints no traceback, does not hang, writes nothing, and any error is one located short line. Fixed
seed (derandomized), a budget of about a minute on 2 cores; benchmarks/fuzz_spec.py --data runs
10,000+ and prints the counts."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec_fuzz
from synthetic import write_study


def test_validate_survives_mutated_data_files(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("study")).parent
    folder = tmp_path_factory.mktemp("fuzz") / "study"
    outcomes = set()

    @settings(derandomize=True, max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(spec_fuzz.data_mutations(), min_size=1, max_size=3))
    def check(changes):
        outcome = spec_fuzz.run_data_example(changes, study, folder)
        assert not spec_fuzz.problems(spec_fuzz.DATA_EXAMPLE, outcome), (changes, outcome)
        outcomes.add(outcome.code)

    check()
    assert outcomes == {0, 1}  # the mutations reach both outcomes: the fuzz is not all rejected input
