"""GetImage and ListImageSources over grpc.aio (``robot/images.py``) against the SDK's own
``ImageClient``: the same TLS server, the same requests, and for every outcome the same answer, or
the same SDK exception (class, gRPC status, the whole response it carries).

The server is a real gRPC server over TLS (the simulated robot's certificates), told by the name
of the first source asked for what to do: answer, answer with an image or header status, abort
with a gRPC status and details, raise, stall, or send bytes that do not deserialise.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from bosdyn.api import header_pb2, image_pb2
from bosdyn.client import create_standard_sdk
from bosdyn.client.exceptions import ResponseError
from bosdyn.client.image import build_image_request

from spotrelay.robot.images import Channels, ImageService
from spotrelay.sim.certs import make_certs
from tests.relay import free_port

STATUS = image_pb2.ImageResponse
AUTHORITY = "api.spot.robot"
TOKEN = "token-for-the-test"


class Server:
    """What the server saw of each call, and how it answers (by the first source's name)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str]] = []  # (authorization, client name)

    def get_image(self, request: image_pb2.GetImageRequest, context: grpc.ServicerContext):
        self.seen.append(
            (dict(context.invocation_metadata()).get("authorization"), request.header.client_name)
        )
        what, _, arg = request.image_requests[0].image_source_name.partition(":")
        resp = image_pb2.GetImageResponse()
        resp.header.error.code = header_pb2.CommonError.CODE_OK
        resp.header.request_received_timestamp.seconds = 1000
        for req in request.image_requests:
            r = resp.image_responses.add()
            r.source.name, r.status = req.image_source_name, STATUS.STATUS_OK
            r.shot.image.data = b"\xff\xd8 a picture \xff\xd9"
        if what == "status":
            resp.image_responses[-1].status = int(arg)
            if int(arg) == STATUS.STATUS_CUSTOM_PARAMS_ERROR:
                resp.image_responses[-1].custom_param_error.error_messages.append("bad")
        elif what == "header":
            resp.header.error.code = int(arg)
        elif what == "abort":
            code, _, details = arg.partition(":")
            context.abort(grpc.StatusCode[code], details)
        elif what == "raise":
            raise RuntimeError("boom")
        elif what == "slow":
            time.sleep(1.0)
        elif what == "garbage":
            return b"\xff\xff\xff not a protobuf"
        elif what == "huge":
            resp.image_responses[0].shot.image.data = bytes(5000)
        return resp


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ca, key, cert = make_certs(str(tmp_path_factory.mktemp("certs")))
    behaviour = Server()
    handler = grpc.method_handlers_generic_handler(
        "bosdyn.api.ImageService",
        {
            "GetImage": grpc.unary_unary_rpc_method_handler(
                behaviour.get_image,
                request_deserializer=image_pb2.GetImageRequest.FromString,
                response_serializer=_serialize,
            )
        },  # no ListImageSources: UNIMPLEMENTED
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler])
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    srv.start()
    behaviour.port, behaviour.ca = port, ca  # type: ignore[attr-defined]
    yield behaviour
    srv.stop(grace=0).wait(2)


