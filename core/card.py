"""What makes a saved student ready to use: a model card and the prompt template it learned.

A student answers sensibly only when prompted the way it was trained (the instruction template
for dolly/alpaca rows, the prompt as is for prompt/response rows, the tokenizer's own chat
template for chat rows). That template is saved where `transformers` looks for one, the
tokenizer's `chat_template`, so `tokenizer.apply_chat_template(...)` builds the training prompt;
the model card (README.md) names teacher, student, data, settings and metrics, shows the
template and the code that loads the student. Files only: no torch, no transformers.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data import PROMPT_NO_INPUT

CARD_NAME = "README.md"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# The last user turn is the instruction (or the prompt); text outside the tags is kept verbatim.
_LAST_USER = (
    "{% set ns = namespace(text='') %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.text = message['content'] %}{% endif %}"
    "{% endfor %}"
)
_PREFIX, _SUFFIX = PROMPT_NO_INPUT.split("{instruction}")
# Chat templates are rendered without a template's final newline: the prompt's last "\n" is
# written as an expression, so it survives.
_KEPT_SUFFIX = _SUFFIX.removesuffix("\n") + ("{{ '\\n' }}" if _SUFFIX.endswith("\n") else "")
INSTRUCTION_TEMPLATE = f"{_LAST_USER}{_PREFIX}{{{{ ns.text }}}}{_KEPT_SUFFIX}"
PROMPT_AS_IS_TEMPLATE = f"{_LAST_USER}{{{{ ns.text }}}}"


def training_template(data_format: str) -> str | None:
    """The chat template that reproduces the training prompts of `data_format` (None: chat rows,
    whose prompts came from the tokenizer's own template when it has one)."""
    if data_format in ("dolly", "alpaca"):
        return INSTRUCTION_TEMPLATE
    if data_format == "prompt_response":
        return PROMPT_AS_IS_TEMPLATE
    return None


@dataclass(frozen=True)
class StudentCard:
    """Everything the card says that does not change from checkpoint to checkpoint."""

    job_id: str | None
    settings: dict[str, Any]  # as submitted: sources as the user named them
    data_format: str

    def write(self, model_dir: Path, *, step: int, metrics: dict[str, float]) -> None:
        """Save the template into the tokenizer and the card beside the weights in `model_dir`."""
        template = self._save_template(model_dir)
        (model_dir / CARD_NAME).write_text(
            self._card(template, step=step, metrics=metrics), encoding="utf-8"
        )

    def _save_template(self, model_dir: Path) -> str | None:
        config_path = model_dir / TOKENIZER_CONFIG
        config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        )
        own = config.get("chat_template")
        if (model_dir / TEMPLATE_FILE).exists():
            own = (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
        if isinstance(own, str) and self.data_format == "messages":
            return own  # chat rows were rendered with the tokenizer's own template
        template = training_template(self.data_format) or INSTRUCTION_TEMPLATE
        # One place for the template: the tokenizer's config, which every transformers version
        # reads; a stray chat_template.jinja would win over it in newer ones.
        (model_dir / TEMPLATE_FILE).unlink(missing_ok=True)
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return template

    def _card(self, template: str | None, *, step: int, metrics: dict[str, float]) -> str:
        s = self.settings
        dataset = s.get("dataset", {})
        knobs = ", ".join(
            f"{name} {s[name]}"
            for name in ("preset", "alpha", "lambda", "divergence", "anchor", "ce_weight")
            if s.get(name) is not None
        )
        rows = "\n".join(f"| `{name}` | {value:.4f} |" for name, value in sorted(metrics.items()))
        job = f"amid job `{self.job_id}`" if self.job_id else "`amid distill`"
        return textwrap.dedent(
            """\
            ---
            library_name: transformers
            pipeline_tag: text-generation
            tags: [distillation, amid]
            ---

            # Student distilled with AMiD

            Written by {job} at step {step}.

            - teacher: `{teacher}`
            - student (initial weights): `{student}`
            - dataset: `{source}` (format {data_format})
            - loss: {knobs}
            - steps: {steps}, batch size {batch}, learning rate {lr}

            ## Metrics at step {step}

            | metric | value |
            |---|---:|
            {rows}

            ## Prompt template

            The student was trained on prompts built by this template, saved as the tokenizer's
            `chat_template`:

            ```jinja
            {template}
            ```

            ## Load it

            ```python
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
            model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
            messages = [{{"role": "user", "content": "Name the capital of France."}}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(prompt, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=64)
            print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
            ```
            """
        ).format(
            job=job,
            step=step,
            teacher=s.get("teacher"),
            student=s.get("student"),
            source=dataset.get("source") if isinstance(dataset, dict) else dataset,
            data_format=self.data_format,
            knobs=knobs,
            steps=s.get("max_steps") or s.get("epochs"),
            batch=s.get("batch_size"),
            lr=s.get("learning_rate"),
            rows=rows or "| (none recorded) | |",
            template=template,
        )
