"""Feature circuits (tvlib.circuits): the loss scores the answers' tokens, the splice is
the model, attribution is exact where the loss is linear, integrated gradients converge,
ablation masks and faithfulness are right at their ends, and results are cached."""

import pandas as pd
import pytest
import torch

from tvlib import circuits as C
from tvlib.architectures import architecture
from tvlib.experiments import build_task_prompts, model_tasks, prompt_config
from tvlib.prompt_batch import TOKEN_GROUPS, tokenize_prompts
from tvlib.prompts import few_shot_prompts
from tvlib.saes import load_sae

LAYERS = (2, 4)


@pytest.fixture(scope="module")
def batch(toy_lm):
    task = model_tasks(toy_lm, ["antonyms"])["antonyms"]
    cfg = prompt_config(toy_lm, n_prompts=6, n_shots=4)
    return build_task_prompts(toy_lm.tokenizer, task, cfg).few_shot


@pytest.fixture(scope="module")
def saes():
    return {layer: load_sae("toy", layer, "cpu") for layer in LAYERS}


def test_token_groups_and_answer_positions(toy_lm, batch):
    """Each token's group is the text it covers; every answer's tokens are its own, the
    query's row equal to the scored tokens."""
    tok = toy_lm.tokenizer
    for row, prompt in enumerate(batch.prompts):
        groups = batch.token_groups[row]
        real = batch.attention_mask[row].bool()
        assert (groups[~real] == -1).all() and (groups[real] >= 0).all()
        separators = (groups == TOKEN_GROUPS.index("separator")).nonzero().flatten()
        assert separators.tolist() == batch.separator_pos[row].tolist()
        for i, (_, y) in enumerate(prompt.pairs):
            first = batch.answer_pos[row, i, 0]
            assert tok.decode(batch.input_ids[row, first]).strip() == y.split()[0][:len(
                tok.decode(batch.input_ids[row, first]).strip())]
            assert groups[first] == TOKEN_GROUPS.index("output")
        assert batch.answer_pos[row, -1].tolist() == batch.target_pos[row].tolist()


def test_icl_loss_skips_the_first_answer_and_equals_a_direct_computation(toy_lm, batch):
    rows, predict, targets = C.icl_loss_tokens(batch)
    # every answer but the first demonstration's, n_first tokens each where present
    expected = (batch.answer_pos[:, 1:] >= 0).sum()
    assert len(rows) == int(expected)
    assert not set(zip(rows.tolist(), (predict + 1).tolist())) & set(
        zip(range(len(batch)), batch.answer_pos[:, 0, 0].tolist()))
    with torch.no_grad():
        loss = C.icl_loss(toy_lm, batch)
        logits = toy_lm._module(**batch.model_inputs()).logits          # (B, T, V)
    direct = -logits.log_softmax(-1)[rows, predict, targets].sum() / len(batch)
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-5)


def test_spliced_forward_equals_the_model(toy_lm, batch, saes):
    with torch.no_grad():
        clean = C.icl_loss(toy_lm, batch)
        with C.Splice(toy_lm, saes) as splice:
            spliced = C.icl_loss(toy_lm, batch)
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    # the SAE does not reconstruct the residual alone: the error term carries the rest
    assert all(splice.errors[layer].norm() > 0 for layer in LAYERS)
    # and the hooks are gone on exit
    with torch.no_grad():
        assert C.icl_loss(toy_lm, batch) == clean


def _linear_loss(layer: int, direction: torch.Tensor):
    """A loss linear in the spliced resid_pre ``layer`` (read after the splice)."""
    def loss(lm, chunk, n_prompts):
        block = lm._module.get_submodule(architecture(lm).blocks)[layer]
        seen = {}

        def read(module, args, kwargs):     # runs after the splice's hook: sees its output
            seen["h"] = args[0] if args else kwargs["hidden_states"]

        handle = block.register_forward_pre_hook(read, with_kwargs=True)
        try:
            lm._module(**chunk.model_inputs())
        finally:
            handle.remove()
        mask = chunk.attention_mask[..., None].to(seen["h"].dtype)
        return (seen["h"] * mask @ direction).sum() / n_prompts
    return loss


