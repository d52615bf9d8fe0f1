"""Sequential Monte Carlo decoding for ``model.generate``: a thin shim over llmsample.

    model.generate(**inputs, custom_generate="<this folder or Hub repo>", trust_remote_code=True,
                   tokenizer=tok, potential=..., num_particles=32)

All the logic lives in ``llmsample.hf.decoding`` (see its docstring and this folder's README).
"""

from llmsample.hf.decoding import folder_generate


def generate(model, *args, **kwargs):
    """Run SMC (``decoding="importance"`` for importance sampling) through ``model.generate``."""
    return folder_generate(model, *args, **kwargs)
