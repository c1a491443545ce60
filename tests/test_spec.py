"""Tests of mrcnn_helpers.spec: schema, strict loader, validation, formatting, shipped specs."""

import dataclasses
import warnings
from pathlib import Path

import pytest

from mrcnn_helpers.errors import SpecError
from mrcnn_helpers.spec import (
    DataConfig,
    ExperimentSpec,
    MaskRCNNConfig,
    SpecWarning,
    check_num_classes,
    format_spec,
    load_spec,
    parse_spec,
    replace_spec,
    spec_table,
    validate_spec,
)

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"

# The three spec snippets of the TLT 2.0 Mask R-CNN post, exactly as published: indented with
# non-breaking spaces (U+00A0, what copying from the web page gives), and with the value of
# training_file_pattern broken across two lines by the page layout.
SEED_EXPERIMENT = """use_amp: False
warmup_steps: 1000
checkpoint: "$PRETRAINED_MODEL_PATH"
learning_rate_steps: "[60000, 80000, 90000]"
learning_rate_decay_levels: "[0.1, 0.01, 0.001]"
total_steps: 100000
train_batch_size: 3
eval_batch_size: 8
num_steps_per_eval: 10000
momentum: 0.9
l2_weight_decay: 0.00002
warmup_learning_rate: 0.0001
init_learning_rate: 0.02"""

SEED_DATA_CONFIG = """data_config{
        image_size: "(832, 1344)"
        augment_input_data: True
        eval_samples: 5000
        training_file_pattern: "
$DATA_DIR/train*.tfrecord"
        validation_file_pattern: "$DATA_DIR/val*.tfrecord"
        val_json_file: "$DATA_DIR/annotations/instances_val2017.json"
        num_classes: 91
        skip_crowd_during_training: True
}"""

SEED_MASKRCNN_CONFIG = """maskrcnn_config {
        nlayers: 50
        arch: "resnet"
        freeze_bn: True
        freeze_blocks: "[0,1]"
        gt_mask_size: 112
       
        # Region Proposal Network
        rpn_positive_overlap: 0.7
        rpn_negative_overlap: 0.3
        rpn_batch_size_per_im: 256
        rpn_fg_fraction: 0.5
        rpn_min_size: 0.
 
        # Proposal layer.
        batch_size_per_im: 512
        fg_fraction: 0.25
        fg_thresh: 0.5
        bg_thresh_hi: 0.5
        bg_thresh_lo: 0.
 
        # Faster-RCNN heads.
        fast_rcnn_mlp_head_dim: 1024
        bbox_reg_weights: "(10., 10., 5., 5.)"
 
        # Mask-RCNN heads.
        include_mask: True
        mrcnn_resolution: 28
 
        # training
        train_rpn_pre_nms_topn: 2000
        train_rpn_post_nms_topn: 1000
        train_rpn_nms_threshold: 0.7
 
        # evaluation
        test_detections_per_image: 100
        test_nms: 0.5
        test_rpn_pre_nms_topn: 1000
        test_rpn_post_nms_topn: 1000
        test_rpn_nms_thresh: 0.7
 
        # model architecture
        min_level: 2
        max_level: 6
        num_scales: 1
        aspect_ratios: "[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]"
        anchor_scale: 8
 
        # localization loss
        rpn_box_loss_weight: 1.0
        fast_rcnn_box_loss_weight: 1.0
        mrcnn_weight_loss_mask: 1.0
}"""

SEED_SPEC = f"{SEED_EXPERIMENT}\n\n{SEED_DATA_CONFIG}\n\n{SEED_MASKRCNN_CONFIG}\n"


@pytest.fixture
def seed_env(monkeypatch):
    """The environment variables the post's spec refers to."""
    monkeypatch.setenv("PRETRAINED_MODEL_PATH", "/models/resnet50.hdf5")
    monkeypatch.setenv("DATA_DIR", "/data/coco")


