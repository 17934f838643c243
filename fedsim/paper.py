"""The paper's experiments end to end (``fedsim paper``, ``make paper``): run every sweep
a manifest lists, then write one ``REPORT.md`` over all of them.

The manifest (``configs/paper/paper.yaml``) is a mapping with ``experiments``, a list of
mappings: ``name`` (the sweep's folder under the output folder), ``sweep`` (a sweep file,
relative to the manifest), ``title``, ``text`` (what it tests, in a sentence or two) and
``report`` (``fedsim report``'s options: ``x``, ``y``, ``metric``, ``conflict``, and the
``Extras`` fields ``conflict_x``, ``along``, ``curves``, ``metrics``). ``quick`` runs
each sweep's reduced form (its ``quick`` block). Output::

    OUT/<name>/            the sweep folder (resumable) and its report in OUT/<name>/report/
    OUT/REPORT.md          every experiment's text, tables and figures, in manifest order
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fedsim.config import read_yaml_file
from fedsim.io import write_atomic
from fedsim.registry import ConfigError

MANIFEST = Path("configs/paper/paper.yaml")
EXPERIMENT_KEYS = ("name", "sweep", "title", "text", "report")
REPORT_KEYS = ("x", "y", "metric", "conflict", "conflict_x", "along", "curves", "metrics")


@dataclasses.dataclass
class Experiment:
    """One manifest entry: its folder name, sweep file, words and report options."""

    name: str
    sweep: Path
    title: str
    text: str
    report: dict


def _experiment(entry, root: Path) -> Experiment:
    """A manifest entry, checked: known keys, a name that is a folder name, a sweep file."""
    if not isinstance(entry, dict):
        raise ConfigError(f"each paper experiment must be a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown paper experiment key {unknown[0]!r}; valid: {', '.join(EXPERIMENT_KEYS)}"
        )
    name = str(entry.get("name", ""))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"paper experiment name {name!r} must be a folder name ([A-Za-z0-9_.-])")
    report = entry.get("report") or {}
    bad = sorted(set(report) - set(REPORT_KEYS)) if isinstance(report, dict) else ["?"]
    if bad:
        raise ConfigError(
            f"{name}: unknown report option {bad[0]!r}; valid: {', '.join(REPORT_KEYS)}"
        )
    sweep = root / str(entry.get("sweep", ""))
    if not sweep.is_file():
        raise ConfigError(f"{name}: sweep file {str(sweep)!r} does not exist")
    return Experiment(
        name, sweep, str(entry.get("title", name)), str(entry.get("text", "")), report
    )


def load_manifest(path: str | Path = MANIFEST, only=None) -> list[Experiment]:
    """The manifest's experiments (those named in ``only``, if given), checked."""
    path = Path(path)
    doc = read_yaml_file(path, "paper manifest")
    if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), list):
        raise ConfigError(f"paper manifest {str(path)!r} must map 'experiments' to a list")
    exps = [_experiment(e, path.parent) for e in doc["experiments"]]
    names = [e.name for e in exps]
    if len(set(names)) != len(names):
        raise ConfigError(f"paper manifest {str(path)!r} names an experiment twice")
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ConfigError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(names)}")
    return [e for e in exps if not only or e.name in only]


def run_paper(
    exps: list[Experiment], out: Path, quick: bool = False, quiet: bool = False, stop=None
):
    """Run every experiment's sweep (its reduced form with ``quick``) into ``out/<name>``;
    every sweep file is expanded and checked before the first run starts. ``stop`` (a
    ``threading.Event``, set by SIGTERM) checkpoints the batch in flight and stops, as
    ``run_sweep`` does."""
    from fedsim.sweep import load_sweep, run_sweep

    sweeps = [(e, load_sweep(e.sweep, quick=quick)) for e in exps]
    for e, sweep in sweeps:
        if not quiet:
            print(f"paper: {e.name} ({len(sweep.runs)} runs)", flush=True)
        run_sweep(sweep, out / e.name, quiet=quiet, stop=stop)


def _report_options(report: dict) -> dict:
    """``make_report`` keyword arguments from a manifest entry's ``report`` mapping."""
    from fedsim.report import Extras

    fields = {
        k: tuple(report[k]) for k in ("conflict_x", "along", "curves", "metrics") if k in report
    }
    options = {k: report.get(k) for k in ("x", "y", "metric", "conflict")}
    return {**options, "extra": Extras(**fields)}


def section_markdown(e: Experiment, report_md: str) -> str:
    """One experiment's section of the paper report: its title and text, then its own
    report (``report_md``: that sweep's REPORT.md) with headings two levels down and links
    pointing into ``<name>/report/``."""
    body = report_md.split("\n", 1)[1] if report_md.startswith("# ") else report_md
    body = re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 2) + " ", body, flags=re.M)
    body = re.sub(r"\]\(([^)/:]+\.(?:png|md))\)", rf"]({e.name}/report/\1)", body)
    return f"## {e.title}\n\n{e.text}\n\nSweep: `{e.sweep}`.\n\n{body.strip()}\n"


def write_paper_report(exps: list[Experiment], out: Path, quick: bool = False) -> Path:
    """Each experiment's report into ``out/<name>/report/``, then ``out/REPORT.md``."""
    from fedsim.report import make_report

    sections = []
    for e in exps:
        folder = out / e.name / "report"
        make_report([out / e.name], folder, **_report_options(e.report))
        sections.append(section_markdown(e, (folder / "REPORT.md").read_text()))
    form = "reduced form (`make paper QUICK=1`)" if quick else "full form (`make paper`)"
    head = (
        "# Reproducing Raynal & Troncoso, *On the Conflict of Robustness and Learning in "
        f"Collaborative Machine Learning*\n\nEvery experiment of `configs/paper/paper.yaml`, "
        f"{form}. Each section: what it tests, the sweep's tables (mean ± std over the "
        "seeds it states) and figures; the sweep's own report is in `<name>/report/`.\n\n"
        + "".join(f"- [{e.title}](#{_anchor(e.title)})\n" for e in exps)
    )
    path = out / "REPORT.md"
    write_atomic(path, head + "\n" + "\n".join(sections))
    return path


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to hyphens, most punctuation dropped."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")
