"""Data stage: prompt loading and validation, tokenisation, the domain-mix sampler."""

import json
from collections import Counter

import pytest

from mopd_megatron.data import (
    DomainMixSampler,
    PromptDataError,
    PromptRecord,
    encode_prompt,
    load_prompts,
    save_prompts,
    tokenize_records,
)
from mopd_megatron.demo.tokenizer import build_char_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_prompts_fields_and_defaults(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "12+3=", "domain": "add", "answer": 15, "source": "gen"},
            "",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "domain": "code",
                "tests": ["assert f() == 1"],
                "verifier": "python",
                "id": "c1",
                "metadata": {"level": 2},
            },
        ],
    )
    first, second = load_prompts(path)
    assert first.prompt == "12+3=" and first.answer == "15" and first.domain == "add"
    assert first.id == f"{path}:1" and first.metadata == {"source": "gen"}
    assert second.messages[0]["content"] == "hi" and second.id == "c1"
    assert second.tests == ["assert f() == 1"] and second.metadata == {"level": 2}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", r"p\.jsonl:2: not valid JSON"),
        ('{"domain": "add"}', r"p\.jsonl:2: field 'prompt': exactly one"),
        ('{"prompt": "x", "messages": [], "domain": "add"}', r"p\.jsonl:2: field 'prompt'"),
        ('{"prompt": "x"}', r"p\.jsonl:2: field 'domain'"),
        ('{"prompt": "x", "domain": "add", "answer": [1]}', r"p\.jsonl:2: field 'answer'"),
        ('{"messages": [{"role": "user"}], "domain": "a"}', r"p\.jsonl:2: field 'messages\[0\]'"),
        ('{"prompt": "x", "domain": "add", "metadata": 3}', r"p\.jsonl:2: field 'metadata'"),
        ('{"prompt": "x", "domain": "geo"}', r"p\.jsonl:2: field 'domain': 'geo' is not one of"),
    ],
)
def test_load_prompts_errors_name_file_line_field(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "1+1=", "domain": "add"}', line])
    with pytest.raises(PromptDataError, match=expected):
        load_prompts(path, domains=["add", "a"])


def test_load_prompts_missing_file_and_format(tmp_path):
    with pytest.raises(PromptDataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(PromptDataError, match="unknown prompt file format"):
        load_prompts(tmp_path / "p.csv")


def test_parquet_round_trip_or_clear_error(tmp_path):
    path = tmp_path / "p.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(PromptDataError, match="needs pyarrow"):
            load_prompts(path)
        return
    pq.write_table(pa.Table.from_pylist([{"prompt": "ab", "domain": "rev", "answer": "ba"}]), path)
    assert load_prompts(path)[0].answer == "ba"


def test_save_load_round_trip(tmp_path):
    records = [PromptRecord(domain="rev", prompt="rev ab=", answer="ba", verifier="exact", id="r")]
    save_prompts(records, tmp_path / "r.jsonl")
    assert load_prompts(tmp_path / "r.jsonl") == records


def test_tokenisation_adds_bos_and_filters_long():
    tokenizer = build_char_tokenizer()
    short = PromptRecord(domain="rev", prompt="rev ab=")
    ids = encode_prompt(short, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "rev ab="
    long = PromptRecord(domain="rev", prompt="rev abcdefgh=")
    kept = tokenize_records([short, long], tokenizer, max_prompt_tokens=len(ids))
    assert [r.prompt for r in kept] == ["rev ab="] and kept[0].prompt_ids == ids
    with pytest.raises(PromptDataError, match="apply_chat_template"):
        encode_prompt(
            PromptRecord(domain="x", messages=[{"role": "user", "content": "a"}]), tokenizer
        )
    with pytest.raises(PromptDataError, match="no chat template"):
        encode_prompt(short, tokenizer, apply_chat_template=True)


def test_chat_template_renders_messages():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}="
    record = PromptRecord(domain="rev", messages=[{"role": "user", "content": "rev ab"}])
    ids = encode_prompt(record, tokenizer, apply_chat_template=True)
    assert tokenizer.decode(ids[1:]) == "rev ab ="


def pool(sizes):
    return [
        PromptRecord(domain=d, prompt=f"{d}{i}", id=f"{d}{i}")
        for d, n in sizes.items()
        for i in range(n)
    ]


def test_sampler_is_deterministic_and_resumes_exactly():
    records = pool({"add": 7, "rev": 5, "sort": 3})
    a = DomainMixSampler(records, 8, {"add": 0.35, "rev": 0.35, "sort": 0.3}, seed=3)
    b = DomainMixSampler(records, 8, {"add": 0.35, "rev": 0.35, "sort": 0.3}, seed=3)
    first = [[r.id for r in a.next_batch()] for _ in range(5)]
    assert first == [[r.id for r in b.next_batch()] for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store plain data
    later = [[r.id for r in a.next_batch()] for _ in range(4)]
    resumed = DomainMixSampler(records, 8, {"add": 0.35, "rev": 0.35, "sort": 0.3}, seed=3)
    resumed.load_state_dict(state)
    assert later == [[r.id for r in resumed.next_batch()] for _ in range(4)]
    other = DomainMixSampler(records, 8, {"add": 0.35, "rev": 0.35, "sort": 0.3}, seed=4)
    assert first != [[r.id for r in other.next_batch()] for _ in range(5)]
    with pytest.raises(ValueError, match="saved for pools"):
        DomainMixSampler(pool({"add": 2}), 8, seed=3).load_state_dict(state)


def test_sampler_mixing_ratios_and_epochs():
    records = pool({"add": 50, "rev": 30, "sort": 20})
    sampler = DomainMixSampler(records, 100, {"add": 0.35, "rev": 0.35, "sort": 0.30}, seed=0)
    batches = [sampler.next_batch() for _ in range(40)]
    counts = Counter(r.domain for batch in batches for r in batch)
    for domain, weight in {"add": 0.35, "rev": 0.35, "sort": 0.30}.items():
        assert abs(counts[domain] / 4000 - weight) < 0.02
    # Each epoch of a domain visits every prompt once before any repeats.
    sort_ids = [r.id for batch in batches for r in batch if r.domain == "sort"][:20]
    assert sorted(sort_ids) == sorted(f"sort{i}" for i in range(20))
    natural = DomainMixSampler(records, 100, seed=0)
    counts = Counter(r.domain for _ in range(40) for r in natural.next_batch())
    assert abs(counts["add"] / 4000 - 0.5) < 0.03 and abs(counts["sort"] / 4000 - 0.2) < 0.03
    only_rev = DomainMixSampler(records, 10, {"rev": 1.0, "add": 0.0}, seed=0)
    assert {r.domain for r in only_rev.next_batch()} == {"rev"}
    with pytest.raises(ValueError, match="no prompts"):
        DomainMixSampler(records, 10, {"geo": 1.0})
