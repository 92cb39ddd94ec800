"""The README's first example is what a new user runs first: it must run as written."""

import gc
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.model
def test_readme_use_example_runs_and_restores_the_first_turn(tmp_path, capsys):
    """The "Use" example, with its store directory moved into a temporary one: two turns of one
    session, the second restoring what the first left and prefilling only the new message."""
    block = _python_blocks()[0]
    assert '"/var/cache/tierkv"' in block, "the example's store path changed: update this test"
    code = block.replace('"/var/cache/tierkv"', repr(str(tmp_path / "store")))
    ns: dict = {}
    frozen_before = gc.get_freeze_count()
    try:
        exec(compile(code, README, "exec"), ns)
        assert gc.get_freeze_count() > frozen_before   # it froze what start-up made, as it says
    finally:
        if not frozen_before:  # pytest's process goes on: its objects collectable again
            gc.unfreeze()
    t1, t2, prompt, tok = ns["t1"], ns["t2"], ns["prompt"], ns["tok"]
    second = prompt + t1.tokens + tok.encode(" And functools.partial?")
    assert t2.restored_tokens > len(prompt)                 # the first turn's prompt and answer came back
    assert t2.restored_tokens + t2.prefilled_tokens == len(second)
    assert t2.prefilled_tokens <= len(tok.encode(" And functools.partial?")) + 1
    assert capsys.readouterr().out.split() == [str(t2.restored_tokens), str(t2.prefilled_tokens), str(t2.ttft_s)]


def test_readme_hook_list_names_only_methods_tierkv_has():
    """The hook list under "Use" is a reference, not a script: every ``store.<name>(`` in it must
    be a method of TierKV."""
    import tierkv

    names = re.findall(r"store\.(\w+)\(", _python_blocks()[1])
    assert names
    missing = [n for n in names if not callable(getattr(tierkv.TierKV, n, None))]
    assert not missing, missing
