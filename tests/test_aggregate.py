"""Issue 5: the aggregation math (APA weights, routing, masking) and the batched mixture of LoRA
adapters, checked against explicit formulas and against peft itself. Fast: no Ray, tiny model."""

import copy
from typing import get_args

import numpy as np
import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import LlamaForCausalLM

from components.aggregate import (
    AGGREGATIONS,
    AggregatorState,
    apa_weights,
    candidate_prompts,
    history_split,
    masked_softmax,
    mixture_weights,
    predict,
    routing_weights,
    served_mask,
    top_weights,
    uniform_weights,
    unknown_items,
)
from components.config import DEFAULT_PROMPT, AggregateConfig, ConfigError, load_config
from components.data import build_prompt
from components.mixture import MixtureLoRALinear, MixtureModel
from components.model import head_dtype, head_logits, load_base_model, load_tokenizer, p_yes, pad_states, positions, tokenize, trunk_pass
from components.partition import Partitioner
from components.train import lora_config

from .conftest import TINY

K = 3


# --- the mixture layer against the formula ---------------------------------------------------------


def _layer(k=K, r=4, d_in=16, d_out=12, scaling=(2.0, 1.0, 0.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
        base.bias.copy_(torch.randn(d_out, generator=g))
    a = torch.randn(k, r, d_in, generator=g)
    b = torch.randn(k, d_out, r, generator=g)
    return MixtureLoRALinear(base, a, b, torch.tensor(scaling[:k])), g


def _mixed(rows: int, tokens: int, **layer_args):
    """A layer, a batch [rows, tokens, 16] and random per-row mixture weights set on the layer."""
    layer, g = _layer(**layer_args)
    x = torch.randn(rows, tokens, 16, generator=g)
    layer.weights = torch.softmax(torch.randn(rows, K, generator=g), -1)
    return layer, x, layer.weights


def test_mixture_layer_equals_the_explicit_sum_for_random_per_row_weights():
    layer, x, w = _mixed(5, 7)
    got = layer(x)
    # W x + sum_k w_k s_k B_k A_k x, in float64, one row at a time
    x64, expected = x.double(), []
    for row in range(5):
        out = x64[row] @ layer.base.weight.double().T + layer.base.bias.double()
        for k in range(K):
            delta = (x64[row] @ layer.lora_a[k].double().T) @ layer.lora_b[k].double().T
            out = out + w[row, k].double() * layer.scaling[k].double() * delta
        expected.append(out)
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-4)


def test_decomposed_mixture_layer_equals_its_formula():
    layer, x, w = _mixed(4, 6, scaling=(2.0, 2.0, 2.0))
    layer.decomposed = True
    got = layer(x)
    expected = []
    for row in range(4):
        a = sum(w[row, k].double() * layer.lora_a[k].double() for k in range(K))  # sum_k w_k A_k
        b = sum(w[row, k].double() * layer.lora_b[k].double() for k in range(K))  # sum_k w_k B_k
        base = x[row].double() @ layer.base.weight.double().T + layer.base.bias.double()
        expected.append(base + 2.0 * (x[row].double() @ a.T) @ b.T)
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-4)


def test_a_row_of_the_batch_is_mixed_with_its_own_weights_only():
    layer, x, w = _mixed(4, 5)
    together = layer(x)
    for row in range(4):
        layer.weights = w[row : row + 1]
        torch.testing.assert_close(layer(x[row : row + 1])[0], together[row], rtol=1e-6, atol=1e-5)


def test_without_weights_the_layer_is_the_frozen_base():
    layer, g = _layer()
    x = torch.randn(2, 3, 16, generator=g)
    assert torch.equal(layer(x), layer.base(x))


