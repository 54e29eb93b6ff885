"""StepStaging (engine/staging.py): the step's metadata through persistent buffers, equal to torch.tensor's."""

from __future__ import annotations

import torch

from hf_turbo.engine.staging import StepStaging


def _parts(n: int, width: int) -> dict:
    ids = [(7 * i) % 1000 + 2**40 for i in range(n)]  # int64 values beyond int32
    table = [[(i * width + j) % 97 for j in range(width)] for i in range(n)]
    return {"ids": (ids, torch.int64), "cu": (list(range(0, 2 * n + 1, 2)), torch.int32),
            "keep": ([], torch.int64), "table": (table, torch.int32), "slots": ([-1] + ids[1:], torch.int64)}


def _check(staged: dict, parts: dict) -> None:
    for name, (data, dtype) in parts.items():
        expected = torch.tensor(data, dtype=dtype)
        got = staged[name]
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name


def test_staged_tensors_equal_torch_tensor():
    staging = StepStaging("cpu")
    for n, width in [(3, 2), (1, 1), (5, 4)]:
        parts = _parts(n, width)
        _check(staging.stage(parts), parts)


def test_buffers_are_reused_across_steps_and_alternate():
    staging = StepStaging("cpu")
    first = staging.stage(_parts(4, 3))
    grows = staging.num_grows
    second = staging.stage(_parts(4, 3))
    assert staging.num_grows == 2 * grows  # the second slot's buffers, once
    third = staging.stage(_parts(3, 2))
    fourth = staging.stage(_parts(4, 3))
    assert staging.num_grows == 2 * grows  # nothing new after both slots exist
    assert third["ids"].data_ptr() == first["ids"].data_ptr()  # slot 0 again
    assert fourth["ids"].data_ptr() == second["ids"].data_ptr() != first["ids"].data_ptr()
    _check(second, _parts(4, 3))  # the other slot's step is untouched by the next one
    _check(third, _parts(3, 2))


def test_buffers_grow_for_a_bigger_step():
    staging = StepStaging("cpu")
    staging.stage(_parts(2, 2))
    staging.stage(_parts(2, 2))
    before = staging.num_grows
    big = _parts(300, 40)  # 12,000 table entries: past the first capacity
    staged = staging.stage(big)
    assert staging.num_grows > before
    _check(staged, big)
    small = _parts(2, 2)
    _check(staging.stage(small), small)


def test_host_mirror_alternates_and_copies_what_was_written():
    """backends/mirror.py: two host copies in turn (a step writes one while the other's copy may be queued)."""
    from hf_turbo.backends.mirror import HostMirror

    device = torch.zeros(6, dtype=torch.int64)
    mirror = HostMirror(device)
    first = mirror.begin()
    first[:] = [1, 2, 3, 4, 5, 6]
    mirror.push(4)
    assert device.tolist() == [1, 2, 3, 4, 0, 0]  # only the first n values
    second = mirror.begin()
    assert second.ctypes.data != first.ctypes.data
    second[:] = 9
    mirror.push()
    assert device.tolist() == [9] * 6 and first.tolist() == [1, 2, 3, 4, 5, 6]  # the first copy untouched
    assert mirror.begin().ctypes.data == first.ctypes.data  # and then the first again
