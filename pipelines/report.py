"""DVC stage `report`: metrics/*.json + the FP16 audits -> reports/summary.md + reports/plots/*.png, and the
results blocks of README.md and docs/*.md rewritten from the same metrics (evidence.py).

    python pipelines/report.py
"""

from edgeconformer.config import run_stage
from edgeconformer.report import build_report


def report(cfg):
    result = build_report("metrics", "reports", "reports/summary.md", "reports/plots", docs_root=".")
    print(
        f"wrote {result['summary']} and {len(result['plots'])} plot(s) for {', '.join(result['variants'])}; "
        f"results blocks updated in: {', '.join(result['docs']) or 'none (already current)'}"
    )
    return result


if __name__ == "__main__":
    run_stage(report)
