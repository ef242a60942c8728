"""FaceCLIP and FaceCLIP-SDXL: a joint face+text encoder for SDXL, its training and inference.

- config.py: architecture settings (face ViT, fusion, encoder, alignment loss)
- face_vit.py: the frozen face-recognition ViT (arcface_torch layout)
- fusion.py: the face <-> text fusion blocks, one stack per text tower
- encoder.py: `FaceCLIPEncoder`: identity injection, fused tokens + pooled embedding
- loss.py / align.py: sigmoid contrastive pre-training against the face, text and image spaces
- sdxl.py: the SDXL UNet fine-tune on the encoder's outputs
- train.py: `FaceCLIPTrainConfig`, `train_faceclip` (both stages, on training/loop.py)
- pipeline.py: `FaceCLIPGenerator` for evaluation
- frozen.py: frozen sub-models kept out of state dicts, optimisers and DDP
"""
