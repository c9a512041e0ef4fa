"""Run a backbone from the activation at its freeze boundary, for any architecture, verified.

With the first k stages frozen (and held in eval mode), everything a backbone computes before its
first trainable module is a fixed function of the input image. A partly frozen trial can compute
that module's input once per augmented view and, every epoch, run only the rest of the network.

Nothing here knows an architecture. A probe pass with hooks records the order in which modules
are called; the boundary is the first module whose call involves only trainable parameters. In
replay, the modules called before it return NaN placeholders of the recorded shapes (one NaN
expanded, so they cost nothing; anything that still depended on them would show up as NaN), and a pre-hook hands the cached activation to
the boundary module. Every boundary is checked on real images against the normal forward pass;
any model that does not fit (several inputs, trainable parameters feeding the boundary, a result
that differs) raises `NoBoundary` with the reason, and the trial runs the plain path instead.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

PROBE_BATCH = 2  # the probe and the check use different batch sizes, so a wrongly guessed batch dim fails
CHECK_BATCH = 3


class NoBoundary(Exception):
    """This backbone cannot be replayed from a boundary activation; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Call:
    name: str
    module: nn.Module
    enter: int
    exit: int = -1
    single_input: bool = False
    input_needs_grad: bool = False
    input_shape: tuple[int, ...] = ()
    output: Any = None  # the output's structure with TensorSpec leaves


@dataclass
class Boundary:
    """Where the trainable part of a backbone starts, and what runs before it."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]  # one example's activation (the boundary module's input)
    image_shape: tuple[int, ...]  # one example's image, (3, H, W)
    stubs: dict[nn.Module, list[Any]] = field(default_factory=dict)  # outermost modules before it: outputs per call
    stub_names: tuple[str, ...] = ()  # the stubs' module names, in the same order
    order: int = 0  # when the boundary module is entered in a forward pass: later boundaries are deeper

    def bytes_per_example(self, dtype: torch.dtype) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=dtype).element_size()

    def on(self, backbone: nn.Module) -> "Boundary":
        """The same boundary on another instance of the architecture (looked up by module name)."""
        modules = dict(backbone.named_modules())
        stubs = {modules[name]: outputs for name, outputs in zip(self.stub_names, self.stubs.values())}
        return Boundary(self.name, modules[self.name], self.shape, self.image_shape, stubs, self.stub_names, self.order)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule in eval mode, then each back in its own mode (a TransferModel keeps its
    frozen stages in eval mode while the rest trains; a plain `.train(True)` would undo that)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------- finding it

def _spec(value: Any) -> Any:
    return TensorSpec(tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value


def probe(backbone: nn.Module, images: torch.Tensor) -> list[_Call]:
    """Every module call of one eval-mode forward pass, in call order, with gradients recorded."""
    calls: list[_Call] = []
    stack: list[_Call] = []
    clock = itertools.count()

    def before(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        call = _Call(name, module, next(clock), single_input=len(args) == 1 and not kwargs and len(tensors) == 1,
                     input_needs_grad=any(t.requires_grad for t in tensors),
                     input_shape=tuple(tensors[0].shape) if tensors else ())
        stack.append(call)
        calls.append(call)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        call = stack.pop()
        call.exit = next(clock)
        call.output = tree_map(_spec, output)

    handles = []
    for name, module in backbone.named_modules():
        handles.append(module.register_forward_pre_hook(partial(before, name), with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    try:
        with eval_mode(backbone), torch.enable_grad():
            backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _only_trainable(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def _has_frozen(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def find_boundary(backbone: nn.Module, images: torch.Tensor) -> Boundary:
    """The first module whose call involves only trainable parameters, and the calls before it.

    `images`: a normalised batch of PROBE_BATCH images as the backbone takes them.
    """
    calls = probe(backbone, images)
    chosen = None
    for i, call in enumerate(calls):
        inner = itertools.takewhile(lambda c: c.enter < call.exit, calls[i + 1:])
        if _only_trainable(call.module) and not any(_has_frozen(c.module) for c in inner):
            chosen = call
            break
    if chosen is None or chosen.name == "":
        raise NoBoundary("no module after the frozen stages takes only trainable parameters")
    if sum(c.module is chosen.module for c in calls) != 1:
        raise NoBoundary(f"boundary module {chosen.name} runs more than once per forward pass")
    if not chosen.single_input:
        raise NoBoundary(f"boundary module {chosen.name} takes more than one input")
    if chosen.input_needs_grad:
        raise NoBoundary(f"trainable parameters feed the input of boundary module {chosen.name}")
    if chosen.input_shape[:1] != (len(images),):
        raise NoBoundary(f"the input of boundary module {chosen.name} is not batch-first")
    stubs: dict[nn.Module, list[Any]] = {}
    names: dict[nn.Module, str] = {}
    outer_exit = -1
    for call in calls:
        if call.exit >= chosen.enter:
            continue
        if call.enter > outer_exit:  # not nested in a call already stubbed
            stubs.setdefault(call.module, []).append(call.output)
            names.setdefault(call.module, call.name)
            outer_exit = call.exit
    return Boundary(chosen.name, chosen.module, chosen.input_shape[1:], tuple(images.shape[1:]), stubs,
                    tuple(names[module] for module in stubs), chosen.enter)


# --------------------------------------------------------------------------- using it

class _Reached(Exception):
    pass


@torch.no_grad()
def capture(backbone: nn.Module, boundary: Boundary, images: torch.Tensor) -> torch.Tensor:
    """The boundary module's input for `images`, running only what comes before it, in eval mode."""
    return _input_of(backbone, boundary, lambda: backbone(images))


