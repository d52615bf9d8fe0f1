"""Targets: potentials score text (and token prefixes) and never sample.

    from llmsample.potentials import Contains, Regex, Concepts, Product

    phi = Contains("love") * TokenMask(banned=[bad_id]) ** 2.0

The interface and the combinators are in :mod:`~llmsample.potentials.base`, the potentials
by what they read in :mod:`~llmsample.potentials.text`, :mod:`~llmsample.potentials.tokens`,
:mod:`~llmsample.potentials.model` and :mod:`~llmsample.potentials.concepts`. This package
exports the public names of all of them (``__all__`` is theirs, joined);
:func:`llmsample.testing.check_potential` checks a potential against the interface.
"""

from llmsample.potentials import base, concepts, model, text, tokens
from llmsample.potentials.base import *  # noqa: F403
from llmsample.potentials.concepts import *  # noqa: F403
from llmsample.potentials.model import *  # noqa: F403
from llmsample.potentials.text import *  # noqa: F403
from llmsample.potentials.tokens import *  # noqa: F403

__all__: list[str] = []
__all__ += base.__all__
__all__ += text.__all__
__all__ += tokens.__all__
__all__ += model.__all__
__all__ += concepts.__all__
