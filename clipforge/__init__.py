"""clipforge: image-caption URL lists to trained and evaluated CLIP-style models.

Importing clipforge sets a few environment defaults that make it work offline and on
small local Ray clusters without any manual setup; explicit user settings always win.
"""
import os as _os

__version__ = "0.1.0"

_DEFAULTS = {
    # Local clusters started by clipforge need no token; users' clusters keep their own setting.
    "RAY_AUTH_MODE": "disabled",
    # img2dataset imports albumentations, which otherwise phones home for updates.
    "NO_ALBUMENTATIONS_UPDATE": "1",
    # Pretrained towers are loaded from local files; never try a model hub at run time.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray's usage stats and dashboard are not needed by jobs and cost start-up time on small machines.
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _k, _v in _DEFAULTS.items():
    _os.environ.setdefault(_k, _v)
