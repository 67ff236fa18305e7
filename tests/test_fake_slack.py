"""Smoke tests: unmodified slack_bolt / slack_sdk against tests.fakes.slack_server.FakeSlack."""

import json
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from fakes.slack_server import FakeSlack  # tests/ has no __init__.py: pytest puts it on sys.path

SIGNING_SECRET = "fake-signing-secret"


@pytest.fixture
async def fake():
    async with FakeSlack() as f:
        yield f


def make_app(fake: FakeSlack, **kwargs) -> AsyncApp:
    app = AsyncApp(client=AsyncWebClient(token=fake.bot_token, base_url=fake.api_url), **kwargs)
    app.state = {"seen": []}  # type: ignore[attr-defined]

    @app.event("app_mention")
    async def on_mention(event, say):
        await say(text=f"echo: {event['text']}", thread_ts=event["ts"])

    @app.event("message")
    async def on_message(event, say):
        app.state["seen"].append(event)  # type: ignore[attr-defined]

    @app.command("/ttt")
    async def on_command(ack, respond, command):
        await ack(text="thinking...", response_type="ephemeral")
        await respond(text=f"done: {command['text']}", response_type="ephemeral")

    return app


@asynccontextmanager
async def socket_mode(app: AsyncApp, fake: FakeSlack, **handler_kwargs):
    handler = AsyncSocketModeHandler(app, fake.app_token, **handler_kwargs)
    await handler.connect_async()
    try:
        yield handler
    finally:
        await handler.close_async()


@pytest.mark.timeout(60)
async def test_app_mention_is_acked_and_answered_in_thread(fake):
    app = make_app(fake)
    async with socket_mode(app, fake):
        await fake.wait_for_connections(1)
        assert fake.hellos == 1
        event = fake.app_mention("C0GENERAL", "U0ALICE", "hello bot")
        assert event["text"] == f"<@{fake.bot_user_id}> hello bot"
        envelope_id = await fake.send_event(event)

        env = await fake.wait_for_ack(envelope_id)
        assert env.ack_payload is None and env.ack_latency < 3
        reply = await fake.wait_for_message("C0GENERAL")
        assert reply["thread_ts"] == event["ts"]
        assert reply["text"] == f"echo: {event['text']}"
        assert float(reply["ts"]) > float(event["ts"])

        # The reply comes back as a message event (like real Slack); bolt acks it but ignores
        # the bot's own message, so the message listener never sees it.
        echo = await fake.wait_for(lambda: [e for e in fake.envelopes.values() if e.envelope_id != envelope_id])
        assert echo[0].payload["event"]["bot_id"] == fake.bot_id
        assert echo[0].payload["event"]["user"] == fake.bot_user_id
        await fake.wait_for(lambda: echo[0].acked)
        assert app.state["seen"] == []  # type: ignore[attr-defined]

        # what bolt itself called: apps.connections.open (handler) and auth.test (lazily, 1st event)
        assert [c.method for c in fake.calls] == ["apps.connections.open", "auth.test", "chat.postMessage"]
        assert fake.calls_to("chat.postMessage")[0].token == fake.bot_token

        # thread reply from a user reaches the message listener; conversations.replies sees it all
        reply_event = fake.channel_message("C0GENERAL", "U0ALICE", "thanks", thread_ts=event["ts"])
        await fake.send_event(reply_event)
        await fake.wait_for(lambda: app.state["seen"])  # type: ignore[attr-defined]
        assert app.state["seen"][0]["parent_user_id"] == "U0ALICE"  # type: ignore[attr-defined]
        replies = await app.client.conversations_replies(channel="C0GENERAL", ts=event["ts"])
        assert [m["text"] for m in replies["messages"]] == [event["text"], reply["text"], "thanks"]


@pytest.mark.timeout(60)
async def test_slash_command_acked_with_ephemeral_response(fake):
    app = make_app(fake)
    async with socket_mode(app, fake):
        ack = await fake.send_slash_command("/ttt", text="status", user_id="U0BOB", channel_id="C0GENERAL")
        assert ack == {"text": "thinking...", "response_type": "ephemeral"}
        await fake.wait_for(lambda: fake.response_url_posts)
        assert fake.response_url_posts[0]["body"]["text"] == "done: status"
        assert fake.response_url_posts[0]["body"]["response_type"] == "ephemeral"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close-frame", "tcp-abort", "disconnect-message"])
