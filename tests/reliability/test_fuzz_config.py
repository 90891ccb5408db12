"""200 seeded mutations of configs/stories260k/lora_stories260k.yaml (key typos, wrong value types, wrong nesting):
every one is a ConfigError naming the file and the key (a YAML syntax error names the file and the line YAML
stopped at: the mutated line or the next); none is accepted and none crashes elsewhere."""
import re
from collections import Counter

from mindformers_sft.config import load_config
from mindformers_sft.errors import ConfigError
from mindformers_sft.models.config import LlamaConfig
from tests.reliability.fuzz_yaml import KINDS, mutations


def _validate(path):
    """What run_mindformer.py checks before building anything: the config, then the model_config keys."""
    cfg = load_config(path)
    LlamaConfig.from_dict(cfg.model.model_config)


def test_mutated_yaml_is_a_config_error_naming_the_key(tmp_path):
    outcome, hints = Counter(), 0
    for n, (kind, key, line, text) in enumerate(mutations(200, seed=1234)):
        path = tmp_path / f"mutated_{n}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            _validate(str(path))
        except ConfigError as e:
            msg = str(e)
        else:
            raise AssertionError(f"{kind} of '{key}' at line {line} was accepted:\n{text.splitlines()[line - 1]}")
        assert msg.startswith(str(path)), msg
        m = re.match(re.escape(str(path)) + r":(\d+): invalid YAML", msg)
        if m:
            assert int(m.group(1)) in (line, line + 1), (kind, key, line, msg)
            outcome[kind, "yaml syntax"] += 1
        else:
            assert f"'{key}'" in msg or f".{key}'" in msg, (kind, key, line, msg)
            assert f"{path}:{line}" in msg, (kind, key, line, msg)
            outcome[kind, "key named"] += 1
        hints += "did you mean" in msg
    assert sum(outcome.values()) == 200 and {k for k, _ in outcome} == set(KINDS)
    print(f"\n[fuzz-yaml] 200 mutations -> {dict(outcome)}; {hints} with a 'did you mean' hint")
