import pytest
import torch
from sae_lens import (SAE, GatedSAEConfig, JumpReLUSAEConfig, StandardSAEConfig,
                      TopKSAEConfig)

from tvlib.models import load_sae
from tvlib.prompts import few_shot_prompts, tokenize_prompts
from tvlib.sae_views import check_sae_site, ito, recon_of_tv, sae_site, tv_on_recon
from tvlib.taskvec import collect_residuals
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
    sae = random_sae(architecture)
    check_sae_site(sae, toy_lm, 2)          # no recorded site: width is checked only
    tv = torch.randn(128)
    torch.testing.assert_close(recon_of_tv(sae, tv), sae.decode(sae.encode(tv)))
    resid = torch.randn(3, 4, 128)
    resid[0, 3] = float("nan")               # a prompt with fewer separators
    expected = sae.decode(sae.encode(resid[~resid.isnan().any(-1)])).mean(0)
    torch.testing.assert_close(tv_on_recon(sae, resid), expected)
    vector, result = ito(sae, tv, target_l0=7)
    assert vector.shape == (128,) and (result.weights > 0).sum() <= 7


def test_ito_b_dec_option():
    sae = random_sae("standard")
    tv = torch.randn(128)
    plain, r_plain = ito(sae, tv, 5)
    shifted, r_shift = ito(sae, tv, 5, subtract_b_dec=True)
    torch.testing.assert_close(plain, r_plain.weights[0] @ sae.W_dec)
    torch.testing.assert_close(shifted, r_shift.weights[0] @ sae.W_dec + sae.b_dec)


def test_site_and_width_mismatch_are_errors(toy_lm):
    with pytest.raises(ValueError, match="SAE input width 64 does not match"):
        check_sae_site(random_sae("standard", d_in=64), toy_lm, 2)
    wrong_layer = random_sae("standard", site="resid_pre", layer=4)
    with pytest.raises(ValueError, match="reads resid_pre 4.*not resid_pre 2"):
        check_sae_site(wrong_layer, toy_lm, 2)
    post = random_sae("standard", hook_name="blocks.1.hook_resid_post")
    assert sae_site(post) == ("resid_pre", 2)
    check_sae_site(post, toy_lm, 2)           # resid_post 1 is resid_pre 2
    with pytest.raises(ValueError, match="resid_pre 2"):
        check_sae_site(post, toy_lm, 1)


def test_tv_on_recon_with_shipped_sae_is_close_to_tv(toy_lm):
    task = load_task("antonyms")
    batch = tokenize_prompts(toy_lm.tokenizer, few_shot_prompts(task, 8, 6, seed=0))
    resid = collect_residuals(toy_lm, batch.model_inputs(), [3], batch.separator_pos)[0]
    tv = resid.flatten(0, 1).nanmean(0)
    sae = load_sae("toy", 3)
    check_sae_site(sae, toy_lm, 3)
    on_recon = tv_on_recon(sae, resid)
    # reconstructions of in-distribution residuals average to nearly the TV
    assert torch.nn.functional.cosine_similarity(on_recon, tv, dim=0) > 0.9
