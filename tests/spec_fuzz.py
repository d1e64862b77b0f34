"""Structured mutations of study specs, `--set` values and a study's data files, run through
`perceptcore validate` in-process, and what an outcome must satisfy. Shared by
tests/test_spec_fuzz.py and tests/test_data_fuzz.py (fixed-seed Hypothesis budgets in the suite)
and benchmarks/fuzz_spec.py (10,000+ examples, with counts).

An example is (base spec, mutations of its YAML, --set values). `run_example` writes the spec
into an empty folder, runs `main(["validate", ...])` there with stdout/stderr captured and an
alarm as the hang detector, and returns an Outcome; `problems(outcome)` lists what is wrong.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import traceback
from pathlib import Path

import attrs
import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))
MAX_LINE = 300  # an error line, after "error: "
HANG_SECONDS = 20

# YAML fragments a hostile or careless user can put where a value goes.
BOMB = "{b0: &b0 [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)) + "}"
HOSTILE = [
    "[1", "\t", "\tx", "@x", "*alias", "!tag x", "`x", "%x", "{a: 1", "'open", '"open', "- a\n- b", "a: b: c",
    "!!int x", "!!float ''", "!!bool maybe", "!!timestamp 2020-13-45", "!!int 99999999999999999999999",
    "!!binary ###", "!!set {a}", "!!omap [a]", "!!python/object/apply:os.system [echo x]", "!!str",
    "&a [*a]", "&a {k: *a}", BOMB, "[" * 60 + "]" * 60, "[" * 3000 + "]" * 3000, "{a: " * 50 + "1" + "}" * 50,
    "1e12", "1000000000000", "1.0e+12", "-1", "0", str(2**64), str(2**32), "-0", ".nan", ".inf", "-.inf",
    "0x1F", "0o17", "1_000", "1.50", "1e400", "9" * 5000, "null", "~", "''", "true", "yes", "no",
    "[]", "{}", "[a, b]", "{a: 1}", "{1: 2}", "{0.50: x}", "[[a]]", "2020-01-01",
    "x" * 10000, "/abs/path", "../up", "a/b", "..", '"a\\0b"', '"\\ud800"', '"a\\nb"', "é", "\u202e",
    "microcalcification", "stna", "nope", "gaussian_lowpas", "cnn", "radiologists",
]
KEYS = ["name", "seed", "draws", "bins", "folds", "columns", "options", "reader", "case", "predictions",
        "model", "backend", "levels", "analyse", "unknown_key", "1", "0.5", "", "x" * 500]


@attrs.frozen
class Example:
    base: str  # file name of the base spec
    edits: tuple  # (path tuple, YAML fragment or None to delete, or "+key" to add)
    sets: tuple  # --set KEY=VALUE strings


@attrs.frozen
class Outcome:
    code: object  # exit code, or "hang" / "crash"
    out: str
    err: str
    leftovers: tuple
    seconds: float


def base_specs(data_dir: Path | None = None) -> dict:
    """name -> spec dict: the example specs, and with `data_dir`, the synthetic study whose
    files are there (so that mutations reach the data loaders too)."""
    specs = {path.name: yaml.safe_load(path.read_text()) for path in EXAMPLES}
    if data_dir is not None:
        synthetic = yaml.safe_load((data_dir / "spec.yaml").read_text())
        synthetic["data_dir"] = str(data_dir)
        specs["synthetic.yaml"] = synthetic
    return specs


def paths_of(value, prefix=()):
    """Every key path of a spec dict (list items by index)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths_of(item, prefix + (i,))


def dotted(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


fragments = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30), st.integers().map(str),
                      st.floats().map(repr))


@st.composite
def examples(draw, specs: dict):
    name = draw(st.sampled_from(sorted(specs)))
    paths = [p for p in paths_of(specs[name]) if p]
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if kind == "delete":
            edits.append((path, None))
        elif kind == "add":
            edits.append((path[:-1] + ("+" + draw(st.sampled_from(KEYS)),), draw(fragments)))
        else:
            edits.append((path, draw(fragments)))
    sets = []
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            key = dotted(draw(st.sampled_from(paths)))
        else:
            key = draw(st.one_of(st.sampled_from(["model.draws", "data_dir", "outputs.dir", "observers[9].name",
                                                  "observers[x].name", "study.name.x", "a..b", "[0]", "model.",
                                                  "observers[²].name", "x" * 300]),
                                 st.text(max_size=20)))
        sets.append(f"{key}={draw(fragments)}")
    return Example(name, tuple(edits), tuple(sets))


