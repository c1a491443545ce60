"""The parsed spec: frozen dataclasses the rest of the toolkit consumes.

Field names are TLT's, so a TLT Mask R-CNN spec reads unchanged; list-valued TLT strings
("(832, 1344)", "[60000, 80000]") arrive here already parsed into tuples. Defaults are TLT's: for
the fields of the TLT 2.0 COCO example spec they are that spec's values (ResNet-50, 832x1344,
100k steps on 8 GPUs), so an empty spec describes the reference COCO experiment. Fields that TLT
does not have are marked "ours".

These classes are the single source of defaults and types: the protobuf schema (schema.py) is
built from them, and `spec_table` / `format_spec` compare against them. Build one with
`load_spec` / `parse_spec`; after `dataclasses.replace(...)` run `validate_spec` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataConfig:
    """`data_config { }`: where the data is and how images are fed to the network."""

    # Network input (H, W). Images are resized keeping their aspect ratio to fit, then zero padded
    # at the bottom/right. 832x1344 is COCO's usual 800x1333 rounded up to multiples of 64 so every
    # FPN level up to P6 divides evenly (TLT string "(832, 1344)").
    image_size: tuple[int, int] = (832, 1344)
    # Random horizontal flip + scale jitter during training (never at evaluation); on by default
    # because it is the cheapest accuracy gain on small datasets.
    augment_input_data: bool = True
    # Number of validation images evaluated each time (at most; fewer if the split is smaller).
    # 5000 = all of COCO val2017.
    eval_samples: int = 5000
    # TLT's TFRecord globs. Kept so TLT specs load; this toolkit reads COCO JSON + image folders
    # (train_json_file, train_image_dir, val_json_file, val_image_dir) instead. "" = unused.
    training_file_pattern: str = ""
    validation_file_pattern: str = ""
    # COCO instances JSON of the validation split (also the ground truth for COCO metrics).
    val_json_file: str = ""
    # Classes including background: categories in the annotation file + 1. 91 = COCO's id range
    # 1..90 plus background, as in TLT's COCO example.
    num_classes: int = 91
    # Drop iscrowd=1 annotations from training targets: crowd regions are not single instances,
    # and COCO evaluation ignores them too.
    skip_crowd_during_training: bool = True
    # Per-image cap on ground-truth instances, so targets batch into fixed-size tensors; when an
    # image has more, the largest are kept. 200 is TLT's value and more than any COCO image has.
    max_num_instances: int = 200
    # DataLoader worker processes (0 = load in the main process). TLT's value sized a tf.data
    # pipeline on a big server; 2 fits the small machines this toolkit is also run on.
    n_workers: int = 2
    # Ours: COCO instances JSON of the training split (TLT read TFRecords instead).
    train_json_file: str = ""
    # Ours: folder holding the training images named in train_json_file.
    train_image_dir: str = ""
    # Ours: folder holding the validation images named in val_json_file.
    val_image_dir: str = ""
    # Ours: scale-jitter range applied on top of the fit-to-image_size scale when augmenting; the
    # result is randomly cropped/padded back to image_size. 0.8-1.25 is a mild jitter that helps
    # small datasets without changing the object size distribution much.
    aug_scale_min: float = 0.8
    aug_scale_max: float = 1.25


@dataclass(frozen=True)
class MaskRCNNConfig:
    """`maskrcnn_config { }`: network, target assignment, post-processing, loss weights."""

    # --- Backbone ---
    # ResNet depth: one of 10, 18, 34, 50, 101. 50 is the usual accuracy/speed trade-off.
    nlayers: int = 50
    # Backbone family; only "resnet" exists in TLT's Mask R-CNN.
    arch: str = "resnet"
    # Freeze every BatchNorm (statistics and affine). Right when starting from pretrained weights
    # with small per-GPU batches (3 images give noisy batch statistics); wrong from scratch.
    freeze_bn: bool = True
    # ResNet blocks whose weights are not trained, TLT numbering: 0 = stem (conv1 + bn1),
    # 1..4 = layer1..layer4. Freezing the stem and layer1 keeps generic low-level features and
    # saves time when fine-tuning (TLT string "[0,1]"; "[]" trains everything).
    freeze_blocks: tuple[int, ...] = (0, 1)
    # Side of the square mask targets cut from each ground-truth instance (pixels); kept larger
    # than mrcnn_resolution so targets are resampled from detail, not upsampled.
    gt_mask_size: int = 112

    # --- Region proposal network: anchor labelling and sampling ---
    # Anchors with IoU >= this to some ground truth are foreground (Faster R-CNN's 0.7).
    rpn_positive_overlap: float = 0.7
    # Anchors whose best IoU is < this are background; in between they are ignored.
    rpn_negative_overlap: float = 0.3
    # Anchors sampled per image for the RPN losses (Faster R-CNN's 256).
    rpn_batch_size_per_im: int = 256
    # At most this fraction of the sampled anchors is foreground (the rest background).
    rpn_fg_fraction: float = 0.5
    # Proposals with a side shorter than this (input pixels) are dropped; 0 keeps all.
    rpn_min_size: float = 0.0

    # --- Second stage: RoI sampling ---
    # RoIs sampled per image for the box and mask heads (Detectron's 512).
    batch_size_per_im: int = 512
    # At most this fraction of the sampled RoIs is foreground.
    fg_fraction: float = 0.25
    # RoIs with IoU >= fg_thresh to a ground truth are foreground...
    fg_thresh: float = 0.5
    # ...and those with bg_thresh_lo <= IoU < bg_thresh_hi are background.
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.0

    # --- Box head ---
    # Width of the two fully connected layers of the box head (Detectron's 1024).
    fast_rcnn_mlp_head_dim: int = 1024
    # (wx, wy, ww, wh) scaling of box regression targets, so deltas have roughly unit variance
    # (Detectron's (10, 10, 5, 5); TLT string "(10., 10., 5., 5.)").
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)

    # --- Mask head ---
    # Predict masks at all; False gives a Faster R-CNN.
    include_mask: bool = True
    # Side of the predicted per-RoI mask (pixels of the RoI grid), a multiple of 4 because the
    # head upsamples a RoIAlign grid of half this size by 2 (28 = the Mask R-CNN paper).
    mrcnn_resolution: int = 28

    # --- Proposals during training ---
    # Top-scoring anchors kept per image (over all levels) before NMS, and proposals kept after.
    train_rpn_pre_nms_topn: int = 2000
    train_rpn_post_nms_topn: int = 1000
    # IoU above which NMS suppresses a proposal.
    train_rpn_nms_threshold: float = 0.7

    # --- Evaluation / inference ---
    # Detections kept per image after class-wise NMS (COCO's evaluation limit is 100).
    test_detections_per_image: int = 100
    # IoU of the class-wise NMS on final detections.
    test_nms: float = 0.5
    # Proposal counts and NMS IoU at inference, as for training.
    test_rpn_pre_nms_topn: int = 1000
    test_rpn_post_nms_topn: int = 1000
    test_rpn_nms_thresh: float = 0.7
    # Ours: detections scoring below this are dropped before NMS. 0.05 (torchvision's and
    # Detectron's) keeps the low-score tail COCO AP needs; raise it for display.
    test_score_thresh: float = 0.05

    # --- Anchors / FPN ---
    # FPN levels used: P2 (stride 4) .. P6 (stride 64), the standard Mask R-CNN pyramid.
    min_level: int = 2
    max_level: int = 6
    # Anchor sizes per level: anchor_scale * stride * 2^(i / num_scales), i < num_scales.
    num_scales: int = 1
    # Anchor shapes as (x, y) multipliers of the anchor size, TLT's convention: (1.4, 0.7) is a
    # wide anchor. The three default shapes are aspect ratios 1:1, 2:1 and 1:2 at ~equal area.
    aspect_ratios: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    # Base anchor size in units of the level's stride: 8 * 4 = 32 px on P2 ... 512 px on P6.
    anchor_scale: float = 8.0

    # --- Loss weights ---
    rpn_box_loss_weight: float = 1.0
    fast_rcnn_box_loss_weight: float = 1.0
    mrcnn_weight_loss_mask: float = 1.0


@dataclass(frozen=True)
class ExperimentSpec:
    """The whole experiment: top-level schedule/optimizer fields plus the two blocks."""

    # Mixed precision (bf16 autocast on GPUs that have it, else fp16 with loss scaling). Off by
    # default as in TLT's example: fp32 is the reference that results are compared against.
    use_amp: bool = False
    # Steps of linear warm-up from warmup_learning_rate to init_learning_rate; keeps the first
    # large-LR steps from blowing up freshly initialized heads.
    warmup_steps: int = 1000
    # Initial weights: "" (random init), a .pth file, or torchvision://<name> (see
    # mrcnn_helpers.model.weights). TLT's example points at an NGC pretrained model.
    checkpoint: str = ""
    # Steps at which the learning rate becomes init_learning_rate * the matching decay level
    # (TLT strings "[60000, 80000, 90000]" and "[0.1, 0.01, 0.001]").
    learning_rate_steps: tuple[int, ...] = (60000, 80000, 90000)
    learning_rate_decay_levels: tuple[float, ...] = (0.1, 0.01, 0.001)
    # Optimizer steps to train for (100k at batch 3 x 8 GPUs is ~20 COCO epochs).
    total_steps: int = 100000
    # Images per step per process (TLT: per GPU).
    train_batch_size: int = 3
    # Images per inference batch during evaluation.
    eval_batch_size: int = 8
    # Every this many steps a checkpoint is written and the validation set evaluated.
    num_steps_per_eval: int = 10000
    # SGD momentum.
    momentum: float = 0.9
    # L2 penalty on weights (not on biases or normalization parameters).
    l2_weight_decay: float = 0.00002
    # Learning rate at step 0 of the warm-up.
    warmup_learning_rate: float = 0.0001
    # Peak learning rate after warm-up; TLT's 0.02 is for 8 GPUs x 3 images, scale it linearly
    # with the total batch.
    init_learning_rate: float = 0.02
    # Seed of every random generator (init, shuffling, augmentation) so runs repeat. 123 as in
    # TLT's sample specs.
    seed: int = 123
    # Log the losses every this many steps (TLT 2.0 logged every 5).
    logging_frequency: int = 5
    data_config: DataConfig = field(default_factory=DataConfig)
    maskrcnn_config: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    # Ours: training checkpoints kept in the results directory (oldest pruned first); 3 leaves a
    # fallback if the newest turns out bad without filling the disk.
    num_checkpoints_to_keep: int = 3
    # Where the spec came from (file path, "<string>", ...), for error messages only; not part
    # of the experiment, so two specs with equal fields compare equal wherever they came from.
    source: str = field(default="<defaults>", compare=False)
