"""The light commands start without importing torch; the lazy package attributes still give the whole API."""
import subprocess
import sys

import pytest

LIGHT_COMMANDS = [["--version"], ["models"], ["models", "se_*"], ["--help"], ["train", "--help"],
                  ["summary", "--help"], ["bench", "--help"], ["eval", "--help"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_do_not_import_torch(argv):
    code = ("import sys, excite.cli\n"
            "try:\n"
            f"    excite.cli.main({argv!r})\n"
            "except SystemExit:\n"  # --version and --help exit through argparse
            "    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "torch not imported"
    assert done.stdout  # the command did print what it was asked for


def test_lazy_api_is_the_eager_one():
    import excite
    import excite.models
    import excite.train
    from excite.models import summary as summary_module_function
    from excite.train import fit

    # A submodule of an export's name (excite.train.fit, excite.models.summary) does not hide the export.
    assert fit is excite.fit is excite.train.fit is sys.modules["excite.train.fit"].fit
    assert summary_module_function is excite.summary is sys.modules["excite.models.summary"].summary
    for name in excite.__all__:
        assert getattr(excite, name) is not None
    for package in (excite.models, excite.train):
        assert all(hasattr(package, name) for name in package.__all__)
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        excite.nothing  # noqa: B018
