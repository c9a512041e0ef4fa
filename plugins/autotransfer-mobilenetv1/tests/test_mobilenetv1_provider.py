"""The provider without real weights: names, describe, discovery, errors, freezing, the CLI's error line.

Everything here runs on a fresh machine; the real weights are used in test_mobilenetv1_weights.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from autotransfer.backbones import WeightsRequest, provider_for
from autotransfer.errors import UserError, WeightsUnavailable
from autotransfer.heads import HeadConfig
from autotransfer.model import assemble
from autotransfer.plugins import registries
from autotransfer.testing import is_installed
from autotransfer_mobilenetv1 import ENV_VAR, NAMES, MobileNetV1Provider, source_classifier
from autotransfer_mobilenetv1.provider import SPECS

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
HOOKS_MODULE = "autotransfer_mobilenetv1.hooks"
DIST = "autotransfer-mobilenetv1"
LEAKY, KERAS = "mobilenetv1_025_leaky_in1k", "mobilenetv1_025_keras_in1k"



def _env(**extra: str) -> dict[str, str]:
    """A subprocess environment that finds the package whether or not it is pip-installed."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "AUTOTRANSFER_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    code = "import sys; from autotransfer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=_env(**env))


# --------------------------------------------------------------------------- names and describe

def test_matches_exact_names_only():
    provider = MobileNetV1Provider()
    assert provider.name == "mobilenetv1"
    assert all(provider.matches(name) for name in NAMES) and set(NAMES) == {LEAKY, KERAS}
    for other in ("mobilenetv1_100", "mobilenetv1_025", f"{LEAKY}.tag", LEAKY.upper(), f" {LEAKY}", "resnet18", ""):
        assert not provider.matches(other), other


def test_describe_builds_on_meta_with_the_published_preprocessing():
    provider = MobileNetV1Provider()
    leaky, keras = provider.describe(LEAKY), provider.describe(KERAS)
    for info, name in ((leaky, LEAKY), (keras, KERAS)):
        assert info.name == name
        assert info.num_stages == 6  # stem + 5 block stages of MobileNetV1
        assert info.num_features == 256  # 1024 * 0.25
        assert info.preprocessing.input_size == 224 and info.preprocessing.crop_pct == 0.875
        assert not info.fixed_input_size
    assert leaky.preprocessing.mean == (0.485, 0.456, 0.406) and leaky.preprocessing.std == (0.229, 0.224, 0.225)
    assert keras.preprocessing.mean == keras.preprocessing.std == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match="not served"):
        provider.describe("resnet18")


def test_architectures_differ_as_published():
    """Leaky: LeakyReLU(0.1), symmetric padding, eps 1e-5. Keras: ReLU6, TF 'same' padding, eps 1e-3."""
    provider = MobileNetV1Provider()
    leaky = provider.create(LEAKY, WeightsRequest(pretrained=False)).module
    keras = provider.create(KERAS, WeightsRequest(pretrained=False)).module
    assert isinstance(leaky.bn1.act, nn.LeakyReLU) and leaky.bn1.act.negative_slope == 0.1
    assert isinstance(keras.bn1.act, nn.ReLU6)
    assert leaky.bn1.eps == 1e-5 and keras.bn1.eps == 1e-3
    assert type(leaky.conv_stem) is nn.Conv2d and type(keras.conv_stem).__name__ == "Conv2dSame"
    for module in (leaky, keras):
        assert module.num_classes == 0 and isinstance(module.classifier, nn.Identity)
        assert module(torch.randn(2, 3, 64, 64)).shape == (2, 256)


# --------------------------------------------------------------------------- discovery

def test_registries_route_the_names_to_this_provider():
    regs = registries((HOOKS_MODULE,))
    for name in NAMES:
        assert regs.backbone_provider(name).name == "mobilenetv1"
        assert provider_for(name, regs).describe(name).num_features == 256
    assert regs.backbone_provider("mobilenetv1_100").name == "timm"  # exact names only
    assert [p.name for p in regs.backbones].count("mobilenetv1") == 1


