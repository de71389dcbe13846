"""DVC variants: `variant=<name>` applies conf/variant_overrides/<name>.yaml under the command line's overrides, in
both ways a stage is started (Hydra composition and `--params params.yaml`)."""

import json
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from edgeconformer.config import apply_variant, compose, load_params, variant_name
from edgeconformer.errors import UserError


def params_mode(*overrides):
    cfg, given = load_params(REPO / "params.yaml", list(overrides))
    return apply_variant(cfg, given)


def test_every_chain_variant_has_overrides():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["variants"] == ["vanilla", "dws", "practical"]
    assert set(params["variants"]) <= set(params["variant_overrides"])


@pytest.mark.parametrize("name", ["vanilla", "dws"])
def test_paper1_variants_compose_the_config_they_always_had(name):
    # The chain trained vanilla/dws with `model.subsampling=<name>`; the variant composes exactly that config.
    old, _ = load_params(REPO / "params.yaml", [f"model.subsampling={name}"])
    new = params_mode(f"variant={name}")
    assert OmegaConf.to_container(new.model) == OmegaConf.to_container(old.model)
    assert new.train == old.train and variant_name(new) == name


def test_practical_variant_is_the_practical_experiment():
    cfg = params_mode("variant=practical")
    experiment = compose(["+experiment=practical"])
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(experiment.model)
    assert cfg.model.cascade.enabled and cfg.model.encoder.attention == "performer"
    assert variant_name(cfg) == "practical"


def test_command_line_overrides_win_over_the_variant():
    cfg = params_mode("variant=practical", "model.encoder.performer_features=128", "model.subsampling=vanilla")
    assert cfg.model.encoder.performer_features == 128 and cfg.model.subsampling == "vanilla"
    assert cfg.model.encoder.conv_only_layers == 2  # the rest of the variant still applies


def test_unknown_variant_names_the_file_to_add():
    with pytest.raises(UserError, match=r"variant='wide'.*conf/variant_overrides/wide.yaml"):
        params_mode("variant=wide")
    # no variant: the config as composed; a params file from before variant_overrides keeps working
    assert params_mode().model.name == "small"
    cfg = OmegaConf.create({"variant": "dws", "model": {"subsampling": "dws"}})
    assert apply_variant(cfg) is cfg


def test_hydra_mode_applies_the_variant_under_the_command_line(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "import json\n"
        "from omegaconf import OmegaConf\n"
        "from edgeconformer.config import run_stage\n"
        "def show(cfg):\n"
        "    assert 'hydra' not in cfg\n"
        "    print('CFG=' + json.dumps(OmegaConf.to_container(cfg.model, resolve=True)))\n"
        "run_stage(show)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "variant=practical",
            "model.encoder.performer_features=32",
            "model.decoder.n_layers=2",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout.split("CFG=", 1)[1])
    assert model["name"] == "practical" and model["cascade"]["enabled"]
    assert model["encoder"]["performer_features"] == 32 and model["decoder"]["n_layers"] == 2


@pytest.mark.parametrize(
    "name, change",
    [
        ("conv_only", {"conv_only_layers": 2}),
        (
            "downsized",
            {
                "stages": [
                    {"n_layers": 2, "d_model": 144, "ff_dim": 576},
                    {"n_layers": 2, "d_model": 96, "n_heads": 4, "ff_dim": 384},
                ]
            },
        ),
        ("performer", {"attention": "performer"}),  # m = 64, the default
    ],
)
def test_single_change_ablations_differ_from_the_streaming_baseline_in_one_place(name, change):
    base = OmegaConf.to_container(params_mode("variant=streaming").model)
    model = OmegaConf.to_container(params_mode(f"variant={name}").model)
    assert base["encoder"]["causal"] and base["encoder"]["chunk_size"] == 8 and base["subsampling"] == "dws"
    assert {k: v for k, v in model["encoder"].items() if base["encoder"][k] != v} == change
    assert {k: v for k, v in model.items() if k not in ("encoder", "name")} == {
        k: v for k, v in base.items() if k not in ("encoder", "name")
    }


@pytest.mark.parametrize("base", ["vanilla", "dws"])
def test_bf16_variants_are_their_base_in_bf16_mixed(base):
    # the paired bf16 - fp32 comparison needs the two sides to differ in the precision alone
    fp32, bf16 = params_mode(f"variant={base}"), params_mode(f"variant={base}_bf16")
    assert OmegaConf.to_container(bf16.model) == OmegaConf.to_container(fp32.model) and bf16.train == fp32.train
    assert bf16.trainer.precision == "bf16-mixed" and fp32.trainer.precision == "32-true"
    cfg = compose([f"variants=[{base},{base}_bf16]", f"compared=[{base},{base}_bf16]"])
    runs = OmegaConf.to_container(cfg.runs, resolve=True)
    assert sorted(runs) == sorted(f"{v}-s{s}" for v in (base, f"{base}_bf16") for s in (1, 2, 3))
