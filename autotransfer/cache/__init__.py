"""The frozen-stage caches: what a trial with frozen stages computes once instead of every epoch.

- `plan` decides which way a trial trains (pooled features, replay from the freeze boundary, or the
  plain path) and owns the caches a search keeps between trials (`TrialCaches`, `CachePolicy`);
- `features` is the disk cache of pooled features (`FeatureCache`, `extract`), shared by fully frozen
  trials, `rank`, `--prerank` and the benchmark's linear probe, under `<out>/FEATURES_DIR`;
- `boundary` runs a backbone from the activation at its freeze boundary, for any architecture,
  verified against the normal forward pass.
"""

from .features import FEATURES_DIR, FeatureCache, FeatureSet, extract, forward_features
from .plan import CachePolicy, TrialCaches, TrialPath, default_cache_memory

__all__ = ["FEATURES_DIR", "CachePolicy", "FeatureCache", "FeatureSet", "TrialCaches", "TrialPath",
           "default_cache_memory", "extract", "forward_features"]
