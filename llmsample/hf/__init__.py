"""The Hugging Face boundary: the only code that imports transformers or peft.

- ``prompts``: prompts to token ids (chat templates, left padding, stop tokens);
- ``session``: the KV-cached decoding session, teacher forcing, hidden states;
- ``classify``: a sequence classifier's log p(label | text), for ``potentials.Classifier``;
- ``adapters``: peft adapters (is-peft, adapter off, add LoRA);
- ``loading``, ``named_models``: models by hub name, folder or offline wheel;
- ``decoding``: the ``model.generate(custom_generate=...)`` drop-in.
"""

__all__: list[str] = []
