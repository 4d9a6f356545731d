"""The source a config names: one dispatch over ``data.source`` (``raydino.config.registry.DATA_SOURCES``)."""

from __future__ import annotations

from raydino.config import DataConfig
from raydino.config.registry import DATA_SOURCES
from raydino.data.embedded import load_embedded
from raydino.data.shards import shard_source
from raydino.data.sources import ImageSource, array_dataset, image_directory_dataset, imagefolder_dataset


def source_from_config(data: DataConfig, split: str = "train", seed: int = 0) -> ImageSource:
    """The source a DataConfig names; ``split`` applies to the embedded sets only."""
    info = DATA_SOURCES[data.source]
    if info.embedded:
        return array_dataset(load_embedded(data.source, split, data.crops.global_size, seed))
    assert data.path is not None  # DataConfig validates this
    if data.source == "shards":
        return shard_source(data.path, seed, data.max_files)
    make = imagefolder_dataset if info.labelled else image_directory_dataset
    return make(data.path, data.max_files, seed)
