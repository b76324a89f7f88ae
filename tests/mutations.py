"""The mutation check: plant plausible bugs in the core invariants, one at a time, in a
scratch copy of the repository, run the tests aimed at each, and print which test caught it.

    python -m tests.mutations             every mutation, stop at the first failing test
    python -m tests.mutations --every     run all of a mutation's tests: every test that fails
    python -m tests.mutations -k lease    only mutations whose bug or file mentions "lease"
    python -m tests.mutations --list      the catalogue, nothing run
    python -m tests.mutations -k lease.lua --tests tests/test_trainer.py
                                          those mutations against other tests than theirs

Not part of the default pytest run (a few minutes on two cores). How the scratch copy is
made importable: the checkout's files (tracked, and untracked unless ignored) are copied to a
temporary folder, and a `sitecustomize.py` in a folder of its own, put first on PYTHONPATH,
maps the package `negcase` onto the copy's workers/ (and negcase.schemas, negcase.store onto
its schemas/, store/), exactly as pyproject's package-dir does for the editable install. Its
finder goes first on sys.meta_path, so it wins over the editable install's finder, and every
worker process the tests start inherits PYTHONPATH and the same mapping. Before any
mutation, the runner checks that `negcase` imports from the copy, and runs every selected
test on the unmutated copy: a test that fails there would report a bug it did not catch.

Each mutation is (file, exact old text, new text, tests). Old text that is not found exactly
once is reported as a BROKEN mutation, never skipped: after a refactor, fix the mutation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tests.mutation_catalogue import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parent.parent
# Where pyproject's package-dir puts each package of the installed `negcase`.
PACKAGE_FOLDERS = {"negcase": "workers", "negcase.schemas": "schemas", "negcase.store": "store"}
RUN_TIMEOUT_S = 900

SITECUSTOMIZE = '''"""tests/mutations.py wrote this: negcase imports from the copy {repo}."""

import importlib.abc
import importlib.util
import sys

_FOLDERS = {folders!r}


class _ScratchCopy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _FOLDERS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder + "/__init__.py", submodule_search_locations=[folder]
        )


sys.meta_path.insert(0, _ScratchCopy())
'''


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the tests made of one mutation."""

    mutation: Mutation
    status: str  # caught | NOT CAUGHT | BROKEN | TIMED OUT
    detail: str
    seconds: float


