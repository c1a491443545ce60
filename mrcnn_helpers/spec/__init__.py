"""TLT Mask R-CNN spec files: schema, strict loader, validation, formatting.

    spec = load_spec("specs/demo_synthetic.txt")        # validated, frozen ExperimentSpec
    spec = validate_spec(dataclasses.replace(spec, total_steps=10))
    print(format_spec(spec))                            # fully resolved, same text format

A spec is protobuf text format with top-level experiment fields and two blocks, `data_config { }`
and `maskrcnn_config { }`, using TLT's field names and value syntax, so TLT specs load unchanged.
Fields TLT/TAO have that do nothing here are accepted with a SpecWarning when set (see
schema.IGNORED_FIELDS); fields TLT lacks are marked "ours" in config.py.
"""

from mrcnn_helpers.errors import SpecError

from .config import DataConfig, ExperimentSpec, MaskRCNNConfig
from .errors import SpecFieldError, SpecWarning
from .format import format_spec, spec_table
from .loader import load_spec, parse_spec
from .schema import IGNORED_FIELDS, OUR_FIELDS, PATH_FIELDS
from .validate import check_num_classes, replace_spec, validate_spec

__all__ = [
    "IGNORED_FIELDS",
    "OUR_FIELDS",
    "PATH_FIELDS",
    "DataConfig",
    "ExperimentSpec",
    "MaskRCNNConfig",
    "SpecError",
    "SpecFieldError",
    "SpecWarning",
    "check_num_classes",
    "format_spec",
    "load_spec",
    "parse_spec",
    "replace_spec",
    "spec_table",
    "validate_spec",
]
