"""clipforge: image-caption URL lists to trained and evaluated CLIP-style models.

Importing clipforge changes nothing in the process: environment defaults (offline model hubs, local Ray
settings) are applied by the entry points, see `clipforge.runtime.environment`.
"""

__version__ = "0.1.0"