class Scratch:
    """A copy of the checkout that imports as `negcase`, with one mutation applied at a time."""

    def __init__(self, folder: Path) -> None:
        self.repo = folder / "repo"
        self.site = folder / "site"
        files = checkout_files(ROOT)
        for relative in files:
            target = self.repo / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, target)
        self.site.mkdir()
        folders = {name: str(self.repo / path) for name, path in PACKAGE_FOLDERS.items()}
        (self.site / "sitecustomize.py").write_text(
            SITECUSTOMIZE.format(repo=self.repo, folders=folders)
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": str(self.site),
            # A mutated file can keep its size and its mtime second: never trust a .pyc.
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def check_imports(self) -> None:
        """Fail unless negcase and its subpackages import from the copy."""
        probe = (
            "import negcase, negcase.schemas, negcase.store, negcase.processes.training as t;"
            "print('\\n'.join(m.__file__ for m in (negcase, negcase.schemas, negcase.store, t)))"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(
                f"negcase does not import in the scratch copy ({last}): is the "
                "project's virtual environment active?"
            )
        out = done.stdout.split()
        strays = [path for path in out if not Path(path).is_relative_to(self.repo)]
        if strays or len(out) != 4:
            raise SystemExit(f"negcase does not import from the scratch copy: {out}")

    def pytest(self, tests: tuple[str, ...], every: bool, report: Path) -> tuple[int, list[str]]:
        """Run `tests` in the copy; the exit code and the tests that failed."""
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o"]
        args += ["addopts=", f"--junitxml={report}", *([] if every else ["-x"]), *tests]
        result = subprocess.run(
            args,
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        failed = failed_tests(report) if report.exists() else []
        if result.returncode not in (0, 1) or (result.returncode == 1 and not failed):
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise PytestBroke(result.returncode, "\n".join(tail))
        return result.returncode, failed

    def apply(self, mutation: Mutation) -> str:
        """Plant the bug; returns the file's original text (for `restore`)."""
        path = self.repo / mutation.file
        if not path.exists():
            raise BrokenMutation(f"{mutation.file} does not exist")
        text = path.read_text()
        found = text.count(mutation.old)
        if found != 1:
            raise BrokenMutation(f"old text found {found} times in {mutation.file}, not once")
        path.write_text(text.replace(mutation.old, mutation.new))
        return text

    def restore(self, mutation: Mutation, original: str) -> None:
        """Take the bug out again."""
        (self.repo / mutation.file).write_text(original)


class BrokenMutation(Exception):
    """The mutation cannot be applied as written (the code it targets changed)."""


class PytestBroke(Exception):
    """pytest ended without running the tests (collection error, usage error, crash)."""

    def __init__(self, code: int, tail: str) -> None:
        super().__init__(f"pytest exited {code}:\n{tail}")


def checkout_files(root: Path) -> list[str]:
    """The checkout's files: tracked, and untracked unless git ignores them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [name for name in listed.decode().split("\0") if name and (root / name).is_file()]


def failed_tests(report: Path, why: bool = False) -> list[str]:
    """`file::test` of every test that failed or errored, from a JUnit XML report; with
    `why`, each followed by the first line of its failure message."""
    failed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is None:
            continue
        module = case.get("classname", "").split(".")
        file = "/".join(part for part in module if not part[:1].isupper()) + ".py"
        name = f"{file.removeprefix('tests/')}::{case.get('name')}"
        message = (problem.get("message") or "").strip().splitlines()
        failed.append(f"{name} ({message[0][:300]})" if why and message else name)
    return failed


def judge(scratch: Scratch, mutation: Mutation, every: bool, report: Path) -> Verdict:
    """Apply one mutation, run its tests, take it out again."""
    started = time.monotonic()

    def verdict(status: str, detail: str) -> Verdict:
        return Verdict(mutation, status, detail, time.monotonic() - started)

    try:
        original = scratch.apply(mutation)
    except BrokenMutation as error:
        return verdict("BROKEN", str(error))
    try:
        code, failed = scratch.pytest(mutation.tests, every, report)
    except subprocess.TimeoutExpired:
        return verdict("TIMED OUT", f"tests still running after {RUN_TIMEOUT_S}s")
    except PytestBroke as error:
        return verdict("BROKEN", str(error))
    finally:
        scratch.restore(mutation, original)
    if code == 0:
        return verdict("NOT CAUGHT", "every test passed")
    return verdict("caught", ", ".join(failed))


def print_table(verdicts: list[Verdict]) -> None:
    """The result: one row per mutation."""
    print("\n| # | bug | file | caught by | s |\n| --- | --- | --- | --- | --- |")
    for n, v in enumerate(verdicts, 1):
        shown = v.detail if v.status == "caught" else f"**{v.status}**: {v.detail}"
        print(f"| {n} | {v.mutation.bug} | {v.mutation.file} | {shown} | {v.seconds:.0f} |")
    caught = sum(v.status == "caught" for v in verdicts)
    print(f"\n{caught} of {len(verdicts)} mutations caught.")


def main(argv: list[str] | None = None) -> int:
    """Run the mutation check; exit status 0 only when every mutation was caught."""
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__)
    parser.add_argument("-k", dest="only", help="mutations whose bug or file contain this")
    parser.add_argument("--every", action="store_true", help="find every test that fails")
    parser.add_argument("--list", action="store_true", help="print the catalogue and stop")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests unmutated first"
    )
    parser.add_argument("--tests", nargs="+", help="run these instead of each mutation's own")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only in f"{m.bug} {m.file} {m.area}"]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]
    if args.list:
        for n, m in enumerate(chosen, 1):
            print(f"{n:2}. [{m.area}] {m.bug} ({m.file}) -> {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="negcase-mutations-") as folder:
        scratch = Scratch(Path(folder))
        scratch.check_imports()
        report = Path(folder) / "report.xml"
        if not args.no_baseline:
            baseline = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
            print(f"baseline: {len(baseline)} test selections on the unmutated copy", flush=True)
            code, _ = scratch.pytest(baseline, every=True, report=report)
            if code != 0:
                why = "; ".join(failed_tests(report, why=True))
                print(f"the unmutated copy fails: {why}", file=sys.stderr)
                return 2
        verdicts = []
        for n, mutation in enumerate(chosen, 1):
            print(f"[{n}/{len(chosen)}] {mutation.bug} ...", end=" ", flush=True)
            verdicts.append(judge(scratch, mutation, args.every, report))
            print(f"{verdicts[-1].status} ({verdicts[-1].seconds:.0f}s)", flush=True)
    print_table(verdicts)
    return 0 if all(v.status == "caught" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
