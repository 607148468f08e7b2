"""Offline API: every float of SamplingParams is finite and in a range that cannot overflow; the package exports."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tgi_space.sampling import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": 1e-40}, "temperature"),
        ({"temperature": 1e-40, "do_sample": True}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e30}, "temperature"),
        ({"repetition_penalty": 1e-40, "do_sample": True}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"top_p": math.nan}, "top_p"),
        ({"typical_p": math.nan}, "typical_p"),
    ],
)
def test_non_finite_and_absurd_floats_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


def test_the_range_edges_are_accepted():
    SamplingParams(temperature=0.0)  # greedy
    SamplingParams(temperature=1e-4, repetition_penalty=1e-4, do_sample=True)
    SamplingParams(temperature=1e4, repetition_penalty=1e4)


def test_package_root_exports_llm_and_sampling_params_lazily():
    code = (
        "import sys, tgi_space\n"
        "assert 'torch' not in sys.modules, 'import tgi_space loaded torch'\n"
        "from tgi_space import LLM, SamplingParams\n"
        "from tgi_space.llm import LLM as L\n"
        "assert LLM is L and SamplingParams(max_new_tokens=2).max_new_tokens == 2\n"
        "assert {'LLM', 'SamplingParams'} <= set(dir(tgi_space))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import tgi_space

        tgi_space.nope  # noqa: B018
