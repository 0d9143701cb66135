"""Second trust pass: inputs that used to give silently wrong results or lose work."""

import dataclasses
import math
import os

import pandas as pd
import pytest
import torch

from tvlib.fingerprints import file_digest
from tvlib.experiments import earliest_effective_layer


def test_a_file_swapped_with_its_old_size_and_mtime_is_digested_again(tmp_path):
    path = tmp_path / "sae_weights.safetensors"
    path.write_bytes(b"a" * 64)
    first = file_digest(path)
    stat = path.stat()
    replacement = tmp_path / "other"
    replacement.write_bytes(b"b" * 64)                     # same size
    os.replace(replacement, path)                          # as cp, tar or rsync would
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))    # the old mtime restored
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_digest(path) != first
    path.write_bytes(b"a" * 64)                            # written back in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path) == first


def test_earliest_effective_layer_refuses_a_gain_outside_0_1():
    from tvlib.experiments import RAW, TV, ZERO_SHOT
    scores = pd.DataFrame({"task": ["t"] * 3, "method": ["zero-shot", "TV", "TV"],
                           "vector": [None, TV, TV], "view": [ZERO_SHOT, RAW, RAW],
                           "layer": [None, 1, 2], "nll": [2.0, 1.9, 1.0]})
    assert earliest_effective_layer(scores, TV, RAW, ZERO_SHOT).to_dict() == {"t": 2}
    assert earliest_effective_layer(scores, TV, RAW, ZERO_SHOT, 0.01).to_dict() == {"t": 1}
    for bad in (20, 1.5, float("nan"), -1, 0, 1, True, "0.2"):
        with pytest.raises(ValueError, match="min_gain=.*fraction in \\(0, 1\\)"):
            earliest_effective_layer(scores, TV, RAW, ZERO_SHOT, bad)
    with pytest.raises(ValueError, match="no rows of vector 'TV' as view 'cleaned'"):
        earliest_effective_layer(scores, TV, "cleaned", ZERO_SHOT)
    with pytest.raises(ValueError, match="no rows of baseline 'ICL'"):
        earliest_effective_layer(scores, TV, RAW, "ICL")
    two = pd.concat([scores, scores.assign(task="u").iloc[1:]])       # task u: no baseline
    with pytest.raises(ValueError, match="task 'u' has 0 rows of baseline 'zero-shot'"):
        earliest_effective_layer(two, TV, RAW, ZERO_SHOT)


QUICK = dict(n_prompts=4, n_shots=4, n_eval=6, n_train=6)


def test_an_edited_model_gets_its_own_cache_entries(tmp_path, monkeypatch):
    """Zeroing one MLP in place (an ablation) used to be served the clean model's numbers,
    and a refresh stored the ablated ones under the clean model's key."""
    from tvlib.experiments import PromptConfig, run_task_vector_sweep
    from tvlib.models import load_model
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    lm = load_model("toy", device="cpu")
    cfg = PromptConfig(**QUICK)
    clean = run_task_vector_sweep(lm, ["antonyms"], [2], cfg)
    weight = lm._module.model.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    weight.data.zero_()                      # no version counter sees a .data edit
    ablated = run_task_vector_sweep(lm, ["antonyms"], [2], cfg)
    assert not clean.nll.equals(ablated.nll)
    run_task_vector_sweep(lm, ["antonyms"], [2], cfg, refresh=True)
    weight.data.copy_(saved)
    pd.testing.assert_frame_equal(run_task_vector_sweep(lm, ["antonyms"], [2], cfg), clean)


def test_code_that_computes_is_in_the_key_and_plotting_is_not(tmp_path, monkeypatch):
    import shutil

    from tvlib import fingerprints
    from tvlib.paths import REPO_ROOT
    shutil.copytree(REPO_ROOT / "tvlib", tmp_path / "tvlib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprints, "REPO_ROOT", tmp_path)
    before = fingerprints.code_fingerprint()
    assert "cleanup.py" in before and "experiments/runner.py" in before
    assert "plotting.py" not in before and not any(k.startswith("toy/") for k in before)
    with open(tmp_path / "tvlib" / "plotting.py", "a") as f:
        f.write("\n# a figure's colour\n")
    assert fingerprints.code_fingerprint() == before
    with open(tmp_path / "tvlib" / "steered_loss.py", "a") as f:
        f.write("\n# a changed loss\n")
    after = fingerprints.code_fingerprint()
    assert after != before and after["steered_loss.py"] != before["steered_loss.py"]


def test_weights_fingerprint_reads_every_bit_on_either_path():
    from tvlib.fingerprints import device_checksum, tensor_checksum, weights_fingerprint
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    first = weights_fingerprint(module)
    with torch.no_grad():
        module[0].weight[2, 3] = torch.nextafter(module[0].weight[2, 3], torch.tensor(9.0))
    assert weights_fingerprint(module) != first          # one bit of one weight
    x = torch.randn(1000)
    swapped = x.clone()
    swapped[[10, 20]] = swapped[[20, 10]]
    assert tensor_checksum(x) != tensor_checksum(swapped)           # CPU: CRC-32
    bits = lambda t: t.view(torch.int32)                             # noqa: E731
    assert device_checksum(bits(x)) != device_checksum(bits(swapped))   # accelerator path
    assert tensor_checksum(x.to(torch.bfloat16)) != tensor_checksum(x)


def test_a_folder_named_like_a_hub_model_is_refused_not_loaded(tmp_path, monkeypatch):
    from tvlib.models import load_model
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="holds 'gpt2', which transformers would load instead"):
        load_model("gpt2", device="cpu")