class Both:
    """The SDK's ImageClient and ours, on one SDK Robot (its token, CA, address, limits); ours
    on ``loop`` (gRPC's asyncio stack wants one loop, so the module shares one)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        ca: str,
        authority: str = AUTHORITY,
        max_receive: int = 0,
    ):
        sdk = create_standard_sdk("spotrelay-images-test")
        sdk.load_robot_cert(ca)
        robot = sdk.create_robot("127.0.0.1")
        robot.update_secure_channel_port(port)
        if max_receive:
            robot.max_receive_message_length = max_receive
        robot.update_user_token(TOKEN)
        robot.authorities_by_name["image"] = authority
        robot.service_type_by_name["image"] = "bosdyn.api.ImageService"
        self.robot = robot
        # options=[]: a list of its own (the SDK's default list is shared by every robot of the
        # process, and keeps the message limits of the first)
        self.sdk_client = robot.ensure_client("image", options=[])
        self.loop = loop
        self.channels = self.loop.run_until_complete(self._channels())
        self.ours = ImageService(robot, self.sdk_client, authority, self.channels)

    async def _channels(self) -> Channels:
        return Channels(self.robot)

    def sdk(self, names: list[str], timeout: float = 5.0):
        requests = [build_image_request(n) for n in names]
        return _outcome(lambda: self.sdk_client.get_image(requests, timeout=timeout))

    def aio(self, names: list[str], timeout: float = 5.0):
        requests = [build_image_request(n) for n in names]

        async def call():
            return await self.ours.get_images(requests, timeout=timeout)

        return _outcome(lambda: list(self.loop.run_until_complete(call()).image_responses))

    def close(self) -> None:
        self.loop.run_until_complete(self.channels.close())
        self.robot.shutdown()


def _outcome(call):
    """What a caller gets: ("ok", value) or (exception class, gRPC status, response carried)."""
    try:
        return "ok", call()
    except Exception as exc:
        error = getattr(exc, "error", None)
        code = error.code() if isinstance(error, grpc.RpcError) else None
        response = exc.response if isinstance(exc, ResponseError) else None
        return type(exc), code, response


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(asyncio.sleep(0.05))  # gRPC's last events for closed channels
    loop.close()


@pytest.fixture(scope="module")
def both(loop, server):
    b = Both(loop, server.port, server.ca)
    yield b
    b.close()


def same(both: Both, names: list[str], timeout: float = 5.0):
    sdk, ours = both.sdk(names, timeout), both.aio(names, timeout)
    assert ours == sdk
    return ours


def test_a_good_answer_is_the_same_and_carries_the_same_token_and_header(both, server):
    server.seen.clear()
    ours = same(both, ["ok", "ok"])
    assert ours[0] == "ok" and len(ours[1]) == 2
    (sdk_auth, sdk_name), (our_auth, our_name) = server.seen
    assert our_auth == sdk_auth == f"Bearer {TOKEN}"
    assert our_name == sdk_name and our_name  # the SDK's request processors ran


@pytest.mark.parametrize("status", [*STATUS.Status.values(), 42])
def test_every_image_status_fails_as_the_sdk_does(both, status):
    ours = same(both, ["ok", f"status:{status}"])
    if ours[0] != "ok":  # the whole response comes with the error (the poller uses the rest)
        assert issubclass(ours[0], ResponseError) and ours[2] is not None


@pytest.mark.parametrize("code", [*header_pb2.CommonError.Code.values(), 99])
def test_every_header_code_fails_as_the_sdk_does(both, code):
    same(both, [f"header:{code}"])


# What translate_exception looks for: HTTP statuses in the details, gRPC's own words.
DETAILS = [
    "plain",
    "Received http2 header with status: 401",
    "404",
    "429",
    "502",
    "504",
    "Received message larger than max (5 vs. 4)",
    "Socket closed",
    "Exception deserializing response!",
]


@pytest.mark.parametrize("details", DETAILS)
@pytest.mark.parametrize("code", [c.name for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_rpc_error_is_translated_as_the_sdk_does(both, code, details):
    same(both, [f"abort:{code}:{details}"])


@pytest.mark.parametrize("what", ["raise", "garbage"])
def test_a_failing_or_garbled_service_fails_as_the_sdk_does(both, what):
    same(both, [what])
    assert both.aio(["ok"])[0] == "ok"  # a garbled answer's channel was made anew


def test_a_deadline_fails_as_the_sdk_does(both):
    same(both, ["slow"], timeout=0.2)


def test_an_unimplemented_method_fails_as_the_sdk_does(both):
    sdk = _outcome(lambda: both.sdk_client.list_image_sources(timeout=5))
    ours = _outcome(lambda: both.loop.run_until_complete(both.ours.list_sources(timeout=5)))
    assert ours == sdk and ours[0].__name__ == "UnimplementedError"


def test_a_reply_over_the_size_limit_fails_as_the_sdk_does(loop, server):
    small = Both(loop, server.port, server.ca, max_receive=1000)
    try:
        assert same(small, ["huge"])[0].__name__ == "ResponseTooLargeError"
    finally:
        small.close()


def test_an_authority_the_certificate_does_not_name_fails_as_the_sdk_does(loop, server):
    other = Both(loop, server.port, server.ca, authority="api.example.org")
    try:
        same(other, ["ok"])
    finally:
        other.close()


def test_a_robot_that_is_not_there_fails_as_the_sdk_does(loop, server):
    gone = Both(loop, free_port(), server.ca)
    try:
        assert same(gone, ["ok"])[0].__name__ == "ProxyConnectionError"
    finally:
        gone.close()


def test_grpc_classic_client_io_is_chosen_before_grpc_loads():
    """gRPC reads GRPC_EXPERIMENTS once, when imported: the package sets it first, imports no
    grpc to do so (or the setting would silently stop applying), and leaves an operator's own."""
    check = (
        "import os, sys, spotrelay; "
        "assert 'grpc' not in sys.modules, 'spotrelay imports grpc before choosing its I/O'; "
        "print(os.environ['GRPC_EXPERIMENTS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    ours = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert ours.returncode == 0 and ours.stdout.strip() == "-event_engine_client", ours.stderr
    env["GRPC_EXPERIMENTS"] = ""
    theirs = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert theirs.returncode == 0 and theirs.stdout.strip() == "", theirs.stderr
