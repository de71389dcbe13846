"""trainer.precision=auto: CPU feature detection and the timed choice between fp32 and bf16 mixed precision."""

import pytest
import torch

from conftest import TINY_MODEL
from edgeconformer.config import compose
from edgeconformer.errors import ConfigError
from edgeconformer.hardware import cpu_bf16, cpu_flags, resolve_precision, step_timer, synthetic_batch
from edgeconformer.models.lightning import build_model

INTEL = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n"
AMD_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("text, found", [(INTEL, ["avx512_bf16", "amx_bf16"]), (AMD_AVX2, []), (ARM, ["bf16"])])
def test_bf16_instructions_are_read_from_cpuinfo(tmp_path, text, found):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_bf16(cpu_flags(path)) == found


def test_unreadable_cpuinfo_means_no_flags(tmp_path):
    assert cpu_flags(tmp_path / "missing") == set()


def test_explicit_precision_is_kept():
    assert resolve_precision("bf16-mixed")[0] == "bf16-mixed"
    assert resolve_precision("32-true", step_seconds=lambda p: 1 / 0)[0] == "32-true"  # never timed


def test_auto_without_bf16_instructions_is_fp32_and_never_times():
    chosen, why = resolve_precision("auto", "cpu", step_seconds=lambda p: 1 / 0, flags={"avx2"})
    assert chosen == "32-true" and "no bf16 instructions" in why["reason"]
    assert why["cpu"]["bf16_instructions"] == []


@pytest.mark.parametrize(
    "fp32, bf16, chosen", [(1.0, 0.5, "bf16-mixed"), (1.0, 0.98, "32-true"), (1.0, 1.4, "32-true")]
)
def test_auto_with_bf16_instructions_keeps_bf16_only_where_it_is_faster(fp32, bf16, chosen):
    times = {"32-true": fp32, "bf16-mixed": bf16}
    got, why = resolve_precision("auto", "cpu", step_seconds=times.__getitem__, flags={"avx512_bf16"})
    assert got == chosen and why["speedup"] == pytest.approx(fp32 / bf16)
    assert "avx512_bf16" in why["reason"]


def test_auto_on_an_unknown_accelerator_asks_for_an_explicit_precision():
    with pytest.raises(ConfigError, match="trainer.precision"):
        resolve_precision("auto", "mps")


def test_step_timer_times_both_precisions_without_touching_the_model_or_the_rng():
    model = build_model(compose(TINY_MODEL).model, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    seconds = step_timer(model, synthetic_batch(80, 16, batch_seconds=4, utterance_seconds=2), steps=1)
    assert seconds("32-true") > 0 and seconds("bf16-mixed") > 0
    assert torch.equal(torch.rand(4), expected)  # the run's random stream is where it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_train_stage_resolves_auto_for_its_own_model():
    from omegaconf import OmegaConf

    from edgeconformer.models.lightning import ASRModule
    from edgeconformer.stages.train import training_precision

    cfg = compose([*TINY_MODEL, "train.max_batch_seconds=4", "trainer.precision=auto"])
    module = ASRModule(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.train), 16)
    precision, why = training_precision(cfg, module)
    assert why["requested"] == "auto" and why["chosen"] == precision in ("32-true", "bf16-mixed")
    if not cpu_bf16():
        assert precision == "32-true"
    explicit = OmegaConf.merge(cfg, {"trainer": {"precision": "32-true"}})
    assert training_precision(explicit, module) == (
        "32-true",
        {"requested": "32-true", "chosen": "32-true", "reason": "set explicitly"},
    )