async def test_reconnects_after_socket_drop(fake, how):
    app = make_app(fake)
    # slack_sdk notices an aborted TCP connection only in its ping monitor loop (every
    # ping_interval seconds, 10 by default in bolt's handler); a close frame or Slack's
    # {"type": "disconnect"} message makes it reconnect at once.
    async with socket_mode(app, fake, ping_interval=1):
        await fake.wait_for_connections(1)
        if how == "disconnect-message":
            await fake.send_disconnect()
        else:
            await fake.drop_socket(abrupt=how == "tcp-abort")
        await fake.wait_for_connections(2, timeout=15)
        assert len(fake.calls_to("apps.connections.open")) == 2

        event = fake.app_mention("C0GENERAL", "U0ALICE", "still there?")
        await fake.wait_for_ack(await fake.send_event(event))
        reply = await fake.wait_for_message("C0GENERAL", lambda m: m.get("thread_ts") == event["ts"])
        assert "still there?" in reply["text"]


@pytest.mark.timeout(60)
async def test_http_mode_signature_checked(fake):
    app = make_app(fake, signing_secret=SIGNING_SECRET)
    runner = web.AppRunner(app.web_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/slack/events"
    try:
        event = fake.app_mention("C0GENERAL", "U0ALICE", "over http")
        body = json.dumps(fake.event_payload(event)).encode()
        async with aiohttp.ClientSession() as session:
            bad = fake.signed_request_headers(body, "wrong-secret")
            async with session.post(url, data=body, headers=bad) as resp:
                assert resp.status == 401
            stale = fake.signed_request_headers(body, SIGNING_SECRET, timestamp=1_600_000_000)
            async with session.post(url, data=body, headers=stale) as resp:
                assert resp.status == 401
            good = fake.signed_request_headers(body, SIGNING_SECRET)
            async with session.post(url, data=body, headers=good) as resp:
                assert resp.status == 200
        reply = await fake.wait_for_message("C0GENERAL")
        assert reply["thread_ts"] == event["ts"] and "over http" in reply["text"]
    finally:
        await runner.cleanup()


@pytest.mark.timeout(60)
async def test_web_api_auth_errors_and_records(fake):
    bad = AsyncWebClient(token="xoxb-wrong", base_url=fake.api_url)
    with pytest.raises(SlackApiError) as err:
        await bad.auth_test()
    assert err.value.response["error"] == "invalid_auth"
    client = AsyncWebClient(token=fake.bot_token, base_url=fake.api_url)
    with pytest.raises(SlackApiError) as err:  # the bot token is not an app-level token
        await client.apps_connections_open(app_token=fake.bot_token)
    assert err.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as err:
        await client.api_call("nope.method")
    assert err.value.response["error"] == "unknown_method" and fake.unknown_methods == ["nope.method"]

    posted = await client.chat_postMessage(channel="D0DM", text="hi", unfurl_links=False, blocks=[{"type": "divider"}])
    updated = await client.chat_update(channel="D0DM", ts=posted["ts"], text="hi again")
    assert updated["message"]["text"] == "hi again" and fake.updates[0]["text"] == "hi again"
    assert fake.posted[0]["unfurl_links"] is False and fake.posted[0]["blocks"] == [{"type": "divider"}]
    # a form-encoded body (slack_sdk sends JSON, query params or form depending on the method)
    form = {"channel": "D0DM", "user": "U0ALICE", "text": "psst", "blocks": json.dumps([{"type": "divider"}])}
    assert (await client.api_call("chat.postEphemeral", data=form))["ok"]
    assert fake.ephemerals[0]["text"] == "psst" and fake.ephemerals[0]["blocks"] == [{"type": "divider"}]
    await client.reactions_add(channel="D0DM", timestamp=posted["ts"], name="eyes")
    assert ("D0DM", posted["ts"], "eyes") in fake.reactions
    await client.reactions_remove(channel="D0DM", timestamp=posted["ts"], name="eyes")
    assert not fake.reactions
    user = await client.users_info(user="U0ALICE")
    assert user["user"]["id"] == "U0ALICE" and not user["user"]["is_bot"]
    info = await client.conversations_info(channel="D0DM")
    assert info["channel"]["is_im"]

    fake.inject_error("chat.postMessage", "ratelimited")
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="D0DM", text="x")
    await client.chat_delete(channel="D0DM", ts=posted["ts"])
    assert fake.deleted[0]["ts"] == posted["ts"]
