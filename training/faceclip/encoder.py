"""The FaceCLIP encoder: a reference face and a prompt in, one joint ID+text conditioning out.

Per text tower (SDXL: CLIP ViT-L/14 `text_encoder`, width 768, and ViT-bigG/14
`text_encoder_2` with projection, width 1280; both frozen):
1. the prompt is prefixed with `Photo of a id person.`;
2. the input embedding of that prefix's `id` token is replaced by `id_proj` of the
   L2-normalised identity feature of the frozen face ViT (a forward hook on the tower's token
   embedding, so the tower's own forward, causal mask and pooling run unchanged);
3. the tower's penultimate hidden states (what SDXL conditions on) go through the tower's
   fusion stack together with the face patch tokens.
The fused tokens of the towers are concatenated per token ((B, 77, 2048) for SDXL: the UNet's
`encoder_hidden_states`), and the last tower's projected pooled embedding of the injected
prompt is the pooled output ((B, 1280): SDXL's `text_embeds`).

Samples without identity (`with_identity` False: condition drop, the classifier-free negative)
get neither prefix nor injection. Only the fusion stacks (with the identity projections) are
parameters of this module: the towers and the face ViT are frozen and reload from their own
weights, so `save_pretrained` writes the trainable weights plus the config that rebuilds the rest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.faceclip.config import EncoderConfig
from training.faceclip.face_vit import FaceViT
from training.faceclip.frozen import HoldsFrozen
from training.faceclip.fusion import TowerFusion

log = logging.getLogger(__name__)

WEIGHTS = "encoder.safetensors"
CONFIG = "encoder.json"
TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclass
class FaceCLIPOutput:
    tokens: torch.Tensor  # (B, T, sum of tower widths): fused tokens
    pooled: torch.Tensor  # (B, P): the last tower's projected pooled embedding
    joint: torch.Tensor  # (B, sum of tower widths): fused states at each end-of-text token
    identity: torch.Tensor  # (B, face features): L2-normalised face identity feature


class _TokenOverride:
    """Forward hook on a token-embedding layer: replaces the rows selected by `mask` (B, T)
    with `vectors` (B, D) while set; a no-op otherwise."""

    def __init__(self, embedding: nn.Module):
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        embedding.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.value is None:
            return output
        mask, vectors = self.value
        return torch.where(mask[..., None], vectors[:, None, :].to(output.dtype), output)


@dataclass
class TextTower:
    model: nn.Module
    tokenizer: object
    override: _TokenOverride
    id_token: int
    prefix_tokens: int  # start token + the id prompt's tokens

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def position_embeddings(self, length: int) -> torch.Tensor:
        inner = getattr(self.model, "text_model", self.model)
        return inner.embeddings.position_embedding.weight[:length]


def _tower(model: nn.Module, tokenizer, config: EncoderConfig) -> TextTower:
    word = tokenizer.encode(config.id_word, add_special_tokens=False)
    if len(word) != 1:
        raise ValueError(f"{config.id_word!r} is not a single token for this tokenizer")
    prefix = tokenizer(config.id_prompt).input_ids[:-1]  # without the end token
    if prefix.count(word[0]) != 1:
        raise ValueError(f"the id prompt must contain {config.id_word!r} exactly once")
    override = _TokenOverride(model.get_input_embeddings())
    return TextTower(model, tokenizer, override, word[0], len(prefix))


class FaceCLIPEncoder(HoldsFrozen):
    def __init__(self, config: EncoderConfig, towers: list[TextTower], face_vit: FaceViT):
        super().__init__()
        self.config = config
        self.towers = towers
        for i, tower in enumerate(towers):
            self.hold(f"tower{i}", tower.model)
        self.hold("face_vit", face_vit)
        self.fusions = nn.ModuleList(
            TowerFusion(t.width, config.face_vit, config.fusion) for t in towers
        )

    @property
    def face_vit(self) -> FaceViT:
        return self.frozen("face_vit")

    @property
    def device(self) -> torch.device:
        return self.face_vit.pos_embed.device

    @classmethod
    def build(cls, config: EncoderConfig) -> FaceCLIPEncoder:
        """Frozen towers from `config.base_model`, the face ViT from `config.face_encoder`,
        freshly initialised fusion."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        towers = []
        for i, (model_folder, tokenizer_folder) in enumerate(TOWERS):
            model_cls = CLIPTextModelWithProjection if i == len(TOWERS) - 1 else CLIPTextModel
            model = model_cls.from_pretrained(config.base_model, subfolder=model_folder)
            tokenizer = CLIPTokenizer.from_pretrained(config.base_model, subfolder=tokenizer_folder)
            towers.append(_tower(model, tokenizer, config))
        return cls(config, towers, FaceViT.load(config.face_encoder, config.face_vit))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> FaceCLIPEncoder:
        """An exported encoder; `overrides` replace config fields (e.g. `base_model` or
        `face_encoder` where those weights live on this machine)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / "encoder").is_dir():
            folder = folder / "encoder"
        config = EncoderConfig.model_validate_json((folder / CONFIG).read_text())
        config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        encoder = cls.build(config)
        encoder.load_state_dict(load_file(str(folder / WEIGHTS)))
        return encoder

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(self.config.model_dump(), indent=2))
        return folder

    # --- inputs ------------------------------------------------------------------------------

    def tokenize(self, tower: TextTower, prompts: list[str], with_identity: list[bool]):
        """input_ids (B, T), padding (B, T) True at padding, id position mask (B, T)."""
        texts = [
            f"{self.config.id_prompt} {p}" if ident else p
            for p, ident in zip(prompts, with_identity, strict=True)
        ]
        enc = tower.tokenizer(
            texts,
            padding="max_length",
            max_length=self.config.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = enc.input_ids
        in_prefix = torch.arange(ids.shape[1]) < tower.prefix_tokens
        id_mask = (ids == tower.id_token) & in_prefix & torch.tensor(with_identity)[:, None]
        return ids, enc.attention_mask == 0, id_mask

    # --- forward -----------------------------------------------------------------------------

    def forward(
        self, faces: torch.Tensor, prompts: list[str], with_identity: list[bool] | None = None
    ) -> FaceCLIPOutput:
        """faces (B, 3, 112, 112) aligned crops in [-1, 1]; prompts: B strings."""
        device = faces.device
        with_identity = [True] * len(prompts) if with_identity is None else list(with_identity)
        with torch.no_grad():
            face = self.face_vit(faces)
        identity = F.normalize(face.identity.float(), dim=-1)
        tokens, joints, pooled = [], [], None
        for tower, fusion in zip(self.towers, self.fusions, strict=True):
            ids, padding, id_mask = (
                t.to(device) for t in self.tokenize(tower, prompts, with_identity)
            )
            tower.override.value = (
                id_mask,
                fusion.id_proj(identity.to(fusion.id_proj.weight.dtype)),
            )
            try:
                out = tower.model(ids, output_hidden_states=True)
            finally:
                tower.override.value = None
            text = out.hidden_states[self.config.hidden_layer]
            fused = fusion(
                text,
                tower.position_embeddings(ids.shape[1]),
                padding,
                face.patches,
                self.face_vit.pos_embed,
            )
            tokens.append(fused)
            end = (~padding).sum(-1) - 1  # the end-of-text token is the last one not padded
            joints.append(fused[torch.arange(len(ids), device=device), end])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return FaceCLIPOutput(
            tokens=torch.cat(tokens, dim=-1),
            pooled=pooled,
            joint=torch.cat(joints, dim=-1),
            identity=identity,
        )

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """The frozen last tower's projected pooled embedding of the plain prompts (no prefix,
        no identity): the text space the joint embedding is aligned with."""
        tower = self.towers[-1]
        ids, _, _ = self.tokenize(tower, prompts, [False] * len(prompts))
        out = tower.model(ids.to(self.device))
        return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
