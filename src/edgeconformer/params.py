"""Writes params.yaml, the composed config that DVC stages read, exactly as `dvc exp run` would compose it.

python -m edgeconformer.params            # regenerate after editing conf/
python -m edgeconformer.params --check    # exit 1 if params.yaml is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dvc.utils.hydra import compose_and_dump

from edgeconformer.config import CONF_DIR, REPO


def composed_yaml(overrides: list[str] | None = None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(CONF_DIR), None, "config", str(REPO), overrides or [])
        return out.read_text(encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    text = composed_yaml(args.overrides)
    target = REPO / "params.yaml"
    if args.check:
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            print(
                "params.yaml differs from the config composed from conf/; run `python -m edgeconformer.params`",
                file=sys.stderr,
            )
            sys.exit(1)
        return
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
