"""A stream's chunks are of one call: another call's answer or chunks end it broken
(``producer.streams.ChatStream``), whatever order they come in."""

from __future__ import annotations

import pytest

from producer.streams import ChatStream
from queuegate.errors import StreamBroken
from queuegate.messages import ChatResult, GatewayInfo, StreamChunk


async def _started() -> None:
    return None


def _chunk(seq: int, stream: str | None) -> StreamChunk:
    return StreamChunk(job_id="j", seq=seq, delta={"content": f"w{seq} "}, stream=stream)


def _answer(stream: str | None) -> ChatResult:
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}
    gateway = GatewayInfo(model_requested="m", stream=stream)
    return ChatResult(job_id="j", team="t", status="ok", response=response, gateway=gateway)


async def _read(stream: ChatStream) -> list[str]:
    return [chunk.delta["content"] async for chunk in stream]


@pytest.mark.parametrize("other", ["b", None], ids=["another stream", "no stream"])
async def test_an_answer_of_another_stream_breaks_it_and_is_its_result(other: str | None) -> None:
    # Given a stream that read two chunks of stream "a" (its worker stalled past its lease)
    stream = ChatStream("j", _started, timeout=5)
    for item in (_chunk(0, "a"), _chunk(1, "a"), _answer(other), _chunk(2, "a")):
        stream.put(item)
    # When the job's answer comes from stream "b", the delivery that took the job over, or
    # from none: a copy of the job sent unstreamed took it over (before: read as the end of
    # the stream, "w0 w1" ending whole with another call's answer)
    # Expect the stream broken after the first two chunks, that answer its result
    read: list[str] = []
    with pytest.raises(StreamBroken):
        async for chunk in stream:
            read.append(chunk.delta["content"])
    assert read == ["w0 ", "w1 "]
    assert stream.result is not None and stream.result.gateway.stream == other
    assert await _read(stream) == []


async def test_a_stream_reads_its_own_chunks_again_and_answer_whole() -> None:
    # Given chunks of one stream, one of them delivered twice, and its answer
    stream = ChatStream("j", _started, timeout=5)
    for item in (_chunk(0, "a"), _chunk(1, "a"), _chunk(1, "a"), _answer("a")):
        stream.put(item)
    # Expect each read once, the answer its result: nothing broken
    assert await _read(stream) == ["w0 ", "w1 "]
    assert stream.result is not None and not stream.broken


async def test_a_reader_that_joined_late_takes_any_streams_answer() -> None:
    # Given a reader that opened after its job's first chunks went (it reads none)
    stream = ChatStream("j", _started, timeout=5)
    for item in (_chunk(3, "a"), _chunk(0, "b"), _answer("b")):
        stream.put(item)
    # Expect its result the job's answer, as before streams were named
    assert await _read(stream) == []
    assert stream.result is not None and not stream.broken
