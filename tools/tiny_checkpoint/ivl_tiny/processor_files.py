"""The files that make a native-layout checkpoint load in transformers' AutoProcessor, as the "-hf" releases do.

- processor_config.json: InternVLProcessor with a GotOcr2 image processor (crop_to_patches, min/max_patches from
  the spec's dynamic tiling, 448 px, ImageNet mean/std: the InternVL tiling) and InternVL's video processor,
  image_seq_length = tokens per tile;
- chat_template.jinja: the checkpoint's chat template (internlm2-chat or internvl2_5, MPT separators, the default
  system message of the template) where an image part is "<IMG_CONTEXT>\\n", which the processor expands to
  "<img>" + "<IMG_CONTEXT>" x 256 x tiles + "</img>" (the same tokens the split services put in the prompt);
- the tokenizer's start / end / context image tokens and a distinct video token (InternVLProcessor requires one),
  as extra_special_tokens in tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ivl_tiny.spec import TinySpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
VIDEO_TOKEN = "<video>"
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": VIDEO_TOKEN}
# The default system messages of the templates (InternVL's conversation.py, as ivl_llm.templates has them).
SYSTEM_MESSAGES = {
    "internlm2-chat": "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "internvl2_5": "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
}
SEPARATORS = {"internlm2-chat": "<|im_end|>", "internvl2_5": "<|im_end|>\n"}


def image_processor_dict(spec: TinySpec) -> dict[str, Any]:
    return {
        "image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True,
        "min_patches": spec.min_dynamic_patch, "max_patches": spec.max_dynamic_patch,
        "size": {"height": spec.image_size, "width": spec.image_size}, "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD, "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
    }


def processor_config(spec: TinySpec) -> dict[str, Any]:
    return {
        "processor_class": "InternVLProcessor",
        "image_seq_length": spec.tokens_per_tile,
        "image_processor": image_processor_dict(spec),
        "video_processor": {
            "video_processor_type": "InternVLVideoProcessor", "size": {"height": spec.image_size, "width": spec.image_size},
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_convert_rgb": True, "do_resize": True,
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        },
    }


def chat_template(template: str) -> str:
    if template not in SEPARATORS:
        raise ValueError(f"no chat_template.jinja for template {template!r}; known: {', '.join(SEPARATORS)}")
    sep = json.dumps(SEPARATORS[template])
    system = json.dumps(SYSTEM_MESSAGES[template], ensure_ascii=False)
    return (
        "{%- set sep = " + sep + " -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}\n"
        "{%- set messages = messages[1:] -%}\n"
        "{%- else -%}{%- set system = " + system + " -%}{%- endif -%}\n"
        "{{- '<|im_start|>system\\n' + system + sep -}}\n"
        "{%- for message in messages -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
        "{%- if message['content'] is string -%}{{- message['content'] | trim if message['role'] == 'assistant' "
        "else message['content'] -}}\n"
        "{%- else -%}{%- for part in message['content'] -%}\n"
        "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<IMG_CONTEXT>\\n' -}}\n"
        "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}\n"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim if message['role'] == 'assistant' "
        "else part['text'] -}}{%- endif -%}\n"
        "{%- endfor -%}{%- endif -%}\n"
        "{{- sep -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


def write_processor_files(folder: Path, spec: TinySpec) -> None:
    """processor_config.json, chat_template.jinja and the image tokens in tokenizer_config.json (after the
    tokenizer was saved)."""
    (folder / "processor_config.json").write_text(json.dumps(processor_config(spec), indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(chat_template(spec.chat_template_name))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["extra_special_tokens"] = dict(IMAGE_TOKENS)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
