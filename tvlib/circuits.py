"""Task features found by circuits: the in-context loss attributed to SAE latents, and to
each SAE's error, at every layer with an SAE, summed over position groups (Sparse Feature
Circuits, Marks et al. 2024, as the writeup found its detectors and as Kharlapenko et al.
2025 scaled it to in-context learning).

The SAEs are spliced into the residual stream with their error terms: at each SAE layer
``resid_pre = decode(f) + e`` with ``f = encode(resid_pre)`` and ``e`` what the SAE misses,
so the spliced forward pass is the model's. A *node* is (layer, latent or error, position
group, ``NODE_GROUPS``); its *effect* is the change in the ICL loss when its
activation is set to a baseline at the tokens of its group (zero, or its mean over those
tokens of all the prompts), with every later layer left to respond. It is estimated by
attribution patching (gradient x (activation - baseline), one forward and backward pass),
or by integrated gradients (the gradient averaged along the straight path from the
baseline, ``ig_steps`` passes per layer), and measured exactly by ablation for the top
nodes. Positive effect: setting the node to its baseline raises the loss (it helps).

Two baselines serve two questions. Attribution asks what the model uses: zero by default,
so that a latent's effect is what it contributes where it is active. A group's mean mixes
early demonstrations, where a task latent is still weak, with late ones, so mean-ablating
a task latent at separators strengthens it at the early ones and often *lowers* the loss.
Faithfulness asks whether a few nodes carry the task with everything else removed: mean
ablation by default, as the sequel.

The ICL loss (``icl_loss_tokens``): the answer NLL of every demonstration but the first
and of the query, summed per prompt, averaged over prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from .architectures import architecture, submodule
from .checks import NON_NEGATIVE_INT, POSITIVE_INT, check, distinct, one_of, validate
from .models import check_context, check_layers, require_local, to_model
from .prompt_batch import TOKEN_GROUPS, PromptBatch
from .saes import check_sae_site

NODE_KINDS = ("latent", "error")
# Special tokens (BOS) hold no nodes: their residual is the same in every prompt, and in
# Gemma it is an attention sink of huge norm that zeroing wrecks whatever the task; they
# are spliced (their error term keeps them exact) but never attributed or ablated.
NODE_GROUPS = tuple(g for g in TOKEN_GROUPS if g != "special")
BASELINES = ("mean", "zero")


@dataclass(frozen=True)
class CircuitConfig:
    """How nodes are attributed and checked.

    baseline: what attribution sets a node to, and the exact check with it, "zero" or
    "mean" (its mean over the tokens of its group in all the prompts). ablation: what the
    faithfulness and completeness curves set the nodes left out to ("mean": the sequel's
    mean ablation, or "zero"). ig_steps: integrated-gradient steps per layer (0:
    attribution patching only). top_nodes: latents (and errors) kept in the nodes table,
    ranked by their largest |effect| over groups, each with its row for every group.
    exact_nodes: top (node, group) pairs also ablated exactly. sizes: numbers of top
    (node, group) pairs kept (or ablated) in the faithfulness (completeness) curve.
    """

    baseline: str = "zero"
    ablation: str = "mean"
    ig_steps: int = 10
    top_nodes: int = 200
    exact_nodes: int = 20
    sizes: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    batch_size: int = 16

    def __post_init__(self):
        validate(self, baseline=one_of(BASELINES), ablation=one_of(BASELINES),
                 ig_steps=NON_NEGATIVE_INT,
                 top_nodes=POSITIVE_INT, exact_nodes=NON_NEGATIVE_INT,
                 sizes=distinct(POSITIVE_INT), batch_size=POSITIVE_INT)


# ---------------------------------------------------------------- the loss

def icl_loss_tokens(batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens the ICL loss scores: (rows, predict_pos, targets), each (N,).

    Every answer's first ``n_first`` tokens except the first demonstration's (nothing
    before it shows the task) and the query's; ``predict_pos`` is the position whose
    logits predict the token.
    """
    later = batch.answer_pos[:, 1:]                                       # (B, A - 1, n_first)
    rows, answer, slot = (later >= 0).nonzero(as_tuple=True)
    if rows.unique().numel() != len(batch):
        raise ValueError("the ICL loss needs prompts with at least two answers in the text "
                         "(one demonstration and the query's answer): use few-shot prompts")
    pos = later[rows, answer, slot]
    return rows, pos - 1, batch.input_ids[rows, pos]


