"""Where things are: the checkout, the bundled models, the default model (no heavy imports: the CLI's
help texts read these without loading torch)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = Path(os.environ.get("ATTNEDIT_MODELS", REPO_ROOT / "assets" / "models"))
TINY_PREFIX = "tiny-"
DEFAULT_MODEL = "shapes-sd"
