"""The discovery documents (RFC 7644 §4): ServiceProviderConfig,
ResourceTypes and Schemas, built with scim2-models from the same models
that validate the resources."""

from __future__ import annotations

import copy

from scim2_models import (
    AuthenticationScheme,
    Bulk,
    ChangePassword,
    ETag,
    Filter,
    Pagination,
    Patch,
    ResourceType,
    ServiceProviderConfig,
    Sort,
)

from .resources import GROUP, USER, Kind

MAX_PAYLOAD = 16 * 1024 * 1024      # bytes of a request body
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def service_provider_config(base: str) -> dict:
    doc = ServiceProviderConfig(
        patch=Patch(supported=True),
        bulk=Bulk(supported=False, max_operations=0, max_payload_size=MAX_PAYLOAD),
        filter=Filter(supported=True, max_results=MAX_PAGE),
        change_password=ChangePassword(supported=False),
        sort=Sort(supported=False),
        etag=ETag(supported=True),
        authentication_schemes=[AuthenticationScheme(
            type="oauthbearertoken", name="Bearer token",
            description="An aus-server API key of this org: Authorization: Bearer "
                        "<api_key>:<secret>", primary=True)],
        pagination=Pagination(cursor=False, index=True, default_pagination_method="index",
                              default_page_size=DEFAULT_PAGE),
    ).model_dump()
    doc["meta"] = {"resourceType": "ServiceProviderConfig",
                   "location": f"{base}/ServiceProviderConfig"}
    return doc


def _resource_type(kind: Kind, base: str) -> dict:
    doc = ResourceType.from_resource(kind.model).model_dump()
    doc["description"] = kind.description
    doc["meta"] = {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/{kind.name}"}
    return doc


def resource_types(base: str) -> list[dict]:
    return [_resource_type(USER, base), _resource_type(GROUP, base)]


def schemas(base: str) -> list[dict]:
    out = []
    for kind in (USER, GROUP):
        for doc in kind.schema_docs:
            doc = copy.deepcopy(doc)
            doc["meta"] = {"resourceType": "Schema", "location": f"{base}/Schemas/{doc['id']}"}
            out.append(doc)
    return out
