"""TFDS template test of the TikTalk builder over dummy_data/ (both configs).

`DatasetBuilderTestCase` reads splits back with `as_dataset` (tf.data), which only reads TFRecord,
so the builder is made with file_format="tfrecord" here; ArrayRecord + `tfds.data_source` is
covered by tests/test_tfds_build.py.
"""

import tensorflow_datasets as tfds

from tfds_builder.tiktalk import tiktalk_dataset_builder


class _TiktalkTestCase(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tiktalk_dataset_builder.Builder
    SKIP_CHECKSUMS = True  # manual download: no URLs

    def _make_builder(self, config=None):
        # In-process decoding: the template test checks records, not the process pool.
        return self.DATASET_CLASS(
            data_dir=self.tmp_dir,
            config=config,
            version=self.VERSION,
            file_format="tfrecord",
            config_overrides={"num_workers": 1},
        )


class TiktalkDialoguesTest(_TiktalkTestCase):
    BUILDER_CONFIG_NAMES_TO_TEST = ["dialogues"]
    SPLITS = {"train": 4, "val": 1, "test": 1}


class TiktalkMediaTest(_TiktalkTestCase):
    BUILDER_CONFIG_NAMES_TO_TEST = ["media"]
    SPLITS = {"train": 2, "val": 1, "test": 1}


del _TiktalkTestCase  # only the concrete test cases are collected


if __name__ == "__main__":
    tfds.testing.test_main()
