"""Hugging Face round trips on tiny random configs: save -> reload of monarchified GPT-2 and BERT, densify -> plain
from_pretrained with GPT-2's own Conv1D, and clear errors when a checkpoint does not match its record."""
import json
import os

import pytest
import torch

from conftest import rel_err
from monarch_kernels.layers import MonarchLinear, densify, distill, from_pretrained, monarchify

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def _ids(n=2, t=10):
    return torch.randint(0, VOCAB, (n, t))


def test_gpt2_monarchified_save_reload_is_exact(tmp_path):
    model, ids = tiny_gpt2(), _ids()
    with pytest.warns(UserWarning, match="lm_head"):
        conv = monarchify(model, nblocks=4)  # every Conv1D; lm_head (tied to wte) is skipped with a warning
    assert "lm_head" in conv.skipped and model.lm_head.weight is model.transformer.wte.weight
    assert {r.source for r in conv.layers} == {"Conv1D"} and len(conv) == 8
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    record = json.load(open(tmp_path / "config.json"))["monarch"]
    assert record["layers"]["transformer.h.1.mlp.c_fc"] == {
        "layer": "monarch", "in_features": 32, "out_features": 128, "nblocks": 4, "bias": True, "source": "Conv1D"}
    assert record["conversions"][0]["include"] == ["**"] and record["conversions"][0]["init"] == "projected"
    again = from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    assert isinstance(again.transformer.h[0].mlp.c_fc, MonarchLinear) and not again.training
    assert again.lm_head.weight is again.transformer.wte.weight
    assert torch.equal(again(ids).logits, logits)
    auto = from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert torch.equal(auto(ids).logits, logits)


def test_bert_calibrated_save_reload_is_exact(tmp_path):
    model = tiny_bert()
    batches = [{"input_ids": _ids(4, 12), "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(2)]
    conv = monarchify(model, nblocks=2, include=["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"],
                      calibrate=batches)
    assert list(conv) == [f"encoder.layer.{i}.{n}.dense" for i in range(2) for n in ("intermediate", "output")]
    x = {"input_ids": _ids(), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    out = model(**x).last_hidden_state
    model.save_pretrained(tmp_path)
    again = from_pretrained(transformers.BertModel, tmp_path)
    assert torch.equal(again(**x).last_hidden_state, out)
    assert isinstance(again.encoder.layer[1].output.dense, MonarchLinear)
    assert type(again.encoder.layer[1].attention.output.dense) is torch.nn.Linear


@pytest.mark.parametrize("include", [
    ["transformer.h.*.attn.c_proj"],                         # square Conv1D 32 -> 32
    ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj", "transformer.h.0.attn.c_attn"],  # rectangular
])
def test_densify_restores_conv1d_for_a_plain_from_pretrained(tmp_path, include):
    model, ids = tiny_gpt2(), _ids()
    monarchify(model, nblocks=4, include=include)
    logits = model(ids).logits
    names = densify(model)
    assert all(type(model.get_submodule(n)) is Conv1D for n in names)
    assert not hasattr(model.config, "monarch")
    model.save_pretrained(tmp_path)
    assert "monarch" not in json.load(open(tmp_path / "config.json"))
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert rel_err(plain(ids).logits, logits) < 1e-6


def test_partial_densify_keeps_the_remaining_record(tmp_path):
    model, ids = tiny_gpt2(), _ids()
    monarchify(model, nblocks=4, include="transformer.h.*.mlp.*")
    densify_one = model.transformer.h[0].mlp
    densify(densify_one)  # a submodule: only its layers become dense, the model's record is untouched
    assert set(model.config.monarch["layers"]) == {f"transformer.h.{i}.mlp.{n}"
                                                   for i in range(2) for n in ("c_fc", "c_proj")}
    model.config.monarch["layers"] = {k: v for k, v in model.config.monarch["layers"].items()
                                      if k.startswith("transformer.h.1")}
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(from_pretrained(transformers.GPT2LMHeadModel, tmp_path)(ids).logits, logits)


def test_reload_errors_name_the_problem(tmp_path):
    plain = tiny_gpt2()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'monarch' record.*GPT2LMHeadModel.from_pretrained"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "plain")
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "nowhere")

    model = tiny_gpt2()
    monarchify(model, nblocks=4, include="transformer.h.*.mlp.c_fc")
    model.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    original = json.load(open(cfg_path))

    def edit(fn):
        cfg = json.loads(json.dumps(original))
        fn(cfg["monarch"])
        json.dump(cfg, open(cfg_path, "w"))

    edit(lambda rec: rec["layers"]["transformer.h.0.mlp.c_fc"].update(nblocks=2))  # factors saved with 4 blocks
    with pytest.raises(ValueError, match="(?s)do not fit the structure.*size mismatch for transformer.h.0.mlp.c_fc.w1"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")
    edit(lambda rec: rec["layers"].pop("transformer.h.1.mlp.c_fc"))  # its w1/w2 become unexpected, weight missing
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\].*unexpected"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")
    edit(lambda rec: rec["layers"].update({"transformer.h.9.mlp.c_fc": rec["layers"]["transformer.h.0.mlp.c_fc"]}))
    with pytest.raises(ValueError, match="'transformer.h.9.mlp.c_fc', which GPT2LMHeadModel does not have"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")
    edit(lambda rec: rec["layers"]["transformer.h.0.mlp.c_fc"].update(in_features=16))
    with pytest.raises(ValueError, match="16 -> 128.*in the record but 32 -> 128"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")
    edit(lambda rec: rec.update(format=99))
    with pytest.raises(ValueError, match="expected a config.monarch record of format 1"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")
    json.dump(original, open(cfg_path, "w"))
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="neither model.safetensors"):
        from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "m")


def test_distill_recovers_a_projected_bert():
    torch.manual_seed(0)
    teacher = tiny_bert()
    student = tiny_bert()
    student.load_state_dict(teacher.state_dict())
    monarchify(student, nblocks=4, include="encoder.layer.*.intermediate.dense")
    data = [{"input_ids": _ids(8, 12), "attention_mask": (torch.rand(8, 12) > 0.2).long()} for _ in range(4)]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    hist = distill(student, teacher, data, 40, lr=3e-3, progress=False)
    assert set(hist) == {"step", "loss", "hidden", "pooled", "lr"} and len(hist["loss"]) == 40
    assert hist["step"] == list(range(40)) and hist["lr"][0] == pytest.approx(3e-3) and hist["lr"][-1] < 1e-4
    assert sum(hist["loss"][-5:]) < 0.5 * sum(hist["loss"][:5])
    assert teacher.training and not student.training  # modes restored
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
