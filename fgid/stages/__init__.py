"""Pipeline stages: each turns a batch of Samples into the same batch, enriched or rejected."""

from fgid.stages.align import AlignStage
from fgid.stages.caption import CaptionStage
from fgid.stages.decode import DecodeStage
from fgid.stages.detect import DetectStage
from fgid.stages.identity import AttributeStage, EmbedStage
from fgid.stages.parse import ParseStage

# The order a sample goes through them (fgid.pipeline.build_stages); run names and plots use it.
STAGE_ORDER = (DecodeStage, DetectStage, AlignStage, ParseStage, EmbedStage, AttributeStage,
               CaptionStage)  # fmt: skip
STAGES = tuple(stage.name for stage in STAGE_ORDER)
