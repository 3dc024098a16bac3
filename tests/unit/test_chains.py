"""One pipeline definition: every chain (make chain, make demo, make release) is a list of Steps whose bundle runs
are BundleRuns; each names configs that exist and overrides keys its configs have, and the Makefile spells no
bundle run of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from common.apps.chains import CHAINS, ChainOptions, chain_steps
from common.apps.demo import SIZES, demo_steps
from common.apps.pipeline import Step
from common.apps.release import labelfree_steps, release_steps
from common.bundle_run import BUNDLES, REPO, BundleRun


def _check_bundle_step(step: Step) -> None:
    run = step.bundle_run()
    for f in run.config_files():
        assert Path(f).is_file(), f"{step.name}: {f} does not exist"
    parser = run.parser()
    for key in step.overrides:
        parent = key.rsplit("#", 1)[0]
        # a key the configs have, or a new argument of an object they have (network_def#random_init)
        assert key in parser or ("#" in key and parent in parser), f"{step.name}: --{key} is no key of {run.configs}"


def _check(steps: list[Step]) -> None:
    assert steps and len({s.name for s in steps}) == len(steps)
    for step in steps:
        if step.script is not None:
            assert Path(step.script[0]).is_file() and step.done_file is None
            assert step.command("sqlite:///x.db")[:2] == [sys.executable, step.script[0]]
        else:
            _check_bundle_step(step)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_every_named_chain_runs_configs_that_exist_with_keys_they_have(name, tmp_path):
    steps = chain_steps(name, ChainOptions(tmp_path))
    _check(steps)
    assert all(s.experiment == name for s in steps)
    bundle_outputs = [
        Path(s.overrides["output_dir"]) for s in steps if s.script is None and "output_dir" in s.overrides
    ]
    assert all(tmp_path in p.parents for p in bundle_outputs)  # everything under --out


def test_the_demo_and_release_chains_are_steps_of_the_same_kind(tmp_path):
    _check(demo_steps(tmp_path / "demo", SIZES["demo"]))
    _check(demo_steps(tmp_path / "smoke", SIZES["smoke"]))
    _check(release_steps(tmp_path / "release"))
    _check(labelfree_steps(tmp_path / "release", BUNDLES / "hsam_finetune" / "models" / "model.pt"))


def test_sa3b_is_the_six_chains_in_order(tmp_path):
    options = ChainOptions(tmp_path)
    parts = ["probmap", "pseudolabel", "hsam-data", "hsam", "hsam-baselines", "hsam-comparison"]
    expected = [s.name for p in parts for s in chain_steps(p, options)]
    assert [s.name for s in chain_steps("sa3b", options)] == expected


def test_an_unknown_chain_is_a_clear_error():
    with pytest.raises(KeyError, match="no chain 'hsam-dta'; the chains are: probmap"):
        chain_steps("hsam-dta")


def test_a_bundle_run_is_the_same_in_a_process_and_in_this_one():
    run = BundleRun("probmap", ["inference.json", "evaluate.json"], {"tau": 0.4, "overlay": False, "output_dir": "/o"})
    argv = run.argv()
    assert argv[:4] == ["-m", "monai.bundle", "run", "--config_file"]
    assert argv[argv.index("--bundle_root") + 1] == str(BUNDLES / "probmap")
    # python-fire reads Python literals: False must not arrive as the (truthy) string "false"
    assert argv[argv.index("--overlay") + 1] == "False" and argv[argv.index("--tau") + 1] == "0.4"
    parser = run.parser()
    assert parser["tau"] == 0.4 and parser["overlay"] is False and parser["bundle_root"] == str(BUNDLES / "probmap")
    assert "scorer" in parser  # evaluate.json merged over inference.json


def test_the_makefile_spells_no_bundle_run_and_has_one_chain_target():
    makefile = (REPO / "Makefile").read_text()
    assert "monai.bundle run" not in makefile and "benchmarks/" not in makefile
    targets = {line.split(":")[0] for line in makefile.splitlines() if line and not line[0].isspace() and ":" in line}
    assert "chain" in targets
    assert not targets & {"probmap", "pseudolabel", "hsam", "hsam-data", "hsam-baselines", "sweep", "ablation"}
