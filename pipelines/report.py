"""DVC stage `report`: metrics/*.json + reports/<variant>/fp16_audit.json -> reports/summary.md + reports/plots/*.png.

    python pipelines/report.py
"""

from edgeconformer.config import run_stage
from edgeconformer.report import build_report


def report(cfg):
    result = build_report("metrics", "reports", "reports/summary.md", "reports/plots")
    print(f"wrote {result['summary']} and {len(result['plots'])} plot(s) for {', '.join(result['variants'])}")
    return result


if __name__ == "__main__":
    run_stage(report)