# --- the mixture model against peft ----------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 0], ids=["trunk-1", "trunk-0"])
def tiny(request):
    """The tiny model with a frozen trunk of 1 layer (LoRA in the other) and without a trunk."""
    config = load_config(TINY, model={"trunk_layers": request.param})
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.seed, tokenizer)
    peft_model = get_peft_model(copy.deepcopy(base), lora_config(config, base))
    peft_model.eval()  # no dropout
    adapters = []
    for k in range(K):  # trained-looking adapters: LoRA's init has B = 0, so randomize A and B
        g = torch.Generator().manual_seed(100 + k)
        state = {name: torch.randn(t.shape, generator=g) * 0.05 for name, t in get_peft_model_state_dict(peft_model).items()}
        adapters.append(state)
    mixture = MixtureModel(copy.deepcopy(base), tokenizer, dict(enumerate(adapters)),
                           config.adapter.alpha / config.adapter.r, config.model)
    prompts = [
        build_prompt(["Toy Story (1995)", "Heat (1995)"], ["Jumanji (1995)"], "GoldenEye (1995)"),
        build_prompt([], ["Casino (1995)"], "Babe (1995)"),
        build_prompt(["Fargo (1996)"] * 5, [], "Star Wars (1977)"),
    ]
    return config, tokenizer, peft_model, adapters, mixture, mixture.encode(prompts)


def _peft_logits(peft_model, adapter, batch, model_config):
    """The adapter applied by peft itself, over the same trunk states."""
    set_peft_model_state_dict(peft_model, adapter)
    with torch.no_grad():
        return head_logits(peft_model, batch.states, batch.mask, model_config)


def _one_hot(rows, k):
    w = torch.zeros(rows, K)
    w[:, k] = 1.0
    return w


def test_lora_lives_in_the_head_only(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    trunk = config.model.trunk_layers
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in adapters[0]}
    assert layers == set(range(trunk, config.model.tiny_layers))
    assert len(mixture.layers) == 2 * len(layers)  # q_proj and v_proj of every head layer


