"""ml_collections config files: `--config=configs/<file>.py:<arg>` (see configs/common.py)."""
