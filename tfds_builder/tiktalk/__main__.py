"""`python -m tfds_builder.tiktalk --manual_dir=DIR --config=dialogues [--data_dir=D]`.

Runs TFDS's own `tfds build` command on this dataset folder (same flags, ArrayRecord unless
--file_format is given). It exists because the `tfds` script of tensorflow-datasets 4.9.10
imports apache_beam at startup (for `tfds convert_format`), so `tfds build` fails wherever Beam
is not installed; where it is, `tfds build tfds_builder/tiktalk ...` does the same thing.
"""

from __future__ import annotations

import pathlib
import sys


def _parse(argv: list[str]):
    from tensorflow_datasets.scripts.cli import build as tfds_build
    from tensorflow_datasets.scripts.cli import cli_utils

    args = list(argv[1:])
    if not any(a == "--file_format" or a.startswith("--file_format=") for a in args):
        args.append("--file_format=array_record")
    parse = cli_utils.make_flags_parser(tfds_build.Args, description=__doc__.splitlines()[0])
    return parse([argv[0], str(pathlib.Path(__file__).resolve().parent), *args])


def main(args) -> None:
    from absl import logging

    logging.set_verbosity(logging.INFO)
    args.execute()


if __name__ == "__main__":
    from absl import app

    sys.exit(app.run(main, flags_parser=_parse))
