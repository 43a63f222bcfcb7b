"""Re-issue the verdicts of docs/results/*/report.json at seed level (issue 13).

    PYTHONPATH=. python scripts/reissue_results.py docs/results/*/

Those reports were published with the sample-level verdict and a "every seed agrees in sign"
veto. Their report.json keeps each seed's mean test loss of every arm (`per_seed_test_loss`) but
not the per-sample losses of each seed, so the seed-level verdict is recomputed from the per-seed
means (`seed_verdict_from_means`: paired t-test, sign-flip test, t interval, minimum detectable
effect, equivalence) without the two-level bootstrap, which needs the per-sample losses; each
re-issued text says so. Nothing else in a report changes: the published sample-level numbers stay,
labelled as the secondary view. Running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from topoflow.experiment.report import seed_level_lines
from topoflow.seed_stats import DEFAULT_MARGIN, SeedVerdict, seed_verdict_from_means

MARKER = "<!-- seed-level verdict re-issued by scripts/reissue_results.py -->"
OLD_LABEL = "**Verdict:** "
NEW_LABEL = ("**Sample-level view (secondary; published as the verdict on 2026-11-25, before "
             "issue 13 withdrew its seed-agreement veto):** ")


def reissue_comparison(comparison: dict, margin: float) -> SeedVerdict:
    """The seed-level verdict of one comparison of report.json, from its per-seed means."""
    per_seed = comparison["per_seed_test_loss"]
    return seed_verdict_from_means({int(s): v["control"] for s, v in per_seed.items()},
                                   {int(s): v["arm"] for s, v in per_seed.items()},
                                   arm_name=comparison["arm"], margin=margin)


def _markdown_section(verdict: SeedVerdict) -> str:
    lines = [MARKER, "", f"**Verdict ({verdict.verdict}, training seed as the unit; re-issued "
             f"2026-11-30):** {verdict.text}", "", *seed_level_lines(verdict), ""]
    return "\n".join(lines) + "\n"


def reissue(folder: Path, margin: float) -> dict[str, tuple[str, str]]:
    """Rewrite one result folder's report.json and report.md; {arm: (old, new verdict)}."""
    json_path, md_path = folder / "report.json", folder / "report.md"
    report = json.loads(json_path.read_text())
    md = md_path.read_text()
    changes = {}
    for arm, comparison in report["comparisons"].items():
        published = comparison.get("sample_level", comparison["verdict"])
        verdict = reissue_comparison(comparison, margin)
        comparison["sample_level"] = published
        comparison["verdict"] = verdict.to_dict()
        changes[arm] = (published["direction"], verdict.verdict)
        heading = f"## Verdict: {arm} vs control\n\n"
        start = md.index(heading) + len(heading)
        if md.startswith(MARKER, start):  # already re-issued: replace the section
            end = md.index(NEW_LABEL, start)
            md = md[:start] + _markdown_section(verdict) + md[end:]
        else:
            if not md.startswith(OLD_LABEL, start):
                raise ValueError(f"{md_path}: no '{OLD_LABEL}' paragraph under '{heading.strip()}'")
            md = (md[:start] + _markdown_section(verdict) + NEW_LABEL
                  + md[start + len(OLD_LABEL):])
    report["reissued"] = {
        "date": "2026-11-30", "by": "scripts/reissue_results.py", "margin": margin,
        "note": "comparisons[*].verdict is the seed-level verdict from the per-seed mean test "
                "losses (no two-level bootstrap: per-sample losses of each seed were not kept); "
                "comparisons[*].sample_level is the verdict as published (sample-level view)."}
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(md)
    return changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    args = p.parse_args()
    print("| result | arm | published verdict | seed-level verdict |\n|---|---|---|---|")
    for folder in args.folders:
        for arm, (old, new) in reissue(folder, args.margin).items():
            print(f"| {folder.name} | {arm} | {old} | {new} |")


if __name__ == "__main__":
    main()
