"""Backbones: stage-wise freezing, weights from local files and from an offline Hugging Face cache, errors.

Everything runs on timm's tiny ``test_*`` models on the CPU. Hub loading runs in a subprocess because
huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autotransfer.backbones import (
    TimmProvider,
    WeightsRequest,
    provider_for,
    read_state_dict,
    timm_stages,
)
from autotransfer.errors import UserError, WeightsUnavailable
from autotransfer.heads import HeadConfig
from autotransfer.model import assemble
from autotransfer.plugins import registries

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "test_resnet.r160_in1k"
HUB_REPO_DIR = "models--timm--test_resnet.r160_in1k"
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGE_SIZE = 64
NUM_CLASSES = 3
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def provider() -> TimmProvider:
    return TimmProvider()


def _frozen_count(spec: str, n: int) -> int:
    return {"none": 0, "stem": 1, "middle": n // 2, "all": n}[spec]


def _stage_of(stages: list[list[str]]) -> dict[str, int]:
    return {name: i for i, stage in enumerate(stages) for name in stage}


def _owns_only(module: nn.Module, names: set[str], prefix: str) -> bool:
    """Whether `module` (named `prefix` in the backbone) has parameters, all of them in `names`."""
    own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
    return bool(own) and all(n in names for n in own)


def _distinctive_state(model_name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A full timm state dict (classifier included) unlike any default init: seeded weights, random BN stats."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_mean"):
            value = torch.randn_like(value)
        elif key.endswith("running_var"):
            value = torch.rand_like(value) + 0.5
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(1234)
        state[key] = value.detach().clone().contiguous()
    return state


def _run_python(code: str, hf_home: Path, **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.update(overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def _hf_cache(hf_home: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache holding `state` as timm/test_resnet.r160_in1k's model.safetensors."""
    repo = hf_home / "hub" / HUB_REPO_DIR
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)  # no newline: huggingface_hub reads it verbatim
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


# --------------------------------------------------------------------------- stages

@pytest.mark.parametrize("model_name, stem_param", [("test_resnet", "conv1.0.weight"),
                                                    ("test_vit", "patch_embed.proj.weight")])
def test_stages_cover_every_parameter_once_stem_first(provider, model_name, stem_param):
    backbone = provider.create(model_name, WeightsRequest(pretrained=False))
    stages = timm_stages(backbone.module)
    assert backbone.stages == stages
    assert len(stages) == provider.describe(model_name).num_stages >= 3
    assert all(stages), "an empty stage cannot be frozen meaningfully"

    flat = [name for stage in stages for name in stage]
    names = [name for name, _ in backbone.module.named_parameters()]
    assert len(flat) == len(set(flat)), "a parameter sits in two stages"
    assert sorted(flat) == sorted(names), "stages must cover exactly the backbone's parameters"

    stage_of = _stage_of(stages)
    assert stage_of[stem_param] == 0, "the stem must be the first stage"
    # Stages follow the network's depth: in registration order the stage index never decreases.
    order = [stage_of[name] for name in names]
    assert order == sorted(order)
    assert order[-1] == len(stages) - 1