@contextmanager
def _logits_at(lm, rows: torch.Tensor, predict_pos: torch.Tensor):
    """Inside: the model's logits are (N, V), only at ``(rows, predict_pos)`` (the
    unembedding, and any soft-capping after it, runs there alone)."""
    head = submodule(lm._module, architecture(lm).unembedding)

    def select(module, args):
        return (args[0][rows, predict_pos],)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def icl_loss(lm, batch: PromptBatch, n_prompts: int | None = None) -> torch.Tensor:
    """The ICL loss of ``batch`` through the model as it is now (with any splice active),
    differentiable: the per-prompt summed NLL of ``icl_loss_tokens``, summed and divided
    by ``n_prompts`` (default ``len(batch)``; a chunk of a larger set passes the set's)."""
    rows, predict_pos, targets = icl_loss_tokens(batch)
    end = int(predict_pos.max()) + 1               # later tokens predict nothing scored
    check_context(lm, end)
    inputs = to_model(lm, {k: v[:, :end] for k, v in batch.model_inputs().items()})
    device = inputs["input_ids"].device
    with _logits_at(lm, rows.to(device), predict_pos.to(device)):
        logits = lm._module(**inputs).logits                                  # (N, V)
    picked = logits.float().log_softmax(-1).gather(-1, targets.to(device)[:, None])[:, 0]
    return -picked.sum() / (n_prompts or len(batch))


# ---------------------------------------------------------------- the splice

Edit = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# loss(lm, chunk, n_prompts) -> scalar tensor: ``icl_loss``, or another function of the
# forward pass (the tests use one linear in a layer's residual)
Loss = Callable[[object, PromptBatch, int], torch.Tensor]


