"""llama.cpp LoRA adapters merged into a GGUF model at compile time (`mlcc compile --model X.gguf --lora A.gguf`).

A tiny Llama written as GGUF (Q/K rows in llama.cpp's order) and PEFT adapters converted as llama.cpp's
convert_lora_to_gguf.py converts them: the build equals transformers + PEFT with the adapters merged. In a
block-quantized file each adapted tensor is decoded, merged and encoded again in its own type, as the float
reference re-rounded shows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

peft = pytest.importorskip("peft")

from gguf_convert import permute_rope_rows, write_gguf, write_gguf_lora  # noqa: E402
from test_cli import assert_one_line_error, mlcc  # noqa: E402
from tiny_models import make_adapter, merged_reference  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from artifacts.errors import MlccError  # noqa: E402
from artifacts.lora_formats import Adapter, load_gguf_adapter  # noqa: E402
from compiler.gguf_source import GGUFSource  # noqa: E402
from compiler.lora import GGUFLoraMerge, can_quantize  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402

PROMPTS = ["Once upon a time there was", "def main():\n    print("]
TOLERANCE = 1e-4
QTYPE = Q.Q8_0  # the quantized base's block type


@pytest.fixture(scope="module")
def lora(hf_folder, tmp_path_factory) -> SimpleNamespace:
    """The base (HF folder and F32 GGUF) and two PEFT adapters with their llama.cpp conversions."""
    base = hf_folder("llama-f32")
    root = tmp_path_factory.mktemp("gguf-lora")
    first = make_adapter(
        base,
        root / "first",
        7,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "lm_head"],
    )
    second = make_adapter(base, root / "second", 8, r=2, lora_alpha=3, target_modules=["k_proj", "embed_tokens"])
    peft_folders = [first, second]
    return SimpleNamespace(
        base=base,
        gguf_base=write_gguf(base, root / "base.gguf"),
        peft=peft_folders,
        gguf=[write_gguf_lora(folder, root / f"{folder.name}.gguf", base) for folder in peft_folders],
    )


def hf_to_gguf(base: Path, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """An HF state dict in the GGUF file's names and row order."""
    cfg = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    out = {}
    for hf_name, value in state.items():
        array = value.numpy()
        role = hf_name.split(".")[-2]
        out[names.get_name(hf_name, try_suffixes=(".weight",))] = (
            permute_rope_rows(array, heads[role]) if role in heads else array
        )
    return out


def test_merged_tensors_equal_peft_merge(lora):
    """Every tensor the adapters touch (Q/K in llama.cpp's row order, the embedding) equals PEFT's merge."""
    source = GGUFSource(lora.gguf_base)
    merge = GGUFLoraMerge([load_gguf_adapter(f) for f in lora.gguf], source.tensor_shapes(), source.tensor_types())
    expected = hf_to_gguf(lora.base, merged_reference(lora.base, lora.peft).state_dict())
    changed = 0
    for (name, ours), (_, theirs) in zip(merge(source.tensors(raw=True)), source.tensors(raw=True)):
        changed += not np.array_equal(ours, theirs)
        np.testing.assert_allclose(ours, expected[name], atol=1e-6, rtol=1e-6, err_msg=name)
    assert changed == len(merge.adapted) == 2 * 6 + 2  # 6 projections x 2 layers, the embedding and the head


