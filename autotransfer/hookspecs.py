"""Hook specifications: the contract between autotransfer and its plugins.

The built-in datasets, backbones and scorers register through these very hooks
(``autotransfer.builtin``), so an outside package can do anything a built-in does. Implement a
hook with ``@autotransfer.hookspecs.hookimpl`` in a module named by the entry-point group
``autotransfer``, by ``--plugin`` or by ``AUTOTRANSFER_PLUGINS``. The guide is ``docs/plugins.md``.

Registration hooks (``*_sources``, ``*_providers``, ``autotransfer_scorers``) are called once,
when the registries are built, and return lists; a name registered twice is an error naming
both plugins. Lifecycle hooks (``autotransfer_trial_*``, ``autotransfer_epoch_ended``) are
called in the process that trains the trial; their return value is ignored, and an exception
in one is reported as a warning and does not fail the trial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .events import TrialEvent
    from .trainer import EpochStats

PROJECT = "autotransfer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration

@hookspec
def autotransfer_dataset_sources() -> list:
    """Return dataset sources this plugin can read.

    Each source is an object with ``name: str`` (unique; shown by ``autotransfer plugins``),
    ``can_load(uri: str) -> bool`` (cheap: look at the string or a file header, no decoding) and
    ``load(uri: str) -> autotransfer.data.LabelledRefs``: the images as files, encoded bytes or
    uint8 arrays, integer labels, class names, and optionally a train/val/test split per image
    (test: fixed by the source, scored once after the choice, never seen while choosing); or a
    map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs, read once into that form.
    A source may also list ``datasets`` (URIs it serves by name, such as ``builtin:digits``).
    The first source whose ``can_load`` accepts ``--dataset`` reads it; plugins are asked before
    the built-ins, so a plugin can claim a folder layout the built-in folder source would misread.
    Raise ``autotransfer.errors.UserError`` for bad input: it becomes a one-line error, exit 2.
    """


@hookspec
def autotransfer_backbone_providers() -> list:
    """Return backbone providers this plugin serves.

    Each provider is an object with ``name: str``, ``matches(model_name: str) -> bool``,
    ``describe(model_name) -> autotransfer.backbones.BackboneInfo`` (cheap: no weights; stage
    count, feature width, preprocessing) and ``create(model_name, weights:
    autotransfer.backbones.WeightsRequest) -> autotransfer.backbones.Backbone``: a module mapping
    images to pooled features ``(N, num_features)``, its coarse stage groups (parameter names,
    stem first, as ``timm_stages`` derives from ``group_matcher(coarse=True)``) and its
    preprocessing. Optionally ``names: tuple[str, ...]`` (listed by ``autotransfer plugins``)
    and ``source_classifier(model_name, weights) -> torch.nn.Module | None``, the pretrained
    head (features -> source logits) used by source-label scorers. ``create`` is called once
    per trial and must return fresh parameters (``CachedProvider`` does this for you). Plugins
    are consulted before the built-in timm provider.
    """


@hookspec
def autotransfer_scorers() -> list:
    """Return task-similarity scorers (``autotransfer.scorers.Scorer``).

    A scorer has a ``name``, a ``requires`` set (empty, or ``{"source_probs"}`` for scorers that
    need the backbone's source-classifier probabilities), a one-line ``description`` and a
    function ``fn(features: np.ndarray (N, D) float, labels: np.ndarray (N,) int,
    source_probs: np.ndarray (N, C_source) | None) -> float`` where higher means the backbone
    should transfer better. It is called once per (backbone, dataset) with the pooled features
    of one forward pass; ``autotransfer.scorers.score`` checks the requirements first.
    """


# --------------------------------------------------------------------------- trial lifecycle

@hookspec
def autotransfer_trial_started(trial: "TrialEvent") -> None:
    """A trial's parameters are drawn and its model is about to be built.

    ``trial`` carries the study name, the storage URL, the trial number, the drawn parameters
    and the run folder. Use it to open a run in your own tracker or to send a notification.
    """


@hookspec
def autotransfer_epoch_ended(trial: "TrialEvent",
                             epoch: "EpochStats") -> None:
    """An epoch finished and was validated, before the pruner decides on the trial.

    ``epoch`` has ``epoch`` (1-based), ``train_loss``, ``val_accuracy``, ``lr`` and ``seconds``.
    """


@hookspec
def autotransfer_trial_finished(trial: "TrialEvent", state: str,
                                value: float | None, reason: str | None) -> None:
    """A trial ended: ``state`` is ``COMPLETE``, ``PRUNED`` or ``FAIL``; ``value`` is the final
    validation accuracy when complete; ``reason`` says why it was pruned or failed.
    """
