"""``llmsample models``: the models known by name, whether each is installed, and how to
install it.

    llmsample models
    llmsample models --json

    from llmsample.cli.models import run_models
    [r["name"] for r in run_models() if r["ready"]]
"""

from __future__ import annotations

__all__ = ["run_models", "print_models"]


def run_models() -> list[dict]:
    """The embedded and named models: whether each is installed and converted."""
    from llmsample.hf.loading import DEFAULT_MODEL, EMBEDDED
    from llmsample.hf.named_models import NAMED, list_models

    rows = [
        dict(
            name=name,
            description="embedded in the package" + (" (default)" * (name == DEFAULT_MODEL)),
            installed=True,
            ready=path.exists(),
            path=str(path),
            install=None,
        )
        for name, path in EMBEDDED.items()
    ]
    for r in list_models():
        rows.append(
            dict(
                name=r.name,
                description=r.description,
                installed=r.installed,
                ready=r.cached,
                path=str(r.path),
                install=None if r.installed else NAMED[r.name].install,
            )
        )
    return rows


def print_models(rows: list[dict]) -> None:
    """Two lines per model: its name and description; its state and path."""
    for r in rows:
        state = "ready" if r["ready"] else "converted on first use" if r["installed"] else ""
        print(f"{r['name']:24s} {r['description']}")
        print(f"{'':24s} {state or 'not installed: ' + r['install']}   {r['path']}")
