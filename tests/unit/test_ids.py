"""Ids are drawn from the operating system's random source in blocks (``meterline.ids``): still UUID v4
where the ledger promises one, never repeated, not even by a process forked from one that has drawn."""

from __future__ import annotations

import os
import re
import uuid

from meterline import ids


def test_ledger_and_receipt_ids_are_uuid4_as_python_writes_them() -> None:
    for make in (ids.ledger_id, ids.receipt_id):
        for _ in range(2_000):  # past the end of a block
            text = make()
            parsed = uuid.UUID(text)
            assert parsed.version == 4
            assert parsed.variant == uuid.RFC_4122
            assert str(parsed) == text


def test_prefixed_and_request_ids_have_their_shape() -> None:
    assert re.fullmatch(r"rsv_[0-9a-f]{20}", ids.prefixed("rsv"))
    assert re.fullmatch(r"org_[0-9a-f]{16}", ids.prefixed("org", 8))
    assert re.fullmatch(r"req_[0-9a-f]{24}", ids.request_id())


def test_no_id_repeats_across_many_blocks() -> None:
    drawn = [ids.ledger_id() for _ in range(5_000)]  # 16 bytes each: about twenty blocks of 4 KiB
    drawn += [ids.request_id() for _ in range(5_000)]
    assert len(set(drawn)) == len(drawn)


def test_a_forked_process_never_hands_out_its_parents_ids() -> None:
    """The parent has drawn part of a block; a child forked then must draw its own, or both would hand
    out the rest of that block: the same ledger ids in two processes."""
    ids.ledger_id()  # the parent holds a block, most of it not handed out yet
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.close(read)
        os.write(write, "\n".join(ids.ledger_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        childs = set(pipe.read().split("\n"))
    os.waitpid(child, 0)
    parents = {ids.ledger_id() for _ in range(10)}
    assert len(childs) == 10
    assert not childs & parents