def test_attribution_is_exact_on_a_linear_loss(toy_lm, batch):
    """Where the loss is linear in the nodes, gradient x difference is the exact effect of
    setting a node to its baseline: for latents (decode is affine) and errors alike."""
    layer = 4
    saes = {layer: load_sae("toy", layer, "cpu")}
    direction = torch.randn(128, generator=torch.Generator().manual_seed(0))
    loss = _linear_loss(layer, direction)
    baselines = C.group_baselines(toy_lm, batch, saes, "mean", 4)
    effects = C.attribute(toy_lm, batch, saes, baselines, 4, loss)
    latent, error = effects[layer]
    n_latents = {layer: saes[layer].cfg.d_sae}
    clean = C.ablated_loss(toy_lm, batch, saes, baselines, C.keep_all(saes, n_latents), 4, loss)
    ranked = C._ranked(effects)
    assert ranked
    checked = [node for _, node in ranked[:5]] + \
        [C.Node(layer, "error", None, "separator")]
    # the exact effect is a difference of two float32 losses: good to a few of their ulps
    ulps = 4 * torch.finfo(torch.float32).eps * abs(clean)
    for node in checked:
        exact = C.ablated_loss(toy_lm, batch, saes, baselines,
                               C.keep_nodes(saes, n_latents, [node], value=False), 4, loss)
        assert C._effect_of(effects, node) == pytest.approx(exact - clean, rel=1e-3,
                                                            abs=max(1e-4, ulps))
    # the whole layer at its baselines: the sum of every node's effect
    none = C.ablated_loss(toy_lm, batch, saes, baselines, C.keep_all(saes, n_latents, False), 4,
                          loss)
    assert float(latent.sum() + error.sum()) == pytest.approx(none - clean, rel=1e-3, abs=1e-3)


def test_integrated_gradients_converge_to_the_layer_ablation(toy_lm, batch, saes):
    """On the real (nonlinear) ICL loss, a layer's summed integrated gradients approach the
    exact change when the layer is set to its baselines as the steps grow."""
    layer = 4
    one = {layer: saes[layer]}
    baselines = C.group_baselines(toy_lm, batch, one, "mean", 6)
    n_latents = {layer: one[layer].cfg.d_sae}
    clean = C.ablated_loss(toy_lm, batch, one, baselines, C.keep_all(one, n_latents), 6)
    exact = C.ablated_loss(toy_lm, batch, one, baselines, C.keep_all(one, n_latents, False), 6)
    errors = []
    for steps in (1, 4, 16):
        latent, error = C.integrated_gradients(toy_lm, batch, one, baselines, steps, 6)[layer]
        errors.append(abs(float(latent.sum() + error.sum()) - (exact - clean)))
    assert errors[2] < errors[0]
    assert errors[2] < 0.05 * abs(exact - clean)


def test_faithfulness_ends_and_masks(toy_lm, batch, saes):
    """Keeping every node is the clean model, keeping none is the 'no nodes' loss; the
    curve starts at faithfulness 0 and completeness 1, and keeping every ranked node
    recovers the whole gap."""
    cfg = C.CircuitConfig(exact_nodes=2, sizes=(3, 100000), top_nodes=10, batch_size=4)
    out = C.feature_circuit(toy_lm, batch, saes, cfg)
    totals = out["totals"].set_index("what").loss
    with torch.no_grad():
        assert totals["all nodes"] == pytest.approx(float(C.icl_loss(toy_lm, batch)), abs=1e-4)
    faith = out["faithfulness"].set_index("n_nodes")
    assert faith.faithfulness.iloc[0] == 0 and faith.completeness.iloc[0] == 1
    assert faith.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-4)
    assert faith.completeness.iloc[-1] == pytest.approx(0.0, abs=1e-4)
    assert totals["no nodes (mean ablation)"] > totals["all nodes"]
    # the exact check holds the top nodes, with both estimates beside the ablation
    assert len(out["exact"]) == 2 and out["exact"].exact.notna().all()
    nodes = out["nodes"]
    assert set(nodes.group) == set(C.NODE_GROUPS) and nodes["rank"].max() == 9
    roles = C.latent_roles(nodes.assign(task="antonyms"))
    assert set(roles.role) <= {"detector", "executor", *TOKEN_GROUPS}


