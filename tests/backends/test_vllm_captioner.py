"""The LLaVA engine setting: selection, the error without vLLM, and the prompt both engines send."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from fgid.backends.full.llava import LlavaCaptioner, llava_prompt
from fgid.backends.full.vllm_captioner import EngineUnavailable, split_answers, vllm_requests
from fgid.captioning.captioners import load_captioner
from fgid.config import BuildConfig
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT
from fgid.stages.caption import PROMPTS, caption_fields

# chat_template.json of the llava-hf LLaVA-1.5 checkpoints (llava-hf/llava-1.5-7b-hf): the
# conversation format those weights were converted with, which transformers users render.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTIONS = (CAPTION_PROMPT, FACIAL_PROMPT, "What is in the picture?")
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    astronaut = data.astronaut()
    return [astronaut[:384, 64:448], astronaut[100:300, 150:350], data.chelsea()]


@pytest.fixture(scope="module")
def processor(full_config):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(full_config.models.llava)


def with_engine(config: BuildConfig, engine: str) -> BuildConfig:
    return config.with_overrides(
        **{"caption.engine": engine, "caption.max_new_tokens": MAX_NEW_TOKENS}
    )


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_engine_is_a_caption_setting_in_the_output_hash(tmp_path):
    default = BuildConfig()
    assert default.caption.engine == "transformers"
    path = tmp_path / "build.yaml"
    path.write_text("caption:\n  engine: vllm\n")
    vllm = BuildConfig.from_yaml(path)
    assert (
        vllm.caption.engine
        == "vllm"
        == default.with_overrides(**{"caption.engine": "vllm"}).caption.engine
    )
    with pytest.raises(ValidationError, match="engine"):
        default.with_overrides(**{"caption.engine": "onnx"})
    # Greedy answers may differ between engines: a folder never mixes them.
    assert vllm.output_hash() != default.output_hash()
    # The default is not written, so hashes (and recorded configs) from before the setting stay.
    assert "engine" not in default.model_dump()["caption"]
    assert BuildConfig.model_validate(vllm.model_dump(mode="json")) == vllm
    assert default.with_overrides(**{"caption.engine": "transformers"}).output_hash() == (
        default.output_hash()
    )


def test_vllm_without_the_package_fails_at_model_load_naming_it(full_config, monkeypatch):
    from fgid.models import load_model_set

    config = with_engine(full_config, "vllm")  # a config may name it on any machine
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does when not installed
    for load in (load_captioner, load_model_set):  # a caption run, a build
        with pytest.raises(EngineUnavailable, match="pip install vllm") as caught:
            load(config)
        assert isinstance(caught.value, ImportError)
        assert "caption.engine=transformers" in str(caught.value)


def test_llava_prompt_is_the_llava_15_chat_template(processor):
    for question in QUESTIONS:
        rendered = processor.apply_chat_template(
            chat(question),
            chat_template=LLAVA_15_CHAT_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
        assert llava_prompt(question) == rendered


def test_vllm_requests_pair_every_image_with_every_prompt(crops):
    questions = [CAPTION_PROMPT, FACIAL_PROMPT]
    requests = vllm_requests(crops, questions)
    assert len(requests) == len(crops) * len(questions)
    for i, request in enumerate(requests):
        question, crop = questions[i // len(crops)], crops[i % len(crops)]
        assert set(request) == {"prompt", "multi_modal_data"}
        assert request["prompt"] == llava_prompt(question)
        picture = request["multi_modal_data"]["image"]
        assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), crop)
    texts = [f"answer {i}" for i in range(len(requests))]
    assert split_answers(texts, len(crops), 2) == [texts[:3], texts[3:]]
    with pytest.raises(ValueError, match="answers"):
        split_answers(texts[:-1], len(crops), 2)


class CountingMany:
    """Passes every prompt of a batch to the captioner in one `caption_many` call, counted."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    def caption(self, images, prompt, hints):
        raise AssertionError("the stage should ask for every prompt at once")

    def caption_many(self, images, prompts, hints):
        self.calls += 1
        return self.inner.caption_many(images, prompts, hints)


def test_transformers_engine_sends_the_chat_template_prompt(full_config, processor, crops):
    import torch
    from transformers import LlavaForConditionalGeneration

    captioner = LlavaCaptioner(with_engine(full_config, "transformers"), "cpu")
    assert captioner.name == "llava:tiny-llava"
    model = LlavaForConditionalGeneration.from_pretrained(full_config.models.llava).eval()
    hints = [{}] * len(crops)
    expected = []
    for question in (CAPTION_PROMPT, FACIAL_PROMPT):
        text = processor.apply_chat_template(
            chat(question), chat_template=LLAVA_15_CHAT_TEMPLATE, add_generation_prompt=True
        )
        answers = []
        for crop in crops:  # one at a time: no padding involved
            inputs = processor(images=[crop], text=[text], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            new = out[0, inputs["input_ids"].shape[1] :]
            answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
        assert captioner.caption(crops, question, hints) == answers
        expected.append(answers)
    assert len({a for answers in expected for a in answers}) > 1
    counting = CountingMany(captioner)
    fields = caption_fields(counting, crops, PROMPTS, hints)
    assert counting.calls == 1 and fields == dict(zip(PROMPTS, expected, strict=True))


@pytest.mark.gpu
def test_vllm_engine_captions_on_a_gpu(full_config, crops):
    vllm = pytest.importorskip("vllm")
    captioner = load_captioner(
        with_engine(full_config, "vllm").with_overrides(**{"models.device": "cuda"})
    )
    assert captioner.name == f"llava:tiny-llava+vllm-{vllm.__version__}"
    hints = [{}] * len(crops)
    answers = captioner.caption_many(crops, [CAPTION_PROMPT, FACIAL_PROMPT], hints)
    assert [len(a) for a in answers] == [len(crops), len(crops)]
    # The tiny tokenizer has one character per token, so the length bounds the tokens.
    assert all(isinstance(t, str) and len(t) <= MAX_NEW_TOKENS for a in answers for t in a)
    assert captioner.caption_many(crops, [CAPTION_PROMPT, FACIAL_PROMPT], hints) == answers
    assert captioner.caption(crops, FACIAL_PROMPT, hints) == answers[1]
    assert len({t for a in answers for t in a}) > 1, "answers should depend on image and prompt"
