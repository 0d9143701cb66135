"""The key of a cached result: everything it depends on, built in one place for every
cached experiment.

It holds the experiment's name and configuration, a digest of every file of the
model (weights, config, tokenizer) and a fingerprint of its weights as they are in
memory (an ablated or patched model is another model), a digest of every file of
each SAE used and how it was loaded, the model's dtype and device kind, a digest of
the tvlib source that computes results (``fingerprints.code_fingerprint``), the
versions of the libraries that compute, and ``cache.RESULT_FORMAT``. Any change to
one of them is a different entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib.metadata import version

from .cache import RESULT_FORMAT
from .fingerprints import LIBRARIES, canonical, code_fingerprint
from .models import model_identity
from .saes import sae_identity


def result_key(experiment: str, lm, sae_layers: Iterable[int] = (), *,
               identity: dict | None = None, **config) -> dict:
    """Everything a cached result of ``experiment`` depends on.

    lm: the model (its preset names the model's and the SAEs' sources);
    sae_layers: resid_pre layers whose SAE the experiment uses;
    identity: ``models.model_identity(lm)``, when a caller keys many entries at once
    (it reads every weight: computed once per call, never kept between calls);
    config: the experiment's settings (dataclasses, lists, numbers, strings).
    """
    return {"format": RESULT_FORMAT, "experiment": experiment,
            "model": identity if identity is not None else model_identity(lm),
            "code": code_fingerprint(),
            "saes": {str(layer): sae_identity(lm.preset, layer)
                     for layer in sorted(set(sae_layers))},
            "libraries": {name: version(name) for name in LIBRARIES},
            "config": json.loads(canonical(config))}