def test_config_and_inputs_are_checked(toy_lm, saes):
    with pytest.raises(ValueError, match="baseline='median'"):
        C.CircuitConfig(baseline="median")
    with pytest.raises(ValueError, match="ig_steps=-1"):
        C.CircuitConfig(ig_steps=-1)
    zero = tokenize_prompts(toy_lm.tokenizer, few_shot_prompts(
        model_tasks(toy_lm, ["antonyms"])["antonyms"], 2, 0, 0))
    with pytest.raises(ValueError, match="at least two answers"):
        C.icl_loss_tokens(zero)
    with pytest.raises(ValueError, match="reads resid_pre 2"):
        C.check_circuit_saes(toy_lm, {3: saes[2]})


def test_circuit_sweep_is_cached_under_its_settings(toy_lm, tmp_path, monkeypatch):
    from tvlib.experiments import circuit_sweeps, run_circuit_sweep
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path)
    calls = []
    real = circuit_sweeps.feature_circuit

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(circuit_sweeps, "feature_circuit", counted)
    cfg = prompt_config(toy_lm, n_prompts=3, n_shots=3)
    small = C.CircuitConfig(exact_nodes=1, sizes=(2,), top_nodes=5)
    first = run_circuit_sweep(toy_lm, ["antonyms"], [4], cfg, small)
    again = run_circuit_sweep(toy_lm, ["antonyms"], [4], cfg, small)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first["nodes"], again["nodes"])
    assert set(first) == {"nodes", "exact", "faithfulness", "totals", "cost"}
    assert (first["nodes"].task == "antonyms").all()
    run_circuit_sweep(toy_lm, ["antonyms"], [4], cfg, C.CircuitConfig(
        exact_nodes=1, sizes=(2,), top_nodes=5, baseline="mean"))
    run_circuit_sweep(toy_lm, ["antonyms"], [3, 4], cfg, small)
    assert len(calls) == 3


def test_roles_and_picks_read_where_effects_sit():
    rows = [  # (task, layer, feature, group, effect)
        ("a", 4, 1, "separator", 0.5), ("a", 4, 1, "output", 0.1),
        ("a", 4, 2, "separator", -0.9), ("a", 4, 2, "output", 0.0),
        ("a", 4, 3, "output", 0.3), ("a", 4, 3, "separator", 0.2),
        ("a", 3, 4, "output", 0.8), ("b", 4, 5, "separator", -0.1)]
    nodes = pd.DataFrame(rows, columns=["task", "layer", "feature", "group", "effect"]).assign(
        kind="latent")
    roles = C.latent_roles(nodes).set_index("feature")
    assert roles.role.to_dict() == {1: "executor", 2: "executor", 3: "detector", 4: "detector",
                                    5: "executor"}
    assert roles.total[2] == pytest.approx(-0.9)
    # the largest positive effect at the role's tokens; a task with none is left out
    assert C.top_role_features(nodes, 4, "executor", k=2) == {"a": [1, 3]}
    assert C.top_role_features(nodes, 4, "detector") == {"a": [3]}
    ranks = C.circuit_ranks(nodes, 4, {"a": [2, 9]})
    assert ranks.circuit_rank.tolist()[0] == 0 and pd.isna(ranks.circuit_rank.tolist()[1])
    with pytest.raises(ValueError, match="role='planner'"):
        C.top_role_features(nodes, 4, "planner")


