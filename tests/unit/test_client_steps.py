"""The client's shared steps (clients/python/batchgate/_steps.py), driven by a scripted runner: what
each operation asks for, and what it does with the answers and errors it gets back."""

from __future__ import annotations

import io

import grpc
import pytest

from batchgate import _steps
from batchgate._steps import Call, Emit, Open, Options, Read, RetryPolicy, Sleep, Stepper
from batchgate.errors import NotFoundError, UnavailableError
from batchgate.v1 import batch_pb2, file_pb2

OPTIONS = Options(timeout=5, retry=RetryPolicy(attempts=3, initial_backoff=0.1, max_backoff=1))


def drive(steps, answer):
    """Run `steps`, answering each Call/Open/Read with `answer(op)` (an exception is thrown in);
    returns (the steps seen, the items emitted, the result)."""
    stepper, seen, emitted = Stepper(steps), [], []
    while (op := stepper.op) is not None:
        seen.append(op)
        if isinstance(op, Emit):
            emitted.append(op.value)
            stepper.resolve(None)
            continue
        if isinstance(op, Sleep):
            stepper.resolve(None)
            continue
        if isinstance(op, _steps.Blocking):
            stepper.resolve(op.fn(*op.args))
            continue
        result = answer(op)
        if isinstance(result, BaseException):
            stepper.fail(result)
        else:
            stepper.resolve(result)
    return seen, emitted, stepper.result


def unavailable() -> UnavailableError:
    return UnavailableError("connection refused", code=grpc.StatusCode.UNAVAILABLE)


def test_a_create_retried_after_unavailable_sends_the_same_request_id():
    answers = iter([unavailable(), unavailable(), batch_pb2.CreateBatchResponse(batch=batch_pb2.Batch(id="b1"))])
    seen, _, batch = drive(_steps.create_batch(OPTIONS, "file-1", "/v1/chat/completions", completion_window="24h",
                                               metadata=None, model="m", provider="", request_id=""),
                           lambda op: next(answers))
    calls = [op for op in seen if isinstance(op, Call)]
    assert len(calls) == 3 and batch.id == "b1"
    ids = {c.request.request_id for c in calls}
    assert len(ids) == 1 and ids.pop().startswith("bg-"), "one made-up request_id for every attempt"
    sleeps = [op.seconds for op in seen if isinstance(op, Sleep)]
    assert len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2


def test_retries_stop_after_the_policy_attempts_and_other_errors_are_not_retried():
    with pytest.raises(UnavailableError):
        drive(_steps.get_batch(OPTIONS, "b"), lambda op: unavailable())
    attempts = []
    with pytest.raises(NotFoundError):
        drive(_steps.get_batch(OPTIONS, "b"),
              lambda op: attempts.append(op) or NotFoundError("no", code=grpc.StatusCode.NOT_FOUND))
    assert len(attempts) == 1


def test_an_upload_retry_replays_the_whole_stream_under_one_request_id():
    answers = iter([unavailable(), file_pb2.UploadFileResponse(file=file_pb2.File(id="file-1"))])
    sent = []

    def answer(op):
        sent.append(list(op.request))  # the runner consumes the client stream
        return next(answers)

    _, _, f = drive(_steps.upload_file(OPTIONS, b"line one\nline two\n", filename="x.jsonl", purpose=1,
                                       request_id="", expires_after_seconds=None, chunk_size=4), answer)
    assert f.id == "file-1" and len(sent) == 2 and sent[0] == sent[1]
    assert b"".join(m.chunk for m in sent[1]) == b"line one\nline two\n"
    assert sent[0][0].header.request_id.startswith("bg-") and sent[0][-1].WhichOneof("payload") == "finish"


def test_an_upload_from_a_stream_that_cannot_be_read_again_is_not_retried():
    class Pipe(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, buffer):
            return 0

    attempts = []
    with pytest.raises(UnavailableError):
        drive(_steps.upload_file(OPTIONS, Pipe(), filename="x.jsonl", purpose=1, request_id="r",
                                 expires_after_seconds=None, chunk_size=4),
              lambda op: attempts.append(op) or unavailable())
    assert len(attempts) == 1


def _event(revision: int, status: int = batch_pb2.BATCH_STATUS_IN_PROGRESS):
    return batch_pb2.WatchBatchResponse(batch=batch_pb2.Batch(id="b", revision=revision, status=status))


def test_watch_reopens_after_the_last_revision_and_ends_at_a_terminal_state():
    streams = iter([[_event(1), _event(2), unavailable()],
                    [batch_pb2.WatchBatchResponse(heartbeat=batch_pb2.Heartbeat(revision=2)),
                     _event(3, batch_pb2.BATCH_STATUS_COMPLETED), _event(99)]])
    opened = []

    def answer(op):
        if isinstance(op, Open):
            opened.append(op.request.start_revision)
            return iter(next(streams))
        return next(op.stream, None)

    seen, states, _ = drive(_steps.watch(OPTIONS, "b", reconnect_delay=0.01), answer)
    assert opened == [0, 2]
    assert [s.revision for s in states] == [1, 2, 3], "the heartbeat is skipped, nothing after the end"
    assert sum(isinstance(op, Read) for op in seen) == 5
