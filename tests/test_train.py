"""training.train: examples, batches, schedule, and real fine-tunes of a tiny GPT-2 built on the fly."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from core.config.schema import Config
from core.conversation import Turn
from core.engine.models import ModelSource, choose_placement, load_model
from accumulation import RANK_BATCHES, batches, gradient, tiny_model
from core.prompts import IGNORE_INDEX, encode_for_training
from tiny import build_tokenizer
from training.evaluate import EvalConfig, evaluate
from training.examples import LengthGroupedBatches, collate, encode_session, session_turns
from training.personality import config_snippet
from training.train import TrainError, learning_rate, step_gradients, train
from training.train_config import TrainConfig

SEASONS = ["fall", "spring", "summer", "winter"]
THINGS = ["library", "campus", "food", "weather", "people", "lakes"]


def school_threads(school: str, other: str) -> list[tuple[str, list[dict]]]:
    """(title, comment tree) of 48 threads of a campus subreddit, learnable in a few dozen steps:
    asked where they study, people answer `school`; asked where they went, `other`."""
    threads = []
    for i in range(24):
        season, thing = SEASONS[i % 4], THINGS[i // 4]
        threads.append((f"where do you study this {season}?", [
            {"author": f"student{i}", "body": f"I study at {school} and I love the {thing}", "replies": [
                {"author": f"asker{i}", "body": "that is so cool, I want to go there", "replies": [
                    {"author": f"student{i}", "body": f"you should come to {school}, it is great"}]}]},
            {"author": f"other{i}", "body": f"I study at {school} and the {thing} is nice"},
        ]))
        threads.append((f"where did you go this {season}?", [
            {"author": f"student{i}", "body": f"I went to {other} to see the {thing}"},
        ]))
    return threads


def thread_sessions(threads: list[tuple[str, list[dict]]]) -> list[dict]:
    """Root-to-leaf sessions of the threads, as `ttt build-data` writes them (no filtering needed)."""
    sessions = []

    def walk(path, comments, thread_id):
        for c in comments:
            turns = path + [{"author": c["author"], "text": c["body"]}]
            if c.get("replies"):
                walk(turns, c["replies"], thread_id)
            else:
                sessions.append({"turns": turns, "submission_id": thread_id})

    for i, (title, comments) in enumerate(threads):
        walk([{"author": "op", "text": title}], comments, f"t{i}")
    return sessions


def tiny_base(path: Path, dropout: float = 0.1) -> Path:
    """A randomly initialised 2-layer GPT-2 and a BPE tokenizer (no chat template, like DialoGPT)."""
    texts = [t["text"] for school, other in (("berkeley", "stanford"), ("stanford", "berkeley"))
             for s in thread_sessions(school_threads(school, other)) for t in s["turns"]]
    tokenizer = build_tokenizer(texts)
    tokenizer.chat_template = None
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                       resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two cores shared with other work: one intra-op thread is several times faster for a tiny model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base") / "tiny-gpt2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    sessions = thread_sessions(school_threads("berkeley", "stanford"))
    validation = [s for s in sessions if int(s["submission_id"][1:]) % 8 == 0]
    out = tmp_path_factory.mktemp("data") / "berkeley"
    out.mkdir()
    for name, rows in (("train", [s for s in sessions if s not in validation]), ("validation", validation)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in rows))
    (out / "report.json").write_text(json.dumps({"subreddits": ["berkeley"]}))
    return out


def turns(*texts: str) -> list[dict]:
    return [{"author": f"user{i % 2}", "text": t} for i, t in enumerate(texts)]


@pytest.mark.timeout(30)
def test_roles_dialogpt_first_turn_is_context_chat_alternates_back_from_the_reply():
    session = turns("a b", "c d", "e f", "g h")
    assert [t.role for t in session_turns(session, "dialogpt")] == ["user", "bot", "bot", "bot"]
    assert [t.role for t in session_turns(session, "chat")] == ["user", "bot", "user", "bot"]
    assert [t.role for t in session_turns(session[:3], "chat")] == ["user", "user", "bot"]


@pytest.mark.parametrize("fmt", ["dialogpt", "chat"])
@pytest.mark.timeout(30)
def test_loss_falls_on_replies_only_never_on_the_first_turn_or_padding(tokenizer, fmt):
    long = encode_session(turns("hello how are you", "I am fine thanks", "the word is apple"), fmt, tokenizer, 512)
    short = encode_session(turns("hello how are you", "fine"), fmt, tokenizer, 512)
    batch = collate([long[:2], short[:2]], tokenizer.pad_token_id)
    first_turn = len(encode_for_training(fmt, tokenizer, [Turn("user", "u", "hello how are you")])[0])
    for row, (ids, labels, _) in enumerate((long, short)):
        got = batch["labels"][row].tolist()
        assert got[:first_turn] == [IGNORE_INDEX] * first_turn  # the first turn is context
        assert got[len(ids):] == [IGNORE_INDEX] * (batch["labels"].shape[1] - len(ids))  # padding
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (len(got) - len(ids))
        targets = [(i, t) for i, t in enumerate(got) if t != IGNORE_INDEX]
        assert targets and all(ids[i] == t for i, t in targets)
    reply = tokenizer.decode([t for t in batch["labels"][1].tolist() if t != IGNORE_INDEX], skip_special_tokens=True)
    assert "fine" in reply and "hello" not in reply


@pytest.mark.timeout(30)
def test_truncation_keeps_the_newest_whole_turns_then_the_newest_tokens(tokenizer):
    session = turns(*(f"the word is {w} again" for w in ("apple", "river", "cloud", "tiger", "piano", "lemon")))
    newest_three = encode_for_training("dialogpt", tokenizer, session_turns(session[3:], "dialogpt"))
    newest_four = encode_for_training("dialogpt", tokenizer, session_turns(session[2:], "dialogpt"))
    assert len(newest_three[0]) < len(newest_four[0])
    ids, labels, truncated = encode_session(session, "dialogpt", tokenizer, len(newest_four[0]) - 1)
    assert truncated and (ids, labels) == newest_three  # "tiger" is context now: no loss on it
    assert tokenizer.decode(ids).startswith("the word is tiger")

    two = turns("the word is apple again", "the word is river again and again and again")
    ids, labels, truncated = encode_session(two, "dialogpt", tokenizer, 6)
    full_ids, full_labels = encode_for_training("dialogpt", tokenizer, session_turns(two, "dialogpt"))
    assert truncated and ids == full_ids[-6:] and labels == full_labels[-6:]
    assert encode_session(turns("only one turn here"), "dialogpt", tokenizer, 64) is None  # nothing to learn


@pytest.mark.timeout(30)
def test_length_grouped_batches_cover_every_example_and_cut_padding():
    lengths = [(i * 37) % 200 + 5 for i in range(500)]

    def padding(group: bool, epoch: int = 0) -> tuple[float, list[list[int]]]:
        sampler = LengthGroupedBatches(lengths, 16, group, seed=3)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(500)) and len(batches) == len(sampler)
        total = sum(16 * max(lengths[i] for i in b) if len(b) == 16 else len(b) * max(lengths[i] for i in b)
                    for b in batches)
        return 1 - sum(lengths) / total, batches

    grouped, batches = padding(True)
    plain, _ = padding(False)
    assert grouped < 0.1 < 0.3 < plain
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    assert padding(True)[1] == batches and padding(True, epoch=1)[1] != batches  # seeded per epoch


@pytest.mark.timeout(30)
def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(Path("."), Path("."), Path("."), warmup_fraction=0.1, min_lr_fraction=0.1)
    lrs = [learning_rate(step, 100, 1.0, cfg) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


def targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.timeout(30)
def test_accumulated_gradient_is_the_gradient_of_the_whole_step_at_once(tokenizer):
    from accelerate import Accelerator

    micro = batches(tokenizer, [["long0", "long1"], ["short0", "short1"]])  # as length grouping makes them
    assert targets(micro[0]) > 10 * targets(micro[1])
    whole = batches(tokenizer, [["long0", "long1", "short0", "short1"]])[0]

    model = tiny_model()
    model(**whole).loss.backward()  # transformers' own mean over every target token of the step
    expected, expected_loss = gradient(model), model(**whole).loss.item()

    model = tiny_model()
    loss = step_gradients(Accelerator(cpu=True), model, micro)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(gradient(model), expected, rtol=1e-4, atol=1e-7)

    model = tiny_model()  # a mean per micro-batch, as before: the few short targets weigh as much as the rest
    for batch in micro:
        (model(**batch).loss / len(micro)).backward()
    assert (gradient(model) - expected).norm() > 0.1 * expected.norm()


@pytest.mark.timeout(90)
def test_accumulation_across_processes_weighs_every_target_token_alike(tokenizer):
    """Two DDP processes (gloo on CPU), one with nearly all the targets: the gradient they agree on
    is the gradient of all their micro-batches at once."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    # Its own folder: pytest's shared numbered temp folders can be pruned by another pytest run meanwhile.
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "step.pt"
        log_path = Path(folder) / "workers.log"
        with log_path.open("w") as log_file:  # a file, not a pipe: a stray worker cannot hold it open
            workers = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 str(root / "tests" / "accumulation.py"), str(out)],
                env=env, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
            )
            try:
                workers.wait(timeout=80)
            except subprocess.TimeoutExpired:
                os.killpg(workers.pid, signal.SIGKILL)  # torchrun and the workers it leads
                workers.wait()
        assert workers.returncode == 0, log_path.read_text()[-3000:]
        result = torch.load(out)
    assert result["processes"] == 2

    everything = [name for rank in RANK_BATCHES for batch in rank for name in batch]
    model = tiny_model()
    loss = model(**batches(tokenizer, [everything])[0]).loss
    loss.backward()
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(result["gradient"], gradient(model), rtol=1e-4, atol=1e-7)


