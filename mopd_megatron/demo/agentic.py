"""Toy world, agentic domain `lookup`: a task that cannot be solved without its tool.

Each prompt carries a private key-value store (`metadata["store"]`: 4 keys of 2 letters,
values of 3 letters, both from `ALPHABET`) and asks for one key: `get ab=`. The store is
reachable only through the `lookup` tool, so a guess scores 1/512 and one tool call scores 1:

    <bos><tools>lookup</tools><|user|>get ab=<eos><|assistant|>
    <tool_call>{"name":"lookup","arguments":{"key":"ab"}}</tool_call><eos>
    <|tool|><tool_response>hcf</tool_response><eos><|assistant|>hcf<eos>

Short fixed-length keys and values keep every copy at a fixed offset, which the tiny model
learns in a few hundred steps (a first design with 3-5 letter values from 26 letters gave a
teacher that called the tool but copied nothing after 150 steps).

The chat format (a Qwen3-shaped template over the toy characters plus JSON punctuation and
role / tool tokens) is this module's tokenizer. The base student is SFT'd on three kinds of
demonstration (KINDS): mostly guesses; readings, where a call and its output are already in
the context and only the answer is taught (the base can read a tool's output, as a pretrained
model can); and a `base_call_share` of calls, too few for the greedy base ever to call the
tool. The teacher is the base SFT'd on calls. SFT's loss sees only the assistant's tokens:
the observation and its template glue (after `</tool_call>` up to the next `<|assistant|>`)
carry no label. What the student must learn from its teacher's per-token signal is to call
the tool, with the right key (README: what was measured). Importing this module registers
the `lookup` environment (recipes list it in `rollout.environment_modules`).

Command line: `python -m mopd_megatron.demo.agentic --out runs/agentic` builds the world and
runs `recipes/agentic_demo.yaml` on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mopd_megatron.data import PromptRecord, save_prompts
from mopd_megatron.demo.models import new_student, save_hf
from mopd_megatron.demo.sft import IGNORE, SFTTrainer, sft_tensors
from mopd_megatron.demo.tokenizer import CHARACTERS, SPECIAL_TOKENS
from mopd_megatron.envs.environment import ToolEnvironment, register_environment
from mopd_megatron.envs.tools import Tool
from mopd_megatron.rollout.multi_turn import render

logger = logging.getLogger(__name__)

DOMAIN = ENVIRONMENT = "lookup"
ALPHABET = "abcdefgh"
"""Letters of keys and values: 8² = 64 keys, 8³ = 512 values."""
KEY_LENGTH, VALUE_LENGTH = 2, 3
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|tool|>", "<tools>", "</tools>", "<tool_call>",
               "</tool_call>", "<tool_response>", "</tool_response>"]
VOCAB = SPECIAL_TOKENS + CHARACTERS + list('{}":,') + CHAT_TOKENS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<tools>{% for t in tools %}{% if not loop.first %},{% endif %}"
    "{{ t.function.name }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "<|tool|><tool_response>{{ m.content }}</tool_response>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Qwen3's shape in miniature: roles as tokens, the tools offered, tool results wrapped in
<tool_response>, every message closed by <eos>; past messages are rendered verbatim."""


def lookup(store, key):
    """Look up `key` in this prompt's store."""
    return store.get(key, "none")


LOOKUP = Tool(lookup, "Look up the value stored under a key.",
              {"type": "object", "properties": {"key": {"type": "string"}},
               "required": ["key"]})
register_environment(  # the toy vocabulary cannot spell error messages: "error" stands for them
    ENVIRONMENT, lambda: ToolEnvironment([LOOKUP], state_key="store", error_text="error"))


def build_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer plus JSON punctuation and the chat tokens, with the template."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS + CHAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _word(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(ALPHABET, k=length))


def make_record(rng: random.Random, record_id: str) -> PromptRecord:
    """One prompt: a fresh 4-key store and a question about one of its keys."""
    store: dict[str, str] = {}
    while len(store) < 4:
        store[_word(rng, KEY_LENGTH)] = _word(rng, VALUE_LENGTH)
    key = rng.choice(sorted(store))
    return PromptRecord(domain=DOMAIN, messages=[{"role": "user", "content": f"get {key}="}],
                        answer=store[key], verifier="exact", environment=ENVIRONMENT,
                        id=record_id, metadata={"store": store})


KINDS = ("guess", "call", "read")
"""Demonstrations: `guess` the answer; `call` the tool and answer from its output; `read`:
the call and its output are already in the context and only the answer is taught, the way a
pretrained model has read tool transcripts it was never tuned to produce."""


