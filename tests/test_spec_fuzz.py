"""Fuzz `perceptcore validate` with structured mutations of the example specs (and of a
synthetic study with its data) and hostile `--set` values: every example exits 0 or 1, prints
no traceback, does not hang, leaves nothing behind, and any error is one located short line.
Fixed seed (derandomized) and a budget of about a minute on 2 cores; benchmarks/fuzz_spec.py
runs the same strategies 10,000+ times and prints the counts."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

import spec_fuzz
from synthetic import write_study

DATA = None


def _specs(tmp_path_factory):
    global DATA
    if DATA is None:
        DATA = spec_fuzz.base_specs(write_study(tmp_path_factory.mktemp("synthetic")).parent)
    return DATA


def test_validate_survives_mutated_specs(tmp_path_factory):
    specs = _specs(tmp_path_factory)
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(derandomize=True, max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec_fuzz.examples(specs))
    def check(example):
        outcome = spec_fuzz.run_example(example, specs, folder)
        assert not spec_fuzz.problems(example, outcome), (example, outcome)

    check()
