"""The load test's table, JSON and baselines."""

import json
from pathlib import Path

from django.conf import settings

Results = dict[str, dict[str, float | None]]  # target name -> figure -> value

# How to read each figure (by the end of its name) and whether more is better.
UNITS = {
    "_rate": ("msg/s", True),
    "_connects_per_second": ("/s", True),
    "_cpu_ms_per_connect": ("ms", False),
    "_ms": ("ms", False),
    "_kib_per_connection": ("KiB", False),
    "storm_seconds": ("s", False),
    "_failures": ("", False),
    "_errors": ("", False),
    "_loss_at_limit": ("", False),
    "_cpu_percent": ("%", None),
    "_rss_mib": ("MiB", None),
    "_bytes_per_message": ("B", False),
}


def unit_of(figure: str) -> tuple[str, bool | None]:
    for ending, unit in UNITS.items():
        if figure.endswith(ending):
            return unit
    return "", None


def number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"


def figure_names(results: Results) -> list[str]:
    names: list[str] = []
    for figures in results.values():
        names += [name for name in figures if name not in names]
    return names


def table(results: Results, reference: str | None) -> str:
    """One row per figure, one column per target; with a reference, each
    other target's figure also as a multiple of the reference's."""
    targets = list(results)
    header = ["figure", *targets] + [f"{name} / {reference}" for name in targets if reference and name != reference]
    rows = [header]
    for figure in figure_names(results):
        unit, _ = unit_of(figure)
        row = [f"{figure} ({unit})" if unit else figure]
        row += [number(results[name].get(figure)) for name in targets]
        if reference:
            base = results[reference].get(figure)
            for name in targets:
                if name != reference:
                    value = results[name].get(figure)
                    row.append("–" if not base or value is None else f"{value / base:.2f}×")
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    )


def baseline_path(name: str) -> Path:
    return Path(settings.DATA_DIR) / "loadtest-baselines" / f"{name}.json"


def save_baseline(name: str, document: dict) -> Path:
    path = baseline_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def compare(results: Results, name: str, tolerance: float) -> tuple[str, int]:
    """Each figure against the baseline's, for targets both runs have; the
    number of figures that got worse by more than the tolerance."""
    path = baseline_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no baseline {name!r} at {path}")
    saved: Results = json.loads(path.read_text())["results"]
    lines = [f"Compared with baseline {name!r} (tolerance {tolerance:.0%}):"]
    regressions = 0
    for target, figures in results.items():
        for figure, value in figures.items():
            before = saved.get(target, {}).get(figure)
            _, more_is_better = unit_of(figure)
            if value is None or before is None or more_is_better is None:
                continue
            ratio = value / before if before else (1.0 if value == before else float("inf"))
            worse = ratio < 1 - tolerance if more_is_better else ratio > 1 + tolerance and value - before > 0.5
            regressions += worse
            flag = "  REGRESSION" if worse else ""
            lines.append(f"  {target} {figure}: {number(before)} -> {number(value)} ({ratio:.2f}×){flag}")
    lines.append(f"{regressions} regression(s)")
    return "\n".join(lines), regressions
