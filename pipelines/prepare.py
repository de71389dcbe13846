"""DVC stage `prepare`: corpus (offline `mini` or LibriSpeech) -> data/prepared/manifests/*.jsonl."""

from edgeconformer.config import run_stage
from edgeconformer.data.prepare import prepare

if __name__ == "__main__":
    run_stage(prepare)
