"""Fuzz `perceptcore validate` with structured mutations of a study's data files (the cases table and
the observers' prediction tables): every example exits 0 or 1, prints no traceback, does not hang,
writes nothing, and any error is one short line that starts at the spec. Fixed seed (derandomized),
a budget of about a minute on 2 cores."""

from __future__ import annotations

import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec_fuzz
from synthetic import write_study

FILES = ("cases.csv", "radiologists.csv", "dnns.csv")
# What a careless export or a hostile user can put in a cell.
CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "-1", "2", "1e308", "-0", "abc", "malignnt", "Malignant", "None",
         "True", "0x10", "1,5", '"', "\x00", "\u202e", "9" * 400, "0.5", "1", "0"]
KINDS = ("cell", "truncate", "drop_column", "duplicate_row", "shuffle_rows", "rename_header", "bytes", "empty")


@st.composite
def mutations(draw):
    """(file, kind, parameters) of one mutation; the parameters are fractions and picks, applied to the file."""
    return (draw(st.sampled_from(FILES)), draw(st.sampled_from(KINDS)), draw(st.floats(0, 1)), draw(st.floats(0, 1)),
            draw(st.sampled_from(CELLS)), draw(st.binary(max_size=64)))


def mutate(text: str, kind: str, where: float, which: float, cell: str, raw: bytes) -> bytes:
    """The file after one mutation; text is the file decoded with surrogateescape (an earlier mutation
    may have left any bytes), so encoding it back gives those bytes again."""
    lines = text.splitlines()
    if kind == "bytes":
        return raw
    if kind == "empty":
        return b""
    if kind == "truncate":
        return text.encode(errors="surrogateescape")[: int(where * len(text))]
    if len(lines) < 2:  # an earlier mutation left no row to change
        return text.encode(errors="surrogateescape")
    header, rows = lines[0].split(","), lines[1:]
    r, c = min(int(where * len(rows)), len(rows) - 1), min(int(which * len(header)), len(header) - 1)
    if kind == "cell":
        values = rows[r].split(",")
        values[c] = f'"{cell}"' if "," in cell else cell
        rows[r] = ",".join(values)
    elif kind == "drop_column":
        header = header[:c] + header[c + 1:]
        rows = [",".join(v[:c] + v[c + 1:]) for v in (row.split(",") for row in rows)]
    elif kind == "duplicate_row":
        rows.insert(r, rows[r])
    elif kind == "shuffle_rows":
        rows = rows[r:] + rows[:r]
    elif kind == "rename_header":
        header[c] = cell or "x"
    return ("\n".join([",".join(header)] + rows) + "\n").encode(errors="surrogateescape")


def test_validate_survives_mutated_data_files(tmp_path_factory):
    base = write_study(tmp_path_factory.mktemp("study")).parent
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes = set()

    @settings(derandomize=True, max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutations(), min_size=1, max_size=3))
    def check(changes):
        shutil.rmtree(folder)
        shutil.copytree(base, folder)
        for name, kind, *parameters in changes:
            text = (folder / name).read_bytes().decode(errors="surrogateescape")
            (folder / name).write_bytes(mutate(text, kind, *parameters))
        before = spec_fuzz.listing(folder)
        code, _, err = spec_fuzz.run_cli(["validate", "spec.yaml"], folder)
        assert code in (0, 1) and "Traceback" not in err, (changes, code, err[-3000:])
        assert spec_fuzz.listing(folder) == before, changes  # validate writes nothing
        outcomes.add(code)
        if code == 1:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "spec.yaml: " in lines[0], (changes, err)
            assert len(lines[0]) <= 600 and "object at 0x" not in lines[0], (changes, err)

    check()
    assert outcomes == {0, 1}  # the mutations reach both outcomes: the fuzz is not all rejected input
