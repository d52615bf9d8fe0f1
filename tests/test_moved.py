"""Old module paths keep working after the regrouping: same module object, one warning each."""

import subprocess
import sys
import textwrap

from llmsample.moved import MOVED


def test_every_old_path_is_the_new_module_and_warns_once():
    # a fresh interpreter: no old name may already sit in sys.modules
    code = textwrap.dedent(
        """
        import importlib, warnings
        import llmsample
        from llmsample.moved import MOVED
        for old, new in MOVED.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                a = importlib.import_module(old)
                b = importlib.import_module(old)  # the second import is silent
            assert a is b is importlib.import_module(new), (old, new)
            msgs = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
            assert len(msgs) == 1 and new in msgs[0], (old, msgs)
        from llmsample.concepts import Concepts  # from-imports through an alias
        from llmsample.potentials import Concepts as C2
        assert Concepts is C2
        print("checked", len(MOVED))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"checked {len(MOVED)}"


def test_an_unknown_old_name_still_fails_to_import():
    proc = subprocess.run(
        [sys.executable, "-c", "import llmsample.no_such_module"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr
