"""`vlm export`: a checkpoint as a transformers `LlavaForConditionalGeneration` folder.

The folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and no vlm code, so serving
engines that read LLaVA checkpoints can run it. Only what LLaVA can express exactly is exported:
a Hugging Face CLIP/SigLIP tower, no token compression, and an LM whose causal-LM head is a plain
linear layer over its decoder (checked numerically, since some heads scale or softcap logits).
The LM is the one vlm runs: a stage-2 LoRA adapter is merged into its weights (peft's own merge),
and a fully fine-tuned LM (the checkpoint's `lm/` folder) replaces the base LM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vlm.config import ConfigError
from vlm.files import atomic_dir
from vlm.language_model import IMAGE_TOKEN
from vlm.model import VisionLanguageModel, read_checkpoint_config
from vlm.prompts import SHORT_ANSWER

# The processor's template turns transformers' multimodal message format ([{"type": "image"},
# {"type": "text", "text": ...}]) into the text vlm feeds the LM's own template: `<image>\n` where
# the image goes, then the text. Plain string contents pass through unchanged.
CONTENT_TO_TEXT = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set converted.messages = converted.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages %}"
)


def system_prompt_template(system_prompt: str | None) -> str:
    """A chat-template preamble giving a conversation without a system message the one vlm trained with
    (model.lm.system_prompt, as VLMProcessor adds it); nothing when training kept the template's default."""
    if system_prompt is None:
        return ""
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system_prompt) + "}] + messages -%}"
            "{%- endif -%}")


def export_llava(checkpoint: str, out: str) -> None:
    """Write `out` as a LLaVA folder (config, safetensors weights, processor); refuse what LLaVA cannot express."""
    from transformers import AutoImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = read_checkpoint_config(checkpoint)
    check_exportable(config, Path(checkpoint))
    target = Path(out)
    check_target(target)

    # The model `vlm chat` runs: a fine-tuned LM comes from the checkpoint's lm/ folder, LoRA wraps the LM.
    model = VisionLanguageModel.from_pretrained(checkpoint)
    if hasattr(model.lm, "peft_config"):
        model.lm = merge_lora(model.lm, checkpoint)
    tower, lm, tokenizer = model.vision.tower, model.lm, model.tokenizer
    check_lm_head(lm, config.lm.name)
    image_token_id = model.processor.image_token_id
    grow_vocab(lm, image_token_id + 1)

    # SigLIP has no CLS token; LLaVA's "default" strategy would drop its first patch instead.
    has_cls = tower.config.model_type.startswith("clip")
    strategy = "default" if has_cls and config.vision.drop_cls else "full"
    linear = config.projector.type == "linear"
    # What the loaded LM does, not what its config claims: a config may say tied over two distinct matrices.
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    llava_config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config={**lm.config.to_dict(), "tie_word_embeddings": tied},
        image_token_index=image_token_id,
        image_seq_length=model.processor.num_image_tokens,
        # LLaVA's projector is always linear_1 -> act -> linear_2; `linear` is linear_1 with identity after it.
        projector_hidden_act="linear" if linear else "gelu",
        vision_feature_layer=config.vision.feature_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    llava_config.dtype = lm.dtype

    # Built on the meta device and given vlm's own modules, so the export never holds two copies of the LM.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    llava.model.vision_tower = tower
    llava.model.language_model = lm.base_model
    llava.lm_head = lm.get_output_embeddings()
    projector = LlavaMultiModalProjector(llava_config)
    projector.load_state_dict(projector_weights(model))
    llava.model.multi_modal_projector = projector
    llava.to(lm.dtype)
    llava.generation_config = lm.generation_config
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    # The image placeholder is input only; vlm's LM never predicts it, so neither may the export.
    llava.generation_config.suppress_tokens = [image_token_id]

    preamble = CONTENT_TO_TEXT + system_prompt_template(config.lm.system_prompt)
    tokenizer.chat_template = preamble + tokenizer.chat_template
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(config.vision.name),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if has_cls else 0,
    )

    with atomic_dir(target) as staging:
        llava.save_pretrained(staging)
        processor.save_pretrained(staging)
    note = short_answer_note(config.lm.short_answer_prompt)
    if note:
        print(note, file=sys.stderr)


def short_answer_note(short_answer_prompt: str) -> str | None:
    """What a user of the export must know where training asked short-answer questions otherwise than LLaVA-1.5:
    the instruction is part of each question's text, which no chat template or config of the folder carries,
    and LLaVA-style harnesses (lmms-eval) append LLaVA's."""
    if short_answer_prompt == SHORT_ANSWER:
        return None
    asked = ("alone, with no instruction after them" if not short_answer_prompt
             else f"followed by {json.dumps(short_answer_prompt)}")
    return (f"note: this model was trained on short-answer questions asked {asked} "
            f"(model.lm.short_answer_prompt), not followed by LLaVA-1.5's {json.dumps(SHORT_ANSWER)}; "
            "ask it the same way, since harnesses that append LLaVA's instruction ask it otherwise")


