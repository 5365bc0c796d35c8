"""The project-wide base below both `data_pipeline` and `mirage_jax`: what every CLI and both sides of the
data share, importing neither package.

- `errors`: `MirageError` (a user's mistake: one line, an exit status) and its shared subclasses;
- `cli`: `run(main, prog)`, the CLI wrapper that prints a MirageError as one line and exits with its code;
- `storage`: local paths and gs:// (the credential preflight, `is_remote`);
- `safetensors_reader`: the one safetensors reader (frozen encoders, warm start, export's PyTorch model);
- `batch_keys`: the batch's key names (the loader, the training loop, generate and eval share them);
- `time_map`: the frame-to-latent time map a dataset's manifest records and the model reads;
- `lifetime`: loader workers and launched trainers die with their parent.

Imports: the standard library and numpy; absl (cli), safetensors and ml_dtypes (the reader), fsspec (storage).
The reader imports etils/fsspec only for a URL, so the PyTorch serving model loads without them.
"""
