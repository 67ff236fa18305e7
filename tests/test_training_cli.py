"""The training recipe end to end through `ttt`: scrape a fake subreddit with unmodified praw,
build sessions, fine-tune a tiny GPT-2 built on the fly (fully, and as a LoRA adapter), evaluate,
and serve the result as a persona through the core."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from core.config.loading import load_settings
from core.conversation import ConversationKey, Turn
from core.prompts import encode
from core.service import open_service
from fakes.reddit_server import FakeReddit
from test_train import school_threads, tiny_base
from ttt.cli import main

QUESTION = "where do you study this fall?"
FAST = ["--batch-size", "8", "--grad-accum", "1", "--eval-interval", "10", "--log-interval", "5"]


def ttt(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--config", str(config), *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Run the whole recipe once in a fresh working directory: r/berkeley fully fine-tuned on a
    random tiny GPT-2 with only default paths, then r/stanford as a LoRA adapter on that persona."""
    root = tmp_path_factory.mktemp("recipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other work: one thread is faster for a tiny model
    with FakeReddit() as fake, pytest.MonkeyPatch.context() as mp:
        for school, other in (("berkeley", "stanford"), ("stanford", "berkeley")):
            fake.add_subreddit(school)
            for title, comments in school_threads(school, other):
                fake.add_submission(school, title, "", "asker", comments=comments)
        mp.chdir(root)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("REDDIT_CLIENT_ID", fake.client_id)
        mp.setenv("REDDIT_CLIENT_SECRET", fake.client_secret)
        base = tiny_base(root / "tiny-gpt2")
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "reddit": {"oauth_url": fake.url, "reddit_url": fake.url},
            "training": {"base_model": str(base)},
        }))
        steps = {
            "scrape": ttt(config, "scrape", "berkeley"),
            "build": ttt(config, "build-data"),
            "train": ttt(config, "train", "--max-steps", "60", "--lr", "3e-3", *FAST),
            "eval": ttt(config, "eval", "--samples", "6"),
            "scrape-lora": ttt(config, "scrape", "stanford"),
            "build-lora": ttt(config, "build-data"),
            "train-lora": ttt(config, "train", "--lora", "--base-model", "./personalities/berkeley",
                              "--max-steps", "40", "--lr", "1e-2", *FAST),
            "eval-lora": ttt(config, "eval", "--samples", "3"),
        }
        for name, (code, out, err) in steps.items():
            assert code == 0, f"{name} failed: {err[-2000:]}"
        yield root, steps
    torch.set_num_threads(threads)


def snippet(output: str) -> dict:
    """The config.yaml lines `ttt train` printed."""
    text = output.split("To serve it, add to config.yaml:")[1].split("next:")[0]
    return yaml.safe_load(text)


async def persona_reply(root: Path, tmp_path: Path, name: str, persona: dict, text: str) -> str:
    """Serve `persona` (config lines) as the only persona through the core: its reply to `text`."""
    config = root / f"serve-{name}.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"default_persona": name}, "database": {"path": str(tmp_path / "chat.sqlite3")},
        "personas": {name: persona},
    }))
    service = await open_service(load_settings(config, environ={}).config)
    try:
        return await service.reply(ConversationKey("test", name), "alice", text, adapter="test")
    finally:
        await service.close()


def perplexities(output: str) -> list[float]:
    return [float(p) for p in re.findall(r"validation loss [\d.]+, perplexity ([\d.]+)", output)]


