"""A plugin that plays the other worker of a late-heartbeat takeover, deterministically.

After trial 0's first epoch it does what `fail_stale_trials` in another worker does when this
worker's heartbeats are late (a frozen or overloaded machine): fail the trial in the storage and
queue its retry. The worker that ran it must notice, drop its work and go on.
"""

from __future__ import annotations

import warnings

import optuna

from autotransfer.hookspecs import hookimpl


@hookimpl
def autotransfer_epoch_ended(trial, epoch) -> None:
    if trial.number != 0 or epoch.epoch != 1:
        return
    study = optuna.load_study(study_name=trial.study_name, storage=trial.storage)
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(trial_id))
