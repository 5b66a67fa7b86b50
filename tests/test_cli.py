"""hubctl: token, publish, grant/revoke against a live node, clean errors, and ``serve`` with the embedded
Redis and in --dev mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from click.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cli.main import cli
from hub.app import App
from hub.auth import TokenVerifier
from hub.config import AuthConfig
from hub.keys import Keys
from tests.conftest import REDIS_URL, ROOT, SECRET, free_port, hub_env, url_of
from tests.helpers import Client, connect, mint

READY = re.compile(rb"^streamhub node \S+ ready on ws://127\.0\.0\.1:(\d+)/ws/connect$")


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """hubctl reads ./hub.yaml and writes ./.hub-data: run every command from an empty directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def hubctl(*args: str, env: dict[str, str | None]) -> Result:
    """Run hubctl in a thread (commands call asyncio.run) while this loop keeps serving clients."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={"HUB_CONFIG": None, **env})


def cli_env(prefix: str) -> dict[str, str | None]:
    return {**hub_env(prefix)}


def assert_clean_failure(result: Result, *needles: str) -> None:
    """A non-zero exit through click's own error path (no unhandled exception), naming the problem."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def prefix_keys(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()


# ---------------------------------------------------------------------- token


async def test_token_command_mints_a_token_the_verifier_accepts() -> None:
    """``hubctl token 5 --role support --room order_9`` prints a JWT the hub's verifier accepts with that
    sub, role, room and the default one-hour lifetime."""
    result = await hubctl("token", "5", "--role", "support", "--room", "order_9", env={"JWT_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert "\n" not in token
    verified = TokenVerifier(AuthConfig(secret=SECRET)).verify(token)
    assert verified.principal.user_id == "5"
    assert verified.principal.roles == frozenset({"support"})
    assert verified.principal.token_rooms == frozenset({"order_9"})
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600
    with pytest.raises(Exception, match="signature"):
        TokenVerifier(AuthConfig(secret="another-secret-0123456789abcdef0123456789")).verify(token)


@pytest.mark.parametrize(("args", "needle"), [
    (["token", "bad id!"], "USER_ID"),
    (["token", "1", "--ttl", "0"], "--ttl"),
    (["token", "1", "--ttl", "-5"], "--ttl"),
])
async def test_token_command_refuses_to_mint_tokens_the_hub_would_refuse(args: list[str], needle: str) -> None:
    """``hubctl token`` promises "a JWT this hub accepts": a user id outside the sub alphabet or a
    lifetime that is not positive is an error, not a token the handshake answers with 401."""
    result = await hubctl(*args, env={"JWT_SECRET": SECRET})
    assert_clean_failure(result, needle)


async def test_token_command_without_a_secret_fails_cleanly() -> None:
    """Without JWT_SECRET (and without --dev) ``hubctl token`` exits non-zero naming auth.secret."""
    result = await hubctl("token", "5", env={"JWT_SECRET": None})
    assert_clean_failure(result, "auth.secret")


# ---------------------------------------------------------------------- publish


async def test_publish_chat_reaches_a_connected_member_live(node: App, prefix: str) -> None:
    """``hubctl publish ROOM --content hi`` appends a system chat entry that a connected member receives."""
    member = await connect(url_of(node), "1")
    await member.join("channel_cli")
    result = await hubctl("publish", "channel_cli", "--content", "hi", env=cli_env(prefix))
    assert result.exit_code == 0, result.output
    stream_id = result.stdout.strip()
    assert re.fullmatch(r"\d+-\d+", stream_id), stream_id
    frame = await member.expect("chat_message")
    assert frame["id"] == stream_id and frame["room"] == "channel_cli" and frame["content"] == "hi"
    assert frame["sender_id"] == "system" and frame["message_type"] == "system"


async def test_publish_order_status_update_reaches_order_update_subscribers(node: App, prefix: str) -> None:
    """``hubctl publish order_5 --type order_status_update --data ...`` reaches a subscribe_order_updates
    subscriber with the data object."""
    watcher = await connect(url_of(node), "2", rooms=["order_5"])
    await watcher.send({"type": "subscribe_order_updates", "order_id": 5})
    await watcher.expect("subscribed", room="order_5")
    result = await hubctl("publish", "order_5", "--type", "order_status_update", "--data", '{"status":"shipped"}',
                          env=cli_env(prefix))
    assert result.exit_code == 0, result.output
    event = await watcher.expect("order_status_update")
    assert event["id"] == result.stdout.strip()
    assert event["room"] == "order_5" and event["data"] == {"status": "shipped"}


@pytest.mark.parametrize(("args", "needle"), [
    (["publish", "order_5", "--type", "order_status_update", "--data", "{not json"], "--data must be JSON"),
    (["publish", "order_5", "--type", "order_status_update", "--data", "[1, 2]"], "--data must be a JSON object"),
    (["publish", "order_01", "--content", "hi"], "order_"),
    (["publish", "channel_x", "--type", "chat_message"], "chat_message needs --content"),
    (["publish", "channel_x", "--content", ""], "chat_message needs --content"),
    (["grant", "Order_7", "1"], "room must be"),
])
async def test_publish_and_grant_refuse_bad_input_and_write_nothing(prefix: str, args: list[str],
                                                                    needle: str) -> None:
    """Bad --data, a non-canonical room name or a chat message without content exit non-zero with a
    message naming the problem, and nothing is written to Redis."""
    result = await hubctl(*args, env=cli_env(prefix))
    assert_clean_failure(result, needle)
    assert prefix_keys(prefix) == []


# ---------------------------------------------------------------------- grant and revoke


async def test_grant_lets_a_user_join_and_revoke_removes_them(node: App, prefix: str) -> None:
    """``hubctl grant order_3 7 8`` lets user 7 join order_3; ``hubctl revoke order_3 7`` reports one removal
    and takes the connected member out of the room."""
    member = await connect(url_of(node), "7")
    await member.send({"type": "join_room", "room": "order_3"})
    assert (await member.expect("error"))["code"] == "forbidden"

    granted = await hubctl("grant", "order_3", "7", "8", env=cli_env(prefix))
    assert granted.exit_code == 0, granted.output
    assert granted.stdout.strip() == "granted order_3 to 2 new user(s)"
    again = await hubctl("grant", "order_3", "8", env=cli_env(prefix))
    assert again.stdout.strip() == "granted order_3 to 0 new user(s)"
    await member.join("order_3")

    revoked = await hubctl("revoke", "order_3", "7", env=cli_env(prefix))
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.strip() == "revoked order_3 from 1 user(s)"
    left = await member.expect("room_left", room="order_3")
    assert left["reason"] == "access_revoked"
    none_left = await hubctl("revoke", "order_3", "7", env=cli_env(prefix))
    assert none_left.stdout.strip() == "revoked order_3 from 0 user(s)"


# ---------------------------------------------------------------------- Redis unreachable


def run_hubctl_process(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 30) -> Any:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout_s, check=False)


@pytest.mark.parametrize("args", [
    ["grant", "order_1", "1"],
    ["revoke", "order_1", "1"],
    ["publish", "channel_x", "--content", "hi"],
])
async def test_unreachable_redis_is_a_clean_error(prefix: str, tmp_path: Path, args: list[str]) -> None:
    """With REDIS_URL pointing at a closed port, grant/revoke/publish exit 1 with "Error: Redis..." and no
    traceback."""
    env = {**os.environ, **hub_env(prefix, REDIS_URL="redis://127.0.0.1:1/0"), "PYTHONPATH": str(ROOT)}
    done = await asyncio.to_thread(run_hubctl_process, args, env, tmp_path)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert stderr.startswith("Error: Redis"), stderr
    assert "Traceback" not in stderr
    assert done.stdout == b""


# ---------------------------------------------------------------------- serve with the embedded Redis


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any hub or Redis setting, plus ``extra``."""
    dropped = {"REDIS_URL", "JWT_SECRET", "JWT_ALGORITHM", "JWT_PUBLIC_KEY_FILE", "JWT_AUDIENCE", "JWT_ISSUER"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("HUB_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def start_serve(args: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=log)


async def wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    match = READY.match(line.strip())
    if match is None:
        log = await asyncio.to_thread(log_path.read_text)
        raise AssertionError(f"hub did not start: {line!r}; log: {log}")
    assert int(match.group(1)) == port


def redis_servers_in(data_dir: Path) -> list[int]:
    """Pids of redis-server processes whose working directory is ``data_dir`` (redis chdirs to --dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if (os.readlink(f"/proc/{entry}/cwd") == str(data_dir)
                    and os.path.basename(os.readlink(f"/proc/{entry}/exe")) == "redis-server"):
                found.append(int(entry))
        except OSError:
            continue
    return found


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def socket_answers(socket_path: Path) -> bool:
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def has_aof(data_dir: Path) -> bool:
    """Redis 6 writes appendonly.aof; Redis 7 an appendonlydir/."""
    return (data_dir / "appendonly.aof").is_file() or (data_dir / "appendonlydir").is_dir()


def stop_all(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    """Finally-block cleanup: kill the hub and any redis-server it left in ``data_dir``."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    for pid in redis_servers_in(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def close_code_of(client: Client, timeout_s: float = 15.0) -> int | None:
    async with asyncio.timeout(timeout_s):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await client.ws.recv()
    return client.ws.close_code


async def sigterm_and_wait(proc: subprocess.Popen[bytes], clients: list[Client]) -> int:
    proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(close_code_of(c) for c in clients))
    assert set(codes) <= {4001}, codes
    return await asyncio.to_thread(proc.wait, 20)


@pytest.mark.timeout(90)
async def test_serve_embedded_runs_its_own_redis_and_stops_it(tmp_path: Path) -> None:
    """``serve --embedded`` in an empty directory starts a private Redis (AOF on) under .hub-data/redis,
    serves clients end to end, and on SIGTERM exits 0 and stops that Redis."""
    port = free_port()
    data_dir = (tmp_path / ".hub-data" / "redis").resolve()
    log_path = tmp_path / "serve.log"
    proc = start_serve(["serve", "--embedded", "--port", str(port)], tmp_path, clean_env(JWT_SECRET=SECRET),
                       log_path)
    try:
        await wait_ready(proc, port, log_path)
        servers = redis_servers_in(data_dir)
        assert len(servers) == 1, servers
        url = f"ws://127.0.0.1:{port}"
        alice = await connect(url, "1")
        bob = await connect(url, "2")
        await alice.join("channel_embedded")
        await bob.join("channel_embedded")
        ack = await alice.say("channel_embedded", "hello embedded")
        frame = await bob.expect("chat_message")
        assert frame["content"] == "hello embedded" and frame["id"] == ack["id"]
        embedded = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
        try:
            assert embedded.xlen(Keys("hub:").stream("channel_embedded")) == 1
        finally:
            embedded.close()

        assert await sigterm_and_wait(proc, [alice, bob]) == 0, log_path.read_text()
        deadline = time.monotonic() + 10
        while not all(is_gone(pid) for pid in servers):
            assert time.monotonic() < deadline, "the embedded redis-server outlived the hub"
            await asyncio.sleep(0.05)
        assert not socket_answers(data_dir / "redis.sock")
        assert has_aof(data_dir)
    finally:
        stop_all(proc, data_dir)


@pytest.mark.timeout(90)
async def test_dev_token_is_accepted_by_dev_serve(tmp_path: Path) -> None:
    """``hubctl --dev token 1`` creates .hub-data/dev-secret (mode 600, reused later) and prints a token
    that ``hubctl --dev serve --embedded`` in the same directory accepts; a token signed otherwise is
    refused."""
    env = clean_env()
    first = await asyncio.to_thread(run_hubctl_process, ["--dev", "token", "1"], env, tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    secret_file = tmp_path / ".hub-data" / "dev-secret"
    assert secret_file.is_file()
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    token = first.stdout.decode().strip()
    assert TokenVerifier(AuthConfig(secret=secret)).verify(token).principal.user_id == "1"
    second = await asyncio.to_thread(run_hubctl_process, ["--dev", "token", "2"], env, tmp_path)
    assert second.returncode == 0 and secret_file.read_text().strip() == secret

    port = free_port()
    data_dir = (tmp_path / ".hub-data" / "redis").resolve()
    log_path = tmp_path / "serve.log"
    proc = start_serve(["--dev", "serve", "--embedded", "--port", str(port)], tmp_path, env, log_path)
    try:
        await wait_ready(proc, port, log_path)
        url = f"ws://127.0.0.1:{port}"
        client = await connect(url, "1", token=token)
        assert client.established["user_id"] == "1"
        with pytest.raises(InvalidStatus) as info:
            await connect(url, "1", token=mint("1", secret=SECRET))
        assert info.value.response.status_code == 401
        assert await sigterm_and_wait(proc, [client]) == 0, log_path.read_text()
    finally:
        stop_all(proc, data_dir)