@pytest.mark.timeout(180)
def test_each_step_reads_what_the_previous_one_wrote(recipe):
    root, steps = recipe
    raw = root / "data/training/raw/berkeley.jsonl"
    assert len(raw.read_text().splitlines()) == 48
    assert "48 threads" in steps["scrape"][1] and "next: ttt build-data" in steps["scrape"][1]
    data = root / "data/training/berkeley"
    assert {"train.jsonl", "validation.jsonl", "report.json", "README.md"} <= {p.name for p in data.iterdir()}
    assert "train (" in steps["build"][1]
    personality = root / "personalities/berkeley"
    assert {"model.safetensors", "config.json", "tokenizer.json", "persona.json", "README.md", "eval.md"} <= {
        p.name for p in personality.iterdir()}
    assert (root / "data/training/checkpoints/berkeley/step-60/trainer_state.json").is_file()
    card = json.loads((personality / "persona.json").read_text())
    report = json.loads((data / "report.json").read_text())
    assert card["subreddit"] == "berkeley" and card["data"]["train_sessions"] == report["train_sessions"]
    assert card["data"]["validation_sessions"] == report["validation_sessions"] > 0
    assert json.loads((root / "data/training/latest.json").read_text()) == {
        "name": "stanford", "raw": str(root / "data/training/raw/stanford.jsonl"),
        "data": str(root / "data/training/stanford"), "personality": str(root / "personalities/stanford"),
    }


@pytest.mark.timeout(180)
def test_training_prints_its_numbers_and_validation_perplexity_falls(recipe):
    _, steps = recipe
    out = steps["train"][1]
    ppl = perplexities(out)
    assert len(ppl) == 7  # the base model, then every 10 steps
    assert ppl[-1] < ppl[0] / 10 and ppl == sorted(ppl, reverse=True)
    logged = re.findall(
        r"step +(\d+)/60 \| epoch +[\d.]+ \| loss ([\d.]+) \| lr ([\d.e+-]+) \| +[\d,]+ tok/s \| pad +\d+%", out)
    assert [int(s) for s, _, _ in logged] == list(range(5, 61, 5))
    assert float(logged[-1][1]) < float(logged[0][1]) / 2
    assert f"-> {ppl[-1]:.2f} after 60 steps (completed)" in out
    card = json.loads((recipe[0] / "personalities/berkeley/persona.json").read_text())
    assert card["validation"]["perplexity"] == pytest.approx(ppl[-1], rel=1e-2)


@pytest.mark.timeout(180)
async def test_the_trained_personality_answers_as_a_persona_of_the_core(recipe, tmp_path):
    root, steps = recipe
    persona = snippet(steps["train"][1])["personas"]["berkeley"]
    assert persona["model"] == "./personalities/berkeley" and persona["format"] == "dialogpt"
    persona["decoding"] = {"do_sample": False, "max_new_tokens": 16}
    assert "berkeley" in (await persona_reply(root, tmp_path, "berkeley", persona, QUESTION)).lower()


@pytest.mark.timeout(180)
def test_eval_writes_a_markdown_report_base_against_fine_tuned(recipe):
    root, steps = recipe
    report = (root / "personalities/berkeley/eval.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5}
    base_ppl, tuned_ppl, human_ppl = rows["validation perplexity"]
    assert float(tuned_ppl) < float(base_ppl) / 10 and human_ppl == ""
    for metric in ("distinct-1", "distinct-2", "average reply length (words)"):
        assert all(value for value in rows[metric]), metric
    assert float(rows["average reply length (words)"][1]) > 2
    assert report.count("\n| fine-tuned | ") == 6 and report.count("\n| base | ") == 6
    assert "berkeley" in report.split("## Replies")[1]
    assert "validation perplexity" in steps["eval"][1] and "eval.md" in steps["eval"][1]


@pytest.mark.timeout(180)
def test_lora_trains_an_adapter_that_answers_on_the_shared_base(recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, steps = recipe
    adapter = root / "personalities/stanford"
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "persona.json", "README.md", "eval.md"} <= files
    assert "model.safetensors" not in files
    card = json.loads((adapter / "persona.json").read_text())
    assert card["lora"]["r"] == 16 and card["base_model"] == str((root / "personalities/berkeley").resolve())
    ppl = perplexities(steps["train-lora"][1])
    assert ppl[-1] < 0.9 * ppl[0]  # the base already speaks the language: only the school changes
    persona = snippet(steps["train-lora"][1])["personas"]["stanford"]
    assert persona["model"] == "./personalities/berkeley" and persona["adapter"] == "./personalities/stanford"

    tokenizer = AutoTokenizer.from_pretrained(root / "personalities/berkeley")
    base = AutoModelForCausalLM.from_pretrained(root / "personalities/berkeley")
    prompt = torch.tensor([encode("dialogpt", tokenizer, [Turn("user", "alice", QUESTION)])])

    def answer(model) -> str:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)

    assert "berkeley" in answer(base)
    tuned = PeftModel.from_pretrained(base, str(adapter))
    assert "stanford" in answer(tuned)
    with tuned.disable_adapter():
        assert "berkeley" in answer(tuned)
    eval_report = (adapter / "eval.md").read_text()
    assert "LoRA adapter" in eval_report and "| validation perplexity |" in eval_report


