"""Self-conditioning: AP, max-over-tokens responses, forcing, and the three layer kinds."""
import math

import pytest
import torch
from torch import nn

from monarch_kernels.layers import MonarchLinear
from methods import selfcond as sc
from recipe_runs import quick_run
from methods.data import WordTokenizer
from methods.models import tiny_gpt2


class TinyLinearLM(nn.Module):
    """Position-wise (hence causal) LM built from nn.Linear: one-hot embedding -> fc -> ReLU -> head."""

    def __init__(self, vocab=8, hidden=6, layer=nn.Linear):
        super().__init__()
        self.vocab = vocab
        self.fc = layer(vocab, hidden)
        self.head = layer(hidden, vocab)

    def forward(self, ids):
        x = nn.functional.one_hot(ids, self.vocab).to(self.fc.bias.dtype)
        return self.head(torch.relu(self.fc(x)))


def _gpt2(mlp):
    return tiny_gpt2(11, n_layer=2, n_embd=16, n_head=2, n_positions=32, mlp=mlp, seed=0).double().eval()


def _sentences(n, vocab, gen, lo=2, hi=9):
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen)
            for _ in range(n)]


def test_average_precision_hand_case_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    labels = torch.tensor([1, 0, 1, 0])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    # thresholds: rank 1 (P=1, R=1/2), rank 3 (P=2/3, R=1)  ->  1/2·1 + 1/2·2/3
    assert float(sc.average_precision(scores, labels)) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    # ties form one threshold: all tied -> AP = base rate
    assert float(sc.average_precision(torch.ones(4), labels)) == pytest.approx(0.5, abs=1e-12)
    tied = torch.tensor([0.5, 0.5, 0.9, 0.1])  # rank1: neg (P=0), ranks 2-3 {pos,neg} -> P=1/3 at R=1/2 ...
    expected = sklearn_metrics.average_precision_score(labels.numpy(), tied.numpy())
    assert float(sc.average_precision(tied, labels)) == pytest.approx(expected, abs=1e-12)
    # many columns with heavy ties against sklearn
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(40, generator=gen) < 0.3).long()
    y[0] = 1
    s = torch.randint(0, 5, (40, 7), generator=gen).double()
    ours = sc.average_precision(s, y)
    for m in range(7):
        assert float(ours[m]) == pytest.approx(sklearn_metrics.average_precision_score(y.numpy(), s[:, m].numpy()),
                                               abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        sc.average_precision(s, torch.zeros(40, dtype=torch.long))


def test_responses_are_max_over_tokens_of_a_manual_forward():
    torch.manual_seed(0)
    model = TinyLinearLM().double()
    gen = torch.Generator().manual_seed(1)
    sents = _sentences(9, 8, gen)
    layers = sc.unit_layers(model, exclude=())
    assert list(layers) == ["fc", "head"]
    z = sc.collect_responses(model, sents, layers, batch_size=4)
    assert z.shape == (9, 6 + 8)
    for i, s in enumerate(sents):
        x = nn.functional.one_hot(s, 8).double()
        fc = x @ model.fc.weight.T + model.fc.bias
        head = torch.relu(fc) @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(z[i], torch.cat([fc.amax(0), head.amax(0)]).float())


def test_responses_of_padded_batches_equal_single_sentence_forwards_gpt2():
    model = _gpt2("monarch")
    layers = sc.unit_layers(model)
    assert "lm_head" not in layers and len(layers) == 8  # 4 per block
    sents = _sentences(5, 11, torch.Generator().manual_seed(2), lo=1, hi=12)
    batched = sc.collect_responses(model, sents, layers, batch_size=5, pad_id=3)
    for i, s in enumerate(sents):
        single = sc.collect_responses(model, [s], layers)
        torch.testing.assert_close(batched[i], single[0], rtol=1e-5, atol=1e-6)
    # with the pads inside the max the responses differ for the short sentences (official behaviour)
    padded = sc.collect_responses(model, sents, layers, batch_size=5, pad_id=3, include_padding=True)
    assert (padded >= batched - 1e-6).all() and not torch.allclose(padded, batched)


def test_expertise_finds_a_planted_detector_unit():
    model = TinyLinearLM().double()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[2, 5] = 1.0  # unit fc[2] fires exactly on token 5
        model.fc.weight[4] = 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    sents = _sentences(30, 5, gen)  # tokens 0..4: no token 5
    pos = [torch.cat([s, torch.tensor([5])])[torch.randperm(len(s) + 1, generator=gen)] for s in sents[:15]]
    labels = torch.tensor([1] * 15 + [0] * 15)
    layers = sc.unit_layers(model, exclude=())
    exp = sc.compute_expertise(sc.collect_responses(model, pos + sents[15:], layers), labels, layers)
    assert exp.locate(exp.ranking()[:1]) == [("fc", 2)]
    assert float(exp.ap[2]) == pytest.approx(1.0)
    assert float(exp.on_p50[2]) == pytest.approx(1.0) and float(exp.off_mean[2]) == pytest.approx(0.0)
    assign = sc.select_units(exp, 1)
    assert set(assign) == {"fc"} and assign["fc"][0].tolist() == [2] and assign["fc"][1].tolist() == [1.0]



def test_expertise_statistics_of_hand_made_responses():
    """``on_p50`` / ``on_p90``: median and 90th percentile (linear interpolation) of a unit's responses to the
    positive sentences, ``off_mean`` the mean over the negatives; ``select_units`` forces the median by default."""
    layers = {"a": nn.Linear(1, 2), "b": nn.Linear(1, 1)}
    pos = torch.tensor([[1.0, 10.0, 0.0], [2.0, 20.0, 0.0], [3.0, 30.0, 0.0], [4.0, 40.0, 1.0], [5.0, 50.0, 1.0]])
    neg = torch.tensor([[0.0, 5.0, 2.0], [1.0, 7.0, 0.0]])
    exp = sc.compute_expertise(torch.cat([pos, neg]), torch.tensor([1] * 5 + [0] * 2), layers)
    assert exp.on_p50.tolist() == pytest.approx([3.0, 30.0, 0.0])
    assert exp.on_p90.tolist() == pytest.approx([4.6, 46.0, 1.0])
    assert exp.off_mean.tolist() == pytest.approx([0.5, 6.0, 1.0])
    assign = sc.select_units(exp, 3)
    forced = {(layer, i): v for layer, (idx, vals) in assign.items() for i, v in zip(idx.tolist(), vals.tolist())}
    assert forced == pytest.approx({("a", 0): 3.0, ("a", 1): 30.0, ("b", 0): 0.0})

@pytest.mark.parametrize("kind", ["linear", "monarch_linear", "conv1d", "gpt2_monarch"])
def test_forcing_sets_exactly_the_chosen_units_at_every_position(kind):
    if kind == "linear":
        model, target = TinyLinearLM(hidden=8).double(), "fc"
    elif kind == "monarch_linear":
        torch.manual_seed(0)
        model, target = TinyLinearLM(vocab=8, hidden=8,
                                     layer=lambda a, b: MonarchLinear(a, b, nblocks=2)).double(), "fc"
    elif kind == "conv1d":
        model, target = _gpt2("dense"), "transformer.h.0.attn.c_attn"
    else:
        model, target = _gpt2("monarch"), "transformer.h.0.mlp.c_fc"
    layers = sc.unit_layers(model, exclude=())
    assert target in layers
    expected_type = {"linear": nn.Linear, "monarch_linear": MonarchLinear, "gpt2_monarch": MonarchLinear}.get(kind)
    if expected_type is not None:
        assert isinstance(layers[target], expected_type)
    else:
        assert type(layers[target]).__name__ == "Conv1D"
    vocab = 8 if kind in ("linear", "monarch_linear") else 11
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(4))
    seen = {}
    hook = layers[target].register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach().clone()))
    base_logits = sc.expertise._logits(model(ids)).detach()
    base = seen["y"]
    idx, vals = torch.tensor([1, 4, 6]), torch.tensor([2.5, -1.0, 7.0])
    hook.remove()
    with sc.force_units(model, {target: (idx, vals)}):
        hook = layers[target].register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach().clone()))
        forced_logits = sc.expertise._logits(model(ids)).detach()
        hook.remove()
    y = seen["y"]
    assert torch.equal(y[..., idx], vals.to(y.dtype).expand(3, 7, 3))  # every position
    others = torch.ones(y.shape[-1], dtype=torch.bool)
    others[idx] = False
    torch.testing.assert_close(y[..., others], base[..., others], rtol=0, atol=0)  # nothing else in the layer
    assert not torch.allclose(forced_logits, base_logits)
    # hooks are gone after the context and k = 0 changes nothing
    torch.testing.assert_close(sc.expertise._logits(model(ids)).detach(), base_logits, rtol=0, atol=0)
    with sc.force_units(model, {}):
        torch.testing.assert_close(sc.expertise._logits(model(ids)).detach(), base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("mlp", ["dense", "monarch"])
def test_pipeline_on_hf_gpt2_with_conv1d_and_monarch(mlp):
    model = _gpt2(mlp)
    layers = sc.unit_layers(model)
    kinds = {type(m).__name__ for m in layers.values()}
    assert kinds == ({"Conv1D"} if mlp == "dense" else {"Conv1D", "MonarchLinear"})
    gen = torch.Generator().manual_seed(5)
    sents = _sentences(20, 11, gen)
    labels = torch.tensor([1, 0] * 10)
    exp = sc.compute_expertise(sc.collect_responses(model, sents, layers), labels, layers)
    assert exp.num_units == sum(sc.expertise._out_features(m) for m in layers.values())
    assert ((exp.ap >= 0) & (exp.ap <= 1)).all()
    top = sc.select_units(exp, 5)
    assert sum(len(i) for i, _ in top.values()) == 5
    rnd = sc.select_units(exp, 5, "random", generator=torch.Generator().manual_seed(0))
    assert sum(len(i) for i, _ in rnd.values()) == 5
    prompt = torch.zeros(4, 1, dtype=torch.long)
    g = lambda: torch.Generator().manual_seed(0)
    base = sc.generate(model, prompt, 6, generator=g())
    with sc.force_units(model, {}):
        assert torch.equal(sc.generate(model, prompt, 6, generator=g()), base)  # k = 0: identical samples
    greedy = sc.generate(model, prompt, 6, top_k=1, generator=g())
    manual = prompt.clone()
    for _ in range(6):
        manual = torch.cat([manual, sc.expertise._logits(model(manual))[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, manual)
    # perplexity of the generated part = exp(mean NLL) by hand
    with torch.no_grad():
        logits = sc.expertise._logits(model(base)).float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, base[:, 1:, None]).mean()
    assert sc.generated_perplexity(model, base, 1) == pytest.approx(math.exp(float(nll)), rel=1e-5)



class FixedLM(nn.Module):
    """Next-token distribution ``probs`` at every position, whatever the context."""

    def __init__(self, probs):
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(probs, dtype=torch.float64).log(), requires_grad=False)

    def forward(self, ids):
        return self.logp.expand(*ids.shape, -1)


def test_top_k_and_nucleus_sampling_keep_the_documented_support():
    """top_k keeps the k most probable tokens; top_p keeps the smallest prefix (by probability) whose mass reaches
    top_p, including the token that crosses it; draws follow the renormalised probabilities."""
    model = FixedLM([0.5, 0.3, 0.15, 0.05])
    prompt = torch.zeros(2000, 1, dtype=torch.long)

    def freq(**kw):
        out = sc.generate(model, prompt, 1, generator=torch.Generator().manual_seed(0), **kw)[:, 1]
        return torch.bincount(out, minlength=4).double() / len(out)

    for kw in ({"top_p": 0.7}, {"top_k": 2}):  # both keep {0, 1}: probabilities 5/8 and 3/8
        f = freq(**kw)
        assert f[2:].sum() == 0, kw
        assert abs(float(f[0]) - 5 / 8) < 0.05 and abs(float(f[1]) - 3 / 8) < 0.05, kw
    f = freq(top_p=0.9)  # 0.5 + 0.3 < 0.9: token 2 crosses the threshold and is kept
    assert f[3] == 0 and f[2] > 0.1

def test_word_tokenizer():
    tok = WordTokenizer("The king, the KING! a queen\nthe end", size=6)
    assert tok.vocab_size == 6 and tok.words[:2] == ["\n", "<unk>"]
    ids = tok.encode("the king, the queen\n")
    assert tok.decode(ids) == "the king, the <unk>\n"  # 'queen' is out of the 4 most frequent tokens
    assert sc.theme_regex(sc.THEMES["royalty"]).search(tok.decode(ids))


def test_bad_input():
    model = TinyLinearLM()
    with pytest.raises(ValueError, match="no unit layers"):
        sc.unit_layers(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="not a unit layer"):
        with sc.force_units(model, {"nope": (torch.tensor([0]), torch.tensor([1.0]))}):
            pass
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        with sc.force_units(model, {"fc": (torch.tensor([6]), torch.tensor([1.0]))}):
            pass
    with pytest.raises(ValueError, match="prompt"):
        sc.generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="sentences"):
        sc.collect_responses(model, [torch.zeros(0, dtype=torch.long)], sc.unit_layers(model))


def test_quick_run(tmp_path):
    m, cfg = quick_run("selfcond", tmp_path)
    assert m["ks"] == [0, 3, 30] and (tmp_path / "lm.pt").exists()
    assert math.isfinite(m["lm_train_loss"]) and m["lm_val_loss"] < m["uniform_loss"] - 1  # the LM learned (30 steps)
    for mode in ("expert", "random"):
        assert [r["k"] for r in m[mode]] == m["ks"]
        for r in m[mode]:
            assert 0.0 <= r["presence"] <= 1.0 and math.isfinite(r["perplexity"]) and r["perplexity"] > 1
            assert 0.0 < r["p_concept_next_token"] < 1.0 and r["concept_words_per_100_words"] >= 0
    assert m["expert"][0]["presence"] == m["random"][0]["presence"]  # k = 0 is the same unforced model
    # some units detect the concept far better than chance (AP of a random detector ≈ 0.5, the positive share)
    assert 0.6 <= m["ap_max"] <= 1.0 and isinstance(m["effect_appears"], bool)
