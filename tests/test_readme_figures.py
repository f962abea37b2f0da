"""README's Performance table equals the JSON files in benchmarks/results/ that its commands write (issue 15).

A figure in README is typed by hand from a benchmark's output; this test re-reads every one from the file the
benchmark wrote, so a rerun that changes a number fails here until README shows the new one (or a stale row is
removed). Rows are matched by their command (``python benchmarks/<name>.py``, a blank first cell continuing the
row above) and their ``min / median / max`` triple, rounded to the digits README shows.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _performance_rows() -> list[tuple[str, list[str]]]:
    """(benchmark name, cells) of every row of the Performance section's first table."""
    rows, name = [], None
    for line in _section("Performance").splitlines():
        if not line.startswith("| ") or line.startswith("| command") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = re.search(r"python benchmarks/(\w+)\.py", cells[0])
        name = found.group(1) if found else name if not cells[0] else None
        rows.append((name, cells))
    return rows


def _same(shown: str, value: float) -> bool:
    """``value`` printed with as many decimals as ``shown`` has is ``shown``."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


def test_the_step_overhead_table_is_the_one_the_benchmark_wrote():
    result = json.loads((RESULTS / "overhead.json").read_text())
    assert "performance_table" in result, "benchmarks/results/overhead.json predates the interval method: rerun it"
    assert result["performance_table"].strip() in README


def test_every_min_median_max_in_the_performance_table_is_in_its_json():
    triples = 0
    for name, cells in _performance_rows():
        for cell in cells[2:3]:
            found = re.match(r"^(-?[\d.]+) / (-?[\d.]+) / (-?[\d.]+)", cell)
            if not found or name in (None, "overhead", "digits_accuracy"):
                continue
            figures = json.loads((RESULTS / f"{name}.json").read_text())["figures"].values()
            shown = found.groups()
            assert any(all(_same(s, f[k]) for s, k in zip(shown, ("min", "median", "max"))) for f in figures), (
                f"README's {name} row {cells[1]!r} shows {' / '.join(shown)}, which no figure of "
                f"benchmarks/results/{name}.json has: rerun the benchmark's numbers into README"
            )
            triples += 1
    assert triples >= 8


@pytest.mark.parametrize("name", ["digits_accuracy"])
def test_a_digits_table_in_readme_is_the_one_its_json_gives(name):
    """Results on digits shows a table only with its JSON (the benchmark's own ``table`` of the file's summary)."""
    section = _section("Results on digits")
    path = RESULTS / f"{name}.json"
    if "| recipe |" not in section:
        assert "No figure is shown here" in section
        return
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from digits_accuracy import table

    result = json.loads(path.read_text())
    label = "command wall time" if result["mode"] == "cli" else "fit wall time"
    expected = table(result["summary"], result["svc"]["val_acc"], result["svc"]["seconds"], label)
    assert expected in section
