"""Training machinery shared by every method: checkpoints, resume, stop signals."""

__all__: list[str] = []
