"""Face crops for SyncNet: moved to `data_pipeline.ingest.faces` (prepare's curation uses the same detector,
tracker and crop, and data_pipeline never imports mirage_jax); this module keeps eval's import path."""

from data_pipeline.ingest.faces import (  # noqa: F401
    CROP_SCALE,
    DETECT_SIDE,
    IOU_THRESHOLD,
    MAX_GAP,
    PAD_VALUE,
    SIZE,
    SMOOTH,
    Track,
    crop,
    detect,
    fit,
    iou,
    link,
    smooth_boxes,
    track,
)
