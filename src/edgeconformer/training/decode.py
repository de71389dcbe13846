"""Batched decoding of a feature dataset with a trained `ASRModule` (dev WER of averaged weights, test WER)."""

from __future__ import annotations

import torch

from edgeconformer.data.datamodule import FeatureDataset, collate_features
from edgeconformer.data.dataset import DurationBucketSampler


@torch.no_grad()
def decode_dataset(
    module,
    dataset: FeatureDataset,
    method: str,
    beam: int = 8,
    ctc_weight: float = 0.3,
    max_batch_seconds: float = 300,
    first_pass: bool = False,
) -> tuple[list[str], list[str]]:
    """References and hypotheses over a dataset, batched by duration (outputs are padding-invariant).
    first_pass=True: a cascaded model's first pass (CTC methods only)."""
    sampler = DurationBucketSampler(dataset.durations, max_batch_seconds, shuffle=False)
    refs, hyps = [], []
    for idx in sampler:
        batch = collate_features([dataset[i] for i in idx])
        feats, lengths = module.cmvn(batch["feats"], batch["feat_lengths"]), batch["feat_lengths"]
        if first_pass:
            first, enc_len = module.model.encode_first_pass(feats, lengths)
            hyps += module.decode_first_pass(first, enc_len, method, beam)
        else:
            enc, enc_len = module.model.encode(feats, lengths)
            hyps += module.decode_encoder_output(enc, enc_len, method, beam, ctc_weight)
        refs += batch["texts"]
    return refs, hyps
