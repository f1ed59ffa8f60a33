"""Small builders and readers for Generate streams."""
from __future__ import annotations

from dataclasses import dataclass

from tandem.v1 import generation_pb2 as pb

LONG_TEXT = "Tell me a story about a fox who lives in a forest and loves the sun."


def text_request(text: str = LONG_TEXT, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(**{"temperature": 0.0, **sampling}))


@dataclass
class Stream:
    responses: list[pb.GenerateResponse]

    @property
    def chunks(self) -> list[pb.Chunk]:
        return [r.chunk for r in self.responses if r.WhichOneof("kind") == "chunk"]

    @property
    def complete(self) -> pb.Complete:
        last = self.responses[-1]
        assert last.WhichOneof("kind") == "complete", last
        return last.complete

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def request_ids(self) -> set[str]:
        return {r.request_id for r in self.responses}
