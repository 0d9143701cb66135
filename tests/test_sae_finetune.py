"""The decoder fine-tune against the model's next-token distribution (tvlib.sae_finetune),
on the embedded model and its SAEs."""

import json

import pytest
import torch

from tvlib.paths import TOY_DIR
from tvlib.residual_store import text_rows
from tvlib.sae_finetune import DecoderFinetuneConfig, finetune_decoder, spliced_kl
from tvlib.sae_training import loss_change
from tvlib.saes import load_sae

LAYER = 2


@pytest.fixture(scope="module")
def toy_rows(toy_lm):
    texts = json.loads((TOY_DIR / "corpus.json").read_text(encoding="utf-8"))[:40]
    return text_rows(toy_lm.tokenizer, texts, length=24, min_tokens=4)


def test_the_spliced_kl_equals_a_direct_computation(toy_lm, toy_rows):
    """By forward hooks on the model itself: the reconstruction written at the recorded
    tokens of resid_pre 2, KL(clean || spliced) averaged over the scored positions."""
    sae = load_sae("toy", LAYER, "cpu")
    rows, mask = toy_rows[0][:6], toy_rows[1][:6]
    model = toy_lm._module
    inputs = {"input_ids": rows, "attention_mask": torch.ones_like(rows)}
    with torch.no_grad():
        clean = model(**inputs).logits[:, :-1].log_softmax(-1)

        def splice(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            new = torch.where(mask[..., None], sae.decode(sae.encode(h)), h)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs,
                                                                   "hidden_states": new})
        handle = model.model.layers[LAYER].register_forward_pre_hook(splice, with_kwargs=True)
        try:
            spliced = model(**inputs).logits[:, :-1].log_softmax(-1)
        finally:
            handle.remove()
        scored = mask[:, :-1] & mask[:, 1:]
        direct = (clean.exp() * (clean - spliced)).sum(-1)[scored].mean()
        assert spliced_kl(toy_lm, sae, LAYER, rows, mask).item() == pytest.approx(
            direct.item(), rel=1e-4)


def test_the_decoder_fine_tune_lowers_the_kl_and_keeps_the_encoder(toy_lm, toy_rows):
    sae = load_sae("toy", LAYER, "cpu")
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    rows, mask = toy_rows
    train, heldout = (rows[:-8], mask[:-8]), (rows[-8:], mask[-8:])
    cfg = DecoderFinetuneConfig(steps=15, rows_per_step=4, lr=1e-3)
    messages = []
    result = finetune_decoder(toy_lm, sae, LAYER, *train, cfg, log=messages.append)
    tuned = result.sae
    assert len(result.kl) == 15 and messages
    for name, p in sae.named_parameters():                  # the given SAE is untouched
        torch.testing.assert_close(p.detach(), before[name])
    for name, p in tuned.named_parameters():
        assert not p.requires_grad
        if name in ("W_dec", "b_dec"):
            assert not torch.equal(p, before[name])
        else:                                               # features fire where they did
            torch.testing.assert_close(p, before[name])
    kl_before = spliced_kl(toy_lm, sae, LAYER, *train).item()
    kl_after = spliced_kl(toy_lm, tuned, LAYER, *train).item()
    assert kl_after < kl_before
    means = {LAYER: torch.zeros(toy_lm._module.config.hidden_size)}
    held_before = loss_change(toy_lm, {LAYER: sae}, *heldout, means)[LAYER]["delta_loss"]
    held_after = loss_change(toy_lm, {LAYER: tuned}, *heldout, means)[LAYER]["delta_loss"]
    assert held_after < held_before                         # and on rows it did not see
    again = finetune_decoder(toy_lm, sae, LAYER, *train, cfg, log=lambda _: None)
    assert again.kl == result.kl                            # seeded


def test_bad_fine_tune_input_is_refused(toy_lm, toy_rows):
    sae = load_sae("toy", LAYER, "cpu")
    rows, mask = toy_rows
    with pytest.raises(ValueError, match="resid_pre"):
        finetune_decoder(toy_lm, sae, LAYER + 1, rows, mask)
    with pytest.raises(ValueError, match="mask has shape"):
        finetune_decoder(toy_lm, sae, LAYER, rows, mask[:, 1:])
    with pytest.raises(ValueError, match="fewer than rows_per_step=4"):
        finetune_decoder(toy_lm, sae, LAYER, rows[:3], mask[:3])
    with pytest.raises(ValueError, match="steps=0"):
        DecoderFinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="lr=0"):
        DecoderFinetuneConfig(lr=0)
    with_bos = mask[:2].clone()
    with_bos[:, 0] = True
    with pytest.raises(ValueError, match="marks position 0 \\(BOS\\)"):
        spliced_kl(toy_lm, sae, LAYER, rows[:2], with_bos)
    with pytest.raises(ValueError, match="resid_pre"):
        spliced_kl(toy_lm, sae, LAYER + 1, rows[:2], mask[:2])
    with pytest.raises(ValueError, match="no position to score"):
        spliced_kl(toy_lm, sae, LAYER, rows[:2], torch.zeros_like(mask[:2]))