def transcript(tokenizer, record: PromptRecord, kind: str) -> tuple[str, str]:
    """(prompt text without <bos>, the rest) of one demonstration of `kind` (see KINDS)."""
    tools = [LOOKUP.schema()]
    key = record.messages[0]["content"][4:-1]
    answer = record.answer if kind != "guess" else _word(random.Random(record.id), VALUE_LENGTH)
    call = json.dumps({"name": "lookup", "arguments": {"key": key}}, separators=(",", ":"))
    tool_turns = [{"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                  {"role": "tool", "content": record.answer}]
    context = record.messages + (tool_turns if kind == "read" else [])
    turns = (tool_turns if kind == "call" else []) + [{"role": "assistant", "content": answer}]
    prompt = render(tokenizer, context, tools, generation=True)
    full = render(tokenizer, context + turns, tools, generation=False)
    # sft_tensors adds <bos> and a final <eos> itself
    return prompt.removeprefix(tokenizer.bos_token), full[len(prompt):].removesuffix(
        tokenizer.eos_token)


@dataclass
class AgenticSettings:
    """Sizes and SFT schedules of the agentic world."""

    seed: int = 0
    n_train: int = 4000
    n_test: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    """Rate of the base's SFT."""
    teacher_lr: float = 3e-3
    warmup_steps: int = 20
    base_steps: int = 700
    """SFT steps of the base student: guesses, `base_call_share` tool calls and
    `base_read_share` readings of a tool's output (KINDS)."""
    base_call_share: float = 0.02
    """Share of the base's examples that call the tool: well below 1/8 (a guessed first
    letter's probability), so the greedy base never calls it."""
    base_read_share: float = 0.5
    """Share of the base's examples that answer from a tool output already in the context:
    the base can read what a tool returns; what it lacks is calling the tool."""
    teacher_steps: int = 300
    """SFT steps of the teacher from the base, on tool transcripts only."""
    teacher_batch_size: int = 64


def build_world(out_dir: str | Path, s: AgenticSettings | None = None) -> dict[str, Path]:
    """Tokenizer, prompt files, base student and teacher under `out_dir`; a stage whose
    folder exists is reused (the teacher then starts from the saved base)."""
    s = s or AgenticSettings()
    root = Path(out_dir).resolve()
    paths = {"base": root / "base", "teacher": root / "teacher",
             "train": root / "data" / "train.jsonl", "test": root / "data" / "test.jsonl"}
    if (root / "world.json").exists():
        return paths
    (root / "data").mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(root / "tokenizer")
    rng = random.Random(f"{s.seed}:agentic")
    test = [make_record(rng, f"test/{DOMAIN}/{i}") for i in range(s.n_test)]
    train = [make_record(rng, f"train/{DOMAIN}/{i}") for i in range(s.n_train)]
    save_prompts(train, paths["train"])
    save_prompts(test, paths["test"])
    started = time.perf_counter()
    if paths["base"].is_dir():
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    else:
        model = new_student(tokenizer, s.seed)
        _sft(model, tokenizer, train, s.base_steps,
             {"call": s.base_call_share, "read": s.base_read_share}, s, "base", s.batch_size,
             s.lr)
        save_hf(model, tokenizer, paths["base"])
    _sft(model, tokenizer, train, s.teacher_steps, {"call": 1.0}, s, "teacher",
         s.teacher_batch_size, s.teacher_lr)
    save_hf(model, tokenizer, paths["teacher"])
    (root / "world.json").write_text(json.dumps(
        {"settings": s.__dict__, "build_seconds": round(time.perf_counter() - started, 1)}))
    return paths


def assistant_tensors(pairs: list[tuple[str, str]], tokenizer) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """`sft_tensors` with no label on observations: the tokens after each `</tool_call>` up
    to and including the next `<|assistant|>` (the tool's output and the template's glue)."""
    ids, labels = sft_tensors(pairs, tokenizer)
    close, resume = tokenizer.convert_tokens_to_ids(["</tool_call>", "<|assistant|>"])
    for row, label in zip(ids.tolist(), labels):
        inside = False
        for j, token in enumerate(row):
            if inside:
                label[j] = IGNORE
            inside = (inside and token != resume) or token == close
    return ids, labels


def _sft(model, tokenizer, records, steps, shares: dict[str, float], s: AgenticSettings,
         name: str, batch_size: int, lr: float) -> None:
    """`steps` of assistant-only SFT on demonstrations drawn with `shares` per kind (the
    rest are guesses)."""
    trainer = SFTTrainer(model, tokenizer, lr, s.warmup_steps)
    rng = random.Random(f"{s.seed}:{name}")
    kinds, weights = list(shares) + ["guess"], list(shares.values())
    weights.append(1.0 - sum(weights))
    for _ in range(steps):
        batch = rng.sample(records, batch_size)
        loss = trainer.step([transcript(tokenizer, r, rng.choices(kinds, weights)[0])
                             for r in batch], assistant_tensors)
        if trainer.steps % 50 == 0:
            logger.info("%s %s loss %.3f", name, trainer.progress(steps), loss)


RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "agentic_demo.yaml"
QUICK_WORLD = AgenticSettings(n_train=64, n_test=8, batch_size=8, warmup_steps=2, base_steps=4,
                              teacher_steps=4, teacher_batch_size=8)
QUICK_RUN = {"train": {"steps": 2}, "data": {"prompts_per_step": 4},
             "parallel": {"micro_batch_size": 4}, "logging": {"eval_interval": 0},
             "rollout": {"batch_size": 4}}
"""`--quick`: a few steps of everything (smoke test), not a result."""


def main(argv: list[str] | None = None) -> int:
    """Build the agentic world and run the agentic recipe on it."""
    from mopd_megatron.config import TeacherConfig, edit_recipe, load_recipe, save_recipe

    parser = argparse.ArgumentParser(description="The agentic toy domain, end to end.")
    parser.add_argument("--out", default="runs/agentic")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    started = time.perf_counter()
    paths = build_world(out / "world", QUICK_WORLD if args.quick else None)
    print(f"agentic world ready in {time.perf_counter() - started:.0f} s", flush=True)
    recipe = edit_recipe(
        load_recipe(RECIPE), model={"hf_path": str(paths["base"])},
        data={"train_files": [str(paths["train"])], "eval_files": [str(paths["test"])]},
        teachers={"teachers": [TeacherConfig(name="lookup-teacher", domains=[DOMAIN],
                                             model_path=str(paths["teacher"]))]},
        logging={"dir": str(out / "run")})
    if args.quick:
        recipe = edit_recipe(recipe, **QUICK_RUN)
    path = save_recipe(recipe, out / "agentic_recipe.yaml")
    code = subprocess.call([sys.executable, "-m", "mopd_megatron.cli", "train", str(path),
                            *args.overrides])
    print(f"agentic demo finished in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
