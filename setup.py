"""Ship docs/*.md inside the package (``treg/docs/``) so that a pip user has them: ``treg --help``
names that directory. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithDocs(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "treg" / "docs"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(__file__).parent.joinpath("docs").glob("*.md")):
            shutil.copy2(f, dst / f.name)


setup(cmdclass={"build_py": BuildPyWithDocs})
