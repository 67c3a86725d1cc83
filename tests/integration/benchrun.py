"""What the bench smoke tests (tests/integration/test_bench_*) share: running a bench script
as the user would, and reading the rows of its report.

No timing assertions: the helpers check that a run works end to end and says what it found.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # bench/ is not a package: its modules import each other


def run_bench(script: str, *args: str, timeout: float) -> str:
    """Run `bench/SCRIPT ARGS...` from the repository root; assert it exits 0 (showing the end
    of its stderr if not) and return its stdout, the report."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def assert_checked_rows(out: str, rows: Iterable[tuple[str, str]],
                        sizes: Iterable[str] = ("2 KB", "100 KB")) -> None:
    """For each (label, source) and size, the report `out` has a row
    `| LABEL | SIZE | MSGS | RATE | ... | N/N, distinct, all from SOURCE, as logged |` with a
    positive RATE (the outbound and relay benches' delivery check)."""
    sizes = list(sizes)
    for label, source in rows:
        for size in sizes:
            check = rf"(?P<n>\d+)/(?P=n), distinct, all from {re.escape(source)}, as logged"
            row = re.search(rf"^\| {re.escape(label)} \| {size} \| [\d,]+ \| ([\d,]+) \|.*"
                            rf"\| {check} \|$", out, re.M)
            assert row, f"no row for {label} {size} in:\n{out}"
            assert int(row.group(1).replace(",", "")) > 0


def rewrite_section(write: Callable[[str, Path], None], path: Path, before: str,
                    body: str) -> str:
    """Write `before` to `path`, let the bench `write(body, path)` its section of RESULTS.md,
    and return the file's text afterwards."""
    path.write_text(before)
    write(body, path)
    return path.read_text()
