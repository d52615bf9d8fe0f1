"""Old module paths, kept working: the one place that maps them to where the code lives now.

The tree was regrouped into parts (``hf/``, ``smc/``, ``potentials/``, ``ctl/``, ``train/``,
``diagnostics/``, ``data/``, ``cli/``). ``import llmsample.lm`` and the other old paths
still work: a finder on ``sys.meta_path`` hands back the new module itself (the same
object, so monkeypatching either name patches both) and warns once per old name::

    import llmsample.lm          # FutureWarning: llmsample.lm moved to llmsample.hf.session
    from llmsample.hf.session import LMSession   # the new path, no warning

Packages that kept their name (``llmsample.smc``, ``llmsample.potentials``,
``llmsample.ctl``, ``llmsample.cli``) re-export their old public names and need no alias.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "llmsample.lm": "llmsample.hf.session",
    "llmsample.prompts": "llmsample.hf.prompts",
    "llmsample.loading": "llmsample.hf.loading",
    "llmsample.named_models": "llmsample.hf.named_models",
    "llmsample.decoding": "llmsample.hf.decoding",
    "llmsample.resampling": "llmsample.smc.resampling",
    "llmsample.concepts": "llmsample.potentials.concepts",
    "llmsample.potentials.core": "llmsample.potentials",  # split into base, text, tokens, model
    "llmsample.ctl_trainer": "llmsample.ctl.trainer",
    "llmsample.twist_head": "llmsample.ctl.head",
    "llmsample.checkpoints": "llmsample.train.checkpoints",
    "llmsample.exact": "llmsample.diagnostics.exact",
    "llmsample.bounds": "llmsample.diagnostics.bounds",
    "llmsample.commongen": "llmsample.data.commongen",
    "llmsample.shakespeare": "llmsample.data.shakespeare",
    "llmsample.demo": "llmsample.cli.demo",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the new module object (warning once, on first import)."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there "
            f"(the old path is an alias and will be removed)",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (idempotent; ``llmsample`` calls it)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