def test_a_one_hot_mixture_is_that_adapter_applied_by_peft(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    rows = len(batch)
    for k in range(K):
        expected = _peft_logits(peft_model, adapters[k], batch, config.model)
        with torch.no_grad(), mixture.mixing(_one_hot(rows, k)):
            got = head_logits(mixture.model, batch.states, batch.mask, config.model)
        # Not bit-identical: peft computes B_k (A_k x) with two rank-r GEMMs, the mixture one
        # rank-(K r) GEMM pair over all adapters (zero weights for the others), so the kernels sum
        # the same terms in another order. The difference is float32 rounding: at most 2.4e-7 on
        # logits of magnitude ~1.2 here (1-2 ulp), so 1e-5 leaves a wide margin.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.equal(got, head_logits(mixture.model, batch.states, batch.mask, config.model))  # the adapter changes them
        torch.testing.assert_close(mixture.p_yes(batch, _one_hot(rows, k)), p_yes(expected, mixture.yes_id, mixture.no_id),
                                   rtol=0, atol=1e-6)


def test_rows_routed_to_different_adapters_share_one_forward(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    rows = len(batch)
    w = torch.zeros(rows, K)
    for row in range(rows):
        w[row, row % K] = 1.0
    mixed = mixture.p_yes(batch, w)
    for row in range(rows):
        alone = p_yes(_peft_logits(peft_model, adapters[row % K], batch, config.model), mixture.yes_id, mixture.no_id)[row]
        assert abs(float(mixed[row]) - float(alone)) < 1e-6


def test_sisa_averaging_is_the_mean_of_the_single_adapter_passes(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    singles = [p_yes(_peft_logits(peft_model, adapters[k], batch, config.model), mixture.yes_id, mixture.no_id) for k in range(K)]
    torch.testing.assert_close(mixture.p_yes_averaged(batch), torch.stack(singles).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixture.p_yes_averaged(batch, masked={1}), (singles[0] + singles[2]) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="every shard is masked"):
        mixture.p_yes_averaged(batch, masked={0, 1, 2})


def test_decomposed_mixture_with_one_hot_weights_is_that_adapter(tiny):
    # (sum w_k B_k)(sum w_k A_k) = B_k A_k for a one-hot w: the decomposed form agrees there.
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    rows = len(batch)
    for k in range(K):
        torch.testing.assert_close(mixture.p_yes(batch, _one_hot(rows, k), decomposed=True),
                                   mixture.p_yes(batch, _one_hot(rows, k)), rtol=0, atol=1e-6)


def test_the_trunk_pass_is_the_frozen_model_whatever_the_adapters(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    base = load_base_model(config.model, config.seed, tokenizer)
    prompts = [build_prompt(["Heat (1995)"], [], "Babe (1995)")]
    plain = trunk_pass(base, tokenize(tokenizer, prompts, config.model.max_length), config.model)
    served = mixture.encode(prompts)
    assert torch.equal(served.embedding, plain.embedding) and torch.equal(served.states, plain.states)


@pytest.mark.parametrize("layers, key_value_heads", [(2, None), (4, 2)])
def test_trunk_then_head_is_the_models_own_forward(layers, key_value_heads):
    """Cut in two (and stored in float32), the model computes what transformers computes whole,
    with positions from the mask: a left-padded prompt gets the same logits as alone. The head's
    top layer runs at the answer position only; with 4 layers, 3 are in the head, and 2 key/value
    heads serve the 4 query heads (grouped-query attention, as in SmolLM2)."""
    config = load_config(TINY, model={"trunk_layers": 1, "trunk_dtype": "float32", "tiny_layers": layers})
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, config.seed, tokenizer)
    if key_value_heads:
        grouped = copy.deepcopy(base.config)
        grouped.num_key_value_heads = key_value_heads
        torch.manual_seed(config.seed)
        base = LlamaForCausalLM(grouped).eval()
    prompts = [build_prompt(["Heat (1995)"], [], "Babe (1995)"), build_prompt(["Fargo (1996)"] * 3, ["Casino (1995)"], "Heat (1995)")]
    batch = tokenize(tokenizer, prompts, 512)
    assert (batch["attention_mask"] == 0).any()  # the shorter prompt is left-padded
    with torch.no_grad():
        whole = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=positions(batch["attention_mask"]), logits_to_keep=1).logits[:, -1]
        trunk = trunk_pass(base, batch, config.model)
        split = head_logits(base, trunk.states, trunk.mask, config.model)
        first = trunk_pass(base, tokenize(tokenizer, prompts[:1], 512), config.model).states[0]
        alone = head_logits(base, *pad_states([first]), config.model)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[0], alone[0], rtol=1e-5, atol=1e-5)


def test_the_head_in_bfloat16_rounds_but_keeps_the_logits(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    half = config.model.model_copy(update={"head_dtype": "bfloat16"})
    with torch.no_grad():
        exact, rounded = (head_logits(mixture.model, batch.states, batch.mask, c) for c in (config.model, half))
        again = head_logits(mixture.model, batch.states, batch.mask, half)
    assert rounded.dtype == torch.float32 and torch.equal(rounded, again)
    assert not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, rtol=0.05, atol=0.05)



def test_head_dtype_auto_takes_bfloat16_only_where_the_cpu_has_its_kernels(tiny):
    """Emulated bfloat16 costs ~60x float32 on an AVX2 CPU: `auto` must pick float32 there, and an
    explicit bfloat16 says why it is slow."""
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    auto = config.model.model_copy(update={"head_dtype": "auto"})
    chosen = config.model.model_copy(update={"head_dtype": "bfloat16" if native else "float32"})
    assert head_dtype(auto, torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    with torch.no_grad():
        assert torch.equal(head_logits(mixture.model, batch.states, batch.mask, auto),
                           head_logits(mixture.model, batch.states, batch.mask, chosen))
    if not native:
        with pytest.warns(UserWarning, match="without bfloat16 kernels"):
            head_dtype(config.model.model_copy(update={"head_dtype": "bfloat16"}), torch.device("cpu"))

# --- the weights --------------------------------------------------------------------------------------


def _state(n=12, d=8, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return AggregatorState([f"u:{i}" for i in range(n)], torch.randint(0, 2, (n,), generator=g),
                           torch.randn(n, d, generator=g), {s: torch.rand(n, generator=g) for s in range(k)})


def test_apa_weights_follow_the_formula():
    state, query = _state(), torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    got = apa_weights(query, state, neighbours=5, tau=3.0)
    keys = state.embeddings.numpy() / np.linalg.norm(state.embeddings.numpy(), axis=1, keepdims=True)
    for row, q in enumerate(query.numpy()):
        nearest = np.argsort(-(keys @ (q / np.linalg.norm(q))))[:5]
        error = np.array([np.abs(state.labels.numpy()[nearest] - state.predictions[k].numpy()[nearest]).mean() for k in range(K)])
        expected = np.exp(-3.0 * error) / np.exp(-3.0 * error).sum()
        np.testing.assert_allclose(got[row].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_the_weights_follow_a_shards_new_predictions_and_a_dropped_shard():
    """The attention's per-state lookup (keys, labels, stacked predictions) is recomputed when a
    round replaces a shard's predictions or drops a shard: the same weights as a fresh state's."""
    state, query = _state(), torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    before = apa_weights(query, state, neighbours=5, tau=3.0)
    state.predictions[1] = 1 - state.predictions[1]
    fresh = AggregatorState(state.sample_ids, state.labels, state.embeddings, dict(state.predictions))
    after = apa_weights(query, state, neighbours=5, tau=3.0)
    assert torch.equal(after, apa_weights(query, fresh, neighbours=5, tau=3.0)) and not torch.equal(before, after)
    state.predictions.pop(2)
    assert apa_weights(query, state, neighbours=5, tau=3.0).shape == (4, K - 1)


def test_tau_zero_gives_uniform_weights():
    state, query = _state(), torch.randn(3, 8)
    assert torch.equal(apa_weights(query, state, neighbours=5, tau=0.0), torch.full((3, K), 1 / K))
    assert torch.equal(uniform_weights(3, [0, 1, 2]), torch.full((3, K), 1 / K))


@pytest.mark.parametrize("tau", [0.0, 1.0, 1000.0])
def test_a_masked_shard_gets_zero_and_the_rest_sum_to_one(tau):
    state, query = _state(), torch.randn(6, 8)
    w = apa_weights(query, state, neighbours=4, tau=tau, masked={1})
    assert torch.all(w[:, 1] == 0)
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    assert torch.all(w[:, [0, 2]] > 0) or tau > 100  # with a large tau the best shard takes (almost) all


def test_every_shard_masked_is_an_error_not_nan():
    with pytest.raises(ValueError, match="every shard is masked"):
        masked_softmax(torch.zeros(2, K), [0, 1, 2], {0, 1, 2})


def test_apa_without_validation_samples_falls_back_to_uniform():
    empty = AggregatorState([], torch.zeros(0), torch.zeros(0, 8), {k: torch.zeros(0) for k in range(K)})
    w = apa_weights(torch.randn(2, 8), empty, neighbours=5, tau=1000.0, masked={2})
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0.0]] * 2))


