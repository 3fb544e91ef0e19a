"""torchtitan integration: importing this package registers the "optical_transformer" converter,
the "optical_llama3" TrainSpec and the offline datasets."""

from torchtitan_ext import data as _data  # noqa: F401  (registers datasets)

from . import converter as _converter  # noqa: F401  (registers the converter)
from . import spec as _spec  # noqa: F401  (registers the TrainSpec)
from .converter import CONVERTER_NAME
from .spec import SPEC_NAME

__all__ = ["CONVERTER_NAME", "SPEC_NAME"]