class Splice:
    """The SAEs spliced into ``lm``'s resid_pre at their layers, while in a ``with`` block.

    At each layer: ``f = encode(h)``, ``e = h - decode(f)``; ``edit(layer, f, e)`` may
    change them (ablation, integrated gradients) and the block reads
    ``decode(f') + e'``. With ``track``, ``f'`` and ``e'`` enter through zero tensors
    that require gradients, so after a backward pass ``grads[layer]`` holds the loss's
    gradient with respect to each (each with the other held: the partial derivative
    of a node). ``latents`` and ``errors`` keep ``f'`` and ``e'`` (detached), (B, T, n)
    and (B, T, d).
    """

    def __init__(self, lm, saes: dict, edit: Edit | None = None, track: bool = False):
        self.lm, self.saes, self.edit, self.track = lm, saes, edit, track
        self.latents: dict[int, torch.Tensor] = {}
        self.errors: dict[int, torch.Tensor] = {}
        self._leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        layers = self.lm._module.get_submodule(architecture(self.lm).blocks)
        for layer in self.saes:
            block = layers[layer]
            self._handles.append(block.register_forward_pre_hook(
                self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def grads(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / d f', d loss / d e') at ``layer`` after a backward pass."""
        f_leaf, e_leaf = self._leaves[layer]
        if f_leaf.grad is None:
            raise RuntimeError("no gradient yet: call backward() on the loss first")
        return f_leaf.grad, e_leaf.grad

    def _hook(self, layer: int):
        sae = self.saes[layer]

        def splice(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]                  # (B, T, d)
            x = h.to(sae.W_dec.device, torch.float32)          # the SAE may sit elsewhere
            f = sae.encode(x)                                                 # (B, T, n)
            e = x - sae.decode(f)                                             # (B, T, d)
            if self.edit is not None:
                f, e = self.edit(layer, f, e)
            if self.track:
                f_leaf = torch.zeros_like(f, requires_grad=True)
                e_leaf = torch.zeros_like(e, requires_grad=True)
                self._leaves[layer] = (f_leaf, e_leaf)
                f, e = f + f_leaf, e + e_leaf
            self.latents[layer], self.errors[layer] = f.detach(), e.detach()
            spliced = (sae.decode(f) + e).to(h.device, h.dtype)
            if args:
                return (spliced, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": spliced}

        return splice


# ---------------------------------------------------------------- baselines

@dataclass
class Baselines:
    """Per layer, each group's baseline latents (G, n) and error (G, d), float32."""

    latents: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]

    def zeros(self) -> Baselines:
        return Baselines({k: torch.zeros_like(v) for k, v in self.latents.items()},
                         {k: torch.zeros_like(v) for k, v in self.errors.items()})

    def at(self, layer: int, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The baselines laid out on a batch: (B, T, n) and (B, T, d); tokens without a
        node (group -1) get group 0's, which every caller leaves unused."""
        index = groups.clamp(min=0)
        return self.latents[layer][index], self.errors[layer][index]


def _group_sums(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(G, ...) sums of ``values`` (B, T, ...) over the tokens of each group (padding out)."""
    flat, ids = values.flatten(0, 1), groups.flatten().to(values.device)
    keep = ids >= 0
    out = torch.zeros(len(TOKEN_GROUPS), *values.shape[2:], device=values.device,
                      dtype=values.dtype)
    return out.index_add(0, ids[keep], flat[keep])


def group_baselines(lm, batch: PromptBatch, saes: dict, baseline: str,
                    batch_size: int) -> Baselines:
    """Each group's mean latents and error over every token of ``batch`` ("mean"), or
    zeros. The prompts run whole (not cut after the last scored token, as the loss is),
    so the means do not depend on how the batch is chunked."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}: choose one of {BASELINES}")
    body = submodule(lm._module, architecture(lm).body)   # the blocks; no unembedding
    check_context(lm, batch.input_ids.shape[1])
    sums = {layer: [0, 0, 0] for layer in saes}     # latents, errors, tokens per group
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            with Splice(lm, saes) as splice:
                body(**to_model(lm, chunk.model_inputs()))
            for layer in saes:
                groups = _batch_view(chunk, splice, layer)
                f, e = splice.latents[layer], splice.errors[layer]
                sums[layer][0] = sums[layer][0] + _group_sums(f, groups)
                sums[layer][1] = sums[layer][1] + _group_sums(e, groups)
                sums[layer][2] = sums[layer][2] + _group_sums(f.new_ones(*f.shape[:2], 1),
                                                              groups)
    latents, errors = {}, {}
    for layer, (f_sum, e_sum, counts) in sums.items():
        denominator = counts.clamp(min=1)
        latents[layer], errors[layer] = f_sum / denominator, e_sum / denominator
    means = Baselines(latents, errors)
    return means.zeros() if baseline == "zero" else means


# ---------------------------------------------------------------- attribution

def _node_effects(diff_f, grad_f, diff_e, grad_e, groups):
    """(G, n) latent and (G,) error effects of one batch: -(a - baseline) . grad, summed
    over each group's tokens."""
    latent = _group_sums(-(diff_f * grad_f), groups)
    error = _group_sums(-(diff_e * grad_e).sum(-1, keepdim=True), groups)[:, 0]
    return latent, error


def node_groups(batch: PromptBatch) -> torch.Tensor:
    """(B, T) index into ``TOKEN_GROUPS`` of the node group of each token; -1 where a token
    holds no node (padding, special tokens)."""
    special = TOKEN_GROUPS.index("special")
    return batch.token_groups.masked_fill(batch.token_groups == special, -1)


def _batch_view(chunk: PromptBatch, splice: Splice, layer: int):
    """The chunk's node groups cut to the tokens the forward pass ran (the loss stops
    early)."""
    return node_groups(chunk)[:, :splice.latents[layer].shape[1]]


def attribute(lm, batch: PromptBatch, saes: dict, baselines: Baselines,
              batch_size: int = 16, loss: Loss = icl_loss
              ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Attribution patching: per layer, (G, n) latent effects and (G,) error effects on
    the ICL loss of ``batch`` (one forward and backward pass per chunk)."""
    require_local(lm, "circuit attribution")
    out = {layer: [0, 0] for layer in saes}
    for chunk in batch.chunks(batch_size):
        with Splice(lm, saes, track=True) as splice:
            loss(lm, chunk, len(batch)).backward()
        for layer in saes:
            groups = _batch_view(chunk, splice, layer)
            base_f, base_e = baselines.at(layer, groups)
            grad_f, grad_e = splice.grads(layer)
            latent, error = _node_effects(splice.latents[layer] - base_f, grad_f,
                                          splice.errors[layer] - base_e, grad_e, groups)
            out[layer][0] = out[layer][0] + latent
            out[layer][1] = out[layer][1] + error
    return {layer: (f, e) for layer, (f, e) in out.items()}


def _interpolate(layer: int, alpha: float, baselines: Baselines, groups: torch.Tensor) -> Edit:
    """An edit that puts ``layer``'s latents and error at baseline + alpha (value - baseline)
    at every token with a node; tokens without one (group -1) keep their values."""
    def edit(at: int, f, e):
        if at != layer:
            return f, e
        g = groups[:, :f.shape[1]]
        base_f, base_e = baselines.at(layer, g)
        node = (g >= 0).to(f.device)[..., None]
        return (torch.where(node, base_f + alpha * (f - base_f), f),
                torch.where(node, base_e + alpha * (e - base_e), e))
    return edit


def integrated_gradients(lm, batch: PromptBatch, saes: dict, baselines: Baselines,
                         steps: int, batch_size: int = 16, loss: Loss = icl_loss
                         ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Integrated gradients, layer by layer: the layer's latents and error move together
    from their baselines to their values (midpoint rule, ``steps`` points), later layers
    responding; effects as ``attribute``'s. Their sum over a layer's nodes converges to the
    exact change of the loss when the whole layer is set to its baselines."""
    require_local(lm, "circuit attribution")
    check("steps", steps, POSITIVE_INT, "pass e.g. steps=10")
    out = {layer: [0, 0] for layer in saes}
    for chunk in batch.chunks(batch_size):
        with torch.no_grad(), Splice(lm, saes) as clean:     # the values, once per chunk
            loss(lm, chunk, len(batch))
        for layer in saes:
            grad_f = grad_e = 0
            for k in range(steps):
                alpha = (k + 0.5) / steps
                edit = _interpolate(layer, alpha, baselines, node_groups(chunk))
                with Splice(lm, saes, edit, track=True) as splice:
                    loss(lm, chunk, len(batch)).backward()
                g_f, g_e = splice.grads(layer)
                grad_f, grad_e = grad_f + g_f / steps, grad_e + g_e / steps
            groups = _batch_view(chunk, clean, layer)
            base_f, base_e = baselines.at(layer, groups)
            latent, error = _node_effects(clean.latents[layer] - base_f, grad_f,
                                          clean.errors[layer] - base_e, grad_e, groups)
            out[layer][0] = out[layer][0] + latent
            out[layer][1] = out[layer][1] + error
    return {layer: (f, e) for layer, (f, e) in out.items()}


# ---------------------------------------------------------------- ablation

@dataclass(frozen=True)
class Node:
    """One node: (layer, "latent" or "error", latent index or None, group name)."""

    layer: int
    kind: str
    feature: int | None
    group: str


def _ablating(keep: dict[int, tuple[torch.Tensor, torch.Tensor]], baselines: Baselines,
              groups: torch.Tensor) -> Edit:
    """An edit that keeps each (group, latent) and (group, error) where ``keep`` is True
    ((G, n) and (G,) booleans per layer) and sets the rest to their baselines. Tokens
    without nodes (group -1) are never changed; layers not in ``keep`` are left as they
    are."""
    def edit(layer: int, f, e):
        if layer not in keep:
            return f, e
        g = groups[:, :f.shape[1]]
        base_f, base_e = baselines.at(layer, g)
        keep_f, keep_e = keep[layer]
        index, none = g.clamp(min=0), (g < 0).to(f.device)
        keep_f = keep_f.to(f.device)[index] | none[..., None]                  # (B, T, n)
        keep_e = (keep_e.to(f.device)[index] | none)[..., None]                # (B, T, 1)
        return torch.where(keep_f, f, base_f), torch.where(keep_e, e, base_e)
    return edit


def ablated_loss(lm, batch: PromptBatch, saes: dict, baselines: Baselines,
                 keep: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 batch_size: int = 16, loss: Loss = icl_loss) -> float:
    """The ICL loss with every node not in ``keep`` set to its baseline (``_ablating``)."""
    total = 0.0
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            with Splice(lm, saes, _ablating(keep, baselines, node_groups(chunk))):
                total += float(loss(lm, chunk, len(batch)))
    return total


def keep_all(saes: dict, n_latents: dict[int, int], value: bool = True) -> dict:
    """A ``keep`` that holds every node (``value`` True) or none (False)."""
    G = len(TOKEN_GROUPS)
    return {layer: (torch.full((G, n_latents[layer]), value), torch.full((G,), value))
            for layer in saes}


def keep_nodes(saes: dict, n_latents: dict[int, int], nodes, value: bool = True) -> dict:
    """A ``keep`` holding every node but ``nodes`` (``value`` False), or only ``nodes``."""
    keep = keep_all(saes, n_latents, not value)
    for node in nodes:
        g = TOKEN_GROUPS.index(node.group)
        if node.kind == "latent":
            keep[node.layer][0][g, node.feature] = value
        else:
            keep[node.layer][1][g] = value
    return keep


# ---------------------------------------------------------------- one task's circuit

def _ranked(effects: dict) -> list[tuple[float, Node]]:
    """Every (node, group) with its effect, largest |effect| first."""
    items = []
    for layer, (latent, error) in effects.items():
        for g, group in enumerate(TOKEN_GROUPS):
            nonzero = latent[g].nonzero().flatten().tolist()
            items += [(float(latent[g, i]), Node(layer, "latent", i, group)) for i in nonzero]
            if error[g] != 0:
                items.append((float(error[g]), Node(layer, "error", None, group)))
    return sorted(items, key=lambda item: -abs(item[0]))


def check_circuit_saes(lm, saes: dict) -> dict:
    """``saes`` ({layer: SAE}) in layer order, each checked to read its resid_pre layer."""
    layers = check_layers(lm, list(saes))
    for layer in layers:
        check_sae_site(saes[layer], lm, layer)
    return {layer: saes[layer] for layer in sorted(layers)}


def feature_circuit(lm, batch: PromptBatch, saes: dict, cfg: CircuitConfig = CircuitConfig()
                    ) -> dict[str, pd.DataFrame]:
    """One task's circuit on few-shot ``batch``: node effects, their check against exact
    ablation, and the faithfulness and completeness curves.

    Returns tables ``nodes`` (rank, layer, kind, feature, group, effect, effect_ig where
    ig_steps > 0, mean_activation: the latent's mean over the group's tokens), ``exact``
    (the top ``exact_nodes`` (node, group) pairs: estimated and exact effect, both with
    ``cfg.baseline``), ``faithfulness`` (n top pairs kept, the rest set to ``cfg.ablation``:
    loss and fraction of the gap between all nodes ablated and none recovered;
    ``completeness``: the same with only those n ablated) and ``totals`` (the clean loss,
    every node ablated, and each layer set to its attribution baseline beside its summed
    estimates).
    """
    require_local(lm, "circuit attribution")
    saes = check_circuit_saes(lm, saes)
    n_latents = {layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}
    bs = cfg.batch_size
    means = group_baselines(lm, batch, saes, "mean", bs)
    pick = {"mean": means, "zero": means.zeros()}
    baselines, ablation = pick[cfg.baseline], pick[cfg.ablation]
    effects = attribute(lm, batch, saes, baselines, bs)
    ig = integrated_gradients(lm, batch, saes, baselines, cfg.ig_steps, bs) \
        if cfg.ig_steps else None
    ranking_effects = ig or effects
    ranked = _ranked(ranking_effects)

    clean = ablated_loss(lm, batch, saes, ablation, keep_all(saes, n_latents), bs)
    empty = ablated_loss(lm, batch, saes, ablation, keep_all(saes, n_latents, False), bs)
    gap = clean - empty

    def recovered(loss: float) -> float:
        return (loss - empty) / gap if gap else float("nan")

    nodes = _nodes_table(effects, ig, means, ranked, cfg.top_nodes)
    exact_rows = []
    for estimate, node in ranked[:cfg.exact_nodes]:
        loss = ablated_loss(lm, batch, saes, baselines,
                            keep_nodes(saes, n_latents, [node], value=False), bs)
        exact_rows.append({**_node_row(node), "estimate": estimate,
                           "effect": _effect_of(effects, node),
                           "effect_ig": _effect_of(ig, node) if ig else float("nan"),
                           "exact": loss - clean})
    faith_rows = []
    for n in [0, *sorted(cfg.sizes)]:
        top = [node for _, node in ranked[:n]]
        kept = ablated_loss(lm, batch, saes, ablation, keep_nodes(saes, n_latents, top), bs)
        dropped = ablated_loss(lm, batch, saes, ablation,
                               keep_nodes(saes, n_latents, top, value=False), bs)
        faith_rows.append({"n_nodes": min(n, len(ranked)), "loss": kept,
                           "faithfulness": recovered(kept), "loss_without": dropped,
                           "completeness": recovered(dropped)})
    totals = [{"what": "all nodes", "loss": clean, "estimate": float("nan")},
              {"what": f"no nodes ({cfg.ablation} ablation)", "loss": empty,
               "estimate": float("nan")}]
    for layer in saes:
        alone = {layer: keep_all({layer: None}, n_latents, False)[layer]}
        loss = ablated_loss(lm, batch, saes, baselines, alone, bs)
        for name, source in (("attribution", effects), ("integrated gradients", ig)):
            if source is not None:
                latent, error = source[layer]
                totals.append({"what": f"layer {layer} at {cfg.baseline} ({name})", "loss": loss,
                               "estimate": clean + float(latent.sum() + error.sum())})
    return {"nodes": nodes, "exact": pd.DataFrame(exact_rows),
            "faithfulness": pd.DataFrame(faith_rows).drop_duplicates("n_nodes"),
            "totals": pd.DataFrame(totals)}


def _node_row(node: Node) -> dict:
    return {"layer": node.layer, "kind": node.kind, "feature": node.feature,
            "group": node.group}


def _effect_of(effects: dict, node: Node) -> float:
    latent, error = effects[node.layer]
    g = TOKEN_GROUPS.index(node.group)
    return float(latent[g, node.feature] if node.kind == "latent" else error[g])


def _nodes_table(effects, ig, means: Baselines, ranked, top_nodes: int) -> pd.DataFrame:
    """Every group's row of the ``top_nodes`` nodes ranked first (a node: layer, kind,
    feature), in rank order."""
    chosen = list(dict.fromkeys((n.layer, n.kind, n.feature) for _, n in ranked))[:top_nodes]
    rows = []
    for rank, (layer, kind, feature) in enumerate(chosen):
        for group in NODE_GROUPS:
            g = TOKEN_GROUPS.index(group)
            node = Node(layer, kind, feature, group)
            row = {"rank": rank, **_node_row(node), "effect": _effect_of(effects, node),
                   "effect_ig": _effect_of(ig, node) if ig else float("nan"),
                   "mean_activation": float(means.latents[layer][g, feature])
                   if kind == "latent" else float("nan")}
            rows.append(row)
    table = pd.DataFrame(rows, columns=["rank", "layer", "kind", "feature", "group", "effect",
                                        "effect_ig", "mean_activation"])
    return table.astype({"feature": "Int64"})


# ---------------------------------------------------------------- reading a circuit

ROLES = {"output": "detector", "separator": "executor"}


def latent_roles(nodes: pd.DataFrame, score: str = "effect") -> pd.DataFrame:
    """One row per latent of a ``nodes`` table: its total effect, its effect at output and
    separator tokens, the group where most of its |effect| sits, and its role: "detector"
    (most at the demonstrations' outputs), "executor" (most at separators) or that group's
    name."""
    latents = nodes[nodes.kind == "latent"]
    keys = [c for c in ("task", "layer", "feature") if c in latents]
    wide = latents.pivot_table(index=keys, columns="group", values=score, aggfunc="sum",
                               fill_value=0.0)
    out = pd.DataFrame({"total": wide.sum(axis=1)})
    for group in ("output", "separator"):
        out[group] = wide[group] if group in wide else 0.0
    out["where"] = wide.abs().idxmax(axis=1)
    out["role"] = out["where"].map(lambda g: ROLES.get(g, g))
    return out.reset_index().sort_values("total", key=abs, ascending=False,
                                         ignore_index=True)


def top_role_features(nodes: pd.DataFrame, layer: int, role: str, k: int = 1,
                      score: str = "effect") -> dict[str, list[int]]:
    """Per task, the ``k`` latents at ``layer`` with the largest positive effect at the
    role's tokens (a detector's: the outputs; an executor's: the separators): features to
    steer with, as ``features_by_task``. A task with no such latent is left out."""
    group = {name: g for g, name in ROLES.items()}.get(role)
    if group is None:
        raise ValueError(f"role={role!r}: choose one of {sorted(ROLES.values())}")
    picked = nodes[(nodes.kind == "latent") & (nodes.layer == layer) & (nodes.group == group)
                   & (nodes[score] > 0)]
    return {task: rows.sort_values(score, ascending=False).feature.head(k).astype(int).tolist()
            for task, rows in picked.groupby("task", sort=False)}


def circuit_ranks(nodes: pd.DataFrame, layer: int, features_by_task: dict[str, list],
                  score: str = "effect") -> pd.DataFrame:
    """Where features found another way (e.g. kept by cleanup) rank among the circuit's
    latents at ``layer`` by |total effect|: one row per (task, feature); rank 0 is the
    circuit's top latent; NaN where the feature is not among the table's nodes."""
    roles = latent_roles(nodes, score)
    rows = []
    for task, features in features_by_task.items():
        here = roles[(roles.task == task) & (roles.layer == layer)].reset_index(drop=True)
        position = {int(f): i for i, f in enumerate(here.feature)}
        for feature in features:
            i = position.get(int(feature))
            rows.append({"task": task, "feature": int(feature),
                         "circuit_rank": float("nan") if i is None else i,
                         "role": None if i is None else here.role[i],
                         "total": float("nan") if i is None else here.total[i]})
    return pd.DataFrame(rows)