def spec_text(example: Example, specs: dict) -> str:
    """The base spec with the edits, as YAML: each fragment is pasted as written, so tags,
    anchors, aliases and broken syntax reach the loader."""
    spec = yaml.safe_load(yaml.safe_dump(specs[example.base]))  # a copy
    pasted = {}
    for path, fragment in example.edits:
        node = spec
        try:
            for part in path[:-1]:
                node = node[part]
        except (KeyError, IndexError, TypeError):
            continue
        last = path[-1]
        if not isinstance(node, (dict, list)):
            continue
        if fragment is None:
            with contextlib.suppress(KeyError, IndexError, TypeError):
                del node[last]
            continue
        marker = f"FUZZ{len(pasted)}MARK"
        pasted[marker] = fragment
        key = last[1:] if isinstance(last, str) and last.startswith("+") else last
        if isinstance(node, list):
            if isinstance(key, int) and key < len(node):
                node[key] = marker
        else:
            node[key] = marker
    text = yaml.safe_dump(spec, sort_keys=False, width=1 << 30)
    for marker, fragment in pasted.items():
        text = text.replace(marker, fragment.replace("\n", " "))
    return text


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def listing(folder: Path) -> tuple:
    return tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*")))


def run_cli(argv: list, folder: Path, seconds: int = HANG_SECONDS) -> tuple:
    """(exit code, or "hang" / "crash"; stdout; stderr) of perceptcore's main(argv) run in `folder`,
    in-process, with an alarm as the hang detector and any escaping exception's traceback in stderr."""
    from perceptcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        os.chdir(folder)
        signal.alarm(seconds)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
            except _Hang:
                code = "hang"
            except Exception:  # noqa: BLE001 - the fuzz counts what escapes
                traceback.print_exc()
                code = "crash"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def run_example(example: Example, specs: dict, folder: Path, seconds: int = HANG_SECONDS) -> Outcome:
    """`perceptcore validate` on the example, in `folder` (an empty folder it leaves as found)."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / example.base
    spec.write_text(spec_text(example, specs), encoding="utf-8", errors="surrogatepass")
    before = listing(folder)
    argv = ["validate", example.base] + [f"--set={value}" for value in example.sets]
    started = time.perf_counter()
    code, out, err = run_cli(argv, folder, seconds)
    seconds_taken = time.perf_counter() - started
    after = listing(folder)
    for path in sorted(folder.rglob("*"), reverse=True):  # leave the folder empty for the next example
        path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    leftovers = tuple(sorted(set(after) - set(before)))
    return Outcome(code, out, err, leftovers, seconds_taken)


DATA_FILES = ("cases.csv", "radiologists.csv", "dnns.csv")
# What a careless export or a hostile user can put in a cell.
CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "-1", "2", "1e308", "-0", "abc", "malignnt", "Malignant", "None",
         "True", "0x10", "1,5", '"', "\x00", "\u202e", "9" * 400, "0.5", "1", "0"]
MUTATIONS = ("cell", "truncate", "drop_column", "duplicate_row", "shuffle_rows", "rename_header", "bytes", "empty")


@st.composite
def data_mutations(draw):
    """(file, kind, parameters) of one mutation; the parameters are fractions and picks, applied to the file."""
    return (draw(st.sampled_from(DATA_FILES)), draw(st.sampled_from(MUTATIONS)), draw(st.floats(0, 1)), draw(st.floats(0, 1)),
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


def run_data_example(changes: list, study: Path, folder: Path, seconds: int = HANG_SECONDS) -> Outcome:
    """`perceptcore validate` on a copy of the study (in `folder`) with its data files mutated."""
    import time

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(study, folder)
    for name, kind, *parameters in changes:
        text = (folder / name).read_bytes().decode(errors="surrogateescape")
        (folder / name).write_bytes(mutate(text, kind, *parameters))
    before = listing(folder)
    started = time.perf_counter()
    code, out, err = run_cli(["validate", "spec.yaml"], folder, seconds)
    leftovers = tuple(sorted(set(listing(folder)) - set(before)))
    return Outcome(code, out, err, leftovers, time.perf_counter() - started)


DATA_EXAMPLE = Example("spec.yaml", (), ())  # what problems() needs to know of a data example: the spec's name


def problems(example: Example, outcome: Outcome) -> list[str]:
    """What is wrong with an outcome, by category: traceback, hang, exit, unlocated, overlong, leftovers."""
    found = []
    if outcome.code == "hang":
        return ["hang"]
    if "Traceback" in outcome.err or outcome.code == "crash":
        return ["traceback"]
    if outcome.code not in (0, 1):
        found.append("exit")
    if outcome.leftovers:
        found.append("leftovers")
    if outcome.code == 1:
        lines = [line for line in outcome.err.splitlines() if not line.startswith("[perceptcore]")]
        line = lines[0] if len(lines) == 1 else ""
        message = line.removeprefix("error: ")
        located = line.startswith("error: ") and (message.startswith(f"{example.base}: ")
                                                  or message.startswith("--set"))
        if not located or "object at 0x" in line:
            found.append("unlocated")
        if len(message) > MAX_LINE:
            found.append("overlong")
    return found
