"""Run by tests/test_data_loader.py in a fresh interpreter: a worker loader read to its end at module level (the
last epoch closes it), and the trainer's Grain source stopped mid-stream through the loop's close; stderr must
then hold no resource_tracker 'leaked' warning and no finalizer error at interpreter shutdown."""

import sys

from data_pipeline.loader.grain_loader import make_loader

if __name__ == "__main__":  # Grain's workers are spawned: the main module must be importable without running this
    from mirage_jax.run_config import DataConfig, ShapesConfig
    from mirage_jax.train import data as data_lib
    from mirage_jax.train import grain_source

    loader = make_loader(sys.argv[1], global_batch_size=2, worker_count=1, process_index=0, process_count=1,
                         num_epochs=1, shuffle=False)
    it = iter(loader)
    n = sum(1 for _ in it)
    data = DataConfig(source=sys.argv[1], shuffle_seed=0, worker_count=1, prefetch=2)
    shapes = ShapesConfig(latent_frames=25, latent_height=8, latent_width=8, audio_frames=25, text_len=8)
    source = grain_source.make(data, shapes, data_lib.RowRange(0, 2, 2))
    kept = [next(source), next(source)]  # held to the end, as the loop's device arrays may hold their memory
    data_lib.close_source(source)
    print(f"read {n} batches; closed", flush=True)