def parse_quiet(text: str, source: str = "specs/x.txt") -> ExperimentSpec:
    """parse_spec without the SpecWarnings that minimal test snippets draw (freeze_bn, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        return parse_spec(text, source=source)


def spec_error(text: str, source: str = "specs/x.txt") -> str:
    with pytest.raises(SpecError) as info:
        parse_quiet(text, source)
    return str(info.value)


# --- shipped specs and the seed spec -------------------------------------------------------------

SHIPPED = sorted(SPECS_DIR.glob("*.txt"))


def test_specs_dir_has_the_two_shipped_specs():
    assert {p.name for p in SHIPPED} >= {"maskrcnn_coco_resnet50.txt", "demo_synthetic.txt"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_loads_without_warnings_and_round_trips(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shipped specs must not draw SpecWarnings
        spec = load_spec(path)
        assert spec.source == str(path)
        assert parse_spec(format_spec(spec)) == spec


def test_demo_spec_values():
    spec = load_spec(SPECS_DIR / "demo_synthetic.txt")
    d, m = spec.data_config, spec.maskrcnn_config
    assert d.image_size == (128, 128) and d.num_classes == 4 and d.max_num_instances == 20
    assert d.train_json_file == "data/synthetic/annotations/instances_train.json"
    assert d.val_image_dir == "data/synthetic/val"
    assert (m.nlayers, m.freeze_bn, m.freeze_blocks, m.anchor_scale) == (10, False, (), 2.0)
    assert (m.min_level, m.max_level, m.mrcnn_resolution) == (3, 6, 16)
    assert spec.learning_rate_steps == (480, 590)
    assert spec.learning_rate_decay_levels == (0.1, 0.01)
    assert spec.checkpoint == "" and spec.total_steps == 640


def test_coco_spec_matches_seed_values(seed_env):
    coco = load_spec(SPECS_DIR / "maskrcnn_coco_resnet50.txt")
    seed = parse_quiet(SEED_SPEC.replace('"\n$DATA_DIR/train', '"$DATA_DIR/train'))
    assert coco.maskrcnn_config == seed.maskrcnn_config
    differ = {f.name for f in dataclasses.fields(ExperimentSpec)
              if getattr(coco, f.name) != getattr(seed, f.name)}
    assert differ == {"checkpoint", "data_config", "source"}
    assert coco.checkpoint == "torchvision://maskrcnn_resnet50_fpn_coco"
    assert coco.data_config.train_image_dir == "data/coco/train2017"
    assert coco.data_config.val_json_file == "data/coco/annotations/instances_val2017.json"


def test_seed_spec_as_posted_points_at_the_line_broken_string(seed_env):
    assert "\xa0" in SEED_SPEC  # the post's indentation: keep it, the loader must cope
    message = spec_error(SEED_SPEC, "tlt_post.txt")
    assert message.startswith("tlt_post.txt:19:32: ")
    assert "data_config.training_file_pattern" in message and "not closed" in message


def test_seed_spec_parses_with_its_values(seed_env):
    spec = parse_quiet(SEED_SPEC.replace('"\n$DATA_DIR/train', '"$DATA_DIR/train'))
    assert spec.use_amp is False and spec.warmup_steps == 1000
    assert spec.checkpoint == "/models/resnet50.hdf5"
    assert spec.learning_rate_steps == (60000, 80000, 90000)
    assert spec.learning_rate_decay_levels == (0.1, 0.01, 0.001)
    assert (spec.total_steps, spec.train_batch_size, spec.eval_batch_size) == (100000, 3, 8)
    assert spec.l2_weight_decay == 0.00002 and spec.init_learning_rate == 0.02
    d, m = spec.data_config, spec.maskrcnn_config
    assert d.image_size == (832, 1344) and d.num_classes == 91 and d.eval_samples == 5000
    assert d.training_file_pattern == "/data/coco/train*.tfrecord"
    assert d.val_json_file == "/data/coco/annotations/instances_val2017.json"
    assert m.freeze_blocks == (0, 1) and m.freeze_bn is True and m.nlayers == 50
    assert m.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert m.aspect_ratios == ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    assert m.rpn_min_size == 0.0 and m.bg_thresh_lo == 0.0 and m.anchor_scale == 8.0
    assert (m.test_rpn_pre_nms_topn, m.test_rpn_post_nms_topn, m.mrcnn_resolution) == (
        1000, 1000, 28)


def test_defaults_are_the_seed_values(seed_env):
    # Every field the post sets has the post's value as its default.
    seed = parse_quiet(SEED_SPEC.replace('"\n$DATA_DIR/train', '"$DATA_DIR/train'))
    assert seed.maskrcnn_config == MaskRCNNConfig()
    assert dataclasses.replace(seed, checkpoint="") == dataclasses.replace(
        ExperimentSpec(), data_config=seed.data_config)
    assert parse_quiet("") == ExperimentSpec()


# --- unknown fields, types, list strings ---------------------------------------------------------

def test_typo_gives_line_column_and_suggestion():
    text = "total_steps: 10\nmaskrcnn_config {\n  nlayers: 18\n  mrcnn_resolutoin: 28\n}\n"
    message = spec_error(text)
    assert message.startswith("specs/x.txt:4:3: unknown field 'mrcnn_resolutoin' in "
                              "maskrcnn_config")
    assert "did you mean 'mrcnn_resolution'?" in message


def test_typo_of_a_field_from_another_block_names_that_block():
    message = spec_error("maskrcnn_config {\n        init_learning_rat: 0.01\n}\n")
    assert message.startswith("specs/x.txt:2:9: unknown field 'init_learning_rat' in "
                              "maskrcnn_config")
    assert "did you mean 'init_learning_rate'?" in message and "top-level" in message


def test_field_in_the_wrong_block_says_where_it_belongs():
    message = spec_error("num_classes: 3\n")
    assert message.startswith("specs/x.txt:1:1: unknown field 'num_classes'")
    assert "belongs in data_config" in message


def test_misspelled_block_name():
    assert "did you mean 'data_config'?" in spec_error("dataconfig {\n  num_classes: 3\n}\n")


@pytest.mark.parametrize("text, position, fragments", [
    ('total_steps: "100"\n', "1:14", ['total_steps = "100"', "integer", "total_steps: 100000"]),
    ("total_steps: 1.5\n", "1:14", ["total_steps = 1.5", "integer"]),
    ("total_steps: -5\n", "1:14", ["total_steps = -5", "non-negative integer"]),
    ("use_amp: yes\n", "1:10", ["use_amp = yes", "boolean"]),
    ("momentum: fast\n", "1:11", ["momentum = fast", "number"]),
    ("data_config {\n  image_size: (832, 1344)\n}\n", "2:15",
     ["data_config.image_size = (832, 1344)", "quoted string", 'image_size: "(832, 1344)"']),
    ("data_config: 3\n", "1:14", ["data_config is a block"]),
    ("total_steps { }\n", "1:13", ["total_steps is a single value"]),
])
def test_wrong_type_names_field_value_and_expected_type(text, position, fragments):
    message = spec_error(text)
    assert message.startswith(f"specs/x.txt:{position}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("text, fragments", [
    ('data_config { image_size: "(832, 1344, 3)" }',
     ["data_config.image_size", "tuple of 2 integers", 'e.g. image_size: "(832, 1344)"']),
    ('data_config { image_size: "832x1344" }', ["data_config.image_size", "not a literal"]),
    ('learning_rate_steps: "[60000, 80000"', ["learning_rate_steps", "list of integers",
                                              '"[60000, 80000, 90000]"']),
    ('learning_rate_steps: "[60000.5]"', ["learning_rate_steps", "reads as [60000.5]"]),
    ('maskrcnn_config { aspect_ratios: "[(1.0, 1.0, 2.0)]" }',
     ["maskrcnn_config.aspect_ratios", "(number, number) tuples"]),
    ('maskrcnn_config { bbox_reg_weights: "(10., 10., 5.)" }',
     ["maskrcnn_config.bbox_reg_weights", "tuple of 4 numbers", '"(10.0, 10.0, 5.0, 5.0)"']),
    ('maskrcnn_config { freeze_blocks: "[True]" }', ["maskrcnn_config.freeze_blocks"]),
])
def test_bad_list_string_names_field_and_shows_valid_example(text, fragments):
    message = spec_error(text)
    assert message.startswith("specs/x.txt:1:")
    for fragment in fragments:
        assert fragment in message


def test_list_strings_are_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    message = spec_error(f'learning_rate_steps: "{payload}"\n')
    assert "learning_rate_steps" in message and "nothing is evaluated" in message
    assert not marker.exists()
    assert "learning_rate_steps" in spec_error(
        "learning_rate_steps: \"__import__('os').system('x')\"\n")


def test_duplicate_field_and_unclosed_block():
    assert spec_error("total_steps: 5\ntotal_steps: 6\n").startswith("specs/x.txt:2:")
    assert "more than once" in spec_error("total_steps: 5\ntotal_steps: 6\n")
    assert "not closed" in spec_error("data_config {\n  num_classes: 3\n")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.txt")


# --- cross-field and range checks ----------------------------------------------------------------

@pytest.mark.parametrize("text, field, fragment", [
    ('data_config { image_size: "(800, 1344)" }', "data_config.image_size", "2^max_level = 64"),
    ('data_config { image_size: "(0, 1344)" }', "data_config.image_size", "positive multiples"),
    ("maskrcnn_config { mrcnn_resolution: 30 }", "maskrcnn_config.mrcnn_resolution",
     "multiple of 4"),
    ('learning_rate_steps: "[60000, 80000]"', "learning_rate_steps",
     "learning_rate_decay_levels has 3 levels"),
    ('learning_rate_steps: "[80000, 60000, 90000]"', "learning_rate_steps", "strictly increasing"),
    ("total_steps: 90000", "learning_rate_steps", "< total_steps (90000)"),
    ('learning_rate_decay_levels: "[0.1, 0.0, 0.01]"', "learning_rate_decay_levels", "> 0"),
    ('maskrcnn_config { freeze_blocks: "[0, 5]" }', "maskrcnn_config.freeze_blocks", "0..4"),
    ("maskrcnn_config { nlayers: 42 }", "maskrcnn_config.nlayers", "10, 18, 34, 50, 101"),
    ('maskrcnn_config { arch: "vgg" }', "maskrcnn_config.arch", '"resnet"'),
    ("maskrcnn_config { min_level: 1 }", "maskrcnn_config.min_level", ">= 2"),
    ("maskrcnn_config { max_level: 7 }", "maskrcnn_config.max_level", "<= 6"),
    ("maskrcnn_config { min_level: 5 max_level: 5 }", "maskrcnn_config.min_level",
     "< max_level"),
    ("maskrcnn_config { rpn_fg_fraction: 1.5 }", "maskrcnn_config.rpn_fg_fraction", "[0, 1]"),
    ("maskrcnn_config { fg_thresh: -0.1 }", "maskrcnn_config.fg_thresh", "[0, 1]"),
    ("maskrcnn_config { test_nms: nan }", "maskrcnn_config.test_nms", "finite"),
    ("maskrcnn_config { rpn_negative_overlap: 0.8 }", "maskrcnn_config.rpn_negative_overlap",
     "<= rpn_positive_overlap (0.7)"),
    ("maskrcnn_config { bg_thresh_lo: 0.6 }", "maskrcnn_config.bg_thresh_lo",
     "<= bg_thresh_hi (0.5)"),
    ("train_batch_size: 0", "train_batch_size", "> 0"),
    ("maskrcnn_config { test_detections_per_image: 0 }",
     "maskrcnn_config.test_detections_per_image", "> 0"),
    ("data_config { num_classes: 1 }", "data_config.num_classes", ">= 2"),
    ('maskrcnn_config { aspect_ratios: "[]" }', "maskrcnn_config.aspect_ratios", "non-empty"),
    ('maskrcnn_config { aspect_ratios: "[(1.0, -1.0)]" }', "maskrcnn_config.aspect_ratios",
     "positive"),
    ('maskrcnn_config { bbox_reg_weights: "(10., 10., 5., 0.)" }',
     "maskrcnn_config.bbox_reg_weights", "4 positive numbers"),
    ("maskrcnn_config { gt_mask_size: 16 }", "maskrcnn_config.gt_mask_size",
     ">= mrcnn_resolution (28)"),
    ("maskrcnn_config { gt_mask_size: 0 }", "maskrcnn_config.gt_mask_size", "> 0"),
    ("momentum: 1.0", "momentum", "[0, 1)"),
    ("data_config { aug_scale_max: 0.5 }", "data_config.aug_scale_max", ">= aug_scale_min"),
])
def test_each_check_names_the_field_and_value(text, field, fragment):
    message = spec_error(text + "\n")
    assert f"{field} = " in message
    assert fragment in message


def test_check_error_points_at_the_line_of_the_field():
    text = "total_steps: 100000\nmaskrcnn_config {\n  nlayers: 18\n  mrcnn_resolution: 30\n}\n"
    assert spec_error(text).startswith("specs/x.txt:4:3: maskrcnn_config.mrcnn_resolution = 30:")
    # A cross-field rule on a field left at its default points at the other field, in the file.
    assert spec_error("total_steps: 90000\n").startswith(
        "specs/x.txt:1:1: learning_rate_steps = \"[60000, 80000, 90000]\"")


def test_image_size_follows_max_level():
    spec = parse_quiet('data_config { image_size: "(800, 1344)" }\n'
                       "maskrcnn_config { max_level: 5 }\n")
    assert spec.data_config.image_size == (800, 1344)  # multiples of 2^5 = 32


# --- environment variables -----------------------------------------------------------------------

def test_env_vars_expand_in_path_fields(monkeypatch):
    monkeypatch.setenv("MY_DATA", "/datasets/coco")
    spec = parse_quiet('checkpoint: "${MY_DATA}/w.pth"\n'
                       'data_config { train_image_dir: "$MY_DATA/train2017" '
                       'val_image_dir: "$MY_DATA/cost$$5" }\n')
    assert spec.checkpoint == "/datasets/coco/w.pth"
    assert spec.data_config.train_image_dir == "/datasets/coco/train2017"
    assert spec.data_config.val_image_dir == "/datasets/coco/cost$5"  # "$$" is a literal "$"
    assert parse_spec(format_spec(spec)) == spec  # "$" written back as "$$"


def test_unset_env_var_names_field_and_variable(monkeypatch):
    monkeypatch.delenv("SURELY_UNSET_DIR", raising=False)
    message = spec_error('data_config {\n  val_json_file: "$SURELY_UNSET_DIR/a.json"\n}\n')
    assert message.startswith("specs/x.txt:2:3: data_config.val_json_file")
    assert "$SURELY_UNSET_DIR is not set" in message


# --- formatting and tables -----------------------------------------------------------------------

def test_format_spec_round_trips_unusual_values():
    spec = load_spec(SPECS_DIR / "demo_synthetic.txt")
    odd = dataclasses.replace(
        spec, l2_weight_decay=1e-7, init_learning_rate=0.1 + 0.2, checkpoint='w "q" \\ $x.pth',
        learning_rate_steps=(10, 20), learning_rate_decay_levels=(1 / 3, 0.01),
        maskrcnn_config=dataclasses.replace(spec.maskrcnn_config, aspect_ratios=((1.0, 2.5),),
                                            freeze_blocks=(0, 1, 2)))
    odd = validate_spec(odd)
    text = format_spec(odd)
    assert "data_config {" in text and 'freeze_blocks: "[0, 1, 2]"' in text
    assert 'image_size: "(128, 128)"' in text  # fixed-length tuples keep TLT's parentheses
    again = parse_spec(text, source="again")
    assert again == odd and again.source == "again"
    assert again.learning_rate_decay_levels[0] == 1 / 3


def test_spec_table_marks_defaults():
    spec = load_spec(SPECS_DIR / "demo_synthetic.txt")
    rows = {(block, name): (value, is_default) for block, name, value, is_default
            in spec_table(spec)}
    assert rows[("experiment", "total_steps")] == (640, False)
    assert rows[("experiment", "momentum")] == (0.9, True)
    assert rows[("data_config", "image_size")] == ((128, 128), False)
    assert rows[("maskrcnn_config", "aspect_ratios")] == (
        ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)), True)
    n_fields = sum(len(dataclasses.fields(c)) for c in (ExperimentSpec, DataConfig,
                                                         MaskRCNNConfig)) - 3
    assert len(rows) == n_fields  # every field but source and the two blocks


# --- warnings ------------------------------------------------------------------------------------

def test_freeze_bn_without_checkpoint_warns():
    with pytest.warns(SpecWarning, match="freeze_bn: false"):
        parse_spec('checkpoint: ""\nmaskrcnn_config { freeze_bn: true }\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_spec('checkpoint: "w.pth"\nmaskrcnn_config { freeze_bn: true }\n')
        parse_spec('maskrcnn_config { freeze_bn: false }\n')


def test_ignored_tlt_fields_are_accepted_and_warn_only_when_set():
    with pytest.warns(SpecWarning, match=r"x.txt:2:1: use_xla = True is ignored"):
        spec = parse_spec("maskrcnn_config { freeze_bn: false }\nuse_xla: true\n"
                          "data_config { n_workers: 0 shuffle_buffer_size: 0 }\n", "x.txt")
    assert spec.data_config.n_workers == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set to TLT's default: nothing to say
        parse_spec("maskrcnn_config { freeze_bn: false }\nuse_xla: false\nl1_weight_decay: 0.0\n"
                   'pruned_model_path: ""\ndata_config { prefetch_buffer_size: 0 }\n')


# --- validate_spec after edits, num_classes vs dataset, replace_spec -----------------------------

def test_validate_spec_after_replace():
    spec = load_spec(SPECS_DIR / "demo_synthetic.txt")
    with pytest.raises(SpecError) as info:
        validate_spec(dataclasses.replace(spec, total_steps=spec.learning_rate_steps[-1]))
    assert str(info.value).startswith(f"{spec.source}: learning_rate_steps = ")
    # Lists become tuples, ints become floats, TLT strings are parsed: the result is canonical.
    fixed = validate_spec(dataclasses.replace(
        spec, learning_rate_steps=[250, 350], momentum=0,
        data_config=dataclasses.replace(spec.data_config, image_size="(128, 192)")))
    assert fixed.learning_rate_steps == (250, 350) and isinstance(fixed.momentum, float)
    assert fixed.data_config.image_size == (128, 192)
    with pytest.raises(SpecError, match="total_steps = '600': expected an integer"):
        validate_spec(dataclasses.replace(spec, total_steps="600"))
    with pytest.raises(SpecError, match="use_amp"):
        validate_spec(dataclasses.replace(spec, use_amp=1))


def test_check_num_classes():
    spec = dataclasses.replace(ExperimentSpec(), data_config=DataConfig(num_classes=5),
                               source="specs/x.txt")
    with pytest.raises(SpecError) as info:
        check_num_classes(spec, 3, "data/train.json")
    assert str(info.value) == ("specs/x.txt: num_classes is 5 but data/train.json declares 3 "
                               "categories; num_classes must be categories + 1 = 4")
    check_num_classes(spec, 4, "data/train.json")


def test_replace_spec_edits_blocks_and_validates():
    spec = load_spec(SPECS_DIR / "demo_synthetic.txt")
    small = replace_spec(spec, total_steps=2000, **{"data_config.num_classes": 3,
                                                    "maskrcnn_config.nlayers": 34})
    assert (small.total_steps, small.data_config.num_classes, small.maskrcnn_config.nlayers) == (
        2000, 3, 34)
    assert small.data_config.image_size == spec.data_config.image_size
    with pytest.raises(SpecError, match="unknown field 'data_config.num_clases'"):
        replace_spec(spec, **{"data_config.num_clases": 3})
    with pytest.raises(SpecError, match="mrcnn_resolution"):
        replace_spec(spec, **{"maskrcnn_config.mrcnn_resolution": 30})


# --- bounds on size-like fields and the memory of one batch --------------------------------------

@pytest.mark.parametrize("text, field, fragment", [
    ('data_config { image_size: "(64, 1000000000)" }', "data_config.image_size",
     "at most 16384 (valid: multiples of 64 from 64 to 16384)"),
    ("data_config { max_num_instances: 1000000000 }", "data_config.max_num_instances",
     "at most 10000 (valid: 1..10000)"),
    ("maskrcnn_config { gt_mask_size: 1000000 }", "maskrcnn_config.gt_mask_size",
     "at most 1024 (valid: 1..1024)"),
    ("maskrcnn_config { mrcnn_resolution: 512 gt_mask_size: 512 }",
     "maskrcnn_config.mrcnn_resolution", "at most 256"),
    ("train_batch_size: 100000", "train_batch_size", "at most 1024"),
    ("eval_batch_size: 5000", "eval_batch_size", "at most 1024"),
    ("maskrcnn_config { train_rpn_pre_nms_topn: 10000000 }",
     "maskrcnn_config.train_rpn_pre_nms_topn", "at most 100000"),
    ("maskrcnn_config { test_rpn_post_nms_topn: 10000000 }",
     "maskrcnn_config.test_rpn_post_nms_topn", "at most 100000"),
    ("maskrcnn_config { test_detections_per_image: 1000000 }",
     "maskrcnn_config.test_detections_per_image", "at most 10000"),
    ("maskrcnn_config { batch_size_per_im: 10000000 }", "maskrcnn_config.batch_size_per_im",
     "at most 100000"),
    ("data_config { num_classes: 10000000 }", "data_config.num_classes", "at most 100000"),
    ("data_config { n_workers: 100000 }", "data_config.n_workers", "at most 256"),
    ("maskrcnn_config { num_scales: 1000 }", "maskrcnn_config.num_scales", "at most 16"),
])
def test_size_fields_are_bounded(text, field, fragment):
    message = spec_error(text + "\n")
    assert f"{field} = " in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("text, field, fragment", [
    # Each field within its bound, the batch not: the field whose default would fit is named.
    ('train_batch_size: 1000\ndata_config { image_size: "(2048, 2048)" }', "train_batch_size",
     "one training batch would need at least 71"),
    ("data_config { num_classes: 100000 }", "data_config.num_classes",
     "inference_mask_logits 233.7"),
    ("data_config { max_num_instances: 10000 }\nmaskrcnn_config { gt_mask_size: 1024 }",
     "data_config.max_num_instances", "gt_masks 146.5"),
    ('data_config { image_size: "(16384, 16384)" }', "data_config.image_size",
     "one evaluation batch would need at least 200 GiB"),
    ("maskrcnn_config { test_detections_per_image: 10000 }",
     "maskrcnn_config.test_detections_per_image", "more than the 64 GiB one device has"),
])
def test_batches_that_cannot_fit_one_device_are_refused(text, field, fragment):
    message = spec_error(text + "\n")
    assert f"{field} = " in message and fragment in message and f"lower {field}" in message


def test_memory_estimate_of_the_seed_spec(seed_env):
    from mrcnn_helpers.spec.validate import MAX_BATCH_BYTES, estimate_batch_memory

    spec = parse_quiet(SEED_SPEC.replace('"\n$DATA_DIR/train', '"$DATA_DIR/train'))
    parts = estimate_batch_memory(spec)
    assert parts["images"] == 3 * 3 * 832 * 1344 * 5
    assert parts["gt_masks"] == 3 * 200 * 112 * 112 * 5
    assert parts["mask_head"] == 3 * 128 * 28 * 28 * 8
    assert parts["inference_mask_logits"] == 8 * 100 * 91 * 28 * 28 * 4
    assert parts["inference_masks"] == 8 * 100 * 832 * 1344
    assert sum(parts.values()) < MAX_BATCH_BYTES / 50
    for path in SHIPPED:  # every shipped spec validates (bounds and memory included)
        load_spec(path)
