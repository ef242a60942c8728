"""ConsistentID (spec §5) on FGID shards.

config.py     model shape and training objective options
encoders.py   ID projection and facial encoder
attention.py  trainable attention processors for the frozen UNet, localisation maps
loss.py       noise MSE and the facial attention localisation loss
model.py      the assembled model (frozen SD1.5 + CLIP, trainable parts) and one training step
train.py      ConsistentIDTrainConfig, train_consistentid (shared loop), export
pipeline.py   ConsistentIDGenerator: DDIM, guidance, delayed merge step
"""
