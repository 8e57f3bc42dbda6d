"""Which model ids warming leaves out because their last load failed
(``FailedLoads``, pure): what counts as a failed load, what clears it,
and the bound."""

from __future__ import annotations

import pytest

from muxgate.gateway._load_failures import FailedLoads
from muxgate.replicas.contract import ErrorCode, ErrorInfo, ReplicaState

NOTHING = ReplicaState()


def error(code: ErrorCode) -> ErrorInfo:
    return ErrorInfo.of(code, "it failed")


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.MODEL_NOT_FOUND,
        ErrorCode.STORAGE_UNAVAILABLE,
        ErrorCode.BAD_MODEL_ID,
        ErrorCode.MODEL_TOO_LARGE,
        ErrorCode.USER_ERROR,  # the loader raised
    ],
)
def test_a_call_that_failed_without_its_model_loaded_is_a_failed_load(code: ErrorCode) -> None:
    failed = FailedLoads()
    assert failed.replied("77", error(code), NOTHING)
    assert "77" in failed and len(failed) == 1
    assert "other" not in failed


def test_a_failure_with_the_model_loaded_or_loading_is_not_its_load() -> None:
    failed = FailedLoads()
    # the model loaded; the deployment's code failed after it
    assert not failed.replied("a", error(ErrorCode.USER_ERROR), ReplicaState(models=["a"]))
    # another request's load of it still runs
    assert not failed.replied("a", error(ErrorCode.USER_ERROR), ReplicaState(loading=["a"]))
    assert "a" not in failed


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.OVERLOADED,
        ErrorCode.DRAINING,
        ErrorCode.OVER_CAPACITY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.CANCELLED,
        ErrorCode.DEADLINE,
    ],
)
def test_calls_that_did_not_run_to_their_end_say_nothing(code: ErrorCode) -> None:
    failed = FailedLoads()
    assert not failed.replied("a", error(code), NOTHING)
    assert not len(failed)


def test_a_call_without_a_model_id_is_no_load() -> None:
    failed = FailedLoads()
    assert not failed.replied("", error(ErrorCode.USER_ERROR), NOTHING)
    assert not len(failed)


def test_a_success_clears_the_failure() -> None:
    failed = FailedLoads()
    failed.failed("a")
    failed.failed("b")
    failed.loaded("a")
    failed.loaded("never-failed")
    assert "a" not in failed and "b" in failed
    assert repr(failed) == "FailedLoads(ids=1, max_ids=4096, newest=['b'])"


def test_the_oldest_failure_goes_first_past_the_bound() -> None:
    failed = FailedLoads(max_ids=3)
    for model_id in ["a", "b", "c"]:
        failed.failed(model_id)
    failed.failed("a")  # failed again: the newest now
    failed.failed("d")  # pushes out the oldest failure, b
    assert [m for m in "abcd" if m in failed] == ["a", "c", "d"]
    assert len(failed) == 3
    with pytest.raises(ValueError, match="max_ids"):
        FailedLoads(max_ids=0)
