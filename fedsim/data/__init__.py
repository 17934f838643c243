"""Datasets (``REGISTRY``) and partitions (``PARTITIONS``)."""

from fedsim.data.partition import PARTITIONS, pack, partition
from fedsim.data.sources import REGISTRY, Dataset, load

__all__ = ["PARTITIONS", "REGISTRY", "Dataset", "load", "pack", "partition"]
