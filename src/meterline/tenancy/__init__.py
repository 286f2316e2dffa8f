"""Organizations, workspaces, API keys, identifiers and authentication."""

from meterline.tenancy.models import (
    ApiKey,
    CreditGrant,
    KeyScope,
    NewKey,
    Organization,
    Principal,
    Workspace,
)
from meterline.tenancy.service import TenancyService
from meterline.tenancy.store import TenancyStore

__all__ = [
    "ApiKey",
    "CreditGrant",
    "KeyScope",
    "NewKey",
    "Organization",
    "Principal",
    "TenancyService",
    "TenancyStore",
    "Workspace",
]
