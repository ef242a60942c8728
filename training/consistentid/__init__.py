"""ConsistentID (spec §5) on FGID shards.

config.py     model shape and training objective options
encoders.py   ID projection and facial encoder
attention.py  trainable attention processors for the frozen UNet, localisation maps
loss.py       noise MSE and the facial attention localisation loss
model.py      the assembled model (frozen SD1.5 + CLIP, trainable parts) and one training step
prompt.py     the released model's text path (default)
batch.py      the training batch (target, text tokens, reference regions)
train.py      ConsistentIDTrainConfig, train_consistentid (shared loop), export
pipeline.py   ConsistentIDGenerator: DDIM, guidance, delayed merge step
convert.py    the released checkpoint's names <-> ours
release.py    released checkpoints on disk: safe reading, fine-tuning start, folder conversion
"""