# --------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("frozen", ["none", "stem", "middle", "all"])
@pytest.mark.parametrize("model_name", ["test_resnet", "test_vit"])
def test_frozen_stages_get_no_updates_and_keep_batchnorm_stats(provider, model_name, frozen):
    torch.manual_seed(0)
    backbone = provider.create(model_name, WeightsRequest(pretrained=False))
    n = len(backbone.stages)
    k = _frozen_count(frozen, n)
    # timm zero-initialises the last BN of each residual block, which blocks the gradient of the convs
    # before it for one step; give every BN a nonzero scale so every trainable tensor gets a gradient.
    for module in backbone.module.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    model = assemble(backbone, HeadConfig("linear"), num_classes=NUM_CLASSES, frozen_stages=k)

    frozen_names = {name for stage in backbone.stages[:k] for name in stage}
    assert len(frozen_names) == sum(len(stage) for stage in backbone.stages[:k])

    # 1. requires_grad: exactly the first k stages are frozen; the head always trains.
    for name, param in model.backbone.named_parameters():
        assert param.requires_grad == (name not in frozen_names), name
    assert all(p.requires_grad for p in model.head.parameters())
    trainable, total = model.parameter_counts()
    assert total - trainable == sum(p.numel() for name, p in model.backbone.named_parameters()
                                    if name in frozen_names)

    # 2. train() keeps fully frozen submodules (and everything inside them) in eval mode.
    model.eval()
    model.train()
    assert model.training and model.head.training
    frozen_prefixes = [prefix for prefix, module in model.backbone.named_modules()
                       if _owns_only(module, frozen_names, prefix)]
    if k == n:
        assert frozen_prefixes[0] == "", "with every stage frozen the whole backbone is frozen"
    for prefix, module in model.backbone.named_modules():
        inside_frozen = any(prefix == p or p == "" or prefix.startswith(p + ".") for p in frozen_prefixes)
        assert module.training == (not inside_frozen), f"{prefix or '<backbone>'} training={module.training}"
        if any(p.requires_grad for p in module.parameters()):
            assert module.training, prefix

    batchnorms = {prefix: module for prefix, module in model.backbone.named_modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    frozen_bn = {p for p, m in batchnorms.items() if _owns_only(m, frozen_names, p)}
    trainable_bn = set(batchnorms) - frozen_bn
    if model_name == "test_resnet":
        assert batchnorms
        assert bool(frozen_bn) == (k > 0)
        assert bool(trainable_bn) == (k < n)
    else:
        assert not batchnorms

    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers_before = {name: b.detach().clone() for name, b in model.backbone.named_buffers()}

    # 3. One real training step.
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    for name, param in model.named_parameters():
        backbone_name = name.removeprefix("backbone.")
        if name.startswith("backbone.") and backbone_name in frozen_names:
            assert param.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(param, params_before[name]), f"frozen {name} changed"
        else:
            assert param.grad is not None, f"trainable {name} got no gradient"
            assert not torch.equal(param, params_before[name]), f"trainable {name} did not change"

    for prefix in frozen_bn:
        for stat in BN_STATS:
            key = f"{prefix}.{stat}"
            assert torch.equal(model.backbone.get_buffer(key), buffers_before[key]), f"frozen BN {key} changed"
    for prefix in trainable_bn:
        for stat in BN_STATS:
            key = f"{prefix}.{stat}"
            assert not torch.equal(model.backbone.get_buffer(key), buffers_before[key]), \
                f"BN {key} of a trainable stage did not update"


def test_frozen_stages_survive_the_real_trainer(provider):
    """trainer.train flips eval()/train() between epochs; frozen stages must still never move."""
    from autotransfer.data import ImageSet
    from autotransfer.trainer import FitSettings, TrialInputs, train

    backbone = provider.create("test_resnet", WeightsRequest(pretrained=False))
    k = 2
    model = assemble(backbone, HeadConfig("linear"), num_classes=NUM_CLASSES, frozen_stages=k)
    frozen_names = {name for stage in backbone.stages[:k] for name in stage}
    before = {name: t.detach().clone() for name, t in model.backbone.state_dict().items()}

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 72, 72), dtype=torch.uint8, generator=generator)
    labels = torch.arange(12) % NUM_CLASSES
    data = ImageSet(labels, images=images, decode_size=72)
    inputs = TrialInputs(image_size=IMAGE_SIZE, resize_size=72, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    history = train(model, data, data, inputs, FitSettings("adam", 1e-2, 2, 6, torch.device("cpu"), 0))
    assert len(history) == 2

    after = model.backbone.state_dict()
    frozen_modules = {name.rsplit(".", 1)[0] for name in frozen_names}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    for key in before:
        if key.rsplit(".", 1)[0] in frozen_modules:
            assert key not in changed, f"{key} of a frozen stage changed during training"
    assert "layer4.0.bn1.running_mean" in changed and "layer4.0.conv1.weight" in changed


def test_frozen_stages_out_of_range(provider):
    backbone = provider.create("test_resnet", WeightsRequest(pretrained=False))
    with pytest.raises(ValueError, match="frozen_stages"):
        assemble(backbone, HeadConfig("linear"), NUM_CLASSES, frozen_stages=len(backbone.stages) + 1)


def test_create_returns_independent_copies(provider):
    first = provider.create("test_resnet", WeightsRequest(pretrained=False))
    second = provider.create("test_resnet", WeightsRequest(pretrained=False))
    assemble(first, HeadConfig("linear"), NUM_CLASSES, frozen_stages=len(first.stages))
    assert all(p.requires_grad for p in second.module.parameters())
    with torch.no_grad():
        next(first.module.parameters()).add_(1.0)
    assert not torch.equal(next(first.module.parameters()), next(second.module.parameters()))


def test_random_init_depends_on_the_request_alone():
    """A fresh provider after other draws gives the same init for the same init_seed (so a second
    search in one process repeats the first); another seed gives another init; the global RNG is
    left as it was."""
    def first_tensor(seed: int) -> torch.Tensor:
        return next(TimmProvider().create("test_resnet", WeightsRequest(False, init_seed=seed)).module.parameters())

    reference = first_tensor(3)
    torch.manual_seed(123)
    torch.rand(7)
    before = torch.random.get_rng_state()
    assert torch.equal(first_tensor(3), reference)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(first_tensor(4), reference)


# --------------------------------------------------------------------------- weights from a local file

def _save_weights(path: Path, state: dict[str, torch.Tensor], fmt: str) -> None:
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    elif fmt == "pth-wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, path)
    else:
        raise AssertionError(fmt)


@pytest.mark.parametrize("fmt, suffix", [("safetensors", ".safetensors"), ("pth", ".pth"),
                                         ("pth-wrapped", ".pth")])
def test_weights_file_is_loaded_exactly(tmp_path, fmt, suffix):
    state = _distinctive_state("test_resnet", seed=1234)
    assert {"fc.weight", "fc.bias"} <= state.keys(), "a real timm checkpoint carries its classifier"
    path = tmp_path / f"weights{suffix}"
    _save_weights(path, state, fmt)

    backbone = TimmProvider().create("test_resnet", WeightsRequest(pretrained=True, file=str(path)))
    assert backbone.source == f"file:{path}"
    loaded = backbone.module.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    # ... and it is really the file's, not what timm would have made anyway.
    random_init = TimmProvider().create("test_resnet", WeightsRequest(pretrained=False)).module.state_dict()
    assert not torch.equal(random_init["conv1.0.weight"], loaded["conv1.0.weight"])
    # The stages still describe the loaded module.
    assert backbone.stages == timm_stages(backbone.module)


def test_read_state_dict_unwraps_envelopes(tmp_path):
    state = {"a.weight": torch.randn(2, 3), "b.bias": torch.randn(4)}
    path = tmp_path / "ema.pth"
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in state.items()}, "model": "ignored"}, path)
    read = read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


