"""Past one machine: a model split across two CPU "devices" by a device map (half the layers on
"cpu", half offloaded to "disk" by accelerate) gives the same scores as the unsharded model.

Read-only methods (logit lens, BMI, attribution) run on every shard; gradient and weight-edit
methods need the studied weights resident, which holds for a module on the "cpu" shard."""

from __future__ import annotations

import pytest
import torch

from bias_lens.lens import load_model
from bias_lens.locate.attribution import neuron_attribution
from bias_lens.locate.gradients import row_scale
from bias_lens.locate.layers import layer_scale_and_bmi

PROMPTS = ["The nurse laughed because", "The carpenter went home because", "The doctor said that",
           "The secretary smiled because"]


def test_sharded_model_gives_the_same_scores(tiny_llama, tmp_path):
    folder = tiny_llama.hf.config._name_or_path
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
          "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from bias_lens.lens import LensModel

    hf = AutoModelForCausalLM.from_pretrained(folder, device_map=dm, offload_folder=str(tmp_path / "offload"))
    sharded = LensModel(hf, tiny_llama.tokenizer, name="tiny-sharded")
    assert getattr(sharded.hf, "hf_device_map", {}).get("model.layers.2") == "disk"
    base = load_model(folder)
    lay0, bmi0 = layer_scale_and_bmi(base, PROMPTS)
    lay1, bmi1 = layer_scale_and_bmi(sharded, PROMPTS)
    torch.testing.assert_close(lay1.per_prompt, lay0.per_prompt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bmi1.per_prompt, bmi0.per_prompt, rtol=1e-5, atol=1e-6)
    a0, a1 = neuron_attribution(base, PROMPTS), neuron_attribution(sharded, PROMPTS)
    torch.testing.assert_close(a1.scores, a0.scores, rtol=1e-4, atol=1e-6)
    r0, r1 = row_scale(base, PROMPTS, "L1.mlp.down"), row_scale(sharded, PROMPTS, "L1.mlp.down")
    torch.testing.assert_close(r1.scores, r0.scores, rtol=1e-4, atol=1e-6)
    # an in-place edit of an offloaded weight is refused with one clear error, changing nothing
    from bias_lens.edit import Edit, mask_from_labels

    edit = Edit.scale(base.hf, mask_from_labels(base.hf, ["L2N3"]), 0.0)
    with pytest.raises(ValueError, match="offloaded"):
        edit.apply_(sharded.hf)