@pytest.mark.timeout(180)
async def test_the_lora_persona_answers_through_the_core_next_to_its_base(recipe, tmp_path):
    root, steps = recipe
    greedy = {"do_sample": False, "max_new_tokens": 16}
    personas = {
        "berkeley": {**snippet(steps["train"][1])["personas"]["berkeley"], "decoding": greedy},
        "stanford": {**snippet(steps["train-lora"][1])["personas"]["stanford"], "decoding": greedy},
    }
    config = root / "serve-both.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"default_persona": "berkeley"}, "database": {"path": str(tmp_path / "chat.sqlite3")},
        "personas": personas,
    }))
    service = await open_service(load_settings(config, environ={}).config)
    try:
        replies = {name: await service.reply(ConversationKey("test", name), "alice", QUESTION, adapter="test",
                                             persona=name) for name in ("stanford", "berkeley")}
    finally:
        await service.close()
    assert "stanford" in replies["stanford"].lower() and "berkeley" in replies["berkeley"].lower()


@pytest.mark.timeout(120)
def test_problems_are_one_line_errors_without_tracebacks(recipe, tmp_path, monkeypatch):
    root, _ = recipe
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REDDIT_CLIENT_ID", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"training": {"base_model": str(root / "tiny-gpt2")}}))

    def fails(*args: str, match: str) -> None:
        code, _, err = ttt(config, *args)
        assert code == 2, args
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(match, errors[0]), err

    fails("scrape", "berkeley", match=r"ttt scrape: error: set REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET")
    fails("build-data", match=r"no current name: run `ttt scrape SUB` or `ttt import ...` first")
    fails("build-data", "--raw", "missing.jsonl", match=r"no scraped or imported threads at missing.jsonl")
    fails("train", match=r"ttt train: error: no current name")
    fails("train", "--data", "nowhere", match=r"no training data: nowhere/train.jsonl does not exist")
    fails("train", "--data", str(root / "data/training/berkeley"), "--base-model", "nobody/no-such-model",
          match=r"cannot load base model nobody/no-such-model \(offline")
    fails("train", "--data", str(root / "data/training/berkeley"), "--name", "no spaces", match=r"persona name")
    fails("train", "--data", str(root / "data/training/berkeley"), "--resume", match=r"no checkpoint to resume")
    fails("eval", match=r"no personality yet")
    fails("eval", "--personality", str(tmp_path), match=r"not a personality directory")

    with FakeReddit() as fake:
        monkeypatch.setenv("REDDIT_CLIENT_ID", fake.client_id)
        monkeypatch.setenv("REDDIT_CLIENT_SECRET", fake.client_secret)
        config.write_text(yaml.safe_dump({"reddit": {"oauth_url": fake.url, "reddit_url": fake.url}}))
        fails("scrape", "nosuchsub", match=r"r/nosuchsub does not exist")
        monkeypatch.setenv("REDDIT_CLIENT_SECRET", "wrong")
        fails("scrape", "nosuchsub", match=r"rejected the client credentials")
