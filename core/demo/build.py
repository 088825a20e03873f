"""Build the demo kit: `python -m core.demo.build` (offline, deterministic, a few CPU minutes).

1. Generate the distillation data (`data/demo.jsonl`) and, with another seed, the teacher's own
   training rows (not shipped: they are only the teacher's schooling).
2. Train a byte-level BPE tokenizer on both with the `tokenizers` library.
3. Train a tiny GPT-2 teacher on its rows (plain next-token cross-entropy on responses) and
   report its ROUGE-L on the demo data's rows.
4. Initialise a smaller GPT-2 student (untrained).

The outputs are committed, so the demo and the tests use them without running this.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.data import (
    Example,
    TrainStream,
    instruction_prompt,
    tokenize_example,
)
from core.demo import DATA_FILE, STUDENT_DIR, TEACHER_DIR, TOKENIZER_DIR
from core.demo.tasks import generate_rows
from core.evaluate import generate, rouge_l
from core.settings import GenerationSettings

EOS = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 1024
DEMO_ROWS = 2400
TEACHER_ROWS = 8000
DEMO_SEED, TEACHER_SEED = 1, 2  # different seeds: many demo prompts are new to the teacher
MAX_LENGTH = 128


def _example(row: dict[str, str]) -> Example:
    return Example(instruction_prompt(row["instruction"], row["context"]), row["response"])


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )


def gpt2(vocab_size: int, n_embd: int, n_layer: int, n_head: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=MAX_LENGTH,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # No dropout: the models are far too small to overfit in the few steps they train.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(config)


def train_sft(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    *,
    steps: int,
    seed: int,
    warmup: int = 100,
) -> None:
    """Plain next-token cross-entropy on the responses (supervised fine-tuning)."""
    examples = [tokenize_example(_example(r), tokenizer, 96, MAX_LENGTH) for r in rows]
    stream = TrainStream(examples, batch_size=32, pad_id=int(tokenizer.pad_token_id), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    start = time.monotonic()
    for step in range(steps):
        batch = stream.next()
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"sft step {step}: loss {out.loss.item():.3f} ({time.monotonic() - start:.0f}s)")
    model.eval()


def score(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]
) -> float:
    examples = [tokenize_example(_example(r), tokenizer, 96, MAX_LENGTH) for r in rows]
    predictions = generate(
        model,
        tokenizer,
        examples,
        GenerationSettings(max_new_tokens=24, do_sample=False),
        batch_size=64,
        seed=0,
        device=torch.device("cpu"),
    )
    return rouge_l(predictions, [r["response"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    demo_rows = generate_rows(DEMO_ROWS, seed=DEMO_SEED)
    teacher_rows = generate_rows(TEACHER_ROWS, seed=TEACHER_SEED)
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text("".join(json.dumps(r) + "\n" for r in demo_rows), encoding="utf-8")

    texts = [e.prompt + e.response for e in map(_example, demo_rows + teacher_rows)]
    tokenizer = build_tokenizer(texts)
    for directory in (TOKENIZER_DIR, TEACHER_DIR, STUDENT_DIR):
        shutil.rmtree(directory, ignore_errors=True)
    tokenizer.save_pretrained(TOKENIZER_DIR)

    # Sizes: GPT-2 small is n_embd=768, n_layer=12, n_head=12, vocab 50257.
    teacher = gpt2(len(tokenizer), n_embd=128, n_layer=4, n_head=4)
    train_sft(teacher, tokenizer, teacher_rows, steps=args.teacher_steps, seed=0)
    print(f"teacher ROUGE-L on 256 demo rows: {score(teacher, tokenizer, demo_rows[:256]):.3f}")
    teacher.save_pretrained(TEACHER_DIR)
    tokenizer.save_pretrained(TEACHER_DIR)

    student = gpt2(len(tokenizer), n_embd=64, n_layer=2, n_head=2)
    print(f"student ROUGE-L on 256 demo rows: {score(student, tokenizer, demo_rows[:256]):.3f}")
    student.save_pretrained(STUDENT_DIR)
    tokenizer.save_pretrained(STUDENT_DIR)
    for path in sorted(Path(TEACHER_DIR).parent.rglob("*.safetensors")):
        print(f"{path.relative_to(Path(TEACHER_DIR).parent)}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
