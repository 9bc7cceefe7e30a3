"""Checkpoint integrity: checksums catch damage, resume falls back past it and the run can save the
same step again; a checkpoint of another shape is a mismatch, not damage."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import checkpoint


def state(value: float, width: int = 4) -> dict:
    return {"step": jnp.asarray(int(value), jnp.int32),
            "params": {"w": jnp.full((3, width), value, jnp.float32),
                       "b": jnp.asarray(np.random.default_rng(int(value)).standard_normal(4096),
                                        jnp.float32)}}


def largest_data_file(step_dir: str) -> str:
    """The array data (random values do not compress: the largest file of orbax's store)."""
    data = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
    return max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_flipped_byte_detected_and_skipped(tmp_path, caplog):
    with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as ckpt:
        ckpt.save(1, state(1.0))
        ckpt.save(2, state(2.0))
        assert ckpt.verify(2) == ("ok", "")
        damaged = largest_data_file(ckpt.step_dir(2))
        flip_byte(damaged)
        # Without the checksums orbax restores the flipped byte silently as a different value.
        unchecked = ckpt.restore(2, state(0.0), verified=True)
        differs = jax.tree.map(lambda x, y: not np.array_equal(np.asarray(x), np.asarray(y)),
                               unchecked, state(2.0))
        assert any(jax.tree.leaves(differs)), differs
        status, reason = ckpt.verify(2)
        assert status == "damaged" and os.path.relpath(damaged, ckpt.step_dir(2)) in reason
        with pytest.raises(checkpoint.CheckpointDamagedError, match=ckpt.step_dir(2)):
            ckpt.restore(2, state(0.0))
        with caplog.at_level(logging.WARNING):
            step, restored = ckpt.restore_latest(state(0.0))
    assert step == 1
    assert_tree_equal(restored, state(1.0))
    assert any(os.path.join(str(tmp_path), "2") in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)


def test_truncated_file_detected(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(5, state(5.0))
        path = largest_data_file(ckpt.step_dir(5))
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 7)
        status, reason = ckpt.verify(5)
    assert status == "damaged" and f"{size - 7} bytes, {size} were written" in reason


def test_fallback_then_saving_the_damaged_step_again_finishes(tmp_path):
    directory = str(tmp_path)
    with checkpoint.Checkpointer(directory, max_to_keep=3) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, state(float(s)))
        flip_byte(largest_data_file(ckpt.step_dir(3)))
    # A new process resumes: falls back to 2, retrains to 3 and saves 3 and 4.
    with checkpoint.Checkpointer(directory, max_to_keep=3) as ckpt:
        step, restored = ckpt.restore_latest(state(0.0))
        assert step == 2
        assert_tree_equal(restored, state(2.0))
        ckpt.save(3, state(30.0))
        ckpt.save(4, state(40.0))
        assert ckpt.all_steps() == [2, 3, 4]
        assert ckpt.verify(3) == ("ok", "")
    with checkpoint.Checkpointer(directory, max_to_keep=3) as ckpt:
        assert_tree_equal(ckpt.restore(3, state(0.0)), state(30.0))
        step, restored = ckpt.restore_latest(state(0.0))
    assert step == 4
    assert_tree_equal(restored, state(40.0))


def test_every_checkpoint_damaged_is_an_error_that_keeps_the_files(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state(1.0))
        ckpt.save(2, state(2.0))
        for s in (1, 2):
            flip_byte(largest_data_file(ckpt.step_dir(s)))
        with pytest.raises(checkpoint.CheckpointError) as err:
            ckpt.restore_latest(state(0.0))
        assert ckpt.all_steps() == [1, 2]
    message = str(err.value)
    assert "step 2:" in message and "step 1:" in message
    assert "remove" not in message and "delete" not in message


def test_checkpoint_without_checksums_is_used_only_after_verified_ones(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state(1.0))
        ckpt.save(2, state(2.0))
        # A run stopped between orbax's commit and the checksums.
        os.remove(os.path.join(ckpt.step_dir(2), checkpoint.MANIFEST))
        assert ckpt.verify(2)[0] == "unverified"
        step, restored = ckpt.restore_latest(state(0.0))
        assert step == 1
        assert_tree_equal(restored, state(1.0))
        # Written before checksums existed: no verified checkpoint, the newest is restored.
        os.remove(os.path.join(ckpt.step_dir(1), checkpoint.MANIFEST))
        step, restored = ckpt.restore_latest(state(0.0))
    assert step == 2
    assert_tree_equal(restored, state(2.0))


def test_mismatch_lists_differing_leaves_and_does_not_fall_back(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state(1.0, width=4))
        ckpt.save(2, state(2.0, width=4))
        target = state(0.0, width=6)
        target["params"]["extra"] = jnp.zeros(2)
        del target["params"]["b"]
        with pytest.raises(checkpoint.CheckpointMismatchError) as err:
            ckpt.restore_latest(target)
        assert ckpt.all_steps() == [1, 2]
    e = err.value
    assert e.step == 2
    assert e.differences == ["params/b: in the checkpoint, not in the state being restored",
                             "params/extra: missing from the checkpoint",
                             "params/w: checkpoint shape (3, 4), expected (3, 6)"]
    message = str(e)
    assert all(line in message for line in e.differences)
    assert "remove" not in message and "delete" not in message and "corrupt" not in message


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_rejected(tmp_path, keep):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state(1.0))
    with pytest.raises(ValueError, match="keep_checkpoints"):
        checkpoint.Checkpointer(str(tmp_path), max_to_keep=keep)
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.verify(1) == ("ok", "")


def test_nonfinite_state_never_written(tmp_path):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state(1.0))
        bad = state(2.0)
        bad["params"]["w"] = bad["params"]["w"].at[1, 2].set(jnp.nan)
        bad["opt_state"] = {"mu": jnp.array([0.0, jnp.inf]), "count": jnp.asarray(3)}
        assert checkpoint.nonfinite_leaves(bad) == ["opt_state/mu", "params/w"]
        with pytest.raises(checkpoint.NonFiniteStateError, match="opt_state/mu, params/w"):
            ckpt.save(2, bad)
        assert ckpt.all_steps() == [1]
        assert not os.path.exists(ckpt.step_dir(2))
        assert checkpoint.nonfinite_leaves(state(3.0)) == []