def test_routing_picks_the_nearest_prototype_and_falls_back_when_it_is_masked():
    centroids = np.eye(3, 4)
    partitioner = Partitioner("adaptive", 3, 0, center=np.zeros(4), centroids=centroids)
    query = np.array([[0.1, 0.2, 1.0, 0.0], [1.0, 0.6, 0.0, 0.0]])  # nearest 2 (then 1); nearest 0 (then 1)
    assert partitioner.nearest(query).tolist() == [2, 0]
    ranking = partitioner.ranking(query)
    assert torch.equal(routing_weights(ranking, [0, 1, 2]), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(routing_weights(ranking, [0, 1, 2], masked={2}), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(routing_weights(ranking, [0, 1, 2], masked={0, 2}), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="every shard is masked"):
        routing_weights(ranking, [0, 1, 2], masked={0, 1, 2})


def test_mixture_weights_dispatch_every_method(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    rows = len(batch)
    hidden = mixture.model.config.hidden_size
    state = _state(n=10, d=hidden)
    partitioner = Partitioner("semantic", K, 0, center=np.zeros(hidden), centroids=np.eye(K, hidden))
    for method in ("attention", "decomposed", "uniform", "routing", "average"):
        w = mixture_weights(config, mixture, batch, state, partitioner, masked={0}, method=method)
        assert w.shape == (rows, K) and torch.all(w[:, 0] == 0)
        torch.testing.assert_close(w.sum(1), torch.ones(rows))
    with pytest.raises(ValueError, match="aggregator state"):
        mixture_weights(config, mixture, batch, _state(k=2, d=hidden), partitioner, method="attention")
    # one registry of methods, and the config offers exactly those
    assert set(AGGREGATIONS) == set(get_args(AggregateConfig.model_fields["method"].annotation))


# --- the sparse mixture: a row's top-m adapters by APA weight -------------------------------------------


def test_top_weights_keep_the_fewest_largest_within_the_mass_renormalised_and_report_the_rest():
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.625, 0.125]])  # sums exact in binary
    two = top_weights(w, top_m=2)
    assert two.index.tolist() == [[0, 1], [2, 0]]  # ties keep the lower shard (a stable sort)
    torch.testing.assert_close(two.weights, torch.tensor([[2 / 3, 1 / 3], [5 / 6, 1 / 6]]))
    torch.testing.assert_close(two.dropped, torch.tensor([0.25, 0.25]))
    # mass 0.6: row 0 needs 0.5 + 0.25, row 1 has it in its first; row 1 pads with a zero weight
    by_mass = top_weights(w, mass=0.6)
    assert by_mass.index.tolist() == [[0, 1], [2, 0]]
    torch.testing.assert_close(by_mass.weights, torch.tensor([[2 / 3, 1 / 3], [1.0, 0.0]]))
    torch.testing.assert_close(by_mass.dropped, torch.tensor([0.25, 0.375]))
    torch.testing.assert_close(by_mass.dense(4), torch.tensor([[2 / 3, 1 / 3, 0, 0], [0, 0, 1.0, 0]]))
    assert top_weights(w, top_m=1, mass=0.9).index.tolist() == [[0], [2]]  # top_m caps the mass rule
    for everything in (top_weights(w, top_m=4), top_weights(w, mass=1.0), top_weights(w, top_m=9, mass=1.0)):
        assert everything.index is None and everything.weights is w and not everything.dropped.any()


