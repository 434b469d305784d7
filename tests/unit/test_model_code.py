"""`import_model_code` imports a model's module from its config alone (the rank takes its memory baseline after it)."""

import subprocess
import sys

from transformers import LlamaConfig, T5Config

MODULE = "transformers.models.llama.modeling_llama"
PROBE = f"""
import sys
from unlearning.train.engine import import_model_code
before = {MODULE!r} in sys.modules
import_model_code(sys.argv[1])
print(before, {MODULE!r} in sys.modules)
"""


def test_the_models_module_is_imported_from_its_config_alone(tmp_path):
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path)  # a config and no weights
    # A fresh interpreter: this test process may have imported the module already.
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_a_config_with_no_causal_lm_class_is_left_to_the_loader(tmp_path):
    from unlearning.train.engine import import_model_code

    T5Config(d_model=16, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path)
    import_model_code(tmp_path)  # no error here: loading the weights reports the unsupported model
