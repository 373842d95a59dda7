"""The data service of the local Momento server: ``cache_client.Scs`` over a :class:`Store`.

Scalar RPCs only; the rest (collections, ...) answer UNIMPLEMENTED through the
generated base class. Responses with a ``result`` oneof set it with a mapping
(``missing={}``), which protobuf turns into the nested message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from momento_wire_types import cacheclient_pb2 as cache_pb
from momento_wire_types import cacheclient_pb2_grpc as cache_grpc

from mproxy.momento_local.gate import Rejection, Servicer, rpc
from mproxy.momento_local.store import Condition, TtlUpdate, value_hash


def _batch_size(request: cache_pb._GetBatchRequest | cache_pb._SetBatchRequest) -> int:
    return len(request.items)


class DataServicer(Servicer, cache_grpc.ScsServicer):
    """``cache_client.Scs``: scalar data RPCs over a :class:`Store`."""

    @rpc("Get")
    def Get(self, request: cache_pb._GetRequest, cache: str) -> cache_pb._GetResponse:
        return _get_response(self.store.get(cache, request.cache_key))

    @rpc("GetWithHash")
    def GetWithHash(self, request: cache_pb._GetWithHashRequest, cache: str) -> cache_pb._GetWithHashResponse:
        found = self.store.get_with_hash(cache, request.cache_key)
        if found is None:
            return cache_pb._GetWithHashResponse(missing={})
        value, digest = found
        return cache_pb._GetWithHashResponse(found={"value": value, "hash": digest})

    @rpc("GetBatch", keys=_batch_size)
    def GetBatch(self, request: cache_pb._GetBatchRequest, cache: str) -> Iterator[cache_pb._GetResponse]:
        values = self.store.get_many(cache, [item.cache_key for item in request.items])
        return iter([_get_response(value) for value in values])

    @rpc("Set")
    def Set(self, request: cache_pb._SetRequest, cache: str) -> cache_pb._SetResponse:
        self.gate.check_item(request)
        self.store.set(cache, request.cache_key, request.cache_body, request.ttl_milliseconds)
        return cache_pb._SetResponse(result=cache_pb.Ok)

    @rpc("SetBatch", keys=_batch_size)
    def SetBatch(self, request: cache_pb._SetBatchRequest, cache: str) -> Iterator[cache_pb._SetResponse]:
        for item in request.items:
            self.gate.check_item(item)
        self.store.set_many(cache, [(i.cache_key, i.cache_body, i.ttl_milliseconds) for i in request.items])
        return iter([cache_pb._SetResponse(result=cache_pb.Ok) for _ in request.items])

    @rpc("SetIf")
    def SetIf(self, request: cache_pb._SetIfRequest, cache: str) -> cache_pb._SetIfResponse:
        if self._set_if(cache, request, _set_if_condition(request)):
            return cache_pb._SetIfResponse(stored={})
        return cache_pb._SetIfResponse(not_stored={})

    @rpc("SetIfHash")
    def SetIfHash(self, request: cache_pb._SetIfHashRequest, cache: str) -> cache_pb._SetIfHashResponse:
        if self._set_if(cache, request, _set_if_hash_condition(request)):
            return cache_pb._SetIfHashResponse(stored={"new_hash": value_hash(request.cache_body)})
        return cache_pb._SetIfHashResponse(not_stored={})

    @rpc("SetIfNotExists")
    def SetIfNotExists(self, request: cache_pb._SetIfNotExistsRequest, cache: str) -> cache_pb._SetIfNotExistsResponse:
        if self._set_if(cache, request, _absent):
            return cache_pb._SetIfNotExistsResponse(stored={})
        return cache_pb._SetIfNotExistsResponse(not_stored={})

    @rpc("Delete")
    def Delete(self, request: cache_pb._DeleteRequest, cache: str) -> cache_pb._DeleteResponse:
        self.store.delete(cache, request.cache_key)
        return cache_pb._DeleteResponse()

    @rpc("KeysExist", keys=lambda request: len(request.cache_keys))
    def KeysExist(self, request: cache_pb._KeysExistRequest, cache: str) -> cache_pb._KeysExistResponse:
        return cache_pb._KeysExistResponse(exists=self.store.keys_exist(cache, request.cache_keys))

    @rpc("Increment")
    def Increment(self, request: cache_pb._IncrementRequest, cache: str) -> cache_pb._IncrementResponse:
        self.gate.check_ttl(request.ttl_milliseconds)
        value = self.store.increment(cache, request.cache_key, request.amount, request.ttl_milliseconds)
        return cache_pb._IncrementResponse(value=value)

    @rpc("UpdateTtl")
    def UpdateTtl(self, request: cache_pb._UpdateTtlRequest, cache: str) -> cache_pb._UpdateTtlResponse:
        kind = request.WhichOneof("update_ttl")
        if kind is None:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "UpdateTtl needs increase_to/decrease_to/overwrite_to")
        ttl_ms: int = getattr(request, kind)
        self.gate.check_ttl(ttl_ms)
        result = self.store.update_ttl(cache, request.cache_key, _TTL_MODES[kind], ttl_ms)
        return cache_pb._UpdateTtlResponse(**{result.value: {}})  # the values are the oneof's names

    @rpc("ItemGetTtl")
    def ItemGetTtl(self, request: cache_pb._ItemGetTtlRequest, cache: str) -> cache_pb._ItemGetTtlResponse:
        remaining = self.store.remaining_ttl_ms(cache, request.cache_key)
        if remaining is None:
            return cache_pb._ItemGetTtlResponse(missing={})
        return cache_pb._ItemGetTtlResponse(found={"remaining_ttl_millis": remaining})

    @rpc("ItemGetType")
    def ItemGetType(self, request: cache_pb._ItemGetTypeRequest, cache: str) -> cache_pb._ItemGetTypeResponse:
        if not self.store.keys_exist(cache, (request.cache_key,))[0]:
            return cache_pb._ItemGetTypeResponse(missing={})
        return cache_pb._ItemGetTypeResponse(found={"item_type": cache_pb._ItemGetTypeResponse.SCALAR})

    def _set_if(self, cache: str, request: Any, condition: Condition) -> bool:
        """Check the request's item, then store it if ``condition`` holds; whether it did."""
        self.gate.check_item(request)
        return self.store.set_if(cache, request.cache_key, request.cache_body, request.ttl_milliseconds, condition)


