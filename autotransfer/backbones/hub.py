"""Whether a timm model's pretrained weights can be had now, decided without downloading them.

The local caches are looked at first (the Hugging Face cache for `hf_hub_id` weights, torch's hub
folder for `url` ones); when the file is not there, one unretried request with a short timeout
asks whether the hub answers at all, once per host and process. So a machine without network fails
in well under a second per backbone instead of waiting through huggingface_hub's retries, and a
machine with the file cached loads it from there without a request that cannot succeed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5.0
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order


@dataclass(frozen=True)
class Availability:
    """`local`: a cached weight file to load instead of asking the hub (None: ask it, or nothing cached);
    `missing`: why the weights cannot be had (None: they can)."""

    local: str | None
    missing: str | None


def availability(cfg: dict) -> Availability:
    """Where the pretrained weights of a timm pretrained config `cfg` will come from, or why they cannot."""
    local = cached_file(cfg)
    target = _probe_target(cfg)
    offline = _offline()
    down = offline or (probe(target) if target else "no hub address in the pretrained config")
    if local is not None:
        return Availability(local if down else None, None)
    if cfg.get("file"):
        return Availability(None, f"its pretrained config names the file {cfg['file']}, which does not exist")
    if down is None:
        return Availability(None, None)
    place = cfg.get("hf_hub_id") or cfg.get("url")
    if offline:
        return Availability(None, f"{offline} and {place} is not in the Hugging Face cache ({_hf_cache()})")
    return Availability(None, f"{place} is not in the local cache and the hub cannot be reached ({down})")


def cached_file(cfg: dict) -> str | None:
    """The weight file already on this machine for `cfg`, or None."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        names = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HF_FILENAMES
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    if cfg.get("url"):
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg["url"]).path))
        return path if os.path.isfile(path) else None
    return None


@lru_cache(maxsize=None)
def probe(url: str) -> str | None:
    """None when `url`'s host answers one HEAD request (any status), else why not; never retried."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # DNS, refused, timeout, proxy: the reason is all a user needs
        text = " ".join(str(exc).split())[:160]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return None


def _probe_target(cfg: dict) -> str | None:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return constants.ENDPOINT
    if cfg.get("url"):
        parts = urlparse(cfg["url"])
        return f"{parts.scheme}://{parts.netloc}/"
    return None


def _offline() -> str | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return None


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
