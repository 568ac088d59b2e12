"""The base layer: keypoint schema, person records, image / mask I/O, mask-out, checkpoint reading,
errors. Imports nothing else of bmp_lightning (tests/test_layers.py)."""
