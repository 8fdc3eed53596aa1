"""GetImage and ListImageSources on ``grpc.aio`` channels of the relay's own event loop, made as
the SDK makes them and failing as the SDK fails, without the SDK's threads.

Why not the SDK's ``ImageClient.get_image_async``: it calls ``future()`` on a synchronous gRPC
channel, which starts a channel "spin" thread whenever the calls in flight rise from zero (almost
every call, on a robot that answers in milliseconds), and the SDK's token plugin
(``metadata_call_credentials``) runs in a new thread for every call: two thread starts per frame,
a third of the relay's CPU with six passthrough viewers (README, *Benchmarks*). Here a call is a
coroutine on the loop that already handles the frames: no thread, no hand-off.

What stays the SDK's, so that the relay sees exactly what ``ImageClient`` would give it:

* the request: the client's own request processors (``AddRequestHeader``: client name, request
  timestamp), the same deadline the caller gives;
* the token: ``authorization: Bearer <robot.user_token>``, read at each call (the SDK's token
  refresh applies), as the SDK's plugin sends it, and only over TLS;
* the channel: the robot's address and port, its CA, ``grpc.ssl_target_name_override`` = the
  service's authority from the directory, the robot's message-size limits;
* the answers: RPC errors through ``bosdyn.client.channel.translate_exception`` (a channel whose
  responses do not deserialise is made anew, as the SDK's ``_channel_reset_fn`` does), replies
  through the SDK's response processors and its ``error_from_response`` functions
  (``image._error_from_response``, ``common.common_header_errors``).

One difference on purpose: reconnection. The SDK leaves gRPC's defaults (a dropped connection is
retried after 1 s, then 1.6 times longer each time), so frames came back 2-6 s after a robot that
restarted. These channels retry after 0.1 s growing to 0.5 s, and say when they are connected
again (``on_ready``), so that the connection probes a failing service at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from bosdyn.api import image_pb2, image_service_pb2_grpc
from bosdyn.client.channel import translate_exception
from bosdyn.client.common import common_header_errors
from bosdyn.client.exceptions import InternalDeserializationError
from bosdyn.client.image import ImageClient, _error_from_response

log = logging.getLogger("spotrelay.robot")

# A robot that went away is tried again 0.1 s later, then at most every 0.5 s (gRPC: x1.6, +-20 %
# jitter): a connection attempt is a TCP handshake, cheap for a robot that is down, and frames are
# back within about half a second of its return. An attempt that gets no answer (a robot off the
# network) is given up after 2 s, so a retransmitted SYN never holds the next try back for long.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 2000),  # gRPC's name for the connect timeout
)

_IDLE = grpc.ChannelConnectivity.IDLE
_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


def channel_options(robot: Any, authority: str) -> list[tuple[str, Any]]:
    """The SDK's options for a channel to ``authority`` (``Robot.ensure_secure_channel``,
    ``channel.create_secure_channel``), plus the reconnect backoff above."""
    return [
        ("grpc.ssl_target_name_override", authority),
        ("grpc.max_receive_message_length", robot.max_receive_message_length),
        ("grpc.max_send_message_length", robot.max_send_message_length),
        *RECONNECT_OPTIONS,
    ]


class Channels:
    """The image channels of one session: one per authority, as the SDK keeps them (services on
    one authority share one connection). Lives on the event loop that created it.

    ``on_ready(authority)`` is called each time a channel becomes connected again after it was
    not: the robot or its proxy is back."""

    def __init__(self, robot: Any, on_ready: Callable[[str], None] = lambda authority: None):
        self.robot = robot
        self.on_ready = on_ready
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, image_service_pb2_grpc.ImageServiceStub] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._closed = False

    def stub(self, authority: str) -> image_service_pb2_grpc.ImageServiceStub:
        """The ImageService stub on ``authority``'s channel, made on first use."""
        stub = self._stubs.get(authority)
        if stub is None:
            if self._closed:
                raise ConnectionError("not connected to the robot")
            channel = self._channels[authority] = grpc.aio.secure_channel(
                f"{self.robot.address}:{self.robot._secure_channel_port}",
                grpc.ssl_channel_credentials(root_certificates=self.robot.cert),
                options=channel_options(self.robot, authority),
            )
            stub = self._stubs[authority] = image_service_pb2_grpc.ImageServiceStub(channel)
            self._watchers[authority] = asyncio.create_task(
                self._watch(authority, channel), name=f"watch-{authority}"
            )
        return stub

    async def reset(self, authority: str) -> None:
        """Replace a channel (its responses did not deserialise: the SDK makes a new one too)."""
        self._stubs.pop(authority, None)
        channel = self._channels.pop(authority, None)
        watcher = self._watchers.pop(authority, None)
        if watcher is not None:
            watcher.cancel()
        if channel is not None:
            await channel.close()

    async def _watch(self, authority: str, channel: grpc.aio.Channel) -> None:
        """Follow the channel's connectivity: a return to READY is news for the connection. An
        IDLE channel (a connection lost, or a failed attempt's backoff over) is asked to connect
        at once rather than at the next call, so the robot's return is seen within a backoff."""
        try:
            state = channel.get_state(try_to_connect=False)
            was_ready = state == _READY
            while state != _SHUTDOWN:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=False)
                if state == _IDLE:
                    state = channel.get_state(try_to_connect=True)
                if state == _READY and not was_ready:
                    self.on_ready(authority)
                was_ready = state == _READY
        except (grpc.aio.UsageError, RuntimeError):  # closed under us: nothing left to watch
            log.debug("stopped watching the channel to %s", authority, exc_info=True)

    async def close(self) -> None:
        """Close every channel: calls still in flight end (cancelled)."""
        self._closed = True
        for watcher in self._watchers.values():
            watcher.cancel()
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        self._watchers.clear()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()


