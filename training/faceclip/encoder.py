"""The FaceCLIP encoder: a reference face and a prompt in, one joint ID+text conditioning out.

Two released towers (training/faceclip/released.py), CLIP ViT-L/14 (768) and ViT-bigG/14 (1280)
by default. With identity, the prompt is prefixed with `Photo of a id person.` and the prefix's
`id` token carries the face; without (condition drop, the classifier-free negative) neither.
Outputs: the towers' fused tokens concatenated per token ((B, 77, 2048): SDXL's
`encoder_hidden_states`) and the last tower's pooled state ((B, 1280): SDXL's `text_embeds`), as
the released `FaceCLIP_L_G_Wrapper` gives them.

Weights: the text towers come from open_clip (`pretrained` tag) and the face ViT from
`face_encoder`, or everything from a released checkpoint (`init_from_reference`).
`save_pretrained` writes only what training changes plus the config; `from_pretrained` rebuilds
the frozen parts from those same sources.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.faceclip.config import EncoderConfig
from training.faceclip.face_vit import FaceViT
from training.faceclip.released import FaceCLIPTower, TowerOutput

log = logging.getLogger(__name__)

WEIGHTS = "encoder.safetensors"
CONFIG = "encoder.json"
INIT_SEED = 0  # frozen parts without weights (tests) are a pure function of the config


@dataclass
class FaceCLIPOutput:
    tokens: torch.Tensor  # (B, T, sum of tower widths): fused tokens
    pooled: torch.Tensor  # (B, last tower width): the last tower's pooled state
    joint: torch.Tensor  # (B, sum of tower widths): fused states at each end token
    identity: torch.Tensor  # (B, face features): L2-normalised face identity feature
    towers: list[TowerOutput]


class FaceCLIPEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.config = config
        self.towers = nn.ModuleList(
            FaceCLIPTower(t, config.face_vit, config.fuser) for t in config.towers
        )
        self.context_length = config.towers[0].context_length
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        word = self.tokenizer.encode(config.id_word)
        if len(word) != 1:
            raise ValueError(f"{config.id_word!r} is not a single token")
        self.id_token = word[0]
        # The identity goes only where `id` sits inside the prefix: start token + its words.
        words = self.tokenizer.encode(config.id_prompt)
        self.prefix_tokens = 1 + len(words)
        if words.count(self.id_token) != 1:
            raise ValueError(f"the id prompt must contain {config.id_word!r} exactly once")

    @property
    def device(self) -> torch.device:
        return self.towers[0].positional_embedding.device

    @property
    def text_dim(self) -> int:
        """The projected text space of the last tower (the alignment's text targets)."""
        return self.config.towers[-1].embed_dim

    @property
    def face_vit(self) -> FaceViT:
        return self.towers[0].face_encoder

    # --- weights -----------------------------------------------------------------------------

    @classmethod
    def build(cls, config: EncoderConfig) -> FaceCLIPEncoder:
        """The encoder with its frozen parts loaded (open_clip towers, face ViT) and a fresh
        fuser, or everything from `config.init_from_reference`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            encoder = cls(config)
        if config.init_from_reference:
            from training.faceclip.convert import load_reference

            load_reference(encoder, config.init_from_reference)
        else:
            encoder._load_sources()
        for tower in encoder.towers:
            tower.freeze()
        return encoder

    def _load_sources(self) -> None:
        if self.config.face_encoder:
            face = FaceViT.load(self.config.face_encoder, self.config.face_vit)
            for tower in self.towers:
                tower.face_encoder.load_state_dict(face.state_dict())
        else:
            log.warning("no face-encoder weights given: the face ViT is random (tests only)")
        for tower, tc in zip(self.towers, self.config.towers, strict=True):
            if tc.pretrained:
                import open_clip

                model = open_clip.create_model(tc.model_name, pretrained=tc.pretrained)
                for name in ("transformer", "token_embedding", "ln_final"):
                    getattr(tower, name).load_state_dict(getattr(model, name).state_dict())
                with torch.no_grad():
                    tower.positional_embedding.copy_(model.positional_embedding)
                    tower.text_projection.copy_(model.text_projection)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen text towers and face ViTs (those reload from their
        sources): what an export holds."""
        frozen = FaceCLIPTower.FROZEN_STATE
        # keys are towers.{i}.{attribute}...
        return {k: v for k, v in self.state_dict().items() if k.split(".")[2] not in frozen}

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> FaceCLIPEncoder:
        """An exported encoder; `overrides` replace config fields (e.g. `face_encoder` or
        `init_from_reference` where those weights live on this machine)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / "encoder").is_dir():
            folder = folder / "encoder"
        config = EncoderConfig.model_validate_json((folder / CONFIG).read_text())
        config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        encoder = cls.build(config)
        encoder.load_trained(load_file(str(folder / WEIGHTS)))
        return encoder

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        """Exactly the trainable tensors (an export, or a checkpoint's encoder part)."""
        expected = set(self.trainable_state())
        missing, unexpected = expected - set(state), set(state) - set(self.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"encoder weights do not fit: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state().items()}
        save_file(state, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(self.config.model_dump(), indent=2))
        return folder

    # --- inputs ------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str], with_identity: list[bool]):
        """input_ids (B, T) and the id-position mask (B, T), as the release builds them."""
        texts = [
            f"{self.config.id_prompt} {p}" if ident else p
            for p, ident in zip(prompts, with_identity, strict=True)
        ]
        ids = self.tokenizer(texts)
        in_prefix = torch.arange(ids.shape[1]) < self.prefix_tokens
        id_mask = (ids == self.id_token) & in_prefix & torch.tensor(with_identity)[:, None]
        return ids, id_mask

    def face_input(self, faces: torch.Tensor) -> torch.Tensor:
        """Our faces are in [-1, 1]; the released inference feeds the face ViT [0, 1]."""
        return (faces + 1) / 2 if self.config.face_input == "unit" else faces

    # --- forward -----------------------------------------------------------------------------

    def forward(
        self, faces: torch.Tensor, prompts: list[str], with_identity: list[bool] | None = None
    ) -> FaceCLIPOutput:
        """faces (B, 3, 112, 112) aligned crops in [-1, 1]; prompts: B strings."""
        with_identity = [True] * len(prompts) if with_identity is None else list(with_identity)
        ids, id_mask = (t.to(faces.device) for t in self.tokenize(prompts, with_identity))
        x = self.face_input(faces)
        outs = [tower(x, ids, id_mask) for tower in self.towers]
        end = ids.argmax(-1)
        rows = torch.arange(len(ids), device=ids.device)
        return FaceCLIPOutput(
            tokens=torch.cat([o.fused for o in outs], dim=-1),
            pooled=outs[-1].pooled,
            joint=torch.cat([o.fused[rows, end] for o in outs], dim=-1),
            identity=outs[0].identity,
            towers=outs,
        )

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """The frozen last tower's projected pooled embedding of the plain prompts (no prefix,
        no identity): the text space the joint embedding is aligned with."""
        tower = self.towers[-1]
        ids, _ = self.tokenize(prompts, [False] * len(prompts))
        ids = ids.to(self.device)
        return tower.pool(tower.encode_text(ids, None), ids)[1]