def _get_response(value: bytes | None) -> cache_pb._GetResponse:
    if value is None:
        return cache_pb._GetResponse(result=cache_pb.Miss)
    return cache_pb._GetResponse(result=cache_pb.Hit, cache_body=value)


def _present(current: bytes | None) -> bool:
    return current is not None


def _absent(current: bytes | None) -> bool:
    return current is None


def _set_if_condition(request: cache_pb._SetIfRequest) -> Condition:
    kind = request.WhichOneof("condition")
    if kind == "present":
        return _present
    if kind == "absent":
        return _absent
    if kind == "equal":
        expected = request.equal.value_to_check
        return lambda current: current == expected
    if kind == "not_equal":
        other = request.not_equal.value_to_check
        return lambda current: current != other
    if kind == "present_and_not_equal":
        other = request.present_and_not_equal.value_to_check
        return lambda current: current is not None and current != other
    if kind == "absent_or_equal":
        expected = request.absent_or_equal.value_to_check
        return lambda current: current is None or current == expected
    raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "SetIf needs a condition")


def _set_if_hash_condition(request: cache_pb._SetIfHashRequest) -> Condition:
    kind = request.WhichOneof("condition")
    if kind == "unconditional":
        return lambda current: True
    if kind == "present_and_hash_equal":
        wanted = request.present_and_hash_equal.hash_to_check
        return lambda current: current is not None and value_hash(current) == wanted
    if kind == "present_and_not_hash_equal":
        other = request.present_and_not_hash_equal.hash_to_check
        return lambda current: current is not None and value_hash(current) != other
    if kind == "absent_or_hash_equal":
        wanted = request.absent_or_hash_equal.hash_to_check
        return lambda current: current is None or value_hash(current) == wanted
    if kind == "absent_or_not_hash_equal":
        other = request.absent_or_not_hash_equal.hash_to_check
        return lambda current: current is None or value_hash(current) != other
    raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "SetIfHash needs a condition")


#: UpdateTtl's ``update_ttl`` oneof -> the store's mode.
_TTL_MODES = {
    "increase_to_milliseconds": TtlUpdate.INCREASE_TO,
    "decrease_to_milliseconds": TtlUpdate.DECREASE_TO,
    "overwrite_to_milliseconds": TtlUpdate.OVERWRITE_TO,
}