"""bf16 models (CPU here, CUDA when present): weights and log Z stay fp64 and finite,
and bf16 SMC agrees with fp32 SMC on log Z within the bf16 rounding of the logits."""

import pytest
import torch
from conftest import EOS, make_model, make_tokenizer

import llmsample
from llmsample.diagnostics.exact import enumerate_target
from llmsample.potentials import Contains

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_smc_matches_exact_posterior_evidence(arch, device):
    tok = make_tokenizer()
    model32 = make_model(arch)
    model16 = make_model(arch).to(device=device, dtype=torch.bfloat16)
    runs, prompts = 200, ["a b", "c d e f"]
    out = llmsample.smc_generate(
        model16,
        tok,
        [p for p in prompts for _ in range(runs)],
        potential=Contains("c"),
        num_particles=8,
        max_new_tokens=3,
        ess_threshold=1.5,
        seed=0,
    )
    assert out.log_weights.dtype == torch.float64
    assert not torch.isnan(out.log_z).any()
    for b, p in enumerate(prompts):
        exact32 = enumerate_target(model32, tok, p, Contains("c"), 3, EOS).log_z
        exact16 = enumerate_target(model16, tok, p, Contains("c"), 3, EOS).log_z
        ratio = (out.log_z[b * runs : (b + 1) * runs] - exact16).exp()
        assert abs(ratio.mean() - 1) < 3 * ratio.std() / runs**0.5  # unbiased for bf16's p
        assert abs(exact16 - exact32) < 0.1  # bf16 only perturbs the target slightly
