import pytest
import torch
from sae_lens import (SAE, GatedSAEConfig, JumpReLUSAEConfig, StandardSAEConfig,
                      TopKSAEConfig)

from tvlib.saes import check_sae_site, load_sae, sae_site
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts
from tvlib.sae_views import ITOSweepConfig, SAEViewConfig, ito, recon_of_tv, tv_on_recon
from tvlib.interventions import collect_residuals
from tvlib.tasks import load_task

ARCHITECTURES = {
    "standard": StandardSAEConfig, "gated": GatedSAEConfig,
    "jumprelu": JumpReLUSAEConfig, "topk": TopKSAEConfig,
}


def random_sae(architecture: str, d_in: int = 128, d_sae: int = 256, **metadata):
    cfg = ARCHITECTURES[architecture](d_in=d_in, d_sae=d_sae)
    sae = SAE.from_dict(cfg.to_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    for key, value in metadata.items():
        setattr(sae.cfg.metadata, key, value)
    return sae


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_views_work_for_every_architecture(architecture, toy_lm):
    sae = random_sae(architecture, hook_name="blocks.2.hook_resid_pre")
    check_sae_site(sae, toy_lm, 2)
    tv = torch.randn(128)
    torch.testing.assert_close(recon_of_tv(sae, tv, 2), sae.decode(sae.encode(tv)))
    resid = torch.randn(3, 4, 128)
    resid[0, 3] = float("nan")               # a prompt with fewer separators
    expected = sae.decode(sae.encode(resid[~resid.isnan().any(-1)])).mean(0)
    torch.testing.assert_close(tv_on_recon(sae, resid, 2), expected)
    vector, result = ito(sae, tv, 2, target_l0=7)
    assert vector.shape == (128,) and (result.weights > 0).sum() <= 7


def test_ito_b_dec_option():
    sae = random_sae("standard", hook_name="blocks.2.hook_resid_pre")
    tv = torch.randn(128)
    plain, r_plain = ito(sae, tv, 2, 5)
    shifted, r_shift = ito(sae, tv, 2, 5, subtract_b_dec=True)
    torch.testing.assert_close(plain, r_plain.weights[0] @ sae.W_dec)
    torch.testing.assert_close(shifted, r_shift.weights[0] @ sae.W_dec + sae.b_dec)


def test_site_and_width_mismatch_are_errors(toy_lm):
    with pytest.raises(ValueError, match="SAE input width 64 does not match"):
        check_sae_site(random_sae("standard", d_in=64, hook_name="blocks.2.hook_resid_pre"),
                       toy_lm, 2)
    wrong_layer = random_sae("standard", site="resid_pre", layer=4)
    with pytest.raises(ValueError, match="reads resid_pre 4.*not resid_pre 2"):
        check_sae_site(wrong_layer, toy_lm, 2)
    post = random_sae("standard", hook_name="blocks.1.hook_resid_post")
    assert sae_site(post) == ("resid_pre", 2)
    check_sae_site(post, toy_lm, 2)           # resid_post 1 is resid_pre 2
    with pytest.raises(ValueError, match="resid_pre 2"):
        check_sae_site(post, toy_lm, 1)


def test_tv_on_recon_with_shipped_sae_is_close_to_tv(toy_lm):
    task = load_task("antonyms").head(100)     # the pairs the embedded model knows
    batch = tokenize_prompts(toy_lm.tokenizer, few_shot_prompts(task, 8, 6, seed=0))
    resid = collect_residuals(toy_lm, batch.model_inputs(), [3], batch.separator_pos)[0]
    tv = resid.flatten(0, 1).nanmean(0)
    sae = load_sae("toy", 3)
    check_sae_site(sae, toy_lm, 3)
    on_recon = tv_on_recon(sae, resid, 3)
    # reconstructions of in-distribution residuals average to nearly the TV
    assert torch.nn.functional.cosine_similarity(on_recon, tv, dim=0) > 0.9


def test_views_refuse_an_sae_of_another_layer(toy_lm):
    """Layer 3's SAE used on a layer-4 task vector is refused by every view."""
    sae = load_sae("toy", 3)
    tv, resid = torch.randn(128), torch.randn(2, 3, 128)
    for view in (lambda: recon_of_tv(sae, tv, 4), lambda: tv_on_recon(sae, resid, 4),
                 lambda: ito(sae, tv, 4, 5), lambda: check_sae_site(sae, toy_lm, 4)):
        with pytest.raises(ValueError, match="reads resid_pre 3.*not resid_pre 4"):
            view()


def test_an_sae_that_records_no_site_is_refused(toy_lm):
    with pytest.raises(ValueError, match="does not record which layer it reads.*hook_name"):
        check_sae_site(random_sae("standard"), toy_lm, 2)
    with pytest.raises(ValueError, match="does not record"):
        recon_of_tv(random_sae("standard"), torch.randn(128), 2)


@pytest.mark.parametrize("hook,layer", [("blocks.3.hook_resid_pre", 3),
                                        ("blocks.3.hook_resid_post", 4),
                                        ("model.layers.3", 4), ("model.layers.3.input", 3),
                                        ("transformer.h.0", 1)])
def test_hook_names_in_resid_pre_terms(hook, layer):
    assert sae_site(random_sae("standard", hook_name=hook)) == ("resid_pre", layer)


def test_a_self_contradicting_record_is_refused():
    sae = random_sae("standard", hook_name="blocks.3.hook_resid_pre", site="resid_pre", layer=2)
    with pytest.raises(ValueError, match="contradicts itself"):
        sae_site(sae)


@pytest.mark.parametrize("make, message", [
    (lambda: SAEViewConfig(target_l0=0),
     "SAEViewConfig.target_l0=0: must be an int >= 1; pass e.g. target_l0=40"),
    (lambda: SAEViewConfig(subtract_b_dec="false"),
     "SAEViewConfig.subtract_b_dec='false': must be True or False"),
    (lambda: ITOSweepConfig(target_l0s=[5, 5]), "ITOSweepConfig.target_l0s=\\(5, 5\\): must "
     "be a non-empty list of distinct values that each be an int >= 1; pass e.g. "
     "target_l0s=\\[5, 10, 20, 40, 100\\]"),
    (lambda: ITOSweepConfig(target_l0s=[]), "non-empty list"),
    (lambda: ITOSweepConfig(target_l0s=[5.0]), "each be an int >= 1"),
])
def test_view_configs_refuse_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_view_configs_keep_lists_as_tuples():
    assert ITOSweepConfig(target_l0s=[5, 20]).target_l0s == (5, 20)
    assert hash(ITOSweepConfig(target_l0s=[5, 20])) == hash(ITOSweepConfig(target_l0s=(5, 20)))
