"""Loading models for the generator: GGUF caching by content, concurrent starts, LoRA end of turn."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import make_config
from core.conversation import ConversationKey, Turn
from core.engine.models import choose_placement, load_model, resolve_source
from core.service import open_service
from tiny import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_gguf_cache_is_keyed_by_the_whole_content(tmp_path):
    """Two exports of one base under one name (same header, same size) each load their own weights."""
    first = write_tiny_gguf((tmp_path / "a").mkdir() or tmp_path / "a" / "model.gguf", seed=1)
    second = write_tiny_gguf((tmp_path / "b").mkdir() or tmp_path / "b" / "model.gguf", seed=2)
    assert first.stat().st_size == second.stat().st_size
    assert first.read_bytes()[: 1 << 20] == second.read_bytes()[: 1 << 20]
    cache = tmp_path / "cache"
    placement = choose_placement("cpu")
    one, _ = load_model(resolve_source(str(first)), placement, cache)
    two, _ = load_model(resolve_source(str(second)), placement, cache)
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(one.state_dict()[down], two.state_dict()[down])
    assert len([p for p in (cache / "gguf").iterdir() if p.is_dir()]) == 2
    again, _ = load_model(resolve_source(str(second)), placement, cache)  # from the cache, digest remembered
    assert torch.equal(again.state_dict()[down], two.state_dict()[down])


@pytest.mark.timeout(120)
def test_two_processes_dequantize_the_same_gguf_at_once(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "model.gguf")
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from core.engine.models import choose_placement, load_model, resolve_source
        print("ready", flush=True)
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        model, _ = load_model(resolve_source({str(gguf_file)!r}), choose_placement("cpu"), Path({str(cache)!r}))
        print("loaded", sum(p.numel() for p in model.parameters()), flush=True)
    """)
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()  # both start dequantizing together
    outputs = [proc.communicate(timeout=100) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].split()[-1] == outputs[1][0].split()[-1]
    entries = list((cache / "gguf").iterdir())
    assert len([p for p in entries if p.is_dir()]) == 1, entries
    assert not [p for p in entries if ".partial" in p.name]


@pytest.mark.timeout(120)
async def test_lora_chat_persona_stops_at_end_of_turn_on_a_base_with_another_eos(tmp_path, word_chat_model_dir):
    """The chat template ends a turn with <|im_end|>; the base's eos is <|endoftext|> (as in Qwen2.5
    bases). A LoRA persona in the chat format must still stop at the end of its turn."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(word_chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(word_chat_model_dir)
    tokenizer.eos_token = "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=True))
    lora.save_pretrained(adapter_dir)

    config = make_config(tmp_path, base_dir)
    config.personas["lora"] = config.personas["words"].model_copy(
        update={"model": str(base_dir), "adapter": str(adapter_dir), "format": "chat"}
    )
    config.service.default_persona = "lora"
    service = await open_service(config)
    key = ConversationKey("test", "lora")
    generation = await service.generate(service.personas.get("lora"), [Turn("user", "alice", "the word is apple")])
    assert await generation.text() == "apple!"
    assert generation.stats.finish_reason == "stop"
    assert await service.reply(key, "alice", "the word is lemon", adapter="test") == "lemon!"
    await service.close()


@pytest.mark.timeout(120)
def test_models_loading_at_once_in_a_fresh_process_all_load(word_model_dir, word_chat_model_dir):
    """transformers' lazy module is not thread-safe on first use; personas load in worker threads."""
    script = textwrap.dedent(f"""
        import threading
        import torch  # as the service has it: torch imported, transformers not yet
        from core.engine.models import choose_placement, load_model, resolve_source
        results = []
        def load(path):
            try:
                load_model(resolve_source(path), choose_placement("cpu"))
                results.append("ok")
            except Exception as exc:
                results.append(repr(exc))
        threads = [threading.Thread(target=load, args=(path,))
                   for path in ({str(word_model_dir)!r}, {str(word_chat_model_dir)!r}, {str(word_model_dir)!r})]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(results)
    """)
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['ok', 'ok', 'ok']", done.stdout
