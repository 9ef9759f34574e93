"""The Qwen family catalog, the memory planner and model selection.

Contract: load_catalog() gives the reviewed, validated catalog (data in models.yaml); planner.plan()
turns a model shape, a weight format, a workload and a device into a memory breakdown and a verdict;
select.select_models() ranks catalog models for a task on a device. Nothing here downloads anything.
"""

from qwenkit.catalog.formats import WeightFormat, parse_format
from qwenkit.catalog.schema import TASKS, Catalog, CatalogError, Entry, load_catalog
from qwenkit.catalog.shape import ModelShape, ShapeError

__all__ = [
    "TASKS",
    "Catalog",
    "CatalogError",
    "Entry",
    "ModelShape",
    "ShapeError",
    "WeightFormat",
    "load_catalog",
    "parse_format",
]
