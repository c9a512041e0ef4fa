"""TensorBoard logging: per-trial curves plus an HParams summary so trials compare side by side."""

from __future__ import annotations

from pathlib import Path

from .trainer import EpochStats

METRIC = "hparams/val_accuracy"


class TrialLog:
    """One TensorBoard run per trial: `tensorboard/trial_0007`."""

    def __init__(self, root: Path, trial_number: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(root) / f"trial_{trial_number:04d}"))

    def epoch(self, stats: EpochStats) -> None:
        self.writer.add_scalar("train/loss", stats.train_loss, stats.epoch)
        self.writer.add_scalar("val/accuracy", stats.val_accuracy, stats.epoch)
        self.writer.add_scalar("lr", stats.lr, stats.epoch)
        self.writer.add_scalar("epoch_seconds", stats.seconds, stats.epoch)

    def finish(self, hparams: dict, val_accuracy: float | None, state: str) -> None:
        """Write the HParams plugin summary into this run, so it lines up with its curves."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()
                 if v is not None}
        clean["state"] = state
        metrics = {METRIC: float("nan") if val_accuracy is None else float(val_accuracy)}
        experiment, start, end = hparams_summary(clean, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value)
        self.writer.close()