def test_an_interrupt_keeps_the_layers_finished_before_it(tmp_path, monkeypatch):
    """Entries used to be written when a task's last layer ended: an interrupt at layer 4
    lost layer 3."""
    from tvlib.cleanup import CleanupConfig
    from tvlib.experiments import PromptConfig, cleanup_sweeps, run_cleanup_sweep
    from tvlib.models import load_model
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    lm = load_model("toy", device="cpu")
    calls, real = [], cleanup_sweeps.cleanup

    def interrupted_at_4(lm, sae, layer, *args, **kwargs):
        calls.append(layer)
        if layer == 4 and calls.count(4) == 1:
            raise KeyboardInterrupt
        return real(lm, sae, layer, *args, **kwargs)

    monkeypatch.setattr(cleanup_sweeps, "cleanup", interrupted_at_4)
    cfg, quick = PromptConfig(**QUICK), CleanupConfig(max_steps=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_cleanup_sweep(lm, ["antonyms"], [3, 4], cfg, quick)
    result = run_cleanup_sweep(lm, ["antonyms"], [3, 4], cfg, quick)
    assert calls == [3, 4, 4]                         # layer 3 was kept
    assert set(result["scores"].layer.dropna()) == {3, 4}


def test_an_interrupted_cleanup_returns_its_last_weights_marked_and_is_never_stored(
        toy_lm, monkeypatch):
    import tvlib.cleanup as cleanup_module
    from tvlib.cleanup import CleanupConfig, cleanup, finished
    from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
    from tvlib.saes import load_sae
    from tvlib.taskvec import task_vectors
    prompts = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, ["antonyms"])["antonyms"],
                                 PromptConfig(**QUICK))
    tv = task_vectors(toy_lm, prompts.few_shot, [4])[0]
    sae = load_sae("toy", 4)
    real = cleanup_module.SteeredNLL

    class StopAtThirdStep(real):
        calls = 0

        def __call__(self, v):
            StopAtThirdStep.calls += 1
            if StopAtThirdStep.calls == 3:
                raise KeyboardInterrupt
            return super().__call__(v)

    monkeypatch.setattr(cleanup_module, "SteeredNLL", StopAtThirdStep)
    cfg = CleanupConfig(max_steps=10, progress=False)
    with pytest.warns(UserWarning, match="interrupted after [1-9] steps"):
        result = cleanup(toy_lm, sae, 4, tv, prompts.train, prompts.zero_shot, cfg)
    assert result.interrupted and 1 <= result.steps < 10 and not result.stopped_early
    assert torch.isfinite(result.weights).all() and (result.weights > 0).any()
    assert math.isnan(result.heldout_nll)             # not scored as a finished result
    with pytest.raises(KeyboardInterrupt, match="not stored"):
        finished(result)
    monkeypatch.setattr(cleanup_module, "SteeredNLL", real)
    whole = cleanup(toy_lm, sae, 4, tv, prompts.train, prompts.zero_shot,
                    CleanupConfig(max_steps=result.steps, progress=False))
    torch.testing.assert_close(result.weights, whole.weights)   # the same finished steps


def test_flags_and_the_smoke_figures_folder(tmp_path):
    from tvlib.notebook import check_flags, figures_dir
    check_flags(SMOKE=True, SUBTRACT_B_DEC=False)
    for bad in ("false", "False", 0, 1, None):
        with pytest.raises(ValueError, match="not True or False"):
            check_flags(SMOKE=bad)
    assert figures_dir(False, tmp_path) == tmp_path
    assert figures_dir(True, tmp_path) == tmp_path / "smoke"