# --------------------------------------------------------------------------- Hugging Face cache, offline

HUB_CHECK = """
    import torch
    from safetensors.torch import load_file
    from autotransfer.backbones import TimmProvider, WeightsRequest

    expected = {k: v for k, v in load_file(%(file)r).items()
                if not k.startswith("fc.")}
    backbone = TimmProvider().create(%(model)r, WeightsRequest(pretrained=True))
    loaded = backbone.module.state_dict()
    assert loaded.keys() == expected.keys(), sorted(set(loaded) ^ set(expected))[:5]
    bad = [k for k in expected if not torch.equal(loaded[k], expected[k])]
    assert not bad, bad[:5]
    print("OK", len(loaded), backbone.source)
"""


@pytest.mark.slow
@pytest.mark.parametrize("env", [{}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "hub-unreachable"])
def test_pretrained_weights_from_offline_hf_cache(tmp_path, env):
    """HF_HUB_OFFLINE set, or not set with a hub that cannot be reached: the cached file is loaded,
    without a retried request (backbones/hub.py)."""
    hf_home = tmp_path / "hf"
    file = _hf_cache(hf_home, _distinctive_state("test_resnet", seed=99))
    result = _run_python(HUB_CHECK % {"file": str(file), "model": HUB_MODEL}, hf_home, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Retry" not in result.stderr, result.stderr
    assert result.stdout.split()[:2] == ["OK", str(len(load_file(str(file))) - 2)], result.stdout
    assert "hf-hub:timm/test_resnet.r160_in1k" in result.stdout


@pytest.mark.slow
def test_incomplete_hf_checkpoint_is_refused(tmp_path):
    hf_home = tmp_path / "hf"
    state = _distinctive_state("test_resnet", seed=5)
    _hf_cache(hf_home, {k: v for k, v in state.items() if not k.startswith("layer4.")})
    result = _run_python(f"""
        from autotransfer.backbones import TimmProvider, WeightsRequest
        from autotransfer.errors import WeightsUnavailable
        try:
            TimmProvider().create({HUB_MODEL!r}, WeightsRequest(pretrained=True))
        except WeightsUnavailable as exc:
            print("REFUSED", exc)
        else:
            print("LOADED")
    """, hf_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("REFUSED"), result.stdout


@pytest.mark.slow
def test_offline_with_empty_cache_names_the_ways_out(tmp_path):
    hf_home = tmp_path / "empty-hf"
    hf_home.mkdir()
    result = _run_python(f"""
        from autotransfer.backbones import TimmProvider, WeightsRequest
        from autotransfer.errors import WeightsUnavailable
        try:
            TimmProvider().create({HUB_MODEL!r}, WeightsRequest(pretrained=True))
        except WeightsUnavailable as exc:
            print("RAISED", exc)
        else:
            print("NOT RAISED")
    """, hf_home)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.strip()
    assert out.startswith("RAISED"), out
    assert HUB_MODEL in out
    assert "HF_HUB_OFFLINE" in out
    assert f"--weights {HUB_MODEL}=PATH" in out
    assert "Hugging Face cache" in out
    assert "--no-pretrained" in out
    assert "\n" not in out, "the message must stay one line for the CLI"


# --------------------------------------------------------------------------- errors

def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "efficientnet.safetensors"
    save_file(_distinctive_state("test_efficientnet", seed=3), str(path))
    with pytest.raises(WeightsUnavailable) as info:
        TimmProvider().create("test_resnet", WeightsRequest(pretrained=True, file=str(path)))
    message = str(info.value)
    assert "missing" in message and "unexpected" in message
    assert "test_resnet" in message and str(path) in message


def test_weights_of_another_shape_are_refused(tmp_path):
    state = _distinctive_state("test_resnet", seed=4)
    state["layer1.0.conv1.weight"] = torch.randn(3, 3, 1, 1)
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    with pytest.raises(WeightsUnavailable, match=r"another shape \(e\.g\. layer1\.0\.conv1\.weight"):
        TimmProvider().create("test_resnet", WeightsRequest(pretrained=True, file=str(path)))


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(WeightsUnavailable) as info:
        TimmProvider().create("test_resnet", WeightsRequest(pretrained=True, file=str(path)))
    assert str(path) in str(info.value)


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsUnavailable, match="cannot read weights file"):
        TimmProvider().create("test_resnet", WeightsRequest(pretrained=True, file=str(path)))


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(UserError) as info:
        TimmProvider().describe("resnet18.notatag")
    assert not isinstance(info.value, WeightsUnavailable)
    message = str(info.value)
    assert "resnet18.notatag" in message and "Known tags" in message
    known = [name.split(".", 1)[1] for name in timm.list_pretrained("resnet18.*")]
    assert known and all(tag in message for tag in known)


def test_unknown_backbone_suggests_near_names():
    with pytest.raises(UserError, match=r"did you mean [^)]*resnet18") as info:
        provider_for("resnet1B", registries())
    assert "resnet1B" in str(info.value)
    assert isinstance(provider_for("test_resnet", registries()), TimmProvider)


@pytest.mark.slow
def test_source_classifier_from_offline_hf_cache(tmp_path):
    hf_home = tmp_path / "hf"
    state = _distinctive_state("test_resnet", seed=7)
    file = _hf_cache(hf_home, state)
    result = _run_python(f"""
        import torch
        from safetensors.torch import load_file
        from autotransfer.backbones import TimmProvider, WeightsRequest
        provider = TimmProvider()
        head = provider.source_classifier({HUB_MODEL!r}, WeightsRequest(pretrained=True))
        saved = load_file({str(file)!r})
        features = provider.create({HUB_MODEL!r}, WeightsRequest(pretrained=True))
        assert torch.equal(head.weight, saved["fc.weight"]) and torch.equal(head.bias, saved["fc.bias"])
        assert head.in_features == features.num_features
        assert provider.source_classifier({HUB_MODEL!r}, WeightsRequest(pretrained=False)) is None
        print("OK", head.out_features)
    """, hf_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["OK", str(state["fc.weight"].shape[0])]
