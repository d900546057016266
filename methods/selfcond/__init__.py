"""Self-conditioning pre-trained language models (Suau, Zappella & Apostoloff, "Self-conditioning Pre-Trained Language
Models", ICML 2022).

Expert units are found and forced, with no training and no gradients:

1. **Units** are the output coordinates of every linear-like layer of a causal LM: ``nn.Linear``, Hugging
   Face GPT-2 ``Conv1D`` and the structured layers of :mod:`layers` (``MonarchLinear``, ``BlockdiagLinear``).
   In GPT-2 these are ``attn.c_attn`` (3d), ``attn.c_proj`` (d), ``mlp.c_fc`` (4d, pre-GELU because the hook
   sits on the linear map) and ``mlp.c_proj`` (d). ``lm_head`` is left out by default, as in the official
   layer regex.
2. **Responses** (:func:`collect_responses`): forward hooks record each unit's output, and the response of
   unit ``m`` to sentence ``s`` is the max over tokens ``z_m(s) = max_t y_m(s, t)``.
3. **Expertise** (:func:`compute_expertise`): every unit is a detector of concept ``c`` with score
   ``z_m``; ``AP_m = Σ_n (R_n − R_{n−1}) P_n`` is its average precision (:func:`average_precision`, equal to
   ``sklearn.metrics.average_precision_score``) on positive (concept) vs negative sentences. Per unit the
   positive median ``on_p50``, ``on_p90`` and the negative mean ``off_mean`` are kept as well.
4. **Intervention** ``do(c, k)`` (:func:`select_units`, :func:`force_units`): the ``k`` units of highest AP
   are set to ``on_p50`` at *every* position, both for the prompt and for every generated token.
   ``mode="random"`` forces ``k`` random units to their own ``on_p50`` instead (the official ``top_n=0``
   control).
5. **Measures**: the concept's frequency in the generations and the perplexity of the generated text under
   the *unforced* model (:func:`generated_perplexity`).

Where this follows / deviates from apple/ml-selfcond:

* hooks on the same four GPT-2 layer kinds, max pooling, AP, forcing to ``on_p50`` at all positions and
  random-unit controls follow ``selfcond/{responses,expertise,generation}.py``;
* the max over tokens here runs over the real tokens only; the official code pads sentences with EOS to
  length 128 and its max also runs over the pads (:func:`collect_responses` has ``include_padding`` for
  that behaviour);
* generation is our own loop (:func:`generate`, full recomputation, optional top-k/top-p, a
  ``torch.Generator`` for reproducibility) instead of Hugging Face ``generate``; it works for any module
  that maps ``(B, T)`` token ids to logits ``(B, T, V)`` or to an object with ``.logits``;
* the concept sentences come from the training text itself (the official ones from OneSec, 700 positive /
  1000 negative); generation starts from a newline token (the official single example starts from EOS)
  with top-k 10 at temperature 1, as in the official ``generate_batch.py`` sweep.

The demo (:data:`RECIPE`, ``python -m methods selfcond``) trains a small GPT-2 (Hugging Face
``GPT2LMHeadModel``, random init, Monarch MLPs through :func:`monarch_kernels.layers.monarchify`) on Shakespeare, with a
2000-word vocabulary by default (concept words are single tokens, as with GPT-2's BPE) or characters
(``--tokenizer char``). The concept is a theme: dialogue lines with one of the theme's words vs lines
without. For ``k`` expert units and for ``k`` random units it reports the fraction of generated samples that
contain a theme word, theme words per 100 words, the forced model's next-token probability mass on the
theme words, and the perplexity of the samples under the unforced model.

Modules: :mod:`.expertise` (units, responses, average precision, forcing), :mod:`.generation` (sampling and
perplexity), :mod:`.recipe` (``python -m methods selfcond``).
"""
from .expertise import (Expertise,
    average_precision, collect_responses, compute_expertise, force_units, is_unit_layer, select_units, unit_layers)
from .generation import concept_probability, generate, generated_perplexity
from .recipe import THEMES, RECIPE, concept_lines, theme_regex

__all__ = [
    "Expertise", "average_precision", "collect_responses", "compute_expertise", "force_units", "is_unit_layer",
    "select_units", "unit_layers", "concept_probability", "generate", "generated_perplexity", "THEMES", "RECIPE",
    "concept_lines", "theme_regex",
]
