"""A settlement that finds no hold (reserves are durable, so only a database
restored from an older backup could lose one). The call answers 503 with
nothing charged, never a 404 or a 500."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiohttp.test_utils import TestClient

from creditgate import ledger
from creditgate.errors import ServiceUnavailable
from creditgate.http.state import STATE
from creditgate.proxy.metering import MeteredCall
from creditgate.proxy.request import parse_chat_request
from tests.proxy.conftest import MESSAGES, outcome


async def test_a_settlement_whose_hold_was_lost_is_503_and_charges_nothing(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    st = gw.server.app[STATE]
    chat = parse_chat_request(
        {"model": "mock-model", "messages": MESSAGES},
        st.settings.config.models,
        st.settings.config.estimate_bytes_per_token,
    )
    limits = await st.limits.get(c.account.id, None)
    admission = await st.throttle.admit(limits, chat.worst_case_tokens)
    before = await outcome(db, c.account.id)
    # The reservation this call was made on is not in the database: as after a crash.
    lost = ledger.Hold(uuid.uuid4(), c.account.id, 5_000)
    deadline = asyncio.get_running_loop().time() + chat.model.timeouts.total
    config = st.settings.config
    call = MeteredCall(st.holds, st.throttle, config, chat, lost, admission, "req-lost", deadline)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    with pytest.raises(ServiceUnavailable) as raised:
        await call.settle(usage, 20)
    assert raised.value.status == 503 and "nothing was charged" in raised.value.message
    assert await outcome(db, c.account.id) == before
    assert admission.finished  # the throttle was corrected all the same
    await call.close()  # ended once: nothing more to release
