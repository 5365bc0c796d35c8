"""The names of a batch's arrays, one list for the loader, the training loop, the model, generate and eval.

    STREAMS         video, audio, text: the encoder kinds, and the model's token streams in their joint-attention
                    order (MirageDiT and the PyTorch export concatenate them in this order)
    BATCH_KEYS      what a training step reads: the video latents and everything that conditions them
    CONDITION_KEYS  BATCH_KEYS without the video latents: what sampling is given (generate, eval)
    LOADER_KEYS     what `data_pipeline.loader` yields per example: BATCH_KEYS and the mouth track (eval's truth)

It lives in mirage_base because the loader shares it and data_pipeline never imports mirage_jax.
"""

from __future__ import annotations

STREAMS = ("video", "audio", "text")
BATCH_KEYS = ("video", "video_mask", "audio", "audio_mask", "text", "text_mask", "ref", "ref_time", "ref_mask")
CONDITION_KEYS = tuple(k for k in BATCH_KEYS if k != "video")
LOADER_KEYS = (*BATCH_KEYS, "mouth", "mouth_valid")
