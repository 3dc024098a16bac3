"""How a bundle is run, in one place: :class:`BundleRun` (which bundle, which configs, which overrides), as a
``python -m monai.bundle run`` process or in this one. Where the bundles are: ``common/../bundles`` (the
repository, and a ``pip install`` that carries them as package data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


@dataclass
class BundleRun:
    """One run of a bundle: which bundle, which of its configs (a later one overrides an earlier, as
    ``monai.bundle run`` merges a list) and which overrides. The one definition of how a bundle is run: a chain
    step runs :meth:`argv` as its own ``python -m monai.bundle run`` process; ``segment`` and the benchmarks read
    the same configs in their own process with :meth:`parser` (MONAI's ``ConfigParser``, as ``monai.bundle run``
    reads them) and :meth:`run_evaluator`."""

    bundle: str
    configs: list[str]
    overrides: dict = field(default_factory=dict)

    @property
    def bundle_root(self) -> Path:
        return BUNDLES / self.bundle

    def config_files(self) -> list[str]:
        return [str(self.bundle_root / "configs" / c) for c in self.configs]

    def argv(self) -> list[str]:
        """``python``'s arguments for ``-m monai.bundle run`` with these configs and overrides."""
        files = self.config_files()
        argv = ["-m", "monai.bundle", "run", "--config_file", str(files) if len(files) > 1 else files[0]]
        argv += ["--bundle_root", str(self.bundle_root)]
        for key, value in self.overrides.items():
            # a Python literal: python-fire parses it (JSON's true/false/null would arrive as strings, and "false" is truthy)
            argv += [f"--{key}", value if isinstance(value, str) else repr(value)]
        return argv

    def parser(self):
        """The bundle's configs in this process, overrides applied (``a#b`` keys reach into nested ones)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self.config_files())
        parser.update({"bundle_root": str(self.bundle_root), **self.overrides})
        return parser

    def run_evaluator(self):
        """Run the config's ``initialize`` and its ``evaluator`` in this process; (parser, evaluator)."""
        parser = self.parser()
        if parser.get("initialize"):
            parser.get_parsed_content("initialize")
        evaluator = parser.get_parsed_content("evaluator")
        evaluator.run()
        return parser, evaluator


__all__ = ["BUNDLES", "REPO", "BundleRun"]