def test_an_early_stop_ends_its_progress_bar_full_and_says_why(toy_lm, monkeypatch):
    """A notebook bar closed short of its total is red: every early-stopped cleanup used
    to look like a failure."""
    import tvlib.cleanup as cleanup_module
    from tvlib.cleanup import CleanupConfig, cleanup
    from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
    from tvlib.saes import load_sae
    from tvlib.taskvec import task_vectors
    bars = []

    class Recorded(cleanup_module.tqdm):
        def close(self):
            bars.append((self.n, self.total, self.postfix))
            super().close()

    monkeypatch.setattr(cleanup_module, "tqdm", Recorded)
    prompts = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, ["antonyms"])["antonyms"],
                                 PromptConfig(**QUICK))
    tv = task_vectors(toy_lm, prompts.few_shot, [4])[0]
    result = cleanup(toy_lm, load_sae("toy", 4), 4, tv, prompts.train, None,
                     CleanupConfig(max_steps=400, patience=5, progress=True))
    assert result.stopped_early and result.steps < 400
    n, total, postfix = bars[-1]
    assert n == total == result.steps
    assert "stop: no new L0 minimum in 5 steps" in postfix and f"l0={result.l0[-1]}" in postfix


def test_broken_json_files_are_named_in_the_error(tmp_path):
    import shutil

    from tvlib.features import corpus_texts
    from tvlib.paths import TOY_DIR
    from tvlib.presets import get_preset, preset_to_json
    from tvlib.saes import load_sae
    folder = tmp_path / "toy-copy"
    shutil.copytree(TOY_DIR / "saes", folder / "saes")
    (folder / "corpus.json").write_text('["a text", ')
    preset = dataclasses.replace(get_preset("toy"), name="toy-copy",
                                 sae_dir=str(folder / "saes"), corpus=str(folder / "corpus.json"))
    preset_to_json(preset, folder / "preset.json")
    with pytest.raises(ValueError, match="corpus file .*corpus.json is not valid UTF-8 JSON"):
        corpus_texts(str(folder))
    cfg = next((folder / "saes").glob("*4*")) / "cfg.json"
    cfg.write_text("{broken")
    with pytest.raises(ValueError, match="SAE folder .* cannot be loaded: its cfg.json"):
        load_sae(str(folder), 4, device="cpu")
    (folder / "preset.json").write_text("{broken")
    with pytest.raises(ValueError, match="preset.json is not a valid preset.json"):
        get_preset(str(folder))
    (folder / "preset.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="preset.json is not a valid preset.json"):
        get_preset(str(folder))


def test_the_features_per_task_figure_draws_a_pursuit_start():
    """INIT = "pursuit" in notebook 04 used to fail at this figure with KeyError 'recon'."""
    from tvlib.experiments.schema import CLEANED, PURSUIT_START, RECON, TV
    from tvlib.plotting import plot_l0_per_task
    rows = [{"task": t, "layer": 4, "vector": TV, "view": v, "l0": l0}
            for t in ("antonyms", "en_es") for v, l0 in ((PURSUIT_START, 7), (CLEANED, 2))]
    fig = plot_l0_per_task(pd.DataFrame(rows), 4)
    assert "pursuit start of TV" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    both = pd.DataFrame(rows + [{**rows[0], "view": RECON}])
    with pytest.raises(ValueError, match="one cleanup at layer 4"):
        plot_l0_per_task(both, 4)


def test_notebook_02s_task_vector_is_notebook_01s(toy_lm):
    """The mean residual over positions was written three times; notebook 02's TV came from
    another code path than 01's and 04's. Now one function: the same numbers exactly."""
    from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
    from tvlib.experiments.sae_view_sweeps import sae_view_layers
    from tvlib.experiments.schema import RAW
    from tvlib.experiments.task_vector_sweeps import task_vector_layers
    prompts = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, ["en_es"])["en_es"],
                                 PromptConfig(**QUICK))
    views = dict(sae_view_layers(toy_lm, prompts, [2, 4]))
    plain = dict(task_vector_layers(toy_lm, prompts, [2, 4]))
    for layer in (2, 4):
        raw = views[layer][views[layer].view == RAW]
        assert raw.nll.tolist() == plain[layer].nll.tolist()