def check_exportable(config, checkpoint: Path) -> None:
    if config.vision.backend != "hf":
        raise ConfigError(
            f"cannot export {checkpoint}: its vision tower is {config.vision.backend}:{config.vision.name}, and "
            "LLaVA in transformers loads only Hugging Face CLIP/SigLIP towers (model.vision.backend=hf)"
        )
    if config.projector.compress != "none":
        raise ConfigError(
            f"cannot export {checkpoint}: its projector compresses image tokens "
            f"(model.projector.compress={config.projector.compress}), which LLaVA in transformers has no way to do; "
            "train with compress=none to export"
        )
    if config.projector.norm != "none":
        raise ConfigError(
            f"cannot export {checkpoint}: its projector normalises features first "
            f"(model.projector.norm={config.projector.norm}), which LLaVA's projector has no layer for; "
            "train with norm=none to export"
        )


def merge_lora(lm, checkpoint: str):
    """The LoRA-wrapped LM as a plain transformers model with the adapter merged into its weights.

    vlm train's LoRA (target_modules="all-linear") adapts the decoder's linear layers only: peft leaves
    out the output layer, so the LM head stays the model's own linear (tied or not), which
    check_lm_head verifies after the merge. An adapter on the embeddings or the head of an LM that ties
    them cannot be merged faithfully: the change would land in the one shared matrix, so in both ends.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = lm.get_base_model()
    ends = {"input embeddings": base.get_input_embeddings(), "LM head": base.get_output_embeddings()}
    adapted = [name for name, module in ends.items() if isinstance(module, BaseTunerLayer)]
    if adapted and ends["LM head"].weight is ends["input embeddings"].weight:
        raise ConfigError(
            f"cannot export {checkpoint}: its LoRA adapter changes the {' and '.join(adapted)} of an LM whose "
            "input and output embeddings are one shared matrix, so merging it would change both ends; "
            "train LoRA on the decoder's linear layers (vlm train's target_modules=all-linear does)"
        )
    return lm.merge_and_unload()


def check_target(target: Path) -> None:
    """Replace only an earlier export or an empty folder, never unrelated files."""
    if not target.exists():
        return
    config_file = target / "config.json"
    is_export = config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "llava"
    if not target.is_dir() or not (is_export or not any(target.iterdir())):
        raise ConfigError(f"--out {target} exists and is not an earlier LLaVA export; pass a new or empty folder")


def check_lm_head(lm, name: str) -> None:
    """LLaVA computes logits as lm_head(decoder(x)); refuse LMs whose own head does more."""
    from transformers import AutoModel

    with torch.device("meta"):
        llava_decoder = AutoModel.from_config(lm.config)
    head = lm.get_output_embeddings()
    if type(llava_decoder) is not type(lm.base_model) or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ConfigError(
            f"cannot export: LLaVA would rebuild the LM {name} as {type(llava_decoder).__name__} plus a bias-free "
            f"linear head, but it is {type(lm.base_model).__name__} with head {head}"
        )
    probe = torch.arange(min(8, lm.config.vocab_size), device=lm.device).unsqueeze(0)
    with torch.no_grad():
        own = lm(input_ids=probe).logits
        rebuilt = head(lm.base_model(input_ids=probe).last_hidden_state)
    if not torch.allclose(own.float(), rebuilt.float(), rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"cannot export: {name}'s causal-LM head transforms logits beyond its linear layer "
            "(logit scaling or softcapping), which LLaVA in transformers does not reproduce"
        )


def grow_vocab(lm, size: int) -> None:
    """Give the image placeholder an embedding row. Its input row is always overwritten by image
    features; its output row is zero (and generation suppresses it), so it changes no prediction."""
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:] = 0
        lm.get_output_embeddings().weight[old:] = 0


def projector_weights(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """vlm's projector as LLaVA's linear_1 / linear_2."""
    proj = model.projector.proj
    if isinstance(proj, torch.nn.Linear):
        lm_dim = proj.out_features
        return {"linear_1.weight": proj.weight, "linear_1.bias": proj.bias,
                "linear_2.weight": torch.eye(lm_dim), "linear_2.bias": torch.zeros(lm_dim)}
    return {"linear_1.weight": proj[0].weight, "linear_1.bias": proj[0].bias,
            "linear_2.weight": proj[2].weight, "linear_2.bias": proj[2].bias}
