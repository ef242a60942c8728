"""Evaluation of identity-preserving generators with the paper's protocol (FGID_SPEC §7).

`protocols.Generator` is what a model implements; `metrics` scores images (CLIP-T, CLIP-I, DINO,
FaceSim, FGIS, FID); `run.evaluate` generates each identity once per prompt and writes the tables;
`baseline.TextOnlyGenerator` is the text-only Stable Diffusion comparison row.
"""
