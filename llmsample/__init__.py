"""llmsample: diverse, correctly weighted posterior samples from Hugging Face causal LMs.

import llmsample
from llmsample.potentials import Contains
out = llmsample.smc_generate(model, tokenizer, prompts=["ROMEO:"],
                             potential=Contains("love"), num_particles=32,
                             max_new_tokens=40, seed=0)
out.texts, out.log_weights, out.log_z, out.ess, out.sample(4)
"""

from llmsample import potentials, proposals, twists
from llmsample.generate import (
    ancestral_generate,
    beam_generate,
    importance_generate,
    smc_generate,
)
from llmsample.hf.decoding import importance_decoding, smc_decoding
from llmsample.hf.loading import load_model
from llmsample.moved import install as _install_aliases
from llmsample.output import SamplingOutput
from llmsample.particles import Particles
from llmsample.smc import SMCConfig

_install_aliases()  # old module paths (llmsample.lm, ...) keep working, with a warning

__all__ = [
    "smc_generate",
    "smc_decoding",
    "importance_decoding",
    "importance_generate",
    "ancestral_generate",
    "beam_generate",
    "load_model",
    "SMCConfig",
    "SamplingOutput",
    "Particles",
    "potentials",
    "proposals",
    "twists",
]