def test_the_sparse_mixture_is_the_dense_one_with_the_left_out_weights_at_zero(tiny):
    """The gathered rank-(m r) path computes what the stacked rank-(K r) path computes for the same
    weights, per row (every row has its own adapters), non-decomposed and decomposed."""
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    w = torch.softmax(torch.randn(len(batch), K, generator=torch.Generator().manual_seed(3)) * 2, -1)
    for m in (1, 2):
        chosen = top_weights(w, top_m=m)
        assert chosen.index.shape == (len(batch), m) and len({tuple(r) for r in chosen.index.tolist()}) > 1
        for decomposed in (False, True):
            torch.testing.assert_close(mixture.p_yes(batch, chosen.weights, decomposed, chosen.index),
                                       mixture.p_yes(batch, chosen.dense(K), decomposed), rtol=0, atol=1e-6)


def test_the_sparse_mixtures_change_in_p_yes_is_bounded_by_the_weight_mass_left_out(tiny):
    """Bound (components/aggregate.py): with d the mass left out, the weights move by |w' - w|_1 = 2d,
    and to first order in the adapters' updates P(yes) is linear in the weights, so
        |P_sparse - P_dense| ~ d |P(kept adapters) - P(left-out adapters)| <= d (max_k P_k - min_k P_k)
    with P_k the adapter alone. The test allows twice that (plus float rounding) for the second-order
    terms: with LoRA in both layers (trunk-0) they reach 1.65x of the first-order bound over 20
    seeds, 1.02x with one. The bound is at most a few hundredths of P here, and it shrinks with d."""
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    alone = torch.stack([mixture.p_yes(batch, _one_hot(len(batch), k)) for k in range(K)], 1)  # [rows, K]
    spread = alone.max(1).values - alone.min(1).values
    for seed in range(4):
        w = torch.softmax(torch.randn(len(batch), K, generator=torch.Generator().manual_seed(seed)) * 3, -1)
        dense = mixture.p_yes(batch, w)
        for m in (1, 2):
            chosen = top_weights(w, top_m=m)
            sparse = mixture.p_yes(batch, chosen.weights, index=chosen.index)
            bound = 2 * chosen.dropped * spread
            assert torch.all((sparse - dense).abs() <= bound + 1e-6), (seed, m, sparse - dense, bound)
            assert torch.all(chosen.dropped > 0) and torch.all(bound < 0.06)


