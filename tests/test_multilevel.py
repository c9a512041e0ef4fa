"""Stage features (multilevel.py): which modules are pooled, the wrapper's output, freezing through it,
saving and loading it, and a search whose chosen model reads them."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from torch import nn

from autotransfer.backbones import Backbone, TimmProvider, WeightsRequest
from autotransfer.cli import main
from autotransfer.cache.features import tensors_digest
from autotransfer.heads import HeadConfig
from autotransfer.model import ModelCard, assemble, load_model, save_model
from autotransfer.multilevel import NoStageFeatures, stage_modules, with_stage_features
from autotransfer.plugins import registries
from autotransfer.backbones import Preprocessing

SIZE = 32


def _backbone(name: str = "test_efficientnet") -> Backbone:
    return TimmProvider().create(name, WeightsRequest(pretrained=False))


@pytest.mark.parametrize("name, expected", [
    ("test_resnet", ["layer1.0", "layer2.0", "layer3.0"]),  # stem spread over the root; the last stage is pooled anyway
    ("test_efficientnet", ["blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0"]),
    ("test_vit", ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
])
def test_each_stage_but_the_last_contributes_the_module_that_holds_it(name, expected):
    backbone = _backbone(name)
    assert stage_modules(backbone.module, backbone.stages) == expected


def test_the_wrapper_concatenates_pooled_stage_outputs_before_the_final_features():
    backbone = _backbone()
    plain = copy.deepcopy(backbone.module).eval()
    wrapped = with_stage_features(backbone, SIZE)
    names = stage_modules(plain, backbone.stages)
    widths = []
    hooks = [plain.get_submodule(n).register_forward_hook(lambda m, i, o: widths.append(o.shape[1])) for n in names]
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        final = plain(images)
    for hook in hooks:
        hook.remove()
    assert wrapped.num_features == sum(widths) + backbone.num_features
    module = wrapped.module.eval()
    with torch.no_grad():
        out = module(images)
    assert out.shape == (3, wrapped.num_features)
    assert torch.allclose(out[:, -backbone.num_features:], final, atol=1e-6)
    assert not any(m._forward_hooks for m in module.modules())  # hooks live for one forward only
    with torch.no_grad():
        assert torch.allclose(copy.deepcopy(module)(images), out, atol=1e-6)  # a trial's copy computes the same


def test_freezing_counts_the_same_stages_through_the_wrapper():
    wrapped = with_stage_features(_backbone(), SIZE)
    model = assemble(wrapped, HeadConfig("linear"), 4, frozen_stages=len(wrapped.stages))
    assert model.parameter_counts()[0] == sum(p.numel() for p in model.head.parameters())
    partly = assemble(with_stage_features(_backbone(), SIZE), HeadConfig("linear"), 4, frozen_stages=2)
    frozen = {n for n, p in partly.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for stage in wrapped.stages[:2] for n in stage}


def test_the_caches_never_mix_stage_and_final_features():
    backbone = _backbone()
    assert tensors_digest(backbone.module) != tensors_digest(with_stage_features(_backbone(), SIZE).module)


def test_a_saved_stage_feature_model_loads_and_predicts_the_same(tmp_path):
    wrapped = with_stage_features(_backbone(), SIZE)
    model = assemble(wrapped, HeadConfig("linear"), 3, frozen_stages=len(wrapped.stages)).eval()
    card = ModelCard(backbone="test_efficientnet", weights_source="random init", pretrained=False,
                     head={"kind": "linear", "hidden": None, "dropout": 0.0}, frozen_stages=len(wrapped.stages),
                     class_names=["a", "b", "c"], image_size=SIZE, resize_size=SIZE, decode_size=SIZE,
                     mean=[0.5] * 3, std=[0.5] * 3, features="stages")
    save_model(model, card, tmp_path / "best")
    loaded, read = load_model(tmp_path / "best", registries(()))
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-6)
    assert read.features == "stages"
    edited = json.loads((tmp_path / "best" / "model.json").read_text())
    edited["features"] = "layers"
    (tmp_path / "best" / "model.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match="features must be one of final, stages"):
        load_model(tmp_path / "best", registries(()))


class _Flat(nn.Module):
    """A module whose parameters all sit on the root: no stage has a module of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.num_features = 3

    def forward(self, images):
        return images.mean(dim=(2, 3)) * self.weight


def test_a_backbone_without_stage_modules_is_refused_with_the_reason():
    flat = Backbone(_Flat(), 3, [["weight"]], Preprocessing(SIZE, (0.5,) * 3, (0.5,) * 3),
                    "random init")
    with pytest.raises(NoStageFeatures, match="no stage but the last"):
        with_stage_features(flat, SIZE)


@pytest.mark.slow
def test_a_search_that_chooses_a_stage_probe_predicts_as_it_measured(tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--dataset", "builtin:digits:0-4", "--backbones", "test_efficientnet", "--no-pretrained",
                 "--frozen-stages", "all", "--heads", "linear", "--features", "stages", "--trials", "1",
                 "--image-size", str(SIZE), "--out", str(out), "--quiet"]) == 0
    card = json.loads((out / "best" / "model.json").read_text())
    assert card["features"] == "stages"
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board["features"]) == ["stages"] and list(board["cache"]) == ["features"]
    assert board["test_accuracy"].iloc[0] == pytest.approx(card["test_accuracy"])
