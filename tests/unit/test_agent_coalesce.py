"""Which queued partial chunks the agent runtime sends as one, and what the one holds."""

from __future__ import annotations

from hivewire.services.agent import Payload
from hivewire.services.agent.runtime import PartialChunk, coalesce, continues
from hivewire.services.runtime.partials import COALESCE_MAX


def chunk(
    text: str = "",
    *,
    data: bytes = b"",
    content_type: str = "",
    artifact: str = "output",
    append: bool = True,
    last: bool = False,
    name: str = "",
    json: dict[str, str] | None = None,
) -> PartialChunk:
    return PartialChunk(
        Payload(text=text, data=data, content_type=content_type, json=json),
        artifact,
        append,
        last,
        name,
    )


def rebuild(chunks: list[PartialChunk]) -> dict[str, tuple[str, bytes]]:
    """What a reader makes of a chunk sequence: each artifact's text and bytes."""
    out: dict[str, tuple[str, bytes]] = {}
    for c in chunks:
        text, data = out.get(c.artifact_id, ("", b"")) if c.append else ("", b"")
        out[c.artifact_id] = (text + c.content.text, data + c.content.data)
    return out


def test_text_chunks_of_one_artifact_join_in_order() -> None:
    run = [chunk("hel"), chunk("lo"), chunk(" world", last=True)]
    assert all(continues(run[0], a, b) for a, b in zip(run, run[1:], strict=False))
    merged = coalesce(run)
    assert merged == chunk("hello world", last=True)
    assert rebuild([merged]) == rebuild(run)


def test_a_replacing_first_chunk_keeps_replacing() -> None:
    run = [chunk("new", append=False), chunk(" text")]
    assert continues(run[0], run[0], run[1])
    merged = coalesce(run)
    assert merged.content.text == "new text" and not merged.append
    before = [chunk("old"), *run]
    assert rebuild([before[0], merged]) == rebuild(before)


def test_bytes_of_one_content_type_join() -> None:
    run = [
        chunk(data=b"\x00\x01", content_type="audio/pcm"),
        chunk(data=b"\x02", content_type="audio/pcm"),
    ]
    assert continues(run[0], run[0], run[1])
    merged = coalesce(run)
    assert merged.content == Payload(data=b"\x00\x01\x02", content_type="audio/pcm")


def test_what_never_joins() -> None:
    head = chunk("a")
    assert not continues(head, head, chunk("b", append=False))  # replaces: a new start
    assert not continues(head, head, chunk("b", artifact="other"))
    assert not continues(head, head, chunk("b", name="named"))
    assert not continues(head, chunk("a", last=True), chunk("b"))  # the artifact ended
    assert not continues(head, head, chunk(json={"k": "v"}))
    assert not continues(chunk(json={"k": "v"}), chunk(json={"k": "v"}), chunk("b"))
    assert not continues(head, head, chunk(data=b"b", content_type="application/octet-stream"))
    assert not continues(
        chunk(data=b"a", content_type="audio/pcm"),
        chunk(data=b"a", content_type="audio/pcm"),
        chunk(data=b"b", content_type="audio/wav"),
    )
    mixed = PartialChunk(
        Payload(text="t", data=b"d", content_type="x/y"), "output", True, False, ""
    )
    assert not continues(mixed, mixed, mixed)
    # An empty chunk is text: it never pulls bytes into a text run.
    assert not continues(chunk(""), chunk(""), chunk(data=b"b", content_type="x/y"))


def test_a_single_chunk_is_sent_as_it_is() -> None:
    big = chunk("x" * (COALESCE_MAX * 2))
    assert coalesce([big]) is big
