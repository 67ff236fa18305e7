"""Every CPU weight type, right on every CPU: int8 and int4 layers keep their own copy of the weights,
their kernels are checked on this CPU before an engine serves, a row batched with others stays
within the bound the README states, a greedy reply is the same on every run, and all of it runs
again as a CPU of the other family would run it (PyTorch's and oneDNN's kernels capped at AVX2)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.config.schema import Decoding
from core.engine.cpu_kernels import KernelMismatch, check_kernels, cpu_capability, kernel_problem
from core.engine.cpu_weights import Int4Linear, Int8Linear, quantized_layers
from core.engine.generator import GenerationFailed
from core.engine.local import LocalEngine, PreparedPrompt
from core.engine.models import ModelSource, choose_placement, load_model
from core.engine.runner import BASE_ADAPTER, ModelRunner
from test_generator_archs import random_prompt
from tiny import build_random_causal_lm, build_tokenizer

REPO = Path(__file__).resolve().parent.parent
WEIGHT_TYPES = ["float32", "bfloat16", "int8", "int4"]
# How far a row's logits in a batch may be from the same row's alone, as a share of their spread:
# float rounding (attention over a left-padded batch sums in another order) in float32; where a
# weight type rounds layer inputs (bfloat16, int8's levels, int4's bfloat16), such a last-bit
# difference can move one input by a rounding step. README: "Row independence".
ROW_BOUND = {"float32": 1e-4, "bfloat16": 0.25, "int8": 0.25, "int4": 0.25}
# The run of this file as a CPU of the other family: PyTorch's dispatch and oneDNN capped at AVX2
# (or, on an AVX2 machine, at PyTorch's portable kernels), MKL's too.
EMULATED = "TTT_TEST_EMULATED_CPU"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def saved_model(tmp_path: Path, tokenizer, arch: str = "llama") -> Path:
    build_random_causal_lm(arch, len(tokenizer)).save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    return tmp_path / arch


def load(path: Path, dtype: str):
    placement = choose_placement("cpu", cpu_dtype=dtype)
    if placement.dtype != dtype:
        pytest.skip(f"this CPU has no fast {dtype}")
    return load_model(ModelSource(str(path)), placement)[0]


def test_int4_keeps_weights_that_are_4_bit_already_as_they_were():
    """A Q4_1 GGUF's weights (a scale and a minimum per 32 inputs, 16 levels) keep their levels in the
    4-bit kernel and in the float copies; an output count the kernel does not take (50) is padded and
    cut off. The layer keeps its own copies: zeroing what it was built from changes nothing."""
    torch.manual_seed(0)
    scale = torch.rand(50, 2, 1).bfloat16().float() * 0.1
    low = -torch.rand(50, 2, 1).bfloat16().float()
    levels = torch.randint(0, 16, (50, 2, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # as in a Q4_1 block: its minimum and its maximum
    weight = (levels * scale + low).reshape(50, 64)
    bias = torch.randn(50)
    wanted_weight, wanted_bias = weight.clone(), bias.clone()
    layer = Int4Linear(weight, bias)
    weight.zero_()
    bias.zero_()
    big = torch.randn(20, 64)  # 20 rows: the float copy of the 4-bit weights
    wanted = F.linear(big.bfloat16().float(), wanted_weight, wanted_bias)
    assert torch.allclose(layer(big), wanted, rtol=0.01, atol=0.02)
    layer.weight.zero_()  # from here on, only the 4-bit weights hold the layer
    x = torch.randn(2, 3, 64).bfloat16().float()
    small = layer(x)  # 6 rows: the 4-bit kernel
    assert small.shape == (2, 3, 50)
    assert torch.allclose(small, F.linear(x, wanted_weight, wanted_bias), rtol=0.01, atol=0.02)
    assert torch.equal(layer(big), wanted_bias.expand(20, 50))


def test_int8_quantizes_each_row_on_its_own():
    """A row's inputs are quantized with its own scale: beside a row a thousand times larger, a row
    gets exactly what it gets alone, within 3% of the float product."""
    torch.manual_seed(1)
    weight, bias = torch.randn(96, 64) * 0.1, torch.randn(96)
    wanted_weight = weight.clone()
    layer = Int8Linear(weight, bias)
    weight.zero_()
    x = torch.randn(5, 64)
    x[2] *= 1000
    together = layer(x)
    for i in range(5):
        assert torch.equal(together[i], layer(x[i:i + 1])[0])
    wanted = F.linear(x, wanted_weight, bias)
    assert ((together - wanted).norm(dim=-1) / wanted.norm(dim=-1)).max() < 0.03


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_quantized_weights_cover_the_linear_layers_and_refuse_adapters(arch, tmp_path, tokenizer):
    """int4 converts every projection (GPT-2's Conv1D too) and the output layer; its float copies hold
    the same 4-bit weights, so a prompt computed in one pass (float copies) and token by token (the
    4-bit kernel) ends with the same scores. int8 converts the layers without outlier inputs. Neither
    takes a LoRA adapter."""
    path = saved_model(tmp_path, tokenizer, arch)
    int4, int8 = load(path, "int4"), load(path, "int8")
    layers = quantized_layers(int4)
    assert len(layers) == (9 if arch == "gpt2" else 15)
    assert layers[0].packed.dtype == torch.uint8 and layers[0].packed.numel() * 2 == layers[0].weight.numel()
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    prompt = torch.tensor([random_prompt(40, random.Random(arch), len(tokenizer))])
    with torch.inference_mode():
        whole = int4(prompt).logits[0, -1]
        out = None
        for i in range(prompt.shape[1]):
            out = int4(prompt[:, i:i + 1], past_key_values=None if out is None else out.past_key_values, use_cache=True)
        stepwise = out.logits[0, -1]
    assert F.cosine_similarity(whole, stepwise, dim=0) > 0.999
    for model in (int4, int8):
        engine = LocalEngine(model, tokenizer)
        with pytest.raises(GenerationFailed, match="LoRA adapters need float weights"):
            engine.load_adapter(str(tmp_path / "no-adapter-needed"))
        await engine.close()


def test_quantized_kernels_pass_the_check_and_a_wrong_kernel_is_named(tmp_path, tokenizer):
    path = saved_model(tmp_path, tokenizer)
    for dtype in ("int8", "int4"):
        check_kernels(load(path, dtype), [1, 2])  # raises if a kernel is wrong on this CPU
    weight = torch.randn(48, 64)
    right = lambda x: torch.stack([F.linear(row, weight) for row in x])  # noqa: E731  (row by row: exact)
    reference = lambda x: F.linear(x.double(), weight.double())  # noqa: E731
    assert kernel_problem(right, reference, 64, (2, 3, 8), [1, 2]) is None
    off = kernel_problem(lambda x: 1.05 * right(x), reference, 64, (2, 8), [1, 2])
    assert off == "gives products 5.0% away from the float product"
    by_batch = kernel_problem(lambda x: right(x) * (1 + 1e-6 * len(x)), reference, 64, (2, 8), [1, 2])
    assert by_batch == "gives row 1 of a pass of 2 rows another result than alone"
    by_threads = kernel_problem(lambda x: right(x) * (1 + 1e-6 * torch.get_num_threads()), reference, 64, (2,),
                                [1, 2])
    assert by_threads == "gives other results on 2 threads than on 1"


@pytest.mark.timeout(60)
async def test_an_engine_whose_kernel_is_wrong_does_not_start(tmp_path, tokenizer):
    """A layer whose 4-bit weights disagree with its float copies (as a kernel that misreads them
    would) fails the check: the engine refuses to start, naming the setting and this CPU."""
    model = load(saved_model(tmp_path, tokenizer), "int4")
    broken = quantized_layers(model)[0]  # the first of its shape: the one checked
    broken.packed.zero_()
    engine = LocalEngine(model, tokenizer)
    try:  # the check runs at once in the worker: this lands before it ends or after (a fast CPU)
        waiting = engine.submit([5, 6, 7], Decoding(max_new_tokens=2))
    except GenerationFailed as exc:
        submitted_early = exc
    else:
        with pytest.raises(GenerationFailed) as failed:
            await asyncio.wait_for(waiting.text(), 30)
        submitted_early = failed.value
    with pytest.raises(KernelMismatch) as refused:
        await asyncio.wait_for(engine.wait_started(), 30)
    message = str(refused.value)
    assert message.startswith("generator.cpu_dtype int4: on this CPU (PyTorch capability ")
    assert cpu_capability() in message and f"{broken.out_features}x{broken.in_features}" in message
    assert message.endswith("set generator.cpu_dtype to float32 (TTT_GENERATOR__CPU_DTYPE=float32)")
    assert str(submitted_early) == message
    with pytest.raises(GenerationFailed) as later:  # after the failed start: the same reason
        engine.submit([5, 6, 7], Decoding(max_new_tokens=2))
    assert str(later.value) == message
    await engine.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", WEIGHT_TYPES)
def test_a_row_batched_with_others_stays_within_the_bound(dtype, tmp_path, tokenizer):
    """Teacher-forced decode steps of four left-padded rows of different lengths, against each row
    decoded alone: the logits stay within the weight type's bound (README: "Row independence")."""
    model = load(saved_model(tmp_path, tokenizer), dtype)
    runner = ModelRunner(model, tokenizer, tokenizer.pad_token_id)
    rng = random.Random(dtype)
    prompts = [random_prompt(length, rng, len(tokenizer)) for length in (30, 10, 20, 5)]
    worst = 0.0
    with torch.inference_mode():
        alone = [runner.prefill([p], [BASE_ADAPTER]) for p in prompts]
        batch = runner.prefill([prompts[0]], [BASE_ADAPTER])[0]
        for prompt in prompts[1:]:
            batch.join(runner.prefill([prompt], [BASE_ADAPTER])[0])
        tokens = [int(logits.argmax()) for _, logits in alone]
        positions = [len(p) for p in prompts]
        for _ in range(24):
            together = runner.decode(batch, tokens, positions, [BASE_ADAPTER] * 4).float()
            for i, (cache, _) in enumerate(alone):
                own = runner.decode(cache, [tokens[i]], [positions[i]], [BASE_ADAPTER])[0].float()
                worst = max(worst, float((together[i] - own).abs().max() / own.std()))
            tokens = together.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
    assert worst <= ROW_BOUND[dtype]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", WEIGHT_TYPES)
async def test_a_greedy_reply_is_the_same_on_every_run(dtype, tmp_path, tokenizer):
    """The first run computes the prompt; later runs find it in the prefix cache and start from the
    scores it ended with, whatever thread counts the engine tries meanwhile."""
    model = load(saved_model(tmp_path, tokenizer), dtype)
    engine = LocalEngine(model, tokenizer, prefix_cache_mb=16)
    rng = random.Random(7)
    prompt, other = random_prompt(40, rng, len(tokenizer)), random_prompt(45, rng, len(tokenizer))
    greedy = Decoding(do_sample=False, max_new_tokens=32)
    replies, cached = [], []
    for ask in (prompt, other, prompt, prompt):
        generation = engine.submit(PreparedPrompt(ask, frozenset()), greedy)
        text = await generation.text()
        if ask is prompt:
            replies.append(text)
            cached.append(generation.stats.cached_tokens)
    await engine.close()
    assert replies == [replies[0]] * 3
    assert cached == [0, 40, 40]


@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(os.environ.get(EMULATED)), reason="this is the run as the other CPU family")
def test_the_weight_types_pass_on_a_cpu_of_the_other_family():
    """This file and the cache-layout exactness tests again, in a process whose kernels are those an
    AVX2-only CPU (an AMD EPYC without AVX-512 or AMX) runs; on such a CPU, PyTorch's portable ones."""
    family = "avx2" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "default"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=family, ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **{EMULATED: family})
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability(), "
                            "torch.ops.mkldnn._is_mkldnn_bf16_supported())"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert probe.stdout.split() == [family.upper(), "False"], probe.stdout + probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          "tests/test_generator_weights.py", "tests/test_generator_archs.py"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=560)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
