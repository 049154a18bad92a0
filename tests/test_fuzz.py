"""A short, seeded fuzz run of every parser of outside input (tests/fuzz_targets.py): a few hundred
mutated inputs each must end normally or in an AdapmoeError — no other exception, no hang. The long runs
(≥ 100,000 inputs per target) are `scripts/fuzz.py`; their figures are in docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Seeds, build_seeds, inputs, run_one

EXAMPLES = 200


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return build_seeds(Path(tmp_path_factory.mktemp("fuzz")))


@pytest.mark.parametrize("name", list(TARGETS))
def test_parser_survives_mutated_input(seeds: Seeds, name: str):
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs(name, seeds))
    def run(data: bytes) -> None:
        run_one(name, seeds, data)

    run()


def test_the_seeds_are_accepted(seeds: Seeds):
    """Each target's seed is valid input: the mutations start from something the parser takes."""
    from adapmoe_cli.errors import AdapmoeError

    for name, (fn, attr, _) in TARGETS.items():
        try:
            fn(seeds, getattr(seeds, attr))
        except AdapmoeError as e:
            raise AssertionError(f"{name}: its seed is refused ({e})") from None