def test_special_tokens_hold_no_nodes(toy_lm, batch, saes):
    """BOS is spliced but never attributed or ablated: with every node ablated, or halfway
    along integrated gradients' path, its latents (it attends to itself only) are the
    clean ones at every layer."""
    groups = C.node_groups(batch)
    special = batch.token_groups == TOKEN_GROUPS.index("special")
    assert special.any() and (groups[special] == -1).all()
    n_latents = {layer: sae.cfg.d_sae for layer, sae in saes.items()}
    baselines = C.group_baselines(toy_lm, batch, saes, "mean", 6)
    edits = {"ablated": C._ablating(C.keep_all(saes, n_latents, False), baselines, groups),
             "halfway": C._interpolate(LAYERS[0], 0.5, baselines, groups)}
    with torch.no_grad():
        with C.Splice(toy_lm, saes) as clean:
            C.icl_loss(toy_lm, batch)
        for edit in edits.values():
            with C.Splice(toy_lm, saes, edit) as edited:
                C.icl_loss(toy_lm, batch)
            for layer in saes:
                here = special[:, :clean.latents[layer].shape[1]]
                torch.testing.assert_close(edited.latents[layer][here],
                                           clean.latents[layer][here])
                assert not torch.equal(edited.latents[layer][~here],
                                       clean.latents[layer][~here])
    effects = C.attribute(toy_lm, batch, saes, baselines, 6)
    g = TOKEN_GROUPS.index("special")
    assert all((f[g] == 0).all() and e[g] == 0 for f, e in effects.values())


def test_chunking_does_not_change_results(toy_lm):
    """Means and effects over all prompts, whatever the chunks: prompts whose scored
    tokens end at different positions (answers of one and two tokens, n_first=1) run
    one by one or together."""
    task = model_tasks(toy_lm, ["location_country"])["location_country"]
    cfg = prompt_config(toy_lm, n_prompts=8, n_shots=3, n_first=1)
    batch = build_task_prompts(toy_lm.tokenizer, task, cfg).few_shot
    assert (batch.answer_pos[:, -1, 0] < batch.input_ids.shape[1] - 1).any()   # cut somewhere
    saes = {layer: load_sae("toy", layer, "cpu") for layer in (2, 4)}
    whole = C.group_baselines(toy_lm, batch, saes, "mean", len(batch))
    single = C.group_baselines(toy_lm, batch, saes, "mean", 1)
    for layer in saes:
        torch.testing.assert_close(single.latents[layer], whole.latents[layer])
        torch.testing.assert_close(single.errors[layer], whole.errors[layer])
    effects = {bs: C.attribute(toy_lm, batch, saes, whole, bs) for bs in (1, len(batch))}
    for layer in saes:
        for a, b in zip(effects[1][layer], effects[len(batch)][layer]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    n_latents = {layer: sae.cfg.d_sae for layer, sae in saes.items()}
    none = C.keep_all(saes, n_latents, False)
    assert C.ablated_loss(toy_lm, batch, saes, whole, none, 1) == pytest.approx(
        C.ablated_loss(toy_lm, batch, saes, whole, none, len(batch)), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sae_device", ["cpu", "cuda"])
def test_a_cuda_model_gives_the_cpu_effects_with_the_sae_on(sae_device, toy_lm, batch):
    """The splice runs each SAE where it sits and writes back onto the model's device:
    the toy model on CUDA (float32) gives the CPU's baselines, effects and ablated loss."""
    from tvlib.models import load_model
    layer = 4
    cpu_saes = {layer: load_sae("toy", layer, "cpu")}
    gpu_lm, gpu_saes = load_model("toy", device="cuda"), {layer: load_sae("toy", layer, sae_device)}
    results = []
    for lm, saes in ((toy_lm, cpu_saes), (gpu_lm, gpu_saes)):
        baselines = C.group_baselines(lm, batch, saes, "mean", 4)
        latent, error = C.attribute(lm, batch, saes, baselines, 4)[layer]
        n_latents = {layer: saes[layer].cfg.d_sae}
        none = C.ablated_loss(lm, batch, saes, baselines, C.keep_all(saes, n_latents, False), 4)
        results.append((baselines.latents[layer].cpu(), latent.cpu(), error.cpu(), none))
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
