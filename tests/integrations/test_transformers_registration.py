"""When ``import owl2`` registers mPLUG-Owl2 with transformers' Auto classes, and when it leaves transformers alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_owl2_does_not_import_transformers():
    assert run("import sys, owl2; print('transformers' in sys.modules)") == "False"


def test_importing_owl2_after_transformers_registers_the_auto_classes():
    out = run(
        "import transformers, owl2\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText\n"
        "config = AutoConfig.for_model('mplug_owl2')\n"
        "print(type(config).__name__, AutoModelForCausalLM._model_mapping[type(config)].__name__,\n"
        "      AutoModelForImageTextToText._model_mapping[type(config)].__name__)"
    )
    assert out == "MPLUGOwl2Config MPLUGOwl2LlamaForCausalLM MPLUGOwl2LlamaForCausalLM"


def test_importing_owl2_alone_leaves_the_model_type_unknown_to_transformers():
    out = run(
        "import owl2\n"
        "from transformers import AutoConfig\n"
        "try:\n"
        "    AutoConfig.for_model('mplug_owl2')\n"
        "    print('registered')\n"
        "except ValueError:\n"
        "    print('unknown')"
    )
    assert out == "unknown"