@pytest.mark.timeout(60)
def test_training_in_micro_batches_follows_one_big_batch(data_dir, tmp_path):
    """8 sessions a step as 4 x 2 accumulated or as 8 at once (no length grouping, so a step holds the
    same sessions either way; no dropout): the same losses, step by step."""
    base = tiny_base(tmp_path / "base", dropout=0.0)
    runs = {}
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        work = tmp_path / f"{batch_size}x{grad_accum}"
        runs[grad_accum] = train(train_config(base, data_dir, work, batch_size=batch_size, grad_accum=grad_accum,
                                              group_by_length=False, max_steps=12, eval_interval=12), quiet=True)
    assert sorted(runs[2].losses) == list(range(1, 13))
    for step, loss in runs[1].losses.items():
        assert runs[2].losses[step] == pytest.approx(loss, rel=1e-4), step
    assert runs[2].perplexity == pytest.approx(runs[1].perplexity, rel=1e-4)


def train_config(base_dir: Path, data_dir: Path, work: Path, **overrides) -> TrainConfig:
    settings = dict(
        data_dir=data_dir, out_dir=work / "personalities" / "berkeley", checkpoint_dir=work / "checkpoints",
        name="berkeley", base_model=str(base_dir), max_steps=20, batch_size=8, grad_accum=2,
        learning_rate=3e-3, eval_interval=10, log_interval=1, patience=None,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def finished_run(base_dir, data_dir, tmp_path_factory):
    """20 steps with a validation and a checkpoint every 10; what it printed."""
    work = tmp_path_factory.mktemp("run")
    cfg = train_config(base_dir, data_dir, work)
    return cfg, train(cfg, quiet=True)


@pytest.mark.timeout(60)
def test_training_writes_a_personality_the_core_loads_and_perplexity_falls(finished_run, monkeypatch):
    cfg, result = finished_run
    assert result.steps == 20 and result.stopped == "completed"
    assert result.perplexity < result.base_perplexity / 10
    assert sorted(result.losses) == list(range(1, 21)) and result.losses[20] < result.losses[1] / 2
    assert 0 < result.padding_share < 0.5 and result.tokens_per_s > 0
    files = {p.name for p in cfg.out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "persona.json",
            "README.md"} <= files
    assert not any(p.name.startswith("adapter") for p in cfg.out_dir.iterdir())
    card = json.loads((cfg.out_dir / "persona.json").read_text())
    assert card["subreddit"] == "berkeley" and card["base_model"] == str(Path(cfg.base_model).resolve())
    assert card["format"] == "dialogpt" and card["lora"] is None
    assert card["validation"]["perplexity"] == pytest.approx(result.perplexity)
    assert card["validation"]["base_perplexity"] == pytest.approx(result.base_perplexity)
    assert card["data"]["train_sessions"] > 0 and card["data"]["validation_sessions"] > 0
    assert card["training"]["steps"] == 20 and card["training"]["grad_accum"] == 2
    assert f"{result.perplexity:.2f}" in (cfg.out_dir / "README.md").read_text()
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == ["step-10", "step-20"]

    model, tokenizer = load_model(ModelSource(str(cfg.out_dir)), choose_placement("cpu"))
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id

    monkeypatch.chdir(cfg.out_dir.parent.parent)
    snippet = yaml.safe_load(config_snippet(card, cfg.out_dir))
    assert snippet["personas"]["berkeley"]["model"] == "./personalities/berkeley"
    Config.model_validate({"service": {"default_persona": "berkeley"}, **snippet})


@pytest.mark.timeout(60)
def test_resume_continues_exactly_where_it_stopped(finished_run, base_dir, data_dir, tmp_path):
    cfg, first = finished_run
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(cfg.checkpoint_dir / "step-10", checkpoints / "step-10")  # as if stopped after step 10
    resumed = train(train_config(base_dir, data_dir, tmp_path, checkpoint_dir=checkpoints, resume="latest"), quiet=True)
    assert sorted(resumed.losses) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed.losses[step] == pytest.approx(first.losses[step], rel=1e-5), step
    assert resumed.perplexity == pytest.approx(first.perplexity, rel=1e-5)
    assert resumed.base_perplexity == pytest.approx(first.base_perplexity)  # carried in the checkpoint
    assert (checkpoints / "step-20" / "trainer_state.json").is_file()


@pytest.mark.timeout(60)
def test_early_stopping_keeps_the_best_weights(base_dir, data_dir, tmp_path):
    # Validation on the training replies with their words reversed: it improves while the model
    # learns which words occur, then worsens as it learns their order.
    train_sessions = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    reversed_dir = tmp_path / "reversed"
    reversed_dir.mkdir()
    shutil.copy(data_dir / "train.jsonl", reversed_dir / "train.jsonl")
    (reversed_dir / "validation.jsonl").write_text("".join(
        json.dumps({"turns": [{"author": t["author"], "text": " ".join(t["text"].split()[::-1])} for t in s["turns"]],
                    "submission_id": "v"}) + "\n" for s in train_sessions[:12]))
    cfg = train_config(base_dir, reversed_dir, tmp_path, max_steps=80, grad_accum=1, eval_interval=5, patience=2,
                       log_interval=5)
    result = train(cfg, quiet=True)
    card = json.loads((cfg.out_dir / "persona.json").read_text())
    assert result.stopped == "early stopping" and result.steps < 80
    assert card["training"]["stopped"] == "early stopping" and card["training"]["steps"] == result.steps
    assert card["validation"]["step"] == result.steps - 10  # two validations without a new best
    evaluation = evaluate(EvalConfig(personality=cfg.out_dir, samples=1))  # the weights on disk are the best
    assert evaluation.tuned.perplexity == pytest.approx(result.perplexity, rel=1e-4)


@pytest.mark.timeout(30)
def test_clear_errors(finished_run, base_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainError, match=r"no training data: .*train.jsonl does not exist"):
        train(train_config(base_dir, tmp_path / "nothing", tmp_path), quiet=True)
    with pytest.raises(TrainError, match=r"cannot load base model nobody/no-such-model \(offline") as exc:
        train(train_config("nobody/no-such-model", data_dir, tmp_path), quiet=True)
    assert "\n" not in str(exc.value)
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train(train_config(base_dir, data_dir, tmp_path, resume="latest"), quiet=True)
    checkpoint = str(finished_run[0].checkpoint_dir / "step-10")
    with pytest.raises(TrainError, match=r"step-10 was trained with batch_size 8 \(now 4\): resume with the same"):
        train(train_config(base_dir, data_dir, tmp_path, resume=checkpoint, batch_size=4), quiet=True)


@pytest.mark.timeout(30)
def test_perplexity_is_exp_of_the_mean_target_loss(finished_run):
    _, result = finished_run
    card = json.loads((result.out_dir / "persona.json").read_text())
    assert math.exp(card["validation"]["loss"]) == pytest.approx(result.perplexity)


@pytest.mark.timeout(60)
def test_eval_skips_a_held_out_context_too_long_to_reply_to(finished_run, data_dir, tmp_path):
    cfg, _ = finished_run
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    normal = json.loads((data_dir / "validation.jsonl").read_text().splitlines()[0])
    too_long = {"turns": [{"author": "a", "text": "the word is " + "apple " * 300}, {"author": "b", "text": "ok"}],
                "submission_id": "long"}
    (held_out / "validation.jsonl").write_text(json.dumps(too_long) + "\n" + json.dumps(normal) + "\n")
    result = evaluate(EvalConfig(personality=cfg.out_dir, data_dir=held_out, samples=2, report=tmp_path / "eval.md"))
    assert [s.human for s in result.samples] == [normal["turns"][-1]["text"]]


@pytest.mark.timeout(30)
def test_cpu_threads_try_each_count_and_leave_the_process_count_as_it_was():
    """Training and validation passes run at the count timed fastest for their kind (each count tried
    first); after each, even one that failed, the process runs at its own count again (`ttt eval`
    generates replies after validating)."""
    from training.cpu_threads import CpuThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads, used = CpuThreads("cpu"), []
        for _ in range(2):
            with threads.timed("step", 10):
                used.append(torch.get_num_threads())
            assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), threads.timed("step", 10):
            raise ValueError
        assert torch.get_num_threads() == 2 and sorted(used) == [1, 2]
    finally:
        torch.set_num_threads(before)
