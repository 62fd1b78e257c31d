"""Data: webdataset shards (writers, synthetic generators), whitelist decoding, streams, augmentation.

- ``writer``: bounded, atomic, resumable, parallel shard writing with a manifest.
- ``nyu`` / ``ade20k`` / ``refcoco`` / ``synth``: the published datasets and synthetic data as shard items.
- ``tario``: URL expansion (brace / comma / folder / fsspec) and raw tar reading.
- ``decode``: field whitelist; a pickle in a shard is an error, never loaded.
- ``pipeline.build_stream``: train / eval streams split exactly once across ranks and loader workers.
- ``augment``: per-task augmentation.
"""
