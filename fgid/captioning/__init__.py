"""Captioning a built dataset again: caption runs (`run`), their per-shard work (`recaption`),
the captioner they lease (`captioners`) and the journal that makes them resumable (`journal`).

The build's own caption stage uses only the journal; nothing here is imported by the build.
"""