def test_top_m_of_k_or_weight_mass_one_is_exactly_the_dense_mixture_and_a_smaller_m_is_not(tiny):
    config, tokenizer, peft_model, adapters, mixture, batch = tiny
    state = _state(n=10, d=mixture.model.config.hidden_size)
    trunk = {"trunk_layers": config.model.trunk_layers}
    dense = predict(config, mixture, [batch], state, None, masked={1})
    assert not dense.dropped.any()
    for sparse in ({"top_m": K}, {"weight_mass": 1.0}, {"top_m": K + 2, "weight_mass": 1.0}):
        same = predict(load_config(TINY, model=trunk, aggregate=sparse), mixture, [batch], state, None, masked={1})
        assert np.array_equal(same.p_yes, dense.p_yes) and np.array_equal(same.weights, dense.weights)
        assert not same.dropped.any()
    one = predict(load_config(TINY, model=trunk, aggregate={"top_m": 1, "tau": 1.0}), mixture, [batch], state, None)
    assert np.array_equal(one.weights.max(1), np.ones(len(batch))) and np.all((one.weights > 0).sum(1) == 1)
    assert np.all(one.dropped > 0) and not np.allclose(one.p_yes, dense.p_yes, rtol=0, atol=1e-7)
    # the other methods are not APA's attention: the sparse fields leave them as they are
    uniform = predict(load_config(TINY, model=trunk, aggregate={"top_m": 1}), mixture, [batch], state, None, method="uniform")
    assert np.array_equal(uniform.weights, np.full((len(batch), K), 1 / K, dtype=np.float32)) and not uniform.dropped.any()


@pytest.mark.parametrize("aggregate, message", [
    ({"top_m": 0}, "aggregate.top_m"), ({"weight_mass": 0}, "aggregate.weight_mass"),
    ({"weight_mass": 1.5}, "aggregate.weight_mass"), ({"top_m": 2, "method": "uniform"}, "apply to method attention"),
    ({"top_k": 2}, r"aggregate\.top_k: unknown key")])
def test_bad_sparse_settings_are_config_errors(aggregate, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, aggregate=aggregate)


# --- serving helpers -----------------------------------------------------------------------------------


def test_a_shard_masked_by_a_server_stays_masked_until_its_new_version_is_loaded():
    loaded = {0: "1", 1: "1", 2: "1"}
    # the forget job unmasked shard 1 because its new version 2 is live; this server still holds v1
    assert served_mask(set(), {1}, loaded, {0: "1", 1: "2", 2: "1"}) == {1}
    # once the server holds the live versions, the registry's mask is the whole story
    assert served_mask(set(), {1}, {0: "1", 1: "2", 2: "1"}, {0: "1", 1: "2", 2: "1"}) == set()
    # a shard nobody masked is not masked just because a newer version exists (plain re-training)
    assert served_mask({2}, set(), loaded, {0: "5", 1: "5", 2: "5"}) == {2}
    # a shard the live set no longer holds (its data all forgotten) serves no more, masked or not
    assert served_mask(set(), set(), loaded, {0: "1", 2: "1"}) == {1}
    assert served_mask(set(), set(), loaded, {}) == {0, 1, 2}  # every shard emptied: nothing serves


def test_request_history_becomes_the_training_prompt():
    titles = {"1": "Toy Story (1995)", "2": "GoldenEye (1995)", "3": "Heat (1995)", "4": "Babe (1995)"}
    liked, disliked = history_split([(1, 5), ("2", 2), (3, 4.5)], titles, liked_above=3.0, history_len=10)
    assert (liked, disliked) == (["Toy Story (1995)", "Heat (1995)"], ["GoldenEye (1995)"])
    assert history_split([(1, 5), (2, 2), (3, 4)], titles, 3.0, history_len=2) == (["Heat (1995)"], ["GoldenEye (1995)"])
    assert candidate_prompts(liked, disliked, [4, "1"], titles, DEFAULT_PROMPT) == [
        build_prompt(liked, disliked, "Babe (1995)"), build_prompt(liked, disliked, "Toy Story (1995)")]
    assert unknown_items([1, 99, "x", 99, "2"], titles) == [99, "x"]