def test_environment_variable_registers_it_in_a_fresh_process():
    code = ("from autotransfer.plugins import registries; r = registries(); "
            f"print(r.backbone_provider({LEAKY!r}).name, r.backbone_provider({KERAS!r}).name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(AUTOTRANSFER_PLUGINS=HOOKS_MODULE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["mobilenetv1", "mobilenetv1"]


@pytest.mark.skipif(not is_installed(DIST), reason=f"{DIST} is not pip-installed (pip install -e {PLUGIN_ROOT})")
def test_installed_entry_point_is_listed_by_the_cli():
    entry_points = metadata.entry_points(group="autotransfer")
    assert any(ep.value == HOOKS_MODULE for ep in entry_points)
    version = metadata.version(DIST)
    for extra in ({}, {"AUTOTRANSFER_PLUGINS": HOOKS_MODULE}):  # naming it again must not register it twice
        done = _cli("plugins", **extra)
        assert done.returncode == 0, done.stderr
        assert f"{HOOKS_MODULE} ({DIST} {version})" in done.stdout
        assert "  backbones: mobilenetv1" in done.stdout
        assert done.stdout.count("backbones: mobilenetv1") == 1


# --------------------------------------------------------------------------- weights errors (no real weights needed)

def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_environment_variable(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    for name in NAMES:
        with pytest.raises(WeightsUnavailable) as excinfo:
            MobileNetV1Provider().create(name, WeightsRequest(pretrained=True))
        message = _one_line(excinfo)
        assert f"{ENV_VAR} is not set" in message and name in message
        assert "--no-pretrained" in message and "--weights" in message


def test_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    for name in NAMES:
        with pytest.raises(WeightsUnavailable) as excinfo:
            MobileNetV1Provider().create(name, WeightsRequest(pretrained=True))
        message = _one_line(excinfo)
        assert str(tmp_path / SPECS[name].file) in message and "does not exist" in message and ENV_VAR in message
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-such-folder"))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        source_classifier(LEAKY)


def test_sha256_mismatch(monkeypatch, tmp_path):
    """A well-formed safetensors file under the right name but with other bytes is refused before loading."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    for name in NAMES:
        state = {k: v.clone() for k, v in MobileNetV1Provider().create(name, WeightsRequest(False)).module.state_dict().items()}
        save_file(state, str(tmp_path / SPECS[name].file))
        with pytest.raises(WeightsUnavailable) as excinfo:
            MobileNetV1Provider().create(name, WeightsRequest(pretrained=True))
        message = _one_line(excinfo)
        assert "sha256" in message and SPECS[name].sha256 in message and SPECS[name].file in message
        assert ENV_VAR in message
    with pytest.raises(WeightsUnavailable, match="sha256"):
        source_classifier(LEAKY)


def test_random_init_needs_no_weights(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for name in NAMES:
        backbone = MobileNetV1Provider().create(name, WeightsRequest(pretrained=False))
        assert backbone.source == "random init"
        assert backbone.num_features == 256 and len(backbone.stages) == 6


def test_a_file_of_another_architecture_is_refused(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(other))
    with pytest.raises(WeightsUnavailable, match="do not fit backbone"):
        MobileNetV1Provider().create(LEAKY, WeightsRequest(pretrained=True, file=str(other)))
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        MobileNetV1Provider().create(LEAKY, WeightsRequest(pretrained=True, file=str(tmp_path / "none.safetensors")))


def test_source_classifier_is_none_without_a_head(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert source_classifier(KERAS) is None
    assert MobileNetV1Provider().source_classifier(KERAS) is None
    with pytest.raises(UserError, match="not served"):
        source_classifier("resnet18")


def test_cli_reports_missing_weights_in_one_line(tmp_path):
    done = _cli("search", "--dataset", "builtin:digits", "--backbones", LEAKY, "--trials", "1", "--epochs", "1",
                "--out", str(tmp_path / "run"), "--quiet", "--plugin", HOOKS_MODULE)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ENV_VAR in lines[0] and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("name", NAMES)
def test_assemble_freezes_the_first_stages(name):
    torch.manual_seed(0)
    provider = MobileNetV1Provider()
    num_stages = provider.describe(name).num_stages
    for k in range(num_stages + 1):
        backbone = provider.create(name, WeightsRequest(pretrained=False))
        model = assemble(backbone, HeadConfig("linear"), num_classes=3, frozen_stages=k)
        frozen = {n for stage in backbone.stages[:k] for n in stage}
        for n, param in model.backbone.named_parameters():
            assert param.requires_grad == (n not in frozen), (k, n)
        before = {n: t.clone() for n, t in model.backbone.state_dict().items()}
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        optimizer.step()
        after = model.backbone.state_dict()
        trainable, total = model.parameter_counts()
        assert total == sum(p.numel() for p in model.parameters())
        for n, value in after.items():
            module_name = n.rsplit(".", 1)[0]
            stage_params = {p for p in frozen if p.rsplit(".", 1)[0] == module_name}
            if stage_params:  # weights and BatchNorm statistics of frozen stages stay put
                assert torch.equal(before[n], value), (k, n)
        if k == num_stages:
            assert trainable == sum(p.numel() for p in model.head.parameters())
        else:  # the last stage trains
            last = backbone.stages[-1][0]
            assert not torch.equal(before[last], after[last]), (k, last)
