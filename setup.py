"""Metadata is in setup.cfg; this file only adds the trainer auto-registration `.pth` to wheels and editable
installs (see meddinov3_nnunet/autoregister.py). Wheels install the whole build folder into site-packages, so
the file goes to the build folder's root; an editable install (PEP 660) only ships what lies in its unpacked
wheel, which is the finalized `install` command's install_lib there, so the file goes there."""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _autoregister():
    spec = importlib.util.spec_from_file_location("_meddinov3_autoregister",
                                                  os.path.join(HERE, "meddinov3_nnunet", "autoregister.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        autoregister = _autoregister()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
            line = autoregister.pth_line(os.path.join(HERE, "meddinov3_nnunet", "nnunet_ext"))
        else:
            target = self.build_lib
            line = autoregister.pth_line(None)
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, autoregister.PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(line)


setup(cmdclass={"build_py": build_py_with_pth})