@torch.no_grad()
def capture_from(backbone: nn.Module, source: Boundary, activation: torch.Tensor, target: Boundary) -> torch.Tensor:
    """`target`'s input computed from `source`'s cached `activation` (a shallower boundary of the
    same backbone): only the modules between the two run. Callers check the result once against
    `capture` from images, since a module between them might read something `source` skipped."""
    with Replay(backbone, source) as replay:
        return _input_of(backbone, target, lambda: replay.run(activation))


def _input_of(backbone: nn.Module, boundary: Boundary, forward) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Reached

    handle = boundary.module.register_forward_pre_hook(stop)
    try:
        with eval_mode(backbone):
            forward()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise NoBoundary(f"boundary module {boundary.name} was not called")
    return seen[0]


class Replay:
    """While entered, `run(activation)` evaluates the backbone from the boundary on: the modules
    before it return placeholders and the boundary module takes `activation` as its input."""

    def __init__(self, backbone: nn.Module, boundary: Boundary):
        self.backbone, self.boundary = backbone, boundary
        self.activation: torch.Tensor | None = None
        self._counts: dict[nn.Module, int] = {}
        self._handles: list = []

    def __enter__(self) -> "Replay":
        self._handles = [self.backbone.register_forward_pre_hook(lambda module, args: self._counts.clear(),
                                                                  prepend=True),
                         self.boundary.module.register_forward_pre_hook(lambda module, args: (self.activation,))]
        for module, outputs in self.boundary.stubs.items():
            module.forward = partial(self._stubbed, module, module.forward, outputs)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self.boundary.stubs:
            del module.forward

    @contextlib.contextmanager
    def suspended(self):
        """The backbone as it normally runs, for a while (e.g. to compute more activations)."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def _stubbed(self, module: nn.Module, original, outputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        index = self._counts.get(module, 0)
        self._counts[module] = index + 1
        if index >= len(outputs):  # a module shared with the part after the boundary
            return original(*args, **kwargs)
        return tree_map(self._placeholder, outputs[index])

    def _placeholder(self, spec: Any) -> Any:
        if not isinstance(spec, TensorSpec):
            return spec
        shape = (len(self.activation), *spec.shape[1:]) if spec.shape[:1] == (PROBE_BATCH,) else spec.shape
        fill = float("nan") if spec.dtype.is_floating_point else 0
        # one element seen at every index: nothing to allocate or write per step, and still NaN if read
        return torch.full((), fill, dtype=spec.dtype, device=self.activation.device).expand(shape)

    def run(self, activation: torch.Tensor) -> torch.Tensor:
        self.activation = activation
        try:
            images = torch.full((), float("nan"), device=activation.device).expand(len(activation),
                                                                                    *self.boundary.image_shape)
            return self.backbone(images)
        finally:
            self.activation = None


class ReplayedModel(nn.Module):
    """A TransferModel fed boundary activations instead of images (its parameters, its modes)."""

    def __init__(self, model: nn.Module, replay: Replay):
        super().__init__()
        self.model = model
        self.replay = replay

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.replay.run(activation))


def verified_boundary(backbone: nn.Module, images: torch.Tensor) -> Boundary:
    """`find_boundary`, then proof on CHECK_BATCH images that replay reproduces the forward pass."""
    boundary = find_boundary(backbone, images[:PROBE_BATCH])
    check = images[:CHECK_BATCH]
    try:
        with eval_mode(backbone), torch.no_grad():
            expected = backbone(check)
            activation = capture(backbone, boundary, check)
            with Replay(backbone, boundary) as replay:
                got = replay.run(activation)
    except NoBoundary:
        raise
    except Exception as exc:
        raise NoBoundary(f"replay from {boundary.name} failed: {type(exc).__name__}: {exc}") from None
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5):
        raise NoBoundary(f"replay from {boundary.name} does not reproduce the forward pass")
    return boundary