class ImageService:
    """One image service (``image``, ``spot-cam-image``, a payload's) over its authority's
    channel, with the SDK ``ImageClient`` it stands in for (its request and response processors,
    its client name)."""

    def __init__(self, robot: Any, client: ImageClient, authority: str, channels: Channels):
        self.robot, self.client, self.authority = robot, client, authority
        self._channels = channels
        self._token: str | None = None
        self._metadata: grpc.aio.Metadata | None = None

    def get_images(self, requests: list[image_pb2.ImageRequest], timeout: float) -> Pending:
        """Send one GetImage now; await the result for the whole GetImageResponse (its header
        says when the robot received the request), or the exception ``ImageClient.get_image``
        raises, with the whole response in ``.response``.

        The call is started here, not when it is awaited: the schedule times each request to
        reach the robot just after a capture, and a request that waited for the loop's next
        turns (a frame's writes to every viewer) would arrive late, or miss its capture."""
        request = image_pb2.GetImageRequest(image_requests=requests)
        return Pending(self, self._start("GetImage", request, timeout), _error_from_response)

    async def list_sources(self, timeout: float) -> list[image_pb2.ImageSource]:
        """As ``ImageClient.list_image_sources``."""
        request = image_pb2.ListImageSourcesRequest()
        call = self._start("ListImageSources", request, timeout)
        response = await Pending(self, call, common_header_errors)
        return list(response.image_sources)

    def _token_metadata(self) -> grpc.aio.Metadata:
        """What the SDK's ``RefreshingAccessTokenAuthMetadataPlugin`` sends, made once per token
        (as grpc.aio's own Metadata, which it would otherwise build from a tuple at each call)."""
        token = self.robot.user_token
        if token != self._token or self._metadata is None:
            self._token = token
            self._metadata = grpc.aio.Metadata(("authorization", f"Bearer {token}"))
        return self._metadata

    def _start(self, method: str, request: Any, timeout: float) -> Any:
        """The call, under way (a grpc.aio call object), or the error that prevented it."""
        for processor in self.client.request_processors:
            processor.mutate(request)
        try:
            call = getattr(self._channels.stub(self.authority), method)
            return call(request, timeout=timeout, metadata=self._token_metadata())
        except (grpc.aio.UsageError, ConnectionError):  # the session ended: channels closed
            return ConnectionError("not connected to the robot")

    async def _finish(self, call: Any, error_from_response) -> Any:
        if isinstance(call, Exception):
            raise call
        try:
            response = await call
            if response is None:  # grpc.aio's word for a reply that did not deserialise
                raise _undeserialisable()
        except grpc.aio.AioRpcError as exc:
            error = translate_exception(exc)
            if isinstance(error, InternalDeserializationError):
                await self._channels.reset(self.authority)
            raise error from None
        except grpc.aio.UsageError:  # the channel was closed under us: the session ended
            raise ConnectionError("not connected to the robot") from None
        for processor in self.client.response_processors:
            processor.mutate(response)
        error = error_from_response(response)
        if error is not None:
            raise error
        return response


class Pending:
    """A call under way; awaiting it gives what the SDK would (the response, or its exception).
    Nothing is left to await if it is dropped: the coroutine is made when it is awaited."""

    __slots__ = ("_call", "_errors", "_service")

    def __init__(self, service: ImageService, call: Any, error_from_response) -> None:
        self._service, self._call, self._errors = service, call, error_from_response

    def __await__(self):
        return self._service._finish(self._call, self._errors).__await__()


def _undeserialisable() -> grpc.aio.AioRpcError:
    """The error a synchronous channel raises for a reply that does not deserialise (grpc.aio
    logs it and returns None instead), so that the SDK's translation applies unchanged."""
    details = "Exception deserializing response!"
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=details,
        debug_error_string=f"INTERNAL:{details}",
    )
