"""Problems with known answers: exact enumeration of small targets and log Z bounds."""

__all__: list[str] = []
