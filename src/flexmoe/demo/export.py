"""Committed evidence: a run's report, results and plots copied to results/<name>/ (small files
only, no weights) with RUN.md saying how they were produced: the command, the commit, the seed
and the wall time of every stage."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

from flexmoe.store.fsutil import atomic_dir

# plus every plot (*.png)
KEPT = ("report.md", "results.json", "tasks.md", "tasks.json", "preselect.md", "preselect.json")
# the privacy table (scripts/privacy_table.py writes it under <run>/privacy/), when it has run
PRIVACY = ("privacy.md", "privacy.json", "privacy_utility.png")


def code_commit() -> str:
    """HEAD (and whether the tracked tree differs from it): read when a run STARTS, since the
    checkout may move while it runs."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" with uncommitted changes" if dirty else "")


def stage_seconds(out: Path) -> dict[str, float]:
    """Wall seconds of every stage of the run (its markers), for the record of a results run."""
    return {
        str(m.relative_to(out)): round(json.loads(m.read_text()).get("seconds", 0.0), 1)
        for m in sorted(out.rglob(".*.json"))
        if "eval-cache" not in m.parts
    }


def run_md(results: dict, command: str, total_seconds: float | None, commit: str) -> str:
    """RUN.md: how the committed files were produced."""
    cfg = results.get("config") or {}
    stages = results.get("stage_seconds") or {}
    lines = [
        "# How these results were produced",
        "",
        f"- Command: `{command}` (run directory `{cfg.get('out', '?')}`), seed {cfg.get('seed')}.",
        f"- Code: commit {commit}.",
        f"- Machine: {platform.machine()}, {platform.system()}, Python "
        f"{platform.python_version()}; CPU only (timings vary with the machine's load).",
        f"- Evaluation: {cfg.get('eval_tokens', 0):,} held-out tokens per domain in windows of "
        f"{cfg.get('seq_len')} tokens, {results.get('eval_dtype', '?')} for every model.",
    ]
    if total_seconds is not None:
        lines.append(f"- Wall time of this invocation: {total_seconds / 60:.1f} min.")
    lines += [
        "- Every stage is skipped when its output exists and was built from the same spec; the "
        "times below are those of the run that built each stage.",
        "",
        "| stage (marker under the run directory) | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:,.0f} |" for k, v in stages.items()]
    return "\n".join(lines) + "\n"


def export_results(
    report_dir: Path,
    dest: Path,
    command: str,
    total_seconds: float | None = None,
    commit: str | None = None,
) -> Path:
    """Replace dest with report_dir's small files, the run's privacy table when it has one, and
    a RUN.md (atomically; dest is flexmoe's own output, recorded like every other). `commit`:
    code_commit() from the run's start."""
    results = json.loads((report_dir / "results.json").read_text())
    with atomic_dir(dest, overwrite=True) as tmp:
        for p in sorted(report_dir.iterdir()):
            if p.name in KEPT or p.suffix == ".png":
                shutil.copy2(p, tmp / p.name)
        privacy = report_dir.parent / "privacy"
        if (privacy / "privacy.md").is_file():
            (tmp / "privacy").mkdir()
            for name in PRIVACY:
                if (privacy / name).is_file():
                    shutil.copy2(privacy / name, tmp / "privacy" / name)
        results["stage_seconds"] = stage_seconds(report_dir.parent)  # the stages after the
        run = run_md(results, command, total_seconds, commit or code_commit())  # evaluation too
        (tmp / "RUN.md").write_text(run)
    return dest