def test_an_sae_that_records_another_model_is_refused(tmp_path, toy_lm):
    import json
    import shutil

    from tvlib.paths import TOY_DIR
    from tvlib.presets import get_preset
    from tvlib.saes import check_sae_site, load_sae
    sae = load_sae("toy", 4, device="cpu")
    check_sae_site(sae, toy_lm, 4)                       # "toy", as the embedded SAEs record
    sae.cfg.metadata.model_name = "google/gemma-2-2b"
    with pytest.raises(ValueError, match="trained on model 'google/gemma-2-2b', but preset "
                                         "'toy' runs"):
        check_sae_site(sae, toy_lm, 4)
    sae.cfg.metadata.model_name = None                   # no record: width and site checked
    check_sae_site(sae, toy_lm, 4)

    shutil.copytree(TOY_DIR / "saes", tmp_path / "saes")
    cfg_path = next((tmp_path / "saes").glob("*4*")) / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["model_name"] = "gpt2-small"
    cfg_path.write_text(json.dumps(cfg))
    preset = dataclasses.replace(get_preset("toy"), sae_dir=str(tmp_path / "saes"))
    with pytest.raises(ValueError, match=r"the SAE in .*saes/.* records that it was trained on "
                                         r"model 'gpt2-small'.*metadata.model_name"):
        load_sae(preset, 4, device="cpu")


def test_a_layer_given_as_text_and_a_meta_vector_are_named():
    from tvlib.interventions import Steering
    from tvlib.saes import load_sae
    with pytest.raises(ValueError, match=r"layer must be an int .*not '4' \(str\); preset "
                                         r"'toy' has SAEs at resid_pre layers \[0, 1"):
        load_sae("toy", "4")
    with pytest.raises(ValueError, match="steering vector at layer 2 is on the meta device"):
        Steering(2, torch.zeros(8, device="meta"))


def test_code_edited_after_import_is_refused_not_keyed_as_new(tmp_path, monkeypatch):
    """A module edited on disk while the old one runs would store old-code results under
    the new code's key."""
    import shutil
    import sys
    import types

    from tvlib import fingerprints
    from tvlib.fingerprints import CodeChangedError
    shutil.copytree(fingerprints.REPO_ROOT / "tvlib", tmp_path / "tvlib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprints, "REPO_ROOT", tmp_path)
    fingerprints.code_reloaded()
    loaded = types.ModuleType("copied_cleanup")                 # "imported" from the copy
    loaded.__file__ = str(tmp_path / "tvlib" / "cleanup.py")
    monkeypatch.setitem(sys.modules, "copied_cleanup", loaded)
    before = fingerprints.code_fingerprint()
    with open(tmp_path / "tvlib" / "steered_loss.py", "a") as f:       # never imported
        f.write("\n# a changed loss\n")
    assert fingerprints.code_fingerprint()["steered_loss.py"] != before["steered_loss.py"]
    with open(tmp_path / "tvlib" / "cleanup.py", "a") as f:            # imported: running
        f.write("\n# a changed cleanup\n")
    with pytest.raises(CodeChangedError, match=r"tvlib/cleanup.py changed on disk after this "
                                               r"process imported it.*Restart the kernel"):
        fingerprints.code_fingerprint()
    fingerprints.code_reloaded()                                # after a reload: accepted
    assert fingerprints.code_fingerprint()["cleanup.py"] != before["cleanup.py"]


def test_the_model_handle_keeps_nnsights_object_untouched():
    """load_model returns tvlib's handle; nnsight's wrapper (whose class path NDIF rebuilds
    a remote model from) carries no tvlib attributes, and reads through the handle."""
    import copy
    import pickle

    from tvlib.models import Model, load_model, trace
    from tvlib.presets import get_preset
    lm = load_model("toy", device="cpu")
    assert isinstance(lm, Model) and lm.preset == get_preset("toy") and lm.remote is False
    assert type(lm.nn).__module__.startswith("nnsight.")
    assert "preset" not in vars(lm.nn) and "remote" not in vars(lm.nn)
    assert lm.tokenizer is lm.nn.tokenizer and lm._module is lm.nn._module
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.preset = get_preset("gpt2")
    assert copy.copy(lm).nn is lm.nn                      # dunders do not read through
    assert pickle.loads(pickle.dumps(Model(None, lm.preset))).preset == lm.preset
    ids = lm.tokenizer(["a b"], return_tensors="pt")
    with trace(lm, dict(ids)):
        logits = lm.output.logits.save()
    assert logits.shape[-1] == lm._module.config.vocab_size


def test_a_raw_nnsight_model_is_refused_with_the_fix():
    from tvlib.experiments import prompt_config
    from tvlib.models import load_model, model_identity, trace
    from tvlib.saes import model_shelf
    raw = load_model("toy", device="cpu").nn
    for call in (lambda: prompt_config(raw), lambda: model_identity(raw),
                 lambda: model_shelf(raw), lambda: trace(raw, {"input_ids": torch.ones(1, 2)})):
        with pytest.raises(TypeError, match="expected a model loaded by tvlib.load_model, "
                                            "got nnsight.*load_model\\(preset\\)"):
            call()
