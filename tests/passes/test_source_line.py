"""The user's source line: one policy for exceptions, fx nodes and recorded stack traces."""
from __future__ import annotations

from sparsify.passes.trace import user_source_line

TRACE = '''File "/home/u/proj/model.py", line 12, in forward
    x = self.block(x)
File "/venv/lib/python3.12/site-packages/torch/nn/modules/module.py", line 1751, in _call_impl
    return forward_call(*args, **kwargs)
File "/home/u/proj/blocks.py", line 40, in forward
    return torch.roll(x, 1)
File "/venv/lib/python3.12/site-packages/sparsify/passes/trace.py", line 90, in call_module
    return super().call_module(m, forward, args, kwargs)
File "<eval_with_key>.3", line 5, in forward
'''


def test_the_deepest_frame_of_the_users_code():
    assert user_source_line(TRACE) == "blocks.py:40"
    assert user_source_line(None) == "" and user_source_line("no frames here") == ""
    zoo = 'File "/venv/site-packages/sparsify/zoo/resnet.py", line 30, in forward\n'
    assert user_source_line(zoo) == "resnet.py:30"  # the zoo's models are model code


def test_an_exception_points_at_the_line_that_raised():
    def model_code() -> None:
        raise ValueError("boom")

    try:
        model_code()
    except ValueError as e:
        where = user_source_line(e)
    assert where.startswith("test_source_line.py:")
    assert int(where.split(":")[1]) == model_code.__code__.co_firstlineno + 1
