"""The TikTalk TFDS dataset (configs `dialogues` and `media`); see README.md in this folder.

The builder module (and with it TFDS) is imported lazily: media decoding workers re-import this
package, and they must not pay for importing TFDS/TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

from . import report as report  # stdlib only: load_report / format_report for the demo


def build(
    manual_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    config: str = "dialogues",
    **config_overrides: Any,
):
    """Builds (or reuses) `tiktalk/<config>` as ArrayRecord and returns the builder.

    Args:
      manual_dir: the raw release (layout in README.md).
      data_dir: TFDS data dir; the dataset lands in `<data_dir>/tiktalk/<config>/1.0.0/`.
      config: "dialogues" or "media".
      **config_overrides: fields of `TiktalkConfig` (e.g. `min_likes=5`, `fps=2.0`,
        `num_workers=4`). A dataset already built with other options is rebuilt.

    Returns:
      The prepared `tfds.core.DatasetBuilder`; `builder.as_data_source(split)` reads it.
    """
    from .tiktalk_dataset_builder import build as _build

    return _build(manual_dir, data_dir, config, **config_overrides)


def __getattr__(name: str):
    if name in ("Builder", "TiktalkConfig"):
        from . import tiktalk_dataset_builder

        return getattr(tiktalk_dataset_builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