def test_compiled_with_gguf_adapters_equals_transformers_and_peft(lora, tmp_path):
    """Through the CLI, two adapters at --lora-scale 0.5: the logits of PEFT's merge (alphas halved), its greedy
    tokens."""
    halved = []
    for folder in lora.peft:
        copy = shutil.copytree(folder, tmp_path / folder.name)
        config = json.loads((copy / "adapter_config.json").read_text())
        config["lora_alpha"] /= 2
        (copy / "adapter_config.json").write_text(json.dumps(config))
        halved.append(copy)
    out = tmp_path / "art"
    loras = [arg for path in lora.gguf for arg in ("--lora", str(path))]
    proc = mlcc(
        "compile", "--model", str(lora.gguf_base), *loras, "--lora-scale", "0.5", "--quant", "gguf-f32", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    engine = Engine(out)
    reference, base = merged_reference(lora.base, halved), merged_reference(lora.base, [])
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            expected = reference(x).logits[0].numpy()
            unadapted = base(x).logits[0].numpy()
            theirs = reference.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, eos_token_id=None
            )
        ours = engine.prompt_logits(ids)
        assert np.abs(ours - expected).max() <= TOLERANCE
        assert np.abs(unadapted - expected).max() > 100 * TOLERANCE  # the adapters matter
        generated = engine.generate_ids([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert generated[0].token_ids == theirs[0, len(ids) :].tolist()


def rounded(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` as a GGUF file of `qtype` holds it, decoded: a 2-D tensor whose rows fill the blocks, as write_gguf
    encodes them. Blocks lie within rows, so this is the same in HF's row order as in llama.cpp's."""
    if array.ndim != 2 or array.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array
    return dequantize(quantize(array, qtype), qtype)


def round_params(model: torch.nn.Module, qtype: Q, names: set[str] | None = None) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if names is None or name in names:
                param.copy_(torch.from_numpy(rounded(param.numpy(), qtype)))
    return model.eval()


def factors_only(adapter: Path, out: Path) -> Path:
    """A copy of a PEFT adapter without the copies of base modules PEFT saves beside the factors (here: lm_head's),
    which would put the unquantized weights back when the adapter is loaded over a decoded base."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".lora_" in k}, str(out / "adapter_model.safetensors"))
    return out


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def test_a_quantized_base_keeps_its_block_type(lora, tmp_path):
    """A Q8_0 base: each adapted tensor is stored as Q8_0 again, so the build equals PEFT's float merge on the
    decoded base with the adapted tensors rounded to Q8_0 once more. Against the exact merge (the unquantized base
    with the adapter) the build is then about as close as the merged model quantized once."""
    from compiler.compile import compile_model

    out = tmp_path / "art"
    qbase = write_gguf(lora.base, tmp_path / f"base-{QTYPE.name}.gguf", QTYPE)
    compile_model(str(qbase), out, quant="gguf-f32", loras=[str(lora.gguf[0])], progress=lambda _: None)

    decoded = round_params(AutoModelForCausalLM.from_pretrained(lora.base, dtype=torch.float32), QTYPE)
    decoded_state = {name: value.clone() for name, value in decoded.state_dict().items()}
    adapter = factors_only(lora.peft[0], tmp_path / "factors")
    float_merge = peft.PeftModel.from_pretrained(decoded, adapter).merge_and_unload().eval()
    adapted = {name for name, value in float_merge.state_dict().items() if not torch.equal(value, decoded_state[name])}
    assert len(adapted) == 2 * 6 + 1
    requantized = merged_reference(lora.base, [])
    requantized.load_state_dict(float_merge.state_dict())
    round_params(requantized, QTYPE, adapted)
    exact = merged_reference(lora.base, [lora.peft[0]])  # the adapter merged into the unquantized base
    rounded_once = round_params(merged_reference(lora.base, [lora.peft[0]]), QTYPE)  # merged, then quantized

    weights = {}
    for shard in json.loads((out / "mlcc-manifest.json").read_text())["weights"]["shards"]:
        weights.update(load_file(str(out / shard)))
    block_bytes = gguf.GGML_QUANT_SIZES[QTYPE][1]
    assert weights["blk.0.attn_q.q_data"].shape == (64, 2 * block_bytes)  # adapted: 2 blocks per row of 64
    assert all(name.endswith(".q_data") for name, value in weights.items() if value.ndim == 2)  # no float matrix

    engine = Engine(out)
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            x = torch.tensor([ids])
            theirs, ideal, once = (m(x).logits[0].numpy() for m in (requantized, exact, rounded_once))
        ours = engine.prompt_logits(ids)
        assert np.abs(ours - theirs).max() <= TOLERANCE
        # The adapted weights are rounded twice (the file's rounding, then the merge's), independent errors that
        # add in quadrature: about sqrt(2) times one rounding's; 2 leaves room for a tiny model's spread (Q8_0
        # here: 1.6 and 1.1; Q4_0 and Q5_0: 1.0).
        assert rms(ours - ideal) <= 2 * rms(once - ideal)


def test_types_gguf_py_cannot_encode_stay_float32():
    """Q4_0 is encoded again; a K-quant (no encoder in gguf-py 0.19) becomes F32, the tied head with its embedding;
    an unadapted tensor passes through untouched."""
    rng = np.random.default_rng(0)
    q4_k = rng.integers(0, 256, (4, 144), dtype=np.uint8)  # 4 rows of one 256-column block
    q4_k[:, :4].view(np.float16)[:] = [0.01, 0.005]  # the block's scale and minimum
    q4_0 = quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q4_0)
    norm = np.ones(64, np.float32)
    factors = {
        name: (rng.standard_normal((2, cols)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32), 0.5)
        for name, cols in (("blk.0.attn_k.weight", 256), ("blk.0.attn_q.weight", 64), ("token_embd.weight", 256))
    }
    shapes = {"blk.0.attn_k.weight": (4, 256), "blk.0.attn_q.weight": (4, 64), "token_embd.weight": (4, 256)}
    types = {"blk.0.attn_k.weight": Q.Q4_K, "blk.0.attn_q.weight": Q.Q4_0, "token_embd.weight": Q.Q4_K}
    merge = GGUFLoraMerge(
        [Adapter(Path("adapter.gguf"), factors=factors)],
        {**shapes, "norm.weight": (64,)},
        {**types, "norm.weight": Q.F32, "output.weight": Q.Q4_K},
    )
    k_type = Q.Q4_K if can_quantize(Q.Q4_K) else Q.F32
    kept = {"blk.0.attn_k.weight": k_type, "token_embd.weight": k_type, "output.weight": k_type}  # tied head too
    assert merge.types == {**types, **kept, "norm.weight": Q.F32}
    raw = {"blk.0.attn_k.weight": q4_k, "blk.0.attn_q.weight": q4_0, "token_embd.weight": q4_k, "norm.weight": norm}
    merged = dict(merge(iter(raw.items())))
    assert merged["norm.weight"] is norm
    for name, qtype in types.items():
        a, b, scale = factors[name]
        expected = dequantize(raw[name], qtype) + scale * (b @ a)
        if merge.types[name] == Q.F32:
            np.testing.assert_allclose(merged[name], expected, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(merged[name], quantize(expected, qtype), err_msg=name)
    assert merge.kept_float() == ([] if k_type == Q.Q4_K else ["blk.0.attn_k.weight", "token_embd.weight"])


def write_adapter(path: Path, tensors: dict[str, np.ndarray], kind: str = "adapter") -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string(gguf.Keys.General.TYPE, kind)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_adapters_that_do_not_fit_are_one_line_errors(lora, tmp_path):
    from compiler.compile import compile_model

    a, b = np.ones((2, 64), np.float32), np.ones((64, 2), np.float32)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(lora.gguf[0].read_bytes()[:-100])
    cases = {
        "which the base model does not have": write_adapter(
            tmp_path / "names.gguf", {"blk.7.attn_q.weight.lora_a": a, "blk.7.attn_q.weight.lora_b": b}
        ),
        "the adapter's factors make [64, 96]": write_adapter(
            tmp_path / "shapes.gguf",
            {"blk.0.attn_q.weight.lora_a": np.ones((2, 96), np.float32), "blk.0.attn_q.weight.lora_b": b},
        ),
        "has no matching lora_a/lora_b pair": write_adapter(tmp_path / "half.gguf", {"blk.0.attn_q.weight.lora_a": a}),
        "cannot read GGUF adapter": truncated,
        "is not a llama.cpp LoRA adapter": write_adapter(tmp_path / "model.gguf", {}, kind="model"),
        "convert_lora_to_gguf.py": lora.peft[0],
    }
    for message, adapter in cases.items():
        with pytest.raises(MlccError, match=re.escape(message)):
            compile_model(str(lora.gguf_base), tmp_path / "out", loras=[str(adapter)])
    with pytest.raises(MlccError, match="takes PEFT adapter folders"):
        compile_model(str(lora.base), tmp_path / "out", loras=[str(lora.gguf[0])])
    proc = mlcc("compile", "--model", str(lora.gguf_base), "--lora", str(lora.gguf_base), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "is not a llama.cpp LoRA adapter")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".", "out"))]  # no artifact, no staging
